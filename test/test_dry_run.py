"""The paper's study at dry-run scale, on small synthetic files in the official CIFAR-10, SVHN
and Fashion-MNIST formats: each architecture, each input shape and each dataset's files through
every stage.

It measures nothing; it proves that each job trains, slices, mines, tunes (DARE, DARE-S,
DARE-SL) and is evaluated under the paper's five attacks, and that the combined report covers
every scenario of the jobs. VGG on a 2-core CPU costs minutes per job even at this scale, so
CI runs 6 of the paper's 9 combinations: all three architectures on Fashion-MNIST (28x28x1,
the GPU verdict's dataset), VGG16 and AlexNet on CIFAR-10 (32x32x3), AlexNet on SVHN (its
files; the shape of CIFAR-10). The three VGG jobs left out repeat shapes and files of these
(VGG19 is VGG16's builder with one more convolution in each of its last three blocks); in a CI
run of all 9 they took 460, 388 and 486 s of its 1,477 (2 jobs at a time).
``DAREKIT_DRY_ALL=1`` runs all 9. All but Fashion-MNIST x
AlexNet skip the adversarial fine-tuning baselines and the cross-check, and are evaluated on the
original and DARE classifiers only (``CUT``); that one runs the whole ``dry`` profile. Two
processes run the jobs, as ``reproduce.py --jobs 2`` would.
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
REPEATS = {("cifar10", "vgg19"), ("svhn", "vgg16"), ("svhn", "vgg19")}  # covered by the others
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
    # every architecture on Fashion-MNIST, VGG and AlexNet on 32x32x3 too, every dataset's files
    assert {m for d, m in COMBOS if d == "fashion_mnist"} == set(MODELS)
    assert {m for d, m in COMBOS if d != "fashion_mnist"} >= {"vgg16", "alexnet"}
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
