"""What the terminal shows while a verb runs: a bar or line per stage, the warnings that matter, a summary.

Everything else goes to the run's log file: Python's log records (INFO and up), Beam's, Ray's and
gRPC's logs, the C++ logs of absl and ScaNN, and whatever the worker processes a runner starts
print. Standard error is pointed at the log file at the file-descriptor level for the verb's run,
so a child process (the multi-process DirectRunner's SDK workers, Ray's raylet) inherits it; the
terminal is written through a copy of the original descriptor.

The log starts in the log folder (``$VISMEM_LOG_DIR``, else ``vismem-logs`` in the system's temp
folder). A verb with an output folder names it (:meth:`Session.output_folder`); when its work
begins (the first stage) the log moves to ``OUT/logs/`` (local outputs; a ``gs://`` output keeps
its log local). A run refused at the door leaves no log behind; a run that did anything names its
log in its summary or its error line.

``-v`` leaves every log on the terminal (Python's also go to the log file); ``-q`` drops the bars,
the stage lines and the summary; warnings and errors stay. A verb whose logs are what its user
watches (``serve``: uvicorn's start and requests) shows them by default (``default_verbosity``).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

QUIET, NORMAL, VERBOSE = -1, 0, 1
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_current: list = []


def add_options(parser: argparse.ArgumentParser) -> None:
    """``-v`` / ``-q`` on a parser (every verb has them; they mean the same everywhere)."""
    g = parser.add_argument_group("output")
    g.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=VERBOSE,
                   default=argparse.SUPPRESS,
                   help="show the engines' logs (Beam, Ray, gRPC, absl, Python INFO) on the terminal")
    g.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=QUIET, default=argparse.SUPPRESS,
                   help="no progress bars, stage lines or summary: only warnings and errors")


def log_dir() -> str:
    return os.environ.get("VISMEM_LOG_DIR") or os.path.join(tempfile.gettempdir(), "vismem-logs")


def current():
    """The running verb's :class:`Session` (a silent one outside a verb, e.g. when a test calls a verb function)."""
    if _current:
        return _current[-1]
    from pipelines.progress import SILENT

    return SILENT


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


class _LogStream:
    """The log file as a text stream whose file can change (when the log moves into the output folder)."""

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")

    def write(self, text: str) -> int:
        return self.file.write(text)

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return self.file.encoding

    def __getattr__(self, name):
        return getattr(self.file, name)


class _Bar:
    """One stage: a tqdm bar on a terminal; elsewhere (a pipe, a CI log) one line when the stage ends."""

    def __init__(self, session: "Session", name: str, total: int | None, unit: str, rate: bool = True):
        self.session, self.name, self.total, self.unit, self.rate = session, name, total, unit, rate
        self.n, self.t0, self.closed = 0, time.perf_counter(), False
        self.tqdm = None
        if session.verbosity > QUIET and session.isatty:
            from tqdm import tqdm

            self.tqdm = tqdm(total=total, desc=name, unit=unit, file=session.terminal, ncols=session.columns(),
                             mininterval=0.5, unit_scale=True)

    def update(self, n: int) -> None:
        self.n += n
        if self.tqdm is not None:
            self.tqdm.update(n)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.tqdm is not None:
            self.tqdm.close()
        elif self.session.verbosity > QUIET:
            secs = time.perf_counter() - self.t0
            # A stage seen only as it ended (its work done between two polls) has no rate worth quoting.
            rate = f", {self.n / secs:,.0f} {self.unit}/s" if self.rate and secs >= 0.1 and self.n else ""
            unit = self.unit[:-1] if self.n == 1 and self.unit.endswith("s") else self.unit
            counted = f"{self.n:,} {unit} in " if self.n or self.total else "done in "  # a stage that counts nothing
            self.session.line(f"{self.name}: {counted}{secs:.1f} s{rate}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Session:
    """One verb's run: where its output goes (see the module docstring); draws its stages (``pipelines.progress``)."""

    def __init__(self, verb: str, verbosity: int = NORMAL):
        self.verb, self.verbosity = verb, verbosity
        self.terminal = sys.stderr
        self.isatty = False
        self.path: str | None = None
        self.out: str | None = None
        self.began = False
        self.failed = False
        self._summary: str | None = None
        self._log: _LogStream | None = None
        self._saved: dict = {}
        self._handlers: list = []
        self.t0 = time.perf_counter()

    # --- set-up and tear-down ---------------------------------------------------------------------
    def __enter__(self):
        name = f"vismem-{self.verb}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        try:
            os.makedirs(log_dir(), exist_ok=True)
            self.path = os.path.join(log_dir(), name)
            self._log = _LogStream(self.path)
        except OSError:  # a log folder that cannot be written: the system's temp folder
            self.path = os.path.join(tempfile.gettempdir(), name)
            self._log = _LogStream(self.path)
        root = logging.getLogger()
        self._saved["level"] = root.level
        root.setLevel(logging.INFO)
        to_file = logging.StreamHandler(self._log)
        to_file.setFormatter(logging.Formatter(LOG_FORMAT))
        self._handlers.append(to_file)
        if self.verbosity >= VERBOSE:
            to_terminal = logging.StreamHandler(self.terminal)
            to_terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        else:
            self._divert_stderr()
            to_terminal = logging.StreamHandler(self.terminal)
            to_terminal.setLevel(logging.WARNING)  # vismem's own warnings (not the engines'), one line each
            to_terminal.addFilter(lambda r: r.name == "vismem" or r.name.startswith("vismem."))
            to_terminal.setFormatter(logging.Formatter(f"vismem {self.verb}: warning: %(message)s"))
        self._handlers.append(to_terminal)
        for h in self._handlers:
            root.addHandler(h)
        logging.captureWarnings(True)
        self.isatty = bool(getattr(self.terminal, "isatty", lambda: False)())
        _current.append(self)
        return self

    def _divert_stderr(self) -> None:
        """fd 2 and ``sys.stderr`` to the log file; the terminal through a copy of the original fd 2."""
        fd = _fileno(sys.stderr)
        sys.stderr.flush()
        self._saved["fd2"] = os.dup(2)
        if fd == 2:
            self.terminal = os.fdopen(os.dup(self._saved["fd2"]), "w", buffering=1,
                                      encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                                      errors="backslashreplace")
            self._saved["own_terminal"] = True
        os.dup2(self._log.fileno(), 2)
        self._saved["stderr"] = sys.stderr
        sys.stderr = self._log

    def __exit__(self, kind, exc, tb):
        if _current and _current[-1] is self:
            _current.pop()
        root = logging.getLogger()
        for h in self._handlers:
            root.removeHandler(h)
        root.setLevel(self._saved.get("level", logging.WARNING))
        logging.captureWarnings(False)
        if "fd2" in self._saved:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            saved = self._saved.pop("fd2")
            os.dup2(saved, 2)
            os.close(saved)
            sys.stderr = self._saved.pop("stderr")
        self._log.flush()
        self._log.file.close()
        if self._saved.pop("own_terminal", False):
            self.terminal.flush()
            self.terminal.close()
            self.terminal = sys.stderr
        if kind is None:
            if not self.failed:
                self._closing_line()
        elif not issubclass(kind, (ValueError, OSError, KeyboardInterrupt)) and self._log_has_text():
            # a bug: its traceback follows (on the terminal); the log holds what the engines said before it
            print(f"vismem {self.verb}: log: {self.path}", file=sys.stderr)
        return False

    def _log_has_text(self) -> bool:
        return bool(self.path and os.path.exists(self.path) and os.path.getsize(self.path) > 0)

    def _closing_line(self) -> None:
        """The summary and the log, or nothing when there is nothing to say; an empty log is removed."""
        logged = self._log_has_text()
        if not logged and self.path and os.path.exists(self.path):
            os.remove(self.path)
        if self._summary is None and not logged:
            return
        text = self._summary or f"done in {time.perf_counter() - self.t0:.1f} s"
        if self.verbosity > QUIET:
            print(f"vismem {self.verb}: {text}" + (f"; log: {self.path}" if logged else ""), file=sys.stderr)

    def discard_log(self) -> None:
        """Remove the log of a run that did nothing (refused at the door): it holds nothing worth keeping."""
        if self.path and not self.began and os.path.exists(self.path):
            os.remove(self.path)

    def error(self, exc: BaseException) -> None:
        """A failed run: one line per line of the message (one per problem), the log named on the last one
        when the run had begun its work (a run refused at the door leaves no log)."""
        self.failed = True
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        if self.began and self._log_has_text():
            lines[-1] += f" (log: {self.path})"
        else:
            self.discard_log()
        for text in lines:
            self.line(f"vismem {self.verb}: error: {text}")

    # --- what verbs and pipelines call ------------------------------------------------------------
    def output_folder(self, out: str) -> None:
        """The verb's output folder: the log moves into ``OUT/logs/`` when the work begins (local ``OUT``)."""
        self.out = out

    def begin(self) -> None:
        """The work begins (checks passed): the log moves to the output folder, if there is one."""
        if self.began:
            return
        self.began = True
        if not self.out or "://" in self.out or self._log is None:
            return
        folder = os.path.join(self.out, "logs")
        try:
            os.makedirs(folder, exist_ok=True)
            target = os.path.join(folder, os.path.basename(self.path))
            try:
                os.rename(self.path, target)  # open descriptors follow the file
            except OSError:  # another file system: copy, then write to the copy
                self._log.flush()
                shutil.copyfile(self.path, target)
                new = open(target, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
                if "fd2" in self._saved:
                    os.dup2(new.fileno(), 2)
                old, self._log.file = self._log.file, new
                old.close()
                os.remove(self.path)
            self.path = target
        except OSError as exc:  # the log stays where it is; the run goes on
            logging.getLogger("vismem").info("log kept at %s (%s)", self.path, exc)

    def stage(self, name: str, total: int | None = None, unit: str = "items", rate: bool = True) -> _Bar:
        self.begin()
        return _Bar(self, name, total, unit, rate)

    def note(self, text: str) -> None:
        if self.verbosity > QUIET:
            self.line(text)

    def warn(self, text: str) -> None:
        self.line(f"vismem {self.verb}: warning: {text}")
        logging.getLogger("vismem.terminal").info("warning shown: %s", text)

    def summary(self, text: str) -> None:
        """The verb's closing line (printed when it ends well, with the log's path)."""
        self._summary = text

    def columns(self) -> int:
        """The terminal's width (100 where it reports none, as under ``script``)."""
        try:
            return os.get_terminal_size(self.terminal.fileno()).columns or 100
        except (AttributeError, OSError, ValueError):
            return 100

    def line(self, text: str) -> None:
        print(text, file=self.terminal, flush=True)


def verbosity_of(args) -> int:
    """``-v`` / ``-q`` as given, else the verb's default (``set_defaults(default_verbosity=...)``; NORMAL)."""
    return getattr(args, "verbosity", getattr(args, "default_verbosity", NORMAL))


def session(verb: str, verbosity: int = NORMAL) -> Session:
    return Session(verb, verbosity)
