"""Fault campaign: SIGKILL ``vismem build|add|remove|compact|gc`` at random moments, then check the memory.

For each verb and each place (a local folder, ``gs://`` on the GCS emulator) the campaign first runs
the command once uninterrupted on a fresh copy of its starting memory (its duration is measured, and
the result must pass the invariants), then, for each of ``--kills`` trials: a fresh copy, the same
command started and SIGKILLed (with every process it started) after a time drawn uniformly from
[0, measured duration) with a seeded generator, the invariants checked, the same command run again
to completion, and the invariants checked again.

The invariants (benchmarks/fault_kit.py): every listed version opens with its checksums verified;
the latest version's search equals a brute-force oracle over its logical items (items of its shards
minus its tombstones); no removed id is returned (the removed items' own vectors are among the
queries); the memory holds exactly the items before the command or exactly those after it, never a
part; the re-run completes and leaves the "after" state. A re-run refused because the killed run had
already published (build: "a memory already exists"; add: "no valid rows to publish", every row an
id the memory holds) counts as complete and is tallied apart as reruns_refused_done.

Starting memories (built once per campaign, uninterrupted, on 600 seeded 16-d items in 4 classes):
build starts from nothing; add from version 1; remove (60 ids) from version 2 (after add);
compact from version 3 (after remove); gc (--keep 1) from version 4 (after compact).

Commands run forked from a warm process by default (see fault_kit.ForkServer) so that kills land in
the work rather than in Python's imports; --spawn runs each as a fresh ``python -m cli`` process.
Beam runs in one process (DirectRunner in_memory) unless --beam-args says otherwise.

Examples::

    .venv/bin/python benchmarks/faults.py --kills 20 --where both          # the full campaign (~1 h)
    .venv/bin/python benchmarks/faults.py --kills 2 --verbs remove,gc --where local
    .venv/bin/python benchmarks/faults.py --kills 20 --spawn --beam-args "--direct_num_workers 2"

Prints one JSON summary (kills, how many interrupted a running command, the states they left,
invariant checks, failures with their command) and writes it to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fault_kit as kit  # noqa: E402 - a sibling module, not a package

VERBS = ("build", "add", "remove", "compact", "gc")
IN_PROCESS_BEAM = ["--direct_num_workers", "1", "--direct_running_mode", "in_memory"]
# A re-run refused because the killed run had finished the work (the "after" state) counts as complete,
# and is tallied apart (reruns_refused_done): build finds its memory there, add finds all its ids there.
ALREADY_DONE = {"build": "a memory already exists", "add": "no valid rows to publish"}


@dataclasses.dataclass(frozen=True)
class Verb:
    """One command of the campaign: where it starts, its argv, and the states it may leave."""

    name: str
    base: str | None  # the starting memory (a key of the campaign's bases); None: nothing there yet
    argv: Callable[[str], list]
    allowed: dict  # state name -> logical ids (None: no version published)
    after: str  # the state a completed run leaves


def verbs(data: dict, beam: list) -> dict:
    base, new, forget = data["base_ids"], data["new_ids"], data["forget_ids"]
    grown, shrunk = base | new, (base | new) - forget
    return {v.name: v for v in (
        Verb("build", None, lambda m: ["build", data["items"], m, "--num-shards", "2", "--class-names",
                                       data["class_names"], *beam], {"before": None, "after": base}, "after"),
        Verb("add", "v1", lambda m: ["add", m, data["new"], *beam], {"before": base, "after": grown}, "after"),
        Verb("remove", "v2", lambda m: ["remove", m, "--ids", data["forget"], "--reason", "fault campaign"],
             {"before": grown, "after": shrunk}, "after"),
        Verb("compact", "v3", lambda m: ["compact", m, *beam], {"same": shrunk}, "same"),
        Verb("gc", "v4", lambda m: ["gc", m, "--keep", "1"], {"same": shrunk}, "same"),
    )}


def build_bases(server: kit.ForkServer, work: str, data: dict, table: dict) -> tuple[dict, dict]:
    """Versions 1 to 4 of one local memory, each checked and saved as a folder to start trials from;
    ``(bases, seconds each step took)`` (the uninterrupted durations of build, add, remove, compact)."""
    mem = os.path.join(work, "base-memory")
    bases, seconds = {}, {}
    for key, verb in (("v1", "build"), ("v2", "add"), ("v3", "remove"), ("v4", "compact")):
        log = os.path.join(work, f"base-{key}.log")
        rc, seconds[verb] = server.run(table[verb].argv(mem), log)
        if rc != 0:
            raise RuntimeError(f"building the starting memory failed at {verb}: {kit.tail(log)}")
        kit.check_memory(mem, {"after": table[verb].allowed[table[verb].after]}, data)
        bases[key] = os.path.join(work, f"base-{key}")
        kit.copy_tree(mem, bases[key])
    return bases, seconds


class Campaign:
    """Runs trials and keeps the tally."""

    def __init__(self, server: kit.ForkServer, work: str, data: dict, table: dict, bases: dict, keep_failed: bool):
        self.server, self.work, self.data, self.table, self.bases = server, work, data, table, bases
        self.keep_failed = keep_failed
        self.results: dict = {}
        self.failures: list = []
        self.n = 0

    def _fresh(self, verb: Verb, where: str) -> str:
        target = kit.fresh_path(where, self.work, verb.name)
        if verb.base:
            kit.copy_tree(self.bases[verb.base], target)
        return target

    def _log(self) -> str:
        self.n += 1
        return os.path.join(self.work, f"run-{self.n:04d}.log")

    def measure(self, verb: Verb, label: str, where: str) -> float:
        """One uninterrupted run (which must pass the invariants); its duration in seconds."""
        target = self._fresh(verb, where)
        log = self._log()
        rc, seconds = self.server.run(verb.argv(target), log)
        tally = self._tally(verb, label)
        tally["measured_s"] = round(seconds, 2)
        try:
            assert rc == 0, f"exit {rc}: {kit.tail(log)}"
            tally["checks"] += kit.check_memory(target, {verb.after: verb.allowed[verb.after]}, self.data)[1]
        except Exception as exc:  # noqa: BLE001 - every failure is reported with its command
            self._fail(verb, label, target, None, "uninterrupted run", exc)
            return 0.0
        kit.remove_tree(target)
        return seconds

    def _tally(self, verb: Verb, label: str) -> dict:
        return self.results.setdefault(f"{verb.name}@{label}", {"kills": 0, "interrupted": 0, "states": {},
                                                                "reruns_refused_done": 0, "checks": 0,
                                                                "failures": 0})

    def trial(self, verb: Verb, label: str, where: str, after_s: float) -> None:
        """Kill the command after ``after_s``; check; run it again; check again."""
        tally = self._tally(verb, label)
        target = self._fresh(verb, where)
        pid = self.server.start(verb.argv(target), self._log())
        time.sleep(after_s)
        tally["interrupted"] += self.server.kill(pid)
        tally["kills"] += 1
        phase = "after the kill"
        try:
            state, checks = kit.check_memory(target, verb.allowed, self.data)
            tally["states"][state] = tally["states"].get(state, 0) + 1
            tally["checks"] += checks
            phase = "re-run"
            log = self._log()
            rc, _ = self.server.run(verb.argv(target), log)
            if rc != 0:
                done = ALREADY_DONE.get(verb.name)
                assert state == "after" and done and done in kit.tail(log), f"the re-run exited {rc}: {kit.tail(log)}"
                tally["reruns_refused_done"] += 1
            phase = "after the re-run"
            tally["checks"] += kit.check_memory(target, {verb.after: verb.allowed[verb.after]}, self.data)[1]
        except Exception as exc:  # noqa: BLE001 - every failure is reported with its command
            self._fail(verb, label, target, after_s, phase, exc)
            return
        kit.remove_tree(target)

    def _fail(self, verb: Verb, label: str, target: str, after_s, phase: str, exc: Exception) -> None:
        self._tally(verb, label)["failures"] += 1
        self.failures.append({
            "verb": verb.name, "where": label, "phase": phase, "kill_after_s": after_s,
            "command": "vismem " + shlex.join(verb.argv(target)),
            "error": f"{type(exc).__name__}: {str(exc).strip()[:800]}", "kept": target if self.keep_failed else None})
        if not self.keep_failed:
            kit.remove_tree(target)


def run_campaign(wheres: dict, verb_names: list, kills: int, seed: int, *, spawn: bool = False,
                 beam: list | None = None, work: str | None = None, keep_failed: bool = False,
                 measure_each_place: bool = True, verbs_at: dict | None = None) -> dict:
    """The whole campaign; ``wheres`` maps a label (``local``, ``gs``) to a place (``local`` or a bucket URL).

    ``verbs_at`` (label -> verb names) narrows the verbs tried at a place (default: ``verb_names`` everywhere).

    ``measure_each_place=False`` draws kill times from the local durations of building the starting
    memories instead of one more uninterrupted run per verb and place (quicker; gc is measured anyway).
    """
    work = work or tempfile.mkdtemp(prefix="vismem-faults-")
    server = kit.ForkServer(spawn=spawn)
    t0 = time.perf_counter()
    try:
        data = kit.make_inputs(work, seed)
        table = verbs(data, IN_PROCESS_BEAM if beam is None else beam)
        bases, durations = build_bases(server, work, data, table)
        camp = Campaign(server, work, data, table, bases, keep_failed)
        rng = np.random.default_rng(seed)
        for label, where in wheres.items():
            for name in (verbs_at or {}).get(label, verb_names):
                verb = table[name]
                quick = not measure_each_place and name in durations
                seconds = durations[name] if quick else camp.measure(verb, label, where)
                for after_s in rng.uniform(0.0, seconds, kills if seconds else 0):
                    camp.trial(verb, label, where, float(after_s))
    finally:
        server.close()
    totals = {k: sum(r[k] for r in camp.results.values()) for k in ("kills", "interrupted", "checks", "failures")}
    return {"seed": seed, "kills_per_verb": kills, "spawn": spawn, "work": work, "totals": totals,
            "wall_s": round(time.perf_counter() - t0, 1), "by_verb": camp.results, "failures": camp.failures}


def start_emulator() -> tuple[subprocess.Popen, str]:
    """A gcp-storage-emulator on loopback (as tests/conftest.py starts it); ``(process, gs://bucket)``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    proc = subprocess.Popen([exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
                             "--default-bucket", "vismem-faults", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("gcp-storage-emulator did not start")
            time.sleep(0.2)
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    return proc, "gs://vismem-faults"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="kills per verb and place (default 20)")
    p.add_argument("--where", choices=("local", "gs", "both"), default="both",
                   help="a local folder, gs:// on a GCS emulator started here, or both (default)")
    p.add_argument("--verbs", default=",".join(VERBS), help=f"comma-separated, of {','.join(VERBS)} (default all)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data and the kill times")
    p.add_argument("--spawn", action="store_true", help="a fresh python process per command (slower: most kills "
                   "then land in imports) instead of forks of a warm one")
    p.add_argument("--beam-args", default=None, help="Beam options for build/add/compact, e.g. "
                   "'--direct_num_workers 2 --direct_running_mode multi_processing' (default: one process)")
    p.add_argument("--work", help="working folder (default: a new temporary one)")
    p.add_argument("--keep-failed", action="store_true", help="keep the memory of each failed trial")
    p.add_argument("--out", default="bench-out/faults.json", help="where the JSON summary goes")
    a = p.parse_args(argv)
    names = [v.strip() for v in a.verbs.split(",") if v.strip()]
    if bad := [v for v in names if v not in VERBS]:
        p.error(f"unknown verb(s) {', '.join(bad)}; choose from {', '.join(VERBS)}")
    if a.kills < 1:
        p.error(f"--kills must be >= 1, got {a.kills}")
    emulator = None
    wheres = {"local": "local"} if a.where in ("local", "both") else {}
    try:
        if a.where in ("gs", "both"):
            emulator, bucket = start_emulator()
            wheres["gs"] = bucket
        result = run_campaign(wheres, names, a.kills, a.seed, spawn=a.spawn,
                              beam=shlex.split(a.beam_args) if a.beam_args is not None else None, work=a.work,
                              keep_failed=a.keep_failed)
    finally:
        if emulator is not None:
            emulator.kill()
            emulator.wait()
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return 1 if result["totals"]["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
