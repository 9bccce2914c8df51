"""Reproduce the study on one dataset and architecture, end to end, resumably.

    python reproduce.py --dataset fashion_mnist --model alexnet --profile quick
    python reproduce.py --dataset cifar10 --model vgg16 --profile paper --pgd-at   # a GPU
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # repo root: see README

from darekit.cli.reproduce import main as reproduce_main  # noqa: E402


def main(argv=None) -> int:
    return reproduce_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
