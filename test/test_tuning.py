"""Fair tuning: the choice rule on hand-made candidates, held-out images never mined, and a
selection that never reads test images."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from darekit import io, layout
from darekit.errors import DareError
from darekit.tuning import Candidate, SelectConfig, choose, holdout_indices


def cand(lr, clean, robust, status="ok"):
    return Candidate(lr, status, clean, robust, {})


def test_the_most_robust_candidate_within_the_accuracy_drop_wins():
    c = [cand(0.01, 0.80, 0.20), cand(0.1, 0.795, 0.30), cand(1.0, 0.70, 0.60)]
    best, why = choose(c, reference_accuracy=0.80, max_drop=0.01)
    assert best.lr == 0.1 and "within 0.01" in why   # 1.0 is more robust but costs 10 points


def test_exactly_at_the_allowed_drop_counts_as_within():
    best, _ = choose([cand(0.01, 0.79, 0.2), cand(0.1, 0.80, 0.1)], 0.80, 0.01)
    assert best.lr == 0.01


def test_ties_prefer_clean_accuracy_then_the_smaller_rate():
    best, _ = choose([cand(0.1, 0.80, 0.3), cand(0.01, 0.81, 0.3), cand(1.0, 0.81, 0.3)],
                     0.81, 0.01)
    assert best.lr == 0.01


def test_without_a_candidate_within_the_drop_the_smallest_drop_is_chosen_and_said():
    best, why = choose([cand(0.01, 0.70, 0.5), cand(0.1, 0.75, 0.1)], 0.80, 0.01)
    assert best.lr == 0.1 and "smallest drop" in why


def test_a_diverged_candidate_is_never_chosen():
    nan = math.nan
    best, _ = choose([cand(1.0, nan, nan, "diverged"), cand(0.1, 0.5, 0.1)], 0.8, 0.01)
    assert best.lr == 0.1
    best, why = choose([cand(1.0, nan, nan, "diverged")], 0.8, 0.01)
    assert best is None and "diverged" in why


def test_options_are_checked():
    with pytest.raises(DareError, match="--factors"):
        SelectConfig(factors=(0.1, -1.0))
    with pytest.raises(DareError, match="--holdout"):
        SelectConfig(holdout=3)
    y = np.repeat(np.arange(10), 20)
    idx = holdout_indices(y, 50, 0)
    assert len(idx) == 50 and np.all(np.bincount(y[idx]) == 5)
    with pytest.raises(DareError, match="cannot hold out"):
        holdout_indices(y, 200, 0)


@pytest.fixture
def tune_run(fm_run, tmp_path):
    """A copy of the real-data run with a slice, held-out images and mined data."""
    from darekit.mining import MineConfig, run_mining
    from darekit.rundir import Run
    from darekit.slicing import SliceConfig, run_slicing
    from darekit.tuning import write_holdout

    dst = tmp_path / "run"
    shutil.copytree(fm_run, dst, ignore=shutil.ignore_patterns("eval", "models", "ats",
                                                               "slice", "adv", "logs", "tune"))
    run = Run.open(dst)
    run_slicing(run, SliceConfig(max_per_class=5, mode="approx"), log=lambda s: None)
    write_holdout(run, SelectConfig(holdout=100))
    run_mining(run, MineConfig(max_inputs=300), log=lambda s: None)
    return run


def test_held_out_images_are_never_mined(tune_run):
    from darekit.mining import load_mined

    held = io.read_npz(tune_run.file(layout.HOLDOUT))["idx"]
    mined = load_mined(tune_run)
    assert len(held) == 100 and not np.isin(mined.index, held).any()
    assert len(mined.index) > 0


SELECTION = """
import json, sys
sys.path.insert(0, {root!r})
import dataclasses
import numpy as np
from darekit import rundir
from darekit.dare import DareConfig, tune_run
from darekit.data import Dataset
from darekit.rundir import Run
from darekit.seeding import set_seed
from darekit.tuning import SelectConfig, select

set_seed(0, deterministic=True)
run = Run.open({run!r})
cfg = SelectConfig(factors=(0.1, 10.0, 100.0), holdout=100, steps=2)
base = DareConfig(variant="dare-sl", epochs=1, verbose=0)

def train(lr):
    res = tune_run(run, dataclasses.replace(base, lr=lr), log=lambda s: None,
                   log_path=run.file(f"tune/dare-sl-lr{{lr:g}}_log.csv"))
    return res.model, res.status, res.summary

if {poison!r}:  # every test label wrong
    real_load = rundir.load_dataset
    def poisoned(name):
        d = real_load(name)
        return Dataset(d.name, d.x_train, d.y_train, d.x_test, (d.y_test + 1) % 10,
                       d.class_names)
    rundir.load_dataset = poisoned
    assert np.all(run.data().y_test != real_load("fashion_mnist").y_test)
lr, record = select(run, "dare-sl", 1e-3, train, cfg, log=lambda s: None)
keys = ("lr", "status", "clean_accuracy", "robust_accuracy")  # not timings
print(json.dumps({{"lr": lr, "candidates": [{{k: c[k] for k in keys}}
                                           for c in record["candidates"]]}}))
"""


def test_selection_never_reads_test_images(tune_run):
    """Poisoning every test label changes nothing in the selection: the chosen rate and every
    candidate's held-out figures are identical. Both selections run with op determinism (in
    subprocesses: it is process-wide), so any difference would come from the labels."""
    import json
    import subprocess
    import sys

    from darekit.paths import ROOT

    out = []
    for poison in (False, True):
        code = SELECTION.format(root=str(ROOT), run=str(tune_run.path), poison=poison)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    real, poisoned = out
    assert len(real["candidates"]) == 3
    assert poisoned == real
    saved = io.read_json(tune_run.file(layout.tune_file("dare-sl")))["tune"]
    assert saved["chosen_lr"] == real["lr"] and len(saved["candidates"]) == 3
    assert saved["holdout"]["n"] == 100


@pytest.mark.parametrize("variant", ["dare-s", "dare-sl"])
def test_tensorboard_logs_fine_tuning(tune_run, variant):
    """``--tensorboard`` writes Keras' event files per method (regression and CE tuning)."""
    from darekit.dare import DareConfig
    from darekit.dare import tune_run as tune_one

    tune_one(tune_run, DareConfig(variant=variant, epochs=1, verbose=0, tensorboard=True),
             log=lambda s: None)
    logs = tune_run.file(layout.tensorboard(variant))
    assert any(p.name.startswith("events.out.tfevents") for p in logs.rglob("*")), logs
    tune_one(tune_run, DareConfig(variant=variant, epochs=1, verbose=0), log=lambda s: None,
             log_path=tune_run.file("tune/off_log.csv"))
    assert not tune_run.file(layout.tensorboard("off")).exists()
