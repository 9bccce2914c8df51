"""``reproduce.py``: the whole study in one command."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from darekit.cli import Parser, int_list, run


def _names(s: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in s.split(",") if t.strip())


def parser() -> Parser:
    from darekit.attacks import ATTACKS
    from darekit.data import DATASETS
    from darekit.models import ARCHITECTURES
    from darekit.reproduce import PROFILES

    p = Parser(prog="reproduce.py", description="Train with history, slice, mine, DARE / "
               "DARE-S / DARE-SL, adversarial examples and fine-tuning baselines, optionally "
               "PGD adversarial training, evaluation and report; one job per (dataset, model, "
               "seed), each in its own run directory, then a combined report. Finished stages "
               "are skipped: rerun the same command to continue after an interruption.")
    p.add_argument("--dataset", "--datasets", dest="datasets", type=_names,
                   default=("fashion_mnist",), metavar="NAMES",
                   help=f"comma-separated, of {', '.join(sorted(DATASETS))} "
                        "(default: fashion_mnist)")
    p.add_argument("--model", "--models", dest="models", type=_names, default=("alexnet",),
                   metavar="NAMES", help=f"comma-separated, of {', '.join(sorted(ARCHITECTURES))}"
                   " (default: alexnet)")
    p.add_argument("--profile", choices=list(PROFILES), default="quick",
                   help="; ".join(f"{k}: {v.doc}" for k, v in PROFILES.items()))
    p.add_argument("--seed", "--seeds", dest="seeds", type=int_list, default=(0,),
                   metavar="SEEDS", help="one seed per job, comma-separated (default: 0)")
    p.add_argument("--run-dir", type=Path, help="run directory of a single job (default "
                   "runs/<dataset>-<model>-<profile>-s<seed>)")
    p.add_argument("--pgd-at", action=argparse.BooleanOptionalAction, default=False,
                   help="also train the PGD adversarial-training baseline (Madry) from scratch")
    p.add_argument("--attack", action="append", metavar="NAME",
                   help=f"attacks (default: the paper's five); registered: "
                        f"{', '.join(sorted(ATTACKS))}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> None:
        from darekit.attacks import parse_attacks
        from darekit.data import dataset_spec
        from darekit.errors import DareError
        from darekit.models import get_architecture
        from darekit.reproduce import PROFILES, Study, reproduce_all

        for d in args.datasets:
            dataset_spec(d)
        for m in args.models:
            get_architecture(m)
        jobs = [(d, m, s) for d in args.datasets for m in args.models for s in args.seeds]
        if args.run_dir is not None and len(jobs) > 1:
            raise DareError(f"--run-dir names one job's directory; this command has "
                            f"{len(jobs)} jobs (drop --run-dir)")
        attacks = parse_attacks(args.attack or ["all"])
        studies = [Study(dataset=d, model=m, profile=PROFILES[args.profile], seed=s,
                         run_dir=args.run_dir, pgd_at=args.pgd_at, attacks=attacks)
                   for d, m, s in jobs]
        reproduce_all(studies)

    return run(body)
