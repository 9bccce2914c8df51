"""Command-line plumbing shared by every entry point: parsers, one-line errors, exit codes.

One module per family of scripts (``cli.train``, ...) builds the parsers; ``run(body)`` turns
any ``DareError`` into ``error: <message>`` on stderr and exit code 2, with no traceback.
Parsers take ``None`` defaults: the config dataclasses own the defaults.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from darekit.errors import DareError


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one line (no usage dump) and exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse hook
        self.exit(2, f"{self.prog}: error: {message}\n")


def run(body: Callable[[], int | None]) -> int:
    """Run ``body``; turn user errors into one line on stderr and a non-zero exit code."""
    try:
        return int(body() or 0)
    except DareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with --resume to continue", file=sys.stderr)
        return 130


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
