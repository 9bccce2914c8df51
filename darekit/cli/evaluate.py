"""``dare/test.py``: robustness evaluation of a run's classifiers."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from darekit.cli import RERUN, Parser, parse_args, run, run_dirs_option


def parser() -> Parser:
    from darekit.config import add_options
    from darekit.crosscheck import CrossCheckConfig
    from darekit.evaluate import EvalConfig, SearchConfig

    p = Parser(prog="dare/test.py", description="Evaluate every classifier of a run (original, "
               "DARE, DARE-S, DARE-SL, adversarial fine-tuning baselines, PGD adversarial "
               "training) under the attacks, on the same seeded test images: clean accuracy, "
               "Empirical Robustness, attack success rate, robust accuracy, with 95% intervals, "
               "and a cross-check of robust accuracy against gradient masking. Resumable. "
               "Several runs (e.g. seeds) give one combined report.")
    run_dirs_option(p)
    add_options(p, EvalConfig)
    add_options(p, SearchConfig)
    add_options(p, CrossCheckConfig)
    p.add_argument("--report", type=Path, help="with several runs: where to write the "
                   "combined report (default: report.md beside the first run)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run's existing evaluation made with other options (without "
                   "it, such a run is an error: its report would no longer match its options)")
    return p


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"search": {"tol": 0.01}}`` -> ``{"search.tol": 0.01}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_options(run_path: str | Path, cfg: Any) -> list[str]:
    """What differs between ``cfg`` (an ``EvalConfig``) and the options of the evaluation
    already in ``run_path`` (``eval/config.json``), as ``"n 100 -> 1000"``; empty when there
    is none or they agree (an interrupted evaluation then resumes)."""
    from dataclasses import asdict

    from darekit import io, layout

    path = Path(run_path) / layout.EVAL_CONFIG
    if not path.is_file():
        return []
    old = _flat({k: v for k, v in io.read_json(path).get("eval", {}).items()
                 if k != "test_idx"})
    new = _flat(io.jsonable(asdict(cfg)))
    return [f"{k} {old.get(k, 'unset')} -> {new.get(k, 'unset')}"
            for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]


def check_unchanged(run_path: str | Path, cfg: Any, overwrite: bool) -> None:
    """A ``DareError`` when ``run_path`` holds an evaluation made with other options than
    ``cfg`` and ``overwrite`` is off: re-evaluating would silently replace it (its parts,
    ``eval/config.json`` and the report)."""
    from darekit.errors import DareError

    diff = changed_options(run_path, cfg)
    if diff and not overwrite:
        raise DareError(f"{run_path} holds an evaluation made with other options "
                        f"({'; '.join(diff)}); this command would replace it: add --overwrite "
                        "to do so, or give the evaluation's options")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(parser, argv, "dare/test.py")

    def body() -> None:
        from darekit import io, report
        from darekit.cli import resolve_runs
        from darekit.config import from_args, given
        from darekit.crosscheck import CrossCheckConfig
        from darekit.evaluate import EvalConfig, SearchConfig, evaluate_run

        cfg = from_args(EvalConfig, args, search=from_args(SearchConfig, args),
                        crosscheck_params=given(args, CrossCheckConfig))
        for p in args.run_dir or []:     # before opening the runs: a mismatch needs no model
            check_unchanged(p, cfg, args.overwrite)
        runs = resolve_runs(args.run_dir)   # all checked before any work
        for r in runs:
            check_unchanged(r.path, cfg, args.overwrite)
        for r in runs:
            evaluate_run(r, cfg, progress=args.progress)
            print(f"{r.path}/eval: results.csv, results.json, report.md, "
                  "robust_accuracy.png, er.png")
        if len(runs) > 1 or args.report:
            path = args.report or runs[0].path.parent / "report.md"
            io.write_text(path, report.combined_report(
                [report.Evaluated.load(r.path) for r in runs], path.parent))
            print(f"combined report: {path}")

    return run(body, RERUN)
