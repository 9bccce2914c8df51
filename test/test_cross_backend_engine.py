"""The attack engine on the same weights under TensorFlow and under JAX: equal within float
tolerance (the issue's cross-backend check of the evaluation side).

The backend is fixed per process, so the test runs this file as a script twice, once per
backend: TensorFlow builds a tiny CNN, saves its weights and attacks it; JAX loads those weights
and attacks the same inputs. Needs a Python with both backends installed (the ``.venv`` of
``scripts/setup.sh``); it is skipped elsewhere (a venv without TensorFlow).

As a script: ``KERAS_BACKEND=... python test/test_cross_backend_engine.py WEIGHTS OUT.npz``
(writes ``WEIGHTS`` when it does not exist, loads it otherwise).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BUDGET = 0.05
EPS = np.linspace(0.0, 0.2, 48)   # one epsilon per input for the engine's BIM
TOL = 0.01                        # SearchConfig's default tol


def _model():
    import keras

    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(5)(h))


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.uniform(0, 1, (48, 8, 8, 1)).astype(np.float32), rng.integers(0, 5, 48)


def main(weights: str, out: str) -> None:
    """Attack the tiny model on this process's backend; save what the test compares."""
    import keras

    from darekit.attacks import predict_logits
    from darekit.engine import FGSMLine, LinfEngine, LinfGradient
    from darekit.evaluate import SearchConfig, evaluate_attack

    model = _model()
    if Path(weights).is_file():
        model.load_weights(weights)
    else:
        keras.utils.set_random_seed(0)
        model = _model()
        model.save_weights(weights)
    x, y0 = _inputs()
    logits = predict_logits(model, x)
    y = logits.argmax(axis=1)          # correctly classified: the search attacks every input
    y[:8] = y0[:8]                     # a few labels as drawn (some misclassified)
    bim = LinfEngine(model, LinfGradient(3, 0.4, False), batch_size=32).attack_all(x, y, EPS)
    ev = evaluate_attack(model, x, y, "fgsm", budget=BUDGET, progress=False,
                         search=SearchConfig(tol=TOL))
    np.savez(out, backend=keras.backend.backend(), logits=logits, y=y,
             direction=FGSMLine(model, x, y).direction, bim_x=bim.x_adv,
             bim_success=bim.success, bim_margin=bim.margin, fooled=ev.fooled, hi=ev.hi,
             lo=ev.lo, clean_correct=ev.clean_correct)


def _both_backends() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "jax"))


@pytest.mark.skipif(not _both_backends(), reason="needs TensorFlow and JAX in one Python")
@pytest.mark.tensorflow_only  # runs both backends itself: once, in the TensorFlow tier
def test_engine_agrees_across_backends_on_the_same_weights(tmp_path):
    weights = tmp_path / "tiny.weights.h5"
    res = {}
    for backend in ("tensorflow", "jax"):   # TensorFlow writes the weights, JAX reads them
        out = tmp_path / f"{backend}.npz"
        env = {**os.environ, "KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu",
               "TF_CPP_MIN_LOG_LEVEL": "2"}
        subprocess.run([sys.executable, __file__, str(weights), str(out)], env=env,
                       check=True, cwd=Path(__file__).resolve().parents[1], timeout=600)
        res[backend] = dict(np.load(out))
    tf_, jx = res["tensorflow"], res["jax"]
    assert str(tf_["backend"]) == "tensorflow" and str(jx["backend"]) == "jax"

    # Same weights, same logits (float32 rounding of different kernels).
    np.testing.assert_allclose(jx["logits"], tf_["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(jx["y"], tf_["y"])
    # FGSM's direction: a sign may differ only where a gradient entry is ~0.
    assert np.mean(jx["direction"] == tf_["direction"]) >= 0.999
    # BIM at one epsilon per input: the same adversarials up to float rounding (an input whose
    # gradient sign flipped on a ~0 entry may move by at most 2 steps in that pixel).
    close = np.abs(jx["bim_x"] - tf_["bim_x"]).reshape(len(EPS), -1).max(axis=1) <= 1e-5
    assert close.mean() >= 0.9, close.mean()
    np.testing.assert_array_equal(jx["bim_success"][close], tf_["bim_success"][close])
    np.testing.assert_allclose(jx["bim_margin"][close], tf_["bim_margin"][close], atol=1e-4)
    # FGSM's minimal epsilons: both brackets hold the same minimum, each closed to tol, so the
    # two upper ends differ by at most tol / (1 - tol) relative (plus float rounding).
    np.testing.assert_array_equal(jx["clean_correct"], tf_["clean_correct"])
    np.testing.assert_array_equal(jx["fooled"], tf_["fooled"])
    f = tf_["fooled"]
    assert f.sum() >= 20   # the search has work to compare
    rel = np.abs(jx["hi"][f] - tf_["hi"][f]) / tf_["hi"][f]
    assert rel.max() <= TOL / (1 - TOL) + 1e-4, rel.max()
    assert np.all(jx["lo"][f] < tf_["hi"][f] * (1 + 1e-4))
    assert np.all(tf_["lo"][f] < jx["hi"][f] * (1 + 1e-4))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1], sys.argv[2])
