"""darekit.data: readers on tiny files in the exact official formats, lookup errors, splits."""

from __future__ import annotations

import dataclasses
import functools
import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from fake_datasets import idx_bytes as _idx_bytes
from fake_datasets import write_cifar10 as _write_cifar
from fake_datasets import write_fashion_mnist as _write_fashion
from fake_datasets import write_svhn as _write_svhn
from hypothesis import given, settings
from hypothesis import strategies as st

from darekit import data
from darekit.data import DATASETS, DatasetNotFound, Split, balanced_subset, load_dataset, make_split
from darekit.errors import DareError


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test: an empty private data folder, and never the network."""
    folder = tmp_path / "data"
    folder.mkdir()
    monkeypatch.setenv("DAREKIT_DATA", str(folder))
    monkeypatch.setenv("DAREKIT_OFFLINE", "1")
    return folder


def _no_system_dirs(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # Debian's Fashion-MNIST would otherwise be found on machines that have it.
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], system_dirs=()))


# ------------------------------------------------------------------ writers of official formats
# In fake_datasets.py (the dry run of the whole study writes its datasets with them too).

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Fake:
    write: Callable[..., None]
    shape: tuple[int, int, int]
    subdir: str = ""  # where under data_dir()/<name> the files go


FAKES = {
    "cifar10": Fake(_write_cifar, (32, 32, 3)),
    # The tarball's layout, pickled at the newest protocol (numpy then pickles differently).
    "cifar10-tarball-layout": Fake(functools.partial(_write_cifar, protocol=5), (32, 32, 3),
                                   "cifar-10-batches-py"),
    "svhn": Fake(_write_svhn, (32, 32, 3)),
    "fashion_mnist": Fake(_write_fashion, (28, 28, 1)),
}


def _fake_arrays(shape: tuple[int, int, int], n_train: int = 12, n_test: int = 5) -> Arrays:
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (n_train, *shape), dtype=np.uint8)
    x_te = rng.integers(0, 256, (n_test, *shape), dtype=np.uint8)
    y_tr = np.arange(n_train) % 10  # includes 0, which SVHN stores as 10
    y_te = (np.arange(n_test) * 3) % 10
    # One marked pixel in the last channel at an asymmetric position: any axis mix-up moves it.
    x_tr[1, 3, 5, :] = 0
    x_tr[1, 3, 5, -1] = 255
    x_tr[1, 5, 3, :] = 0
    return x_tr, y_tr, x_te, y_te


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize("fake_id", FAKES)
def test_reads_official_format(fake_id: str, _isolated: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FAKES[fake_id]
    name = fake_id.split("-")[0]
    _no_system_dirs(monkeypatch, name)
    x_tr, y_tr, x_te, y_te = _fake_arrays(fake.shape)
    fake.write(_isolated / name / fake.subdir, x_tr, y_tr, x_te, y_te)

    ds = load_dataset(name)

    assert ds.name == name and ds.num_classes == 10 and ds.input_shape == fake.shape
    assert ds.x_train.shape == (12, *fake.shape) and ds.x_test.shape == (5, *fake.shape)
    for x in (ds.x_train, ds.x_test):
        assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    for y in (ds.y_train, ds.y_test):
        assert y.dtype == np.int64 and y.shape == (len(y),)
    assert ds.x_train[1, 3, 5, -1] == 1.0 and ds.x_train[1, 5, 3, -1] == 0.0
    assert ds.x_train[1, 3, 5, 0] == (1.0 if fake.shape[2] == 1 else 0.0)
    np.testing.assert_array_equal(ds.x_train, x_tr / np.float32(255))
    np.testing.assert_array_equal(ds.x_test, x_te / np.float32(255))
    np.testing.assert_array_equal(ds.y_train, y_tr)  # SVHN: the stored 10s came back as 0
    np.testing.assert_array_equal(ds.y_test, y_te)


def test_svhn_file_really_stores_ten(_isolated: Path) -> None:
    _write_svhn(_isolated / "svhn", *_fake_arrays((32, 32, 3)))
    assert 10 in scipy.io.loadmat(_isolated / "svhn" / "train_32x32.mat")["y"]


def test_arrays_are_read_only_and_cached(_isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_system_dirs(monkeypatch, "svhn")
    _write_svhn(_isolated / "svhn", *_fake_arrays((32, 32, 3)))
    ds = load_dataset("svhn")
    assert load_dataset("svhn") is ds
    with pytest.raises(ValueError):
        ds.x_train[0, 0, 0, 0] = 0.5
    with pytest.raises(ValueError):
        ds.y_train.flags.writeable = True


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("download", [None, False])
def test_missing_dataset_message(name: str, download: bool | None, _isolated: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _no_system_dirs(monkeypatch, name)
    with pytest.raises(DatasetNotFound) as err:
        load_dataset(name, download=download)
    msg = str(err.value)
    assert str(_isolated / name) in msg and "offline" in msg.lower()
    assert all(f in msg for f in DATASETS[name].files)


def test_failed_download_reason_is_short(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> Arrays:
        raise ConnectionError("no route to host\n" + "long traceback text " * 50)

    monkeypatch.setitem(DATASETS, "svhn", dataclasses.replace(DATASETS["svhn"], download=boom))
    with pytest.raises(DatasetNotFound, match="online download failed: ConnectionError") as err:
        load_dataset("svhn", download=True)
    assert "traceback" not in str(err.value)


def test_unknown_dataset() -> None:
    with pytest.raises(DareError, match="cifar10"):
        load_dataset("imagenet")


def _bad_magic(p: Path) -> None:
    p.write_bytes(gzip.compress(_idx_bytes(2049, (6,), np.zeros(6))))


def _truncated(p: Path) -> None:
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-7]))


def _not_gzip(p: Path) -> None:
    p.write_bytes(b"<html>404</html>")


@pytest.mark.parametrize("corrupt", [_bad_magic, _truncated, _not_gzip])
def test_corrupt_idx_names_file(corrupt: Callable[[Path], None], _isolated: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    _no_system_dirs(monkeypatch, "fashion_mnist")
    folder = _isolated / "fashion_mnist"
    _write_fashion(folder, *_fake_arrays((28, 28, 1)))
    corrupt(folder / "train-images-idx3-ubyte.gz")
    with pytest.raises(DareError, match="train-images-idx3-ubyte.gz"):
        load_dataset("fashion_mnist")


def test_corrupt_cifar_pickle_names_file(_isolated: Path) -> None:
    folder = _isolated / "cifar10"
    _write_cifar(folder, *_fake_arrays((32, 32, 3)))
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DareError, match="data_batch_3"):
        load_dataset("cifar10")


@pytest.mark.slow
def test_real_debian_fashion_mnist() -> None:
    if not all(data.FASHION_MNIST_SYSTEM_DIR.joinpath(f).is_file()
               for f in DATASETS["fashion_mnist"].files):
        pytest.skip(f"{data.FASHION_MNIST_SYSTEM_DIR} not installed (dataset-fashion-mnist)")
    ds = load_dataset("fashion_mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() == 1.0 and ds.x_train.min() == 0.0
    np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)


# ------------------------------------------------------------------ splits

# Uneven class sizes, some odd, so the "extra one goes to x_train" rule is exercised.
Y = np.repeat(np.arange(4), [7, 6, 9, 4])[np.random.default_rng(1).permutation(26)]


def test_split_is_stratified_half_and_complete() -> None:
    s = make_split(Y, seed=0)
    assert s.train_idx.dtype == np.int64 and s.validation_idx.dtype == np.int64
    assert np.all(np.diff(s.train_idx) > 0) and np.all(np.diff(s.validation_idx) > 0)
    assert not np.intersect1d(s.train_idx, s.validation_idx).size
    np.testing.assert_array_equal(np.union1d(s.train_idx, s.validation_idx), np.arange(len(Y)))
    np.testing.assert_array_equal(np.bincount(Y[s.train_idx]), [4, 3, 5, 2])
    np.testing.assert_array_equal(np.bincount(Y[s.validation_idx]), [3, 3, 4, 2])


def test_split_depends_only_on_seed() -> None:
    assert make_split(Y, seed=5) == make_split(Y, seed=5)
    assert make_split(Y, seed=5) != make_split(Y, seed=6)


@pytest.mark.parametrize("n, per_class", [(12, [3, 3, 3, 3]), (14, [4, 4, 3, 3])])
def test_balanced_subset(n: int, per_class: list[int]) -> None:
    idx = balanced_subset(Y, n, seed=3)
    assert idx.dtype == np.int64 and len(np.unique(idx)) == n and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.bincount(Y[idx]), per_class)
    np.testing.assert_array_equal(idx, balanced_subset(Y, n, seed=3))


def test_subset_split_is_within_balanced_subset() -> None:
    s = make_split(Y, seed=2, subset=14)
    assert s.subset == 14
    both = np.union1d(s.train_idx, s.validation_idx)
    np.testing.assert_array_equal(both, balanced_subset(Y, 14, seed=2))
    np.testing.assert_array_equal(np.bincount(Y[s.train_idx]), [2, 2, 2, 2])


@pytest.mark.parametrize("n", [0, 27, 20])  # 20 needs 5 of class 3, which has only 4
def test_balanced_subset_refuses_impossible(n: int) -> None:
    with pytest.raises(DareError):
        balanced_subset(Y, n, seed=0)


@pytest.mark.parametrize("subset", [None, 8])
def test_split_save_load_round_trip(subset: int | None, tmp_path: Path) -> None:
    s = make_split(Y, seed=9, subset=subset)
    s.save(tmp_path / "split.npz")
    back = Split.load(tmp_path / "split.npz")
    assert back == s and back.subset == subset and back.seed == 9


def test_split_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DareError, match="not found"):
        Split.load(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DareError, match="bad.npz"):
        Split.load(tmp_path / "bad.npz")


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 9), min_size=1, max_size=5), seed=st.integers(0, 2**31))
def test_split_properties(counts: list[int], seed: int) -> None:
    y = np.repeat(np.arange(len(counts)), counts)
    s = make_split(y, seed)
    assert not np.intersect1d(s.train_idx, s.validation_idx).size
    assert len(s.train_idx) + len(s.validation_idx) == len(y)
    for c, m in enumerate(counts):
        assert np.sum(y[s.train_idx] == c) == (m + 1) // 2
