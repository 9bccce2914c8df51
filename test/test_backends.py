"""The backend seam (``darekit.backend``) on whichever Keras backend runs the tests, and what
moves between backends: ``.keras`` files, and the choice of backend itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from darekit import backend as B
from darekit.errors import DareError
from darekit.paths import ROOT


def _dense(w: np.ndarray, b: np.ndarray) -> keras.Model:
    model = keras.Sequential([keras.Input((w.shape[0],)), keras.layers.Dense(w.shape[1])])
    model.layers[0].set_weights([w, b])
    return model


def test_input_gradient_matches_closed_form():
    # f(x) = sum(x**3): df/dx = 3 x**2, signs and zeros included.
    x = np.array([[-2.0, 0.0, 0.5], [1.0, -0.25, 3.0]], np.float32)
    value, g = B.jit(B.value_and_grad(lambda x: keras.ops.sum(x ** 3)))(x)
    assert float(value) == pytest.approx(float(np.sum(x ** 3)), rel=1e-6)
    np.testing.assert_allclose(B.to_numpy(g), 3 * x ** 2, rtol=1e-6)
    # An input the value does not depend on gets zeros, not None.
    g2 = B.jit(B.grad(lambda x, c: keras.ops.sum(c * 2.0)))(x, x)
    np.testing.assert_array_equal(B.to_numpy(g2), np.zeros_like(x))


def test_model_function_reads_the_current_weights():
    """The JAX trap: a compiled function that closes over the weights keeps the ones it was
    traced with. ``model_function`` passes them per call, so new weights are seen."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, 3)).astype(np.float32), np.zeros(3, np.float32)
    model = _dense(w, b)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    f = B.model_function(model, lambda call, x: call(x))
    np.testing.assert_allclose(B.to_numpy(f(x)), x @ w, rtol=1e-5, atol=1e-6)
    model.layers[0].set_weights([-3 * w, b + 1])
    np.testing.assert_allclose(B.to_numpy(f(x)), x @ (-3 * w) + 1, rtol=1e-5, atol=1e-5)


def test_cross_entropy_gradient_of_a_linear_model_is_closed_form():
    """d CE / dx = W (softmax(Wx + b) - onehot(y)) for a linear model."""
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    x = rng.uniform(size=(3, 6)).astype(np.float32)
    y = np.array([0, 3, 1])
    model = _dense(w, b)
    f = B.model_function(model, lambda call, x, y: B.grad(
        lambda z: keras.ops.sum(B.sparse_ce(y, call(z))))(x))
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = (p - np.eye(4)[y]) @ w.T
    np.testing.assert_allclose(B.to_numpy(f(x, y)), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("logits,y,want", [
    ([[1.0, 3.0, 2.0]], [1], [1.0]),        # correct, runner-up 2
    ([[5.0, 0.0, 1.0]], [2], [-4.0]),       # wrong: the best wrong class wins by 4
    ([[2.0, 2.0, -1.0]], [0], [0.0]),       # a tie at the top is margin 0
    ([[-1e30, 0.0, -1e30]], [1], [1e30]),   # huge logits stay finite
])
def test_margin_closed_form(logits, y, want):
    got = B.to_numpy(B.margin(keras.ops.convert_to_tensor(np.array(logits, np.float32)),
                              keras.ops.convert_to_tensor(np.array(y))))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_stateless_uniform_depends_on_its_seed_alone():
    a = B.to_numpy(B.stateless_uniform((64, 8), B.seed_array(3, 7), -0.5, 0.5))
    b = B.to_numpy(B.stateless_uniform((64, 8), B.seed_array(3, 7), -0.5, 0.5))
    c = B.to_numpy(B.stateless_uniform((64, 8), B.seed_array(3, 8), -0.5, 0.5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= -0.5 and a.max() < 0.5 and a.std() > 0.2  # spread over the interval


@pytest.mark.parametrize("n,batch,want", [(1, 256, 32), (32, 256, 32), (33, 256, 64),
                                          (300, 256, 300), (700, 1024, 1024), (5, 4, 5)])
def test_buckets(n, batch, want):
    assert B.bucket(n, batch) == want
    a = np.arange(n * 2).reshape(n, 2)
    padded = B.pad_rows(a, want)
    assert len(padded) == want and np.array_equal(padded[:n], a)
    assert np.all(padded[n:] == a[0])


@pytest.mark.parametrize("n,batch,want", [(1, 256, 1), (3, 256, 4), (4, 256, 4), (9, 256, 16),
                                          (16, 256, 16), (17, 256, 32), (33, 256, 64),
                                          (3, 2, 3), (6, 5, 6), (300, 256, 300)])
def test_fine_buckets_are_powers_of_two_below_the_coarse_ones(n, batch, want):
    """ddmin's shrinking rounds: 3 rows are padded to 4, not 32; at most ``max(batch, n)``."""
    assert B.bucket(n, batch, fine=True) == want


def test_versions_name_the_backend():
    v = B.versions()
    assert v["backend"] == keras.backend.backend()
    assert (v.get("tensorflow") if v["backend"] == "tensorflow" else v.get("jax"))


def test_select_refuses_to_switch_a_loaded_keras():
    other = "jax" if keras.backend.backend() == "tensorflow" else "tensorflow"
    with pytest.raises(DareError, match="already loaded"):
        B.select(other)
    with pytest.raises(DareError, match="--backend must be one of"):
        B.select("torch")
    assert B.select(keras.backend.backend()) == keras.backend.backend()


# ---------------------------------------------------------------------------- across backends
_SAVE = r"""
import sys
import numpy as np
import keras
from darekit.models import get_architecture
keras.utils.set_random_seed(0)
model = get_architecture("smallcnn").build((28, 28, 1), 10)
rng = np.random.default_rng(0)
# Move every weight off its initial value (BatchNorm statistics too, variances stay > 0).
model.set_weights([(w * rng.uniform(0.8, 1.2, w.shape) + (w == 0) * rng.normal(0, 0.05, w.shape)
                    ).astype("float32") for w in model.get_weights()])
for layer in model.layers:  # Normalization refreshes the tensors derived from its weights
    getattr(layer, "finalize_state", lambda: None)()
x = np.load(sys.argv[2])
np.save(sys.argv[3], keras.ops.convert_to_numpy(model(x, training=False)))
model.save(sys.argv[1])
"""
_LOAD = r"""
import sys
import numpy as np
import keras
model = keras.saving.load_model(sys.argv[1], compile=False)
np.save(sys.argv[3], keras.ops.convert_to_numpy(model(np.load(sys.argv[2]), training=False)))
"""


def _python(code: str, backend: str, *args: Path) -> None:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.tensorflow_only  # needs TensorFlow and JAX in one environment
@pytest.mark.parametrize("source,target", [("tensorflow", "jax"), ("jax", "tensorflow")])
def test_keras_file_moves_between_backends(tmp_path, source, target):
    """A ``.keras`` file written under one backend gives the same logits under the other
    (BatchNorm, dropout, normalisation included: the smallcnn has them all)."""
    x = np.random.default_rng(1).uniform(size=(16, 28, 28, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    _python(_SAVE, source, tmp_path / "m.keras", tmp_path / "x.npy", tmp_path / "a.npy")
    _python(_LOAD, target, tmp_path / "m.keras", tmp_path / "x.npy", tmp_path / "b.npy")
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert np.abs(a).max() > 1e-2  # logits that mean something
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
