"""reproduce.py: the whole chain on real Fashion-MNIST, interrupted and resumed."""

from __future__ import annotations

import dataclasses

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


def test_profile_fields_match_stage_configs():
    # Every train override is a TrainConfig field; a typo would only fail deep in a real run.
    from darekit.training import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for p in PROFILES.values():
        assert set(p.train) <= fields and set(p.pgd_at) <= fields
