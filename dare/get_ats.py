"""Stage 2: mine the training history over x_validation (ddmin) into regression data.

    python dare/get_ats.py --run-dir runs/cifar10-vgg16-s0
    python dare/get_ats.py --run-dir runs/fashion_mnist-alexnet-s0 --eps-mine 0.15
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root: see README

from darekit.cli.dare import get_ats_main  # noqa: E402


def main(argv=None) -> int:
    return get_ats_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
