"""Shared fixtures. Real-data fixtures use Debian's Fashion-MNIST (scripts/setup.sh installs it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from darekit.paths import ROOT

# Tests never reach for the network: a missing dataset must fail fast, not hang.
os.environ.setdefault("DAREKIT_OFFLINE", "1")

LONGEST_FIRST = ("test_dry_run.py",)  # its own 2 processes; with 7 jobs the last 18 min of CI
FM_SUBSET = 2000   # 1000 x_train + 1000 x_validation images, 100 + 100 per class
FM_EPOCHS = 4


def run_script(script: str, *args: str, check: bool = True, timeout: float = 900,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run an entry point as a user would (``python train/train.py ...``) from a foreign cwd."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd="/",
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def call_script(script: str, *args: str, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess:
    """Run an entry point's ``main(argv)`` in this process (no interpreter start, no TensorFlow
    import: fast), capturing what it writes to ``sys.stdout``/``sys.stderr`` and its exit code
    (argparse's ``SystemExit`` included)."""
    import contextlib
    import io
    import runpy

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        main = runpy.run_path(str(ROOT / script), run_name="entry_point")["main"]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = int(main([str(a) for a in args]) or 0)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(),
                                       err.getvalue())


@pytest.fixture(scope="session")
def fm_run(tmp_path_factory) -> Path:
    """A ``smallcnn`` trained for 4 epochs on 1000 real Fashion-MNIST images (history kept).

    Session-scoped: slicing, mining, DARE and attack tests all start from this run.
    """
    from darekit.training import TrainConfig, train

    path = tmp_path_factory.mktemp("runs") / "fm-smallcnn"
    cfg = TrainConfig.resolve("smallcnn", "fashion_mnist", subset=FM_SUBSET, epochs=FM_EPOCHS,
                              test_subset=1000, run_dir=str(path), verbose=0, seed=0)
    train(cfg)
    return path


def pytest_collection_modifyitems(config, items):
    """Every test that uses the real-data run is a ``slow`` test (the fast tier, ``pytest -m
    "not slow"``, runs on tiny untrained models only). Under the JAX backend, a
    ``tensorflow_only`` test is deselected (reported as such, never counted as passed)."""
    jax = os.environ.get("KERAS_BACKEND", "tensorflow") == "jax"
    kept, dropped = [], []
    for item in items:
        if "fm_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        (dropped if jax and item.get_closest_marker("tensorflow_only") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    # The longest file first: with two workers (scripts/test.sh, one file per worker at a
    # time) it then runs beside the others instead of alone at the end. Every worker
    # collects the same order, as pytest-xdist requires.
    items[:] = sorted(kept, key=lambda item: item.path.name not in LONGEST_FIRST)
