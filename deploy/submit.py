"""Submitting ``vismem`` commands to a Ray cluster as jobs (Ray's job submission API), and managing them.

``submit(cluster, ["vismem", "eval", ...], parse=...)`` checks the command with the parser it is
given (the CLI passes its own), ships the working directory (the project source by default) and
optional pip requirements in the job's runtime environment, streams the job's logs and returns its
final state. The cluster address is the head's dashboard, e.g. ``http://127.0.0.1:8265``
(``ray start --head`` prints it).
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shlex
import sys
import time
from typing import Callable

# Parses a vismem argument list; raises SystemExit on bad input (argparse's parse_args does).
Parse = Callable[[list[str]], object]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Not shipped with the working directory: build outputs, environments, data the job does not need.
EXCLUDES = [".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache", "demo-out", "bench-out", "eval-out",
            "*.parquet", "*.npy"]


def project_root() -> str | None:
    """The source checkout this vismem runs from (the folder above deploy/ with setup.py), or None when installed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.isfile(os.path.join(root, "setup.py")) else None


def check_command(command: list[str], *, parse: Parse, any_command: bool = False) -> list[str]:
    """The command without a leading ``--``; a ``vismem`` command must parse with ``parse``.

    Args:
        parse: parses a vismem argument list (without ``vismem``), raising SystemExit on bad input
            with the reason on stderr, like argparse's ``parse_args``; the CLI passes its own.

    Raises:
        ValueError: an empty command, a command that is not ``vismem ...`` (unless ``any_command``),
            or ``vismem`` arguments the parser rejects (its message is kept).
    """
    command = list(command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise ValueError("no command given: vismem submit --cluster ADDRESS -- vismem VERB ARGS")
    if command[0] != "vismem":
        if any_command:
            return command
        raise ValueError(f"the job command must be a vismem command ('vismem VERB ...'), got {command[0]!r}; "
                         "pass --any-command to submit another program")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse(command[1:])
    except SystemExit:
        lines = err.getvalue().strip().splitlines()
        why = lines[-1] if lines else "it only asks for help"
        raise ValueError(f"invalid vismem command {shlex.join(command)!r}: {why}") from None
    return command


def runtime_env(*, working_dir: str | None = "auto", requirements: str | None = None, env_vars=None,
                extra: str | None = None) -> dict:
    """The job's runtime environment: working directory, pip requirements, environment variables.

    Args:
        working_dir: a folder to ship ("auto": the project checkout if running from one; None: none).
        requirements: a requirements.txt whose lines become the job's pip packages.
        env_vars: ``{NAME: value}`` set in the job's processes.
        extra: a JSON object (or a path to a JSON/YAML file) merged on top, Ray's runtime_env format.
    """
    env: dict = {}
    wd = project_root() if working_dir == "auto" else working_dir
    if wd:
        if not os.path.isdir(wd):
            raise ValueError(f"--working-dir {wd} is not a folder")
        env["working_dir"] = wd
        env["excludes"] = list(EXCLUDES)
    if requirements:
        if not os.path.isfile(requirements):
            raise FileNotFoundError(f"requirements file not found: {requirements}")
        with open(requirements) as f:
            env["pip"] = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if env_vars:
        env["env_vars"] = dict(env_vars)
    if extra:
        env.update(_load_mapping(extra))
    return env


def _load_mapping(text: str) -> dict:
    if os.path.isfile(text):
        with open(text) as f:
            body = f.read()
        if text.endswith((".yaml", ".yml")):
            import yaml

            value = yaml.safe_load(body)
        else:
            value = json.loads(body)
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--runtime-env must be a JSON object or a JSON/YAML file: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"--runtime-env must describe an object, got {type(value).__name__}")
    return value


def client(cluster: str | None):
    """A ``JobSubmissionClient`` for ``cluster`` (default ``$RAY_ADDRESS``)."""
    from ray.job_submission import JobSubmissionClient

    address = cluster or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no cluster: pass --cluster http://HEAD:8265 (the Ray dashboard) or set RAY_ADDRESS")
    _use_ray_token()
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as exc:
        raise ValueError(f"cannot reach the Ray job API at {address}: {str(exc).splitlines()[0]}") from exc


def _use_ray_token() -> None:
    """Send Ray's auth token when one exists (``$RAY_AUTH_TOKEN``, ``~/.ray/auth_token``), as ``ray start`` does.

    Clusters started by Ray >= 2.5x enable token authentication whenever a token exists; without
    this, every job API call answers 401. ``RAY_AUTH_MODE`` set by the user is respected.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def status(cluster: str | None, job_id: str) -> dict:
    """``{job_id, status, message, entrypoint, start/end time, exit code}`` of one job."""
    info = client(cluster).get_job_info(job_id)
    return _job_record(info)


def _job_record(info) -> dict:
    status = getattr(info.status, "value", str(info.status))
    return {"job_id": info.submission_id or info.job_id, "status": status, "message": info.message,
            "entrypoint": info.entrypoint, "start_time": info.start_time, "end_time": info.end_time,
            "driver_exit_code": getattr(info, "driver_exit_code", None)}


def list_jobs(cluster: str | None) -> list[dict]:
    return [_job_record(j) for j in sorted(client(cluster).list_jobs(), key=lambda j: j.start_time or 0)]


def logs(cluster: str | None, job_id: str, *, follow: bool = False, out=sys.stdout) -> dict:
    """Print a job's logs (all so far, or ``follow`` them until it ends); returns its status."""
    c = client(cluster)
    if follow:
        _follow(c, job_id, out)
    else:
        out.write(c.get_job_logs(job_id))
        out.flush()
    return _job_record(c.get_job_info(job_id))


def _follow(c, job_id: str, out) -> None:
    async def run():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(run())


def wait(c, job_id: str, timeout: float | None = None, poll: float = 0.5) -> str:
    """Wait until the job is in a terminal state; returns it (or the current one on timeout)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = getattr(c.get_job_status(job_id), "value", None)
        if state in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return state
        time.sleep(poll)


def stop(cluster: str | None, job_id: str, *, timeout: float = 60.0) -> dict:
    """Ask the job to stop and wait (up to ``timeout`` s) until it has; returns its status."""
    c = client(cluster)
    c.stop_job(job_id)
    wait(c, job_id, timeout)
    return _job_record(c.get_job_info(job_id))


def submit(cluster: str | None, command: list[str], *, parse: Parse, runtime: dict | None = None,
           job_id: str | None = None, follow: bool = True, any_command: bool = False, num_cpus: float | None = None,
           num_gpus: float | None = None, out=sys.stdout, agent_wait_s: float = 90.0, note=None) -> dict:
    """Submit ``command`` as a Ray job; with ``follow``, stream its logs and wait for its end.

    ``parse`` checks a ``vismem`` command before anything is sent (see ``check_command``).
    Returns the job's record (``status`` SUCCEEDED, FAILED, STOPPED; or PENDING/RUNNING without
    ``follow``).

    Raises:
        ValueError: an invalid command (checked before anything is sent) or an unreachable cluster.
    """
    command = check_command(command, parse=parse, any_command=any_command)
    c = client(cluster)
    kwargs = {}
    if num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = num_cpus
    if num_gpus is not None:
        kwargs["entrypoint_num_gpus"] = num_gpus
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            jid = c.submit_job(entrypoint=shlex.join(command), runtime_env=runtime or None, submission_id=job_id,
                               metadata={"submitted_by": "vismem submit"}, **kwargs)
            break
        except RuntimeError as exc:
            # A head that just started answers before its job agent is up; Ray says to try again.
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise ValueError(f"the cluster refused the job: {str(exc).splitlines()[-1]}") from exc
    (note or (lambda m: print(m, file=sys.stderr)))(f"vismem submit: job {jid} submitted to {c.get_address()}")
    if follow:
        _follow(c, jid, out)
        wait(c, jid)
    return _job_record(c.get_job_info(jid))


def exit_code(record: dict) -> int:
    """0 for a job that succeeded or is still running; 1 failed; 3 stopped."""
    return {"FAILED": 1, "STOPPED": 3}.get(record["status"], 0)
