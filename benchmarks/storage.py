"""Storage-mode benchmark: bytes per item, recall@10, q/s and label agreement of every storage mode.

Run: ``.venv/bin/python benchmarks/storage.py [--only synthetic|fmnist|tuning]``. Each data set is
measured side by side in one process:

- (a) synthetic: ``--n`` (default 1M) x 128 unit vectors in 1,000 Gaussian clusters (labels: the
  cluster), ``--queries`` held-out draws of the same clusters;
- (b) fmnist: the Fashion-MNIST EfficientNet-Lite0 embeddings (1,280-d, ``--image-size`` px) cached
  under ``--fmnist-cache`` (``--embed`` computes the missing ones, resumably: about 60 images/s on
  2 idle cores at 64 px); the first ``--queries`` test images are the held-out queries, every
  other cached image is the memory;
- options: raw ScaNN configurations on (b) (codes per block, reorder types) and exact search on
  per-vector int8 and int4 copies: the measurements the modes were chosen by;
- tuning: ``--tuning-n`` (default 200,000) x 64 items (search.py's 1,000 clusters, and 100 tight
  clusters), one shard and four hashed shards, ScaNN defaults against ``--target-recall`` 0.95,
  recall@10 on 1,000 held-out queries.

For each (backend, mode), one shard holds the memory, built with ``write_memory`` (ScaNN tuned to
recall 0.95). Bytes per item come from ``vismem info``'s measurement (files on disk; RAM grown while
a fresh process loads the shard). Recall@10 is against exact float32 search; label agreement is the
share of queries whose rank-voting prediction (k = 50) equals the exact float32 memory's. Writes
``bench-out/storage.json`` and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.search import labelled_data, make_data, recall, timed  # noqa: E402
from memory import Memory, write_memory  # noqa: E402
from memory.info import memory_info  # noqa: E402

CASES = [("exact", "float32"), ("exact", "float16"), ("exact", "int8"), ("exact", "pca"),
         ("scann", "float32"), ("scann", "float16"), ("scann", "int8"), ("scann", "codes")]
K = 50  # the neighbours that vote


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("synthetic", "fmnist", "options", "tuning"), action="append",
                    help="run only these parts (repeatable; default: all)")
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic memory items")
    ap.add_argument("--queries", type=int, default=2000, help="held-out queries per data set")
    ap.add_argument("--fmnist-cache", default="/tmp/fmnist-lite0-64px", help="folder of cached embeddings")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--embed", action="store_true", help="embed the images not cached yet first")
    ap.add_argument("--tuning-n", type=int, default=200_000)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--cases", default=None, help="comma list of backend:mode to run (default: all)")
    ap.add_argument("--out", default="bench-out/storage.json")
    return ap.parse_args(argv)


# --- Fashion-MNIST embeddings, cached in chunks -------------------------------------------------

CHUNK = 5000


def embed_fmnist(cache: str, image_size: int) -> None:
    """Embed every Fashion-MNIST image not cached yet (EfficientNet-Lite0), ``CHUNK`` images a file."""
    from pipelines.encoders import load_encoder
    from pipelines.sources.idx import fashion_mnist

    os.makedirs(cache, exist_ok=True)
    enc = load_encoder("efficientnet-lite0", image_size)
    for split in ("test", "train"):
        images, labels = fashion_mnist(split)
        np.save(os.path.join(cache, f"{split}-labels.npy"), labels)
        for a in range(0, len(images), CHUNK):
            path = os.path.join(cache, f"{split}-{a:05d}.npy")
            if os.path.exists(path):
                continue
            b = min(a + CHUNK, len(images))
            t = time.perf_counter()
            emb = np.concatenate([enc.embed(images[i:min(i + 128, b)]) for i in range(a, b, 128)])
            np.save(path + ".tmp.npy", emb.astype(np.float32))
            os.replace(path + ".tmp.npy", path)
            print(f"embedded {split} {a}-{b}: {(b - a) / (time.perf_counter() - t):.1f} images/s", flush=True)


def load_fmnist(cache: str, queries: int):
    """``(memory x, labels, query x, labels, counts)`` from the cached chunks (any subset of them)."""
    parts = {}
    for split in ("test", "train"):
        labels = np.load(os.path.join(cache, f"{split}-labels.npy"))
        xs, ys = [], []
        for a in range(0, len(labels), CHUNK):
            path = os.path.join(cache, f"{split}-{a:05d}.npy")
            if os.path.exists(path):
                emb = np.load(path)[:min(CHUNK, len(labels) - a)]  # early caches ran one batch past the chunk
                xs.append(emb)
                ys.append(labels[a:a + len(emb)])
        parts[split] = (np.concatenate(xs), np.concatenate(ys)) if xs else (np.zeros((0, 1280), np.float32), labels[:0])
    (tx, ty), (rx, ry) = parts["test"], parts["train"]
    if len(tx) < queries:
        raise SystemExit(f"{cache} holds {len(tx)} test embeddings; {queries} are needed as queries (--embed)")
    mx, my = np.concatenate([rx, tx[queries:]]), np.concatenate([ry, ty[queries:]])
    return mx, my, tx[:queries], ty[:queries], {"train": len(rx), "test": len(tx)}


# --- one memory per (backend, mode) ---------------------------------------------------------------

def measure(work, name, x, labels, q, qy, classes, backend, mode, ref, target):
    """One memory: build, bytes per item (vismem info), q/s, recall@10 and agreement against ``ref``."""
    path = os.path.join(work, f"{name}-{backend}-{mode}")
    ids = np.array([f"i{i:08d}" for i in range(len(x))], dtype=object)
    t0 = time.perf_counter()
    manifest = write_memory(path, x, labels, ids, backend=backend, storage=mode, class_names=classes,
                            target_recall=target)
    build_s = time.perf_counter() - t0
    info = memory_info(path)
    with Memory.open(path) as mem:
        mem.search(q[:64], K)  # warm-up
        secs, res = timed(lambda: mem.classify(q, K, "rank"), repeat=2)
    rows = np.vectorize(lambda s: int(s[1:]))(res.neighbours.ids)
    p = manifest.shards[0].params
    out = {"data": name, "backend": backend, "storage": mode, "items": len(x), "dim": x.shape[1],
           "build_s": round(build_s, 1),
           "disk": info["bytes_per_item"]["disk"], "ram": info["bytes_per_item"]["ram"],
           "qps": round(len(q) / secs, 1), "predictions": res.predictions,
           "accuracy": round(float(np.mean(res.predictions == qy)), 4), "rows": rows,
           "settings": {k: p.get(k) for k in ("num_leaves", "num_leaves_to_search", "reorder", "recall",
                                                "dimensions_per_block", "brute_force") if k in p}}
    if ref is not None:
        out["recall@10"] = round(recall(rows, ref["rows"], 10), 4)
        out["agreement"] = round(float(np.mean(res.predictions == ref["predictions"])), 4)
    return out


def run_set(args, work, name, x, labels, q, qy, classes):
    cases = CASES if not args.cases else [tuple(c.split(":")) for c in args.cases.split(",")]
    ref = None
    rows = []
    for backend, mode in cases:
        row = measure(work, name, x, labels, q, qy, classes, backend, mode, ref, args.target_recall)
        if (backend, mode) == ("exact", "float32"):
            ref = row
            row["recall@10"], row["agreement"] = 1.0, 1.0
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("predictions", "rows")}), flush=True)
    return rows


def vector_bytes(row, where):
    """Bytes per item the storage mode controls: everything but the items table."""
    parts = row[where]
    return parts["total"] - parts["items"]


def table(rows) -> str:
    base = {r["data"]: r for r in rows if (r["backend"], r["storage"]) == ("scann", "float32")}
    lines = ["| data | backend | storage | disk B/item (vectors+index+reorder / items) | RAM B/item (index / items) "
             "| disk, RAM vs ScaNN float32 | disk, RAM vs float32 vectors (4 x dim) | recall@10 | q/s | agreement "
             "| accuracy | settings |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        b = base.get(r["data"])
        ratio = "" if b is None else (f"1/{vector_bytes(b, 'disk') / vector_bytes(r, 'disk'):.1f}, "
                                      f"1/{b['ram']['index'] / max(r['ram']['index'], 1e-9):.1f}")
        raw = 4 * r.get("dim", 0)
        eighth = (f"1/{raw / vector_bytes(r, 'disk'):.1f}, 1/{raw / max(r['ram']['index'], 1e-9):.1f}"
                  if raw else "")
        s = r["settings"]
        tuned = "" if "num_leaves_to_search" not in s or s.get("brute_force") else (
            f"leaves {s['num_leaves_to_search']}/{s['num_leaves']}, reorder {s['reorder']}, "
            f"tuned recall {s.get('recall')}")
        lines.append(f"| {r['data']} ({r['items']:,}) | {r['backend']} | {r['storage']} | "
                     f"{vector_bytes(r, 'disk'):,.0f} / {r['disk']['items']:.0f} | {r['ram']['index']:,.0f} / "
                     f"{r['ram']['items']:.0f} | {ratio} | {eighth} | {r['recall@10']:.3f} | {r['qps']:,.0f} | "
                     f"{r['agreement']:.4f} | {r['accuracy']:.3f} | {tuned} |")
    return "\n".join(lines)


# --- options: raw ScaNN configurations on one data set, to choose the modes ------------------------

OPTIONS = [  # (name, dims per block, reorder type or None, reorder depth)
    ("AH lut16 1 dim/block, no reorder", 1, None, 0), ("AH lut16 2 dims/block, no reorder", 2, None, 0),
    ("AH lut16 4 dims/block, no reorder", 4, None, 0), ("AH 2 dims/block + int8 reorder 200", 2, "INT8", 200),
    ("AH 2 dims/block + bfloat16 reorder 200", 2, "BFLOAT16", 200)]


def run_options(x, labels, q, classes):
    """Label agreement and recall@10 of raw ScaNN trees (every leaf searched, so only the codes and
    the reorder data differ) and of exact search on per-vector int8 and int4 copies."""
    import scann
    from scann.scann_ops.py.scann_builder import ReorderType

    from memory import quantize
    from memory.voting import vote_and_predict

    def agreement(rows, sims):
        p = vote_and_predict(labels[rows], sims, method="rank", num_classes=len(classes))[1]
        return round(float(np.mean(p == p0)), 4), round(recall(rows, truth, 10), 4)

    def exact(items):
        s = q @ items.T
        rows = np.argsort(-s, axis=1)[:, :K]
        return rows, np.take_along_axis(s, rows, 1)

    truth, sims = exact(x)
    p0 = vote_and_predict(labels[truth], sims, method="rank", num_classes=len(classes))[1]
    out = []
    for mode in ("int8", "codes"):
        a, r = agreement(*exact(quantize.decode(quantize.encode(x, mode), mode, x.shape[1])))
        out.append({"option": f"exact on a per-vector {'int8' if mode == 'int8' else 'int4'} copy",
                    "agreement": a, "recall@10": r, "bytes": quantize.bytes_per_vector(x.shape[1], mode)})
    leaves = int(np.sqrt(len(x)))
    for name, dpb, kind, depth in OPTIONS:
        b = scann.scann_ops_pybind.builder(x, 10, "dot_product").tree(leaves, leaves, training_sample_size=len(x))
        b = b.score_ah(dpb, anisotropic_quantization_threshold=0.2)
        if kind:
            b = b.reorder(depth, quantize=getattr(ReorderType, kind))
        searcher = b.build()
        rows, d = searcher.searcher.search_batched(q, K, max(depth, K), leaves, True, 256)
        a, r = agreement(np.asarray(rows, np.int64), np.asarray(d, np.float32))
        codes = x.shape[1] / dpb / 2  # 16-centre codes: 4 bits a block, as ScaNN holds them in RAM
        out.append({"option": name, "agreement": a, "recall@10": r,
                    "bytes": codes + {None: 0, "INT8": x.shape[1], "BFLOAT16": 2 * x.shape[1]}[kind]})
        print(json.dumps(out[-1]), flush=True)
    return out


def options_table(rows, dim) -> str:
    lines = ["| option | RAM B/item of vector data (vs float32's 4 x dim) | recall@10 | agreement |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['option']} | {r['bytes']:,.0f} (1/{4 * dim / r['bytes']:.1f}) | {r['recall@10']:.3f} | "
              f"{r['agreement']:.4f} |" for r in rows]
    return "\n".join(lines)


# --- tuning: defaults against --target-recall -----------------------------------------------------

def tight_clusters(n, dim, clusters, noise, seed):
    """Unit vectors in ``clusters`` Gaussian blobs of per-dimension ``noise`` (the tests' generator):
    with few, tight clusters, ScaNN's default settings miss neighbours."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    labels = rng.integers(0, clusters, n)
    x = centres[labels] + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def run_tuning(args, work):
    """ScaNN defaults against ``--target-recall`` on two kinds of 64-d data, in one and four hashed shards."""
    wide_x, wide_labels, wide_q = make_data(args.tuning_n, 64, 1000, 1000, seed=7)
    tight_x, tight_labels = tight_clusters(args.tuning_n + 1000, 64, 100, 0.3, seed=7)
    sets = {"1,000 clusters (search.py)": (wide_x, wide_labels, wide_q),
            "100 tight clusters": (tight_x[:args.tuning_n], tight_labels[:args.tuning_n], tight_x[args.tuning_n:])}
    out = []
    for data, (x, labels, q) in sets.items():
        truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
        ids = np.array([f"i{i:08d}" for i in range(len(x))], dtype=object)
        for shards in (1, 4):
            for target in (None, args.target_recall):
                path = os.path.join(work, f"tune-{len(out)}")
                t0 = time.perf_counter()
                m = write_memory(path, x, labels % 1000, ids, num_shards=shards, backend="scann",
                                 class_names=[str(i) for i in range(1000)], target_recall=target)
                build_s = time.perf_counter() - t0
                with Memory.open(path) as mem:
                    mem.search(q[:64], 10)
                    secs, nb = timed(lambda: mem.search(q, 10), repeat=2)
                rows = np.vectorize(lambda s: int(s[1:]))(nb.ids)
                row = {"data": data, "shards": shards, "target": target, "recall@10": round(recall(rows, truth, 10), 4),
                       "qps": round(len(q) / secs, 1), "build_s": round(build_s, 1),
                       "settings": [(s.params["num_leaves_to_search"], s.params["num_leaves"], s.params["reorder"],
                                     s.params.get("recall")) for s in m.shards]}
                out.append(row)
                print(json.dumps(row), flush=True)
    return out


def tuning_table(rows) -> str:
    lines = ["| data | shards | target | recall@10 (held out) | q/s | build s "
             "| per shard: leaves searched/leaves, reorder, recorded recall |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['shards']} | {r['target'] or 'off (defaults)'} | {r['recall@10']:.3f} | "
                     f"{r['qps']:,.0f} | {r['build_s']:.0f} | "
                     + "; ".join(f"{a}/{b}, {c}, {d}" for a, b, c, d in r["settings"]) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    parts = args.only or ["synthetic", "fmnist", "options", "tuning"]
    result = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="vismem-storage-") as work:
        rows = []
        if "synthetic" in parts:
            x, labels, q, qy = labelled_data(args.n, 128, 1000, args.queries, seed=0)
            rows += run_set(args, work, "synthetic", x, labels, q, qy, [str(i) for i in range(1000)])
        if "fmnist" in parts or "options" in parts:
            if args.embed:
                embed_fmnist(args.fmnist_cache, args.image_size)
            mx, my, q, qy, counts = load_fmnist(args.fmnist_cache, args.queries)
            result["fmnist_counts"] = counts
            from pipelines.sources import FASHION_MNIST_CLASSES
            if "fmnist" in parts:
                rows += run_set(args, work, "fmnist", mx, my, q, qy, list(FASHION_MNIST_CLASSES))
            if "options" in parts:
                result["options"] = run_options(mx, my, q, list(FASHION_MNIST_CLASSES))
                print(options_table(result["options"], mx.shape[1]))
        result["modes"] = [{k: v for k, v in r.items() if k not in ("predictions", "rows")} for r in rows]
        if rows:
            print(table(rows))
        if "tuning" in parts:
            result["tuning"] = run_tuning(args, work)
            print(tuning_table(result["tuning"]))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
