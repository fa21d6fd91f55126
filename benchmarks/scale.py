"""Scale ladder: memories of growing size built by the Beam job with k-means routing, measured and fitted.

Run: ``.venv/bin/python benchmarks/scale.py`` (``--help`` for sizes). Default: 250k, 1M and 2.5M clustered
128-d unit vectors (the search benchmark's distribution: 1,000 Gaussian clusters) in k-means shards
of 125k items (2, 8 and 20 shards), plus one build of 1M items in shards of 500k (the worker-RSS
slope), built by ``pipelines.build.build_memory`` on the multi-process DirectRunner (2 workers).
For each size (``deploy.ladder.measure_point``): build wall and CPU seconds, peak RSS of the driver
and of the largest worker (psutil over the process tree), bytes on disk per item, open time, RAM per
item once open, routed q/s and CPU per query at recall@10 >= 0.9 / 0.95 / 0.99 (probe_shards and
leaves chosen by a sweep, recall against brute force on 1,000 queries), and the time to remove 0.1%.

Each figure is fitted as a function of size (linear or n log n, the better one is named), and the
largest size is predicted from the smaller ones to validate ``vismem plan`` (target: within 25%).
Writes ``bench-out/scale.json`` (every point as soon as it is measured: ``--resume`` extends a
ladder one size at a time), ``bench-out/scale.png`` and the calibration file (``--calibration``,
default ``bench-out/calibration.json``; the shipped one is ``deploy/calibration.json``).
``--real DIR`` adds the routed figures on real embeddings (an embed run's folders, comma separated).
Expect about an hour on 2 idle cores for the default ladder; 10M items take several hours.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from deploy import calibrate, ladder  # noqa: E402
from deploy.plan import parse_count  # noqa: E402
from deploy.rates import calibration_from, envelope_fit, fit_size  # noqa: E402

FIGURES = (("build_wall_s", "build wall s"), ("build_cpu_s", "build CPU s"), ("driver_rss", "driver RSS B"),
           ("worker_rss", "largest worker RSS B"), ("bytes_per_item", "B/item on disk"),
           ("serve_ram_per_item", "RAM B/item open"), ("open_s", "open s"), ("remove_s", "remove 0.1% s"))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="250k,1M,2.5M", help="memory sizes, comma separated (1e6, 2.5M, 250k)")
    ap.add_argument("--shard-items", default="125k", help="items per shard (the shard count grows with size)")
    ap.add_argument("--big-shard", default="1M:500k", help="SIZE:SHARD of the extra point for the worker-RSS slope")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--mode-items", default="100k", help="items of each storage-mode measurement")
    ap.add_argument("--mode-dims", default="128,512")
    ap.add_argument("--modes", default="float32,float16,int8,codes")
    ap.add_argument("--work-dir", default="/tmp/vismem-scale")
    ap.add_argument("--out", default="bench-out/scale.json")
    ap.add_argument("--png", default="bench-out/scale.png")
    ap.add_argument("--calibration", default="bench-out/calibration.json")
    ap.add_argument("--resume", action="store_true", help="keep the points (and modes) already in --out")
    ap.add_argument("--only", default="", help="comma list of steps to run: ladder,modes,real,fit (default: all)")
    ap.add_argument("--real", default="", help="embed-run folders of real embeddings, comma separated")
    ap.add_argument("--real-shards", type=int, default=8)
    return ap.parse_args(argv)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save(path, res):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)


def run_ladder(args, res):
    """Every (size, shard size) point not yet in ``res``, saved as each one is measured."""
    shard = parse_count(args.shard_items, "--shard-items")
    big_n, big_s = (parse_count(v, "--big-shard") for v in args.big_shard.split(":"))
    todo = [(parse_count(s, "--sizes"), shard) for s in args.sizes.split(",")] + [(big_n, big_s)]
    for n, s in todo:
        if any(p["n"] == n and p["shard_items"] == s for p in res["points"]):
            continue
        log(f"measuring n={n:,}, {s:,} items per shard (load average {os.getloadavg()[0]:.1f})")
        point = ladder.measure_point(args.work_dir, n, dim=args.dim, shard_items=s, workers=args.workers,
                                     queries=args.queries, log=log)
        point["load_average"] = os.getloadavg()[0]
        res["points"].append(point)
        save(args.out, res)


def validate(points, shard_items):
    """Each figure of the largest size predicted by the fit to the smaller ones: ``{figure: row}``."""
    main = sorted((p for p in points if p["shard_items"] == shard_items), key=lambda p: p["n"])
    if len(main) < 3:
        return {}
    known, last = main[:-1], main[-1]
    out = {}
    for key, unit in FIGURES:
        if key == "worker_rss":
            pts = [p for p in points if p is not last]
            fit = fit_size([p["shard_items_max"] for p in pts], [p[key] for p in pts], unit=unit, models=("linear",))
            pred = fit.at(last["shard_items_max"])
        else:
            fit = fit_size([p["n"] for p in known], [p[key] for p in known], unit=unit)
            pred = fit.at(last["n"])
        out[key] = {"measured": last[key], "predicted": pred, "error": pred / last[key] - 1, "model": fit.model}
    # What vismem plan predicts for the build's wall time: the fixed start-up (the wall fit's intercept)
    # plus the build CPU spread over the workers (deploy.plan._build), not the wall fit itself.
    wall = fit_size([p["n"] for p in known], [p["build_wall_s"] for p in known])
    cpu = fit_size([p["n"] for p in known], [p["build_cpu_s"] for p in known])
    used = min(int(last.get("workers", 1)), -(-int(last["n"]) // int(shard_items)))
    pred = wall.a + cpu.at(last["n"]) / max(used, 1)
    out["build_wall_s (plan)"] = {"measured": last["build_wall_s"], "predicted": pred,
                                  "error": pred / last["build_wall_s"] - 1, "model": f"{wall.a:.0f} s + CPU / {used}"}
    # Query cost as vismem plan models it (deploy.rates.envelope_fit): the costliest smaller size; and,
    # for comparison, the best size fit through them (what the plan used before: +152% at 10M).
    for target in ("0.95",):
        pts = [p for p in known if target in p["query"]]
        if target in last["query"] and len(pts) >= 2:
            for key in ("cpu_s_per_query", "qps"):
                ys = [p["query"][target][key] if key != "qps" else 1 / p["query"][target][key] for p in pts]
                meas = last["query"][target][key]
                for name, fit in (("", envelope_fit([p["n"] for p in pts], ys)),
                                  (" (size fit)", fit_size([p["n"] for p in pts], ys))):
                    pred = fit.at(last["n"]) if key != "qps" else 1 / fit.at(last["n"])
                    out[f"{key}@{target}{name}"] = {"measured": meas, "predicted": pred, "error": pred / meas - 1,
                                                    "model": "envelope" if not name else fit.model}
    return {"predicted_n": last["n"], "from_sizes": [p["n"] for p in known], "figures": out}


def _series(points, key):
    if key.startswith("qps@"):
        return [p["query"].get(key[4:], {}).get("qps", float("nan")) for p in points]
    return [p[key] / (2**20 if "rss" in key else 1) for p in points]


def plot(res, path, shard_items):
    """One panel per figure: the measured points and the fitted curve (dashed), log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from deploy.rates import Fit

    main = sorted((p for p in res["points"] if p["shard_items"] == shard_items), key=lambda p: p["n"])
    ns = [p["n"] for p in main]
    grid = np.geomspace(min(ns), max(ns), 50)
    panels = [("build_wall_s", "build_cpu_s"), ("driver_rss", "worker_rss"), ("bytes_per_item", "serve_ram_per_item"),
              ("qps@0.95",), ("open_s",), ("remove_s",)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, keys in zip(axes.ravel(), panels):
        for key in keys:
            line, = ax.plot(ns, _series(main, key), "o-", label=key + (" (MiB)" if "rss" in key else ""))
            fit = res["fits"].get(key)
            if fit:
                f = Fit(**fit)
                ys = [f.at(n) for n in grid]
                ys = [1 / y for y in ys] if key.startswith("qps@") else [y / (2**20 if "rss" in key else 1) for y in ys]
                ax.plot(grid, ys, "--", color=line.get_color(), label=f"{fit['model']} fit ({fit['rel_err']:.0%} rms)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("items in the memory")
        ax.legend(fontsize=7)
    fig.suptitle(f"vismem scale ladder: {shard_items:,} items per k-means shard, dim {res['args']['dim']}, "
                 f"{res['args']['workers']} Beam workers (shared 2-core machine)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)


def fits_of(res, shard_items):
    """Each figure of the main ladder fitted to size (q/s through seconds per query)."""
    main = [p for p in res["points"] if p["shard_items"] == shard_items]
    fits = {key: fit_size([p["n"] for p in main], [p[key] for p in main], unit=unit).to_json()
            for key, unit in FIGURES}
    pts = [p for p in main if "0.95" in p["query"]]
    if len(pts) >= 2:
        fits["qps@0.95"] = fit_size([p["n"] for p in pts], [1 / p["query"]["0.95"]["qps"] for p in pts],
                                    unit="wall s per query (1/q/s)").to_json()
    return fits


def load_real(folders) -> dict:
    """Embeddings of embed runs (``vismem embed`` folders), or a cache of ``SPLIT-START.npy`` chunks with
    ``SPLIT-labels.npy`` (how H-storage's script caches the 70k Fashion-MNIST embeddings); ids ``SPLIT-ROW``."""
    import glob

    import numpy as np

    from memory import schema
    from pipelines.outputs import read_run

    parts = []
    for d in folders:
        labels = sorted(glob.glob(os.path.join(d, "*-labels.npy")))
        if not labels:
            parts.append(read_run(d))
            continue
        for lab in labels:
            split = os.path.basename(lab)[: -len("-labels.npy")]
            chunks = sorted(glob.glob(os.path.join(d, f"{split}-[0-9]*.npy")))
            x = np.concatenate([np.load(c) for c in chunks]).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)  # embedding shards hold unit vectors
            y = np.load(lab)
            if len(x) != len(y):
                raise ValueError(f"{d}: {split} has {len(x)} embeddings for {len(y)} labels (cache incomplete)")
            parts.append({"ids": np.array([f"{split}-{i}" for i in range(len(x))], dtype=object), "embeddings": x,
                          "labels": y.astype(np.int64), "metadata": {},
                          "provenance": schema.default_provenance(len(x))})
    return schema.concat_embeddings(parts)


def run_real(args, res):
    """Routed figures on real embeddings: all rows but 1,000 held-out queries, in k-means shards."""
    import numpy as np

    from memory import Memory, schema
    from memory.partition import nearest_partitions

    data = load_real(args.real.split(","))
    rng = np.random.default_rng(0)
    held = rng.choice(len(data["ids"]), 1000, replace=False)
    keep = np.setdiff1d(np.arange(len(data["ids"])), held)
    q = data["embeddings"][held] / np.linalg.norm(data["embeddings"][held], axis=1, keepdims=True)
    folder = os.path.join(args.work_dir, "real")
    inputs, out = os.path.join(folder, "emb"), os.path.join(folder, "memory")
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(inputs)
    for f, part in enumerate(np.array_split(keep, 8)):
        schema.write_embeddings(os.path.join(inputs, f"part-{f:05d}.parquet"), schema.embedding_table(
            data["ids"][part], data["embeddings"][part], data["labels"][part]))
    names = [str(i) for i in range(int(data["labels"].max()) + 1)]
    built = ladder.watched_build(inputs, out, num_shards=args.real_shards, workers=args.workers, names=names)
    x = data["embeddings"][keep] / np.linalg.norm(data["embeddings"][keep], axis=1, keepdims=True)
    top = np.argsort(-(q @ x.T), axis=1)[:, :10]
    truth = data["ids"][keep][top]
    real = {"items": int(len(keep)), "queries": 1000, "dim": int(x.shape[1]), "shards": args.real_shards,
            **built, "ceiling": {}}
    with Memory.open(out) as mem:
        part = mem.manifest.partitioning
        where = {i: s.entry.partition_number for s in mem.shards for i in s.ids}
        item_part = np.vectorize(where.get)(truth)
        for p in range(1, args.real_shards + 1):
            route = nearest_partitions(q, part.centroids, p, part.cell_partitions)
            real["ceiling"][p] = float((item_part[:, :, None] == route[:, None, :]).any(axis=2).mean())
        sweep = ladder.Sweep(probes=tuple(range(1, args.real_shards + 1)))
        real["curve"] = ladder.routed_curve(mem, q, truth, sweep)
        real["best"] = {str(t): ladder.best_at(real["curve"], t) for t in sweep.targets}
        every = ladder.routed_curve(mem, q, truth, ladder.Sweep(probes=(args.real_shards,)))  # no routing
        real["all_shards_best"] = {str(t): ladder.best_at(every, t) for t in sweep.targets}
    shutil.rmtree(folder, ignore_errors=True)
    res["real"] = real
    log("real data: ceiling " + ", ".join(f"P={p} {v:.3f}" for p, v in real["ceiling"].items()))
    log("real data: best " + json.dumps(real["best"]))
    save(args.out, res)


def print_real(real):
    print(f"\nreal embeddings: {real['items']:,} x {real['dim']}-d in {real['shards']} k-means shards, "
          f"{real['queries']:,} held-out queries")
    print("| P (shards probed) | routing ceiling | best q/s at recall@10 >= 0.95 |\n| --- | --- | --- |")
    for p, ceiling in real["ceiling"].items():
        at = [r for r in real["curve"] if r["probe_shards"] == int(p) and r["recall@10"] >= 0.95]
        qps = f"{max(r['qps'] for r in at):,.0f}" if at else "-"
        print(f"| {p} | {ceiling:.4f} | {qps} |")
    for t, b in real["best"].items():
        every = real["all_shards_best"].get(t)
        print(f"recall >= {t}: routed {b and round(b['qps'])} q/s (P={b and b['probe_shards']}), "
              f"all shards {every and round(every['qps'])} q/s")


def print_report(res, shard_items):
    print("\n| items | shards | build wall s | build CPU s | driver RSS MiB | worker RSS MiB | B/item | open s "
          "| RAM B/item | q/s @0.95 (P, leaves) | CPU ms/query | remove 0.1% s |")
    print("|" + " --- |" * 12)
    for p in res["points"]:
        b = p["query"].get("0.95")
        qtxt = f"{b['qps']:,.0f} (P={b['probe_shards']}, {b['leaves']})" if b else "not reached"
        print(f"| {p['n']:,} | {p['shards']} x {p['shard_items_max']:,} | {p['build_wall_s']:,.0f} | "
              f"{p['build_cpu_s']:,.0f} | {p['driver_rss'] / 2**20:,.0f} | {p['worker_rss'] / 2**20:,.0f} | "
              f"{p['bytes_per_item']:,.0f} | {p['open_s']:.1f} | {p['serve_ram_per_item']:,.0f} | {qtxt} | "
              f"{(b['cpu_s_per_query'] * 1e3 if b else float('nan')):.3f} | {p['remove_s']:.2f} |")
    print("\n| figure | fit | rms error |\n| --- | --- | --- |")
    for key, fit in res.get("fits", {}).items():
        print(f"| {key} | {fit['model']}: a={fit['a']:.4g}, b={fit['b']:.4g} | {fit['rel_err']:.1%} |")
    if res.get("real"):
        print_real(res["real"])
    v = res.get("validation") or {}
    if v:
        print(f"\nvalidation: n={v['predicted_n']:,} predicted from {v['from_sizes']}")
        print("| figure | measured | predicted | error |\n| --- | --- | --- | --- |")
        for key, r in v["figures"].items():
            print(f"| {key} | {r['measured']:.4g} | {r['predicted']:.4g} | {r['error']:+.1%} |")


def main(argv=None):
    args = parse_args(argv)
    steps = set(args.only.split(",")) if args.only else {"ladder", "modes", "real", "fit"}
    res = {"args": vars(args), "points": [], "modes": []}
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            res = {**json.load(f), "args": vars(args)}
    os.makedirs(args.work_dir, exist_ok=True)
    shard = parse_count(args.shard_items, "--shard-items")
    if "ladder" in steps:
        run_ladder(args, res)
    if "modes" in steps:
        dims = tuple(int(d) for d in args.mode_dims.split(","))
        res["modes"] = calibrate.measure_modes(args.work_dir, args.modes.split(","), parse_count(args.mode_items),
                                            dims, log=log)
        save(args.out, res)
    if "real" in steps and args.real:
        run_real(args, res)
    if "fit" in steps and res["points"]:
        res["fits"] = fits_of(res, shard)
        res["validation"] = validate(res["points"], shard)
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        about = {"machine": {"cores": os.cpu_count(), "ram_bytes": ram},
                 "measured_at": time.strftime("%Y-%m-%d"), "shared_machine": True,
                 "command": "benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        cal = calibration_from(res["points"], res["modes"], dim=args.dim, shard_items=shard, cores=args.workers,
                               about=about, routing=calibrate.measure_routing(args.dim))
        save(args.calibration, cal)
        save(args.out, res)
        plot(res, args.png, shard)
    print_report(res, shard)


if __name__ == "__main__":
    main()
