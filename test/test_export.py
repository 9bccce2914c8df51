"""Portable outputs: models are built from Keras' own layers, and every derived classifier is
also saved as a standalone ``models/<name>.keras`` that a plain Keras opens without darekit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from darekit import io, layout
from darekit.models import ARCHITECTURES, get_architecture
from darekit.models.common import (
    NORMALIZE,
    input_block,
    normalization_stats,
    set_normalization,
)
from darekit.rundir import Run

# Runs in a fresh interpreter: -I ignores PYTHONPATH and the user site and keeps the current
# directory off sys.path, and a None entry in sys.modules makes every import of darekit (and
# so any attempt of Keras to import a darekit class named in the file) raise ImportError.
_LOAD_WITHOUT_DAREKIT = r"""
import sys
sys.modules["darekit"] = None
try:
    import darekit  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("darekit is importable; the check would prove nothing")
import keras
import numpy as np
model = keras.saving.load_model(sys.argv[1], compile=False)
np.save(sys.argv[3], np.asarray(model(np.load(sys.argv[2]), training=False)))
print(sorted({type(layer).__module__.split(".")[0] for layer in model.layers}))
"""


def logits_without_darekit(path: Path, x: np.ndarray, workdir: Path) -> np.ndarray:
    """The logits ``(N, K)`` of the ``.keras`` file ``path`` on ``x`` ``(N, H, W, C)``,
    computed by a Python process that cannot import darekit."""
    x_file, out_file = workdir / "x.npy", workdir / "logits.npy"
    np.save(x_file, x)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(workdir),
           "TF_CPP_MIN_LOG_LEVEL": "3",
           "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "tensorflow")}
    proc = subprocess.run([sys.executable, "-I", "-c", _LOAD_WITHOUT_DAREKIT, str(path),
                           str(x_file), str(out_file)], capture_output=True, text=True,
                          cwd=workdir, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "['keras']"  # every layer is Keras' own
    return np.load(out_file)


def _randomize(model: keras.Model, seed: int = 0) -> keras.Model:
    """Non-trivial weights everywhere, BN moving statistics and normalisation included, so
    that a layer lost or reset in a round trip changes the logits."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2, c).astype("float32"))
    c = model.input_shape[-1]
    set_normalization(model.get_layer(NORMALIZE), rng.uniform(0.2, 0.5, c),
                      rng.uniform(0.2, 0.4, c))
    return model


def _small_run(path: Path, model: str = "smallcnn", shape=(28, 28, 1)) -> Run:
    """A run directory with a config only: enough to save, list and load derived models."""
    run = Run(path)
    run.write_config(layout.CONFIG, "train", {"model": model, "dataset": "fashion_mnist",
                                              "seed": 0, "input_shape": list(shape),
                                              "num_classes": 10})
    return run


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architectures_have_no_custom_layers(name):
    model = ARCHITECTURES[name].build((28, 28, 1), 10)
    custom = [(la.name, type(la).__module__) for la in model.layers
              if not type(la).__module__.startswith("keras.")]
    assert custom == []
    assert isinstance(model.get_layer(NORMALIZE), keras.layers.Normalization)


def test_normalization_is_channel_standardisation():
    rng = np.random.default_rng(1)
    mean, std = rng.uniform(0, 1, 3), rng.uniform(0.1, 1, 3)
    inputs, out = input_block((5, 5, 3), min_size=5)
    model = keras.Model(inputs, out)
    set_normalization(model.get_layer(NORMALIZE), mean, std)
    x = rng.uniform(0, 1, (4, 5, 5, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(model(x)), (x - mean) / std, rtol=1e-5, atol=1e-5)
    got_mean, got_std = normalization_stats(model.get_layer(NORMALIZE))
    np.testing.assert_allclose(got_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(got_std, std, rtol=1e-6)
    # A constant channel (std 0) is divided by the floor, not by zero.
    set_normalization(model.get_layer(NORMALIZE), None, np.zeros(3))
    assert np.all(np.isfinite(np.asarray(model(x))))


def test_build_sets_statistics_through_the_registry():
    mean, std = np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.25, 0.2])
    model = get_architecture("alexnet").build((32, 32, 3), 10, mean=mean, std=std)
    got_mean, got_std = normalization_stats(model.get_layer(NORMALIZE))
    np.testing.assert_allclose(got_mean, mean, rtol=1e-6)
    np.testing.assert_allclose(got_std, std, rtol=1e-6)


def test_save_model_exports_a_standalone_keras_file(tmp_path):
    run = _small_run(tmp_path / "run")
    model = _randomize(run.build_model())
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    weights = run.save_model(model, "dare")

    export = run.path / layout.export_file("dare")
    assert weights == run.model_path("dare") and weights.is_file() and export.is_file()
    assert not list((run.path / layout.MODELS).glob(f"*{io.TMP_MARK}*"))
    assert run.named_models() == ["original", "dare"]  # the .keras export is not a second model

    x = np.random.default_rng(2).uniform(0, 1, (5, 28, 28, 1)).astype("float32")
    expected = np.asarray(model(x, training=False))
    np.testing.assert_allclose(np.asarray(run.load_named("dare")(x, training=False)), expected,
                               atol=1e-5)
    np.testing.assert_allclose(logits_without_darekit(export, x, tmp_path), expected, atol=1e-5)

    run.remove_model("dare")
    assert not weights.exists() and not export.exists()
    assert run.named_models() == ["original"]


def test_resaving_replaces_the_export(tmp_path):
    run = _small_run(tmp_path / "run")
    run.save_model(_randomize(run.build_model(), seed=1), "adv-fgsm")
    second = _randomize(run.build_model(), seed=2)
    run.save_model(second, "adv-fgsm")
    x = np.random.default_rng(3).uniform(0, 1, (3, 28, 28, 1)).astype("float32")
    exported = keras.saving.load_model(run.export_path("adv-fgsm"), compile=False)
    np.testing.assert_allclose(np.asarray(exported(x)), np.asarray(second(x)), atol=1e-5)


def test_weights_files_of_the_former_normalization_layer_still_load(tmp_path):
    # Runs trained before the switch to keras.layers.Normalization stored the statistics as
    # darekit's ChannelNormalization (mean, std): rewrite a file in that layout and load it.
    run = _small_run(tmp_path / "run")
    model = _randomize(run.build_model())
    path = run.model_path("old")
    path.parent.mkdir(parents=True)
    model.save_weights(str(path))
    with h5py.File(path, "r+") as f:
        f.move("layers/normalization", "layers/channel_normalization")
        v = f["layers/channel_normalization/vars"]
        std = np.sqrt(np.asarray(v["1"]))
        del v["1"], v["2"]
        v["1"] = std
    before = path.read_bytes()
    x = np.random.default_rng(4).uniform(0, 1, (3, 28, 28, 1)).astype("float32")
    np.testing.assert_allclose(np.asarray(run.load_named("old")(x, training=False)),
                               np.asarray(model(x, training=False)), atol=1e-5)
    assert path.read_bytes() == before  # read through a converted copy, never rewritten
