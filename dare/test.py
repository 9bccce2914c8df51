"""Robustness evaluation of a run's classifiers under the five attacks.

    python dare/test.py --run-dir runs/fashion_mnist-alexnet-s0
    python dare/test.py --run-dir R1 --run-dir R2 --report report.md --n 500 --attack fgsm,cw
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root: see README

from darekit.cli.evaluate import main as evaluate_main  # noqa: E402


def main(argv=None) -> int:
    return evaluate_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
