"""``vismem``: the parser of every verb, and the entry that runs one and prints its JSON result."""
from __future__ import annotations

import logging
import os
import sys

from cli import build, demo, deploy, embed, evaluate, manage
from cli.common import VerbParser, print_json

# In the order of the product's stages: embed, build and change, query, evaluate, deploy.
VERBS = (embed.add_embed, embed.add_probe, build.add_build, build.add_add, manage.add_remove, build.add_compact,
         manage.add_versions, manage.add_gc, manage.add_query, manage.add_info, evaluate.add_eval,
         evaluate.add_experiment, deploy.add_serve, deploy.add_submit, deploy.add_jobs, demo.add_demo)
# A verb failing on its input says so in one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError)


def build_parser() -> VerbParser:
    parser = VerbParser(
        prog="vismem",
        description="Visual memory at scale: classify images by retrieval from a sharded database of "
        "(embedding, label) pairs. Add and remove knowledge without training.",
        epilog="Run 'vismem VERB --help' for each verb's options and an example.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(sub)
    # What 'vismem submit' checks its command with, handed down so that no verb module imports this one.
    parser.set_defaults(parse_vismem=parser.parse_args)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
        if result is not None:
            print_json(result)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``vismem info M | head -1``). As Python's documentation advises, point
        # stdout at devnull so the flush at exit cannot fail again, and exit as a SIGPIPE'd program does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except USER_ERRORS as exc:
        print(f"vismem {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    return 0

