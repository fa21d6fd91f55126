"""``vismem plan``: size a memory (shards, machines, bytes, build and embedding time) from measured rates."""
from __future__ import annotations

import os
import sys

from cli import terminal

EXAMPLE = ("example: vismem plan --items 1e9 --dim 768 --storage int8 --recall 0.95 --qps 1000 "
           "--machine cores=16,ram=64GB --gpus 8 --encoder-rate 2000")


def _calibrate(a) -> dict:
    import shutil
    import tempfile

    from deploy.calibrate import calibrate
    from deploy.plan import parse_count

    sizes = [parse_count(s, "--sizes") for s in a.sizes.split(",") if s.strip()]
    if len(sizes) < 2:
        raise ValueError(f"--sizes needs at least two sizes to fit, got {a.sizes!r}")
    shard = parse_count(a.shard_items, "--shard-items") if a.shard_items else min(sizes)
    out = a.calibration or "calibration.json"
    dim = parse_count(a.dim or "128", "--dim")
    work = a.work_dir or tempfile.mkdtemp(prefix="vismem-calibrate-")
    try:
        cal = calibrate(out, work, sizes=sizes, shard_items=shard, dim=dim, queries=a.queries,
                        mode_items=parse_count(a.mode_items, "--mode-items"), mode_dims=(dim, 4 * dim),
                        modes=tuple(m.strip() for m in a.modes.split(",") if m.strip()),
                        command=" ".join(["vismem", "plan", *sys.argv[2:]]),
                        log=terminal.current().note)  # a line per ladder step; the engines' logs to the log file
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return {"calibration": os.path.abspath(out), "points": len(cal["ladder"]), "storage_modes": sorted(cal["storage"]),
            "recall_targets": sorted(cal["query"], key=float)}


def _plan(a):
    from deploy.plan import Request, format_table, make_plan, parse_count, parse_machine
    from deploy.rates import default_calibration_path, load_calibration

    missing = [o for o, v in (("--items", a.items), ("--dim", a.dim), ("--machine", a.machine)) if v is None]
    if missing:
        raise ValueError(f"plan needs {', '.join(missing)} (or --calibrate to measure this machine)")
    cal = load_calibration(a.calibration or default_calibration_path())
    req = Request(items=parse_count(a.items), dim=parse_count(a.dim, "--dim"), storage=a.storage, recall=a.recall,
                  qps=a.qps, machine=parse_machine(a.machine), build_workers=a.build_workers, gpus=a.gpus,
                  encoder_rate=a.encoder_rate,
                  shard_items=parse_count(a.shard_items, "--shard-items") if a.shard_items else None)
    plan = make_plan(req, cal)
    if a.json:
        return {"calibration": cal.path, **plan.to_json()}
    print(format_table(plan, cal))
    return None


def _run(a):
    return _calibrate(a) if a.calibrate else _plan(a)


def add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="size a memory: shards, machines, RAM, bytes, build and embedding hours, q/s, from measured rates",
        description="Print a sizing plan for a memory. Every figure comes from a calibration file of measured "
        "rates (default: the one shipped, measured on the project's machine); each row names the rate it came "
        "from and says when it is extrapolated. --calibrate measures this machine instead (a few minutes).",
        epilog=EXAMPLE + "\n       vismem plan --calibrate --calibration my-machine.json",
    )
    p.add_argument("--items", help="items in the memory: 1e9, 250M, 10k ...")
    p.add_argument("--dim", help="embedding dimension (default for --calibrate: 128)")
    p.add_argument("--storage", default="float32", help="storage mode: float32, float16, int8 or codes (those the "
                   "calibration measured)")
    p.add_argument("--recall", type=float, default=0.95, help="recall@10 the searches must reach (default 0.95)")
    p.add_argument("--qps", type=float, default=100.0, help="queries per second to serve (default 100)")
    p.add_argument("--machine", help="one machine: cores=N,ram=SIZE (e.g. cores=16,ram=64GB; GiB for 2^30)")
    p.add_argument("--build-workers", type=int,
                   help="Beam workers for the build (default: the serving machines' cores)")
    p.add_argument("--gpus", type=int, help="GPUs for the embedding")
    p.add_argument("--encoder-rate", type=float, help="images per second per GPU of the encoder")
    p.add_argument("--shard-items", help="items per shard (default: the largest a build worker's RAM allows); "
                   "with --calibrate: the ladder's shard size (default: the smallest size)")
    p.add_argument("--calibration", help="calibration file to read (default: the shipped one), or to write with "
                   "--calibrate (default: ./calibration.json)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--calibrate", action="store_true", help="measure this machine: a mini ladder of Beam builds "
                   "and searches, and each storage mode; writes --calibration")
    p.add_argument("--sizes", default="25k,75k,250k", help="--calibrate: memory sizes of the ladder (default "
                   "25k,75k,250k, about 2 minutes on 8 idle cores)")
    p.add_argument("--mode-items", default="25k", help="--calibrate: items of each storage-mode measurement")
    p.add_argument("--modes", default="float32,float16,int8,codes",
                   help="--calibrate: storage modes to measure (those this build lacks are skipped)")
    p.add_argument("--queries", type=int, default=500, help="--calibrate: queries per recall measurement")
    p.add_argument("--work-dir", help="--calibrate: where the ladder's memories go (default: a temporary folder)")
    p.set_defaults(func=_run)
