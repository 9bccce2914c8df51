"""DARE-S: DARE without slicing (all neurons of the sliced layers).

    python dare/dare-s.py --run-dir runs/cifar10-vgg16-s0 --lr 1e-7
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root: see README

from darekit.cli.dare import dare_main  # noqa: E402


def main(argv=None) -> int:
    return dare_main(argv, variant="dare-s", prog="dare/dare-s.py")


if __name__ == "__main__":
    raise SystemExit(main())
