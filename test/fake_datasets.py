"""Small synthetic datasets written in the exact official file formats and shapes.

CIFAR-10 as python pickles (``data_batch_1..5``, ``test_batch``), SVHN as ``*_32x32.mat``
(``X`` of shape (H, W, C, N), the digit 0 stored as 10), Fashion-MNIST as gzipped IDX files.
``test_data.py`` checks the readers on them; ``test_dry_run.py`` runs the whole study on them
(``write_fake_datasets`` + ``DAREKIT_DATA``).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import scipy.io

from darekit.data import DATASETS

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Writer = Callable[[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


# ------------------------------------------------------------------ writers of official formats
# Each takes NHWC uint8 images and 0..9 labels and writes them the way the official files do.

def write_cifar10(folder: Path, x_tr: np.ndarray, y_tr: np.ndarray,
                  x_te: np.ndarray, y_te: np.ndarray, protocol: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)

    def batch(path: Path, x: np.ndarray, y: np.ndarray) -> None:
        # Rows of 3072 bytes: the R plane, then G, then B, each 32x32 row-major.
        d = {b"batch_label": b"fake", b"labels": [int(v) for v in y],
             b"data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072), b"filenames": []}
        path.write_bytes(pickle.dumps(d, protocol=protocol))

    parts = zip(np.array_split(x_tr, 5), np.array_split(y_tr, 5), strict=True)
    for i, (xs, ys) in enumerate(parts, 1):
        batch(folder / f"data_batch_{i}", xs, ys)
    batch(folder / "test_batch", x_te, y_te)
    meta = {b"label_names": [n.encode() for n in DATASETS["cifar10"].class_names]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))


def write_svhn(folder: Path, x_tr: np.ndarray, y_tr: np.ndarray,
               x_te: np.ndarray, y_te: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for fname, x, y in (("train_32x32.mat", x_tr, y_tr), ("test_32x32.mat", x_te, y_te)):
        # X is (H, W, C, N); the digit 0 is stored as label 10, y is (N, 1).
        scipy.io.savemat(folder / fname, {"X": x.transpose(1, 2, 3, 0),
                                          "y": np.where(y == 0, 10, y).reshape(-1, 1)})


def idx_bytes(magic: int, dims: tuple[int, ...], payload: np.ndarray) -> bytes:
    """An IDX file's bytes: big-endian magic and dimensions, then the uint8 payload."""
    return struct.pack(f">{1 + len(dims)}i", magic, *dims) + payload.astype(np.uint8).tobytes()


def write_fashion_mnist(folder: Path, x_tr: np.ndarray, y_tr: np.ndarray,
                        x_te: np.ndarray, y_te: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, x, y in (("train", x_tr, y_tr), ("t10k", x_te, y_te)):
        n, h, w, _ = x.shape
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(idx_bytes(2051, (n, h, w), x)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(idx_bytes(2049, (n,), y)))


WRITERS: dict[str, tuple[Writer, tuple[int, int, int]]] = {
    "cifar10": (write_cifar10, (32, 32, 3)),
    "svhn": (write_svhn, (32, 32, 3)),
    "fashion_mnist": (write_fashion_mnist, (28, 28, 1)),
}
"""Dataset name -> (writer, the official image shape)."""


# ------------------------------------------------------------------ learnable synthetic data

def learnable_arrays(shape: tuple[int, int, int], n_train: int, n_test: int,
                     seed: int = 0) -> Arrays:
    """Balanced 10-class images: one colour per class plus pixel noise. A few training steps
    classify most images correctly (slicing profiles correctly classified images, mining needs
    inputs the model gets right), and crops and flips (the training augmentation) keep the
    class; the grey levels of a one-channel dataset are evenly spaced."""
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    colours = (np.linspace(30, 225, 10)[rng.permutation(10), None] if channels == 1 else
               rng.uniform(30, 225, (10, channels)))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 10
        x = colours[y][:, None, None, :] + rng.normal(0, 20, (n, *shape))
        return np.clip(np.rint(x), 0, 255).astype(np.uint8), y.astype(np.int64)

    return (*draw(n_train), *draw(n_test))


def write_fake_datasets(root: Path, names: Iterable[str] = tuple(WRITERS), n_train: int = 200,
                        n_test: int = 50, seed: int = 0) -> Path:
    """Write each dataset of ``names`` under ``root/<name>/`` (point ``DAREKIT_DATA`` at
    ``root``); returns ``root``."""
    for name in names:
        write, shape = WRITERS[name]
        write(Path(root) / name, *learnable_arrays(shape, n_train, n_test, seed))
    return Path(root)
