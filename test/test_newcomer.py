"""What a newcomer meets (issue 16): no silent no-ops, degenerate outcomes warned about, corrupt
and unwritable files named in one line, one learning-rate story, and debts paid once.

Fast tier: every run here is built by hand (a ``smallcnn`` with its random initial weights as
its one-epoch history, a small split of the real Fashion-MNIST), nothing is trained.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import call_script

from darekit import io, layout, report
from darekit.dare import DareConfig, empty_slice_classes, save_result, tune
from darekit.data import make_split
from darekit.errors import DareError
from darekit.mining import TARGET, MineResult
from darekit.models import DEFAULT_DARE_LR, get_architecture
from darekit.paths import ROOT
from darekit.rundir import Run
from darekit.traces import get_ats

LAYERS = ("block2_relu1", "fc1_relu")  # smallcnn's traced layers


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return get_architecture("smallcnn").build((28, 28, 1), 10)


def _mined(model: keras.Model, n: int = 40, classes: int = 10) -> MineResult:
    """Stage 2's data made by hand: random images, labels 0..classes-1, the model's own traces
    as targets (so DARE's loss starts at 0 and a tiny lr moves nothing)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (n, 28, 28, 1)).astype("float32")
    y = np.arange(n, dtype=np.int64) % classes
    targets = get_ats(model, x, LAYERS, 64)
    return MineResult(x, y, targets, np.zeros(n, bool), np.ones(n, np.int64),
                      np.arange(n, dtype=np.int64), np.ones(n, np.int64), {})


def _masks(model: keras.Model, empty: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    out = {}
    for name in LAYERS:
        m = np.ones((10, int(model.get_layer(name).output.shape[-1])), bool)
        m[list(empty)] = False
        out[name] = m
    return out


@pytest.fixture
def hand_run(tmp_path) -> Path:
    """A run directory as train.py leaves it (config, split, a one-epoch history), plus the
    slice and the mined data dare.py reads: built by hand, in a second."""
    from darekit.data import load_dataset

    path = tmp_path / "run"
    ds = load_dataset("fashion_mnist")
    split = make_split(ds.y_train, seed=0, subset=200)
    split.save(path / layout.SPLIT)
    io.write_json(path / layout.CONFIG, {"train": {
        "model": "smallcnn", "dataset": "fashion_mnist", "seed": 0, "input_shape": [28, 28, 1],
        "num_classes": 10, "test_subset": 100}})
    model = _model()
    io.save_with(path / layout.epoch_file(1), model.save_weights)
    io.write_json(path / layout.PROGRESS, {"epoch": 1})
    io.write_npz(path / layout.MASKS, **_masks(model))
    mined = _mined(model)
    io.write_npz(path / layout.MINED, x=mined.x, y=mined.y, anchor=mined.anchor,
                 epoch=mined.epoch, index=mined.index, patches=mined.patches,
                 **{TARGET + k: v for k, v in mined.targets.items()})
    return path


# ============================================================================ item 4: no-ops
def test_a_run_whose_weights_did_not_move_is_a_no_op_not_ok(capsys):
    model = _model()
    res = tune(model, _mined(model), DareConfig(variant="dare-s", lr=1e-30, epochs=1,
                                                verbose=0), layers=LAYERS)
    assert res.status == "no-op" and res.summary["status"] == "no-op"
    assert res.summary["moved"] is False and "did not move" in res.summary["why"]
    assert "not a result" in capsys.readouterr().err


def test_a_no_op_saves_no_model_and_is_listed_as_not_a_result(hand_run):
    run = Run.open(hand_run)
    run.save_model(run.load_model(), "dare-s")  # an older model: must not stay behind
    model = run.load_model()
    cfg = DareConfig(variant="dare-s", lr=1e-30, epochs=1, verbose=0)
    res = save_result(run, cfg, tune(model, _mined(model), cfg, layers=LAYERS),
                      log=lambda s: None)
    assert res.status == "no-op"
    assert not run.model_path("dare-s").exists() and not run.export_path("dare-s").exists()
    saved = io.read_json(run.file(layout.dare_summary("dare-s")))["dare"]["summary"]
    assert saved["status"] == "no-op" and "did not move" in saved["why"]
    assert run.not_results()["dare-s"]["status"] == "no-op"
    assert "dare-s" not in run.diverged_models() and "dare-s" not in run.named_models()


def test_an_older_summary_that_did_not_move_is_not_evaluated(hand_run):
    """A run saved before ``no-op`` existed: ``status: ok``, ``moved: false``, a model file."""
    run = Run.open(hand_run)
    run.save_model(run.load_model(), "dare")
    run.write_config(layout.dare_summary("dare"), "dare",
                     {"lr": 1e-7, "summary": {"status": "ok", "moved": False}})
    assert run.named_models() == ["original"]
    assert run.not_results()["dare"] == {"status": "no-op", "lr": 1e-7, "log": None,
                                         "why": "the weights did not move"}


def test_the_script_exits_non_zero_on_a_no_op(hand_run):
    proc = call_script("dare/dare-s.py", "--run-dir", hand_run, "--lr", "1e-30", "--epochs",
                       "1", "--verbose", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: dare-s at lr 1e-30: the weights did not move")
    assert "not a result" in proc.stderr.strip().splitlines()[-1]
    status = io.read_json(hand_run / layout.dare_summary("dare-s"))["dare"]["summary"]["status"]
    assert status == "no-op" and not Run(hand_run).model_path("dare-s").exists()


def _row(model, status="ok", **kw):
    base = {"dataset": "fashion_mnist", "arch": "smallcnn", "attack": "fgsm", "model": model,
            "er": 0.1, "er_low": 0.09, "er_high": 0.11, "success_rate": 1.0, "comparable": True,
            "clean_accuracy": 0.9, "robust_accuracy": 0.2, "budget": 0.1, "norm": "linf",
            "seed": 0, "status": status}
    return {**base, **kw}


def test_the_report_marks_a_no_op_and_says_why(tmp_path):
    rows = [_row("original"), _row("dare", "no-op", er=math.nan, lr=1e-7,
                                   why="the weights did not move (largest relative change "
                                   "0 <= 1e-06); try a larger lr")]
    n = 4
    parts = {("original", "fgsm"): {"fooled": np.ones(n, bool), "perturbation": np.ones(n),
                                    "x_norm": np.full(n, 10.0), "clean_correct": np.ones(n, bool)}}
    path = report.write_run_report(tmp_path, {"run": "r", "results": rows}, parts)
    text = path.read_text()
    table = next(line for line in text.splitlines() if line.startswith("| smallcnn | fgsm |"))
    assert table.endswith("| no-op |")                   # no figures, not bold, not ranked
    assert "- **dare**: no-op at lr 1e-07: the weights did not move" in text
    result = io.read_json(tmp_path / "results.json")["results"]
    assert [r["best"] for r in result] == [True, False]


def test_the_combined_report_lists_a_seed_that_was_a_no_op(tmp_path):
    evals = []
    for seed in (0, 1):
        rows = [_row("original", seed=seed),
                _row("dare", seed=seed, er=0.2) if seed == 0 else
                _row("dare", "no-op", seed=seed, er=math.nan, lr=1e-7)]
        io.write_json(tmp_path / f"s{seed}" / layout.RESULTS_JSON, {"results": rows})
        evals.append(report.Evaluated.load(tmp_path / f"s{seed}"))
    text = report.combined_report(evals)
    assert "(1 no-op)" in text and "- **dare (s1)**: no-op at lr 1e-07" in text


# ---------------------------------------------------------------------------- degenerate
def test_classes_with_an_empty_slice_are_named(capsys):
    model = _model()
    masks = _masks(model, empty=(3, 7))
    assert empty_slice_classes(masks) == {n: [3, 7] for n in LAYERS}
    assert empty_slice_classes(_masks(model)) == {}
    tune(model, _mined(model), DareConfig(lr=1e-3, epochs=1, verbose=0), masks=masks,
         layers=LAYERS)
    err = capsys.readouterr().err
    assert f"classes [3, 7] have an empty slice in layer {LAYERS[0]!r}" in err
    assert "8 of 40 samples" in err  # 4 images each of classes 3 and 7


# ---------------------------------------------------------------------------- lr story
def test_one_learning_rate_story():
    """The README's notebook example, the import default and the registry agree: a model
    outside the registry starts at ``DEFAULT_DARE_LR``; every comment in the architecture
    files that states a ``dare_lr`` states the registered one."""
    from darekit.importer import ImportConfig

    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(import darekit as dk.*?)```", readme, re.S).group(1)
    lr = float(re.search(r"DareConfig\(lr=([0-9.e-]+)\)", snippet).group(1))
    assert lr == DEFAULT_DARE_LR == ImportConfig(model="m", history="h",
                                                 dataset="fashion_mnist").dare_lr
    for path in sorted((ROOT / "darekit" / "models").glob("*.py")):
        src = path.read_text()
        registered = {float(v) for v in re.findall(r"^\s*dare_lr=([0-9.e-]+)", src, re.M)}
        for stated in re.findall(r"#.*\bdare_lr:? ([0-9][0-9.e-]*)", src):
            assert float(stated.rstrip(".")) in registered, (path.name, stated, registered)


# ============================================================================ item 5: files
@pytest.mark.parametrize("rel", [layout.CONFIG, layout.MASKS, layout.MINED])
def test_a_truncated_file_stops_the_script_with_one_line_naming_it(hand_run, rel):
    path = hand_run / rel
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    proc = call_script("dare/dare.py", "--run-dir", hand_run, "--epochs", "1", "--verbose", "0")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path} is corrupt or truncated")
    assert "rerun" in lines[0] or "train it again" in lines[0]
    assert not (hand_run / layout.MODELS).exists()


def test_readers_name_the_file_and_keep_a_missing_file_missing(tmp_path):
    io.write_json(tmp_path / "a.json", {"x": 1})
    io.write_npz(tmp_path / "ats" / "a.npz", x=np.arange(1000))
    (tmp_path / "a.json").write_text('{"x": ')
    p = tmp_path / "ats" / "a.npz"
    p.write_bytes(p.read_bytes()[:100])
    for read, path in ((io.read_json, tmp_path / "a.json"), (io.read_npz, p)):
        with pytest.raises(io.CorruptFileError) as e:
            read(path)
        assert isinstance(e.value, DareError) and e.value.path == path
        assert str(e.value).startswith(f"{path} is corrupt or truncated (")
        assert "\n" not in str(e.value)
    assert "rerun dare/get_ats.py" in str(io.CorruptFileError(p, ValueError("x")))
    with pytest.raises(FileNotFoundError):
        io.read_npz(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError):
        io.read_json(tmp_path / "missing.json")


def test_a_corrupt_evaluation_part_is_computed_again(hand_run, capsys):
    from darekit.evaluate import _cached

    run = Run.open(hand_run)
    calls = []

    def compute():
        calls.append(1)
        return {"summary": {"er": 0.5}}, {"a": np.arange(3)}

    key = {"n": 3}
    _cached(run, "m__fgsm", key, compute)
    stem = run.file(f"{layout.EVAL_PARTS}/m__fgsm")
    for suffix in (".json", ".npz"):
        f = stem.with_suffix(suffix)
        f.write_bytes(f.read_bytes()[:20])
        meta, arrays = _cached(run, "m__fgsm", key, compute)
        assert meta["summary"] == {"er": 0.5} and arrays["a"].tolist() == [0, 1, 2]
        err = capsys.readouterr().err
        assert f"{f} is corrupt or truncated" in err and "computing it again" in err
    assert len(calls) == 3
    _cached(run, "m__fgsm", key, compute)  # repaired: read back, not computed
    assert len(calls) == 3


def test_an_unwritable_run_fails_before_the_stage_works(hand_run, monkeypatch):
    """Tests run as root, for whom permission bits do not block writes: ``os.access`` is
    patched to deny the run directory, as it does for a user without write permission."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False
                        if Path(p) == hand_run.resolve() and mode & os.W_OK
                        else real(p, mode, *a, **k))
    with pytest.raises(DareError, match="cannot write into the run directory"):
        Run.open(hand_run, writable=True)
    Run.open(hand_run)  # reading stays possible
    proc = call_script("dare/dare-s.py", "--run-dir", hand_run, "--epochs", "1", "--verbose",
                       "0")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write into the run directory" in lines[0]
    assert not (hand_run / layout.DARE_DIR).exists()  # no work was done


def test_a_folder_that_cannot_be_created_is_one_line_even_for_root(tmp_path):
    """A real failure root meets too: the run directory's parent is a regular file."""
    (tmp_path / "file").write_text("")
    with pytest.raises(DareError, match=r"cannot write into the run directory .*file/run"):
        io.check_writable(tmp_path / "file" / "run")
    assert io.check_writable(tmp_path / "new" / "run").is_dir()


# ---------------------------------------------------------------------------- imports
def _tiny(channels: int, name: str) -> keras.Model:
    inp = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(channels, 3, name="conv")(inp)
    x = keras.layers.Flatten(name="flat")(x)
    return keras.Model(inp, keras.layers.Dense(10, name="out")(x), name=name)


def test_import_names_a_truncated_model_file_as_such(tmp_path):
    from darekit.importer import load_checkpoint, load_source_model

    _tiny(4, "a").save(tmp_path / "a.keras")
    data = (tmp_path / "a.keras").read_bytes()
    (tmp_path / "t.keras").write_bytes(data[: len(data) // 2])
    with pytest.raises(DareError) as e:
        load_source_model(tmp_path / "t.keras")
    assert "is corrupt or truncated" in str(e.value) and "not found" not in str(e.value)
    _tiny(4, "a").save_weights(tmp_path / "a.weights.h5")
    data = (tmp_path / "a.weights.h5").read_bytes()
    (tmp_path / "t.weights.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(DareError, match="t.weights.h5 is corrupt or truncated"):
        load_checkpoint(_tiny(4, "a"), tmp_path / "t.weights.h5")


def test_import_says_a_checkpoint_of_another_architecture_in_one_line(tmp_path):
    from darekit.importer import _mismatch, load_checkpoint

    _tiny(8, "b").save_weights(tmp_path / "b.weights.h5")
    with pytest.raises(DareError) as e:
        load_checkpoint(_tiny(4, "a"), tmp_path / "b.weights.h5")
    text = str(e.value)
    assert "\n" not in text and "another architecture" in text
    assert "Example error message" not in text
    # Keras' own many-line message (what a same-structure checkpoint with other shapes gives)
    keras_text = ("A total of 2 objects could not be loaded. Example error message for object "
                  "<Conv2D name=conv, built=True>:\n\nThe shape of the target variable and the "
                  "shape of the target value in `variable.assign(value)` must match. "
                  "variable.shape=(3, 3, 1, 4), Received: value.shape=(3, 3, 1, 8). Target "
                  "variable: <Variable path=conv/kernel, value=[[1.0\n 2.0]]>\n\nList of "
                  "objects that could not be loaded:\n[<Conv2D name=conv>, <Dense name=d>]")
    assert _mismatch(ValueError(keras_text)) == (
        "2 layers did not load, the first Conv2D 'conv': the model has shape (3, 3, 1, 4), "
        "the file (3, 3, 1, 8) (a checkpoint of another architecture?)")


def test_the_hand_run_is_a_real_run(hand_run):
    """The fixture the tests above use is what the package reads as a run."""
    run = Run.open(hand_run, writable=True)
    assert run.history_epochs() == [1] and run.trace_layers == LAYERS


# ---------------------------------------------------------------------------- the notebook
def test_the_notebook_import_checks_the_split_and_warns_without_one(capsys):
    """``import_model`` (model-first) checks a split as ``--split`` is checked, and without one
    says what the command line says: x_validation may hold images the model trained on."""
    from darekit.data import Dataset, Split
    from darekit.importer import check_split, import_model

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (100, 28, 28, 1)).astype("float32")
    y = np.arange(100, dtype=np.int64) % 10
    ds = Dataset("fashion_mnist", x, y, x.copy(), y.copy(), tuple(map(str, range(10))))
    overlapping = Split(np.arange(0, 60), np.arange(50, 100), seed=0, subset=None)
    with pytest.raises(DareError, match=r"overlap \(10 indices, e.g. \[50, 51, 52, 53, 54\]\)"):
        import_model(_tiny(4, "a"), ds, layers=("conv",), check_images=20, split=overlapping)
    with pytest.raises(DareError, match="outside 0..99"):
        check_split(Split(np.arange(0, 50), np.arange(50, 101), seed=0, subset=None), 100)
    capsys.readouterr()
    imp = import_model(_tiny(4, "a"), ds, layers=("conv",), check_images=20)
    err = capsys.readouterr().err
    assert "warning: no split given" in err and "x_validation" in err
    assert any("no split given" in w for w in imp.warnings)
    good = Split(np.arange(0, 50), np.arange(50, 100), seed=0, subset=None)
    imp = import_model(_tiny(4, "a"), ds, layers=("conv",), check_images=20, split=good)
    assert "no split given" not in capsys.readouterr().err


# ============================================================================ item 10: debts
def test_the_distribution_options_are_defined_once():
    import dataclasses

    from darekit import distribute
    from darekit.finetune import FinetuneConfig
    from darekit.training import TrainConfig

    one = {"devices": distribute.devices_option(), "precision": distribute.precision_option(),
           "tensorboard": distribute.tensorboard_option()}
    for cls in (TrainConfig, DareConfig, FinetuneConfig):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, field in one.items():
            got = fields[name]
            assert got.default == field.default, (cls.__name__, name)
            keys = set(field.metadata) - ({"help"} if name == "tensorboard" else set())
            assert {k: got.metadata[k] for k in keys} == {k: field.metadata[k] for k in keys}
        assert fields["tensorboard"].metadata["help"].startswith("write TensorBoard logs into")
    with pytest.raises(DareError):
        DareConfig(precision="float8")
    assert FinetuneConfig(devices=" CPU:0 ").devices == TrainConfig.resolve(
        "smallcnn", "fashion_mnist", devices="CPU:0").devices == "CPU:0"
    sources = {p.name: p.read_text() for p in (ROOT / "darekit").glob("*.py")}
    assert [n for n, s in sources.items() if "DEVICES_HELP" in s] == ["distribute.py"]


def test_batchnorm_is_frozen_by_one_helper_that_restores_each_layer():
    from darekit.finetune import FinetuneConfig, finetune_ce, frozen_batchnorm

    inp = keras.Input((4, 4, 1))
    h = keras.layers.BatchNormalization(name="bn_a")(inp)
    h = keras.layers.BatchNormalization(name="bn_b")(h)
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    model.get_layer("bn_b").trainable = False  # frozen by its owner: must stay frozen
    with frozen_batchnorm(model) as bn:
        assert [la.name for la in bn] == ["bn_a", "bn_b"]
        assert not any(la.trainable for la in bn)
    assert model.get_layer("bn_a").trainable and not model.get_layer("bn_b").trainable
    x = np.random.default_rng(0).uniform(0, 1, (8, 4, 4, 1)).astype("float32")
    finetune_ce(model, x, np.arange(8) % 2, FinetuneConfig(epochs=1, batch_size=8),
                eval_sets={}, verbose=0)
    assert model.get_layer("bn_a").trainable and not model.get_layer("bn_b").trainable
    sources = {p.name: p.read_text() for p in (ROOT / "darekit").glob("*.py")}
    freezers = [n for n, s in sources.items()
                if re.search(r"isinstance\(\w+, keras\.layers\.BatchNormalization\)\]", s)]
    assert freezers == ["finetune.py"]


def test_seeds_are_derived_by_one_helper_with_the_old_values():
    from darekit import advsets, crosscheck, evaluate
    from darekit.seeding import derive_seed, derive_words

    old = lambda *k: int(np.random.SeedSequence(list(k)).generate_state(1)[0] >> 1)  # noqa: E731
    for keys in ((0, 1), (7, 3, 2), (123,)):
        assert derive_seed(*keys) == old(*keys)
    assert evaluate._seed(5, 2, 1) == old(5, 2, 1) and advsets._chunk_seed(5, 4) == old(5, 4)
    np.testing.assert_array_equal(derive_words(3, 1, n=4),
                                  np.random.SeedSequence([3, 1]).generate_state(4))
    assert crosscheck is not None
    users = [p.name for p in (ROOT / "darekit").rglob("*.py") if "SeedSequence(" in
             p.read_text()]
    assert users == ["seeding.py"]


def test_training_into_a_place_it_cannot_write_fails_in_one_line_first(tmp_path, monkeypatch):
    from darekit import training

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(training, "load_dataset", lambda *a, **k: pytest.fail("work began"))
    cfg = training.TrainConfig.resolve("smallcnn", "fashion_mnist", epochs=1, subset=200,
                                       run_dir=str(tmp_path / "file" / "run"), verbose=0)
    with pytest.raises(DareError, match="cannot write into the run directory"):
        training.train(cfg)
