"""``vismem embed`` and ``vismem probe``: embedding image collections, fitting a probe teacher."""
from __future__ import annotations

import argparse

from cli import terminal
from cli.common import count, fraction, non_negative, output_file, output_folder

EMBED_EPILOG = """\
sources (local path or gs:// URL; the kind is detected, or pass --source-kind):
  fashion-mnist | DIR with {train,t10k}-images-idx3-ubyte[.gz]   IDX (MNIST family), human labels
  DIR of images, one sub-folder per class (or none: unlabelled)  image folder
  DIR or FILE of *.tar (KEY.jpg/png + KEY.cls)                   WebDataset shards, one input shard per tar
  DIR or FILE of *.parquet (image bytes column, optional label)  Parquet

examples:
  # 2,000 Fashion-MNIST training images at 64 px, 500 per output shard
  vismem embed fashion-mnist out/fm-train --limit 2000 --shard-size 500 --image-size 64

  # pseudo-label the test split with a linear probe fit on those human labels
  vismem probe out/fm-train --out out/probe.npz
  vismem embed fashion-mnist out/fm-test --split test --unlabelled-fraction 1 \\
      --teacher probe:out/probe.npz --min-confidence 0.5 --image-size 64

  # the EfficientNet ImageNet head as a teacher, with a label map
  vismem embed photos/ gs://bucket/emb --teacher efficientnet-lite0 \\
      --label-map pipelines/label_maps/imagenet_to_fashion_mnist.json

Re-running the same command resumes: complete input shards are skipped. Outputs: OUT/embeddings/*.parquet,
OUT/errors/*.parquet (quarantined inputs with reasons), OUT/summary.json.
"""


def _run_embed(a) -> dict:
    from pipelines.embed import EmbedConfig, run_embed
    from pipelines.sources import SourceSpec

    term = terminal.current()
    output_folder(a.out, "the output folder")
    term.output_folder(a.out)
    spec = SourceSpec(a.source, kind=a.source_kind, name=a.source_name or "", split=a.split,
                      shard_size=a.shard_size, limit=a.limit, unlabelled_fraction=a.unlabelled_fraction,
                      image_column=a.image_column, label_column=a.label_column)
    cfg = EmbedConfig(spec, a.out, encoder=a.encoder, image_size=a.image_size, batch_size=a.batch_size,
                      dtype=a.dtype, teacher=a.teacher, label_map=a.label_map,
                      min_confidence=a.min_confidence, max_pixels=a.max_pixels, ray_address=a.ray_address,
                      num_workers=a.num_workers, threads_per_worker=a.threads_per_worker, device=a.device,
                      progress=not a.no_progress)
    summary = run_embed(cfg, progress=term)
    _report(term, summary)
    return summary


def _report(term, s: dict) -> None:
    """The closing line of an embedding run, and one warning line for quarantined inputs (with their reasons)."""
    c, shards, speed = s["counts"], s["shards"], s["throughput"]
    if c["quarantined"]:
        from collections import Counter

        from pipelines.outputs import read_errors

        reasons = Counter(r.split(":")[0] for r in read_errors(s["out"]).column("reason").to_pylist())
        why = ", ".join(f"{r} ({n:,})" for r, n in reasons.most_common(3))
        term.warn(f"{c['quarantined']:,} input{'s' * (c['quarantined'] != 1)} quarantined: {why}; see {s['errors']}")
    pseudo = f", {c['pseudo_labelled']:,} pseudo-labelled" if c["pseudo_labelled"] else ""
    rate = f" in {speed['wall_s']:.1f} s" if speed["images_this_run"] else ""
    term.summary(f"embedded {c['embedded']:,} of {c['read']:,} images{pseudo} into {s['embeddings']} "
                 f"({shards['written_this_run']} of {shards['total']} shards written this run){rate}")


def _run_probe(a) -> dict:
    from pipelines.probe import fit_probe_from_shards

    output_file(a.out, "--out")
    return fit_probe_from_shards(a.shards, a.out, l2=a.l2, max_iter=a.max_iter)


def add_embed(sub) -> None:
    p = sub.add_parser(
        "embed", help="embed (and pseudo-label) an image collection into embedding shards, on Ray",
        description="Embed every image of SOURCE with a frozen encoder on a pool of Ray actors and write one "
        "embedding shard (Parquet) per input shard to OUT. Images without a human label can be pseudo-labelled "
        "by a teacher. Corrupt inputs are quarantined with their reason; a re-run resumes.",
        epilog=EMBED_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="local path, gs:// URL, or 'fashion-mnist' (the Debian package's files)")
    p.add_argument("out", help="output folder (local or gs://)")
    p.add_argument("--encoder", default="efficientnet-lite0",
                   help="efficientnet-lite0|1|2, dinov2-vits14|vitb14|vitl14|vitg14, clip-vit-b32|b16|l14, "
                   "dinov2:PATH or clip:PATH (local Hugging Face folders; nothing is downloaded)")
    p.add_argument("--image-size", type=count, help="encoder input size in pixels (default: the encoder's)")
    p.add_argument("--batch-size", type=count, default=64, help="images per encoder call")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored embedding type")
    p.add_argument("--teacher", help="efficientnet-lite0|1|2 (ImageNet head; needs --label-map) or probe:PATH")
    p.add_argument("--label-map", help="JSON {teacher class: memory class}; unmapped teacher classes are excluded")
    p.add_argument("--min-confidence", type=fraction, default=0.0, help="drop pseudo-labels below this probability")
    _add_embed_cluster_options(p)
    _add_embed_source_options(p)
    p.add_argument("--max-pixels", type=count, default=100_000_000, help="refuse larger images (after JPEG draft)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (-q: no stage lines either)")
    p.set_defaults(func=_run_embed)


def _add_embed_cluster_options(p) -> None:
    p.add_argument("--ray-address", help="an existing Ray cluster (default: a local instance)")
    p.add_argument("--num-workers", type=count, help="encoder actors (default: GPUs, else CPUs // 4, at least 1)")
    p.add_argument("--threads-per-worker", type=count, help="torch threads per actor (default: CPUs // workers)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def _add_embed_source_options(p) -> None:
    p.add_argument("--limit", type=count, help="only the first N images of the source")
    p.add_argument("--shard-size", type=count, default=1000, help="images per input shard (IDX, folder, Parquet)")
    p.add_argument("--split", default="train", help="IDX split: train or test")
    p.add_argument("--unlabelled-fraction", type=fraction, default=0.0,
                   help="hide this fraction of human labels (chosen by id); they are kept aside to score teachers")
    p.add_argument("--source-kind", default="auto", choices=("auto", "idx", "folder", "webdataset", "parquet"))
    p.add_argument("--source-name", help="prefix of the ids (default: the source folder's name)")
    p.add_argument("--image-column", default="image", help="Parquet: the image-bytes column")
    p.add_argument("--label-column", default="label", help="Parquet: the integer label column, if any")


def add_probe(sub) -> None:
    q = sub.add_parser(
        "probe", help="fit a linear-probe teacher on the human labels of an embedding run",
        description="Fit a softmax linear classifier on the human-labelled rows of an embedding run and save it "
        "for 'vismem embed --teacher probe:PATH'. The probe remembers its encoder and image size; a run with "
        "another encoder loads the probe's encoder for it.",
        epilog="example:\n  vismem probe out/fm-train --out out/probe.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("shards", help="an embedding run folder (OUT of vismem embed) or one shard file")
    q.add_argument("--out", required=True, help="where to save the probe (.npz, local or gs://)")
    q.add_argument("--l2", type=non_negative, default=1e-4, help="L2 penalty on the weights")
    q.add_argument("--max-iter", type=count, default=200, help="L-BFGS iterations")
    q.set_defaults(func=_run_probe)
