"""Adversarial attacks from Foolbox 3, behind one registry, and the files ``generate_adv`` writes.

- ``ATTACKS``: ``name -> AttackSpec`` (norm, kind, the Foolbox factory with every parameter
  explicit, default budget per dataset). ``get_attack(name, **params)`` builds one.
- ``run_attack``: attack ``(x, y)`` in batches at one budget -> ``AttackResult`` (adversarial
  images, success, norms, clean-correct flags, the full configuration).
- ``sweep_attack``: one call, several epsilons (Foolbox's ``epsilons=[...]``) -> ``SweepResult``
  with per-epsilon success and norms, for minimal-epsilon searches.

The adversarial sets of a run (``adv/generate_adv.py``) are written by ``darekit.advsets``.

Foolbox runs on the Keras backend's tensors (``darekit.backend``: ``TensorFlowModel`` or
``JAXModel`` over ``logits_function``). Foolbox 3 under NumPy 2: inputs must be backend tensors,
on TensorFlow with ``tf.int64`` labels, or eagerpy calls the removed ``np.find_common_type``
(see research/anchors.md §2.1); ``foolbox_tensors`` does both. ``predict_logits`` and
``predict_labels`` are the package's batched, compiled inference (padded to a few batch sizes
where the backend compiles per shape).

Success follows Foolbox: ``success[i]`` is "the clipped adversarial is misclassified", so an input
the model already gets wrong counts as a success. ``clean_correct`` is stored next to it and
``fooled = success & clean_correct`` is the success that the attack caused.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import eagerpy as ep
import foolbox as fb
import keras
import numpy as np
from foolbox.devutils import atleast_kd
from keras import ops
from tqdm.auto import tqdm

from darekit import backend as B
from darekit import l2
from darekit.data import dataset_spec
from darekit.errors import DareError

NORMS = ("linf", "l2")
KINDS = ("fixed", "minimization")
ENGINES = ("compiled", "foolbox")
"""How ``run_attack`` runs an attack: the spec's compiled ``runner`` (C&W, DeepFool) or
Foolbox (every attack; the reference)."""


# ---------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class AttackSpec:
    """One registered attack.

    Attributes:
        name: registry key and file-name part (``pgd``).
        norm: ``linf`` or ``l2``: the norm its budget and its minimal perturbation use.
        kind: ``fixed`` (needs an epsilon; Foolbox ``FixedEpsilonAttack``) or ``minimization``
            (finds the smallest adversarial it can; epsilon ``None`` means "no clipping").
        factory: ``factory(**params) -> foolbox attack``.
        defaults: every parameter of ``factory`` with our value (never Foolbox's silently).
        doc: one line: what the defaults mean.
        first_steps: for an attack whose inputs run independently (DeepFool freezes each
            input once it is adversarial and stops when all are), ``run_attack`` first runs
            every input with at most this many ``steps``, then reruns only the inputs still
            not fooled with the full ``steps``: the same result per input, without a few
            stubborn inputs keeping the whole batch busy.
        runner: the same algorithm in the package's own compiled code (``darekit.l2``):
            ``runner(model, x, y, batch_size=..., jit_compile=..., **params) -> x_adv``
            (NumPy, unclipped). ``run_attack`` uses it unless ``engine="foolbox"``; the
            Foolbox ``factory`` stays the reference.

    A fixed attack's default budget is the dataset's (``DatasetSpec.budget(norm)``).
    """

    name: str
    norm: str
    kind: str
    factory: Callable[..., fb.attacks.base.Attack]
    defaults: Mapping[str, Any]
    doc: str = ""
    first_steps: int | None = None
    runner: Callable[..., np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.norm not in NORMS or self.kind not in KINDS:
            raise ValueError(f"attack {self.name}: bad norm {self.norm!r} or kind {self.kind!r}")

    def params(self, **overrides: Any) -> dict[str, Any]:
        """The defaults updated with ``overrides``; an unknown parameter is a ``DareError``."""
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise DareError(f"attack {self.name!r} has no parameter(s) {unknown}; "
                            f"it takes {sorted(self.defaults)}")
        return {**self.defaults, **overrides}

    def build(self, **overrides: Any) -> fb.attacks.base.Attack:
        return self.factory(**self.params(**overrides))

    def epsilon(self, dataset: str | None, eps: float | None = None) -> float | None:
        """The budget to use: ``eps`` if given, else the dataset's default (``None`` for a
        minimization attack: its minimal perturbation, unclipped)."""
        if eps is not None:
            return check_eps(eps)
        if self.kind == "minimization":
            return None
        if dataset is None:
            raise DareError(f"attack {self.name!r} needs an epsilon or a dataset")
        return dataset_spec(dataset).budget(self.norm)


ATTACKS: dict[str, AttackSpec] = {}
DEFAULT_ATTACKS = ("fgsm", "pgd", "bim", "cw", "deepfool")
"""The five attacks of the paper's evaluation (``--attack all``)."""


def register(spec: AttackSpec) -> AttackSpec:
    if spec.name in ATTACKS:
        raise ValueError(f"attack {spec.name!r} registered twice")
    ATTACKS[spec.name] = spec
    return spec


def get_spec(name: str | AttackSpec) -> AttackSpec:
    if isinstance(name, AttackSpec):
        return name
    try:
        return ATTACKS[name]
    except KeyError:
        raise DareError(f"unknown attack {name!r}; expected one of {sorted(ATTACKS)} "
                        "or 'all'") from None


def get_attack(name: str, **params: Any) -> fb.attacks.base.Attack:
    """The Foolbox attack ``name`` with our defaults updated by ``params``."""
    return get_spec(name).build(**params)


def parse_attacks(values: Iterable[str]) -> tuple[str, ...]:
    """``["fgsm,pgd", "cw"]`` -> ``("fgsm", "pgd", "cw")``; ``all`` is ``DEFAULT_ATTACKS``.
    Unknown names raise ``DareError``; duplicates are dropped, order kept."""
    names: list[str] = []
    for value in values:
        for name in (t.strip() for t in value.split(",")):
            if not name:
                continue
            names.extend(DEFAULT_ATTACKS if name == "all" else [get_spec(name).name])
    if not names:
        raise DareError("no attack given; pass --attack NAME (or all)")
    return tuple(dict.fromkeys(names))


def check_eps(eps: float) -> float:
    if not (math.isfinite(eps) and eps > 0):
        raise DareError(f"--eps must be a positive number; received {eps}")
    return float(eps)


class _CarliniWagnerL2(fb.attacks.L2CarliniWagnerAttack):
    """Foolbox's C&W L2, except that an input with no adversarial found comes back unchanged.

    Foolbox initialises its best adversarials with zeros and returns a black image where the
    search failed; that image is often misclassified and would count as a "success" with a huge
    norm. No real C&W output is exactly zero everywhere (its tanh map never reaches the bound).
    """

    def run(self, model, inputs, criterion, *, early_stop=None, **kwargs):
        advs = super().run(model, inputs, criterion, early_stop=early_stop, **kwargs)
        x, restore = ep.astensor_(inputs)
        a = ep.astensor(advs)
        failed = ep.logical_and(a.abs().reshape((len(a), -1)).max(axis=-1) == 0,
                                x.abs().reshape((len(x), -1)).max(axis=-1) > 0)
        return restore(ep.where(atleast_kd(failed, a.ndim), x, a))


# Parameters: every one explicit. Step sizes of L-inf attacks are relative to epsilon.
register(AttackSpec(
    "fgsm", "linf", "fixed", fb.attacks.LinfFastGradientAttack,
    {"random_start": False},
    "FGSM: one signed-gradient step of size eps (Goodfellow et al. 2015)"))
register(AttackSpec(
    "pgd", "linf", "fixed", fb.attacks.LinfProjectedGradientDescentAttack,
    {"steps": 20, "rel_stepsize": 2.5 / 20, "abs_stepsize": None, "random_start": True},
    "PGD-20 (Madry et al. 2018): 20 steps of eps/8 (Madry's 2.5*eps/steps), uniform random "
    "start"))
register(AttackSpec(
    "bim", "linf", "fixed", fb.attacks.LinfBasicIterativeAttack,
    {"steps": 10, "rel_stepsize": 0.2, "abs_stepsize": None, "random_start": False},
    "BIM / I-FGSM (Kurakin et al. 2017): 10 steps of eps/5 from the clean image"))
register(AttackSpec(
    "cw", "l2", "minimization", _CarliniWagnerL2,
    {"binary_search_steps": 2, "steps": 150, "stepsize": 0.05, "confidence": 0.0,
     "initial_const": 1.0, "abort_early": True},
    "C&W L2: 2 binary-search steps over c from 1 x 150 Adam steps of 0.05 = 300 gradient "
    "steps per input (Foolbox's default is 90,000); on the quick AlexNet its mean minimal L2 "
    "was 3% above a 9 x 300-step run's, and it fooled every correctly classified image",
    runner=l2.carlini_wagner_l2))
register(AttackSpec(
    "deepfool", "l2", "minimization", fb.attacks.L2DeepFoolAttack,
    {"steps": 50, "candidates": 10, "overshoot": 0.02, "loss": "logits"},
    "DeepFool L2 (Moosavi-Dezfooli et al. 2016): at most 50 steps over the 10 top classes, "
    "overshoot 0.02", first_steps=10, runner=l2.deepfool_l2))
register(AttackSpec(
    "l2pgd", "l2", "fixed", fb.attacks.L2ProjectedGradientDescentAttack,
    {"steps": 20, "rel_stepsize": 2.5 / 20, "abs_stepsize": None, "random_start": True},
    "L2 PGD-20: 20 steps of eps/8, random start in the L2 ball (not in the default five)"))


class _LinfMarginPGD(fb.attacks.LinfProjectedGradientDescentAttack):
    """Foolbox's L-inf PGD ascending the Carlini-Wagner margin ``max_{j != y} z_j - z_y``
    instead of the cross-entropy. On a linear model the cross-entropy's ascent raises every
    wrong class at once and stops short of the L-inf optimum; the margin pushes the best wrong
    class past the true one, which is what flips the label. ``linf_loss`` names the same loss
    in ``darekit.linf.LOSSES``, so the compiled engine runs this attack too."""

    linf_loss = "margin"

    def get_loss_fn(self, model, labels):
        def loss_fn(inputs):
            logits = model(inputs)
            onehot = ep.onehot_like(logits, labels)
            true = (logits * onehot).sum(axis=-1)
            other = ep.where(onehot > 0, -np.inf, logits).max(axis=-1)
            return (other - true).sum()

        return loss_fn


register(AttackSpec(
    "pgd-margin", "linf", "fixed", _LinfMarginPGD, dict(ATTACKS["pgd"].defaults),
    "PGD-20 as pgd (20 steps of eps/8, uniform random start) on the Carlini-Wagner margin "
    "instead of the cross-entropy: for the worst case (not in the default five)"))


# ---------------------------------------------------------------------------- running attacks
def foolbox_tensors(x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
    """``x`` (float32) and ``y`` as the tensors Foolbox wants on this backend
    (``darekit.backend.foolbox_tensors``: int64 labels on TensorFlow, where eagerpy would
    otherwise call NumPy 2's removed ``np.find_common_type``)."""
    return B.foolbox_tensors(x, y)


_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def logits_function(model: keras.Model, jit_compile: bool = False) -> Callable[[Any], Any]:
    """``f(x) -> logits``: ``model`` in inference mode as a compiled function of its current
    weights (``B.model_function``), one per model and mode. Gradients flow through it (Foolbox
    differentiates it), and loading other weights into the model needs no recompile.
    ``jit_compile``: XLA on TensorFlow, about 2x faster on a CPU (float results may differ in
    the last bits; compiled once per batch shape); JAX always compiles."""
    calls = _CALLS.setdefault(model, {})
    if jit_compile not in calls:
        calls[jit_compile] = B.model_function(model, lambda call, x: call(x),
                                              jit_compile=jit_compile)
    return calls[jit_compile]


def predict_logits(model: keras.Model, x: np.ndarray, batch_size: int = 256,
                   jit_compile: bool = False) -> np.ndarray:
    """The logits ``(N, C)`` float32 of ``model`` on ``x`` ``(N, ...)``, batched through one
    compiled call (``logits_function``; ``model.predict`` would retrace). Batches are padded to
    ``B.BUCKETS`` where the backend compiles per shape (JAX, or XLA), so any ``N`` reuses a few
    compilations."""
    x = np.asarray(x, np.float32)
    if batch_size < 1:
        raise DareError(f"batch_size must be positive; received {batch_size}")
    call = logits_function(model, jit_compile)
    pad = B.needs_buckets(jit_compile)
    parts = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        m = B.bucket(len(xb), batch_size) if pad else len(xb)
        parts.append(B.to_numpy(call(ops.convert_to_tensor(B.pad_rows(xb, m))))[:len(xb)])
    if not parts:
        return np.zeros((0, int(model.output_shape[-1])), np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def predict_labels(model: keras.Model, x: np.ndarray, batch_size: int = 256,
                   jit_compile: bool = False) -> np.ndarray:
    """Predicted classes ``(N,)`` int64 of ``model`` on ``x`` (``predict_logits``' argmax)."""
    return np.argmax(predict_logits(model, x, batch_size, jit_compile), axis=-1).astype(np.int64)


def foolbox_model(model: keras.Model, jit_compile: bool = False):
    """``model`` (logits, [0, 1] pixels) as a Foolbox model of the backend, called in inference
    mode through ``logits_function`` (``TensorFlowModel`` or ``JAXModel``)."""
    return B.foolbox_model(logits_function(model, jit_compile), bounds=(0, 1))


def _norms(x: np.ndarray, x_adv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image L-inf and L2 norms of ``x_adv - x`` (computed in float64): ``(N,)`` each."""
    d = (x_adv.astype(np.float64) - x).reshape(len(x), -1)
    return (np.abs(d).max(axis=1, initial=0.0).astype(np.float32),
            np.sqrt((d * d).sum(axis=1)).astype(np.float32))


def attack_engine(spec: AttackSpec | str, engine: str | None = None) -> str:
    """The engine that runs ``spec``: ``engine`` if given (``"compiled"`` needs a spec with a
    ``runner``), else ``"compiled"`` where the spec has one and ``"foolbox"`` otherwise."""
    spec = get_spec(spec)
    if engine is None:
        return "compiled" if spec.runner is not None else "foolbox"
    if engine not in ENGINES:
        raise DareError(f"engine must be one of {list(ENGINES)}; received {engine!r}")
    if engine == "compiled" and spec.runner is None:
        raise DareError(f"attack {spec.name!r} has no compiled engine; use engine='foolbox'")
    return engine


def attack_config(spec: AttackSpec | str, eps: float | Sequence[float] | None,
                  params: Mapping[str, Any] | None = None,
                  engine: str | None = None) -> dict[str, Any]:
    """Everything that defines an attack run, JSON-ready (includes Foolbox's ``repr``, the
    algorithm's reference, and the engine that ran it: ``attack_engine``)."""
    spec = get_spec(spec)
    full = spec.params(**dict(params or {}))
    return {"attack": spec.name, "norm": spec.norm, "kind": spec.kind,
            "eps": list(eps) if isinstance(eps, Sequence) else eps,
            "params": full, "foolbox": repr(spec.factory(**full)), "doc": spec.doc,
            "foolbox_version": fb.__version__, "engine": attack_engine(spec, engine)}


@dataclass(frozen=True, eq=False)
class AttackResult:
    """One attack at one budget on ``N`` images.

    ``x_adv`` ``(N, H, W, C)`` float32, clipped to the budget and to [0, 1]; ``success``,
    ``clean_correct`` ``(N,)`` bool (``success``: Foolbox's, i.e. misclassified after the
    attack); ``linf``, ``l2`` ``(N,)`` float32 norms of ``x_adv - x``; ``config`` as
    ``attack_config``.
    """

    x_adv: np.ndarray
    success: np.ndarray
    clean_correct: np.ndarray
    linf: np.ndarray
    l2: np.ndarray
    config: dict[str, Any]

    @property
    def fooled(self) -> np.ndarray:
        """``(N,)``: correctly classified, then misclassified after the attack."""
        return self.success & self.clean_correct

    @property
    def robust_accuracy(self) -> float:
        """Fraction of all N still classified correctly (RobustBench convention)."""
        return float(np.mean(~self.success))

    @property
    def success_rate(self) -> float:
        """Fraction of the correctly classified inputs that the attack fools (ASR_cc)."""
        n = int(self.clean_correct.sum())
        return float(self.fooled.sum() / n) if n else float("nan")

    def summary(self) -> dict[str, float]:
        f = self.fooled
        return {"n": len(self.success), "clean_accuracy": float(self.clean_correct.mean()),
                "robust_accuracy": self.robust_accuracy, "success_rate": self.success_rate,
                "mean_linf_fooled": float(self.linf[f].mean()) if f.any() else float("nan"),
                "mean_l2_fooled": float(self.l2[f].mean()) if f.any() else float("nan")}


@dataclass(frozen=True, eq=False)
class SweepResult:
    """One attack at ``K`` budgets on ``N`` images (no images kept).

    ``epsilons`` ``(K,)``; ``success``, ``linf``, ``l2`` ``(K, N)``; ``clean_correct`` ``(N,)``.
    """

    epsilons: np.ndarray
    success: np.ndarray
    clean_correct: np.ndarray
    linf: np.ndarray
    l2: np.ndarray
    config: dict[str, Any]

    def minimal(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per input, the smallest epsilon of the grid that fools it and the L-inf and L2 norms
        of that adversarial: three ``(N,)`` float arrays, NaN where no epsilon fools it (and
        for inputs that are misclassified to begin with)."""
        fooled = self.success & self.clean_correct[None, :]
        first = np.argmax(fooled, axis=0)
        any_ = fooled.any(axis=0)
        cols = np.arange(fooled.shape[1])
        pick = lambda a: np.where(any_, a[first, cols], np.nan)
        return pick(self.epsilons[:, None].repeat(len(cols), 1)), pick(self.linf), pick(self.l2)


def _clip_l2(x: np.ndarray, xp: np.ndarray, eps: float | None) -> np.ndarray:
    """Foolbox's ``LpDistance(2).clip_perturbation``: ``xp - x`` scaled down to L2 norm
    ``eps`` where longer (``None``: unchanged), in float32."""
    if eps is None:
        return xp
    p = xp - x
    norms = np.sqrt(np.square(p.reshape(len(p), -1)).sum(axis=-1))
    factor = np.minimum(np.float32(1), np.float32(eps) / np.maximum(norms, np.float32(1e-12)))
    return x + factor.reshape((-1,) + (1,) * (x.ndim - 1)).astype(np.float32) * p


def _runner_batches(model: keras.Model, x: np.ndarray, y: np.ndarray, spec: AttackSpec,
                    epsilons: list[float | None], params: Mapping[str, Any], batch_size: int,
                    progress: bool, keep_images: bool, jit_compile: bool):
    """``_attack_batches`` through ``spec.runner``: the same per-batch tuples, success as
    Foolbox's (the model's label on the clipped adversarial differs from ``y``)."""
    if spec.norm != "l2":
        raise DareError(f"attack {spec.name!r}: a compiled runner clips in L2 only")
    full = spec.params(**params)
    bar = tqdm(total=len(x), desc=spec.name, unit="img", disable=not progress, leave=False)
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = np.asarray(x[i:i + batch_size], np.float32), y[i:i + batch_size]
            raw = spec.runner(model, xb, yb, batch_size=batch_size, jit_compile=jit_compile,
                              **full)
            clipped = [_clip_l2(xb, raw, e) for e in epsilons]
            success = np.stack([predict_labels(model, c, batch_size, jit_compile) != yb
                                for c in clipped])
            advs = np.stack([np.clip(c, 0.0, 1.0) for c in clipped])
            norms = [_norms(xb, a) for a in advs]
            yield (advs if keep_images else None, success,
                   np.stack([n[0] for n in norms]), np.stack([n[1] for n in norms]))
            bar.update(len(xb))
    finally:
        bar.close()


def _attack_batches(model: keras.Model, x: np.ndarray, y: np.ndarray, spec: AttackSpec,
                    epsilons: list[float | None], params: Mapping[str, Any], batch_size: int,
                    progress: bool, keep_images: bool, jit_compile: bool = False,
                    engine: str | None = None):
    """Yield, per batch, ``(clipped advs (K, B, ...) or None, success (K, B), norms...)``."""
    if len(x) != len(y) or len(x) == 0:
        raise DareError(f"cannot attack {len(x)} images with {len(y)} labels")
    if attack_engine(spec, engine) == "compiled":
        yield from _runner_batches(model, x, y, spec, epsilons, params, batch_size, progress,
                                   keep_images, jit_compile)
        return
    attack = spec.build(**params)
    fmodel = foolbox_model(model, jit_compile)
    # On JAX every new batch shape compiles the model (and Foolbox's steps) again: the batches
    # are padded to a few sizes with copies of their first row, whose results are dropped.
    # FGSM, BIM and DeepFool treat inputs independently, so padding changes no input's result;
    # PGD's random starts are drawn for the padded batch, and C&W's early abort watches the
    # batch's summed loss, so there a result depends on the padding as it already depends on
    # the batch size. TensorFlow's batches are left as they were (its results unchanged).
    pad = B.name() == "jax"
    bar = tqdm(total=len(x), desc=spec.name, unit="img", disable=not progress, leave=False)
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            n = len(xb)
            m = B.bucket(n, batch_size) if pad else n
            _, clipped, success = attack(fmodel, *foolbox_tensors(B.pad_rows(xb, m),
                                                                  B.pad_rows(yb, m)),
                                         epsilons=epsilons)
            advs = np.stack([np.clip(np.asarray(c)[:n], 0.0, 1.0) for c in clipped])
            norms = [_norms(xb, a) for a in advs]
            yield (advs if keep_images else None, np.asarray(success)[:, :n].astype(bool),
                   np.stack([n[0] for n in norms]), np.stack([n[1] for n in norms]))
            bar.update(len(xb))
    finally:
        bar.close()


def run_attack(model: keras.Model, x: np.ndarray, y: np.ndarray, attack: str | AttackSpec, *,
               eps: float | None = None, dataset: str | None = None,
               params: Mapping[str, Any] | None = None, batch_size: int = 256,
               seed: int | None = None, progress: bool = True,
               jit_compile: bool = False, engine: str | None = None) -> AttackResult:
    """Attack ``x`` ``(N, H, W, C)`` in [0, 1] with labels ``y`` ``(N,)`` at one budget.

    ``eps``: the budget; ``None`` takes the dataset's budget for a fixed attack and
    means "minimal, unclipped" for a minimization attack. ``params`` override the registered
    parameters. ``seed`` seeds the RNG of Foolbox's random starts first (TensorFlow's global
    RNG, or eagerpy's JAX key), so the same call gives the same result. ``model`` outputs
    logits. ``jit_compile``: run the model with XLA (JAX always does). ``engine``:
    ``"compiled"`` (the default where the attack has one: C&W and DeepFool, ``darekit.l2``)
    or ``"foolbox"`` (the reference; the only engine of the other attacks).
    """
    spec = get_spec(attack)
    eps = spec.epsilon(dataset, eps)
    params = dict(params or {})
    config = attack_config(spec, eps, params, engine)
    engine = config["engine"]
    if seed is not None:
        B.seed_foolbox(seed)
    full = spec.params(**params)
    staged = spec.first_steps is not None and full["steps"] > spec.first_steps
    first = {**params, "steps": spec.first_steps} if staged else params
    parts = list(_attack_batches(model, x, y, spec, [eps], first, batch_size, progress, True,
                                 jit_compile, engine))
    out = [np.concatenate([p[k][0] for p in parts]) for k in range(4)]
    if staged and not out[1].all():
        rest = np.flatnonzero(~out[1])
        more = list(_attack_batches(model, x[rest], y[rest], spec, [eps], params, batch_size,
                                    progress, True, jit_compile, engine))
        for k in range(4):
            out[k][rest] = np.concatenate([p[k][0] for p in more])
    return AttackResult(x_adv=out[0].astype(np.float32), success=out[1],
                        clean_correct=predict_labels(model, x, batch_size) == y,
                        linf=out[2], l2=out[3], config=config)


def sweep_attack(model: keras.Model, x: np.ndarray, y: np.ndarray, attack: str | AttackSpec,
                 epsilons: Sequence[float], *, params: Mapping[str, Any] | None = None,
                 batch_size: int = 256, seed: int | None = None,
                 progress: bool = True, engine: str | None = None) -> SweepResult:
    """Attack ``(x, y)`` at every epsilon of ``epsilons`` in one Foolbox call per batch.

    A fixed attack runs once per epsilon; a minimization attack runs once and its result is
    clipped to each epsilon. Returns per-epsilon success and norms; see ``SweepResult.minimal``.
    ``engine`` as in ``run_attack``.
    """
    spec = get_spec(attack)
    eps = [check_eps(e) for e in epsilons]
    if not eps:
        raise DareError("sweep_attack needs at least one epsilon")
    params = dict(params or {})
    config = attack_config(spec, eps, params, engine)
    if seed is not None:
        B.seed_foolbox(seed)
    parts = list(_attack_batches(model, x, y, spec, eps, params, batch_size, progress, False,
                                 engine=config["engine"]))
    cat = lambda k: np.concatenate([p[k] for p in parts], axis=1)
    return SweepResult(epsilons=np.asarray(eps), success=cat(1), clean_correct=predict_labels(
        model, x, batch_size) == y, linf=cat(2), l2=cat(3), config=config)
