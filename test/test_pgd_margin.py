"""``pgd-margin``: PGD on the Carlini-Wagner margin, for the worst case of issue 15.

On a linear model the cross-entropy's ascent raises every wrong class at once and stops short
of the L-inf optimum; the margin's ascent moves along ``sign(w_c - w_y)`` for the best wrong
class ``c``, the optimal direction whenever ``c`` is also the class nearest in L-inf. The
inputs below are chosen so that it is (and stays so in the whole eps-ball), which makes the
optimum the margin attack's exact minimal epsilon, and shows the cross-entropy PGD above it.
"""

from __future__ import annotations

import foolbox as fb
import numpy as np
import pytest
from linear_models import Linear, dense

from darekit import attacks as A
from darekit.engine import LinfEngine, LinfGradient
from darekit.errors import DareError
from darekit.evaluate import EvalConfig, SearchConfig, _supports_engine, evaluate_attack

BUDGET = 0.05          # inputs in [0.4, 0.6], every probe <= BUDGET: the box [0, 1] never binds
TOL = SearchConfig().tol
SLACK = 1e-4           # float32 logits of the Keras model against the float64 closed form


def margin_safe(lin: Linear, x: np.ndarray, r: float) -> np.ndarray:
    """``(N,)``: the class ``c`` nearest in L-inf is the best wrong class everywhere in the
    L-inf ball of radius ``r`` around ``x`` (``z_c - z_k > r ||w_c - w_k||_1`` for every other
    wrong ``k``). There the margin's signed gradient is ``sign(w_c - w_y)``, the optimal
    direction, at every PGD iterate."""
    z = lin.logits(x)
    rows = np.arange(len(x))
    y, c = z.argmax(1), lin._pairwise(x, 1).argmin(1)
    gap = z[rows, c][:, None] - z                                            # (N, K)
    l1 = np.abs(lin.w[:, c].T[:, :, None] - lin.w[None]).sum(1)              # (N, K)
    ok = gap - r * l1 > 0
    ok[rows, y] = ok[rows, c] = True
    return ok.all(1)


@pytest.fixture(scope="module")
def hard_case() -> tuple[Linear, np.ndarray, np.ndarray, np.ndarray]:
    """A dense linear model and 40 inputs with their L-inf optimum in [0.1, 0.9] x BUDGET
    (so the search probes the budget first, then only below it) on which the margin attack
    is optimal by ``margin_safe``."""
    lin = dense(seed=5)
    cand = np.random.default_rng(0).uniform(0.4, 0.6, (200_000, *lin.shape)).astype(np.float32)
    opt = lin.linf_optimum(cand)
    keep = (opt > 0.1 * BUDGET) & (opt < 0.9 * BUDGET) & margin_safe(lin, cand, BUDGET)
    x = cand[np.flatnonzero(keep)[:40]]
    assert len(x) == 40
    return lin, x, lin.predict(x), lin.linf_optimum(x)


def test_registered_like_pgd_but_not_in_the_default_five():
    spec = A.get_spec("pgd-margin")
    assert (spec.norm, spec.kind) == ("linf", "fixed")
    assert spec.defaults == A.get_spec("pgd").defaults      # same steps, step size, start
    assert "pgd-margin" not in A.DEFAULT_ATTACKS
    assert A.parse_attacks(["all"]) == A.DEFAULT_ATTACKS
    assert A.parse_attacks(["pgd,pgd-margin"]) == ("pgd", "pgd-margin")
    assert EvalConfig(attacks=A.parse_attacks(["pgd-margin"])).attacks == ("pgd-margin",)
    assert LinfGradient.from_spec("pgd-margin") == LinfGradient(20, 2.5 / 20, True,
                                                                 loss="margin")
    assert LinfGradient.from_spec("pgd").loss == "ce"
    assert _supports_engine(spec)
    with pytest.raises(DareError, match="loss must be one of"):
        LinfGradient(20, 0.125, True, loss="dlr")


def test_engine_refuses_a_loss_it_does_not_know():
    class Undeclared(fb.attacks.LinfProjectedGradientDescentAttack):
        def get_loss_fn(self, model, labels):   # some other loss, not declared as linf_loss
            return super().get_loss_fn(model, labels)

    class Inherits(A._LinfMarginPGD):        # the margin's get_loss_fn and its declaration
        pass

    class Overrides(A._LinfMarginPGD):       # its own get_loss_fn: the declaration is stale
        def get_loss_fn(self, model, labels):
            return super().get_loss_fn(model, labels)

    with pytest.raises(DareError, match="plain L-inf"):
        LinfGradient.from_foolbox(Undeclared())
    assert LinfGradient.from_foolbox(Inherits()).loss == "margin"
    with pytest.raises(DareError, match="plain L-inf"):
        LinfGradient.from_foolbox(Overrides())


def test_engine_step_matches_the_foolbox_subclass():
    """The engine's margin step against Foolbox's PGD with the margin loss (``run_attack``'s
    path), from the clean input so that no random draw differs."""
    import keras

    init = keras.initializers.GlorotUniform
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu",
                            kernel_initializer=init(seed=0))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, kernel_initializer=init(seed=1))(
        keras.layers.Flatten()(h)))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (40, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    params = {"steps": 3, "random_start": False}
    engine = LinfEngine(model, LinfGradient.from_spec("pgd-margin", params), batch_size=16)
    ce = LinfEngine(model, LinfGradient.from_spec("pgd", params), batch_size=16)
    for eps in (0.05, 0.3):
        res = A.run_attack(model, x, y, "pgd-margin", eps=eps, params=params, progress=False)
        x_adv, ok = engine(x, y, eps)
        assert np.abs(x_adv - res.x_adv).max() <= 1e-5
        np.testing.assert_array_equal(ok, res.success)
        # The loss matters: the cross-entropy's steps go elsewhere.
        assert np.abs(ce(x, y, eps)[0] - x_adv).max() > 1e-3


def test_margin_pgd_reaches_the_linf_optimum_where_the_ce_pgd_does_not(hard_case):
    lin, x, y, opt = hard_case
    margin = evaluate_attack(lin.model, x, y, "pgd-margin", budget=BUDGET, progress=False)
    assert margin.config["search"]["engine"] == "tf"      # the compiled engine ran it
    assert margin.clean_correct.all() and margin.fooled.all()
    # Every bracket holds the optimum and is closed to tol: hi < optimum / (1 - tol).
    assert np.all(margin.lo < opt * (1 + SLACK)) and np.all(margin.hi >= opt * (1 - SLACK))
    assert np.all(margin.perturbation <= opt / (1 - TOL) * (1 + SLACK))
    assert not margin.robust_at_budget.any()                # every optimum is below the budget

    ce = evaluate_attack(lin.model, x, y, "pgd", budget=BUDGET, progress=False)
    assert ce.fooled.all()
    assert np.all(ce.perturbation >= opt * (1 - SLACK))     # no attack beats the optimum
    beyond = ce.perturbation > opt / (1 - TOL) * (1 + SLACK)
    assert beyond.mean() >= 0.75, beyond.mean()            # TF: 40 of 40 (1.03-1.12 x)
    assert ce.er >= 1.03 * margin.er                         # TF: 1.05 x


def test_foolbox_path_flips_exactly_the_inputs_within_the_budget(hard_case):
    """``run_attack`` (Foolbox's PGD with the margin loss, random start) at one epsilon fools
    an input iff its L-inf optimum is within it."""
    lin, x, y, opt = hard_case
    eps = float(np.median(opt))
    res = A.run_attack(lin.model, x, y, "pgd-margin", eps=eps, seed=0, progress=False)
    near = np.abs(opt - eps) <= 1e-4 * eps      # float32 ties at the median: either way
    np.testing.assert_array_equal(res.success[~near], (opt <= eps)[~near])
    assert res.linf.max() <= eps + 1e-6
