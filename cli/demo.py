"""``vismem demo``: the main job end to end on Fashion-MNIST."""
from __future__ import annotations

import demo
from cli import terminal
from cli.common import count, fraction, output_folder


def _run_demo(a) -> dict:
    from demo.run import run_demo

    output_folder(a.out, "--out")
    _check(a)
    return run_demo(a.out, train=a.train, test=a.test, unlabelled_fraction=a.unlabelled_fraction,
                    image_size=a.image_size, num_shards=a.num_shards, backend=a.backend, k_max=a.k_max, full=a.full,
                    compare_encoders=tuple(e for e in a.compare_encoders.split(",") if e),
                    progress=terminal.current())


def _check(a) -> None:
    """What would otherwise fail only after minutes of embedding: sizes, encoders, the probe's labels."""
    from pipelines.encoders import encoder_image_size

    encoder_image_size("efficientnet-lite0", a.image_size)
    for name in (e for e in a.compare_encoders.split(",") if e):
        encoder_image_size(name, a.image_size)
    if a.unlabelled_fraction >= 1:
        raise ValueError("--unlabelled-fraction must be below 1: the probe teacher learns from the human labels left")
    if not a.full and a.k_max > a.train:
        raise ValueError(f"--k-max {a.k_max} exceeds the {a.train} training images the memory holds (--train)")


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="run the main job end to end on Fashion-MNIST (local Ray, Beam DirectRunner)",
        description=demo.__doc__.split("\n\n", 1)[1],
        epilog="example: vismem demo --out demo-out   (then open demo-out/report/report.md)",
    )
    p.add_argument("--out", default="demo-out", help="output directory (embeddings, memory, report/)")
    p.add_argument("--train", type=count, default=6000, help="training images embedded (default 6000)")
    p.add_argument("--test", type=count, default=1000, help="test images embedded (default 1000)")
    p.add_argument("--unlabelled-fraction", type=fraction, default=0.5,
                   help="share of training images whose labels are hidden and pseudo-labelled")
    p.add_argument("--image-size", type=count, default=64, help="encoder input size (64 px: ~60-250 images/s here)")
    p.add_argument("--num-shards", type=count, default=4)
    p.add_argument("--backend", choices=["scann", "exact"], default="scann")
    p.add_argument("--k-max", type=count, default=100)
    p.add_argument("--full", action="store_true", help="all 60,000 training and 10,000 test images")
    p.add_argument("--compare-encoders", default="efficientnet-lite1,efficientnet-lite2",
                   help="encoders that also embed the human-labelled and test images, for the scaling curve by "
                        "encoder (compute against memory); '' skips them")
    p.set_defaults(func=_run_demo)
