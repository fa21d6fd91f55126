"""Running the Beam jobs (build, add, compact): the options, their validation, the run and its failure.

Runners: the DirectRunner by default (``--direct_running_mode multi_processing`` pickles every DoFn
as a cluster does); any other by Beam options, e.g. ``--runner DataflowRunner --project P
--region R --temp_location gs://B/tmp``, ``--runner FlinkRunner --flink_master HOST:8081
--environment_type LOOPBACK`` or ``--runner SparkRunner --spark_master_url spark://HOST:7077``.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import os
import re
import time

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

# The namespace of the counters the jobs' DoFns keep; run_pipeline reports them.
METRICS = "vismem.build"


class BuildFailed(ValueError):
    """The pipeline failed; nothing was published."""


# Beam's DirectRunner first tries Prism, which it downloads from GitHub at run time, and falls back
# to its FnApiRunner when that fails. Our batch jobs always ran (and were tested) on the FnApiRunner,
# so the direct runner is asked for by that name: no download, no silent change of engine.
_DIRECT_NAMES = {"directrunner", "direct", "switchingdirectrunner"}


def pipeline_options(args=None) -> PipelineOptions:
    """Beam options; without a runner, the DirectRunner (its FnApiRunner) with one worker process per core."""
    args = list(args or [])
    if not any(a.startswith("--runner") for a in args):
        args = ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                f"--direct_num_workers={os.cpu_count() or 1}", *args]
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--runner" and i + 1 < len(args):  # "--runner X" as two words
            a, i = f"--runner={args[i + 1]}", i + 1
        if a.startswith("--runner=") and a.split("=", 1)[1].lower() in _DIRECT_NAMES:
            a = "--runner=FnApiRunner"
        out.append(a)
        i += 1
    return PipelineOptions(out)


@functools.cache
def _beam_parser() -> argparse.ArgumentParser:
    """Beam's own parser of every registered option (every PipelineOptions subclass's arguments)."""
    parsers = []
    # get_all_options hands its parser, with every subclass's arguments added, to this callback.
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)
    parser = parsers[0]
    parser.exit_on_error = False  # a bad value raises argparse.ArgumentError instead of exiting
    return parser


_HELP = ("-h", "--help")


def _beam_option_names() -> list[str]:
    """Every option string Beam knows, help excepted (it prints and exits instead of configuring)."""
    return [s for a in _beam_parser()._actions for s in a.option_strings if s not in _HELP]


def _unknown(arg: str, own_options) -> ValueError:
    """The error for an unknown option: its closest valid name, Beam's or the command's (``own_options``)."""
    name = arg.split("=", 1)[0]
    if name in own_options:
        return ValueError(f"{name} is an option of the command, not of Beam: give it before the Beam options")
    by_bare = {c.lstrip("-"): c for c in [*_beam_option_names(), *own_options]}
    close = difflib.get_close_matches(name.lstrip("-"), list(by_bare), n=1)  # dashes would make any two alike
    hint = f" (did you mean {by_bare[close[0]]}?)" if close else ""
    return ValueError(f"unknown option {name}{hint}")


def validate_beam_args(args, *, own_options=()) -> list[str]:
    """Check that every argument is an option Beam knows, with a valid value; returns ``args`` as a list.

    Accepts ``--opt=value``, ``--opt value`` and ``--flag``. ``own_options`` are the calling command's
    option names, so that a near miss of one (``--partiton``) is suggested as that option.

    Raises:
        ValueError: an unknown option (naming the closest valid one), one of ``own_options`` where Beam
            options are expected, a bad value, or a word that belongs to no option.
    """
    args = [str(a) for a in args]
    if helps := [a for a in args if a.split("=", 1)[0] in _HELP]:
        raise _unknown(helps[0], own_options)
    try:
        _, extra = _beam_parser().parse_known_args(args)
    except argparse.ArgumentError as exc:
        raise ValueError(f"bad Beam option: {exc}") from None
    if extra and extra[0].startswith("-") and extra[0] != "--":
        raise _unknown(extra[0], own_options)
    if extra:
        raise ValueError(f"unexpected argument {extra[0]!r}: Beam options are --name=value, --name value or --flag")
    return args


_ERROR_LINE = re.compile(r"\b(\w*(?:Error|Exception|BuildFailed)): (.+)")
_WHERE = re.compile(r" \[while running '[^']*'\]$")


def _cause(exc: BaseException) -> str:
    """The innermost ``SomeError: message`` line of a (worker) exception, not Beam's wrapping (nor its
    ``[while running 'Step']``); a ValueError, the input's fault, is its message alone."""
    text = str(exc)
    found = [m for line in text.splitlines() if (m := _ERROR_LINE.search(line))]
    if not found:
        return text.strip().splitlines()[-1][:2000]
    kind, message = found[-1].group(1), _WHERE.sub("", found[-1].group(2).rstrip())
    return (message if kind == "ValueError" else f"{kind}: {message}")[:2000]


def run_pipeline(construct, pipeline_args, what: str) -> dict:
    """Run a pipeline to the end; a failure raises :class:`BuildFailed` with the cause's message."""
    t0 = time.perf_counter()
    try:
        p = beam.Pipeline(options=pipeline_options(pipeline_args))
        construct(p)
        result = p.run()
        result.wait_until_finish()
    except Exception as exc:  # noqa: BLE001 - Beam wraps worker errors; keep the worker's message
        raise BuildFailed(f"{what} failed, nothing was published: {_cause(exc)}") from exc
    counters = {}
    try:
        for c in result.metrics().query(MetricsFilter().with_namespace(METRICS))["counters"]:
            counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + (c.committed or c.attempted or 0)
    except Exception:  # noqa: BLE001 - some runners report no metrics; the manifest has the facts
        pass
    return {"seconds": round(time.perf_counter() - t0, 3), "counters": counters}
