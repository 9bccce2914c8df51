"""Datasets (CIFAR-10, SVHN, Fashion-MNIST) from their official files, and seeded splits.

Every dataset comes out the same way: pixels float32 in [0, 1], NHWC; labels int64 in
``[0, num_classes)``. Files are looked up in ``data_dir()/<name>/`` first, then in a system
location (Debian's ``dataset-fashion-mnist`` package), and only then downloaded online
(unless ``DAREKIT_OFFLINE=1``). See ``data/README.md``.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from darekit import io, paths
from darekit.errors import DareError

RawArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""``(x_train, y_train, x_test, y_test)``: uint8 NHWC images and integer labels, as read."""


class DatasetNotFound(DareError):
    """No folder holds the dataset's files and the online download is off or failed."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing array fields has no single truth value
class Dataset:
    """A loaded dataset; the arrays are read-only (they may be shared by an in-process cache)."""

    name: str
    x_train: np.ndarray  # (N, H, W, C) float32 in [0, 1]
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray  # (M, H, W, C) float32 in [0, 1]
    y_test: np.ndarray  # (M,) int64
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        h, w, c = self.x_train.shape[1:]
        return (int(h), int(w), int(c))


@dataclass(frozen=True)
class DatasetSpec:
    """One registry entry: where a dataset's official files live and how to read them."""

    name: str
    files: tuple[str, ...]  # official file names that must all be present in one folder
    system_dirs: tuple[Path, ...]  # searched after data_dir()/<name>
    read: Callable[[Path], RawArrays]  # folder holding ``files`` -> raw arrays
    download: Callable[[], RawArrays] | None  # online fallback; None: there is none
    class_names: tuple[str, ...]
    how_to_get: str  # one sentence for the error message
    # Threat model: the budgets at which robust accuracy is reported, by norm, and the
    # training budget of PGD adversarial training (the L-inf one). method.md: L-inf 0.1 on
    # Fashion-MNIST, 8/255 (= 0.031373, not 0.031) on CIFAR-10 and SVHN; L2 1.5 and 0.5
    # (RobustBench's CIFAR-10 L2 threat model; 1.5 is common for MNIST-like data).
    linf_budget: float
    l2_budget: float
    # Horizontal flips change the meaning of digits: SVHN trains without them.
    flip_safe: bool
    # Sub-folders of each searched folder that may hold the files too ("" is the folder
    # itself): the CIFAR tarball extracts to cifar-10-batches-py/.
    subdirs: tuple[str, ...] = ("",)

    MINING_FACTOR = 1.5
    """Decision (method.md, Stage 2): the mining epsilon is 1.5x the L-inf budget."""

    def budget(self, norm: str) -> float:
        """The robust-accuracy budget in ``norm`` (``linf`` or ``l2``)."""
        try:
            return {"linf": self.linf_budget, "l2": self.l2_budget}[norm]
        except KeyError:
            raise DareError(f"no {norm!r} budget; norms are linf and l2") from None

    @property
    def mining_eps(self) -> float:
        """L-inf size of the historical models' directions in Stage 2."""
        # rounded: 1.5 * 0.1 is 0.15000000000000002, and the recorded config should say 0.15
        return round(self.MINING_FACTOR * self.linf_budget, 12)


# --------------------------------------------------------------------------- file readers


def _corrupt(path: Path, why: str) -> DareError:
    return DareError(f"corrupt dataset file {path}: {why} (delete it and get it again)")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a dataset file must not be able to run code."""

    _ALLOWED = {
        # Python 3 writes an array's raw bytes at protocol <= 2 as _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch -> images (n, 32, 32, 3) uint8, labels (n,) int64."""
    try:
        with open(path, "rb") as f:
            # The official pickles were written by Python 2: bytes keys, hence encoding="bytes".
            d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:  # any unpickling/KeyError/shape problem means the file is bad
        raise _corrupt(path, f"{type(e).__name__}: {e}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise _corrupt(path, f"data {data.shape} / labels {labels.shape}, "
                             "expected (n, 3072) / (n,)")
    # Each row is three 32x32 channel planes (R, G, B), row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_cifar10(folder: Path) -> RawArrays:
    parts = [_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _cifar_batch(folder / "test_batch")
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            x_test, y_test)


def _svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN ``*_32x32.mat`` -> images (n, 32, 32, 3) uint8, labels (n,) int64 in 0..9."""
    import scipy.io  # only SVHN needs scipy; keep `import darekit.data` light

    try:
        m = scipy.io.loadmat(path, variable_names=("X", "y"))
        x, y = np.asarray(m["X"]), np.asarray(m["y"], dtype=np.int64).reshape(-1)
    except Exception as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise _corrupt(path, f"X {x.dtype}{x.shape} / y {y.shape}, "
                             "expected uint8 (32, 32, 3, n) / (n, 1)")
    # The .mat stores (H, W, C, N); the digit 0 is labelled 10.
    return x.transpose(3, 0, 1, 2), np.where(y == 10, 0, y)


def _read_svhn(folder: Path) -> RawArrays:
    return (*_svhn_mat(folder / "train_32x32.mat"), *_svhn_mat(folder / "test_32x32.mat"))


def _idx_gz(path: Path, magic: int, header_ints: int) -> tuple[tuple[int, ...], np.ndarray]:
    """Read a gzipped IDX file -> (dims from the header, flat uint8 payload)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; truncation is EOFError
        raise _corrupt(path, f"{type(e).__name__}: {e}") from None
    header = 4 * header_ints
    if len(raw) < header:
        raise _corrupt(path, "shorter than its IDX header")
    found, *dims = struct.unpack(f">{header_ints}i", raw[:header])
    if found != magic:
        raise _corrupt(path, f"IDX magic number {found}, expected {magic}")
    payload = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if payload.size != int(np.prod(dims)):
        raise _corrupt(path, f"{payload.size} data bytes, header says {'x'.join(map(str, dims))}")
    return tuple(dims), payload


def _idx_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """``<prefix>-images-idx3-ubyte.gz`` + labels -> images (n, rows, cols, 1), labels (n,)."""
    images = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels = folder / f"{prefix}-labels-idx1-ubyte.gz"
    (n, rows, cols), x = _idx_gz(images, 2051, 4)
    (m,), y = _idx_gz(labels, 2049, 2)
    if n != m:
        raise _corrupt(labels, f"{m} labels for {n} images in {images.name}")
    return x.reshape(n, rows, cols, 1), y.astype(np.int64)


def _read_fashion_mnist(folder: Path) -> RawArrays:
    return (*_idx_pair(folder, "train"), *_idx_pair(folder, "t10k"))


# --------------------------------------------------------------------------- downloaders


def _from_keras(load_data: Callable[[], Any]) -> RawArrays:
    """Keras' ``load_data()`` -> raw arrays (it returns y as (N, 1) and may be channels-first)."""
    (x_train, y_train), (x_test, y_test) = load_data()

    def nhwc(x: np.ndarray) -> np.ndarray:
        if x.ndim == 3:  # grayscale (N, H, W)
            return x[..., None]
        # image_data_format() == "channels_first" gives (N, C, H, W).
        return x.transpose(0, 2, 3, 1) if x.shape[1] in (1, 3) and x.shape[3] not in (1, 3) else x

    return nhwc(x_train), y_train.reshape(-1), nhwc(x_test), y_test.reshape(-1)


def _download_cifar10() -> RawArrays:
    import keras  # imported lazily: TensorFlow takes seconds to import

    return _from_keras(keras.datasets.cifar10.load_data)


def _download_fashion_mnist() -> RawArrays:
    import keras

    return _from_keras(keras.datasets.fashion_mnist.load_data)


SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
# MD5 of the official files, so that a truncated or substituted download is refused.
_SVHN_MD5 = {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
             "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}


def _download_svhn() -> RawArrays:
    import keras

    folder = paths.data_dir() / "svhn"
    for fname, md5 in _SVHN_MD5.items():
        # An absolute cache_subdir makes get_file save right there, i.e. where we look first.
        keras.utils.get_file(fname=fname, origin=SVHN_URL + fname, file_hash=md5,
                             cache_subdir=str(folder.resolve()))
    return _read_svhn(folder)


# --------------------------------------------------------------------------- registry

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the four official files."""

DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        name="cifar10",
        files=tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
        system_dirs=(),
        read=_read_cifar10,
        download=_download_cifar10,
        class_names=("airplane", "automobile", "bird", "cat", "deer",
                     "dog", "frog", "horse", "ship", "truck"),
        how_to_get="official files: https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
                   "(extract it there)",
        linf_budget=8 / 255, l2_budget=0.5, flip_safe=True,
        subdirs=("cifar-10-batches-py", ""),
    ),
    "svhn": DatasetSpec(
        name="svhn",
        files=("train_32x32.mat", "test_32x32.mat"),
        system_dirs=(),
        read=_read_svhn,
        download=_download_svhn,
        class_names=tuple(str(d) for d in range(10)),
        how_to_get=f"official files (format 2, cropped digits): {SVHN_URL}",
        linf_budget=8 / 255, l2_budget=0.5, flip_safe=False,
    ),
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        files=("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
        system_dirs=(FASHION_MNIST_SYSTEM_DIR,),
        read=_read_fashion_mnist,
        download=_download_fashion_mnist,
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        how_to_get="or apt-get install dataset-fashion-mnist; official files: "
                   "https://github.com/zalandoresearch/fashion-mnist",
        linf_budget=0.1, l2_budget=1.5, flip_safe=True,
    ),
}


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry of ``name``; an unknown name is a ``DareError``."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DareError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}") from None


def budgets_text() -> str:
    """The datasets' budgets in words (for help texts): ``cifar10 L-inf 0.03137 / L2 0.5, ...``."""
    return "the dataset's: " + ", ".join(f"{n} L-inf {s.linf_budget:.4g} / L2 {s.l2_budget:g}"
                                         for n, s in sorted(DATASETS.items()))


# --------------------------------------------------------------------------- loading


def _candidate_folders(spec: DatasetSpec) -> Iterator[Path]:
    for base in (paths.data_dir() / spec.name, *spec.system_dirs):
        for sub in spec.subdirs:
            yield base / sub if sub else base


def _find_folder(spec: DatasetSpec) -> Path | None:
    for folder in _candidate_folders(spec):
        if all((folder / f).is_file() for f in spec.files):
            return folder
    return None


def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view of a read-only base: a caller cannot flip the flag back on a view."""
    a.flags.writeable = False
    v = a.view()
    v.flags.writeable = False
    return v


def _to_dataset(spec: DatasetSpec, raw: RawArrays, origin: str) -> Dataset:
    """Validate raw arrays and convert them: uint8 -> float32 / 255 (one allocation each)."""
    x_train, y_train, x_test, y_test = (np.asarray(a) for a in raw)
    k = len(spec.class_names)
    for x, y, part in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if x.dtype != np.uint8 or x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise DareError(f"{spec.name} from {origin}: {part} images {x.dtype}{x.shape} and "
                            f"labels {y.shape} are not uint8 (N, H, W, C) and (N,)")
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise DareError(f"{spec.name} from {origin}: {part} labels outside 0..{k - 1}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DareError(f"{spec.name} from {origin}: train images {x_train.shape[1:]} but "
                        f"test images {x_test.shape[1:]}")

    def pixels(x: np.ndarray) -> np.ndarray:
        return _read_only(np.divide(x, 255, dtype=np.float32))

    def labels(y: np.ndarray) -> np.ndarray:
        return _read_only(y.astype(np.int64))

    return Dataset(spec.name, pixels(x_train), labels(y_train), pixels(x_test), labels(y_test),
                   spec.class_names)


# Small: a training process loads one dataset; CIFAR-10 alone is ~0.7 GB as float32.
@functools.lru_cache(maxsize=2)
def _load_folder(name: str, folder: Path, stamp: tuple[tuple[int, int], ...]) -> Dataset:
    # `stamp` (size, mtime of each file) is only part of the cache key: a replaced file reloads.
    spec = DATASETS[name]
    return _to_dataset(spec, spec.read(folder), str(folder))


@functools.lru_cache(maxsize=2)
def _load_download(name: str) -> Dataset:
    spec = DATASETS[name]
    assert spec.download is not None
    return _to_dataset(spec, spec.download(), "the online download")


def _offline() -> bool:
    return os.environ.get("DAREKIT_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    reason = f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
    return reason if len(reason) <= 160 else reason[:157] + "..."


def load_dataset(name: str, *, download: bool | None = None) -> Dataset:
    """Load ``name`` (a key of ``DATASETS``): local folder, system folder, then online.

    ``download=None`` allows the online download unless ``DAREKIT_OFFLINE=1``. Raises
    ``DatasetNotFound`` with what to put where, or ``DareError`` for a corrupt file.
    """
    spec = dataset_spec(name)

    folder = _find_folder(spec)
    if folder is not None:
        stamp = tuple((s.st_size, s.st_mtime_ns)
                      for s in ((folder / f).stat() for f in spec.files))
        return _load_folder(name, folder.resolve(), stamp)

    if download is None:
        download = not _offline()
    if spec.download is None:
        online = "no online download for it"
    elif not download:
        online = "online download is off (DAREKIT_OFFLINE=1 or download=False)"
    else:
        try:
            return _load_download(name)
        except DareError:
            raise  # e.g. the downloaded file is corrupt: that message is already precise
        except Exception as e:  # network, HTTP, hash, disk... the user needs one line, not a trace
            online = f"online download failed: {_short(e)}"
    raise DatasetNotFound(
        f"{name} not found: put {', '.join(spec.files)} in {paths.data_dir() / name} "
        f"({spec.how_to_get}); {online}")


# --------------------------------------------------------------------------- splits


def _labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DareError(f"labels must be a 1-D integer array, got {y.dtype}{y.shape}")
    return y


def _check_seed(seed: int) -> int:
    if int(seed) < 0:
        raise DareError(f"seed must be >= 0, got {seed}")
    return int(seed)


def balanced_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Pick ``n`` indices of ``y`` (N,): ``n // K`` per class, the remainder one each to the
    first classes (in sorted label order), chosen at random with ``seed``.

    Returns sorted int64 indices (n,). Raises DareError when a class has too few samples.
    """
    y = _labels(y)
    classes = np.unique(y)
    if not 1 <= n <= len(y):
        raise DareError(f"subset size must be in 1..{len(y)}, got {n}")
    rng = np.random.default_rng(_check_seed(seed))
    per, extra = divmod(int(n), len(classes))
    picked = []
    for i, c in enumerate(classes):
        members = np.flatnonzero(y == c)
        want = per + (i < extra)
        if want > len(members):
            raise DareError(f"subset of {n} needs {want} samples of class {c}, "
                            f"only {len(members)} exist")
        picked.append(rng.choice(members, size=want, replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


@dataclass(frozen=True, eq=False)
class Split:
    """Seeded division of the original training set into x_train and x_validation.

    Both arrays hold sorted int64 indices into the ORIGINAL training set; they are disjoint.
    """

    train_idx: np.ndarray  # (n_train,) -> x_train
    validation_idx: np.ndarray  # (n_validation,) -> x_validation
    seed: int
    subset: int | None  # size of the class-balanced subset split, None: the whole set

    def __post_init__(self) -> None:
        # Private read-only copies: a caller's later edits cannot change a saved split.
        for field in ("train_idx", "validation_idx"):
            a = np.array(getattr(self, field), dtype=np.int64)
            a.flags.writeable = False
            object.__setattr__(self, field, a)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Split):
            return NotImplemented
        return (self.seed == other.seed and self.subset == other.subset
                and np.array_equal(self.train_idx, other.train_idx)
                and np.array_equal(self.validation_idx, other.validation_idx))

    __hash__ = None  # type: ignore[assignment]  # mutable-looking arrays: not a dict key

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` atomically (``subset`` None is stored as -1)."""
        io.write_npz(path, train_idx=self.train_idx, validation_idx=self.validation_idx,
                     seed=np.int64(self.seed),
                     subset=np.int64(-1 if self.subset is None else self.subset))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Split:
        try:
            z = io.read_npz(path)
            subset = int(z["subset"])
            return cls(train_idx=z["train_idx"], validation_idx=z["validation_idx"],
                       seed=int(z["seed"]), subset=None if subset < 0 else subset)
        except FileNotFoundError:
            raise DareError(f"split file not found: {path}") from None
        except Exception as e:  # bad zip, missing key, wrong dtype
            raise DareError(f"corrupt split file {path}: {_short(e)}") from None


def make_split(y: np.ndarray, seed: int, subset: int | None = None) -> Split:
    """Split the training labels ``y`` (N,) 50/50 per class, seeded.

    With ``subset``, first keep a class-balanced subset of that many images
    (``balanced_subset``). An odd class count gives the extra image to x_train.
    """
    y = _labels(y)
    seed = _check_seed(seed)
    pool = (np.arange(len(y), dtype=np.int64) if subset is None
            else balanced_subset(y, subset, seed))
    # A stream separate from balanced_subset's, so the split is not correlated with the pick.
    rng = np.random.default_rng([seed, 1])
    train, validation = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for c in np.unique(y[pool]):
        members = rng.permutation(pool[y[pool] == c])
        half = (len(members) + 1) // 2
        train.append(members[:half])
        validation.append(members[half:])
    return Split(train_idx=np.sort(np.concatenate(train)),
                 validation_idx=np.sort(np.concatenate(validation)),
                 seed=seed, subset=None if subset is None else int(subset))
