"""``vismem serve``, ``submit`` and ``jobs``: serving a memory over HTTP, running verbs as Ray jobs."""
from __future__ import annotations

import argparse
import math
import sys

from cli import terminal
from cli.common import print_json

SERVE_EPILOG = """\
examples:
  vismem serve /data/fmnist-memory --port 8000
  curl -s localhost:8000/v1/info
  curl -s localhost:8000/v1/classify -H 'content-type: application/json' \\
       -d '{"embeddings": [[0.1, 0.2, ...]], "k": 50, "method": "rank"}'

  # admin endpoints (add items, remove items = unlearning) need a bearer token:
  export VISMEM_ADMIN_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
  vismem serve gs://bucket/fmnist --encoder efficientnet-lite0 --image-size 96
  curl -s localhost:8000/v1/admin/remove -H "Authorization: Bearer $VISMEM_ADMIN_TOKEN" \\
       -H 'content-type: application/json' -d '{"ids": ["fmnist/train/123"], "reason": "GDPR 42"}'

OpenAPI schema: /openapi.json (interactive docs: /docs); it carries this memory's dimension and the
server's limits, and every error answer is {"error": "..."}. Python client: deploy.client.VismemClient.
A newer published version (vismem add/remove/compact anywhere) is picked up within --poll-s seconds
without dropping requests; an admin change is served before its 200 answer.

--version N pins the server to version N: it serves N and nothing else until it stops, and its admin
endpoints answer 409 (a pin is a promise of a fixed version; nothing it acknowledged could be left
unserved). Items removed elsewhere (vismem remove) are still served by a pinned server: pin for
reproducible evaluation, not where unlearning must take effect.
Every server holds a reader lease on the version it serves, renewed every --lease-s/3 seconds, so
'vismem gc' never deletes its files. With --encoder, the encoder is loaded at start and must match
the memory's (name, version, image size, preprocessing); a mismatch is refused, both sides named.
"""

SUBMIT_EPILOG = """\
examples:
  ray start --head --dashboard-host 127.0.0.1          # or a KubeRay / cluster-launcher cluster
  vismem submit --cluster http://127.0.0.1:8265 -- vismem eval gs://b/mem gs://b/test.parquet --out gs://b/eval
  vismem submit --cluster http://HEAD:8265 --requirements requirements.txt --num-cpus 1 \\
      -- vismem embed fashion-mnist gs://b/emb --ray-address auto --image-size 96
  vismem submit --no-wait -- vismem build 'gs://b/emb/embeddings/*.parquet' gs://b/mem --num-shards 8 \\
      --class-names gs://b/classes.txt       # prints the job id; then: vismem jobs logs JOB --follow

The project folder is shipped as the job's working directory (unless --working-dir none), so the job
runs this checkout's code on a cluster whose image has the dependencies (deploy/Dockerfile).
Exit status: 0 succeeded, 1 failed, 3 stopped, 2 bad command (checked with vismem's own parser
before anything is sent).
"""

CLUSTER_HELP = "Ray dashboard address, e.g. http://127.0.0.1:8265 (default $RAY_ADDRESS)"


def _check_serve_args(a) -> None:
    """One-line errors (exit 2) for flags out of range, before anything is loaded."""
    if not 1 <= a.port <= 65535:
        raise ValueError(f"--port must be between 1 and 65535, got {a.port}")
    for flag in ("max_batch", "max_k", "max_body_mb", "version", "image_size"):
        value = getattr(a, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    for flag in ("poll_s", "lease_s"):
        value = getattr(a, flag)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {value}")


def _run_serve(a) -> None:
    from deploy.serving import Limits, serve

    _check_serve_args(a)
    limits = Limits(max_body_bytes=a.max_body_mb * 1024 * 1024, max_batch=a.max_batch, max_k=a.max_k)
    serve(a.memory, host=a.host, port=a.port, allow_remote=a.allow_remote, admin_token_file=a.admin_token_file,
          version=a.version, encoder=a.encoder, image_size=a.image_size, poll_s=a.poll_s, limits=limits,
          log_level=a.log_level, lease_s=a.lease_s)


def _finish(record: dict) -> dict:
    """Print the job's record; exit non-zero when it failed or was stopped."""
    from deploy.submit import exit_code

    code = exit_code(record)
    if code:
        print_json(record)
        sys.stdout.flush()
        raise SystemExit(code)
    return record


def _env_pairs(pairs) -> dict:
    out = {}
    for p in pairs or []:
        name, sep, value = p.partition("=")
        if not sep or not name:
            raise ValueError(f"--env takes NAME=VALUE, got {p!r}")
        out[name] = value
    return out


def _run_submit(a) -> dict:
    from deploy import submit

    wd = None if a.working_dir == "none" else a.working_dir
    runtime = submit.runtime_env(working_dir=wd, requirements=a.requirements, env_vars=_env_pairs(a.env),
                                 extra=a.runtime_env)
    return _finish(submit.submit(a.cluster, a.command, parse=a.parse_vismem, runtime=runtime,
                                 job_id=a.job_id, follow=not a.no_wait, any_command=a.any_command,
                                 num_cpus=a.num_cpus, num_gpus=a.num_gpus, note=terminal.current().note))


def _run_jobs(a):
    from deploy import submit

    if a.action == "list":
        return submit.list_jobs(a.cluster)
    if not a.job_id:
        raise ValueError(f"vismem jobs {a.action} needs a JOB_ID (see 'vismem jobs list')")
    if a.action == "status":
        return _finish(submit.status(a.cluster, a.job_id))
    if a.action == "logs":
        record = submit.logs(a.cluster, a.job_id, follow=a.follow)
        return None if record["status"] == "SUCCEEDED" else _finish(record)
    if a.action == "stop":
        record = submit.stop(a.cluster, a.job_id, timeout=a.timeout)
        if record["status"] not in ("STOPPED", "SUCCEEDED", "FAILED"):
            raise ValueError(f"job {a.job_id} did not stop within {a.timeout} s (status {record['status']})")
        return record
    raise ValueError(f"unknown jobs action {a.action!r}; choose list, status, logs or stop")


def add_serve(sub) -> None:
    s = sub.add_parser(
        "serve", help="serve a memory over HTTP (classify, neighbours, admin add/remove)",
        description="Serve MEMORY (local folder or gs:// URL) with FastAPI + uvicorn: POST /v1/classify, "
        "POST /v1/neighbors, GET /v1/health, GET /v1/info; admin POST /v1/admin/items (add) and "
        "/v1/admin/remove (unlearning) with a bearer token from $VISMEM_ADMIN_TOKEN or --admin-token-file "
        "(disabled without one). Listens on 127.0.0.1 only unless --host and --allow-remote say otherwise.",
        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("memory", help="memory directory or gs:// URL")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--allow-remote", action="store_true", help="allow a --host reachable from other machines")
    s.add_argument("--version", type=int, default=None,
                   help="pin this version: serve it only, refuse admin changes with 409 (default: the latest, "
                   "followed)")
    s.add_argument("--poll-s", type=float, default=2.0, help="seconds between checks for a newer version (0: never)")
    s.add_argument("--encoder", default=None,
                   help="accept images too, embedded with this encoder (e.g. efficientnet-lite0)")
    s.add_argument("--image-size", type=int, default=None,
                   help="encoder input size (default: the memory's, else the encoder's); must match the memory's")
    s.add_argument("--admin-token-file", default=None, help="file holding the admin bearer token")
    s.add_argument("--max-batch", type=int, default=256, help="queries per request (default 256)")
    s.add_argument("--max-k", type=int, default=1000, help="largest k a request may ask (default 1000)")
    s.add_argument("--max-body-mb", type=int, default=16, help="largest request body in MiB (default 16)")
    s.add_argument("--lease-s", type=float, default=600.0,
                   help="hold a reader lease on the served version, renewed every LEASE_S/3 seconds, so "
                   "'vismem gc' keeps it (default 600; 0: none, for read-only storage)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    # A server's logs (uvicorn's start, each request) are what its user watches: on the terminal unless -q.
    s.set_defaults(func=_run_serve, default_verbosity=terminal.VERBOSE)


def add_submit(sub) -> None:
    j = sub.add_parser(
        "submit", help="run a vismem command as a job on a Ray cluster",
        description="Submit 'vismem VERB ARGS' (after --) to a Ray cluster through Ray's job submission API, "
        "with this project as the working directory and optional pip requirements, stream its logs and "
        "exit with its outcome.",
        epilog=SUBMIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    j.add_argument("--cluster", default=None, help=CLUSTER_HELP)
    j.add_argument("--working-dir", default="auto",
                   help="folder shipped as the job's working directory (default: this checkout; 'none': nothing)")
    j.add_argument("--requirements", default=None, help="requirements.txt installed for the job (pip)")
    j.add_argument("--runtime-env", default=None, help="more runtime_env: a JSON object or a JSON/YAML file")
    j.add_argument("--env", action="append", metavar="NAME=VALUE", help="environment variable of the job")
    j.add_argument("--job-id", default=None, help="submission id (default: Ray chooses)")
    j.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved for the job's driver")
    j.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved for the job's driver")
    j.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    j.add_argument("--any-command", action="store_true", help="allow a command other than 'vismem ...'")
    j.add_argument("command", nargs=argparse.REMAINDER, help="-- vismem VERB ARGS")
    j.set_defaults(func=_run_submit)


def add_jobs(sub) -> None:
    m = sub.add_parser(
        "jobs", help="list, inspect, follow or stop Ray jobs",
        description="Manage jobs on a Ray cluster: list; status JOB; logs JOB [--follow]; stop JOB.",
        epilog="examples:\n  vismem jobs list --cluster http://127.0.0.1:8265\n"
        "  vismem jobs logs raysubmit_XYZ --follow\n  vismem jobs stop raysubmit_XYZ\n"
        "Exit status of status/logs: 0 succeeded or running, 1 failed, 3 stopped.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("action", choices=("list", "status", "logs", "stop"))
    m.add_argument("job_id", nargs="?", default=None, help="the job (submission id)")
    m.add_argument("--cluster", default=None, help=CLUSTER_HELP)
    m.add_argument("--follow", action="store_true", help="logs: follow until the job ends")
    m.add_argument("--timeout", type=float, default=60.0, help="stop: seconds to wait for the job to end")
    m.set_defaults(func=_run_jobs)
