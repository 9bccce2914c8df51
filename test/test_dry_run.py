"""The paper's study at dry-run scale, on small synthetic files in the official CIFAR-10, SVHN
and Fashion-MNIST formats: each architecture on each input shape, and each dataset's files,
through every stage.

It measures nothing; it proves that each job trains, slices, mines, tunes (DARE, DARE-S,
DARE-SL) and is evaluated under the paper's five attacks, and that the combined report covers
every scenario of the jobs. VGG on a 2-core CPU costs minutes per job even at this scale, so
CI runs 7 of the paper's 9 combinations: VGG16 and VGG19 each on one 32x32x3 dataset (CIFAR-10
and SVHN share the shape, so VGG19 on CIFAR-10 and VGG16 on SVHN would repeat the same
computations on other files) and on Fashion-MNIST (28x28x1), AlexNet on all three. All but
Fashion-MNIST x AlexNet skip the adversarial fine-tuning baselines and the cross-check, and are
evaluated on the original and DARE classifiers only (``CUT``); that one runs the whole ``dry``
profile. ``DAREKIT_DRY_ALL=1`` runs all 9 (about 7 more minutes). Two processes run the jobs,
as ``reproduce.py --jobs 2`` would.
"""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest
from fake_datasets import write_fake_datasets

from darekit import io, layout, reproduce, sweep
from darekit.reproduce import PROFILES, Study

DATASETS = ("cifar10", "svhn", "fashion_mnist")
MODELS = ("vgg16", "vgg19", "alexnet")
REPEATS = {("cifar10", "vgg19"), ("svhn", "vgg16")}  # shapes and files other jobs cover
COMBOS = [(d, m) for d in DATASETS for m in MODELS
          if os.environ.get("DAREKIT_DRY_ALL") == "1" or (d, m) not in REPEATS]
ATTACKS = ("fgsm", "pgd", "bim", "cw", "deepfool")
FULL = ("fashion_mnist", "alexnet")  # the cheapest combination runs the whole profile

DRY = PROFILES["dry"]
CUT = dataclasses.replace(
    DRY, baselines=(),
    evaluate=dataclasses.replace(DRY.evaluate, models=("original", "dare"), crosscheck=False))


def _run_job(study: Study) -> float:
    """One job in a worker process (spawned: its own TensorFlow); its wall time."""
    t0 = time.perf_counter()
    reproduce.reproduce_all([study])
    return time.perf_counter() - t0


@pytest.mark.slow
def test_paper_study_dry_run(tmp_path, monkeypatch):
    data = write_fake_datasets(tmp_path / "data", DATASETS, n_train=400, n_test=20)
    for k, v in {"DAREKIT_DATA": str(data), "DAREKIT_OFFLINE": "1",
                 "DAREKIT_RUNS": str(tmp_path / "runs")}.items():
        monkeypatch.setenv(k, v)
    studies = [Study(dataset=d, model=m, profile=DRY if (d, m) == FULL else CUT,
                     attacks=ATTACKS) for d, m in COMBOS]
    # every architecture on both input shapes (32x32x3, 28x28x1), every dataset's files read
    assert {(m, d == "fashion_mnist") for d, m in COMBOS} == {
        (m, fm) for m in MODELS for fm in (False, True)}
    assert {d for d, _ in COMBOS} == set(DATASETS)
    # The deepest models first: the two workers then finish at about the same time.
    order = sorted(range(len(studies)), key=lambda k: ("vgg19", "vgg16", "alexnet").index(
        studies[k].model))
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(2, mp_context=get_context("spawn"))
    try:
        seconds = dict(zip(order, pool.map(_run_job, [studies[k] for k in order]),
                           strict=True))
    finally:
        pool.shutdown(cancel_futures=True)  # a failed job: do not run the rest first
    report = reproduce.write_combined(studies)
    print(f"dry run of {len(studies)} jobs: {time.perf_counter() - t0:.0f}s; per job: " +
          ", ".join(f"{s.dataset}/{s.model} {seconds[k]:.0f}s" for k, s in enumerate(studies)))

    for s in studies:
        assert (s.path / layout.REPORT).is_file(), s.path
        assert sweep.finished(s.path, sweep.identity(s))
        stages = io.read_json(s.path / layout.REPRODUCE)["stages"]
        assert stages[:6] == ["train", "slice", "mine", "dare", "dare-s", "dare-sl"]
        assert stages[-1] == "evaluate"
        assert (len(stages) == 17) == (s.profile is DRY)  # 5 baselines: generate + fine-tune
        rows = io.read_json(s.path / layout.RESULTS_JSON)["results"]
        evaluated = {"original", "dare"} if s.profile is CUT else {
            "original", "dare", "dare-s", "dare-sl", *(f"adv-{a}" for a in ATTACKS)}
        assert {(r["model"], r["attack"]) for r in rows} == {
            (m, a) for m in evaluated for a in ATTACKS}
    full = next(s for s in studies if s.profile is DRY)
    assert io.read_json(full.path / layout.RESULTS_JSON)["crosscheck"]

    text = report.read_text()
    groups = set(COMBOS)
    assert all(f"## {m} on {d}: seeds 0" in text for d, m in groups)
    means = [r for r in io.read_csv(report.parent / "results.csv") if r["seed"] == "mean"]
    assert {(r["dataset"], r["arch"]) for r in means} == groups
    # the paper's scenarios (45 for the 9 combinations), and beside them the worst case per
    # norm (2 per combination)
    assert len({(r["dataset"], r["arch"], r["attack"]) for r in means
                if r["attack"] in ATTACKS}) == len(ATTACKS) * len(COMBOS)
    assert {r["attack"] for r in means} - set(ATTACKS) <= {"worst-linf", "worst-l2"}
    assert os.environ["DAREKIT_RUNS"] in str(report)
