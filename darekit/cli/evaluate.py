"""``dare/test.py``: robustness evaluation of a run's classifiers."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from darekit.cli import Parser, run, run_dirs_option


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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> None:
        from darekit import io, report
        from darekit.cli import resolve_runs
        from darekit.config import from_args, given
        from darekit.crosscheck import CrossCheckConfig
        from darekit.evaluate import EvalConfig, SearchConfig, evaluate_run

        cfg = from_args(EvalConfig, args, search=from_args(SearchConfig, args),
                        crosscheck_params=given(args, CrossCheckConfig))
        runs = resolve_runs(args.run_dir)   # all checked before any work
        for r in runs:
            evaluate_run(r, cfg, progress=args.progress)
            print(f"{r.path}/eval: results.csv, results.json, report.md, "
                  "robust_accuracy.png, er.png")
        if len(runs) > 1 or args.report:
            path = args.report or runs[0].path.parent / "report.md"
            io.write_text(path, report.combined_report(
                [report.Evaluated.load(r.path) for r in runs], path.parent))
            print(f"combined report: {path}")

    return run(body)
