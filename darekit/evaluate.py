"""Robustness evaluation: Empirical Robustness, success rate and robust accuracy of classifiers
under the five attacks, with intervals; a run's evaluation (``dare/test.py``) with its report.

Definitions (also written into every ``results.json``):

- **clean accuracy**: fraction of the N test images classified correctly.
- **Empirical Robustness (ER)**, as the Adversarial Robustness Toolbox defines it: over the
  inputs whose prediction the attack changes, the mean of ``||x_adv - x||_p / ||x||_p`` with
  the attack's minimal perturbation and ``p`` its norm; restricted to the correctly classified
  test inputs (there "changed" and "fooled" coincide). Higher is more robust.
  Minimization attacks (C&W, DeepFool) return their minimal adversarial directly. Fixed-epsilon
  attacks (FGSM, PGD, BIM) get a per-input minimal epsilon by a bracket search
  (``minimal_epsilons``): every input is attacked at the budget first; an input not fooled
  there is retried at twice its epsilon (up to ``eps_max``), a fooled one is bisected, until
  its own bracket (largest failing ``lo``, smallest fooling ``hi``) satisfies
  ``hi - lo <= tol * hi``. ER is computed at ``hi``, so it overstates the bracketed minimum by
  at most ``tol / (1 - tol)`` (1.01% at the default ``tol`` 0.01); ``results.json`` reports the
  largest relative bracket that remains (``bracket``).
- **attack success rate**: fraction of the correctly classified inputs that the attack fools
  (within ``eps_max`` for fixed attacks).
- **robust accuracy**: fraction of all N inputs still classified correctly under the attack at
  the budget (the dataset's: L-inf 0.1 Fashion-MNIST, 8/255 CIFAR-10/SVHN; L2 1.5 and 0.5).
- **intervals**: 95%; Wilson for proportions, percentile bootstrap over the test images for ER.

FGSM, BIM, PGD and PGD on the margin run on the compiled per-input-epsilon engine
(``darekit.engine``): each bisection round is one batched pass over the inputs still open.
``SearchConfig.engine = "foolbox"`` runs the same search on Foolbox, one call per distinct
epsilon (the reference).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import keras
import numpy as np
from tqdm.auto import tqdm

from darekit import backend as B
from darekit import io, layout, stats
from darekit.attacks import (
    DEFAULT_ATTACKS,
    AttackSpec,
    attack_config,
    get_spec,
    parse_attacks,
    predict_logits,
    run_attack,
)
from darekit.config import option
from darekit.crosscheck import CrossCheckConfig, cross_check, transfer_set
from darekit.data import balanced_subset, dataset_spec
from darekit.errors import DareError
from darekit.rundir import Run
from darekit.seeding import derive_seed

DEFINITIONS = {
    "clean_accuracy": "fraction of the N test images classified correctly",
    "er": "Empirical Robustness (ART): mean over the correctly classified inputs that the attack "
          "fools of ||x_adv - x||_p / ||x||_p, minimal perturbation, p = the attack's norm",
    "success_rate": "fraction of the correctly classified inputs the attack fools "
                    "(within eps_max for fixed-epsilon attacks)",
    "robust_accuracy": "fraction of all N inputs still classified correctly under the attack "
                       "at the budget",
    "min_eps_search": "fixed-epsilon attacks: each input is attacked at the budget; one not "
                      "fooled is retried where its logit margin extrapolates to 0 (1.1-4x its "
                      "largest failing epsilon, up to eps_max); a fooled input's bracket "
                      "[lo, hi] is narrowed at the secant estimate of its margin's zero "
                      "(bisection when a round did not halve it) until hi - lo <= tol * hi; "
                      "ER is computed at hi",
    "bracket": "largest (hi - lo) / hi over the fooled inputs when the search stopped: ER "
               "overstates the bracketed minimal perturbation by at most bracket / (1 - "
               "bracket)",
    "intervals": "95%: Wilson score intervals for proportions; percentile bootstrap over the "
                 "test images for ER; a method is significantly best when the paired "
                 "bootstrap interval of its ER minus the runner-up's excludes 0",
    "comparable": "ER computed from a success rate of at least 90%; below that it averages "
                  "over the easiest images only and is marked not comparable",
}

NORM_ORD = {"linf": np.inf, "l2": 2}
ENGINE_ATTACKS = ("fgsm", "bim", "pgd", "pgd-margin")
"""The attacks the compiled per-input-epsilon engine runs (``darekit.engine``)."""
ENGINES = ("tf", "foolbox")
MIN_COMPARABLE_SUCCESS = 0.9


@dataclass(frozen=True)
class SearchConfig:
    """Minimal-epsilon search of fixed-epsilon attacks (see the module docstring)."""

    tol: float = option(0.01, "stop refining an input's minimal epsilon when its bracket "
                        "satisfies hi - lo <= tol * hi (ER then overstates the minimum by at "
                        "most tol / (1 - tol))")
    eps_max_factor: float = option(4.0, "search up to this multiple of the budget")
    max_rounds: int = option(24, "at most this many batched attack passes per attack")
    engine: str = option("tf", "fgsm, bim, pgd and pgd-margin on the compiled "
                         "per-input-epsilon engine (tf: a historical name, it runs on the "
                         "Keras backend in use) or on Foolbox, one call per distinct epsilon "
                         "(the reference)",
                         choices=ENGINES)

    def __post_init__(self) -> None:
        if not 0 < self.tol < 0.5:
            raise DareError(f"--tol must lie in (0, 0.5); received {self.tol}")
        if self.max_rounds < 1:
            raise DareError(f"--max-rounds must be positive; received {self.max_rounds}")
        if not self.eps_max_factor >= 1:
            raise DareError(f"--eps-max-factor must be >= 1; received {self.eps_max_factor}")
        if self.engine not in ENGINES:
            raise DareError(f"--engine must be one of {list(ENGINES)}; received "
                            f"{self.engine!r}")

    @property
    def precision(self) -> float:
        """The guaranteed bound on ER's relative overstatement once every bracket is closed."""
        return self.tol / (1 - self.tol)


def input_norms(x: np.ndarray, norm: str) -> np.ndarray:
    """``||x||_p`` per image, ``(N,)`` (float64)."""
    return np.linalg.norm(x.reshape(len(x), -1).astype(np.float64), ord=NORM_ORD[norm], axis=1)


def perturbation_norms(x: np.ndarray, x_adv: np.ndarray, norm: str) -> np.ndarray:
    """``||x_adv - x||_p`` per image, ``(N,)`` (float64)."""
    return input_norms(x_adv.astype(np.float64) - x, norm)


def empirical_robustness(perturbation: np.ndarray, x_norm: np.ndarray, fooled: np.ndarray
                         ) -> float:
    """ART's ER: mean of ``perturbation / x_norm`` over ``fooled``; NaN when none is fooled
    (an attack that fools nothing has no minimal perturbation to average)."""
    if not fooled.any():
        return math.nan
    return float(np.mean(perturbation[fooled] / x_norm[fooled]))


# ---------------------------------------------------------------------------- the search
Probe = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]
"""``probe(idx (k,), eps (k,), round) -> (success (k,) bool, perturbation norm (k,), margin
(k,))``: attack inputs ``idx`` (an index may repeat) each at its own epsilon; ``margin`` is
the logit margin ``z_y - max_{j != y} z_j`` of the result (negative when fooled)."""


@dataclass(frozen=True, eq=False)
class MinimalEpsilons:
    """Result of ``minimal_epsilons`` for N inputs; ``(N,)`` arrays.

    ``lo``: largest epsilon known not to fool (0 if none tried); ``hi``: smallest epsilon known
    to fool (NaN if none within ``eps_max``); ``perturbation``: the norm of the adversarial at
    ``hi``; ``at_budget``: fooled at the budget.
    """

    lo: np.ndarray
    hi: np.ndarray
    perturbation: np.ndarray
    at_budget: np.ndarray
    rounds: int
    evaluations: int

    @property
    def fooled(self) -> np.ndarray:
        return ~np.isnan(self.hi)

    def bracket(self) -> float:
        """Largest relative bracket ``(hi - lo) / hi`` over the fooled inputs (0 if none)."""
        f = self.fooled
        return float(np.max((self.hi[f] - self.lo[f]) / self.hi[f])) if f.any() else 0.0


def minimal_epsilons(probe: Probe, active: np.ndarray, budget: float, eps_max: float,
                     tol: float, max_rounds: int, clean_margin: np.ndarray | None = None,
                     interpolate: bool = True) -> MinimalEpsilons:
    """Per-input minimal epsilons of the ``active`` inputs ``(N,)`` bool, one batched ``probe``
    per round.

    Round 0 attacks every active input at ``budget``. Then, each round:

    - an input not fooled yet is retried beyond its largest failing epsilon ``lo``: where the
      logit margin falls linearly from its last two failures to 0, times ``1 + tol`` (at least
      1.1 ``lo``, at most 4 ``lo`` and ``eps_max``), or at ``2 lo`` when the margin did not
      fall; at ``lo = eps_max`` it is not fooled;
    - a fooled input whose bracket ``[lo, hi]`` is wider than ``tol * hi`` is attacked at two
      epsilons ``r (1 -+ tol / 3)`` around the secant estimate ``r`` of its margin's zero (the
      bisection midpoint instead when the last round did not halve the bracket), so that a
      good estimate closes the bracket in one round and a bad one still halves it.

    The search ends when no input is open, or after ``max_rounds`` rounds. ``clean_margin``
    ``(N,)`` is the margin at epsilon 0 (None: extrapolation starts by doubling). The bracket
    invariant holds for any attack, monotone or not: the attack failed at ``lo`` (or
    ``lo = 0``) and succeeded at ``hi``.
    """
    if not 0 < budget <= eps_max:
        raise DareError(f"the budget {budget} must lie in (0, eps_max = {eps_max}]")
    n = len(active)
    lo, hi = np.zeros(n), np.full(n, np.nan)
    m_lo = np.full(n, np.nan) if clean_margin is None else np.asarray(clean_margin, float)
    m_hi, pert = np.full(n, np.nan), np.full(n, np.nan)
    prev_lo, m_prev = np.zeros(n), np.full(n, np.nan)
    width = np.full(n, np.inf)          # bracket width before the last round
    at_budget = np.zeros(n, bool)
    idx = np.flatnonzero(active)
    eps = np.full(len(idx), float(budget))
    rounds = evaluations = 0
    while len(idx) and rounds < max_rounds:
        ok, p, m = (np.asarray(v) for v in probe(idx, eps, rounds))
        ok, p, m = ok.astype(bool), p.astype(np.float64), m.astype(np.float64)
        if rounds == 0:
            at_budget[idx] = ok
        evaluations += len(idx)
        rounds += 1
        before = np.where(np.isnan(hi), np.inf, hi - lo)
        # Successes lower hi (the smallest fooling epsilon wins), failures raise lo below hi.
        for j in np.argsort(eps, kind="stable"):
            i, e = idx[j], eps[j]
            if ok[j]:
                if np.isnan(hi[i]) or e < hi[i]:
                    hi[i], m_hi[i], pert[i] = e, m[j], p[j]
            elif e > lo[i] and (np.isnan(hi[i]) or e < hi[i]):
                prev_lo[i], m_prev[i] = lo[i], m_lo[i]
                lo[i], m_lo[i] = e, m[j]
        width = np.where(np.isin(np.arange(n), idx), before, width)
        idx, eps = _proposals(active, lo, hi, m_lo, m_hi, prev_lo, m_prev, width, tol,
                              eps_max, interpolate)
    return MinimalEpsilons(lo, hi, pert, at_budget, rounds, evaluations)


def _proposals(active, lo, hi, m_lo, m_hi, prev_lo, m_prev, width, tol, eps_max,
               interpolate):
    """The next round's (inputs, epsilons) of ``minimal_epsilons``."""
    fooled = ~np.isnan(hi)
    grow = np.flatnonzero(active & ~fooled & (lo < eps_max))
    # Unfooled: extrapolate the margin's fall through the last two failures.
    falling = (m_prev[grow] > m_lo[grow]) & np.isfinite(m_prev[grow]) & (lo[grow] > 0) \
        & interpolate
    with np.errstate(divide="ignore", invalid="ignore"):
        root = lo[grow] + m_lo[grow] * (lo[grow] - prev_lo[grow]) / (m_prev[grow] - m_lo[grow])
    guess = np.clip(root * (1 + tol), 1.1 * lo[grow], 4 * lo[grow])
    e_grow = np.minimum(np.where(falling, guess, 2 * lo[grow]), eps_max)

    open_ = np.flatnonzero(fooled & (hi - lo > tol * hi))
    a, b = lo[open_], hi[open_]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = m_lo[open_] / (m_lo[open_] - np.minimum(m_hi[open_], 0.0))
    secant = np.isfinite(frac) & (frac > 0) & (b - a <= 0.5 * width[open_]) & interpolate
    r = np.where(secant, a + (b - a) * np.clip(frac, 0.0, 1.0), (a + b) / 2)
    d = tol * r / 3
    below, above = r - d, r + d
    use_below, use_above = secant & (below > a), secant & (above < b)
    neither = ~use_below & ~use_above           # bisect (or the bracket is narrower than 2 d)
    below = np.where(neither, (a + b) / 2, below)
    use_below |= neither
    idx = np.concatenate([grow, open_[use_below], open_[use_above]])
    eps = np.concatenate([e_grow, below[use_below], above[use_above]])
    return idx, eps


def _seed(seed: int, *parts: int) -> int:
    return derive_seed(seed, *parts)


def _engine_probe(model: keras.Model, spec: AttackSpec, params: Mapping[str, Any],
                  x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
                  jit_compile: bool = False) -> Probe:
    """FGSM: a line search (one gradient per input, then forward passes); BIM and PGD: the
    compiled engine, one random-start seed per round."""
    from darekit.engine import FGSMLine, LinfEngine, LinfGradient

    attack = LinfGradient.from_spec(spec.name, params)
    if attack == LinfGradient.fgsm():
        line = FGSMLine(model, x, y, batch_size, jit_compile)

        def probe(idx, eps, r):
            out = line.attack_all(idx, eps)
            return out.success, perturbation_norms(x[idx], out.x_adv, spec.norm), out.margin
        return probe

    engine = LinfEngine(model, attack, batch_size, jit_compile)

    def probe(idx, eps, r):
        out = engine.attack_all(x[idx], y[idx], eps, seed=_seed(seed, r))
        return out.success, perturbation_norms(x[idx], out.x_adv, spec.norm), out.margin
    return probe


def margins(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 256
            ) -> np.ndarray:
    """``z_y - max_{j != y} z_j`` per input ``(N,)``: negative when misclassified."""
    z = predict_logits(model, x, batch_size) if len(x) else np.zeros((0, 1), np.float32)
    true = z[np.arange(len(z)), y]
    z[np.arange(len(z)), y] = -np.inf
    return true - z.max(axis=1)


def _foolbox_probe(model: keras.Model, spec: AttackSpec, params: Mapping[str, Any],
                   x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
                   jit_compile: bool = False) -> Probe:
    """The reference: one Foolbox call per distinct epsilon of the round."""
    def probe(idx, eps, r):
        ok = np.zeros(len(idx), bool)
        pert, margin = np.zeros(len(idx)), np.zeros(len(idx))
        for k, e in enumerate(np.unique(eps)):
            sel = np.flatnonzero(eps == e)
            res = run_attack(model, x[idx[sel]], y[idx[sel]], spec, eps=float(e),
                             params=params, batch_size=batch_size, seed=_seed(seed, r, k),
                             progress=False, jit_compile=jit_compile)
            ok[sel] = res.success
            pert[sel] = res.linf if spec.norm == "linf" else res.l2
            margin[sel] = margins(model, res.x_adv, y[idx[sel]], batch_size)
        return ok, pert, margin
    return probe


def _supports_engine(spec: AttackSpec) -> bool:
    return spec.kind == "fixed" and spec.norm == "linf" and spec.name in ENGINE_ATTACKS


# ---------------------------------------------------------------------------- one attack
@dataclass(frozen=True, eq=False)
class AttackEvaluation:
    """One model under one attack on N images. Per-input arrays are ``(N,)``:
    ``perturbation`` holds the minimal perturbation norm (NaN where not fooled); ``lo``/``hi``
    the final brackets of a fixed-epsilon attack (NaN for minimization attacks)."""

    attack: str
    norm: str
    clean_correct: np.ndarray
    fooled: np.ndarray
    perturbation: np.ndarray
    x_norm: np.ndarray
    robust_at_budget: np.ndarray
    budget: float
    lo: np.ndarray
    hi: np.ndarray
    rounds: int
    evaluations: int
    seconds: float
    config: dict[str, Any]

    ARRAYS = ("clean_correct", "fooled", "perturbation", "x_norm", "robust_at_budget", "lo",
              "hi")

    def per_image(self) -> np.ndarray:
        """``(N,)`` relative minimal perturbation ``||delta||_p / ||x||_p``; NaN where not
        fooled. ER is its mean over the non-NaN entries."""
        return np.where(self.fooled, self.perturbation / self.x_norm, np.nan)

    @property
    def er(self) -> float:
        return empirical_robustness(self.perturbation, self.x_norm, self.fooled)

    def bracket(self) -> float:
        f = self.fooled & ~np.isnan(self.lo)
        if not f.any():
            return 0.0
        return float(np.max((self.hi[f] - self.lo[f]) / self.hi[f]))

    def summary(self, seed: int = 0) -> dict[str, Any]:
        n, n_correct, n_fooled = len(self.clean_correct), int(self.clean_correct.sum()), \
            int(self.fooled.sum())
        success = stats.wilson(n_fooled, n_correct)
        bracket = self.bracket()
        return {
            "attack": self.attack, "norm": self.norm, "n": n, "n_correct": n_correct,
            **stats.wilson(n_correct, n).as_dict("clean_accuracy"),
            **stats.er_interval(self.per_image(), seed).as_dict("er"),
            "n_fooled": n_fooled, **success.as_dict("success_rate"),
            "comparable": bool(n_correct and success.value >= MIN_COMPARABLE_SUCCESS),
            **stats.wilson(int(self.robust_at_budget.sum()), n).as_dict("robust_accuracy"),
            "budget": self.budget, "rounds": self.rounds, "evaluations": self.evaluations,
            "bracket": bracket, "er_precision": bracket / (1 - bracket) if bracket < 1 else
            math.inf,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.ARRAYS}


def attack_budget(attack: str, dataset: str) -> float:
    """The robust-accuracy budget of ``attack`` on ``dataset`` (by the attack's norm)."""
    return dataset_spec(dataset).budget(get_spec(attack).norm)


def evaluate_attack(model: keras.Model, x: np.ndarray, y: np.ndarray, attack: str, *,
                    budget: float | None = None, dataset: str | None = None,
                    search: SearchConfig = SearchConfig(),
                    params: Mapping[str, Any] | None = None, batch_size: int = 256,
                    seed: int = 0, progress: bool = True,
                    jit_compile: bool = False) -> AttackEvaluation:
    """Attack ``x`` ``(N, H, W, C)`` in [0, 1] with labels ``y`` ``(N,)``; ``model`` outputs
    logits. ``budget`` (default: the dataset's for the attack's norm) is where robust accuracy
    is reported; ``jit_compile`` runs the attacks with XLA (about 2x faster on a CPU; results
    equal up to float rounding; off under TensorFlow's op determinism:
    ``backend.xla_allowed``; JAX always compiles); see the module docstring for the rest."""
    t0 = time.perf_counter()
    jit_compile = B.xla_allowed(jit_compile)
    spec = get_spec(attack)
    if budget is None:
        if dataset is None:
            raise DareError("evaluate_attack needs a budget or a dataset")
        budget = attack_budget(spec.name, dataset)
    params = spec.params(**dict(params or {}))
    x_norm = input_norms(x, spec.norm)
    nan = np.full(len(x), np.nan)
    clean_margin = margins(model, x, y, batch_size)
    correct = clean_margin > 0

    if spec.kind == "minimization":
        # Only the correctly classified images are attacked: a misclassified one is neither
        # fooled nor robust whatever the attack returns, and C&W's hundreds of steps on it
        # were a fifth of the quick profile's C&W time. SearchConfig.engine "foolbox" asks for
        # the reference everywhere: C&W and DeepFool then run in Foolbox too (else in their
        # compiled form, ``darekit.l2``).
        idx = np.flatnonzero(correct)
        engine = "foolbox" if search.engine == "foolbox" else None
        pert, fooled = nan.copy(), np.zeros(len(x), bool)
        if len(idx):
            res = run_attack(model, x[idx], y[idx], spec, eps=None, params=params,
                             batch_size=batch_size, seed=seed, progress=progress,
                             jit_compile=jit_compile, engine=engine)
            pert[idx] = res.linf if spec.norm == "linf" else res.l2
            fooled[idx] = res.fooled
            config = res.config
        else:
            config = attack_config(spec, None, params, engine)
        return AttackEvaluation(
            attack=spec.name, norm=spec.norm, clean_correct=correct, fooled=fooled,
            perturbation=np.where(fooled, pert, np.nan), x_norm=x_norm,
            robust_at_budget=correct & ~(fooled & (pert <= budget)), budget=budget,
            lo=nan, hi=nan, rounds=1, evaluations=len(idx), seconds=time.perf_counter() - t0,
            config={**config, "budget": budget, "jit_compile": jit_compile})

    engine = search.engine if _supports_engine(spec) else "foolbox"
    make = _engine_probe if engine == "tf" else _foolbox_probe
    probe = make(model, spec, params, x, y, batch_size, seed, jit_compile)
    if progress:
        bar = tqdm(desc=f"{spec.name} epsilon search", unit=" attack pass", leave=False)
        inner = probe

        def probe(idx, eps, r):  # noqa: F811 - the same probe, with a progress bar
            bar.set_postfix_str(f"{len(idx)} images not yet bracketed to tol")
            out = inner(idx, eps, r)
            bar.update(1)
            return out
    eps_max = search.eps_max_factor * budget
    try:
        m = minimal_epsilons(probe, correct, budget, eps_max, search.tol, search.max_rounds,
                             clean_margin)
    finally:
        if progress:
            bar.close()
    fooled = m.fooled
    config = {**attack_config(spec, None, params), "budget": budget, "eps_max": eps_max,
              "search": asdict(replace(search, engine=engine)), "seed": seed,
              "jit_compile": jit_compile}
    return AttackEvaluation(
        attack=spec.name, norm=spec.norm, clean_correct=correct, fooled=fooled,
        perturbation=np.where(fooled, m.perturbation, np.nan), x_norm=x_norm,
        robust_at_budget=correct & ~m.at_budget, budget=budget, lo=np.where(fooled, m.lo,
                                                                            np.nan),
        hi=m.hi, rounds=m.rounds, evaluations=m.evaluations, seconds=time.perf_counter() - t0,
        config=config)


# ---------------------------------------------------------------------------- a run's models
CROSSCHECK = "crosscheck"


@dataclass(frozen=True)
class EvalConfig:
    """What ``dare/test.py`` evaluates: every model of a run under every attack on the same
    ``n`` seeded, class-balanced test images, and the cross-check of robust accuracy at the
    L-inf budget on the first ``crosscheck_n`` of them (all when None)."""

    n: int = option(1000, "test images (a seeded, class-balanced subset)")
    seed: int = option(0, "seed of the test-image draw, the attacks and the bootstrap")
    attacks: tuple[str, ...] = option(
        DEFAULT_ATTACKS, "attacks, comma-separated; 'all' = the paper's five",
        parse=lambda s: parse_attacks([s]), flag="--attack", metavar="NAMES")
    models: tuple[str, ...] | None = option(None, "model names, comma-separated",
                                            default_text="every model of the run")
    batch_size: int = option(256, "images per attack batch")
    jit_compile: bool = option(True, "run the attacks with XLA (about 2x faster on a CPU; "
                               "results equal up to float rounding)")
    search: SearchConfig = option(default_factory=SearchConfig, cli=False)
    params: Mapping[str, Mapping[str, Any]] = option(default_factory=dict, cli=False)
    baselines: str = option("all", "attacks an adversarial fine-tuning baseline adv-X is "
                            "evaluated under: all of them, or only its own X (the paper's "
                            "comparison: in scenario X, DARE against the baseline fine-tuned on "
                            "X's examples)", choices=("all", "own"))
    crosscheck: bool = option(True, "cross-check robust accuracy at the L-inf budget with "
                              "APGD-CE, targeted APGD-DLR, Square and a transfer attack")
    crosscheck_n: int | None = option(None, "cross-check this many of the test images",
                                      default_text="all of them")
    crosscheck_params: Mapping[str, Any] = option(default_factory=dict, cli=False)

    def __post_init__(self) -> None:
        if self.n < 10:
            raise DareError(f"--n must be at least 10 test images; received {self.n}")
        if self.batch_size < 1:
            raise DareError(f"--batch-size must be positive; received {self.batch_size}")
        if self.baselines not in ("all", "own"):
            raise DareError(f"--baselines must be all or own; received {self.baselines!r}")
        if self.crosscheck_n is not None and self.crosscheck_n < 10:
            raise DareError(f"--crosscheck-n must be at least 10; received {self.crosscheck_n}")
        for a in self.attacks:
            get_spec(a)
        for a, p in self.params.items():
            get_spec(a).params(**p)  # unknown attack or parameter: fail now, not mid-run
        self.crosscheck_config(0.1)  # unknown or bad cross-check option: fail now

    def crosscheck_config(self, eps: float) -> CrossCheckConfig:
        return CrossCheckConfig(eps=eps, seed=self.seed, batch_size=self.batch_size,
                                **dict(self.crosscheck_params))


def _evaluated(cfg: EvalConfig, model: str, attack: str) -> bool:
    """Whether ``model`` is evaluated under ``attack`` (``cfg.baselines``)."""
    from darekit.adv_finetune import ADV_PREFIX

    own = not model.startswith(ADV_PREFIX) or model == ADV_PREFIX + attack
    return cfg.baselines == "all" or own


def _mtime(run: Run, model: str) -> float:
    return run.weights_path(model).stat().st_mtime


def _cached(run: Run, name: str, key: Mapping[str, Any], compute: Callable[[], tuple[dict, dict]]
            ) -> tuple[dict, dict[str, np.ndarray]]:
    """``eval/parts/<name>.{json,npz}``: computed once per ``key``, read back after that (an
    interrupted evaluation resumes at the first missing part)."""
    stem = run.file(f"{layout.EVAL_PARTS}/{name}")
    meta_path, arrays_path = stem.with_suffix(".json"), stem.with_suffix(".npz")
    if meta_path.is_file() and arrays_path.is_file():
        try:
            meta = io.read_json(meta_path)
            if meta.get("key") == io.jsonable(key):
                return meta, io.read_npz(arrays_path)
        except io.CorruptFileError as e:  # a damaged part is computed again, not fatal
            io.warn(f"{e}; computing it again")
    meta, arrays = compute()
    io.write_npz(arrays_path, **arrays)
    meta = {"key": io.jsonable(key), **meta}
    io.write_json(meta_path, meta)  # written last: it marks the part as complete
    return meta, arrays


def evaluate_run(run: Run, cfg: EvalConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate the run's models (``original``, ``dare``, ``adv-fgsm``...) under the attacks,
    then cross-check their robust accuracy at the L-inf budget.

    Every (model, attack) result is saved as soon as it is done (``eval/parts/``), so an
    interrupted evaluation continues where it stopped. Writes ``eval/results.csv``,
    ``results.json``, ``report.md`` and the plots; returns the result rows.
    """
    from darekit import report

    models = list(cfg.models) if cfg.models else run.named_models()
    missing = [m for m in models if m != "original" and not run.model_path(m).is_file()]
    if missing:
        raise DareError(f"run {run.path} has no model(s) {missing}; it has {run.named_models()}")
    data = run.data()
    idx = balanced_subset(data.y_test, min(cfg.n, len(data.y_test)), cfg.seed)
    x, y = data.x_test[idx], data.y_test[idx]
    io.write_json(run.file(layout.EVAL_CONFIG),
                  {"eval": {**asdict(cfg), "test_idx": idx}, "definitions": DEFINITIONS})
    base = {"dataset": run.dataset_name, "arch": run.model_name, "seed": run.seed}
    rows: list[dict[str, Any]] = []
    parts: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    configs: dict[str, Any] = {}
    # One model object for every method: its weights are swapped, so the attacks' compiled
    # functions (XLA compilations included) are built once per evaluation, not per method.
    holder: dict[str, Any] = {"name": None, "model": run.build_model()}

    def load(name: str) -> keras.Model:
        if holder["name"] != name:
            run.load_named(name, into=holder["model"])
            holder["name"] = name
        return holder["model"]

    todo = [(m, a) for m in models for a in cfg.attacks if _evaluated(cfg, m, a)]
    bar = tqdm(todo, desc="evaluation", unit="scenario", disable=not progress)
    for model_name, attack in bar:
        bar.set_postfix_str(f"{model_name} / {attack}")
        params = dict(cfg.params.get(attack, {}))
        key = {"n": len(idx), "seed": cfg.seed, "search": asdict(cfg.search), "params": params,
               "jit_compile": cfg.jit_compile, "weights_mtime": _mtime(run, model_name)}

        def compute(model_name=model_name, attack=attack, params=params):
            ev = evaluate_attack(load(model_name), x, y, attack, dataset=run.dataset_name,
                                 search=cfg.search, params=params, batch_size=cfg.batch_size,
                                 seed=cfg.seed, progress=progress, jit_compile=cfg.jit_compile)
            # Wall time stays out of the summary: two runs with one seed give identical
            # results (results.csv), and a time is not a result.
            return {"summary": ev.summary(cfg.seed), "config": ev.config,
                    "seconds": round(ev.seconds, 3)}, ev.arrays()

        meta, arrays = _cached(run, f"{model_name}__{attack}", key, compute)
        configs[attack] = meta["config"]
        rows.append({**base, "model": model_name, **meta["summary"]})
        parts[model_name, attack] = arrays
    bar.close()

    # Methods whose fine-tuning is not a result (diverged, no-op) have no model: they are
    # reported as such, with the reason.
    for name, info in run.not_results().items():
        if cfg.models and name not in cfg.models:
            continue
        rows += [{**base, "model": name, "attack": a, "status": info["status"], "er": math.nan,
                  "lr": info["lr"], "why": info["why"]}
                 for a in cfg.attacks if _evaluated(cfg, name, a)]
    checks, found = _crosscheck_run(run, cfg, models, x, y, parts, load, progress) \
        if cfg.crosscheck else ([], {})
    report.write_run_report(run.path / layout.EVAL_DIR, {
        "run": str(run.path), "definitions": DEFINITIONS, "attacks": configs,
        "results": rows, "crosscheck": checks}, parts, seed=cfg.seed, found=found)
    return rows


def _crosscheck_run(run: Run, cfg: EvalConfig, models: Sequence[str], x: np.ndarray,
                    y: np.ndarray, parts: Mapping[tuple[str, str], Mapping[str, np.ndarray]],
                    load: Callable[[str], keras.Model], progress: bool
                    ) -> tuple[list[dict[str, Any]], dict[tuple[str, str], dict[str, Any]]]:
    """Robust accuracy at the L-inf budget under APGD-CE, targeted APGD-DLR, Square and a
    transfer attack from the original model; worst case per image with the package's PGD.

    Returns the rows and, for the worst case (``worstcase.crosscheck_parts``), what APGD found
    per (model, attack) on the evaluation's N images (only on the cross-checked ones; a model
    without an evaluated L-inf attack, or whose cached part predates these arrays, has none).
    """
    from darekit import worstcase

    linf_attacks = sorted(a for (_, a) in parts if get_spec(a).norm == "linf")
    eps = dataset_spec(run.dataset_name).linf_budget
    cc = cfg.crosscheck_config(eps)
    pick = np.sort(balanced_subset(y, cfg.crosscheck_n, cfg.seed)) \
        if cfg.crosscheck_n is not None and cfg.crosscheck_n < len(y) else np.arange(len(y))
    xs, ys = x[pick], y[pick]
    base_key = {"n": len(pick), "config": asdict(cc)}
    src = _mtime(run, "original")
    tmeta, tarr = _cached(run, "transfer", {**base_key, "source_mtime": src}, lambda: (
        {"source": "original"}, {"x_adv": transfer_set(load("original"), xs, ys, cc)}))
    rows: list[dict[str, Any]] = []
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for name in tqdm(models, desc="cross-check", unit="model", disable=not progress):
        own = parts.get((name, "pgd"), {}).get("robust_at_budget")
        own = None if own is None else own[pick]
        key = {**base_key, "weights_mtime": _mtime(run, name), "source_mtime": src,
               "own": None if own is None else own.tolist()}

        def compute(name=name, own=own):
            res = cross_check(load(name), xs, ys, cc, transfer=tarr["x_adv"], own_robust=own,
                              progress=progress)
            summary = res.summary()
            seconds = summary.pop("seconds")
            # linf/<attack>: the norm of what each attack found, per cross-checked image (NaN:
            # not broken), and pick: those images' indices among the N, for the worst case.
            return {"summary": summary, "config": res.config, "seconds": seconds}, {
                f"robust/{k}": v for k, v in res.robust.items()} | {
                f"linf/{k}": v for k, v in res.linf.items()} | {
                "worst_case": res.worst_case, "pick": pick}

        meta, arrays = _cached(run, f"{name}__{CROSSCHECK}", key, compute)
        rows.append({"dataset": run.dataset_name, "arch": run.model_name, "seed": run.seed,
                     "model": name, **meta["summary"]})
        reference = next((parts[name, a] for a in linf_attacks if (name, a) in parts), None)
        if reference is not None and "pick" in arrays:   # older parts: left out, reported
            linf = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("linf/")}
            for a, p in worstcase.crosscheck_parts(linf, arrays["pick"], reference,
                                                   cc.eps).items():
                found[name, a] = p
    return rows, found
