"""Embedding benchmark: ``vismem embed`` (Ray actors) against a plain single-process torch loop.

Run: ``python benchmarks/embed.py`` (about 3 minutes on 2 idle cores). Same encoder, batch size, image size
and torch thread count on both sides, on real Fashion-MNIST; one size after the other, the plain loop
before and after the pipeline (averaged), the pipeline in a fresh process (``python -m cli embed``).
Two pipeline figures:

- ``encode`` images/s: from the moment the encoder actors are ready to the last shard written (what the
  plain loop's figure also measures: model loaded, images in memory, embeddings out), and
- ``end-to-end`` images/s: the whole command, Ray start and model loading included.

Writes ``bench-out/embed.json`` and prints a Markdown table. ``--device cuda`` measures a GPU
(``benchmarks/gpu_embed.sh``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from pipelines.encoders import load_encoder  # noqa: E402
from pipelines.sources import fashion_mnist  # noqa: E402
from search import int_list, print_table, write_json  # noqa: E402  (benchmarks/search.py)


def plain_loop(images: np.ndarray, encoder_name: str, image_size: int, batch_size: int, threads: int,
               device: str) -> dict:
    """The baseline: one process, the encoder called batch after batch on arrays already in memory."""
    import torch

    torch.set_num_threads(threads)
    enc = load_encoder(encoder_name, image_size, device=device)
    enc.embed(images[:batch_size])  # warm-up (allocator, kernels)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = np.empty((len(images), enc.dim), np.float32)
    for a in range(0, len(images), batch_size):
        out[a:a + batch_size] = enc.embed(images[a:a + batch_size])
    dt = time.perf_counter() - t0
    return {"images": len(images), "seconds": round(dt, 2), "images_per_s": round(len(images) / dt, 2)}


def pipeline(n: int, encoder_name: str, image_size: int, batch_size: int, threads: int, device: str,
             shard_size: int, workers: int) -> dict:
    out = tempfile.mkdtemp(prefix="vismem-bench-embed-")
    cmd = [sys.executable, "-m", "cli", "embed", "fashion-mnist", out, "--limit", str(n),
           "--encoder", encoder_name, "--image-size", str(image_size), "--batch-size", str(batch_size),
           "--shard-size", str(shard_size), "--num-workers", str(workers), "--threads-per-worker", str(threads),
           "--device", device, "--no-progress"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    if res.returncode != 0:
        raise RuntimeError(f"vismem embed failed:\n{res.stderr[-3000:]}")
    summary = json.loads(res.stdout)
    tp = summary["throughput"]
    return {"images": summary["counts"]["embedded"], "encode_seconds": tp["encode_wall_s"],
            "encode_images_per_s": tp["encode_images_per_s"], "command_seconds": round(wall, 2),
            "end_to_end_images_per_s": round(n / wall, 2), "ray": summary["ray"]}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="efficientnet-lite0")
    p.add_argument("--sizes", type=int_list, default="64,224", help="image sizes, comma-separated")
    p.add_argument("--images", type=int_list, default="960,192",
                   help="images per size, comma-separated (same order)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    p.add_argument("--workers", type=int, default=1, help="encoder actors of the pipeline")
    p.add_argument("--shard-size", type=int, default=320)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default=os.path.join(ROOT, "bench-out", "embed.json"))
    args = p.parse_args(argv)
    if len(args.images) != len(args.sizes):
        p.error("--images needs one count per --sizes entry")
    return args


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def bench_size(args, images: np.ndarray, size: int) -> dict:
    """One image size: the plain loop, the pipeline, the plain loop again, on the same ``images``."""
    n = len(images)
    # The plain loop runs before and after the pipeline and the two are averaged: on a shared machine
    # the load drifts, and bracketing keeps the drift out of the ratio.
    before = plain_loop(images, args.encoder, size, args.batch_size, args.threads, args.device)
    pipe = pipeline(n, args.encoder, size, args.batch_size, args.threads, args.device, args.shard_size,
                    args.workers)
    after = plain_loop(images, args.encoder, size, args.batch_size, args.threads, args.device)
    base = {"images": n, "runs_images_per_s": [before["images_per_s"], after["images_per_s"]],
            "images_per_s": round((before["images_per_s"] + after["images_per_s"]) / 2, 2)}
    return {"image_size": size, "images": n, "plain": base, "vismem_embed": pipe,
            "ratio_encode": round(pipe["encode_images_per_s"] / base["images_per_s"], 3),
            "ratio_end_to_end": round(pipe["end_to_end_images_per_s"] / base["images_per_s"], 3)}


def print_report(result, load):
    print(f"\n{result['encoder']}, batch {result['batch_size']}, {result['threads']} threads, {result['device']} "
          f"({result['device_name']}); load average at the end {load[0]:.1f} on {result['cpu_count']} CPUs\n")
    print_table(["px", "images", "plain loop img/s", "vismem embed img/s (encode)", "ratio", "end-to-end img/s",
                 "ratio"],
                [[r["image_size"], r["images"], r["plain"]["images_per_s"], r["vismem_embed"]["encode_images_per_s"],
                  r["ratio_encode"], r["vismem_embed"]["end_to_end_images_per_s"], r["ratio_end_to_end"]]
                 for r in result["rows"]])


def main(argv=None) -> int:
    args = parse_args(argv)
    images, _ = fashion_mnist("train")
    name = device_name(args.device)
    rows = []
    for size, n in zip(args.sizes, args.images):
        rows.append(bench_size(args, images[:n], size))
        print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()
    result = {"load_average_1_5_15": [round(v, 2) for v in load], "encoder": args.encoder,
              "batch_size": args.batch_size, "threads": args.threads, "workers": args.workers,
              "device": args.device, "device_name": name, "cpu_count": os.cpu_count(), "rows": rows}
    write_json(args.out, result)
    print_report(result, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
