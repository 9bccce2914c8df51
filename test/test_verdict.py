"""The GPU verdict: its profile, what a GPU run sends back, and the local combine."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from darekit import io, layout, reproduce, verdict
from darekit.attacks import ATTACKS, DEFAULT_ATTACKS
from darekit.data import make_split
from darekit.errors import DareError
from darekit.paths import ROOT
from darekit.reproduce import PROFILES, VERDICT_ATTACKS, Study, train_options
from darekit.rundir import Run
from darekit.training import TrainConfig
from darekit.tuning import SelectConfig

SCRIPT = ROOT / "scripts" / "gpu-verdict.sh"
MIB16 = 16 * 2**20


# ---------------------------------------------------------------------------- the profile
def test_the_verdict_profile_has_the_verdicts_scale():
    p = PROFILES["verdict"]
    assert p.datasets == ("fashion_mnist",) and p.models == ("vgg16", "vgg19", "alexnet")
    # The whole training set, split 50/50: Fashion-MNIST has 6,000 images per class.
    y = np.repeat(np.arange(10), 6000)
    for m in p.models:
        cfg = TrainConfig.resolve(m, "fashion_mnist", **train_options(Study("fashion_mnist", m,
                                  dataclasses.replace(p, attacks=("fgsm",)))))
        assert cfg.subset is None and cfg.test_subset is None  # all 10,000 test images logged
        split = make_split(y, 0, cfg.subset)
        assert (len(split.train_idx), len(split.validation_idx)) == (30000, 30000)
        assert cfg.precision == "float32" and all(0 < e < cfg.epochs for e in cfg.milestones)
    assert p.slice.mode == "exact"
    assert p.mine.max_inputs is None  # all of x_validation but the held-out images
    assert p.select == SelectConfig() and p.select.holdout == 1000
    assert p.generate.n == 5000 and p.baselines is None  # a baseline per attack
    assert p.evaluate.n == 1000 and p.evaluate.crosscheck and p.evaluate.crosscheck_n is None
    assert dict(p.evaluate.crosscheck_params) == {}  # the full cross-check: its defaults
    assert p.evaluate.baselines == "all"  # the worst case needs every attack on every model
    assert p.attacks == VERDICT_ATTACKS == ("fgsm", "pgd", "pgd-margin", "bim", "cw",
                                            "deepfool")
    assert p.deterministic and not p.keep_history


def test_each_architecture_gets_its_own_schedule():
    p = dataclasses.replace(PROFILES["verdict"], attacks=("fgsm",))
    got = {m: TrainConfig.resolve(m, "fashion_mnist", **train_options(
        Study("fashion_mnist", m, p))) for m in p.models}
    assert (got["vgg16"].epochs, got["vgg19"].epochs, got["alexnet"].epochs) == (40, 40, 30)
    assert got["vgg16"].lr == got["vgg19"].lr == 0.05 and got["alexnet"].lr == 0.01
    assert got["vgg16"].milestones == (12, 24, 32) and got["alexnet"].milestones == (15, 23)
    assert got["vgg16"].nesterov and not got["alexnet"].nesterov  # the registry's rest stays
    # Every override is a TrainConfig field (a typo would only fail deep in a GPU run).
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for prof in PROFILES.values():
        assert all(set(o) <= fields for o in prof.train_by_model.values())
        assert set(prof.train_by_model) <= set(prof.models or prof.train_by_model)
    # train_by_model goes over train, for its model only
    q = dataclasses.replace(p, train={"epochs": 5, "lr": 0.1},
                            train_by_model={"alexnet": {"epochs": 7}})
    assert train_options(Study("fashion_mnist", "alexnet", q)) == {"epochs": 7, "lr": 0.1}
    assert train_options(Study("fashion_mnist", "vgg16", q)) == {"epochs": 5, "lr": 0.1}


def test_the_verdict_profile_is_for_its_dataset_and_architectures():
    p = dataclasses.replace(PROFILES["verdict"], attacks=("fgsm",))
    for m in p.models:
        reproduce.check(Study("fashion_mnist", m, p), data=False)
    for d, m in (("fashion_mnist", "smallcnn"), ("cifar10", "vgg16")):
        with pytest.raises(DareError, match="profile 'verdict' is for"):
            reproduce.check(Study(d, m, p), data=False)


def test_a_study_takes_the_profiles_attacks_unless_given():
    dry = PROFILES["dry"]
    assert Study("fashion_mnist", "alexnet", dry).attacks == DEFAULT_ATTACKS
    two = dataclasses.replace(dry, attacks=("cw", "fgsm"))
    assert Study("fashion_mnist", "alexnet", two).attacks == ("cw", "fgsm")
    assert Study("fashion_mnist", "alexnet", two, attacks=("pgd",)).attacks == ("pgd",)
    with pytest.raises(DareError):
        Study("fashion_mnist", "alexnet", dataclasses.replace(dry, attacks=("nope",)))
    if "pgd-margin" in ATTACKS:  # helper B's attack: the verdict runs all six then
        assert Study("fashion_mnist", "vgg16", PROFILES["verdict"]).attacks == VERDICT_ATTACKS


def test_the_history_is_pruned_after_mining_only(tmp_path):
    profile = dataclasses.replace(PROFILES["verdict-dry"], attacks=("fgsm",))
    names = [st.name for st in reproduce._stages(Study("fashion_mnist", "alexnet", profile,
                                                       run_dir=tmp_path))]
    assert names[names.index("mine") + 1] == "prune history"
    quick = Study("fashion_mnist", "alexnet", PROFILES["quick"], run_dir=tmp_path)
    assert "prune history" not in [st.name for st in reproduce._stages(quick)]

    run = Run(tmp_path)
    io.write_json(run.file(layout.PROGRESS), {"epoch": 3})
    for e, size in ((1, 100), (2, 200), (3, 300)):
        io.write_bytes(run.epoch_path(e), b"w" * size)
    with pytest.raises(DareError, match="not been mined"):
        reproduce.prune_history(run)
    assert run.history_epochs() == [1, 2, 3]
    io.write_bytes(run.file(layout.MINED), b"mined")
    assert reproduce.prune_history(run) == 300  # epochs 1 and 2
    assert run.history_epochs() == [3] and run.epoch_path(3).stat().st_size == 300


# ---------------------------------------------------------------------------- pack, combine
def _row(model: str, attack: str, seed: int, er: float, ra: float, acc: float) -> dict:
    return {"dataset": "fashion_mnist", "arch": "vgg16", "attack": attack, "model": model,
            "seed": seed, "status": "ok", "er": er, "er_low": er - 0.01, "er_high": er + 0.01,
            "success_rate": 1.0, "comparable": True, "clean_accuracy": acc,
            "clean_accuracy_low": acc - 0.05, "clean_accuracy_high": acc + 0.05,
            "robust_accuracy": ra, "robust_accuracy_low": ra - 0.05,
            "robust_accuracy_high": ra + 0.05, "budget": 0.1, "norm": "linf", "n": 20}


# ER of dare per seed: mean 0.3, sample std sqrt(0.07) = 0.264575; the population std
# (0.216025) or two of the three seeds (mean 0.15, 0.4 or 0.35) would all read differently.
DARE_ER = {0: 0.1, 1: 0.2, 2: 0.6}
BASE_ER = {0: 0.2, 1: 0.2, 2: 0.2}
DARE_RA = {0: 0.5, 1: 0.7, 2: 0.9}   # mean 0.7, sample std 0.2


def _gpu_run(runs: Path, seed: int) -> Path:
    """A run directory as a verdict job leaves it, results hand-made, with the big files that
    must not come back."""
    run = runs / f"fashion_mnist-vgg16-verdict-s{seed}"
    rows = []
    for model, er, ra in (("dare", DARE_ER[seed], DARE_RA[seed]),
                          ("adv-fgsm", BASE_ER[seed], 0.3)):
        per_image = np.full(20, er)
        io.write_npz(run / f"{layout.eval_part(model, 'fgsm')}.npz", fooled=np.ones(20, bool),
                     perturbation=per_image, x_norm=np.ones(20),
                     clean_correct=np.ones(20, bool), robust_at_budget=np.zeros(20, bool))
        rows.append(_row(model, "fgsm", seed, er, ra, 0.9))
    io.write_json(run / layout.RESULTS_JSON, {"results": rows, "definitions": {"er": "ER"}})
    io.write_text(run / layout.REPORT, "# one run\n")
    io.write_json(run / layout.CONFIG, {"train": {"model": "vgg16", "seed": seed},
                                        "versions": {"backend": "jax"}})
    io.write_json(run / layout.REPRODUCE, {"dataset": "fashion_mnist", "model": "vgg16",
                                           "profile": "verdict", "seed": seed,
                                           "finished": True,
                                           "seconds": {"train": 60.0 + seed, "mine": 9.5}})
    io.write_csv(run / layout.TRAIN_LOG, [{"epoch": 1, "val_accuracy": 0.9},
                                          {"epoch": 2, "val_accuracy": 0.93 + seed / 1000}])
    for rel in (layout.epoch_file(2), layout.model_file("dare"), layout.export_file("dare"),
                layout.adv_set("train", "fgsm"), layout.MINED, layout.MASKS, layout.PROGRESS):
        io.write_bytes(run / rel, b"x" * 1000)
    return run


def test_a_gpu_run_sends_back_results_only(tmp_path):
    run = _gpu_run(tmp_path / "runs", 0)
    rel = {p.relative_to(run).as_posix() for p in verdict.returned_files(run)}
    assert {layout.RESULTS_JSON, layout.REPORT, layout.CONFIG, layout.REPRODUCE,
            layout.TRAIN_LOG, f"{layout.eval_part('dare', 'fgsm')}.npz"} <= rel
    assert not any(r.startswith(("history/", "models/", "adv/", "ats/", "slice/masks",
                                 "state/")) for r in rel)
    extra = tmp_path / "gpu"
    io.write_json(extra / "timing.json", {"seconds": {"run": 1}})
    [archive] = verdict.pack([run, tmp_path / "runs" / "missing"], tmp_path / "out", "v",
                             extra)
    assert archive.name == "v.tar.gz"
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert f"v/runs/{run.name}/{layout.RESULTS_JSON}" in names and "v/gpu/timing.json" in names
    assert not any(n.endswith((".h5", ".keras")) or "/history/" in n for n in names)


def test_combine_gives_mean_and_sample_std_across_seeds(tmp_path):
    runs = [_gpu_run(tmp_path / "runs", s) for s in (0, 1, 2)]
    # Seeds 0 and 1 come back in one archive split into small parts, seed 2 in another.
    parts = verdict.pack(runs[:2], tmp_path / "out-a", "a", part_bytes=500)
    assert len(parts) > 1 and all(p.stat().st_size <= 500 for p in parts)
    verdict.pack(runs[2:], tmp_path / "out-b", "b")
    out = tmp_path / "combined"
    md_path = verdict.combine([tmp_path / "out-a", tmp_path / "out-b" / "b.tar.gz"], out)
    res = io.read_json(out / "results.json")
    mean = {r["model"]: r for r in res["rows"] if r["seed"] == "mean"}
    assert mean["dare"]["seeds"] == 3
    assert math.isclose(mean["dare"]["er"], 0.3, abs_tol=1e-9)
    assert math.isclose(mean["dare"]["er_std"], math.sqrt(0.07), abs_tol=1e-9)
    assert math.isclose(mean["dare"]["robust_accuracy"], 0.7, abs_tol=1e-9)
    assert math.isclose(mean["dare"]["robust_accuracy_std"], 0.2, abs_tol=1e-9)
    assert math.isclose(mean["adv-fgsm"]["er"], 0.2) and mean["adv-fgsm"]["er_std"] < 1e-12
    assert [r["er"] for r in res["rows"] if r["model"] == "dare" and r["seed"] != "mean"] \
        == [0.1, 0.2, 0.6]
    assert [(f["arch"], f["seed"], f["test_accuracy"]) for f in res["runs"]] == \
        [("vgg16", 0, 0.93), ("vgg16", 1, 0.931), ("vgg16", 2, 0.932)]
    md = md_path.read_text()
    assert "**0.3000 ± 0.2646 100%**" in md  # dare has the highest mean ER
    assert "| vgg16 | 2 | 2 | 0.9320 | 62.0 | 9.5 | 72 |" in md
    assert str(tmp_path) not in md  # runs named by their directory, not a temporary path
    assert (out / "results.csv").is_file() and (out / "er.png").is_file()
    # A run that came back twice is refused, not averaged in twice.
    (tmp_path / "out-c").mkdir()
    (tmp_path / "out-c" / "b.tar.gz").write_bytes((tmp_path / "out-b" / "b.tar.gz").read_bytes())
    with pytest.raises(DareError, match="came back twice"):
        verdict.combine([tmp_path / "out-b", tmp_path / "out-c"], tmp_path / "x")
    # The same file named twice is one input.
    verdict.combine([tmp_path / "out-b", tmp_path / "out-b" / "b.tar.gz"], tmp_path / "z")
    # Runs of another profile are not averaged in.
    other = _gpu_run(tmp_path / "other", 0)
    io.write_json(other / layout.REPRODUCE, {**io.read_json(other / layout.REPRODUCE),
                                             "profile": "verdict-dry"})
    with pytest.raises(DareError, match="different profiles"):
        verdict.combine([tmp_path / "out-b", tmp_path / "other"], tmp_path / "w")
    # A missing part is refused.
    parts[1].unlink()
    with pytest.raises(DareError, match="without gaps"):
        verdict.combine([tmp_path / "out-a"], tmp_path / "y")


def test_the_script_rejects_bad_options():
    for args in (["--bogus"], ["a,b"], ["--models", "VGG 16"], ["--models"]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith("error: "), (args, proc.stderr)


# ---------------------------------------------------------------------------- end to end
def _jax_python() -> str | None:
    """A Python with JAX and without TensorFlow: ``.venv-jax``'s, or this one if it is such."""
    for py in (ROOT / ".venv-jax" / "bin" / "python", Path(sys.executable)):
        if py.is_file() and subprocess.run(
                [str(py), "-c", "import importlib.util as u, sys; "
                 "sys.exit(0 if u.find_spec('jax') and not u.find_spec('tensorflow') else 1)"],
                capture_output=True).returncode == 0:
            return str(py)
    return None


@pytest.mark.slow
@pytest.mark.jax
@pytest.mark.skipif(os.environ.get("KERAS_BACKEND") != "jax",
                    reason="runs once, in the JAX tier (scripts/test.sh)")
def test_the_gpu_script_runs_the_verdict_at_the_dry_scale_without_tensorflow(tmp_path):
    """AlexNet only: the two VGGs cost 20-30 more minutes on 2 cores at the dry scale under
    JAX (XLA's CPU convolutions); ``scripts/gpu-verdict.sh 0 --dry`` runs all three."""
    py = _jax_python()
    if py is None:
        pytest.skip("no Python with JAX and without TensorFlow (.venv-jax)")
    attacks = ",".join(VERDICT_ATTACKS)
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TMPDIR": str(tmp_path)}
    env.pop("DAREKIT_RUNS", None)
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT), "0", "--dry", "--models", "alexnet",
                           "--attacks", attacks,
                           "--python", py, "--out", str(out), "--work", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=3600, env=env, cwd="/")
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    back = sorted(p for p in out.rglob("*") if p.is_file())
    assert 1 <= len(back) <= 8 and all(p.stat().st_size < MIB16 for p in back), back
    tag = "verdict-verdict-dry-alexnet-s0"
    assert {p.name for p in back} == {f"{tag}.tar.gz", f"{tag}.log"}
    with tarfile.open(out / f"{tag}.tar.gz") as tar:
        names = tar.getnames()
    assert not any(n.endswith((".h5", ".keras")) or "/history/" in n or "/models/" in n
                   for n in names)
    timing = io.read_json(tmp_path / "w" / f"gpu-{tag}" / "timing.json")
    assert timing["exit_code"] == 0
    # Only the last epoch's weights are left on the GPU machine's disk after mining.
    run = Run(tmp_path / "w" / "runs" / "fashion_mnist-alexnet-verdict-dry-s0")
    assert run.history_epochs() == [2]

    combined = tmp_path / "combined"
    code = verdict.main(["combine", str(out), "--out", str(combined)])
    assert code == 0
    res = io.read_json(combined / "results.json")
    assert {f["arch"] for f in res["runs"]} == {"alexnet"}
    assert {r["arch"] for r in res["rows"]} == {"alexnet"}
    assert {r["attack"] for r in res["rows"]} >= set(attacks.split(","))
    assert all(f["versions"]["backend"] == "jax" for f in res["runs"])
    for name in ("report.md", "results.json", "results.csv", "er.png"):
        assert 0 < (combined / name).stat().st_size < MIB16
    print(f"gpu-verdict.sh --dry, AlexNet, 1 seed: {seconds:.0f}s; "
          f"{timing['seconds']}")
