"""Every path the package uses comes from here, never from the current working directory."""

from __future__ import annotations

import os
from pathlib import Path

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
