"""The fault campaign, short: each of build, add, remove, compact and gc SIGKILLed at a seeded random moment,
on local disk and on gs:// (the emulator), then the invariants checked, the command re-run, and checked again.

The long campaign (>= 20 kills per verb and place) is ``benchmarks/faults.py``; this runs the same code.
"""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import fault_kit as kit  # noqa: E402
import faults  # noqa: E402


def test_one_kill_per_verb_and_place_leaves_a_memory_that_verifies_and_a_rerun_that_completes(tmp_path, gcs_path):
    # Every verb on gs:// (where publishing is a conditional upload); on local disk the two writers
    # that rebase or carry removals (build, remove and gc are killed locally in other tests too).
    local = ["add", "compact"]
    result = faults.run_campaign({"local": "local", "gs": gcs_path}, list(faults.VERBS), kills=1, seed=11,
                                 work=str(tmp_path), measure_each_place=False, verbs_at={"local": local})
    assert result["failures"] == [], result["failures"]
    totals = result["totals"]
    assert totals["kills"] == 7 and totals["failures"] == 0
    assert totals["interrupted"] >= 1  # kills caught commands running (typically most), not only after
    assert totals["checks"] >= 70
    assert set(result["by_verb"]) == {f"{v}@gs" for v in faults.VERBS} | {f"{v}@local" for v in local}


def test_the_invariants_catch_a_memory_that_returns_a_removed_item(tmp_path):
    """The checker is not vacuous: a remove whose tombstones are dropped (the removed items come back) fails."""
    from memory import manifest as mf

    server = kit.ForkServer()
    try:
        data = kit.make_inputs(str(tmp_path), seed=3)
        table = faults.verbs(data, faults.IN_PROCESS_BEAM)
        mem = str(tmp_path / "m")
        for verb in ("build", "remove"):
            rc, _ = server.run(table[verb].argv(mem), str(tmp_path / f"{verb}.log"))
            assert rc == 0, kit.tail(str(tmp_path / f"{verb}.log"))
    finally:
        server.close()
    after_remove = data["base_ids"] - data["forget_ids"]
    assert kit.check_memory(mem, {"after": after_remove}, data)[0] == "after"
    latest = mf.read_manifest(mem)
    os.remove(mf.manifest_path(mem, latest.version))  # back to the version before the removal...
    forged = mf.read_manifest(mem).to_json()
    forged.update(version=latest.version, forget=latest.forget.to_json(),  # ...claiming the removal happened
                  format_version=latest.format_version)
    with open(mf.manifest_path(mem, latest.version), "w") as f:
        json.dump(forged, f)
    with pytest.raises(AssertionError, match="removed ids returned|none of the allowed states"):
        kit.check_memory(mem, {"before": data["base_ids"], "after": after_remove}, data)
