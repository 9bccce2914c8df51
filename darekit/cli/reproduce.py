"""``reproduce.py``: the whole study in one command."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from darekit.cli import Parser, run


def parser() -> Parser:
    from darekit.attacks import ATTACKS
    from darekit.data import DATASETS
    from darekit.models import ARCHITECTURES
    from darekit.reproduce import PROFILES

    p = Parser(prog="reproduce.py", description="Train with history, slice, mine, DARE / "
               "DARE-S / DARE-SL, adversarial examples and fine-tuning baselines, optionally "
               "PGD adversarial training, evaluation and report. Finished stages are skipped: "
               "rerun the same command to continue after an interruption.")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="fashion_mnist")
    p.add_argument("--model", choices=sorted(ARCHITECTURES), default="alexnet")
    p.add_argument("--profile", choices=list(PROFILES), default="quick",
                   help="; ".join(f"{k}: {v.doc}" for k, v in PROFILES.items()))
    p.add_argument("--seed", type=int, default=0, help="the study's one seed")
    p.add_argument("--run-dir", type=Path,
                   help="run directory (default runs/<dataset>-<model>-<profile>-s<seed>)")
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
        from darekit.reproduce import PROFILES, Study, reproduce

        study = Study(dataset=args.dataset, model=args.model, profile=PROFILES[args.profile],
                      seed=args.seed, run_dir=args.run_dir, pgd_at=args.pgd_at,
                      attacks=parse_attacks(args.attack or ["all"]))
        reproduce(study)

    return run(body)
