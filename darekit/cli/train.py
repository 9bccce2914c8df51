"""``train/train.py`` and ``train/alexnet.py``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from darekit.cli import Parser, int_list, positive_int, run


def train_parser(prog: str, models: Sequence[str] | None) -> Parser:
    """The parser of ``train/train.py`` (``models`` to choose from) and ``train/alexnet.py``
    (``models=None``: the architecture is fixed). Defaults are ``None``: the config
    dataclass and the architecture's ``train_defaults`` own them."""
    from darekit.data import DATASETS
    from darekit.training import AUGMENTATIONS, HOLDOUTS, OPTIMIZERS, SCHEDULES

    p = Parser(prog=prog, description="Train a classifier on x_train (half of the training set), "
               "saving the weights after every epoch into <run-dir>/history/.")
    if models is not None:
        p.add_argument("--model", choices=list(models), default=None,
                       help="architecture (default vgg16)")
    p.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                   help="dataset (default cifar10)")
    p.add_argument("--epochs", type=positive_int, help="number of epochs (architecture default)")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=float, help="initial learning rate")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS))
    p.add_argument("--momentum", type=float)
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=list(SCHEDULES), help="learning-rate schedule")
    p.add_argument("--milestones", type=int_list, help="epochs where a step schedule decays, "
                   "e.g. 60,120,160")
    p.add_argument("--gamma", type=float, help="lr multiplier at each milestone")
    p.add_argument("--warmup-epochs", type=int, help="linear lr warm-up epochs")
    p.add_argument("--augment", choices=list(AUGMENTATIONS), help="data augmentation "
                   "(pad-4 random crop, horizontal flip; SVHN defaults to crop only)")
    p.add_argument("--seed", type=int, help="the run's one seed (default 0)")
    p.add_argument("--subset", type=positive_int, help="use a seeded class-balanced subset of "
                   "N training images before the 50/50 split (quick runs)")
    p.add_argument("--test-subset", type=positive_int,
                   help="evaluate each epoch on a class-balanced subset of N test images")
    p.add_argument("--holdout", choices=list(HOLDOUTS),
                   help="held-out set logged after every epoch (default test)")
    p.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the train step with XLA")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="deterministic TF ops (slower)")
    p.add_argument("--run-dir", help="run directory (default runs/<dataset>-<model>-s<seed>)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --run-dir from its last complete epoch")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), help="Keras progress output")
    return p


def train_main(argv: Sequence[str] | None, *, prog: str, models: Sequence[str] | None,
               model: str | None = None) -> int:
    """Entry point body of both training scripts."""
    args = train_parser(prog, models).parse_args(argv)

    def body() -> None:
        from darekit.training import TrainConfig, train

        given = vars(args)
        if model is not None:
            given["model"] = model
        cfg = TrainConfig.from_options(given)
        print(f"run directory: {train(cfg).path}")

    return run(body)
