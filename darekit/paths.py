"""Every path the package uses comes from here, never from the current working directory."""

from __future__ import annotations

import os
from pathlib import Path

from darekit import layout

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (the folder holding ``darekit/``, ``train/``, ``dare/``...)."""


def data_dir() -> Path:
    """Where dataset files are looked up first: ``$DAREKIT_DATA`` or ``<repo>/data``."""
    return Path(os.environ.get("DAREKIT_DATA", ROOT / "data")).expanduser()


def runs_dir() -> Path:
    """Default parent of run directories: ``$DAREKIT_RUNS`` or ``<repo>/runs``."""
    return Path(os.environ.get("DAREKIT_RUNS", ROOT / "runs")).expanduser()


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
