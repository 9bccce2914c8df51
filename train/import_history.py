"""Import a Keras classifier trained elsewhere, with its per-epoch checkpoints, as a run.

    python train/import_history.py --model my.keras --history ckpts/ --dataset fashion_mnist
    python train/import_history.py --model my.keras --history ckpts/ --dataset cifar10 \
        --split split.npz --layers block5_relu3,fc1_relu --run-dir runs/cifar10-mine
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root: see README

from darekit.cli.importer import import_main  # noqa: E402


def main(argv=None) -> int:
    return import_main(argv, prog="train/import_history.py")


if __name__ == "__main__":
    raise SystemExit(main())
