"""DARE-SL: DARE without model transformation (cross-entropy on the same data).

    python dare/dare-sl.py --run-dir runs/cifar10-vgg16-s0 --lr 1e-7
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root: see README

from darekit.cli.dare import dare_main  # noqa: E402


def main(argv=None) -> int:
    return dare_main(argv, variant="dare-sl", prog="dare/dare-sl.py")


if __name__ == "__main__":
    raise SystemExit(main())
