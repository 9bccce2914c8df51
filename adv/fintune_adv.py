"""Adversarial fine-tuning baseline: one fine-tuned classifier per attack (``adv-<attack>``).

    python adv/fintune_adv.py --run-dir runs/cifar10-vgg16-s0                  # every attack
    python adv/fintune_adv.py --run-dir R --attack fgsm --mix-clean 0.5 --lr 1e-3
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root: see README

from darekit.cli.adv import finetune_main  # noqa: E402


def main(argv=None) -> int:
    return finetune_main(argv, prog="adv/fintune_adv.py")


if __name__ == "__main__":
    raise SystemExit(main())
