"""Command-line plumbing shared by every entry point: parsers, one-line errors, exit codes.

One module per family of scripts (``cli.train``, ...) builds the parsers; ``parse_args``
reads the command line, and ``run(body)`` turns any ``DareError`` into ``error: <message>`` on
stderr and exit code 2, with no traceback. Parsers take ``None`` defaults: the config
dataclasses own the defaults.

The order of a script's start, and why:

1. ``--backend`` is read from the command line first: Keras fixes its backend when it is
   imported (``darekit.backend.select``).
2. The options are checked against the parser's stored description (``darekit.cli.spec``,
   ``darekit/cli/parsers.json``): ``--help`` and a bad option need no backend, so they answer
   in well under a second instead of the 4-5 s that importing TensorFlow takes.
3. The backend is imported with its start-up lines (absl, oneDNN, CPU-feature notices) kept
   off stderr, then the real parser converts and validates the values.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence

from darekit.errors import DareError


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one line (no usage dump) and exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------- interruption
RERUN = "interrupted: rerun the same command to continue (finished work is kept)"
"""Ctrl-C advice of a script whose work resumes by itself when the same command runs again."""

RESUME = ("interrupted: rerun the same command with --resume to continue from the last "
          "finished epoch")
"""Ctrl-C advice of the training scripts (they resume only when asked)."""

START_OVER = ("interrupted: the unfinished stage keeps no partial work; rerun the same "
              "command to start it over")
"""Ctrl-C advice of a stage that keeps no partial work."""


def run(body: Callable[[], int | None], interrupted: str = START_OVER) -> int:
    """Run ``body``; turn user errors into one line on stderr and a non-zero exit code.
    ``interrupted``: the one line printed on Ctrl-C (``RERUN``, ``RESUME`` or ``START_OVER``:
    what is true of this script)."""
    try:
        return int(body() or 0)
    except DareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------- parsing
def add_backend_option(p: argparse.ArgumentParser) -> None:
    """``--backend {tensorflow,jax}`` (every script has it; ``parse_args`` adds it)."""
    from darekit.backend import BACKEND_HELP, BACKENDS

    if "--backend" not in p._option_string_actions:
        p.add_argument("--backend", choices=list(BACKENDS), default=None, help=BACKEND_HELP)


def _early(argv: Sequence[str], prog: str) -> argparse.Namespace:
    """What must be known before Keras is imported, read without the full parser:
    ``backend`` (None when not given) and ``deterministic`` (JAX's GPU determinism is an
    ``XLA_FLAGS`` flag that must be set before JAX starts)."""
    from darekit.backend import BACKENDS

    # No abbreviations here: "--ba" may be another option's prefix (--batch-size) for the full
    # parser; an abbreviated --backend is checked after the full parse instead.
    p = Parser(prog=prog, add_help=False, allow_abbrev=False)
    p.add_argument("--backend", choices=list(BACKENDS), default=None)
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False)
    known, _ = p.parse_known_args(argv)
    return known


def parse_args(build: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None,
               prog: str) -> argparse.Namespace:
    """Parse ``argv`` (``sys.argv[1:]`` when None) with the parser ``build()`` makes, after
    choosing the backend; ``--help`` and bad options exit before any backend is imported when
    the stored description of ``prog``'s parser is current (see the module docstring)."""
    from darekit.cli import spec

    argv = list(sys.argv[1:] if argv is None else argv)
    early = _early(argv, prog)
    stored = spec.load(prog)
    if stored is not None:
        spec.parser(stored).parse_args(argv)   # exits on --help and on bad options
    _select(early.backend, prog)
    if early.deterministic and "keras" not in sys.modules:
        from darekit import backend

        backend.deterministic_env()
    import_backend()
    if stored is None:
        spec.remember()
    p = build()
    add_backend_option(p)
    args = p.parse_args(argv)
    if args.backend is not None:
        _select(args.backend, prog)  # an abbreviated --backend: Keras is loaded already
    return args


def _select(name: str | None, prog: str) -> None:
    """``darekit.backend.select(name)``; its ``DareError`` as one line and exit code 2."""
    from darekit import backend

    try:
        backend.select(name)
    except DareError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# Start-up lines of TensorFlow and XLA on stderr that say nothing to a user: absl's notice
# before its logging starts, CPU-feature and oneDNN notices (some CPUs print them whatever
# TF_CPP_MIN_LOG_LEVEL says), CUDA plug-in registration notices, and INFO/WARNING lines in
# absl's format. Anything else written to stderr during the import is passed on.
NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cpu_feature_guard|"
    r"rebuild TensorFlow with the appropriate compiler flags|oneDNN custom operations|"
    r"TF_ENABLE_ONEDNN_OPTS|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation placer already registered|TF-TRT Warning|"
    r"^[IW]\d{4} [\d:.]+\s+\d+ \S+:\d+\]")


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Hold what is written to file descriptor 2 (C++ libraries included) and pass on only
    the lines that ``NOISE`` does not match. ``DAREKIT_TF_LOGS=1`` passes everything."""
    if os.environ.get("DAREKIT_TF_LOGS") == "1":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace")
            kept = "".join(line for line in text.splitlines(keepends=True)
                           if not NOISE.search(line))
            if kept:
                os.write(2, kept.encode())


def import_backend() -> None:
    """Import Keras (and so its backend) with the backend's start-up lines off stderr."""
    if "keras" in sys.modules:
        return
    with quiet_stderr():
        import keras  # noqa: F401


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {s}")
    return v


def int_list(s: str) -> tuple[int, ...]:
    """``"60,120,160"`` -> ``(60, 120, 160)``."""
    try:
        return tuple(int(t) for t in s.split(",") if t.strip())
    except ValueError:
        msg = f"expected comma-separated integers, received {s!r}"
        raise argparse.ArgumentTypeError(msg) from None


# ---------------------------------------------------------------------------- the run to use
RUN_DIR_HELP = ("run directory (default: the most recently trained run under runs/, also "
                "reachable as runs/latest)")


def run_dir_option(p: argparse.ArgumentParser, help: str = RUN_DIR_HELP) -> None:
    p.add_argument("--run-dir", help=help)


def run_dirs_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", action="append", help=RUN_DIR_HELP + "; repeat to evaluate "
                   "several runs (e.g. seeds) and write one combined report")


def resolve_run(path: str | None, *, need_history: bool = True):
    """``Run.open(path)``, or the latest run when ``path`` is None (saying which, on stdout)."""
    from darekit.paths import latest_run
    from darekit.rundir import Run

    if path is None:
        latest = latest_run()
        print(f"using run {latest} (the most recently trained under "
              f"{latest.parent}; pass --run-dir to choose another)")
        path = latest
    return Run.open(path, need_history=need_history, writable=True)  # every stage writes


def resolve_runs(paths: Sequence[str] | None) -> list:
    return [resolve_run(p) for p in paths] if paths else [resolve_run(None)]
