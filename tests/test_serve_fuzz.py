"""The HTTP API fuzzed from its own OpenAPI schema with schemathesis, with and without the admin token.

Every check schemathesis has runs (``all``: no server error, status codes, content types, headers and
bodies as documented, schema-valid requests accepted, schema-invalid ones refused, auth not ignored,
...) on every operation, against the real app in this process (ASGI) over a real memory on disk.
Generation is derandomized with a fixed seed and a fixed number of examples per operation, so a
run is the same every time.
"""
import collections
import json

import pytest
import schemathesis
from schemathesis import engine
from schemathesis.config import HealthCheck, SchemathesisConfig
from schemathesis.engine import StopReason, events

from conftest import clustered
from deploy.serving import Limits, create_app
from memory import manifest as mf
from memory import write_memory

TOKEN = "fuzz-token-0123456789abcdef"
DIM = 8
ADMIN = ("POST /v1/admin/items", "POST /v1/admin/remove")
# Small limits keep generated batches small (and so the run short); the schema carries them.
LIMITS = Limits(max_batch=8, max_k=50, max_add_items=8, max_remove_ids=8)


def fuzz(app, headers: dict | None, examples: int = 4, seed: int = 20240611) -> dict:
    """Run schemathesis's phases (examples, coverage, fuzzing) against ``app``; what every response was."""
    config = SchemathesisConfig()
    config.update(seed=seed, max_failures=None, suppress_health_check=[HealthCheck.all])
    project = config.projects.override
    project.update(headers=headers, workers=1)
    project.checks.update(included_check_names=["all"])
    project.generation.update(max_examples=examples, deterministic=True, database="none")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    out = {"cases": 0, "statuses": collections.Counter(), "not_json": [], "failures": [], "errors": []}
    for event in engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            _record(event.recorder, out)
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            out["errors"].append(repr(event))
        elif isinstance(event, events.EngineFinished):
            out["stop"] = event.stop_reason
            out["failures"] += [repr(f) for f in event.failures]
    return out


def _record(recorder, out: dict) -> None:
    out["cases"] += len(recorder.cases)
    for case_id, interaction in recorder.interactions.items():
        response = interaction.response
        if response is None:
            continue
        out["statuses"][(recorder.label, response.status_code)] += 1
        if response.status_code >= 400:
            try:
                body = json.loads(response.content)
            except ValueError:
                body = None
            kind = response.headers.get("content-type", [""])[0]
            if not (isinstance(body, dict) and isinstance(body.get("error"), str)) or kind != "application/json":
                out["not_json"].append((recorder.label, response.status_code, response.content[:200]))
    for case_id, checks in recorder.checks.items():
        for check in checks:
            if check.failure_info is not None:
                response = recorder.interactions.get(case_id)
                out["failures"].append((recorder.label, check.name, check.failure_info.failure.title,
                                        str(recorder.cases[case_id].value.body)[:300],
                                        response.response.content[:300] if response and response.response else None))


@pytest.fixture
def memory(tmp_path):
    x, labels = clustered(120, DIM, 3, seed=12, noise=0.2)
    root = str(tmp_path / "mem")
    write_memory(root, x, labels, [f"item-{i:03d}" for i in range(120)], num_shards=2, class_names=["a", "b", "c"])
    return root


def _clean(out: dict) -> None:
    assert out["stop"] == StopReason.COMPLETED and out["errors"] == [], out
    assert out["failures"] == [], "\n".join(map(str, out["failures"]))
    assert not [k for k in out["statuses"] if k[1] >= 500], out["statuses"]
    assert out["not_json"] == [], out["not_json"][:5]
    assert out["cases"] >= 200, out["cases"]  # every operation was really exercised
    for op in ("POST /v1/classify", "POST /v1/neighbors"):
        assert out["statuses"][(op, 200)] > 0 and out["statuses"][(op, 422)] > 0, (op, out["statuses"])


def test_fuzz_without_the_token_changes_nothing(memory):
    before = {v: mf.read_manifest(memory, v).to_json() for v in mf.list_versions(memory)}
    out = fuzz(create_app(memory, admin_token=TOKEN, poll_s=0, limits=LIMITS), headers=None)
    _clean(out)
    for op in ADMIN:
        assert out["statuses"][(op, 401)] > 0 and not [k for k in out["statuses"] if k[0] == op and k[1] < 300]
    assert {v: mf.read_manifest(memory, v).to_json() for v in mf.list_versions(memory)} == before


def test_fuzz_with_the_token_finds_no_contract_failure(memory):
    out = fuzz(create_app(memory, admin_token=TOKEN, poll_s=0, limits=LIMITS),
               headers={"Authorization": f"Bearer {TOKEN}"})
    _clean(out)
    for op in ADMIN:  # the admin endpoints were reached past the token and answered
        assert sum(n for (o, s), n in out["statuses"].items() if o == op and s not in (401, 405)) > 0, op
