"""Importing a foreign Keras classifier with its ModelCheckpoint history as a run directory."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import keras
import numpy as np
import pytest
from conftest import call_script, run_script
from keras import layers
from test_export import logits_without_darekit

from darekit import io, layout, slicing
from darekit.dare import DareConfig, run_dare
from darekit.data import Dataset, load_dataset, make_split
from darekit.errors import DareError
from darekit.importer import (
    DEFAULT_DARE_LR,
    IMPORTED,
    ImportConfig,
    epoch_of,
    find_checkpoints,
    import_history,
    import_model,
    read_split,
)
from darekit.mining import MineConfig, run_mining
from darekit.rundir import Run
from darekit.slicing import SliceConfig, run_slicing

LAYERS = ("relu2", "fc_relu")
EPOCHS = 3


def cnn(head: str = "dense-softmax", shape=(28, 28, 1), seed: int = 0) -> keras.Model:
    """A small functional CNN with separate ReLU layers; ``head`` picks the output:
    ``dense-softmax`` (``Dense(10, activation="softmax")``), ``softmax-layer`` (a trailing
    ``Softmax``), ``activation-softmax`` (``Activation("softmax")``), ``activation-linear``,
    ``logits`` (linear), ``sigmoid``, ``relu-layer`` or ``lambda-softmax`` (a softmax no
    layer type reveals)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape)
    x = layers.Conv2D(8, 3, padding="same", name="conv1")(inp)
    x = layers.ReLU(name="relu1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(16, 3, padding="same", name="conv2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(32, name="fc")(x)
    x = layers.ReLU(name="fc_relu")(x)
    activation = {"dense-softmax": "softmax", "sigmoid": "sigmoid"}.get(head)
    x = layers.Dense(10, activation=activation, name="out")(x)
    if head == "softmax-layer":
        x = layers.Softmax(name="probs")(x)
    elif head in ("activation-softmax", "activation-linear"):
        x = layers.Activation(head.split("-")[1], name="probs")(x)
    elif head == "relu-layer":
        x = layers.ReLU(name="probs")(x)
    elif head == "lambda-softmax":
        x = layers.Lambda(keras.ops.softmax, name="probs")(x)
    return keras.Model(inp, x, name=f"foreign_{head.replace('-', '_')}")


def fake_dataset(n: int = 100, seed: int = 0) -> Dataset:
    """Fashion-MNIST-shaped random images with random labels (no files needed)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, 28, 28, 1)).astype("float32")
    y = np.arange(n, dtype=np.int64) % 10
    return Dataset("fashion_mnist", x, y, x.copy(), y.copy(), tuple(str(i) for i in range(10)))


# --------------------------------------------------------------------------- checkpoint names
@pytest.mark.parametrize("stem, epoch, template", [
    ("epoch_03", 3, "epoch_#"),
    ("epoch_3-0.45", 3, "epoch_#-F"),        # ModelCheckpoint's {epoch}-{val_loss:.2f}
    ("model.03-0.45", 3, "model.#-F"),
    ("Epoch12", 12, "Epoch#"),
    ("run2-ckpt-07", 7, "run2-ckpt-#"),       # no "epoch": the last integer
    ("final", None, None),
])
def test_epoch_numbers_in_names(stem, epoch, template):
    assert epoch_of(stem) == (None if epoch is None else (epoch, template))


def test_checkpoints_are_ordered_by_epoch_number(tmp_path):
    for name in ("epoch_10.keras", "epoch_2.keras", "epoch_1.keras", "notes.txt", "log.csv"):
        (tmp_path / name).touch()
    found = find_checkpoints(tmp_path)
    assert [c.epoch for c in found] == [1, 2, 10]
    assert [c.path.name for c in found] == ["epoch_1.keras", "epoch_2.keras", "epoch_10.keras"]


@pytest.mark.parametrize("names, message", [
    ((), "no checkpoints"),
    (("notes.txt",), "no checkpoints"),
    (("epoch_01.keras", "epoch_02.weights.h5"), "mixes .keras and .weights.h5"),
    (("epoch_01.keras", "best.keras"), "no epoch number"),
    (("epoch_01.keras", "model_02.keras"), "mixed checkpoint names"),
    (("epoch_1.keras", "epoch_01.keras"), "both claim epoch 1"),
])
def test_bad_checkpoint_folders_are_refused(tmp_path, names, message):
    for name in names:
        (tmp_path / name).touch()
    with pytest.raises(DareError, match=message):
        find_checkpoints(tmp_path)


# --------------------------------------------------------------------------- the model
@pytest.mark.parametrize("head", ["dense-softmax", "softmax-layer", "activation-softmax",
                                  "activation-linear", "logits"])
def test_softmax_outputs_are_stripped(head):
    model, data = cnn(head), fake_dataset()
    imp = import_model(model, data, layers=LAYERS, check_images=50)
    logits = imp.model
    assert logits.layers[-1].name == "logits"
    assert logits.get_layer("logits").activation is keras.activations.linear
    assert imp.trace_layers == LAYERS
    assert any("softmax" in n for n in imp.notes) == ("softmax" in head)
    x = data.x_test[:16]
    z = np.asarray(logits(x, training=False))
    p = np.asarray(model(x, training=False))
    if "softmax" not in head:
        np.testing.assert_allclose(z, p, atol=1e-6)
    else:
        np.testing.assert_allclose(np.asarray(keras.ops.softmax(z)), p, atol=1e-5)
    # New weights in the source reach the renamed copy of its output layer through sync().
    model.get_layer("out").set_weights([w + 1.0 for w in model.get_layer("out").get_weights()])
    imp.sync()
    for a, b in zip(logits.get_layer("logits").get_weights(),
                    model.get_layer("out").get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sequential_models_are_imported():
    model = keras.Sequential([keras.Input((28, 28, 1)), layers.Conv2D(4, 3, name="conv"),
                              layers.ReLU(name="relu"), layers.Flatten(name="flatten"),
                              layers.Dense(10, activation="softmax", name="out")])
    imp = import_model(model, fake_dataset(), layers=("relu",), check_images=50)
    x = fake_dataset().x_test[:4]
    np.testing.assert_allclose(np.asarray(keras.ops.softmax(imp.model(x))), model(x), atol=1e-5)


@pytest.mark.parametrize("head, message", [
    ("sigmoid", "applies 'sigmoid'"),
    ("relu-layer", "applies 'ReLU'"),
    ("lambda-softmax", "probabilities"),
])
def test_non_logit_outputs_are_refused(head, message):
    with pytest.raises(DareError, match=message):
        import_model(cnn(head), fake_dataset(), layers=LAYERS, check_images=50)


@pytest.mark.parametrize("shape, message", [
    ((32, 32, 1), r"inputs of shape \(32, 32, 1\)"),
    ((1, 28, 28), "channels-first"),
    ((784,), "NHWC"),
])
def test_wrong_input_shapes_are_refused(shape, message):
    inp = keras.Input(shape)
    model = keras.Model(inp, layers.Dense(10)(layers.Flatten()(inp)))
    with pytest.raises(DareError, match=message):
        import_model(model, fake_dataset(), layers=LAYERS)


def test_unknown_layers_are_refused():
    with pytest.raises(DareError, match=r"no layer\(s\) \['relu9'\]"):
        import_model(cnn(), fake_dataset(), layers=("relu9",), check_images=50)


def test_layers_are_found_or_asked_for(monkeypatch):
    model, data = cnn(), fake_dataset()
    if hasattr(slicing, "find_trace_layers"):
        found = import_model(model, data, check_images=50).trace_layers
        assert found == slicing.find_trace_layers(import_model(model, data, layers=LAYERS,
                                                               check_images=50).model)
    monkeypatch.delattr(slicing, "find_trace_layers", raising=False)
    with pytest.raises(DareError, match="pass --layers"):
        import_model(model, data, check_images=50)


def test_near_chance_accuracy_is_a_warning():
    # Random labels: any model is at chance, as one fed pixels on the wrong scale would be.
    imp = import_model(cnn(), fake_dataset(), layers=LAYERS, check_images=50)
    assert any("near chance" in w for w in imp.warnings)


def test_split_files_are_checked(tmp_path):
    path = tmp_path / "split.npz"
    io.write_npz(path, train_idx=np.array([3, 1]), validation_idx=np.array([0, 2]))
    split = read_split(path, 4, seed=5)
    assert split.train_idx.tolist() == [1, 3] and split.validation_idx.tolist() == [0, 2]
    assert split.seed == 5 and split.subset is None
    bad = {"overlap": ([0, 1], [1, 2]), "outside": ([0, 9], [1]), "repeats": ([0, 0], [1])}
    for message, (t, v) in bad.items():
        io.write_npz(path, train_idx=np.array(t), validation_idx=np.array(v))
        with pytest.raises(DareError, match=message):
            read_split(path, 4, seed=0)
    io.write_npz(path, train_idx=np.array([0]))
    with pytest.raises(DareError, match="no validation_idx"):
        read_split(path, 4, seed=0)


# --------------------------------------------------------------------------- real training
@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> SimpleNamespace:
    """``cnn()`` trained by plain ``model.fit`` for 3 epochs on 1000 real Fashion-MNIST images,
    with both kinds of ModelCheckpoint history; plus the probabilities of every checkpoint on
    100 test images."""
    root = tmp_path_factory.mktemp("foreign")
    data = load_dataset("fashion_mnist")
    idx = make_split(data.y_train, seed=0, subset=2000).train_idx  # x_train of a 2000 subset
    model = cnn()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(data.x_train[idx], data.y_train[idx], epochs=EPOCHS, batch_size=64, verbose=0,
              callbacks=[
                  keras.callbacks.ModelCheckpoint(str(root / "keras" / "epoch_{epoch:02d}.keras")),
                  keras.callbacks.ModelCheckpoint(
                      str(root / "weights" / "epoch_{epoch:02d}.weights.h5"),
                      save_weights_only=True)])
    model.save(root / "model.keras")
    x = data.x_test[:100]
    probs = {e: np.asarray(keras.saving.load_model(root / "keras" / f"epoch_{e:02d}.keras",
                                                   compile=False)(x, training=False))
             for e in range(1, EPOCHS + 1)}
    split = make_split(data.y_train, seed=0, subset=2000)
    io.write_npz(root / "split.npz", train_idx=split.train_idx,
                 validation_idx=split.validation_idx)
    return SimpleNamespace(root=root, model=root / "model.keras", keras=root / "keras",
                           weights=root / "weights", split=split, x=x, probs=probs)


def _assert_reproduces_history(run: Run, foreign: SimpleNamespace) -> None:
    assert run.history_epochs() == list(range(1, EPOCHS + 1))
    for epoch, probs in foreign.probs.items():
        z = np.asarray(run.load_model(epoch)(foreign.x, training=False))
        assert np.array_equal(z.argmax(1), probs.argmax(1)), epoch
        np.testing.assert_allclose(np.asarray(keras.ops.softmax(z)), probs, atol=1e-5)


@pytest.mark.slow
def test_import_then_slice_mine_and_dare(foreign, tmp_path, capsys):
    cfg = ImportConfig(model=str(foreign.model), history=str(foreign.keras),
                       dataset="fashion_mnist", layers=LAYERS, run_dir=str(tmp_path / "run"))
    run = import_history(cfg)
    out, err = capsys.readouterr()
    assert "stripped the softmax activation of the output layer 'out'" in out
    assert "warning: no --split: created a seeded stratified 50/50 split" in err
    assert "x_validation" in err

    run = Run.open(run.path)
    train = run.train_config
    assert train["model"] == IMPORTED and train["dataset"] == "fashion_mnist"
    assert train["input_shape"] == [28, 28, 1] and train["num_classes"] == 10
    assert train["epochs"] == EPOCHS and run.completed_epochs() == EPOCHS
    assert run.trace_layers == LAYERS and run.dare_lr == DEFAULT_DARE_LR
    assert train["source_model"] == str(foreign.model.resolve())
    assert (run.path / layout.ARCHITECTURE).is_file()
    assert run.split() == make_split(load_dataset("fashion_mnist").y_train, 0)
    assert not list(run.path.parent.glob(f"*{io.TMP_MARK}*"))  # the temporary is gone
    _assert_reproduces_history(run, foreign)

    sliced = run_slicing(run, SliceConfig(max_per_class=5, mode="approx"), log=lambda s: None)
    assert set(sliced.scores) == set(LAYERS) and (run.path / layout.MASKS).is_file()
    mined = run_mining(run, MineConfig(max_inputs=100), log=lambda s: None)
    assert set(mined.stats["mining_epochs"]) == {1, 2, 3} and len(mined.y) > 0
    result = run_dare(run, DareConfig(epochs=1, verbose=0), log=lambda s: None)
    assert result.summary["status"] == "ok"
    assert run.named_models() == ["original", "dare"]

    # The derived classifier's standalone file gives its logits without darekit.
    tuned = np.asarray(run.load_named("dare")(foreign.x[:8], training=False))
    exported = logits_without_darekit(run.export_path("dare"), foreign.x[:8], tmp_path)
    np.testing.assert_allclose(exported, tuned, atol=1e-5)


@pytest.mark.slow
def test_import_weights_history_with_split_by_script(foreign, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_script("train/import_history.py", "--model", foreign.model, "--history",
                      foreign.weights, "--dataset", "fashion_mnist", "--split",
                      foreign.root / "split.npz", "--layers", ",".join(LAYERS), "--run-dir",
                      run_dir, "--dare-lr", "1e-3")
    assert f"run directory: {run_dir}" in proc.stdout
    assert "warning: no --split" not in proc.stderr
    run = Run.open(run_dir)
    split = run.split()
    assert np.array_equal(split.train_idx, foreign.split.train_idx)
    assert np.array_equal(split.validation_idx, foreign.split.validation_idx)
    assert run.dare_lr == 1e-3
    _assert_reproduces_history(run, foreign)


@pytest.mark.slow
def test_script_errors_are_one_line_and_write_nothing(foreign, tmp_path):
    unnumbered = tmp_path / "unnumbered"
    unnumbered.mkdir()
    shutil.copy(foreign.keras / "epoch_01.keras", unnumbered / "epoch_01.keras")
    shutil.copy(foreign.keras / "epoch_02.keras", unnumbered / "best.keras")
    wide = tmp_path / "wide"  # a model for 32x32 inputs, with one checkpoint of its own
    (wide / "ckpts").mkdir(parents=True)
    model = cnn(shape=(32, 32, 1))
    model.save(wide / "model.keras")
    model.save_weights(wide / "ckpts" / "epoch_01.weights.h5")
    (tmp_path / "empty").mkdir()
    cases = {
        "empty": (foreign.model, tmp_path / "empty", "no checkpoints in"),
        "unnumbered": (foreign.model, unnumbered, "best.keras in"),
        "input": (wide / "model.keras", wide / "ckpts", "inputs of shape (32, 32, 1)"),
    }
    for name, (model_file, history, message) in cases.items():
        run_dir = tmp_path / f"run-{name}"
        proc = run_script("train/import_history.py", "--model", model_file, "--history",
                          history, "--dataset", "fashion_mnist", "--layers", ",".join(LAYERS),
                          "--run-dir", run_dir, check=False)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], name
        assert not run_dir.exists(), name
        assert not list(tmp_path.glob(f".run-{name}*")), name


def test_script_requires_model_history_and_dataset(tmp_path):
    proc = call_script("train/import_history.py", "--history", tmp_path)
    assert proc.returncode == 2
    assert "required: --model, --dataset" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_existing_runs_are_not_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "something").touch()
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "epoch_01.keras").touch()
    cfg = ImportConfig(model=str(tmp_path / "m.keras"), history=str(tmp_path / "ckpts"),
                       dataset="fashion_mnist", run_dir=str(run_dir))
    with pytest.raises(DareError, match="is not empty"):
        import_history(cfg)
    assert [p.name for p in run_dir.iterdir()] == ["something"]


def test_config_checks():
    with pytest.raises(DareError, match="--model is required"):
        ImportConfig(history="h", dataset="fashion_mnist")
    with pytest.raises(DareError, match="unknown dataset"):
        ImportConfig(model="m", history="h", dataset="mnist")
    with pytest.raises(DareError, match="--dare-lr"):
        ImportConfig(model="m", history="h", dataset="fashion_mnist", dare_lr=0)
