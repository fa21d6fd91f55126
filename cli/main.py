"""``vismem``: the parser of every verb, and the entry that runs one and prints its JSON result."""
from __future__ import annotations

from cli.exits import exit_with  # first: its exit handler must be registered before any other

import argparse
import os
import sys

from cli import build, demo, deploy, embed, evaluate, manage, plan, prune, terminal
from cli.common import VerbParser, print_json
from memory.manifest import ConcurrentUpdate
from memory.ray_shards import ShardLost

# A local Ray head on a busy machine can take longer than Ray's default 30 s to write its GCS port
# (seen here: two test runs on 2 cores); wait up to 2 minutes unless the user chose otherwise.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")

# In the order of the product's stages: embed, build and change, query, evaluate, deploy.
VERBS = (embed.add_embed, embed.add_probe, build.add_build, build.add_add, manage.add_remove, prune.add_prune,
         build.add_compact, manage.add_versions, manage.add_gc, manage.add_query, manage.add_info, evaluate.add_eval,
         evaluate.add_experiment, deploy.add_serve, deploy.add_submit, deploy.add_jobs, plan.add_plan, demo.add_demo)
# A verb failing on its input says so in one line; anything else is a bug and keeps its traceback.
# ConcurrentUpdate: other writers kept winning the race to publish (after the library's retries).
USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, ConcurrentUpdate)


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
    _add_verbosity(parser)
    # What 'vismem submit' checks its command with, handed down so that no verb module imports this one.
    parser.set_defaults(parse_vismem=parser.parse_args)
    return parser


def _add_verbosity(parser) -> None:
    """``-v`` / ``-q`` (cli.terminal) on the top parser and on every verb (and sub-verb) parser."""
    terminal.add_options(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _add_verbosity(sub)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Engines' logs go to the run's log file, the terminal shows stages, warnings and errors (cli.terminal).
    with terminal.session(args.verb, terminal.verbosity_of(args)) as term:
        try:
            result = args.func(args)
            if result is not None:
                print_json(result)
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader went away (``vismem info M | head -1``). As Python's documentation advises, point
            # stdout at devnull so the flush at exit cannot fail again, and exit as a SIGPIPE'd program does.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            term.failed = True
            return 141
        except USER_ERRORS as exc:  # one line per problem (a message may list several)
            term.error(exc)
            return 2
        except ShardLost as exc:  # the cluster failed, not the input: one line, and another status
            term.error(exc)
            return 1
    return 0



def run() -> None:
    """The console script: run one verb and leave with its status."""
    try:
        status = main()
    except SystemExit as exc:  # argparse's usage errors and --help
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    exit_with(status)
