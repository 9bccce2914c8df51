"""``train/train.py`` and ``train/alexnet.py``: options generated from ``TrainConfig``."""

from __future__ import annotations

from collections.abc import Sequence

from darekit.cli import RESUME, Parser, parse_args, run


def train_parser(prog: str, fixed_model: str | None = None) -> Parser:
    """The parser of ``train/train.py`` (``--model`` to choose) and ``train/alexnet.py``
    (``fixed_model``: the architecture is fixed). Defaults and help live on ``TrainConfig``."""
    from darekit.config import add_options
    from darekit.training import TrainConfig

    p = Parser(prog=prog, description="Train a classifier on x_train (half of the training "
               "set), saving the weights after every epoch into <run-dir>/history/. Every "
               "option defaults to the architecture's schedule (the one meant to reach the "
               "paper's accuracy on a GPU).")
    add_options(p, TrainConfig, exclude=("model",) if fixed_model else (),
                architecture=fixed_model)
    return p


def train_main(argv: Sequence[str] | None, *, prog: str, model: str | None = None) -> int:
    """Entry point body of both training scripts."""
    args = parse_args(lambda: train_parser(prog, model), argv, prog)

    def body() -> None:
        from darekit.config import given
        from darekit.training import TrainConfig, train

        options = given(args, TrainConfig)
        if model is not None:
            options["model"] = model
        print(f"run directory: {train(TrainConfig.from_options(options)).path}")

    return run(body, RESUME)
