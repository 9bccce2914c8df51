"""darekit.sweep and reproduce.py's sweep options: job commands, the finished-job rule, GPU
pinning, bad options; slow: two real jobs on Ray, and a sweep whose failed job a rerun completes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_script

from darekit import io, layout, sweep
from darekit.data import DATASETS
from darekit.paths import ROOT

PY = sys.executable
SCRIPT = str(ROOT / "reproduce.py")


def _job(tmp_path: Path, seed: int = 0, **kw) -> sweep.Job:
    return sweep.Job("fashion_mnist", "smallcnn", "dry", seed, tmp_path / f"s{seed}",
                     ("fgsm", "pgd"), **kw)


def _finish(job: sweep.Job, **meta) -> None:
    """Write what a finished job leaves: results and a reproduce.json marked finished."""
    io.write_json(job.path / layout.RESULTS_JSON, {"results": []})
    io.write_json(job.path / layout.REPRODUCE, {**job.identity, "stages": ["train"], **meta})
    sweep.mark_finished(job.path)


# ---------------------------------------------------------------------------- the rule
def test_finished_rule(tmp_path):
    job = _job(tmp_path)
    assert not sweep.finished(job.path, job.identity)  # nothing there
    _finish(job)
    assert sweep.finished(job.path, job.identity)
    # Another job's record (other attacks, --pgd-at, profile) in the same directory: not it.
    for change in ({"attacks": ("fgsm",)}, {"pgd_at": True}, {"profile": "quick"}):
        other = sweep.Job(**{**job.__dict__, **change})
        assert not sweep.finished(other.path, other.identity)
    # A new sitting rewrites reproduce.json without the mark (as reproduce() does).
    io.write_json(job.path / layout.REPRODUCE, {**job.identity, "stages": ["train"]})
    assert not sweep.finished(job.path, job.identity)
    sweep.mark_finished(job.path)
    (job.path / layout.RESULTS_JSON).unlink()
    assert not sweep.finished(job.path, job.identity)
    (job.path / layout.RESULTS_JSON).write_text("{}")
    (job.path / layout.REPRODUCE).write_text("{trunc")
    assert not sweep.finished(job.path, job.identity)


def test_job_command_is_what_a_user_types(tmp_path):
    job = _job(tmp_path, seed=3, options=("--pgd-at",))
    assert job.command() == [PY, SCRIPT, "--dataset", "fashion_mnist", "--model", "smallcnn",
                             "--seed", "3", "--profile", "dry", "--pgd-at"]
    assert job.log == tmp_path / "s3" / "reproduce.log"


# ---------------------------------------------------------------------------- GPU pinning
def test_visible_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3,GPU-abc")
    assert sweep.visible_gpus() == ["2", "3", "GPU-abc"]
    for hidden in ("", "-1", "-1,0"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert sweep.visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(sweep.shutil, "which", lambda name: None)  # no nvidia-smi: no GPU
    assert sweep.visible_gpus() == []


def test_slot_env_pins_one_gpu_per_worker(monkeypatch):
    monkeypatch.delenv("TF_FORCE_GPU_ALLOW_GROWTH", raising=False)
    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [sweep.slot_env(k, 2, ["4", "5"]) for k in range(2)] == [
        {"CUDA_VISIBLE_DEVICES": "4"}, {"CUDA_VISIBLE_DEVICES": "5"}]
    # More workers than GPUs: k mod #GPUs, and TensorFlow must not grab a whole shared GPU.
    assert [sweep.slot_env(k, 3, ["4", "5"])["CUDA_VISIBLE_DEVICES"] for k in range(3)] == \
        ["4", "5", "4"]
    assert sweep.slot_env(2, 3, ["4", "5"])["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    # JAX would take 75% of the GPU in each job: 5 jobs on 2 GPUs share 90% of one by 3.
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert sweep.slot_env(4, 5, ["4", "5"])["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.300"
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in sweep.slot_env(0, 2, ["4", "5"])
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.2")  # the user's setting wins
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in sweep.slot_env(4, 5, ["4", "5"])
    # No GPU: the jobs split the cores.
    assert sweep.slot_env(0, 2, [], cpus=8) == {"TF_NUM_INTRAOP_THREADS": "4",
                                                "OMP_NUM_THREADS": "4"}
    assert sweep.slot_env(0, 1, []) == {}


@dataclass(frozen=True)
class _EchoJob(sweep.Job):
    """A job whose command prints its GPU and exits with ``code``: the local engine's plumbing
    without TensorFlow."""

    code: int = 0

    def command(self, python: str | None = None) -> list[str]:
        return [PY, "-c", "import os, sys; print('gpu=' + os.environ.get("
                "'CUDA_VISIBLE_DEVICES', '?')); print('oops', file=sys.stderr); "
                f"sys.exit({self.code})"]


def test_run_local_pins_logs_and_reports_failures(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "visible_gpus", lambda: ["0", "1"])
    jobs = [_EchoJob(**{**_job(tmp_path, seed=k).__dict__, "code": 3 if k == 2 else 0})
            for k in range(4)]
    lines: list[str] = []
    outcomes = sweep.run_local(jobs, workers=2, log=lines.append)
    by_seed = {o.job.seed: o for o in outcomes}
    assert sorted(by_seed) == [0, 1, 2, 3]
    assert [by_seed[k].status for k in range(4)] == ["finished", "finished", "failed",
                                                     "finished"]
    assert by_seed[2].returncode == 3
    gpus = set()
    for j in jobs:
        text = j.log.read_text()
        assert text.startswith("\n=== ") and "oops" in text  # stderr is in the log too
        gpus.add(text.rsplit("gpu=", 1)[1].split()[0])
    assert gpus == {"0", "1"}  # two workers: each on its own GPU


def test_run_sweep_skips_finished_and_lists_failures(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "visible_gpus", lambda: [])
    done, fails, runs = (_EchoJob(**{**_job(tmp_path, seed=k).__dict__, "code": c})
                         for k, c in ((0, 0), (1, 5), (2, 0)))
    _finish(done)
    # The third exits 0 without finishing (no results): a failure too, by the rule.
    combined: list[list[sweep.Job]] = []

    def combine(finished_jobs):
        combined.append(finished_jobs)
        return tmp_path / "report.md"

    code = sweep.run_sweep([done, fails, runs], combine, workers=1, log=print)
    out, err = capsys.readouterr()
    assert code == 1
    assert not done.log.exists()  # skipped: no process started
    assert f"failed: {fails.name} (exit 5); log: {fails.log}" in err
    assert f"failed: {runs.name} (exited 0 but left no finished job)" in err
    assert combined == [[done]] and "combined report:" in out


# ---------------------------------------------------------------------------- command line
JOBS9 = [(d, m) for d in ("cifar10", "svhn", "fashion_mnist") for m in ("vgg16", "vgg19",
                                                                          "alexnet")]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """reproduce.py's main in this process: (exit code, stdout, stderr)."""
    from darekit.cli.reproduce import main

    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_list_jobs_prints_one_command_per_job_and_runs_nothing(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv("DAREKIT_RUNS", str(runs))
    # As a user runs it (a subprocess, from another directory) ...
    proc = run_script("reproduce.py", "--profile", "paper", "--datasets",
                      "cifar10,svhn,fashion_mnist", "--models", "vgg16,vgg19,alexnet",
                      "--seeds", "0", "--list-jobs")
    assert proc.stdout.splitlines() == [
        f"{PY} {SCRIPT} --dataset {d} --model {m} --seed 0 --profile paper" for d, m in JOBS9]
    # ... and with the options a job's command must carry.
    code, out, _ = _cli(capsys, "--profile", "dry", "--model", "smallcnn", "--seeds", "1,2,1",
                        "--pgd-at", "--attack", "fgsm", "--attack", "cw", "--list-jobs")
    assert code == 0 and out.splitlines() == [
        f"{PY} {SCRIPT} --dataset fashion_mnist --model smallcnn --seed {s} --profile dry "
        "--pgd-at --attack fgsm,cw" for s in (1, 2)]  # the repeated seed is one job
    assert not runs.exists()


def test_deterministic_overrides_the_profile_and_travels_with_each_job(tmp_path, capsys,
                                                                       monkeypatch):
    """quick runs with XLA (not bit for bit); --deterministic turns op determinism on for one
    job run here and is carried in every job's command of a sweep, and --no-deterministic
    turns it off for a deterministic profile."""
    import darekit.reproduce as R

    monkeypatch.setenv("DAREKIT_RUNS", str(tmp_path / "runs"))
    seen: list = []
    monkeypatch.setattr(R, "reproduce_all", lambda studies, *a, **k: seen.extend(studies))
    monkeypatch.setattr(R, "check", lambda s, data=True: None)
    assert not R.PROFILES["quick"].deterministic and R.PROFILES["study"].deterministic
    for args, want in (([], False), (["--deterministic"], True)):
        seen.clear()
        code, _, err = _cli(capsys, "--profile", "quick", "--model", "smallcnn", *args)
        assert code == 0, err
        assert [s.profile.deterministic for s in seen] == [want]
        assert seen[0].profile.name == "quick"  # the same job, in another mode
    seen.clear()
    code, _, err = _cli(capsys, "--profile", "study", "--no-deterministic")
    assert code == 0 and [s.profile.deterministic for s in seen] == [False], err
    code, out, _ = _cli(capsys, "--profile", "quick", "--model", "smallcnn", "--seeds", "0,1",
                        "--deterministic", "--list-jobs")
    assert code == 0 and out.splitlines() == [
        f"{PY} {SCRIPT} --dataset fashion_mnist --model smallcnn --seed {s} --profile quick "
        "--deterministic" for s in (0, 1)]


@pytest.mark.parametrize("args, message", [
    (["--datasets", "cifar10,mnist"], "unknown dataset 'mnist'"),
    (["--models", "vgg16,vgg17"], "unknown model 'vgg17'"),
    (["--jobs", "0"], "argument --jobs: expected a positive integer, received 0"),
    (["--seeds", "0,1", "--run-dir", "/tmp/x"], "--run-dir names one job's directory"),
    (["--address", "auto"], "--address: only with --engine ray"),
    (["--cpus-per-job", "2"], "--cpus-per-job: only with --engine ray"),
    (["--engine", "spark"], "invalid choice: 'spark'"),
    (["--seeds", ""], "no job"),
    (["--attack", "fgsm,nope"], "unknown attack 'nope'"),
])
def test_bad_options_fail_before_anything_starts(args, message, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv("DAREKIT_RUNS", str(runs))
    code, out, err = _cli(capsys, "--profile", "dry", "--models", "smallcnn", *args)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert out == "" and not runs.exists()


def test_bad_option_exit_code_from_the_shell(tmp_path):
    proc = run_script("reproduce.py", "--datasets", "cifar10,mnist", "--jobs", "2",
                      check=False, env={"DAREKIT_RUNS": str(tmp_path / "runs")})
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown dataset 'mnist'")


def test_ray_is_optional(tmp_path):
    # One fresh interpreter: darekit and a sweep without --engine ray never import Ray; with
    # Ray unimportable (sys.modules["ray"] = None), --engine ray is a one-line error.
    code = """if True:
        import sys
        from darekit.cli.reproduce import main
        import darekit.sweep
        assert main(['--profile', 'dry', '--seeds', '0,1', '--list-jobs']) == 0
        assert 'ray' not in sys.modules, 'ray was imported'
        sys.modules['ray'] = None
        assert main(['--profile', 'dry', '--seeds', '0,1', '--engine', 'ray']) == 2
        """
    proc = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "DAREKIT_RUNS": str(tmp_path / "runs")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --engine ray needs Ray, which is not installed: pip install "
        "'darekit[cluster]' (or pip install 'ray[default]')"]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- real jobs
def _real_fashion_mnist() -> None:
    from darekit.data import FASHION_MNIST_SYSTEM_DIR

    if not all((FASHION_MNIST_SYSTEM_DIR / f).is_file()
               for f in DATASETS["fashion_mnist"].files):
        pytest.skip(f"{FASHION_MNIST_SYSTEM_DIR} not installed (dataset-fashion-mnist)")


def _two_seeds(runs: Path) -> list[Path]:
    return [runs / f"fashion_mnist-smallcnn-dry-s{s}" for s in (0, 1)]


def _assert_combined(proc: subprocess.CompletedProcess, runs: Path, seeds: str) -> None:
    report = runs / "report-dry-fashion_mnist-smallcnn-s0+1" / "report.md"
    assert f"combined report: {report}" in proc.stdout
    assert f"## smallcnn on fashion_mnist: seeds {seeds}" in report.read_text()


@pytest.mark.slow
def test_ray_local_runs_two_jobs_and_combines(tmp_path):
    pytest.importorskip("ray")
    _real_fashion_mnist()
    runs = tmp_path / "runs"
    # One attack: the engine is under test here, not the attacks (as in the rerun test).
    proc = run_script("reproduce.py", "--profile", "dry", "--model", "smallcnn", "--seeds",
                      "0,1", "--attack", "fgsm", "--engine", "ray", "--address", "local",
                      "--cpus-per-job", "1", env={"DAREKIT_RUNS": str(runs)}, timeout=1200)
    assert "each asking for 1 CPU(s) (the cluster has no GPU)" in proc.stdout
    for path in _two_seeds(runs):
        assert (path / layout.REPORT).is_file()
        assert io.read_json(path / layout.REPRODUCE)["finished"] is True
        assert "[1/" in (path / sweep.LOG).read_text()  # the job's own output is in its log
    _assert_combined(proc, runs, "0, 1")


@pytest.mark.slow
def test_rerun_skips_the_finished_job_and_completes_the_failed_one(tmp_path):
    _real_fashion_mnist()
    runs = tmp_path / "runs"
    env = {"DAREKIT_RUNS": str(runs)}
    s0, s1 = _two_seeds(runs)
    # The second job dies early, as a killed or crashed one would: a corrupt config.json.
    s1.mkdir(parents=True)
    (s1 / layout.CONFIG).write_text("{not json")
    args = ("reproduce.py", "--profile", "dry", "--model", "smallcnn", "--seeds", "0,1",
            "--jobs", "1", "--attack", "fgsm")
    first = run_script(*args, check=False, env=env)
    assert first.returncode == 1, first.stderr
    assert "failed: fashion_mnist smallcnn seed 1 (exit " in first.stderr
    assert f"; log: {s1 / sweep.LOG}" in first.stderr
    assert (s0 / layout.REPORT).is_file() and not (s1 / layout.RESULTS_JSON).exists()
    _assert_combined(first, runs, "0")  # the report covers what finished

    (s1 / layout.CONFIG).unlink()
    second = run_script(*args, env=env)
    assert "[skipped] fashion_mnist smallcnn seed 0: finished already" in second.stdout
    assert (s0 / sweep.LOG).read_text().count("\n=== ") == 1  # not started again
    assert (s1 / sweep.LOG).read_text().count("\n=== ") == 2
    assert sweep.finished(s1, {**sweep.identity(_job(runs, 1)), "attacks": ["fgsm"]})
    _assert_combined(second, runs, "0, 1")
