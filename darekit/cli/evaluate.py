"""``dare/test.py``: robustness evaluation of a run's classifiers."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from darekit.cli import Parser, positive_int, run


def parser() -> Parser:
    from darekit.attacks import ATTACKS

    p = Parser(prog="dare/test.py", description="Evaluate every classifier of a run (original, "
               "DARE, DARE-S, DARE-SL, adversarial fine-tuning baselines, PGD adversarial "
               "training) under the attacks, on the same seeded test images: clean accuracy, "
               "Empirical Robustness, attack success rate, robust accuracy. Resumable.")
    p.add_argument("--run-dir", action="append", required=True,
                   help="trained run (repeat to evaluate several and write one report)")
    p.add_argument("--n", type=positive_int, help="test images (default 1000)")
    p.add_argument("--seed", type=int, help="seed of the test-image draw and the attacks")
    p.add_argument("--attack", action="append", metavar="NAME",
                   help=f"attack(s), comma-separated or repeated; 'all' = the paper's five "
                        f"(default); registered: {', '.join(sorted(ATTACKS))}")
    p.add_argument("--models", help="comma-separated model names (default: all of the run)")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--grid", type=positive_int, help="initial epsilon grid of the minimal-"
                   "epsilon search (default 8)")
    p.add_argument("--eps-max-factor", type=float, help="search up to this multiple of the "
                   "budget (default 4)")
    p.add_argument("--tol", type=float, help="stop refining when ER moves by less than this "
                   "fraction (default 0.02)")
    p.add_argument("--max-rounds", type=int, help="at most this many bisection rounds (8)")
    p.add_argument("--report", type=Path, help="with several runs: where to write the "
                   "combined Markdown report")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> None:
        from darekit import io
        from darekit.attacks import parse_attacks
        from darekit.evaluate import EvalConfig, SearchConfig, combined_report, evaluate_run
        from darekit.rundir import Run

        given = lambda **kw: {k: v for k, v in kw.items() if v is not None}
        search = SearchConfig(**given(grid=args.grid, eps_max_factor=args.eps_max_factor,
                                      tol=args.tol, max_rounds=args.max_rounds))
        cfg = EvalConfig(**given(n=args.n, seed=args.seed, batch_size=args.batch_size),
                         attacks=parse_attacks(args.attack or ["all"]),
                         models=tuple(args.models.split(",")) if args.models else None,
                         search=search)
        runs = [Run.open(p) for p in args.run_dir]   # all checked before any work
        for r in runs:
            evaluate_run(r, cfg, progress=args.progress)
            print(f"{r.path}/eval: results.csv, results.json, report.md, "
                  "robust_accuracy.png, er.png")
        if len(runs) > 1 or args.report:
            path = args.report or runs[0].path.parent / "report.md"
            io.write_text(path, combined_report(runs))
            print(f"combined report: {path}")

    return run(body)
