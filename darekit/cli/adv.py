"""``adv/generate_adv.py``, ``adv/fintune_adv.py`` and ``adv/adv_training.py``.

Every option is checked (unknown attack, bad epsilon, missing run or adversarial set) before
any model is loaded or attacked. Heavy imports (TensorFlow, Foolbox) happen inside ``body``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from darekit.cli import Parser, int_list, positive_int, run


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
    from darekit.advsets import SPLITS
    from darekit.attacks import ATTACKS, DEFAULT_ATTACKS

    lines = [f"  {s.name:9s} {s.norm:4s} {s.kind:12s} {s.doc}; params {dict(s.defaults)}"
             for s in ATTACKS.values()]
    p = Parser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Craft adversarial examples of a trained run's images with Foolbox 3, "
               "one file per attack: <run>/adv/<split>-<attack>.npz (+ .json: configuration and "
               "summary). Resumable: finished chunks under <run>/adv/parts/ are kept.",
               epilog="attacks (name, norm, kind, defaults):\n" + "\n".join(lines) +
               "\ndefault L-inf budget: 0.1 Fashion-MNIST, 8/255 CIFAR-10 and SVHN; "
               "C&W and DeepFool: minimal perturbation (unclipped) unless --eps is given.")
    p.add_argument("--run-dir", required=True, help="the trained run")
    p.add_argument("--attack", action="append", default=None, metavar="NAME",
                   help="attack to run (repeatable or comma-separated; 'all' = "
                   f"{','.join(DEFAULT_ATTACKS)}; default all)")
    p.add_argument("--split", choices=list(SPLITS), help="images to attack (default train: "
                   "the run's x_train, as the DARE artifact does)")
    p.add_argument("--n", type=positive_int, help="number of images, a seeded class-balanced "
                   "sample (default 5000; all of them if the split has fewer)")
    p.add_argument("--eps", type=float, help="budget in each attack's norm (default per dataset)")
    p.add_argument("--param", type=_param, action="append", default=None, metavar="KEY=VALUE",
                   help="override an attack parameter (e.g. steps=40), for every selected "
                   "attack that takes it")
    p.add_argument("--seed", type=int, help="image sample and random starts (default: the run's)")
    p.add_argument("--batch-size", type=positive_int, help="images per attack call (default 256)")
    p.add_argument("--chunk-size", type=positive_int,
                   help="images per resumable chunk (default 1000)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bars (default on)")
    return p


def generate_main(argv: Sequence[str] | None = None, *, prog: str = "adv/generate_adv.py") -> int:
    args = generate_parser(prog).parse_args(argv)

    def body() -> None:
        from darekit.advsets import GenerateConfig, generate
        from darekit.attacks import DEFAULT_ATTACKS
        from darekit.rundir import Run

        given = {k: v for k, v in vars(args).items() if v is not None and k != "run_dir"}
        given["attacks"] = given.pop("attack", DEFAULT_ATTACKS)
        given["params"] = dict(given.pop("param", []))
        cfg = GenerateConfig(**given)
        r = Run.open(args.run_dir)
        for attack in cfg.attacks:
            print(f"{attack}: {generate(r, cfg, attack)}")

    return run(body)


# ---------------------------------------------------------------------------- fintune_adv
def finetune_parser(prog: str) -> Parser:
    p = Parser(prog=prog, description="Adversarial fine-tuning baseline: fine-tune the run's "
               "classifier with cross-entropy on an attack's adversarial x_train "
               "(<run>/adv/train-<attack>.npz, made by adv/generate_adv.py) with true labels; "
               "saves <run>/models/adv-<attack>.weights.h5 and logs/adv-<attack>.{csv,json}.")
    p.add_argument("--run-dir", required=True, help="the trained run")
    p.add_argument("--attack", action="append", default=None, metavar="NAME",
                   help="one baseline per attack (repeatable, comma-separated or 'all'; "
                   "default all)")
    p.add_argument("--epochs", type=positive_int, help="default 5 (as DARE-SL)")
    p.add_argument("--batch-size", type=positive_int, help="default 32 (as DARE-SL)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3, every architecture)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), help="default sgd")
    p.add_argument("--momentum", type=float, help="SGD momentum (default 0)")
    p.add_argument("--mix-clean", type=float, help="fraction of clean originals to add "
                   "(0..1, default 0)")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), help="Keras progress output")
    return p


def finetune_main(argv: Sequence[str] | None = None, *, prog: str = "adv/fintune_adv.py") -> int:
    args = finetune_parser(prog).parse_args(argv)

    def body() -> None:
        from darekit.adv_finetune import ADV_FT_LR, AdvFinetuneConfig, adv_finetune
        from darekit.advsets import adv_path
        from darekit.attacks import DEFAULT_ATTACKS, parse_attacks
        from darekit.errors import DareError
        from darekit.finetune import FinetuneConfig
        from darekit.rundir import Run

        attacks = parse_attacks(args.attack or DEFAULT_ATTACKS)
        ft = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "optimizer",
                                            "momentum", "seed") if getattr(args, k) is not None}
        cfg = AdvFinetuneConfig(FinetuneConfig(**{"lr": ADV_FT_LR, **ft}),
                                **({} if args.mix_clean is None else
                                   {"mix_clean": args.mix_clean}))
        r = Run.open(args.run_dir)
        missing = [a for a in attacks if not adv_path(r, "train", a).is_file()]
        if missing:
            raise DareError(f"no adversarial x_train for {missing} in {r.path}/adv/; make them "
                            f"with python adv/generate_adv.py --run-dir {r.path} --attack "
                            + ",".join(missing))
        for attack in attacks:
            _, rows = adv_finetune(r, attack, cfg, verbose=1 if args.verbose is None
                                   else args.verbose)
            last = rows[-1]
            print(f"adv-{attack}: validation {last['validation_accuracy']:.4f}, "
                  f"test {last['test_accuracy']:.4f} -> {r.model_path(f'adv-{attack}')}")

    return run(body)


# ---------------------------------------------------------------------------- adv_training
def adv_training_parser(prog: str) -> Parser:
    from darekit.data import DATASETS
    from darekit.models import ARCHITECTURES
    from darekit.training import AUGMENTATIONS

    p = Parser(prog=prog, description="PGD adversarial training from scratch (Madry et al.), "
               "as seed 000: L-inf PGD, 7 steps of eps/4 from a random start, SGD 0.1 momentum "
               "0.9, weight decay 2e-4, batch 128, lr /10 at epochs 100 and 150, 200 epochs, "
               "crop+flip. Standard and robust test accuracy after every epoch in "
               "<run>/train_log.csv; weights after every epoch in <run>/history/.")
    p.add_argument("--model", choices=sorted(ARCHITECTURES), help="default resnet18")
    p.add_argument("--dataset", choices=sorted(DATASETS), help="default cifar10")
    p.add_argument("--eps", type=float, help="L-inf budget (default 8/255; 0.1 Fashion-MNIST)")
    p.add_argument("--steps", type=positive_int, help="PGD steps (default 7)")
    p.add_argument("--step-size", type=float, help="PGD step (default eps/4 = 2/255 at 8/255)")
    p.add_argument("--random-start", action=argparse.BooleanOptionalAction, default=None,
                   help="uniform random start in the eps-ball (default on)")
    p.add_argument("--epochs", type=positive_int, help="default 200")
    p.add_argument("--batch-size", type=positive_int, help="default 128")
    p.add_argument("--lr", type=float, help="default 0.1")
    p.add_argument("--momentum", type=float, help="default 0.9")
    p.add_argument("--weight-decay", type=float, help="default 2e-4")
    p.add_argument("--milestones", type=int_list, help="lr /10 at these epochs (default 100,150)")
    p.add_argument("--gamma", type=float, help="lr multiplier at each milestone (default 0.1)")
    p.add_argument("--augment", choices=list(AUGMENTATIONS),
                   help="default crop-flip (crop for SVHN)")
    p.add_argument("--subset", type=positive_int, help="seeded class-balanced subset of N "
                   "training images before the 50/50 split (quick runs)")
    p.add_argument("--test-subset", type=positive_int,
                   help="evaluate each epoch on a class-balanced subset of N test images")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--run-dir", help="default runs/<dataset>-<model>-pgdat-s<seed>")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --run-dir from its last complete epoch")
    p.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the train step (attack included) with XLA")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), help="Keras progress output")
    return p


def adv_training_main(argv: Sequence[str] | None = None, *,
                      prog: str = "adv/adv_training.py") -> int:
    args = adv_training_parser(prog).parse_args(argv)

    def body() -> None:
        from darekit.adv_training import AdvTrainConfig, adv_train

        cfg = AdvTrainConfig.from_options(vars(args))
        print(f"run directory: {adv_train(cfg).path}")

    return run(body)
