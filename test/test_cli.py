"""What a newcomer meets on the command line (issue 16): fast one-line errors before any
backend is imported, --backend, Ctrl-C advice that is true per script, re-evaluation that is
never silent, an installed package's folders and version, readable plots and help."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import call_script

from darekit import io, layout, paths
from darekit.cli import RERUN, RESUME, add_backend_option, spec
from darekit.paths import ROOT

PY = sys.executable
PROGS = list(spec.builders())


def _real_help(prog: str) -> str:
    p = spec.builders()[prog]()
    add_backend_option(p)
    return p.format_help()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    return {**env, **extra}


# ---------------------------------------------------------------------------- 1. fast errors
@pytest.fixture(scope="module")
def described(tmp_path_factory) -> Path:
    """A cache holding the current parsers' descriptions (as the first start after a source
    change writes it; the packaged parsers.json serves a fresh clone)."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["DAREKIT_CACHE"] = str(cache)
    try:
        spec._stored.cache_clear()
        spec.remember()   # writes to the cache unless parsers.json is current
        assert spec.load("reproduce.py") is not None, "no current description"
    finally:
        os.environ.pop("DAREKIT_CACHE")
        spec._stored.cache_clear()
    return cache


@pytest.mark.parametrize("script, args, expect", [
    ("train/train.py", ["--bogus"], "unrecognized arguments: --bogus"),
    ("dare/test.py", ["--n", "many"], "argument --n: invalid int value: 'many'"),
    ("reproduce.py", ["--profile", "huge"], "argument --profile: invalid choice: 'huge'"),
    ("dare/dare-sl.py", ["--backend", "bogus"], "argument --backend: invalid choice"),
    ("train/import_history.py", [], "the following arguments are required"),
])
def test_a_bad_option_is_one_stderr_line_before_any_backend(described, script, args, expect):
    proc = subprocess.run([PY, str(ROOT / script), *args], capture_output=True, text=True,
                          cwd="/", env=_env(DAREKIT_CACHE=str(described)), timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and expect in lines[0], \
        proc.stderr
    assert proc.stdout == ""
    # Fast because no backend is imported: checked by what was imported, not by the clock (a
    # loaded CI machine would make a time limit flaky).
    assert _backends_imported([str(ROOT / script), *args], described) == []


def _backends_imported(argv: list[str], cache: Path) -> list[str]:
    """The heavy modules (Keras, TensorFlow, JAX) that running ``argv`` imports: Python's
    ``-X importtime`` lists every module imported, on stderr."""
    proc = subprocess.run([PY, "-X", "importtime", *argv], capture_output=True, text=True,
                          cwd="/", env=_env(DAREKIT_CACHE=str(cache), COLUMNS="80"),
                          timeout=120)
    names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
             if line.startswith("import time:")}
    assert "darekit" in names, proc.stderr[-2000:]   # the check itself works
    return sorted(names & {"keras", "tensorflow", "jax"})


def test_help_is_fast_and_complete(described):
    proc = subprocess.run([PY, str(ROOT / "reproduce.py"), "--help"], capture_output=True,
                          text=True, cwd="/", env=_env(DAREKIT_CACHE=str(described),
                                                       COLUMNS="80"), timeout=120)
    assert _backends_imported([str(ROOT / "reproduce.py"), "--help"], described) == []
    assert proc.returncode == 0 and proc.stderr == ""
    assert "--backend {tensorflow,jax}" in proc.stdout and "--list-jobs" in proc.stdout


@pytest.mark.parametrize("prog", PROGS)
def test_stored_parser_has_the_real_parsers_help(prog, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    p = spec.builders()[prog]()
    add_backend_option(p)
    assert spec.parser(spec.describe(p)).format_help() == p.format_help()


def test_packaged_descriptions_match_the_parsers():
    """``darekit/cli/parsers.json`` serves a fresh clone: regenerate it with
    ``python -m darekit.cli.spec`` after changing an option."""
    stored = json.loads(spec.STORE.read_text())["parsers"]
    assert stored == json.loads(json.dumps(spec.generate()["parsers"])), \
        "darekit/cli/parsers.json is out of date: python -m darekit.cli.spec"


def test_noise_filter_keeps_real_messages():
    from darekit.cli import NOISE

    noise = ["WARNING: All log messages before absl::InitializeLog() is called are written to "
             "STDERR",
             "I0000 00:00:1795898830.311704    7404 cpu_feature_guard.cc:227] This TensorFlow "
             "binary is optimized to use available CPU instructions",
             "To enable the following instructions: AVX2 FMA, in other operations, rebuild "
             "TensorFlow with the appropriate compiler flags.",
             "I0000 00:00:1.2   77 port.cc:153] oneDNN custom operations are on."]
    kept = ["error: no run at /x", "Traceback (most recent call last):",
            "E0000 00:00:1.2   77 some.cc:1] CUDA_ERROR_OUT_OF_MEMORY"]
    assert all(NOISE.search(line) for line in noise)
    assert not any(NOISE.search(line) for line in kept)


def test_quiet_stderr_passes_other_lines(capfd):
    from darekit.cli import quiet_stderr

    with quiet_stderr():
        os.write(2, b"I0000 00:00:1.2   7 cpu_feature_guard.cc:227] optimized\nkept line\n")
    assert capfd.readouterr().err == "kept line\n"


# ---------------------------------------------------------------------------- --backend
def test_backend_flag_selects_jax_before_keras_loads(tmp_path):
    pytest.importorskip("jax")
    code = ("from darekit.cli.evaluate import main\n"
            f"rc = main(['--backend', 'jax', '--run-dir', {str(tmp_path / 'none')!r}])\n"
            "import keras\n"
            "print(keras.backend.backend(), rc)\n")
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=_env(), timeout=300)
    assert proc.stdout.split() == ["jax", "2"], proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "no run at" in proc.stderr


def test_deterministic_sets_the_xla_flag_before_keras_loads(tmp_path):
    code = ("import argparse, os, sys\n"
            "from darekit.cli import parse_args\n"
            "def build():\n"
            "    p = argparse.ArgumentParser()\n"
            "    p.add_argument('--deterministic', action=argparse.BooleanOptionalAction)\n"
            "    return p\n"
            "args = parse_args(build, sys.argv[1:], 'x.py')\n"
            "print(args.deterministic, os.environ.get('XLA_FLAGS'))\n")
    for flag, expect in (("--deterministic", "True --xla_gpu_deterministic_ops=true"),
                         ("--no-deterministic", "False None")):
        proc = subprocess.run([PY, "-c", code, flag], capture_output=True, text=True, cwd=ROOT,
                              env=_env(DAREKIT_CACHE=str(tmp_path),
                                       KERAS_BACKEND=os.environ.get("KERAS_BACKEND",
                                                                    "tensorflow")),
                              timeout=300)
        assert proc.stdout.strip() == expect, proc.stderr


def test_backend_flag_cannot_switch_a_loaded_keras():
    import keras

    other = "jax" if keras.backend.backend() == "tensorflow" else "tensorflow"
    proc = call_script("dare/test.py", "--backend", other, "--run-dir", "/nonexistent")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"dare/test.py: error: Keras is already loaded with the {keras.backend.backend()} "
        f"backend; cannot switch to {other} in this process (set KERAS_BACKEND={other} before "
        "starting Python)"]


def test_sweep_jobs_carry_the_backend(tmp_path):
    proc = call_script("reproduce.py", "--profile", "dry", "--seeds", "0,1", "--list-jobs",
                       "--backend", os.environ.get("KERAS_BACKEND", "tensorflow"),
                       env={"DAREKIT_RUNS": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all("--backend" in line for line in lines)


# ---------------------------------------------------------------------------- 2. Ctrl-C
def _interrupt(*_a, **_k):
    raise KeyboardInterrupt


@pytest.mark.parametrize("script, target, advice", [
    ("train/train.py", "darekit.training.train", RESUME),
    ("adv/adv_training.py", "darekit.adv_training.adv_train", RESUME),
    ("dare/test.py", "darekit.cli.resolve_runs", RERUN),
    ("reproduce.py", "darekit.reproduce.check", RERUN),
    ("adv/generate_adv.py", "darekit.cli.adv.resolve_run", RERUN),
    ("dare/dare.py", "darekit.cli.dare.resolve_run", None),
    ("dare/nnslicer.py", "darekit.cli.dare.resolve_run", None),
])
def test_ctrl_c_advice_is_true_for_each_script(script, target, advice, monkeypatch, tmp_path):
    monkeypatch.setattr(target, _interrupt)
    args = ["--run-dir", str(tmp_path / "run")] if script.startswith(("dare/", "adv/gen")) else []
    proc = call_script(script, *args, env={"DAREKIT_RUNS": str(tmp_path)})
    assert proc.returncode == 130, proc.stderr
    [line] = proc.stderr.splitlines()
    if advice is not None:
        assert line == advice
    prog = script
    accepts_resume = "--resume" in _real_help(prog)
    assert ("--resume" in line) == accepts_resume, (line, accepts_resume)
    assert "rerun the same command" in line


# ---------------------------------------------------------------------------- 6. re-evaluation
def _fake_evaluated_run(path: Path, **options) -> Path:
    from darekit.evaluate import EvalConfig

    io.write_json(path / layout.EVAL_CONFIG,
                  {"eval": {**asdict(EvalConfig(**options)), "test_idx": list(range(10))}})
    return path


def test_other_options_never_replace_an_evaluation_silently(tmp_path):
    run = _fake_evaluated_run(tmp_path / "run", n=100, crosscheck_n=50)
    proc = call_script("dare/test.py", "--run-dir", run)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert "--overwrite" in line and "n 100 -> 1000" in line and "crosscheck_n 50 -> None" in line
    assert json.loads((run / layout.EVAL_CONFIG).read_text())["eval"]["n"] == 100


def test_same_options_or_overwrite_go_on(tmp_path):
    from darekit.cli.evaluate import changed_options
    from darekit.evaluate import EvalConfig

    run = _fake_evaluated_run(tmp_path / "run", n=100)
    assert changed_options(run, EvalConfig(n=100)) == []
    assert changed_options(tmp_path / "never-evaluated", EvalConfig()) == []
    for args in (["--n", "100"], ["--overwrite"]):  # past the check, to the missing run
        proc = call_script("dare/test.py", "--run-dir", run, *args)
        assert proc.returncode == 2 and "no run at" in proc.stderr, proc.stderr


def test_reproduce_skip_message_names_overwrite(tmp_path, monkeypatch):
    from darekit import reproduce, sweep

    s = reproduce.Study(dataset="fashion_mnist", model="alexnet",
                        profile=reproduce.PROFILES["quick"], seed=0, run_dir=tmp_path / "r")
    monkeypatch.setattr(reproduce, "check", lambda *a, **k: None)
    monkeypatch.setattr(sweep, "finished", lambda *a, **k: True)
    said: list[str] = []
    reproduce.reproduce_all([s], log=said.append)
    assert len(said) == 1 and "--overwrite" in said[0] and "replaces" in said[0]


# ---------------------------------------------------------------------------- 7. installed
def test_installed_package_keeps_runs_and_data_out_of_site_packages(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    (site / "darekit").mkdir(parents=True)
    (site / "darekit" / "__init__.py").write_text("")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(paths, "ROOT", site)
    monkeypatch.chdir(work)
    monkeypatch.delenv("DAREKIT_RUNS", raising=False)
    monkeypatch.delenv("DAREKIT_DATA", raising=False)
    assert not paths.is_checkout()
    assert paths.runs_dir() == work / "runs" and paths.data_dir() == work / "data"
    monkeypatch.setenv("DAREKIT_RUNS", str(tmp_path / "r"))
    monkeypatch.setenv("DAREKIT_DATA", str(tmp_path / "d"))
    assert paths.runs_dir() == tmp_path / "r" and paths.data_dir() == tmp_path / "d"


def test_a_checkout_keeps_its_own_folders(monkeypatch, tmp_path):
    monkeypatch.delenv("DAREKIT_RUNS", raising=False)
    monkeypatch.delenv("DAREKIT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert paths.is_checkout()
    assert paths.runs_dir() == ROOT / "runs" and paths.data_dir() == ROOT / "data"


def test_one_version_source():
    import darekit

    proc = subprocess.run([PY, "setup.py", "--version"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == darekit.__version__


# ---------------------------------------------------------------------------- 8. plots, help
def _panels(methods: int = 6):
    from darekit import plots

    eps = np.linspace(0, 0.2, 41)
    curves = {f"m{i}": plots.Curve(eps, np.exp(-eps * (10 + i)), np.exp(-eps * (11 + i)),
                                   np.exp(-eps * (9 + i))) for i in range(methods)}
    return [plots.Panel(a, "linf", 0.1, curves) for a in ("fgsm", "pgd", "cw")]


def test_robust_accuracy_plot_says_what_the_bands_are_and_tells_curves_apart():
    from darekit import plots

    fig = plots.robust_accuracy_curves(_panels(), "t", n=100)
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "95%" in caption and "N = 100" in caption
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    lines = fig.axes[0].get_lines()[:6]
    styles = {(str(ln.get_linestyle()), ln.get_marker()) for ln in lines}
    assert len(styles) == 6  # each method its own line style and marker
    # the same method looks the same in every panel
    assert [ln.get_marker() for ln in fig.axes[0].get_lines()[:6]] == \
        [ln.get_marker() for ln in fig.axes[1].get_lines()[:6]]


def test_er_plot_says_what_the_bars_are():
    from darekit import plots

    v = np.ones((2, 3))
    fig = plots.er_bars(["a", "b", "c"], ["x", "y"], v, v - 0.1, v + 0.1, "t", n=250)
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "95%" in caption and "N = 250" in caption
    fig = plots.er_bars(["a"], ["x"], v[:1, :1], v[:1, :1], v[:1, :1], "t",
                        note="mean ± std across seeds")
    assert [t.get_text() for t in fig.texts] == ["mean ± std across seeds"]


@pytest.mark.parametrize("prog", PROGS)
def test_help_speaks_of_the_package_not_its_history(prog):
    assert not re.search(r"\bissues? ?#?\d", _real_help(prog), re.I)


def test_evaluation_progress_bar_units_are_readable(capsys):
    from linear_models import dense, inputs_where

    from darekit.evaluate import evaluate_attack

    lin = dense(seed=1)
    x, y = inputs_where(lin, lin.linf_optimum, 0.01, 0.1, n=20)
    evaluate_attack(lin.model, x, y, "fgsm", budget=0.05, progress=True)
    err = capsys.readouterr().err
    assert "attack pass" in err and "not yet bracketed" in err
    assert not re.search(r"\dround|\d+ open\b", err)
