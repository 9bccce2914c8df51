"""Atomic file writes: a reader (or a killed run) never sees a half-written file.

Every writer goes to a temporary sibling ``<name>.tmp-<pid>`` first, fsyncs it and then
``os.replace``-s it over the destination, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TMP_MARK = ".tmp-"


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
    return json.loads(Path(path).read_text())


def write_npz(path: str | os.PathLike, **arrays: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
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
    with open(path, newline="") as f:
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
