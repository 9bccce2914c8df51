"""The compiled C&W L2 and DeepFool L2 (``darekit.l2``) against Foolbox 3.3.4 and closed forms.

Tiny untrained models and synthetic inputs (fast tier); every test runs under TensorFlow and
under JAX. Tolerances: the algorithms are Foolbox's operation by operation, so differences are
float32 rounding only. Measured on these models: DeepFool's adversarials bit-identical to
Foolbox's under TensorFlow (graph mode runs the eager kernels), at most 6e-8 apart under JAX
(XLA fuses differently); C&W's minimal L2 norms at most 1.3e-7 (TF) and 1.3e-6 (JAX) apart
relatively. The bounds below (1e-5 absolute for DeepFool's pixels, 1e-4 relative for C&W's
norms) leave room for rounding that grows over 50 steps, and still fail on any algorithmic
difference (a wrong Adam constant, a missed abort_early check or a different candidate class
moves results by 1e-3 or more).
"""

from __future__ import annotations

import foolbox as fb
import keras
import numpy as np
import pytest
from linear_models import dense, disjoint, inputs_where

from darekit import attacks as A
from darekit import backend as B
from darekit import l2
from darekit.errors import DareError

DF_ATOL = 1e-5
CW_RTOL = 1e-4
CW = {"binary_search_steps": 3, "steps": 30, "stepsize": 0.05, "confidence": 0.0,
      "initial_const": 1.0, "abort_early": True}
DF = {"steps": 50, "candidates": 4, "overshoot": 0.02, "loss": "logits"}


def _convnet(classes: int = 5) -> keras.Model:
    init = keras.initializers.GlorotUniform
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(6, 3, activation="relu", kernel_initializer=init(seed=0))(inputs)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu", kernel_initializer=init(seed=1))(h)
    return keras.Model(inputs, keras.layers.Dense(classes, kernel_initializer=init(seed=2))(h))


@pytest.fixture(scope="module")
def net():
    return _convnet()


@pytest.fixture(scope="module")
def data(net):
    """24 inputs: 20 random, 4 binary (every pixel at 0 or 1); labels the model's own
    predictions except 3 deliberately wrong ones (misclassified from the start)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (24, 8, 8, 1)).astype(np.float32)
    x[20:] = (x[20:] > 0.5).astype(np.float32)
    y = A.predict_labels(net, x)
    y[:3] = (y[:3] + 1) % 5
    return x, y


def _foolbox(model, attack, x, y) -> np.ndarray:
    raw, _, _ = attack(A.foolbox_model(model), *A.foolbox_tensors(x, y), epsilons=None)
    return np.asarray(raw)


def _l2(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.linalg.norm((a.astype(np.float64) - x).reshape(len(x), -1), axis=1)


def _fooled(model, a: np.ndarray, y: np.ndarray) -> np.ndarray:
    return A.predict_labels(model, a) != y


# ---------------------------------------------------------------------------- Foolbox parity
@pytest.mark.parametrize("loss", ["logits", "crossentropy"])
def test_deepfool_equals_foolbox(net, data, loss):
    x, y = data
    params = {**DF, "loss": loss}
    ours = l2.deepfool_l2(net, x, y, **params)
    ref = _foolbox(net, fb.attacks.L2DeepFoolAttack(**params), x, y)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=DF_ATOL)
    np.testing.assert_array_equal(_fooled(net, ours, y), _fooled(net, ref, y))
    assert _fooled(net, ours, y).all()
    np.testing.assert_array_equal(ours[:3], x[:3])  # misclassified from the start: untouched
    assert ours.min() >= 0 and ours.max() <= 1


@pytest.mark.parametrize("case", ["abort_early", "no_abort", "confidence", "ten_searches"])
def test_cw_equals_foolbox(net, data, case):
    """Same minimal norms and fooled sets as darekit's Foolbox C&W (``_CarliniWagnerL2``),
    including the early abort, a confidence margin, and the 10th binary search step's
    repetition (``binary_search_steps >= 10``)."""
    x, y = data
    params = dict(CW)
    if case == "no_abort":
        params["abort_early"] = False
    elif case == "confidence":
        params["confidence"] = 0.5
    elif case == "ten_searches":
        params.update(binary_search_steps=10, steps=5, initial_const=0.01)
    ours = l2.carlini_wagner_l2(net, x, y, **params)
    ref = _foolbox(net, A._CarliniWagnerL2(**params), x, y)
    np.testing.assert_array_equal(_fooled(net, ours, y), _fooled(net, ref, y))
    np.testing.assert_allclose(_l2(ours, x), _l2(ref, x), rtol=CW_RTOL, atol=1e-6)
    assert ours.min() >= 0 and ours.max() <= 1
    if case == "ten_searches":  # the constant grows from 0.01: some inputs stay unfooled...
        failed = ~_fooled(net, ours, y)
        assert failed.any()
        np.testing.assert_array_equal(ours[failed], x[failed])  # ...and come back unchanged


def test_cw_misclassified_inputs_stay_close(net, data):
    """An input misclassified from the start is adversarial at C&W's first step: its best
    adversarial is (nearly) the input itself."""
    x, y = data
    ours = l2.carlini_wagner_l2(net, x[:3], y[:3], **CW)
    assert _fooled(net, ours, y[:3]).all()
    assert _l2(ours, x[:3]).max() < 1e-3


# ---------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("model_kind", ["disjoint", "dense"])
def test_deepfool_lands_on_the_linear_optimum_times_its_overshoot(model_kind):
    lin = disjoint(seed=4) if model_kind == "disjoint" else dense(seed=6)
    x, y = inputs_where(lin, lin.l2_optimum, 0.05, 1.5, n=20, seed=4)
    truth = lin.l2_optimum(x)
    adv = l2.deepfool_l2(lin.model, x, y, steps=50, candidates=10, overshoot=0.02)
    assert (lin.predict(adv) != y).all()
    # The first step crosses: (distance + 1e-4) along the nearest boundary's normal, times
    # (1 + overshoot); the box never binds for these inputs (linear_models).
    np.testing.assert_allclose(_l2(adv, x), 1.02 * (truth + 1e-4), rtol=1e-4)


def test_cw_converges_to_the_linear_optimum():
    lin = dense(seed=7)
    x, y = inputs_where(lin, lin.l2_optimum, 0.05, 1.5, n=20, seed=5)
    truth = lin.l2_optimum(x)
    params = A.ATTACKS["cw"].params()  # the registered defaults: 2 x 150 steps
    adv = l2.carlini_wagner_l2(lin.model, x, y, **params)
    assert (lin.predict(adv) != y).all()
    ratio = _l2(adv, x) / truth
    assert np.all(ratio >= 1 - 1e-4)  # nothing beats the optimum
    # 300 Adam steps land close (measured: mean 1.03, worst 1.18 on these inputs).
    assert ratio.mean() <= 1.05 and ratio.max() <= 1.25


# ---------------------------------------------------------------------------- shapes
def test_padding_changes_no_result(net, data, monkeypatch):
    """Batches padded to a bucket (as on JAX) give the rows' results of the unpadded batch,
    C&W's abort_early included (it sums the real rows' loss only). 21 rows with batch size 8:
    8 + 8 + 5, each padded to 16 below."""
    x, y = data[0][:21], data[1][:21]
    plain = {"cw": l2.carlini_wagner_l2(net, x, y, batch_size=8, **CW),
             "df": l2.deepfool_l2(net, x, y, batch_size=8, **DF)}
    with monkeypatch.context() as mp:
        mp.setattr(B, "needs_buckets", lambda jit_compile: True)
        mp.setattr(B, "bucket", lambda n, batch_size: 16)
        mp.setattr(l2, "MAX_PAD_FRACTION", 10.0)
        padded = {"cw": l2.carlini_wagner_l2(net, x, y, batch_size=8, **CW),
                  "df": l2.deepfool_l2(net, x, y, batch_size=8, **DF)}
    np.testing.assert_allclose(padded["df"], plain["df"], rtol=0, atol=DF_ATOL)
    np.testing.assert_allclose(_l2(padded["cw"], x), _l2(plain["cw"], x), rtol=CW_RTOL,
                               atol=1e-6)
    np.testing.assert_array_equal(_fooled(net, padded["cw"], y), _fooled(net, plain["cw"], y))


def test_batch_not_a_multiple_of_the_bucket(net, data):
    """21 inputs in batches of 16 (16 + 5, padded to the buckets 16 -> 32 on JAX): DeepFool's
    inputs are independent, so any batching gives Foolbox's result on the whole set."""
    x, y = data[0][:21], data[1][:21]
    ours = l2.deepfool_l2(net, x, y, batch_size=16, **DF)
    ref = _foolbox(net, fb.attacks.L2DeepFoolAttack(**DF), x, y)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=DF_ATOL)


def test_padding_only_where_it_wastes_little(monkeypatch):
    """A batch is padded to its bucket only if that adds at most 1/8 of its rows: 100 rows are
    not padded to 128 (28% more compute on every step), 120 are; without buckets, nothing."""
    x, y = np.zeros((250, 2, 2, 1), np.float32), np.zeros(250, np.int64)
    monkeypatch.setattr(B, "needs_buckets", lambda jit_compile: True)
    sizes = {n: [(k, len(xb)) for _, k, xb, _ in l2._batches(x[:n], y[:n], 256, True)]
             for n in (100, 120, 250)}
    assert sizes == {100: [(100, 100)], 120: [(120, 128)], 250: [(250, 256)]}
    assert [len(xb) for _, _, xb, _ in l2._batches(x[:250], y[:250], 64, True)] == [
        64, 64, 64, 64]  # 58 rows padded to 64: 6 more
    monkeypatch.setattr(B, "needs_buckets", lambda jit_compile: False)
    assert [len(xb) for _, _, xb, _ in l2._batches(x[:120], y[:120], 256, False)] == [120]


def test_empty_and_single_inputs(net, data):
    x, y = data
    for fn, params in ((l2.deepfool_l2, DF), (l2.carlini_wagner_l2, CW)):
        empty = fn(net, x[:0], y[:0], **params)
        assert empty.shape == (0, 8, 8, 1) and empty.dtype == np.float32
    one = A.run_attack(net, x[5:6], y[5:6], "deepfool", progress=False)
    assert one.success.shape == (1,) and one.success[0] and one.l2[0] > 0
    with pytest.raises(DareError, match="cannot attack 0 images"):
        A.run_attack(net, x[:0], y[:0], "cw", progress=False)


def test_bad_arguments(net, data):
    x, y = data
    with pytest.raises(DareError, match="loss"):
        l2.deepfool_l2(net, x, y, loss="margin")
    with pytest.raises(DareError, match="labels"):
        l2.carlini_wagner_l2(net, x, y[:3])
    with pytest.raises(DareError, match=r"\[0, 1\]"):
        l2.deepfool_l2(net, x + 1, y)
    with pytest.raises(DareError, match="2 candidate"):
        l2.deepfool_l2(net, x, y, candidates=1)


# ---------------------------------------------------------------------------- run_attack
@pytest.mark.parametrize("attack", ["cw", "deepfool"])
def test_run_attack_compiled_by_default_and_foolbox_on_request(net, data, attack):
    x, y = data
    params = {"steps": 30} if attack == "cw" else {"candidates": 4}
    ours = A.run_attack(net, x, y, attack, params=params, progress=False)
    ref = A.run_attack(net, x, y, attack, params=params, progress=False, engine="foolbox")
    assert ours.config["engine"] == "compiled" and ref.config["engine"] == "foolbox"
    assert {k: v for k, v in ours.config.items() if k != "engine"} == \
        {k: v for k, v in ref.config.items() if k != "engine"}
    np.testing.assert_array_equal(ours.success, ref.success)
    np.testing.assert_array_equal(ours.clean_correct, ref.clean_correct)
    np.testing.assert_array_equal(ours.clean_correct, np.arange(len(x)) >= 3)
    np.testing.assert_allclose(ours.l2, ref.l2, rtol=CW_RTOL, atol=1e-5)
    np.testing.assert_allclose(ours.linf, np.abs(ours.x_adv - x).reshape(len(x), -1).max(1),
                               atol=1e-6)


def test_run_attack_budget_clips_like_foolbox(net, data):
    """With an epsilon, the minimal adversarials are scaled onto the L2 ball as Foolbox's
    ``clip_perturbation`` does, and success is judged on the clipped images."""
    x, y = data
    eps = float(np.median(A.run_attack(net, x, y, "deepfool", progress=False).l2[3:]))
    ours = A.run_attack(net, x, y, "deepfool", eps=eps, progress=False)
    ref = A.run_attack(net, x, y, "deepfool", eps=eps, progress=False, engine="foolbox")
    assert ours.l2.max() <= eps * (1 + 1e-5)
    assert 0 < ours.fooled.sum() < ours.clean_correct.sum()  # the budget binds for some
    np.testing.assert_array_equal(ours.success, ref.success)
    np.testing.assert_allclose(ours.x_adv, ref.x_adv, atol=DF_ATOL)


def test_sweep_attack_uses_the_compiled_engine(net, data):
    x, y = data
    eps = [0.1, 0.5, 2.0]
    ours = A.sweep_attack(net, x, y, "deepfool", eps, params={"candidates": 4},
                          progress=False)
    ref = A.sweep_attack(net, x, y, "deepfool", eps, params={"candidates": 4},
                         progress=False, engine="foolbox")
    assert ours.config["engine"] == "compiled"
    np.testing.assert_array_equal(ours.success, ref.success)
    np.testing.assert_allclose(ours.l2, ref.l2, atol=DF_ATOL)


def test_engine_choice_is_checked():
    assert A.attack_engine("cw") == "compiled" and A.attack_engine("fgsm") == "foolbox"
    assert A.attack_engine("deepfool", "foolbox") == "foolbox"
    with pytest.raises(DareError, match="no compiled engine"):
        A.attack_engine("pgd", "compiled")
    with pytest.raises(DareError, match="engine must be one of"):
        A.attack_engine("cw", "tf")

