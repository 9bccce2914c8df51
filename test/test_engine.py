"""``darekit.engine``: the per-input-epsilon L-inf engine against Foolbox, its reference.

Fast tests use a tiny untrained CNN; ``slow`` tests use the real Fashion-MNIST ``fm_run`` model.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from darekit import backend as B
from darekit.attacks import foolbox_model, foolbox_tensors, get_attack
from darekit.engine import FGSMLine, LinfEngine, LinfGradient
from darekit.errors import DareError
from darekit.rundir import Run

EPSILONS = (0.02, 0.05, 0.1)
N_REAL = 256        # real test images for the Foolbox-parity tests (one batch each)
N_PGD = 512         # real test images for the PGD success-rate comparison


def foolbox_attack(model, name: str, x: np.ndarray, y: np.ndarray, eps: float, **params):
    """Foolbox's clipped adversarials ``(N, ...)`` and success ``(N,)`` at one epsilon."""
    _, clipped, success = get_attack(name, **params)(foolbox_model(model),
                                                     *foolbox_tensors(x, y), epsilons=[eps])
    return np.asarray(clipped[0]), np.asarray(success)[0].astype(bool)


def assert_in_threat_model(x: np.ndarray, x_adv: np.ndarray, eps: np.ndarray) -> None:
    linf = np.abs(x_adv.astype(np.float64) - x).reshape(len(x), -1).max(axis=1)
    assert np.all(linf <= eps + 1e-6), (linf - eps).max()
    assert x_adv.dtype == np.float32 and x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    np.testing.assert_array_equal(x_adv[eps == 0], x[eps == 0])


# ---------------------------------------------------------------------------- fast: tiny model
@pytest.fixture(scope="module")
def tiny():
    """An untrained 8x8x1 -> 3-class CNN (logits) and 40 random inputs with random labels."""
    init = keras.initializers.GlorotUniform   # seeded per layer: no global RNG side effect
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu",
                            kernel_initializer=init(seed=0))(inputs)
    h = keras.layers.Flatten()(h)
    model = keras.Model(inputs, keras.layers.Dense(3, kernel_initializer=init(seed=1))(h))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (40, 8, 8, 1)).astype(np.float32)
    x[:5, :2] = 0.0   # pixels on the bounds: the [0, 1] clip must act
    x[5:10, :2] = 1.0
    return model, x, rng.integers(0, 3, 40)


def test_from_spec_reads_the_registry():
    assert LinfGradient.from_spec("fgsm") == LinfGradient(1, 1.0, False) == LinfGradient.fgsm()
    assert LinfGradient.from_spec("bim") == LinfGradient(10, 0.2, False)
    assert LinfGradient.from_spec("pgd") == LinfGradient(20, 2.5 / 20, True)
    assert LinfGradient.from_spec("pgd", {"steps": 3, "abs_stepsize": 0.01}) == \
        LinfGradient(3, 2.5 / 20, True, 0.01)
    with pytest.raises(DareError, match="plain L-inf"):
        LinfGradient.from_spec("l2pgd")
    import foolbox as fb
    with pytest.raises(DareError, match="plain L-inf"):   # Adam steps are not sign steps
        LinfGradient.from_foolbox(fb.attacks.LinfAdamProjectedGradientDescentAttack())
    with pytest.raises(DareError, match="steps"):
        LinfGradient(0, 0.2, False)


def test_stepsize_is_rounded_like_foolbox():
    # Foolbox: float32(rel_stepsize * eps) with the product in float64, not a float32 product.
    eps = np.array([0.1, 0.03, 1 / 3, 0.0])
    np.testing.assert_array_equal(LinfGradient(10, 0.2, False).stepsizes(eps),
                                  np.float32([0.2 * e for e in eps]))
    np.testing.assert_array_equal(LinfGradient(10, 0.2, False, 0.01).stepsizes(eps),
                                  np.float32([0.01] * 4))


@pytest.mark.parametrize("name", ["fgsm", "bim"])
def test_tiny_model_matches_foolbox(tiny, name):
    model, x, y = tiny
    params = {"steps": 3} if name == "bim" else {}
    engine = LinfEngine(model, LinfGradient.from_spec(name, params), batch_size=16)
    for eps in (0.05, 0.3):
        x_fb, ok_fb = foolbox_attack(model, name, x, y, eps, **params)
        x_adv, ok = engine(x, y, eps)
        assert np.abs(x_adv - x_fb).max() <= 1e-5
        np.testing.assert_array_equal(ok, ok_fb)


def test_threat_model_and_zero_budget(tiny):
    model, x, y = tiny
    eps = np.resize([0.0, 0.01, 0.1, 0.5, 1.0], len(x))
    for attack in (LinfGradient.fgsm(), LinfGradient(4, 0.5, False), LinfGradient(4, 0.5, True)):
        x_adv, ok = LinfEngine(model, attack, batch_size=16)(x, y, eps, seed=3)
        assert x_adv.shape == x.shape and ok.shape == (len(x),) and ok.dtype == bool
        assert_in_threat_model(x, x_adv, eps)
    x_adv, _ = FGSMLine(model, x, y)(np.arange(len(x)), eps)
    assert_in_threat_model(x, x_adv, eps)


@pytest.mark.parametrize("attack", [LinfGradient(4, 0.3, False), LinfGradient(4, 0.3, True)],
                         ids=["bim", "pgd"])
def test_per_input_epsilons_equal_separate_calls(tiny, attack):
    # One call at a vector of epsilons == one call per epsilon, input by input. With a random
    # start too: the draw depends on (seed, batch index, shape), not on epsilon.
    model, x, y = tiny
    engine = LinfEngine(model, attack, batch_size=16)
    levels = np.array([0.0, 0.02, 0.1, 0.25])
    which = np.arange(len(x)) % len(levels)
    x_adv, ok = engine(x, y, levels[which], seed=7)
    for k, e in enumerate(levels):
        xs, oks = engine(x, y, float(e), seed=7)
        np.testing.assert_array_equal(x_adv[which == k], xs[which == k])
        np.testing.assert_array_equal(ok[which == k], oks[which == k])


def test_seeded_pgd_is_reproducible(tiny):
    model, x, y = tiny
    engine = LinfEngine(model, LinfGradient(2, 0.25, True), batch_size=16)
    a, _ = engine(x, y, 0.1, seed=1)
    b, _ = engine(x, y, 0.1, seed=1)
    c, _ = engine(x, y, 0.1, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_few_traces_for_every_batch_size(tiny):
    # TensorFlow (exact mode): the first trace is for the first batch's shape, the second one
    # relaxed to any batch size serves all others. JAX: every batch is padded to the bucket of
    # 16 rows (capped at batch_size), so one trace serves them all.
    model, x, y = tiny
    engine = LinfEngine(model, LinfGradient(2, 0.5, False), batch_size=16)
    for n in (40, 7, 1, 23, 3, 11):   # batches of 16, 16, 8, 7, 1, 16, 7, 3, 11
        engine(x[:n], y[:n], 0.1)
    (compiled,) = engine._functions.values()
    limit = 1 if B.name() == "jax" else 2
    assert 1 <= compiled.traces["step"] <= limit and 1 <= compiled.traces["finish"] <= limit
    assert engine.work.gradients == 2 * 85 and engine.work.forwards == 85
    assert engine.work.batches == 3 + 1 + 1 + 2 + 1 + 1


def test_fgsm_line_equals_engine_with_one_gradient(tiny):
    model, x, y = tiny
    line = FGSMLine(model, x, y, batch_size=16)
    assert line.work.gradients == len(x) and line.direction.dtype == np.int8
    engine = LinfEngine(model, LinfGradient.fgsm(), batch_size=16)
    eps = np.random.default_rng(1).uniform(0, 0.4, len(x))
    idx = np.random.default_rng(2).permutation(len(x))[:25]
    for _ in range(3):   # bisection rounds: forward passes only
        a, ok = line(idx, eps[idx])
    b, ok_b = engine(x[idx], y[idx], eps[idx])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ok, ok_b)
    assert line.work.gradients == len(x) and line.work.forwards == 3 * len(idx)


def test_bad_arguments(tiny):
    model, x, y = tiny
    engine = LinfEngine(model, LinfGradient.fgsm())
    with pytest.raises(DareError, match=">= 0"):
        engine(x, y, -0.1)
    with pytest.raises(DareError, match="one epsilon"):
        engine(x, y, np.full(3, 0.1))
    with pytest.raises(DareError, match="labels"):
        engine(x, y[:3], 0.1)
    x_adv, ok = engine(x[:0], y[:0], np.zeros(0))
    assert x_adv.shape == (0, 8, 8, 1) and ok.shape == (0,)
    with pytest.raises(DareError, match="out of range"):
        FGSMLine(model, x[:4], y[:4])(np.array([4]), 0.1)


@pytest.mark.parametrize("attack", [LinfGradient(6, 0.3, False), LinfGradient(6, 0.3, True)],
                         ids=["bim", "pgd"])
def test_xla_engine_agrees_with_the_exact_one(tiny, attack):
    """XLA reorders float operations: results may differ in the last bits, never in kind.
    Inputs are padded to a bucket size (here 32 and 64): padding rows never leak into results.
    """
    model, x, y = tiny
    eps = np.linspace(0.01, 0.4, len(x))
    exact = LinfEngine(model, attack).attack_all(x, y, eps, seed=3)
    xla = LinfEngine(model, attack, jit_compile=True)
    fast = xla.attack_all(x, y, eps, seed=3)
    assert_in_threat_model(x, fast.x_adv, eps)
    assert np.mean(fast.success == exact.success) >= 0.95
    np.testing.assert_allclose(fast.margin, exact.margin, atol=0.05)
    one = xla.attack_all(x[:5], y[:5], eps[:5], seed=3)      # another bucket (32)
    assert_in_threat_model(x[:5], one.x_adv, eps[:5])
    assert xla.work.gradients == attack.steps * (len(x) + 5)
    # The margin is the logit margin of the returned image: negative exactly when fooled.
    np.testing.assert_array_equal(fast.margin < 0, fast.success)
    z = model.predict(fast.x_adv, verbose=0)
    true = z[np.arange(len(z)), y]
    z[np.arange(len(z)), y] = -np.inf
    np.testing.assert_allclose(fast.margin, true - z.max(1), rtol=1e-4, atol=1e-4)


def test_xla_fgsm_line_equals_xla_engine(tiny):
    model, x, y = tiny
    eps = np.linspace(0.0, 0.3, len(x))
    line = FGSMLine(model, x, y, jit_compile=True)
    engine = LinfEngine(model, LinfGradient.fgsm(), jit_compile=True)
    a, b = line.attack_all(np.arange(len(x)), eps), engine.attack_all(x, y, eps)
    np.testing.assert_array_equal(a.success, b.success)
    np.testing.assert_allclose(a.x_adv, b.x_adv, atol=1e-6)


# ---------------------------------------------------------------------------- slow: fm_run
@pytest.fixture(scope="module")
def real(fm_run):
    """The trained smallcnn and its first ``N_PGD`` test images (float32, int labels)."""
    run = Run.open(fm_run)
    d = run.data()
    return run.load_model(), d.x_test[:N_PGD], d.y_test[:N_PGD]


@pytest.fixture(scope="module")
def foolbox_real(real):
    """Foolbox's FGSM and BIM on the first ``N_REAL`` images at each of ``EPSILONS``."""
    model, x, y = real
    return {(name, eps): foolbox_attack(model, name, x[:N_REAL], y[:N_REAL], eps)
            for name in ("fgsm", "bim") for eps in EPSILONS}


@pytest.mark.slow
@pytest.mark.tensorflow_only
@pytest.mark.parametrize("name", ["fgsm", "bim"])
def test_real_model_matches_foolbox(real, foolbox_real, name):
    # Same float32 operations in the same order: in practice the adversarials agree bit for
    # bit, so every success flag must agree too (no input is left on a decision boundary).
    # TensorFlow only: the exact (non-XLA) graphs are what match Foolbox's eager tape; under
    # XLA (always on JAX) a gradient entry near 0 may change sign (next test).
    model, x, y = real
    x, y = x[:N_REAL], y[:N_REAL]
    engine = LinfEngine(model, LinfGradient.from_spec(name))
    for eps in EPSILONS:
        x_fb, ok_fb = foolbox_real[name, eps]
        x_adv, ok = engine(x, y, eps)
        assert np.abs(x_adv - x_fb).max() <= 1e-5, (name, eps)
        np.testing.assert_array_equal(ok, ok_fb)
        assert 0.1 < ok.mean() < 1.0   # the attack does something, and not trivially
    # One call with each input at its own epsilon == Foolbox at that input's epsilon.
    which = np.arange(N_REAL) % len(EPSILONS)
    x_adv, ok = engine(x, y, np.asarray(EPSILONS)[which])
    for k, eps in enumerate(EPSILONS):
        x_fb, ok_fb = foolbox_real[name, eps]
        assert np.abs(x_adv[which == k] - x_fb[which == k]).max() <= 1e-5
        np.testing.assert_array_equal(ok[which == k], ok_fb[which == k])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fgsm", "bim"])
def test_real_model_agrees_with_foolbox_up_to_xla_rounding(real, foolbox_real, name):
    # Any backend, the engine as evaluate_attack runs it (XLA). Gradient entries near 0 may
    # round to the other sign, which moves that pixel by up to 2 steps: most adversarials stay
    # identical, and the success flags agree but for inputs that sit on a decision boundary.
    model, x, y = real
    x, y = x[:N_REAL], y[:N_REAL]
    engine = LinfEngine(model, LinfGradient.from_spec(name), jit_compile=True)
    for eps in EPSILONS:
        x_fb, ok_fb = foolbox_real[name, eps]
        x_adv, ok = engine(x, y, eps)
        same = np.abs(x_adv - x_fb).reshape(N_REAL, -1).max(axis=1) <= 1e-5
        # Measured on JAX (CPU): 97-99% identical, every flag equal.
        assert same.mean() >= 0.9, (name, eps, same.mean())
        assert np.mean(ok == ok_fb) >= 0.98, (name, eps)
        np.testing.assert_array_equal(ok[same], ok_fb[same])


@pytest.mark.slow
def test_real_model_pgd_success_rate_matches_foolbox(real):
    # The random starts differ (stateless draws vs the global RNG), so only rates can agree.
    # Tolerance: 3 standard errors of the difference of two independent binomial proportions
    # on n images, sqrt(2 p (1 - p) / n). Conservative: both runs attack the same images, so
    # the true spread (only the random start varies) is smaller.
    model, x, y = real
    engine = LinfEngine(model, LinfGradient.from_spec("pgd"))
    B.seed_foolbox(0)
    for eps in (0.03, 0.1):
        _, ok_fb = foolbox_attack(model, "pgd", x, y, eps)
        x_adv, ok = engine(x, y, eps, seed=0)
        assert_in_threat_model(x, x_adv, np.full(len(x), eps))
        p = (ok.mean() + ok_fb.mean()) / 2
        tol = 3 * math.sqrt(2 * p * (1 - p) / len(x))
        assert abs(ok.mean() - ok_fb.mean()) <= tol, (eps, ok.mean(), ok_fb.mean(), tol)


@pytest.mark.slow
def test_real_model_fgsm_line(real):
    model, x, y = real
    x, y = x[:N_REAL], y[:N_REAL]
    line = FGSMLine(model, x, y)
    engine = LinfEngine(model, LinfGradient.fgsm())
    eps = np.random.default_rng(0).uniform(0, 0.15, N_REAL)
    eps[::17] = 0.0
    a, ok = line(np.arange(N_REAL), eps)
    b, ok_b = engine(x, y, eps)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ok, ok_b)
    assert_in_threat_model(x, a, eps)
    idx = np.random.default_rng(1).permutation(N_REAL)[:100]   # a shrinking open set
    a, ok = line(idx, eps[idx])
    b, ok_b = engine(x[idx], y[idx], eps[idx])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ok, ok_b)
    assert line.work.gradients == N_REAL   # the constructor's pass; calls are forward only
