"""Train AlexNet with a saved history (the weights after every epoch).

    python train/alexnet.py --dataset cifar10
    python train/alexnet.py --dataset fashion_mnist --subset 2000 --epochs 3
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root: see README

from darekit.cli.train import train_main  # noqa: E402


def main(argv=None) -> int:
    return train_main(argv, prog="train/alexnet.py", model="alexnet")


if __name__ == "__main__":
    raise SystemExit(main())
