"""The ART cross-check of robust accuracy: the masking flag, invariants, seeding, bad configs.

Fast tests use a tiny dense model on random 8x8 images; ``slow`` ones the real ``fm_run``
model with few images and reduced iterations and queries.
"""

from __future__ import annotations

import json
import random

import keras
import numpy as np
import pytest
from keras import ops

from darekit import backend as B
from darekit import crosscheck as C
from darekit.errors import DareError
from darekit.rundir import Run

N_FM = 64      # real test images per slow check: one batch
FM_EPS = 0.1   # Fashion-MNIST's L-inf budget


def tiny_model(seed: int) -> keras.Model:
    """A dense classifier on 8x8x1 images, 10 classes, weights fixed by ``seed``."""
    init = lambda k: keras.initializers.GlorotUniform(seed=seed * 10 + k)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(32, activation="relu", kernel_initializer=init(0))(h)
    return keras.Model(inputs, keras.layers.Dense(10, kernel_initializer=init(1))(h))


class ZeroGradient(keras.layers.Layer):
    """The identity on the logits whose gradient is zero: a textbook gradient-masked model."""

    def call(self, z):
        @ops.custom_gradient
        def identity(z):
            def grad(*args, upstream=None):   # Keras' signature for both backends
                dy = args[0] if upstream is None else upstream
                return ops.zeros_like(dy)
            return ops.copy(z), grad

        return identity(z)


def masked(model: keras.Model) -> keras.Model:
    inputs = keras.Input(model.input_shape[1:])
    return keras.Model(inputs, ZeroGradient()(model(inputs)))


@pytest.fixture(scope="module")
def tiny():
    """A tiny model and 40 images: the first 30 labelled as it predicts, 10 mislabelled."""
    model = tiny_model(0)
    x = np.random.default_rng(0).uniform(size=(40, 8, 8, 1)).astype(np.float32)
    pred = np.argmax(B.to_numpy(model(x, training=False)), axis=1)
    y = np.concatenate([pred[:30], (pred[30:] + 1) % 10])
    return model, x, y


TINY = C.CrossCheckConfig(eps=0.05, apgd_iter=10, dlr_targets=2, square_queries=50,
                          batch_size=16)  # 16: several batches per attack


# ---------------------------------------------------------------------------- fast
def test_bad_config_is_one_line_dare_error():
    for kwargs, word in [({"eps": 0}, "eps"), ({"eps": -0.1}, "eps"),
                         ({"eps": float("nan")}, "eps"), ({"eps": 1.5}, "eps"),
                         ({"eps": 0.1, "apgd_iter": 0}, "apgd_iter"),
                         ({"eps": 0.1, "square_queries": 0}, "square_queries"),
                         ({"eps": 0.1, "dlr_targets": 0}, "dlr_targets"),
                         ({"eps": 0.1, "apgd_restarts": 2.5}, "apgd_restarts"),
                         ({"eps": 0.1, "batch_size": 0}, "batch_size"),
                         ({"eps": 0.1, "masking_tolerance": -1}, "masking_tolerance"),
                         ({"eps": 0.1, "attacks": ("apgd_ce", "fgsm")}, "attacks")]:
        with pytest.raises(DareError, match=word) as err:
            C.CrossCheckConfig(**kwargs)
        assert "\n" not in str(err.value)
    # NumPy scalars are accepted and stored as Python numbers (ART's isinstance checks refuse
    # np.float32 and np.int64).
    cfg = C.CrossCheckConfig(eps=np.float32(0.1), apgd_iter=np.int64(5), attacks=["square"])
    assert type(cfg.eps) is float and type(cfg.apgd_iter) is int and cfg.attacks == ("square",)
    json.dumps(cfg.to_dict())


def test_gradient_masking_rule():
    t = np.array([True] * 6 + [False] * 4)
    white = {"apgd_ce": t, "apgd_t": t.copy(), "own_pgd": t | ~t}   # worst case: 6 robust
    fewer = np.array([True] * 4 + [False] * 6)                        # 4 robust
    flag, reason = C.gradient_masking({**white, "square": fewer, "transfer": t})
    assert flag and "square" in reason and "2 fewer" in reason and "transfer" not in reason
    assert "apgd_ce+apgd_t+own_pgd: 6" in reason
    assert C.gradient_masking({**white, "square": fewer}, tolerance=2) == (False, "")
    assert C.gradient_masking({**white, "square": t}) == (False, "")      # equal: no flag
    assert C.gradient_masking(white) == (False, "")                       # nothing to compare
    assert C.gradient_masking({"square": fewer}) == (False, "")


def test_invariants_on_a_tiny_model(tiny):
    model, x, y = tiny
    transfer = C.transfer_set(tiny_model(1), x, y, TINY)
    assert transfer.shape == x.shape and transfer.dtype == np.float32
    assert np.abs(transfer - x).max() <= TINY.eps + 1e-6
    assert 0 <= transfer.min() and transfer.max() <= 1
    own = np.random.default_rng(1).random(len(x)) < 0.7
    res = C.cross_check(model, x, y, TINY, transfer=transfer, own_robust=own)

    assert set(res.robust) == {"apgd_ce", "apgd_t", "square", "transfer", "own_pgd"}
    assert set(res.seconds) == {"apgd_ce", "apgd_t", "square", "transfer"}
    assert res.clean_correct.sum() == 30 and not res.clean_correct[30:].any()
    for name, flags in res.robust.items():
        assert flags.shape == (len(x),) and flags.dtype == bool
        assert not (flags & ~res.clean_correct).any(), name   # robust implies correct clean
        assert flags.mean() <= res.clean_correct.mean()
    np.testing.assert_array_equal(res.robust["own_pgd"], own & res.clean_correct)
    expected = res.clean_correct & own
    for name in ("apgd_ce", "apgd_t", "square", "transfer"):
        expected = expected & res.robust[name]
    np.testing.assert_array_equal(res.worst_case, expected)
    assert res.robust["apgd_ce"].sum() < 30   # the attacks do break this model

    s = res.summary()
    assert s["worst_case_accuracy"] == pytest.approx(expected.mean())
    assert s["robust_accuracy"]["own_pgd"] == pytest.approx((own & res.clean_correct).mean())
    assert res.config["eps"] == TINY.eps and res.config["transfer_given"]
    json.dumps(s)
    json.dumps(res.config)


def test_own_transfer_set_is_own_apgd_ce(tiny):
    """Replayed on its source, a transfer set equals the source's APGD-CE (same batches and
    seeds): a model is never flagged against its own transfer set by chance."""
    model, x, y = tiny
    cfg = C.CrossCheckConfig(**{**TINY.to_dict(), "attacks": ("apgd_ce",)})
    res = C.cross_check(model, x, y, cfg, transfer=C.transfer_set(model, x, y, cfg),
                        progress=True)
    np.testing.assert_array_equal(res.robust["transfer"], res.robust["apgd_ce"])
    assert not res.masking


def test_same_seed_same_result_and_global_rngs_untouched(tiny):
    model, x, y = tiny
    np.random.seed(123)
    random.seed(123)
    first = C.cross_check(model, x, y, TINY)
    # ART draws from NumPy's and Python's global RNGs; their streams go on as if untouched.
    assert np.random.random() == np.random.RandomState(123).random_sample()
    assert random.random() == random.Random(123).random()
    second = C.cross_check(model, x, y, TINY)
    for name in first.robust:
        np.testing.assert_array_equal(first.robust[name], second.robust[name])
    assert (first.masking, first.masking_reason) == (second.masking, second.masking_reason)
    assert first.config == second.config


def test_bad_inputs_raise(tiny):
    model, x, y = tiny
    cfg = C.CrossCheckConfig(eps=0.05, apgd_iter=1, square_queries=1, attacks=("apgd_ce",))
    with pytest.raises(DareError, match="transfer set has shape"):
        C.cross_check(model, x, y, cfg, transfer=x[:5])
    with pytest.raises(DareError, match="ball"):
        C.cross_check(model, x, y, cfg, transfer=np.clip(x + 0.2, 0, 1))
    with pytest.raises(DareError, match="own_robust"):
        C.cross_check(model, x, y, cfg, own_robust=np.ones(len(x)))
    with pytest.raises(DareError, match=r"\[0, 1\]"):
        C.cross_check(model, x * 255, y, cfg)
    with pytest.raises(DareError, match="labels"):
        C.cross_check(model, x, y[:-1], cfg)


# ---------------------------------------------------------------------------- fm_run (slow)
FM = C.CrossCheckConfig(eps=FM_EPS, apgd_iter=20, dlr_targets=2, square_queries=300,
                        batch_size=N_FM)


@pytest.fixture(scope="module")
def fm(fm_run):
    run = Run.open(fm_run)
    d = run.data()
    return run, run.load_model(), d.x_test[:N_FM], d.y_test[:N_FM]


@pytest.mark.slow
def test_ordinary_model_is_not_flagged(fm):
    from darekit.adv_training import PGDConfig, robust_evaluation

    run, model, x, y = fm
    pgd = PGDConfig(eps=FM_EPS, steps=20, step_size=0.0125)
    own = C.pgd_robust(model, x, y, pgd, seed=0)
    assert own.mean() == pytest.approx(
        robust_evaluation(model, x, y, pgd, seed=0)["robust_accuracy"])
    # A related but different source: the same run after its first epoch.
    transfer = C.transfer_set(run.load_model(1), x, y, FM)
    res = C.cross_check(model, x, y, FM, transfer=transfer, own_robust=own)

    # Measured (seeds 0-3): worst case of the white-box attacks 7-9 of 64 robust, Square 22-23,
    # transfer 37-39: the black-box attacks stay far above it.
    assert not res.masking and res.masking_reason == "", res.summary()
    acc, clean = res.robust_accuracy(), res.clean_correct.mean()
    assert clean > 0.6
    assert acc["apgd_ce"] <= clean and acc["apgd_ce"] < 0.5 * clean   # not a robust model
    assert acc["apgd_ce"] <= acc["own_pgd"] + 2 / N_FM   # APGD at least about as strong
    assert res.worst_case.mean() <= min(acc.values())


@pytest.mark.slow
def test_gradient_masked_model_is_flagged(fm):
    from darekit.adv_training import PGDConfig

    _, model, x, y = fm
    hidden = masked(model)
    # Same predictions, no gradient: the fixture really masks.
    np.testing.assert_array_equal(np.argmax(B.to_numpy(hidden(x[:8])), 1),
                                  np.argmax(B.to_numpy(model(x[:8])), 1))
    grad = B.grad(lambda z: ops.sum(hidden(z, training=False)))(ops.convert_to_tensor(x[:8]))
    assert float(np.abs(B.to_numpy(grad)).max()) == 0.0

    cfg = C.CrossCheckConfig(**{**FM.to_dict(), "attacks": ("apgd_ce", "square")})
    res = C.cross_check(hidden, x, y, cfg, transfer=C.transfer_set(model, x, y, cfg),
                        own_robust=C.pgd_robust(hidden, x, y, PGDConfig(eps=FM_EPS, steps=5)))
    acc, clean = res.robust_accuracy(), res.clean_correct.mean()
    assert res.masking, res.summary()
    assert "square" in res.masking_reason and "transfer" in res.masking_reason
    assert acc["apgd_ce"] > clean - 0.2                     # gradients find (almost) nothing
    # Measured: APGD-CE 44-46 of 64 robust, Square 22-23, transfer 8-9 (seeds 0-3).
    assert acc["square"] < acc["apgd_ce"] - 0.2 and acc["transfer"] < acc["apgd_ce"] - 0.2
    assert res.summary()["possible_gradient_masking"]
