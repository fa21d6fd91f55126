"""What every verb shares: the verb parser (unknown options, Beam options), class names, JSON output."""
from __future__ import annotations

import argparse
import collections
import difflib
import json
import logging
import math
import sys

from memory import output_paths, storage, voting

# The one meaning of --class-names, in every verb's help.
CLASS_NAMES_HELP = "a,b,c, or a file: one name per line, or JSON (a list, or an embed run's summary.json)"
# The one meaning of --ties, in every verb that votes (memory.voting).
TIES_HELP = ("how a tied top score is settled: nearest (default: the tied class whose best-ranked neighbour is "
             "nearest wins) or leader (the paper's released code: the tied class that reached the top score first "
             "keeps it)")
# A value without a comma that looks like one of these is a file the user meant, never a class name.
_PATH_SUFFIXES = (".txt", ".json", ".csv")


class VerbParser(argparse.ArgumentParser):
    """An argument parser that names the closest valid option when it meets an unknown one.

    A verb that runs Beam (``beam_options=True``) takes Beam's options after its own (or after
    ``--``); each is checked against Beam's option list before any work, and the checked list is
    handed to the verb in ``args.beam_args``.
    """

    def __init__(self, *args, beam_options: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.beam_options = beam_options

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        if self.beam_options:
            ns.beam_args = self._checked_beam_args([a for a in extra if a != "--"])
            return ns, []
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}{self._suggestion(extra)}")
        return ns, extra

    def _own_options(self) -> list[str]:
        return [o for o in self._option_string_actions if o.startswith("--")]

    def _checked_beam_args(self, extra: list[str]) -> list[str]:
        if not extra:
            return []
        # Importing Beam logs through the root logger ("apitools not found ..."); with no handler yet
        # (the verb's terminal session starts after parsing) that would configure logging on stderr.
        quiet = logging.NullHandler()
        logging.getLogger().addHandler(quiet)
        try:
            from pipelines.beam_runner import validate_beam_args
        finally:
            logging.getLogger().removeHandler(quiet)

        try:
            return validate_beam_args(extra, own_options=self._own_options())
        except ValueError as exc:
            self.error(str(exc))

    def _suggestion(self, extra: list[str]) -> str:
        for arg in extra:
            if arg.startswith("-"):
                close = difflib.get_close_matches(arg.split("=", 1)[0], self._own_options(), n=1)
                if close:
                    return f" (did you mean {close[0]}?)"
        return ""


# Argument types: a number out of range is refused by the parser, before any work, naming the option.
def count(text: str) -> int:
    """An integer >= 1 (sizes, k, shards, batch sizes, versions)."""
    value = _number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _number(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def positive(text: str) -> float:
    """A finite number > 0."""
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def non_negative(text: str) -> float:
    """A finite number >= 0."""
    value = finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def finite(text: str) -> float:
    """A finite number (no nan, no inf)."""
    value = _number(text, float, "a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def int_list(text: str) -> list[int]:
    """A comma list of integers >= 0, e.g. ``2,4,8``."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a comma list of integers such as 2,4,8, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be integers >= 0, got {text!r}")
    return values


def _number(text: str, kind, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def add_ties(parser) -> None:
    """Add ``--ties`` (``memory.voting.TIES``) to a verb that votes."""
    parser.add_argument("--ties", choices=voting.TIES, default="nearest", help=TIES_HELP)


def add_filters(parser) -> None:
    """Add ``--include`` and ``--exclude`` (``memory.filters``) to a verb that searches."""
    parser.add_argument("--include", action="append", default=[], metavar="FIELD=V[,V]",
                        help="search only items whose provenance FIELD (label_source or source) is one of the "
                        "values, e.g. --include label_source=human; repeatable (every one must hold)")
    parser.add_argument("--exclude", action="append", default=[], metavar="FIELD=V[,V]",
                        help="never return items whose FIELD is one of the values, e.g. --exclude source=web")


def item_filter(a):
    """The ``memory.filters.ItemFilter`` of a verb's ``--include``/``--exclude`` (None without them)."""
    from memory.filters import ItemFilter

    return ItemFilter.parse(a.include, a.exclude)


def output_file(path: str, option: str) -> str:
    """``path`` after checking it can be written as a file (memory.output_paths), for ``option``."""
    output_paths.check_file(path, option)
    return path


def output_folder(path: str, option: str) -> str:
    """``path`` after checking it is, or can be made, a folder (memory.output_paths), for ``option``."""
    output_paths.check_folder(path, option)
    return path


def class_names(value: str | None) -> list[str] | None:
    """The one meaning of ``--class-names``: an inline list ``a,b,c``, or a file holding the names.

    A file is text with one name per line, or JSON: a list, or an embed run's ``summary.json``
    (``source.class_names``). Empty or duplicate names, a missing file, a folder or an empty file
    raise ValueError, so no memory is ever built with classes shifted or named after a path.
    """
    if value is None:
        return None
    if not value.strip():
        raise ValueError("--class-names is empty; give a,b,c or a file of class names")
    if "," not in value and (storage.exists(value) or "/" in value or value.endswith(_PATH_SUFFIXES)):
        return _checked(_names_from_file(value), f"--class-names: {value}")
    return comma_names(value, "--class-names")


def comma_names(value: str, option: str) -> list[str]:
    """Names given inline, ``a,b,c``: none empty, none twice."""
    return _checked([n.strip() for n in value.split(",")], f"{option} {value!r}")


def _names_from_file(path: str) -> list[str]:
    if not storage.exists(path):
        raise ValueError(f"--class-names: no such file: {path}")
    fs, p = storage.filesystem(path)
    if fs.isdir(p):
        raise ValueError(f"--class-names: {path} is a folder; give a file of class names or a,b,c")
    text = storage.read_bytes(path).decode().strip()
    if not text:
        raise ValueError(f"--class-names: {path} is empty")
    if path.endswith(".json") or text[0] in "[{":
        return _names_from_json(path, text)
    return [line.strip() for line in text.splitlines()]


def _names_from_json(path: str, text: str) -> list:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--class-names: {path} is not valid JSON ({exc})") from None
    names = obj
    if isinstance(obj, dict):
        names = obj.get("class_names") or (obj.get("source") or {}).get("class_names")
    if not isinstance(names, list) or not names:
        raise ValueError(f"--class-names: {path} holds neither a list of class names nor an embed summary with them")
    return [str(n).strip() for n in names]


def _checked(names: list[str], where: str) -> list[str]:
    if "" in names:
        raise ValueError(f"{where} has an empty name (entry {names.index('') + 1})")
    twice = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if twice:
        raise ValueError(f"{where} names {', '.join(map(repr, twice))} more than once")
    return names


def print_json(obj) -> None:
    """A verb's result on stdout as indented JSON (values JSON cannot hold as their ``str``)."""
    json.dump(obj, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
