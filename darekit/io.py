"""Atomic file writes: a reader (or a killed run) never sees a half-written file; readers
that name a corrupt file.

Every writer goes to a temporary sibling ``<name>.tmp-<pid>`` first, fsyncs it and then
``os.replace``-s it over the destination, which is atomic on POSIX file systems. A file can
still be damaged from outside (a full disk, a copy cut short, an edit by hand): every reader
turns a parse error into ``CorruptFileError``, a ``DareError`` whose one line names the file
(a missing file stays ``FileNotFoundError``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from darekit.errors import DareError

TMP_MARK = ".tmp-"


class CorruptFileError(DareError):
    """A file that exists but cannot be parsed (truncated, damaged): ``path`` names it."""

    def __init__(self, path: str | os.PathLike, cause: BaseException, remedy: str | None = None):
        from darekit import layout

        self.path = Path(path)
        remedy = remedy or layout.remedy(self.path)
        detail = (str(cause).strip().splitlines() or [""])[0][:160]
        what = type(cause).__name__ + (f": {detail}" if detail else "")
        super().__init__(f"{self.path} is corrupt or truncated ({what}); {remedy}")


# What a damaged file raises while it is parsed: JSON and text decoding, the zip container of
# .npz files and its compressed members, NumPy's array headers, and a short read.
_PARSE_ERRORS = (ValueError, UnicodeDecodeError, zipfile.BadZipFile, zlib.error, EOFError,
                 KeyError, OSError)


@contextlib.contextmanager
def _naming(path: str | os.PathLike) -> Iterator[None]:
    """Turn a parse error while reading ``path`` into ``CorruptFileError``."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except _PARSE_ERRORS as e:
        raise CorruptFileError(path, e) from None


def warn(message: str) -> None:
    """``warning: <message>`` on stderr: a degenerate outcome the user must see, in a script or
    a notebook alike."""
    print(f"warning: {message}", file=sys.stderr)


def check_writable(folder: str | os.PathLike, what: str = "run directory") -> Path:
    """Fail with one line, before any work, when files cannot be created in ``folder``
    (created if missing): the permission bits say so, or a probe file cannot be written
    (a read-only file system, which root meets too). Returns the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"no write permission on {folder}")
        probe = folder / f".write-probe{TMP_MARK}{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or str(e)
        raise DareError(f"cannot write into the {what} {folder} ({reason}); make it "
                        "writable or choose another") from None
    return folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    The temporary name keeps the destination's suffixes (Keras and h5py look at them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base, dot, suffixes = path.name.partition(".")
    tmp = path.with_name(f"{base}{TMP_MARK}{os.getpid()}{dot}{suffixes}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON; numpy scalars and arrays become plain numbers and lists."""
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, numpy values plain numbers):
    what a value saved with ``write_json`` compares equal to."""
    return json.loads(json.dumps(obj, default=_json_default))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; ``CorruptFileError`` when it does not parse."""
    text = Path(path).read_bytes()  # FileNotFoundError passes as is
    with _naming(path):
        return json.loads(text.decode())


def write_npz(path: str | os.PathLike, **arrays: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, read now (a damaged member fails here, named, not later);
    ``CorruptFileError`` when the file does not parse."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with _naming(path), np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
              fieldnames: Sequence[str] | None = None) -> None:
    """Write dict rows as CSV (the header is the union of keys, in first-seen order)."""
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fieldnames))
        w.writeheader()
        w.writerows(rows)


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as f, _naming(path):
        return list(csv.DictReader(f))


def save_with(path: str | os.PathLike, save: Callable[[str], Any]) -> None:
    """Atomically write a file produced by a library saver, e.g. ``model.save_weights``."""
    with atomic_path(path) as tmp:
        save(str(tmp))


def remove_stale_tmp(folder: str | os.PathLike) -> int:
    """Delete temporaries left by a killed writer under ``folder``; return how many."""
    n = 0
    for p in Path(folder).rglob(f"*{TMP_MARK}*"):
        if p.is_file():
            p.unlink()
            n += 1
    return n
