"""``adv/generate_adv.py``, ``adv/fintune_adv.py`` and ``adv/adv_training.py``.

Options are generated from the config dataclasses (``GenerateConfig``, ``FinetuneConfig``,
``AdvFinetuneConfig``, ``TrainConfig`` and ``PGDConfig``), which own the defaults and the help.
Every option is checked (unknown attack, bad epsilon, missing run or adversarial set) before
any model is loaded or attacked. Without ``--run-dir`` the scripts that need a trained run use
the most recent one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from darekit.cli import (
    RERUN,
    RESUME,
    START_OVER,
    Parser,
    parse_args,
    resolve_run,
    run,
    run_dir_option,
)


def _param(s: str) -> tuple[str, Any]:
    """``steps=40`` -> ``("steps", 40)``; the value is JSON (``true``, ``0.5``...) or a string."""
    key, eq, value = s.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, received {s!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


# ---------------------------------------------------------------------------- generate_adv
def generate_parser(prog: str) -> Parser:
    from darekit.advsets import GenerateConfig
    from darekit.attacks import ATTACKS
    from darekit.config import add_options

    lines = [f"  {s.name:9s} {s.norm:4s} {s.kind:12s} {s.doc}; params {dict(s.defaults)}"
             for s in ATTACKS.values()]
    p = Parser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Craft adversarial examples of a trained run's images with Foolbox 3, "
               "one file per attack: <run>/adv/<split>-<attack>.npz (+ .json: configuration and "
               "summary). Resumable: finished chunks under <run>/adv/parts/ are kept.",
               epilog="attacks (name, norm, kind, defaults):\n" + "\n".join(lines))
    run_dir_option(p)
    add_options(p, GenerateConfig)
    p.add_argument("--param", type=_param, action="append", default=None, metavar="KEY=VALUE",
                   help="override an attack parameter (e.g. steps=40), for every selected "
                   "attack that takes it")
    return p


def generate_main(argv: Sequence[str] | None = None, *, prog: str = "adv/generate_adv.py") -> int:
    args = parse_args(lambda: generate_parser(prog), argv, prog)

    def body() -> None:
        from darekit.advsets import GenerateConfig, generate
        from darekit.config import from_args

        cfg = from_args(GenerateConfig, args, params=dict(args.param or []))
        r = resolve_run(args.run_dir)
        for attack in cfg.attacks:
            print(f"{attack}: {generate(r, cfg, attack)}")

    return run(body, RERUN)


# ---------------------------------------------------------------------------- fintune_adv
def finetune_parser(prog: str) -> Parser:
    from darekit.adv_finetune import AdvFinetuneConfig
    from darekit.config import add_options
    from darekit.finetune import FinetuneConfig

    p = Parser(prog=prog, description="Adversarial fine-tuning baseline: fine-tune the run's "
               "classifier with cross-entropy on an attack's adversarial x_train "
               "(<run>/adv/train-<attack>.npz, made by adv/generate_adv.py) with true labels; "
               "saves <run>/models/adv-<attack>.weights.h5 (and .keras) and "
               "logs/adv-<attack>.{csv,json}.")
    run_dir_option(p)
    p.add_argument("--attack", action="append", default=None, metavar="NAME",
                   help="one baseline per attack (repeatable, comma-separated or 'all'; "
                   "default all)")
    add_options(p, FinetuneConfig)
    add_options(p, AdvFinetuneConfig)
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                   help="Keras progress output (default: 1)")
    return p


def finetune_main(argv: Sequence[str] | None = None, *, prog: str = "adv/fintune_adv.py") -> int:
    args = parse_args(lambda: finetune_parser(prog), argv, prog)

    def body() -> None:
        from darekit.adv_finetune import AdvFinetuneConfig, adv_finetune
        from darekit.advsets import adv_path
        from darekit.attacks import DEFAULT_ATTACKS, parse_attacks
        from darekit.config import from_args
        from darekit.errors import DareError
        from darekit.finetune import FinetuneConfig

        attacks = parse_attacks(args.attack or DEFAULT_ATTACKS)
        cfg = from_args(AdvFinetuneConfig, args, finetune=from_args(FinetuneConfig, args))
        r = resolve_run(args.run_dir)
        missing = [a for a in attacks if not adv_path(r, "train", a).is_file()]
        if missing:
            raise DareError(f"no adversarial x_train for {missing} in {r.path}/adv/; make them "
                            f"with python adv/generate_adv.py --run-dir {r.path} --attack "
                            + ",".join(missing))
        for attack in attacks:
            _, rows = adv_finetune(r, attack, cfg, verbose=args.verbose)
            if f"adv-{attack}" in r.diverged_models():
                raise DareError(f"adv-{attack} diverged at lr {cfg.finetune.lr:g} (the weights "
                                "became NaN/inf); nothing was saved. Try a smaller --lr.")
            last = rows[-1]
            print(f"adv-{attack}: validation {last['validation_accuracy']:.4f}, "
                  f"test {last['test_accuracy']:.4f} -> {r.model_path(f'adv-{attack}')}")

    return run(body, START_OVER)


# ---------------------------------------------------------------------------- adv_training
def adv_training_parser(prog: str) -> Parser:
    from darekit.adv_training import ADV_TRAIN_DEFAULTS, MADRY_TRAIN, PGDConfig
    from darekit.config import add_options
    from darekit.training import TrainConfig

    p = Parser(prog=prog, description="PGD adversarial training from scratch (Madry et al.), "
               "as seed 000: L-inf PGD, 7 steps of eps/4 from a random start, Madry's training "
               "recipe. Standard and robust test accuracy after every epoch in "
               "<run>/train_log.csv; weights after every epoch in <run>/history/.")
    add_options(p, TrainConfig, defaults={**MADRY_TRAIN, **ADV_TRAIN_DEFAULTS})
    add_options(p, PGDConfig)
    return p


def adv_training_main(argv: Sequence[str] | None = None, *,
                      prog: str = "adv/adv_training.py") -> int:
    args = parse_args(lambda: adv_training_parser(prog), argv, prog)

    def body() -> None:
        from darekit.adv_training import AdvTrainConfig, adv_train

        cfg = AdvTrainConfig.from_options(vars(args))
        print(f"run directory: {adv_train(cfg).path}")

    return run(body, RESUME)
