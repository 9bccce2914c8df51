"""The adversarial fine-tuning baseline: the run's classifier fine-tuned with cross-entropy on one
attack's adversarial images of ``x_train`` (``<run>/adv/train-<attack>.npz``), true labels.

Outputs, per attack: ``<run>/models/adv-<attack>.weights.h5``, the per-epoch log
``<run>/logs/adv-<attack>.csv`` (clean accuracy on validation and test, weight change) and the
configuration ``<run>/logs/adv-<attack>.json``.

``--devices`` / ``--precision`` (``FinetuneConfig``, ``darekit.distribute``): the classifier is
loaded and fine-tuned under that strategy and dtype policy (``--batch-size`` is the global
batch); the summary records them, and the saved classifier is a plain float32 model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from darekit import distribute, layout
from darekit.advsets import load_adversarial
from darekit.attacks import get_spec
from darekit.config import option
from darekit.errors import DareError
from darekit.finetune import FinetuneConfig, diverged, finetune_ce, tensorboard
from darekit.rundir import Run
from darekit.seeding import set_seed


@dataclass(frozen=True)
class AdvFinetuneConfig:
    """Options of ``adv/fintune_adv.py``.

    ``finetune``: epochs, batch size and learning rate as DARE-SL, which also fine-tunes on a
    cross-entropy (``FinetuneConfig``: 5 epochs, batch 32, plain SGD, lr 1e-3 for every
    architecture; the artifact's VGG rate 1e-7 would leave the weights where they are).
    """

    finetune: FinetuneConfig = option(default_factory=FinetuneConfig, cli=False)
    mix_clean: float = option(0.0, "fraction of clean originals of the adversarial images to "
                              "add (a seeded sample; 1.0: every adversarial image and its "
                              "original)")

    def __post_init__(self) -> None:
        if not 0 <= self.mix_clean <= 1:
            raise DareError(f"--mix-clean must lie in [0, 1]; received {self.mix_clean}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.finetune), "mix_clean": self.mix_clean}


ADV_PREFIX = "adv-"


def model_name(attack: str) -> str:
    """``adv-<attack>``: the baseline's name in ``<run>/models/``."""
    return f"{ADV_PREFIX}{attack}"


def training_set(run: Run, attack: str, mix_clean: float, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The adversarial images of ``x_train`` with their true labels, plus ``mix_clean`` of their
    clean originals: ``x`` ``(M, H, W, C)``, ``y`` ``(M,)`` and a description for the config."""
    adv = load_adversarial(run, attack, "train")
    x, y = adv.x_adv, adv.y
    n_clean = int(round(mix_clean * len(x)))
    if n_clean:
        data = run.data()
        pick = np.random.default_rng([seed, 2]).choice(len(adv.idx), n_clean, replace=False)
        x = np.concatenate([x, data.x_train[adv.idx[pick]]])
        y = np.concatenate([y, data.y_train[adv.idx[pick]]])
    info = {"adv_file_config": adv.config, "n_adversarial": len(adv.x_adv), "n_clean": n_clean,
            "adv_success_rate": float(adv.success[adv.clean_correct].mean())
            if adv.clean_correct.any() else float("nan")}
    return x, y, info


def adversarial_finetune(model: keras.Model, x_adv: np.ndarray, y: np.ndarray,
                         cfg: AdvFinetuneConfig, *, eval_sets=None, log_path=None,
                         verbose: int = 1, extra=None,
                         callbacks=()) -> tuple[str, list[dict[str, Any]]]:
    """The baseline on any model: fine-tune ``model`` in place with cross-entropy on
    adversarial images ``x_adv`` ``(M, H, W, C)`` and their true labels ``y`` ``(M,)``.
    Returns ``(status, epoch-log rows)``; ``status`` is ``diverged`` when the weights became
    NaN or inf (the model must then not be used), else ``ok``."""
    rows = finetune_ce(model, x_adv, y, cfg.finetune, eval_sets=eval_sets or {},
                       log_path=log_path, verbose=verbose, extra=extra, callbacks=callbacks)
    return ("diverged" if diverged(model, rows) else "ok"), rows


def finetune_run(run: Run, attack: str, cfg: AdvFinetuneConfig, *, verbose: int = 1,
                 log_path: Any = None) -> tuple[keras.Model, str, list[dict[str, Any]],
                                                dict[str, Any]]:
    """Fine-tune (a fresh copy of) the run's classifier on ``attack``'s adversarial
    ``x_train``; save nothing but the per-epoch log (default ``logs/adv-<attack>.csv``).
    Returns ``(model, status, epoch-log rows, metadata for the summary)``; ``model`` is a
    plain float32 classifier whatever ``cfg.finetune.devices`` / ``precision`` were."""
    attack = get_spec(attack).name
    ft = cfg.finetune
    dist = distribute.distribution(ft.devices, ft.precision)
    dist.check_batch(ft.batch_size)
    x, y, info = training_set(run, attack, cfg.mix_clean, ft.seed)
    log_path = log_path or run.file(layout.finetune_log(model_name(attack)))
    meta = {"attack": attack, **cfg.to_dict(), **info, "log": str(log_path),
            "distribution": dist.describe(ft.batch_size)}
    if verbose:
        print(f"adv-{attack}: {dist.summary(ft.batch_size)}")
    with dist.scope():  # the classifier is built, compiled and fitted on --devices
        set_seed(ft.seed)  # before the build: dropout draws its seeds then (see dare.tune_run)
        model = run.load_model()
        status, rows = adversarial_finetune(model, x, y, cfg, eval_sets=run.eval_sets(),
                                            log_path=log_path, verbose=verbose,
                                            extra={"attack": attack},
                                            callbacks=tensorboard(
                                                ft.tensorboard,
                                                run.file(layout.tensorboard_for(log_path))))
    if dist.replicas > 1 or dist.precision != "float32":
        model = distribute.plain_copy(model, run.build_model)
    return model, status, rows, meta


def save_finetuned(run: Run, attack: str, model: keras.Model, status: str,
                   meta: dict[str, Any]) -> None:
    """Save the baseline as ``models/adv-<attack>`` with its summary
    (``logs/adv-<attack>.json``); a diverged one saves no model and says ``diverged``."""
    name = model_name(get_spec(attack).name)
    if status == "diverged":
        run.remove_model(name)
    else:
        meta = {**meta, "model": str(run.save_model(model, name))}
    run.write_config(layout.finetune_summary(name), "adv_finetune", {**meta, "status": status})


def adv_finetune(run: Run, attack: str, cfg: AdvFinetuneConfig, *,
                 verbose: int = 1) -> tuple[keras.Model, list[dict[str, Any]]]:
    """Fine-tune the run's classifier on ``attack``'s adversarial ``x_train``; save and log it.

    Returns the fine-tuned model (also saved as ``adv-<attack>``) and the epoch-log rows. A
    run that diverges saves no model; its summary (``logs/adv-<attack>.json``) says
    ``diverged``, with the learning rate and the log.
    """
    model, status, rows, meta = finetune_run(run, attack, cfg, verbose=verbose)
    save_finetuned(run, attack, model, status, meta)
    return model, rows
