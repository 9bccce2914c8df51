"""Craft adversarial examples of a trained run with Foolbox 3: one file per attack.

    python adv/generate_adv.py --run-dir runs/cifar10-vgg16-s0   # all five, 5000 x_train
    python adv/generate_adv.py --run-dir R --attack fgsm,pgd --eps 0.01 --n 1000
    python adv/generate_adv.py --run-dir R --attack cw --split test --param steps=200
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root: see README

from darekit.cli.adv import generate_main  # noqa: E402


def main(argv=None) -> int:
    return generate_main(argv, prog="adv/generate_adv.py")


if __name__ == "__main__":
    raise SystemExit(main())
