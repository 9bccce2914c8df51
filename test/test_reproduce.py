"""reproduce.py: the whole chain on real Fashion-MNIST, interrupted and resumed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import call_script

from darekit import io, reproduce
from darekit.adv_finetune import AdvFinetuneConfig
from darekit.advsets import GenerateConfig
from darekit.evaluate import EvalConfig, SearchConfig
from darekit.finetune import FinetuneConfig
from darekit.mining import MineConfig
from darekit.reproduce import PROFILES, Profile, Study
from darekit.rundir import Run
from darekit.slicing import SliceConfig

TINY = Profile(
    name="tiny", doc="test scale",
    train={"subset": 1000, "epochs": 3, "test_subset": 200, "verbose": 0},
    slice=SliceConfig(max_per_class=5, mode="approx"),
    mine=MineConfig(max_inputs=150),
    dare={"epochs": 1},
    generate=GenerateConfig(n=100, progress=False),
    adv_finetune=AdvFinetuneConfig(finetune=FinetuneConfig(epochs=1)),
    pgd_at={"subset": 1000, "epochs": 1, "test_subset": 100, "verbose": 0},
    evaluate=EvalConfig(n=20, search=SearchConfig(tol=0.05), crosscheck_n=12,
                        crosscheck_params={"apgd_iter": 5, "dlr_targets": 1,
                                           "square_queries": 20}),
)


def test_profiles_are_complete():
    assert {"quick", "paper"} <= set(PROFILES)
    for p in PROFILES.values():
        assert p.doc and isinstance(p.evaluate, EvalConfig)


@pytest.mark.slow
def test_reproduce_resumes_after_an_interruption_and_skips_finished_stages(tmp_path,
                                                                          monkeypatch):
    study = Study(dataset="fashion_mnist", model="smallcnn", profile=TINY,
                  run_dir=tmp_path / "study", attacks=("fgsm", "deepfool"), pgd_at=True)
    real = reproduce.adv_finetune
    calls: list[str] = []

    def crash_on_deepfool(run, attack, cfg, **kw):
        calls.append(attack)
        if attack == "deepfool":
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-study
        return real(run, attack, cfg, **kw)

    monkeypatch.setattr(reproduce, "adv_finetune", crash_on_deepfool)
    log1: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        reproduce.reproduce(study, log=log1.append)
    run = Run.open(study.path)
    assert {"dare", "dare-s", "dare-sl", "adv-fgsm"} <= set(run.named_models())
    assert "adv-deepfool" not in run.named_models()

    monkeypatch.setattr(reproduce, "adv_finetune", real)
    log2: list[str] = []
    reproduce.reproduce(study, log=log2.append)
    skipped = [line.split("] ")[1].split(":")[0] for line in log2 if "skipped" in line]
    assert skipped == ["train", "slice", "mine", "dare", "dare-s", "dare-sl", "generate fgsm",
                       "adv-finetune fgsm", "generate deepfool"]
    assert set(run.named_models()) == {"original", "dare", "dare-s", "dare-sl", "adv-fgsm",
                                       "adv-deepfool", "pgd-at"}
    results = io.read_json(run.file("eval/results.json"))["results"]
    assert {(r["model"], r["attack"]) for r in results} == {
        (m, a) for m in run.named_models() for a in ("fgsm", "deepfool")}
    report = run.file("eval/report.md").read_text()
    assert "best in" in report and "pgd-at" in report and "Cross-check" in report
    checks = io.read_json(run.file("eval/results.json"))["crosscheck"]
    assert {c["model"] for c in checks} == set(run.named_models())
    assert all(c["n"] == 12 for c in checks)

    # A third call has nothing left to do: every stage but the (resumable) evaluation skips.
    log3: list[str] = []
    reproduce.reproduce(study, log=log3.append)
    stages = [line for line in log3 if line.startswith("[")]
    assert stages and all("skipped" in line for line in stages if "evaluate" not in line)


def test_cli_rejects_bad_options():
    proc = call_script("reproduce.py", "--profile", "huge")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = call_script("reproduce.py", "--attack", "nope")
    assert proc.returncode == 2 and "unknown attack" in proc.stderr


def test_the_study_profile_is_checked_before_any_work(tmp_path, monkeypatch):
    """The study's scales were chosen for AlexNet on Fashion-MNIST; another architecture, or
    data too small for its subset or its held-out images, is one error line, nothing run."""
    from darekit.data import Dataset
    from darekit.errors import DareError

    study = PROFILES["study"]
    assert study.deterministic and study.select is not None
    runs = tmp_path / "runs"
    monkeypatch.setenv("DAREKIT_RUNS", str(runs))
    proc = call_script("reproduce.py", "--profile", "study", "--model", "smallcnn")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: profile 'study' is for --model alexnet; received 'smallcnn'")
    real = reproduce.load_dataset("fashion_mnist")

    def shrunk(n):
        return lambda name: Dataset(name, real.x_train[:n], real.y_train[:n], real.x_test,
                                    real.y_test, real.class_names)

    s = Study(dataset="fashion_mnist", model="alexnet", profile=study, run_dir=tmp_path / "s")
    reproduce.check(s)  # the real data hold the study
    monkeypatch.setattr(reproduce, "load_dataset", shrunk(19999))
    with pytest.raises(DareError, match="subset of 20000 images; fashion_mnist has 19999"):
        reproduce.check(s)
    # Enough images, but the held-out set takes all of a small x_validation.
    small = dataclasses.replace(study, train={**study.train, "subset": 2000})
    monkeypatch.setattr(reproduce, "load_dataset", shrunk(5000))
    with pytest.raises(DareError, match="needs 1000 x_validation images held out"):
        reproduce.check(dataclasses.replace(s, profile=small))
    reproduce.check(dataclasses.replace(s, profile=small), data=False)  # --list-jobs
    assert not runs.exists() and not s.path.exists()


def test_profile_fields_match_stage_configs():
    # Every train override is a TrainConfig field; a typo would only fail deep in a real run.
    from darekit.training import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for p in PROFILES.values():
        assert set(p.train) <= fields and set(p.pgd_at) <= fields


DETERMINISTIC_STUDY = """
import dataclasses, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_reproduce import TINY
from darekit import reproduce
from darekit.advsets import GenerateConfig
from darekit.mining import MineConfig
profile = dataclasses.replace(
    TINY, deterministic=True, train={{**TINY.train, "subset": 600, "epochs": 2}},
    mine=MineConfig(max_inputs=60), generate=GenerateConfig(n=40, progress=False),
    evaluate=dataclasses.replace(TINY.evaluate, n=16, crosscheck_n=10), baselines=("pgd",))
study = reproduce.Study(dataset="fashion_mnist", model="smallcnn", profile=profile,
                        run_dir={run!r}, attacks=("fgsm", "pgd"))
reproduce.reproduce(study, log=lambda s: None)
"""


@pytest.mark.slow
def test_a_deterministic_study_repeats_bit_for_bit(tmp_path):
    """Two runs of one seed in deterministic mode give identical results.csv (every figure,
    intervals included) and identical weights of every model. Each run is its own process:
    op determinism is process-wide and would slow every later test."""
    import subprocess
    import sys

    from darekit.paths import ROOT

    paths = [tmp_path / "a", tmp_path / "b"]
    for path in paths:
        code = DETERMINISTIC_STUDY.format(root=str(ROOT), tests=str(ROOT / "test"),
                                          run=str(path))
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (p / "eval" / "results.csv" for p in paths)
    assert a.read_bytes() == b.read_bytes()
    ra, rb = Run.open(paths[0]), Run.open(paths[1])
    assert set(ra.named_models()) == {"original", "dare", "dare-s", "dare-sl", "adv-pgd"}
    for name in ra.named_models():
        wa = ra.load_named(name).get_weights()
        wb = rb.load_named(name).get_weights()
        assert all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True)), name
