"""``vismem``: the command-line entry. Each package registers its own verbs; this file only wires them."""
from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from deploy import cli as deploy_cli
    from eval import cli as eval_cli
    from eval.experiments import cli as experiment_cli
    from memory import cli as memory_cli
    from pipelines import build_cli, demo
    from pipelines import cli as pipelines_cli

    parser = argparse.ArgumentParser(
        prog="vismem",
        description="Visual memory at scale: classify images by retrieval from a sharded database of "
        "(embedding, label) pairs. Add and remove knowledge without training.",
        epilog="Run 'vismem VERB --help' for each verb's options and an example.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    # In the order of the product's stages: embed, build and change, query, evaluate, deploy.
    pipelines_cli.add_parsers(sub)
    build_cli.add_parsers(sub)
    memory_cli.add_parsers(sub)
    eval_cli.add_parsers(sub)
    experiment_cli.add_parsers(sub)
    deploy_cli.add_parsers(sub)
    demo.add_parser(sub)
    return parser


def main(argv=None) -> int:
    from memory.cli import print_json

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"vismem {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        print_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
