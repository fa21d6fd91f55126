"""The cluster files under deploy/: they parse, their commands are valid, their versions agree with setup.py."""
import ast
import os
import re
import shlex

import apache_beam as beam
import pytest
import yaml
from apache_beam.options.pipeline_options import GoogleCloudOptions, PortableOptions, SetupOptions, StandardOptions
from apache_beam.options.pipeline_options import WorkerOptions
from apache_beam.runners.runner import create_runner
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from cli.main import build_parser
from deploy.submit import check_command
from pipelines.beam_runner import pipeline_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
PARSE = build_parser().parse_args  # vismem's own parser, as the CLI hands it to check_command


def setup_py() -> dict:
    """``version``, ``python_requires`` and ``install_requires`` (by name) of setup.py, read without running it."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    reqs = {}
    for r in ast.literal_eval(kw["install_requires"]):
        req = Requirement(r)
        reqs[req.name.lower()] = req
    return {"version": ast.literal_eval(kw["version"]), "python_requires": ast.literal_eval(kw["python_requires"]),
            "packages": ast.literal_eval(kw["packages"].keywords[0].value), "requires": reqs}


SETUP = setup_py()
VERSION = SETUP["version"]


def dockerfile(name: str) -> dict:
    text = open(os.path.join(DEPLOY, name)).read()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    base = re.search(r"^FROM (\S+)$", text, re.M).group(1)
    for k, v in args.items():
        base = base.replace("${%s}" % k, v)
    copies = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY")]
    sources = [s for c in copies for s in c if not s.startswith("--")]
    return {"text": text, "args": args, "base": base, "sources": sources}


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda", "Dockerfile.beam"])
def test_dockerfiles_agree_with_setup_py(name):
    d = dockerfile(name)
    assert d["args"]["VISMEM_VERSION"] == VERSION
    assert SETUP["requires"]["torch"].specifier == SpecifierSet("==" + d["args"]["TORCH_VERSION"])
    py = re.search(r"py(?:thon)?(\d)\.?(\d+)", d["base"])
    assert SpecifierSet(SETUP["python_requires"]).contains(f"{py.group(1)}.{py.group(2)}"), d["base"]
    for src in d["sources"]:  # everything the image copies exists, and nothing setup.py needs is left out
        assert os.path.exists(os.path.join(ROOT, src)), src
    packages = {p.rstrip("*") for p in SETUP["packages"]}
    assert packages <= set(d["sources"]) and {"setup.py", "README.md", "cli"} <= set(d["sources"])
    # torch comes from PyTorch's own index, pinned, before the project (or pip pulls the CUDA build).
    assert f'"torch==${{TORCH_VERSION}}" .' in d["text"] and "download.pytorch.org/whl/" in d["text"]
    if name == "Dockerfile.beam":
        assert d["base"] == f"apache/beam_python3.11_sdk:{beam.__version__}"  # the launcher's Beam
        # setup.py pins exactly that Beam: a range let a new release on the index move a fresh
        # install's launcher away from the worker image.
        assert SETUP["requires"]["apache-beam"].specifier == SpecifierSet("==" + d["args"]["BEAM_VERSION"])
    else:
        ray_version = d["args"]["RAY_VERSION"]
        assert SETUP["requires"]["ray"].specifier == SpecifierSet("==" + ray_version)
        assert "default" in SETUP["requires"]["ray"].extras
        assert d["base"].startswith(f"rayproject/ray:{ray_version}-py311-")
        assert d["base"].endswith("-cpu") == (name == "Dockerfile")


def test_submit_ships_this_checkout_by_default():
    from deploy.submit import project_root, runtime_env

    assert project_root() == ROOT and runtime_env()["working_dir"] == ROOT


def images_of(doc) -> list:
    """``(image, requests a GPU)`` for every container in a Kubernetes document."""
    out = []

    def walk(node):
        if isinstance(node, dict):
            if "image" in node and "name" in node:
                limits = node.get("resources", {}).get("limits", {})
                out.append((node["image"], "nvidia.com/gpu" in limits))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return out


def check_image(image: str, gpu: bool):
    assert image == f"ghcr.io/vismem/vismem:{VERSION}" + ("-cuda" if gpu else ""), (image, gpu)


def test_kuberay_manifests():
    ray_version = dockerfile("Dockerfile")["args"]["RAY_VERSION"]
    docs = []
    for name in ("raycluster.yaml", "rayjob.yaml"):
        docs += list(yaml.safe_load_all(open(os.path.join(DEPLOY, "kuberay", name))))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["RayCluster", "RayJob", "RayJob"] and all(d["apiVersion"] == "ray.io/v1" for d in docs)
    entrypoints = []
    for d in docs:
        spec = d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"]
        assert spec["rayVersion"] == ray_version
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        found = images_of(spec)
        assert found and any(gpu for _, gpu in found) == any("-cuda" in i for i, _ in found)
        for image, gpu in found:
            check_image(image, gpu)
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        if d["kind"] == "RayJob":
            assert d["spec"]["shutdownAfterJobFinishes"] is True
            entrypoints.append(d["spec"]["entrypoint"])
    for cmd in entrypoints:  # valid vismem invocations, by vismem's own parser
        assert check_command(shlex.split(cmd), parse=PARSE) == shlex.split(cmd)
    assert {shlex.split(c)[1] for c in entrypoints} == {"embed", "eval"}
    with pytest.raises(ValueError, match="unrecognized arguments"):
        check_command(shlex.split(entrypoints[0]) + ["--no-such-flag"], parse=PARSE)


def test_ray_cluster_launcher_config():
    from ray.scripts.scripts import start

    cfg = yaml.safe_load(open(os.path.join(DEPLOY, "ray-cluster-gcp.yaml")))
    assert cfg["provider"]["type"] == "gcp" and cfg["head_node_type"] in cfg["available_node_types"]
    check_image(cfg["docker"]["image"], gpu=False)
    total = 0
    for name, node in cfg["available_node_types"].items():
        gpu = node["resources"].get("GPU", 0) > 0
        assert gpu == bool(node["node_config"].get("guestAccelerators"))
        check_image(node.get("docker", {}).get("worker_image", cfg["docker"]["image"]), gpu)
        total += node.get("max_workers", 0)
    assert total <= cfg["max_workers"]
    # Every `ray start` line parses with Ray's own CLI; the job API stays on the head's loopback.
    starts = [c.split(";")[-1].strip() for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2
    for line in starts:
        argv = shlex.split(line)
        assert argv[:2] == ["ray", "start"]
        ctx = start.make_context("start", argv[2:])
        if ctx.params["head"]:
            assert ctx.params["dashboard_host"] == "127.0.0.1"
        else:
            assert ctx.params["address"] == "$RAY_HEAD_IP:6379"
    with pytest.raises(Exception, match="no_such_option|No such option"):
        start.make_context("start", ["--no-such-option"])


RUNNERS = yaml.safe_load(open(os.path.join(DEPLOY, "beam-runners.yaml")))


@pytest.mark.parametrize("runner", sorted(RUNNERS["runners"]))
def test_beam_runner_settings_build_a_pipeline_without_submitting(runner, monkeypatch):
    monkeypatch.chdir(ROOT)  # --setup_file=./setup.py is relative to where vismem is run: the checkout
    spec = RUNNERS["runners"][runner]
    argv = shlex.split(RUNNERS["command"]) + spec["options"]
    check_command(argv, parse=PARSE)
    args = build_parser().parse_args(argv[1:])
    assert args.verb == "build" and args.num_shards == 64 and args.beam_args == spec["options"]
    opts = pipeline_options(args.beam_args)
    assert opts.view_as(StandardOptions).runner == spec["options"][0].split("=")[1]
    image = RUNNERS["image"]
    assert image.endswith(f"/vismem-beam:{VERSION}")
    if spec["code_on_workers"] == "container":
        if runner.startswith("dataflow"):
            assert opts.view_as(WorkerOptions).sdk_container_image == image
            assert opts.view_as(SetupOptions).sdk_location == "container"
        else:
            portable = opts.view_as(PortableOptions)
            assert portable.environment_type == "DOCKER" and portable.environment_config == image
    else:
        setup_file = opts.view_as(SetupOptions).setup_file
        assert os.path.samefile(setup_file, os.path.join(ROOT, "setup.py"))
    if runner.startswith("dataflow"):
        gcp = opts.view_as(GoogleCloudOptions)
        assert gcp.project and gcp.region and gcp.temp_location.startswith("gs://")
    name = spec["options"][0].split("=")[1]
    if runner.startswith("dataflow"):
        # Pipeline(options) would validate the options against GCS (bucket policies): that needs the
        # network and credentials. The runner itself constructs offline.
        assert type(create_runner(name)).__name__ == name
    else:
        pipeline = beam.Pipeline(options=opts)  # constructs the runner; nothing is submitted
        assert type(pipeline.runner).__name__ == name


def test_the_direct_runner_means_its_fnapi_runner_never_a_prism_download():
    for args in ([], ["--runner=DirectRunner"], ["--runner", "DirectRunner", "--direct_num_workers=2"],
                 ["--runner=direct"]):
        opts = pipeline_options(args)
        assert opts.view_as(StandardOptions).runner == "FnApiRunner", args
    assert pipeline_options(["--runner", "DirectRunner", "--direct_num_workers=2"]).get_all_options()[
        "direct_num_workers"] == 2
    # Other runners pass through untouched.
    assert pipeline_options(["--runner=FlinkRunner"]).view_as(StandardOptions).runner == "FlinkRunner"
    assert pipeline_options(["--runner=PrismRunner"]).view_as(StandardOptions).runner == "PrismRunner"
