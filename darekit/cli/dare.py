"""Entry points of ``dare/``: nnslicer.py, get_ats.py, dare.py, dare-s.py and dare-sl.py.

Parsers take ``None`` defaults: ``SliceConfig``, ``MineConfig`` and ``DareConfig`` own them.
Options are validated (config construction) before the run is opened or any model loaded.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from darekit.cli import Parser, positive_int, run


def _given(args: argparse.Namespace, *drop: str) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if v is not None and k not in drop}


def _run_dir(p: Parser) -> None:
    p.add_argument("--run-dir", required=True,
                   help="a trained run (train/train.py) with its history; outputs go into it")


# --------------------------------------------------------------------------- nnslicer.py
def nnslicer_main(argv: Sequence[str] | None, prog: str = "dare/nnslicer.py") -> int:
    from darekit.slicing import MODES, REFERENCES, RELU_RULES

    p = Parser(prog=prog, description="Stage 1: NNSlicer contribution analysis; per class and "
               "sliced layer, the smallest set of neurons (channels) covering --per of the "
               "aggregated |contribution|. Writes <run-dir>/slice/.")
    _run_dir(p)
    p.add_argument("--per", type=float, help="fraction of |contribution| covered, in (0, 1] "
                   "(default 0.95; larger per, larger slice)")
    p.add_argument("--max-per-class", type=positive_int,
                   help="K correctly classified x_train images per class (default 200)")
    p.add_argument("--mode", choices=list(MODES),
                   help="exact NNSlicer analysis or gradient x delta (default exact)")
    p.add_argument("--eps", type=float, help="NNSlicer sum_precision_error (default 0.2)")
    p.add_argument("--bar", type=float, help="NNSlicer threshold_bar_ratio (default 0.01)")
    p.add_argument("--reference", choices=list(REFERENCES),
                   help="mean activations per class or over all classes (default class)")
    p.add_argument("--relu", choices=list(RELU_RULES),
                   help="ReLU passes contributions through or gates them (default pass)")
    p.add_argument("--batch-size", type=positive_int, help="images per batch (default 32)")
    p.add_argument("--seed", type=int, help="which K images are profiled (default 0)")
    args = p.parse_args(argv)

    def body() -> None:
        from darekit import layout
        from darekit.rundir import Run
        from darekit.slicing import SliceConfig, run_slicing

        cfg = SliceConfig(**_given(args, "run_dir"))
        r = Run.open(args.run_dir)
        result = run_slicing(r, cfg)
        for name, m in result.masks().items():
            print(f"{name}: slice sizes per class {m.sum(1).tolist()} of {m.shape[1]}")
        print(f"{result.images.sum()} images in {result.seconds:.1f}s "
              f"({result.images_per_second:.1f} images/s); summary {r.file(layout.SLICE_SUMMARY)}")

    return run(body)


# --------------------------------------------------------------------------- get_ats.py
def get_ats_main(argv: Sequence[str] | None, prog: str = "dare/get_ats.py") -> int:
    p = Parser(prog=prog, description="Stage 2: traverse the training history over "
               "x_validation, ddmin each failure-inducing perturbation to a 1-minimal patch "
               "set, and collect regression data (activation traces). Writes <run-dir>/ats/.")
    _run_dir(p)
    p.add_argument("--eps-mine", type=float, help="L-inf size of the historical directions "
                   "(default 0.15 Fashion-MNIST, 12/255 CIFAR-10 and SVHN)")
    p.add_argument("--patch", type=positive_int, help="patch side in pixels (default 4)")
    p.add_argument("--max-inputs", type=positive_int,
                   help="mine a seeded subset of N x_validation inputs (default all)")
    p.add_argument("--anchors", action=argparse.BooleanOptionalAction, default=None,
                   help="add each collected input's clean x as an anchor (default on)")
    p.add_argument("--batch-size", type=positive_int, help="images per model call (default 256)")
    p.add_argument("--seed", type=int, help="seeds the history shares (default 0)")
    p.add_argument("--order", choices=["gain", "grid"], help="order of the patches given to "
                   "ddmin: by M_E's first-order loss gain, or row-major (default gain)")
    args = p.parse_args(argv)

    def body() -> None:
        import json

        from darekit import layout
        from darekit.mining import MineConfig, run_mining
        from darekit.rundir import Run

        cfg = MineConfig(**_given(args, "run_dir"))
        r = Run.open(args.run_dir)
        result = run_mining(r, cfg)
        s = result.stats
        print(json.dumps({k: s[k] for k in ("inputs", "failures", "failure_rate", "collected",
                                             "model_queries_per_input")}))
        print(f"|S*| {s['s_star_size']}; statistics {r.file(layout.MINED_STATS)}")

    return run(body)


# --------------------------------------------------------------------------- dare*.py
def dare_main(argv: Sequence[str] | None, variant: str, prog: str) -> int:
    """Entry point of ``dare/dare.py``, ``dare/dare-s.py`` and ``dare/dare-sl.py``."""
    from darekit.dare import VARIANTS

    p = Parser(prog=prog, description=f"Stage 3 ({variant}): {VARIANTS[variant].summary}. "
               f"Saves <run-dir>/models/{variant}.weights.h5 and logs to <run-dir>/dare/.")
    _run_dir(p)
    p.add_argument("--lr", type=float, help="SGD learning rate (default by architecture: "
                   "1e-7 VGG, 1e-3 AlexNet)")
    p.add_argument("--epochs", type=positive_int, help="fine-tuning epochs (default 5)")
    p.add_argument("--batch-size", type=positive_int, help="batch size (default 32)")
    p.add_argument("--seed", type=int, help="shuffling seed (default 0)")
    p.add_argument("--min-rel-change", type=float,
                   help="largest relative weight change below which the weights 'did not "
                        "move' (default 1e-6)")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), help="Keras output (default 2)")
    args = p.parse_args(argv)

    def body() -> None:
        from darekit.dare import DareConfig, run_dare
        from darekit.rundir import Run

        from darekit.errors import DareError

        cfg = DareConfig(variant=variant, **_given(args, "run_dir"))
        res = run_dare(Run.open(args.run_dir), cfg)
        if res.status == "diverged":
            raise DareError(f"{variant} diverged at lr {res.summary['lr']:g} (the weights "
                            f"became NaN/inf; log {res.summary['log']}); nothing was saved. "
                            "Try a smaller --lr.")

    return run(body)
