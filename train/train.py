"""Train VGG16 / VGG19 / ResNet18 with a saved history (the weights after every epoch).

    python train/train.py --model vgg16 --dataset cifar10
    python train/train.py --model vgg16 --dataset fashion_mnist --subset 2000 --epochs 3
    python train/train.py --run-dir runs/cifar10-vgg16-s0 --resume
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root: see README

from darekit.cli.train import train_main  # noqa: E402


def main(argv=None) -> int:
    return train_main(argv, prog="train/train.py")


if __name__ == "__main__":
    raise SystemExit(main())
