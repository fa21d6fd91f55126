"""``vismem submit`` / ``vismem jobs`` against a real Ray head this module starts on loopback."""
import json
import os
import subprocess
import time

import pytest

from cli.main import build_parser
from conftest import clustered
from deploy import submit
from memory import schema, write_memory
from ray_head import BIN, job_env, ray_head

VISMEM = os.path.join(BIN, "vismem")
PARSE = build_parser().parse_args  # what the CLI hands to submit


@pytest.fixture(scope="module")
def head():
    with ray_head() as url:
        yield url


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("jobs")
    x, labels = clustered(260, 12, 3, seed=31, noise=0.15)
    write_memory(str(d / "mem"), x[:200], labels[:200], [f"m{i}" for i in range(200)], num_shards=2,
                 class_names=["a", "b", "c"])
    schema.write_embeddings(str(d / "q.parquet"),
                            schema.embedding_table([f"q{i}" for i in range(60)], x[200:], labels[200:]))
    return d


def vismem(*args, timeout=240):
    return subprocess.run([VISMEM, *args], capture_output=True, text=True, timeout=timeout, env=job_env())


def last_json(stdout: str) -> dict:
    """The JSON record vismem prints last (after the job's streamed logs)."""
    start = stdout.rstrip().rfind("\n{")
    return json.loads(stdout[start + 1 if start >= 0 else 0:])


def test_info_job_runs_to_completion_with_the_checkout_shipped(head, tiny):
    res = vismem("submit", "--cluster", head, "--", "vismem", "info", str(tiny / "mem"))
    assert res.returncode == 0, res.stderr + res.stdout
    record = last_json(res.stdout)
    assert record["status"] == "SUCCEEDED" and record["entrypoint"] == f"vismem info {tiny / 'mem'}"
    assert '"count": 200' in res.stdout  # the job's own output, streamed back


def test_eval_job_runs_to_completion(head, tiny, tmp_path):
    out = tmp_path / "eval-out"
    logs = tmp_path / "logs.txt"
    with open(logs, "w") as f:
        rec = submit.submit(head, ["vismem", "eval", str(tiny / "mem"), str(tiny / "q.parquet"), "--out", str(out),
                                   "--k-max", "10"], parse=PARSE, runtime=submit.runtime_env(working_dir=None), out=f)
    assert rec["status"] == "SUCCEEDED", logs.read_text()[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and (out / "report.md").exists()
    assert submit.exit_code(rec) == 0


def test_failing_job_reports_failure_with_nonzero_exit(head, tiny):
    res = vismem("submit", "--cluster", head, "--working-dir", "none", "--", "vismem", "info",
                 str(tiny / "no-such-memory"))
    assert res.returncode == 1
    record = last_json(res.stdout)
    assert record["status"] == "FAILED" and "no memory at" in res.stdout
    assert submit.status(head, record["job_id"])["status"] == "FAILED"


def test_stopped_job_stops(head, tmp_path):
    rec = submit.submit(head, ["python", "-c", "import time; print('started', flush=True); time.sleep(600)"],
                        parse=PARSE, runtime=submit.runtime_env(working_dir=None), follow=False,
                        any_command=True)
    job = rec["job_id"]
    c = submit.client(head)
    deadline = time.time() + 60
    while c.get_job_status(job).value != "RUNNING":
        assert time.time() < deadline, "the job never started"
        time.sleep(0.3)
    t0 = time.time()
    res = vismem("jobs", "stop", job, "--cluster", head)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"] == "STOPPED" and time.time() - t0 < 60
    record = submit.status(head, job)
    assert record["status"] == "STOPPED" and submit.exit_code(record) == 3
    assert any(j["job_id"] == job and j["status"] == "STOPPED" for j in submit.list_jobs(head))


def test_bad_commands_are_refused_before_anything_is_sent(head):
    before = len(submit.list_jobs(head))
    res = vismem("submit", "--cluster", head, "--", "vismem", "eval", "only-one-arg")
    assert res.returncode == 2 and "the following arguments are required" in res.stderr
    with pytest.raises(ValueError, match="--any-command"):
        submit.submit(head, ["rm", "-rf", "/"], parse=PARSE)
    with pytest.raises(ValueError, match="unrecognized arguments: --bogus"):
        submit.submit(head, ["--", "vismem", "info", "m", "--bogus"], parse=PARSE)
    assert len(submit.list_jobs(head)) == before
    with pytest.raises(ValueError, match="cannot reach the Ray job API at http://127.0.0.1:1"):
        submit.list_jobs("http://127.0.0.1:1")
