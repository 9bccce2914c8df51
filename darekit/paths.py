"""Every path the package uses comes from here.

From a source checkout (the folder holding ``darekit/``, ``reproduce.py``, ``train/``...), the
default data and run folders are the checkout's ``data/`` and ``runs/``, whatever the working
directory. From an installed package (``pip install .``: ``darekit`` under site-packages), they
are ``data/`` and ``runs/`` under the current working directory, never inside site-packages.
``$DAREKIT_DATA`` and ``$DAREKIT_RUNS`` override both.
"""

from __future__ import annotations

import os
from pathlib import Path

from darekit import layout

ROOT = Path(__file__).resolve().parents[1]
"""The folder holding the ``darekit`` package: a checkout's root, or site-packages."""


def is_checkout(root: Path | None = None) -> bool:
    """Whether ``root`` (default ``ROOT``) is a source checkout (it holds the entry scripts),
    not the site-packages of an installed darekit."""
    root = ROOT if root is None else root
    return (root / "reproduce.py").is_file() and (root / "darekit" / "__init__.py").is_file()


def base_dir() -> Path:
    """The default parent of ``data/`` and ``runs/``: the checkout, else the working
    directory."""
    return ROOT if is_checkout() else Path.cwd()


def data_dir() -> Path:
    """Where dataset files are looked up first: ``$DAREKIT_DATA``, else ``data/`` in the
    checkout (installed: in the working directory)."""
    return Path(os.environ.get("DAREKIT_DATA") or base_dir() / "data").expanduser()


def runs_dir() -> Path:
    """Default parent of run directories: ``$DAREKIT_RUNS``, else ``runs/`` in the checkout
    (installed: in the working directory)."""
    return Path(os.environ.get("DAREKIT_RUNS") or base_dir() / "runs").expanduser()


def default_run_dir(dataset: str, model: str, seed: int) -> Path:
    """``runs/<dataset>-<model>-s<seed>``: the run directory when ``--run-dir`` is not given."""
    return runs_dir() / f"{dataset}-{model}-s{seed}"


LATEST = "latest"
"""``runs/latest``: a symbolic link to the most recently started training run."""


def mark_latest(run_dir: Path) -> None:
    """Point ``runs/latest`` at ``run_dir`` (atomically) when it lies under ``runs_dir()``."""
    parent = runs_dir()
    run_dir = Path(run_dir).resolve()
    if run_dir.parent != parent.resolve():
        return
    link = parent / LATEST
    tmp = parent / f".{LATEST}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


def latest_run() -> Path:
    """The run ``runs/latest`` points to, or else the run under ``runs/`` whose config was
    written last; a ``DareError`` when there is none."""
    from darekit.errors import DareError

    parent = runs_dir()
    link = parent / LATEST
    if link.is_symlink() and (link.resolve() / layout.CONFIG).is_file():
        return link.resolve()
    configs = [p for p in parent.glob(f"*/{layout.CONFIG}") if not p.parent.is_symlink()]
    if not configs:
        raise DareError(f"no --run-dir given and no trained run under {parent}; train one "
                        "first, e.g. python train/train.py --model vgg16")
    return max(configs, key=lambda p: p.stat().st_mtime).parent
