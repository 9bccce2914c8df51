"""Stage 1: NNSlicer slices of a trained run (per class, per sliced layer).

    python dare/nnslicer.py --run-dir runs/cifar10-vgg16-s0 --per 0.95
    python dare/nnslicer.py --run-dir runs/cifar10-vgg16-s0 --mode approx
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root: see README

from darekit.cli.dare import nnslicer_main  # noqa: E402


def main(argv=None) -> int:
    return nnslicer_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
