"""PGD adversarial training from scratch (Madry et al.), as seed 000 (``adv_training.py``) does it.

    python adv/adv_training.py                                                 # ResNet18, CIFAR-10
    python adv/adv_training.py --model smallcnn --dataset fashion_mnist --subset 2000 --epochs 5
    python adv/adv_training.py --run-dir runs/cifar10-resnet18-pgdat-s0 --resume
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root: see README

from darekit.cli.adv import adv_training_main  # noqa: E402


def main(argv=None) -> int:
    return adv_training_main(argv, prog="adv/adv_training.py")


if __name__ == "__main__":
    raise SystemExit(main())
