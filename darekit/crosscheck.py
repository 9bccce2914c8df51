"""An independent cross-check of L-inf robust accuracy, against gradient masking.

DARE fine-tunes on a regression loss; a model trained that way could look robust to the
package's own PGD (``darekit.adv_training.linf_pgd``) only because its gradients have become
useless. ``cross_check`` attacks a model with attacks from a different code base, the
Adversarial Robustness Toolbox (ART), in the spirit of AutoAttack:

- ``apgd_ce``: untargeted APGD on the cross-entropy (ART ``AutoProjectedGradientDescent``);
- ``apgd_t``: targeted APGD on AutoAttack's targeted DLR loss, once per target among the
  ``dlr_targets`` highest non-true classes by the clean logits; an input is broken if any
  target breaks it (AutoAttack's APGD-T);
- ``square``: the gradient-free Square attack (ART ``SquareAttack``, L-inf, margin loss);
- ``transfer``: adversarials crafted on a source model (``transfer_set``: APGD-CE on it),
  replayed on the model;
- ``own_pgd``: not run here: the package's PGD per-example flags, when the caller passes them
  (``pgd_robust`` computes them as ``robust_evaluation`` does).

White-box attacks (``apgd_ce``, ``apgd_t``, ``own_pgd``) use gradients; black-box ones
(``square``, ``transfer``) do not. A black-box attack that leaves fewer inputs robust than the
worst case of the white-box ones is the classic symptom of gradient masking (Athalye et al.
2018, Carlini et al. 2019): see ``gradient_masking`` for the rule.

"Robust" means: classified correctly clean and after the attack, adversarials being projected
on the eps-ball of the clean input and on [0, 1] (RobustBench's convention: an input
misclassified clean is not robust).

ART under Keras 3.15 on TensorFlow 2.21 or JAX / NumPy 2.4 (ART 1.20.1), and what this module
does about it:

- ``KerasClassifier`` does not work under Keras 3, and ART has no usable JAX classifier (its
  experimental ``JaxClassifier`` lacks ``compute_loss``). The model is wrapped in our own small
  ART estimator, ``SeamClassifier`` (NumPy in and out), over functions compiled by the backend
  seam (``darekit.backend``): one code path on TensorFlow and JAX.
- ART's own APGD losses (``loss_type="cross_entropy"``/``"difference_logits_ratio"``) are
  avoided: the cross-entropy one silently switches to ``from_logits=False`` when the model's
  output on an all-ones image happens to look like probabilities, and ART's DLR loss runs a
  Python loop over the batch in eager mode. We pass our own per-example losses
  (``loss_type=None``) and compile the loss and its input gradient, which also makes an APGD
  iteration about 3x faster than with ART's eager ``loss_gradient``.
- ART checks ``isinstance(eps, (int, float))`` and ``isinstance(max_iter, int)``: a NumPy
  ``float32`` or ``int64`` is refused, so the config stores plain Python numbers.
- ART's float32 arithmetic can leave ``|x_adv - x|`` one ulp above eps (0.100000024 at 0.1):
  every adversarial is projected again before it is judged.
- Kept as ART does it (weaker than AutoAttack at worst): APGD judges only its last iterate
  (AutoAttack keeps any misclassified iterate), and targeted APGD keeps an adversarial only
  where the model predicts the target (the other targets get their own run).
- ART draws from NumPy's and Python's global RNGs: each attack runs under a seed derived from
  ``cfg.seed``, and both global states are restored afterwards (the caller's RNG streams are
  unchanged by a cross-check).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import ops
from tqdm.auto import tqdm

from darekit import backend as B
from darekit.attacks import predict_logits
from darekit.config import option
from darekit.errors import DareError
from darekit.seeding import derive_words

if TYPE_CHECKING:
    from darekit.adv_training import PGDConfig

ATTACKS = ("apgd_ce", "apgd_t", "square")
"""The attacks ``cross_check`` runs itself (``CrossCheckConfig.attacks`` picks among them)."""
WHITE_BOX = ("apgd_ce", "apgd_t", "own_pgd")
BLACK_BOX = ("square", "transfer")


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class CrossCheckConfig:
    """Everything that defines a cross-check (L-inf budget ``eps`` on [0, 1] inputs).

    ``apgd_iter`` iterations and ``apgd_restarts`` random starts per APGD run (AutoAttack:
    100 and 1); ``dlr_targets`` target classes for APGD-T (AutoAttack: 9); ``square_queries``
    Square iterations (one query per image each; AutoAttack: 5000) from ``square_p_init``;
    ``batch_size`` images per ART call; ``seed`` seeds every random choice;
    ``masking_tolerance`` images a black-box attack may beat the white-box worst case by
    before the masking flag is raised; ``attacks`` which of ``ATTACKS`` to run.
    """

    eps: float = option(cli=False)
    apgd_iter: int = option(100, "cross-check: APGD iterations (AutoAttack: 100)")
    apgd_restarts: int = option(1, "cross-check: APGD random starts")
    dlr_targets: int = option(3, "cross-check: target classes of targeted APGD-DLR "
                              "(AutoAttack: 9)")
    square_queries: int = option(1000, "cross-check: Square attack queries per image "
                                 "(AutoAttack: 5000)")
    square_p_init: float = option(0.8, "cross-check: Square's initial patch fraction")
    batch_size: int = option(128, cli=False)
    seed: int = option(0, cli=False)
    masking_tolerance: int = option(0, "cross-check: images a black-box attack may beat the "
                                    "white-box worst case by before masking is flagged")
    attacks: tuple[str, ...] = option(ATTACKS, "cross-check attacks, comma-separated",
                                      flag="--crosscheck-attacks", choices=None)

    def __post_init__(self) -> None:
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float, np.number)) \
                or not (math.isfinite(self.eps) and 0 < self.eps <= 1):
            raise DareError(f"cross-check eps must be a number in (0, 1]; received {self.eps!r}")
        # Plain Python numbers: ART refuses NumPy scalars (isinstance checks).
        object.__setattr__(self, "eps", float(self.eps))
        for name, low in (("apgd_iter", 1), ("apgd_restarts", 1), ("dlr_targets", 1),
                          ("square_queries", 1), ("batch_size", 1), ("seed", 0),
                          ("masking_tolerance", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or value < low:
                raise DareError(f"cross-check {name} must be an integer >= {low}; "
                                f"received {value!r}")
            object.__setattr__(self, name, int(value))
        if not (isinstance(self.square_p_init, (int, float)) and 0 < self.square_p_init < 1):
            raise DareError("cross-check square_p_init must be in (0, 1); "
                            f"received {self.square_p_init!r}")
        object.__setattr__(self, "square_p_init", float(self.square_p_init))
        attacks = (self.attacks,) if isinstance(self.attacks, str) else tuple(self.attacks)
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown or not attacks or len(set(attacks)) != len(attacks):
            raise DareError(f"cross-check attacks must be distinct names among {list(ATTACKS)}; "
                            f"received {list(attacks)}")
        object.__setattr__(self, "attacks", attacks)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "attacks": list(self.attacks)}


# ---------------------------------------------------------------------------- ART plumbing
def _ce(labels: Any, logits: Any) -> Any:
    """Per-example cross-entropy ``(B,)`` of one-hot ``labels`` ``(B, C)`` and ``logits``."""
    return ops.categorical_crossentropy(labels, logits, from_logits=True)


def _dlr_targeted(labels: Any, logits: Any) -> Any:
    """AutoAttack's targeted DLR, as a loss to *minimise* (ART descends in targeted mode):
    ``(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` per example ``(B,)``.

    ``labels`` ``(B, C)`` carry the target with +1 (so ART's ``argmax`` sees the target) and
    the true class with -1 (ART passes only one label array to the loss).
    """
    t = ops.expand_dims(ops.argmax(labels, axis=1), 1)
    y = ops.expand_dims(ops.argmin(labels, axis=1), 1)
    z = ops.flip(ops.sort(logits, axis=1), axis=1)          # descending
    z_t = ops.take_along_axis(logits, t, axis=1)[:, 0]
    z_y = ops.take_along_axis(logits, y, axis=1)[:, 0]
    return (z_y - z_t) / (z[:, 0] - 0.5 * (z[:, 2] + z[:, 3]) + 1e-12)


LOSSES = {"ce": _ce, "dlr": _dlr_targeted}
"""The per-example losses ``loss(labels (B, C), logits) -> (B,)`` the ART estimator runs."""

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _loss_functions(model: keras.Model, loss: str) -> tuple[Callable, Callable]:
    """``(losses(x, labels) -> (B,), gradient(x, labels) -> (B, ...))`` of ``LOSSES[loss]``,
    compiled over the model's current weights (``B.model_function``), once per model object:
    the models of one evaluation share one object, so they share the compilations."""
    by_loss = _COMPILED.setdefault(model, {})
    if loss not in by_loss:
        fn = LOSSES[loss]

        def losses(call, x, labels):
            return fn(labels, call(x))

        def gradient(call, x, labels):
            # A sum: each example's gradient does not depend on the batch (ART's mean scales it
            # by 1/B, which L-inf's sign() ignores anyway).
            return B.grad(lambda z: ops.sum(fn(labels, call(z))))(x)

        # Not XLA on TensorFlow (as the ART classifier before it); JAX always compiles.
        by_loss[loss] = (B.model_function(model, losses, jit_compile=False),
                         B.model_function(model, gradient, jit_compile=False))
    return by_loss[loss]


@functools.cache
def _art() -> SimpleNamespace:
    """ART's attacks and ``SeamClassifier``, an ART estimator over the backend seam (imported
    on first use: ART takes a while to import and warns about PyTorch)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PyTorch not found")
        import art
        from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack
        from art.estimators.classification.classifier import ClassifierMixin
        from art.estimators.estimator import (
            BaseEstimator,
            LossGradientsMixin,
            NeuralNetworkMixin,
        )
        from art.utils import check_and_transform_label_format

    class SeamClassifier(LossGradientsMixin, ClassifierMixin, NeuralNetworkMixin, BaseEstimator):
        """A Keras classifier (logits) as an ART estimator on either Keras backend: NumPy in and
        out, ``predict`` through ``attacks.predict_logits``, and a per-example ``loss(labels,
        logits)`` ``(B,)`` whose value and input gradient run as compiled functions of the
        model's current weights (``_loss_functions``). What APGD (``loss_type=None``) and
        Square need: ``predict``, ``loss_gradient``, ``compute_loss(reduction="none")``. ART
        1.20 has no usable JAX classifier, and its ``TensorFlowV2Classifier`` runs eagerly.
        No preprocessing or defences: inputs are [0, 1] images as the model takes them.
        """

        estimator_params = (BaseEstimator.estimator_params + NeuralNetworkMixin.estimator_params
                            + ClassifierMixin.estimator_params + ["input_shape", "loss"])

        def __init__(self, model: keras.Model, loss: str, input_shape: tuple[int, ...],
                     nb_classes: int, batch_size: int = 128):
            super().__init__(model=model, clip_values=(0.0, 1.0), channels_first=False,
                             preprocessing_defences=None, postprocessing_defences=None,
                             preprocessing=(0.0, 1.0))
            self._nb_classes = int(nb_classes)
            self._input_shape = tuple(input_shape)
            self.loss, self._batch_size = loss, int(batch_size)
            self._losses, self._gradient = _loss_functions(model, loss)

        @property
        def input_shape(self) -> tuple[int, ...]:
            return self._input_shape

        def _run(self, fn: Callable, x: np.ndarray, y: np.ndarray) -> np.ndarray:
            """``fn(x, labels)`` in batches, padded to ``B.BUCKETS`` where the backend
            compiles per shape (JAX); rows are independent, so padding changes nothing."""
            x = np.asarray(x, np.float32)
            labels = check_and_transform_label_format(np.asarray(y), self.nb_classes)
            labels = np.asarray(labels, np.float32)
            pad = B.needs_buckets(False)
            parts = []
            for i in range(0, len(x), self._batch_size):
                xb, lb = x[i:i + self._batch_size], labels[i:i + self._batch_size]
                m = B.bucket(len(xb), self._batch_size) if pad else len(xb)
                out = fn(ops.convert_to_tensor(B.pad_rows(xb, m)),
                         ops.convert_to_tensor(B.pad_rows(lb, m)))
                parts.append(B.to_numpy(out)[:len(xb)])
            return np.concatenate(parts)

        def predict(self, x: np.ndarray, batch_size: int = 128, **kwargs) -> np.ndarray:
            return predict_logits(self._model, x, batch_size)

        def loss_gradient(self, x: np.ndarray, y: np.ndarray, training_mode: bool = False,
                          **kwargs) -> np.ndarray:
            return self._run(self._gradient, x, y)

        def compute_loss(self, x: np.ndarray, y: np.ndarray, reduction: str = "none",
                         training_mode: bool = False, **kwargs) -> np.ndarray:
            per = self._run(self._losses, x, y)
            return {"none": per, "mean": per.mean(), "sum": per.sum()}[reduction]

        def fit(self, x, y, batch_size: int = 128, nb_epochs: int = 20, **kwargs) -> None:
            raise NotImplementedError("the cross-check only attacks; it never trains")

        def get_activations(self, x, layer, batch_size: int = 128, framework: bool = False):
            raise NotImplementedError("the cross-check needs no activations")

    return SimpleNamespace(version=art.__version__, APGD=AutoProjectedGradientDescent,
                           Square=SquareAttack, Classifier=SeamClassifier)


@contextmanager
def _seeded(seed: int, *keys: int) -> Iterator[None]:
    """Seed NumPy's and Python's global RNGs (ART draws from both) from ``(seed, *keys)``;
    restore the caller's states on exit."""
    state = np.random.get_state(), random.getstate()
    words = derive_words(seed, *keys, n=4)
    np.random.seed(words)
    random.seed(int(words[0]) << 32 | int(words[1]))
    try:
        yield
    finally:
        np.random.set_state(state[0])
        random.setstate(state[1])


def _key(name: str) -> int:
    return zlib.crc32(name.encode())


def _project(x_adv: np.ndarray, x: np.ndarray, eps: float) -> np.ndarray:
    """``x_adv`` projected on the L-inf eps-ball around ``x`` and on [0, 1] (float32)."""
    x = x.astype(np.float32)
    return np.clip(np.clip(x_adv.astype(np.float32), x - eps, x + eps), 0.0, 1.0)


def _logits(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The model's logits ``(N, C)`` in inference mode, batched, through one compiled call."""
    return predict_logits(model, x, batch_size)


def _one_hot(labels: np.ndarray, nb_classes: int) -> np.ndarray:
    return np.eye(nb_classes, dtype=np.float32)[labels]


def _apgd(clf, x: np.ndarray, labels: np.ndarray, cfg: CrossCheckConfig, *, targeted: bool,
          keys: tuple[int, ...]) -> np.ndarray:
    """ART's APGD on ``x`` ``(B, H, W, C)`` through ``clf`` (``_classifiers``); ``labels``
    ``(B, C)``: one-hot true classes (untargeted, ``clf`` on the cross-entropy) or
    ``+target - true`` (targeted, ``clf`` on the DLR). Returns projected adversarials."""
    attack = _art().APGD(clf, norm=np.inf, eps=cfg.eps, eps_step=2 * cfg.eps,
                         max_iter=cfg.apgd_iter, targeted=targeted,
                         nb_random_init=cfg.apgd_restarts, batch_size=len(x), loss_type=None,
                         verbose=False)
    with _seeded(cfg.seed, *keys):
        return _project(attack.generate(x, labels), x, cfg.eps)


def _square(clf, x: np.ndarray, y: np.ndarray, cfg: CrossCheckConfig, *,
            keys: tuple[int, ...]) -> np.ndarray:
    """ART's L-inf Square attack (margin loss on the logits) on ``x`` ``(B, H, W, C)``."""
    attack = _art().Square(clf, norm=np.inf, eps=cfg.eps, max_iter=cfg.square_queries,
                           p_init=cfg.square_p_init, nb_restarts=1, batch_size=len(x),
                           verbose=False)
    with _seeded(cfg.seed, *keys):
        return _project(attack.generate(x, _one_hot(y, clf.nb_classes)), x, cfg.eps)


def _classifiers(model: keras.Model, input_shape: tuple[int, ...], nb_classes: int,
                 batch_size: int):
    """``(ce, dlr)``: the model as ART classifiers on each loss (their compiled functions are
    shared by every call on the same model object)."""
    make = _art().Classifier
    return (make(model, "ce", input_shape, nb_classes, batch_size),
            make(model, "dlr", input_shape, nb_classes, batch_size))


def _batches(clean_correct: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices of the correctly classified inputs, in batches (only those are attacked)."""
    idx = np.flatnonzero(clean_correct)
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]


def _check_inputs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 4 or y.shape != (len(x),) or len(x) == 0:
        raise DareError(f"cross-check needs images (N, H, W, C) and labels (N,) with N > 0; "
                        f"received {x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DareError(f"cross-check labels must be integers; received {y.dtype}")
    if x.min() < 0 or x.max() > 1:
        raise DareError(f"cross-check inputs must lie in [0, 1]; received [{x.min()}, {x.max()}]")
    return x.astype(np.float32), y.astype(np.int64)


# ---------------------------------------------------------------------------- public API
def transfer_set(source: keras.Model, x: np.ndarray, y: np.ndarray,
                 cfg: CrossCheckConfig) -> np.ndarray:
    """Adversarials ``(N, H, W, C)`` float32 of ``x`` crafted on ``source`` (APGD-CE with
    ``cfg``'s iterations, restarts and seed), for ``cross_check(..., transfer=...)``.

    Craft once, replay on every model. Inputs ``source`` misclassifies are not attacked and
    come back clean. The batches and seeds are those of ``cross_check``'s ``apgd_ce``: replayed
    on ``source`` itself, the transfer attack *is* its APGD-CE (same adversarials), so a model
    is never flagged against its own transfer set by the luck of different random starts.
    """
    x, y = _check_inputs(x, y)
    nb_classes = int(source.output_shape[-1])
    ce = _art().Classifier(source, "ce", x.shape[1:], nb_classes, cfg.batch_size)
    correct = _logits(source, x, cfg.batch_size).argmax(axis=1) == y
    out = x.copy()
    for b, rows in enumerate(_batches(correct, cfg.batch_size)):
        out[rows] = _apgd(ce, x[rows], _one_hot(y[rows], nb_classes), cfg, targeted=False,
                          keys=(_key("apgd_ce"), b))
    return out


def pgd_robust(model: keras.Model, x: np.ndarray, y: np.ndarray, pgd: PGDConfig, *,
               batch_size: int = 256, seed: int = 0) -> np.ndarray:
    """Per-example flags ``(N,)`` of the package's own PGD (``adv_training.robust_function``:
    ``darekit.linf`` from a random start drawn from ``(seed, batch index)``): the adversarial
    is still classified as ``y``. Same function, batches, padding and random starts as
    ``adv_training.robust_evaluation`` (its ``robust_accuracy`` is the mean of these flags),
    for ``cross_check(own_robust=...)``."""
    from darekit.adv_training import robust_function

    attack = robust_function(model, pgd)
    x = np.asarray(x, np.float32)
    y = np.asarray(y).astype(np.int32 if B.name() == "jax" else np.int64)
    pad = B.needs_buckets(B.xla_allowed(True))   # as robust_evaluation pads
    flags = []
    for b, i in enumerate(range(0, len(x), batch_size)):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        n = len(xb)
        m = B.bucket(n, batch_size) if pad else n
        _, adv, _ = attack(B.pad_rows(xb, m), B.pad_rows(yb, m), B.seed_array(seed, b))
        flags.append(B.to_numpy(adv)[:n] == yb)
    return np.concatenate(flags) if flags else np.zeros(0, bool)


def gradient_masking(robust: Mapping[str, np.ndarray], tolerance: int = 0) -> tuple[bool, str]:
    """The masking rule: ``(flag, reason)`` from per-attack robust flags ``(N,)``.

    ``W`` = number of inputs robust to every white-box attack present (``WHITE_BOX``). The flag
    is raised when a black-box attack (``BLACK_BOX``) leaves ``R_b < W - tolerance`` inputs
    robust: an attack without gradients did better than all gradient attacks together, which a
    model with informative gradients does not allow.

    Tolerance 0 (the default) is enough, measured on the ordinary Fashion-MNIST smallcnn at eps
    0.1 (CPU): on 100 test images with the defaults, W = 6 (APGD-CE 6, APGD-T 11, PGD-20 15
    robust) against Square 24 (1000 queries) and 42 (300 queries), and no input was broken by
    Square alone; on 64 images with 20 APGD iterations, 2 targets and 300 queries, over seeds
    0-3, W = 7-9 against Square 22-23 and a transfer from the epoch-1 model 37-39: the closest
    black-box attack stayed 14 images above W. The one black-box attack that could tie a
    white-box one by chance, a model's own transfer set, replays exactly its APGD-CE
    (``transfer_set``). The zero-gradient model of the tests is flagged by 22 images (Square)
    and 36 (transfer) on seed 0, 21-23 and 36-38 over seeds 0-3.

    ``reason`` names every attack that beat the white-box worst case, by how many images, and
    how many inputs only it broke; it is empty when the flag is not raised. Without a white-box
    or a black-box attack present, nothing is compared and the flag stays down.
    """
    white = [a for a in WHITE_BOX if a in robust]
    black = [a for a in BLACK_BOX if a in robust]
    if not white or not black:
        return False, ""
    wb = np.logical_and.reduce([np.asarray(robust[a], bool) for a in white])
    n_wb, reasons = int(wb.sum()), []
    for a in black:
        r = np.asarray(robust[a], bool)
        if int(r.sum()) < n_wb - tolerance:
            reasons.append(f"{a} leaves {int(r.sum())} of {len(r)} inputs robust, "
                           f"{n_wb - int(r.sum())} fewer than the white-box worst case "
                           f"({'+'.join(white)}: {n_wb}; tolerance {tolerance}); "
                           f"{int((wb & ~r).sum())} inputs broken only by {a}")
    return bool(reasons), "; ".join(reasons)


@dataclass(frozen=True, eq=False)
class CrossCheckResult:
    """A cross-check of one model on ``N`` inputs.

    ``robust``: attack -> ``(N,)`` bool, correct clean and after that attack (``own_pgd``: the
    caller's flags AND clean correctness); ``worst_case`` ``(N,)``: AND of all of them and of
    ``clean_correct`` ``(N,)``; ``seconds``: attack -> wall time (``transfer``: replay only;
    no entry for ``own_pgd``); ``masking``/``masking_reason``: ``gradient_masking``'s verdict;
    ``config``: JSON-ready configuration; ``linf``: attack run here (``cfg.attacks``) ->
    ``(N,)`` float64, the L-inf norm of the (projected) adversarial that broke an input
    correctly classified clean, NaN elsewhere: a perturbation that attack *found* (at most
    ``eps``; not a minimal one), for the worst case (``darekit.worstcase.crosscheck_parts``).
    """

    robust: dict[str, np.ndarray]
    worst_case: np.ndarray
    clean_correct: np.ndarray
    seconds: dict[str, float]
    masking: bool
    masking_reason: str
    config: dict[str, Any]
    linf: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def robust_accuracy(self) -> dict[str, float]:
        """Attack -> fraction of all N inputs robust to it."""
        return {a: float(r.mean()) for a, r in self.robust.items()}

    def summary(self) -> dict[str, Any]:
        """JSON-ready: n, clean accuracy, robust accuracy per attack and in the worst case,
        the masking flag and reason, seconds per attack."""
        return {"n": len(self.clean_correct), "clean_accuracy": float(self.clean_correct.mean()),
                "robust_accuracy": self.robust_accuracy(),
                "worst_case_accuracy": float(self.worst_case.mean()),
                "possible_gradient_masking": self.masking, "masking_reason": self.masking_reason,
                "seconds": dict(self.seconds)}


def cross_check(model: keras.Model, x: np.ndarray, y: np.ndarray, cfg: CrossCheckConfig, *,
                transfer: np.ndarray | None = None, own_robust: np.ndarray | None = None,
                progress: bool = False) -> CrossCheckResult:
    """Attack ``model`` (logits) on ``x`` ``(N, H, W, C)`` in [0, 1], labels ``y`` ``(N,)``.

    Runs ``cfg.attacks`` on the inputs the model classifies correctly (each attack on all of
    them, independently, so that attacks can be compared), replays ``transfer`` (``(N, H, W,
    C)``, e.g. ``transfer_set(source, x, y, cfg)``) and adds ``own_robust`` ``(N,)`` bool (the
    package's PGD, e.g. ``pgd_robust``) when given. Every random choice derives from
    ``cfg.seed`` (per attack, target and batch), so the same call gives the same result.
    """
    x, y = _check_inputs(x, y)
    n, nb_classes = len(x), int(model.output_shape[-1])
    if transfer is not None:
        transfer = np.asarray(transfer, np.float32)
        if transfer.shape != x.shape:
            raise DareError(f"transfer set has shape {transfer.shape}; the inputs {x.shape}")
        if np.abs(transfer - x).max() > cfg.eps + 1e-6 or transfer.min() < 0 \
                or transfer.max() > 1:
            raise DareError(f"transfer set leaves the eps={cfg.eps} L-inf ball or [0, 1]: "
                            "was it crafted for these inputs and this budget?")
    if own_robust is not None:
        own_robust = np.asarray(own_robust)
        if own_robust.shape != (n,) or own_robust.dtype != bool:
            raise DareError(f"own_robust must be (N,) = ({n},) bool; received "
                            f"{own_robust.shape} {own_robust.dtype}")
    if "apgd_t" in cfg.attacks and nb_classes < 4:
        raise DareError(f"apgd_t (targeted DLR) needs at least 4 classes; model has {nb_classes}")

    clean_logits = _logits(model, x, cfg.batch_size)
    clean_correct = clean_logits.argmax(axis=1) == y
    batches = _batches(clean_correct, cfg.batch_size)
    n_targets = min(cfg.dlr_targets, nb_classes - 1)
    bar = tqdm(total=len(cfg.attacks) + (transfer is not None), desc="cross-check",
               disable=not progress, leave=False)

    def judge(x_adv: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return _logits(model, x_adv, cfg.batch_size).argmax(axis=1) == y[rows]

    def found(norms: np.ndarray, x_adv: np.ndarray, rows: np.ndarray, ok: np.ndarray) -> None:
        """Record the L-inf norm of each adversarial that broke its input (``ok`` False)."""
        d = np.abs(x_adv.astype(np.float64) - x[rows]).reshape(len(rows), -1)
        norms[rows[~ok]] = d.max(axis=1, initial=0.0)[~ok]

    ce, dlr = _classifiers(model, x.shape[1:], nb_classes, cfg.batch_size)
    robust: dict[str, np.ndarray] = {}
    linf: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    try:
        for name in cfg.attacks:
            bar.set_postfix_str(name)
            start = time.perf_counter()
            flags = clean_correct.copy()
            norms = np.full(n, np.nan)
            for b, rows in enumerate(batches):
                if name == "apgd_ce":
                    xa = _apgd(ce, x[rows], _one_hot(y[rows], nb_classes), cfg,
                               targeted=False, keys=(_key(name), b))
                    flags[rows] = judge(xa, rows)
                    found(norms, xa, rows, flags[rows])
                elif name == "square":
                    xa = _square(ce, x[rows], y[rows], cfg, keys=(_key(name), b))
                    flags[rows] = judge(xa, rows)
                    found(norms, xa, rows, flags[rows])
                else:  # apgd_t: the k-th most likely non-true class, on what is still robust
                    order = np.argsort(-clean_logits[rows], axis=1, kind="stable")
                    for k in range(n_targets):
                        live = flags[rows]
                        if not live.any():
                            break
                        r = rows[live]
                        targets = np.array([[c for c in o if c != t][k]
                                            for o, t in zip(order[live], y[r], strict=True)])
                        labels = _one_hot(targets, nb_classes) - _one_hot(y[r], nb_classes)
                        xa = _apgd(dlr, x[r], labels, cfg, targeted=True,
                                   keys=(_key(name), b, k))
                        flags[r] = judge(xa, r)
                        found(norms, xa, r, flags[r])   # the target that broke it
            robust[name] = flags
            linf[name] = norms
            seconds[name] = time.perf_counter() - start
            bar.update()
        if transfer is not None:
            start = time.perf_counter()
            robust["transfer"] = clean_correct & judge(_project(transfer, x, cfg.eps),
                                                       np.arange(n))
            seconds["transfer"] = time.perf_counter() - start
            bar.update()
    finally:
        bar.close()
    if own_robust is not None:
        robust["own_pgd"] = own_robust & clean_correct

    worst = np.logical_and.reduce([clean_correct, *robust.values()])
    masking, reason = gradient_masking(robust, cfg.masking_tolerance)
    config = {**cfg.to_dict(), "n": n, "nb_classes": nb_classes,
              "apgd": {"eps_step": 2 * cfg.eps, "loss_untargeted": "cross-entropy",
                       "loss_targeted": "AutoAttack targeted DLR",
                       "targets": f"top-{n_targets} non-true classes by clean logits"},
              "square": {"loss": "margin (ART default)", "nb_restarts": 1},
              "transfer_given": transfer is not None, "own_robust_given": own_robust is not None,
              "masking_rule": f"black-box robust count < white-box worst-case count - "
                              f"{cfg.masking_tolerance}",
              "versions": {"art": _art().version, "numpy": np.__version__,
                           "keras": keras.__version__, **B.versions()}}
    return CrossCheckResult(robust=robust, worst_case=worst, clean_correct=clean_correct,
                            seconds=seconds, masking=masking, masking_reason=reason,
                            config=config, linf=linf)
