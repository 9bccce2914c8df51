"""The adversarial fine-tuning baseline: the run's classifier fine-tuned with cross-entropy on one
attack's adversarial images of ``x_train`` (``<run>/adv/train-<attack>.npz``), true labels.

Outputs, per attack: ``<run>/models/adv-<attack>.weights.h5``, the per-epoch log
``<run>/logs/adv-<attack>.csv`` (clean accuracy on validation and test, weight change) and the
configuration ``<run>/logs/adv-<attack>.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from darekit import layout
from darekit.advsets import load_adversarial
from darekit.attacks import get_spec
from darekit.config import option
from darekit.errors import DareError
from darekit.finetune import FinetuneConfig, finetune_ce
from darekit.rundir import Run


@dataclass(frozen=True)
class AdvFinetuneConfig:
    """Options of ``adv/fintune_adv.py``.

    ``finetune``: epochs and batch size as DARE-SL (``FinetuneConfig``: 5 epochs, batch 32,
    plain SGD, lr 1e-3 for every architecture, not the architecture's ``dare_lr``: VGG's 1e-7
    is tuned for DARE's regression loss, and with a mean cross-entropy it leaves the weights
    where they are, which would make the baseline a no-op).
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


def model_name(attack: str) -> str:
    """``adv-<attack>``: the baseline's name in ``<run>/models/``."""
    return f"adv-{attack}"


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
                         verbose: int = 1, extra=None) -> tuple[str, list[dict[str, Any]]]:
    """The baseline on any model: fine-tune ``model`` in place with cross-entropy on
    adversarial images ``x_adv`` ``(M, H, W, C)`` and their true labels ``y`` ``(M,)``.
    Returns ``(status, epoch-log rows)``; ``status`` is ``diverged`` when the weights became
    NaN or inf (the model must then not be used), else ``ok``."""
    rows = finetune_ce(model, x_adv, y, cfg.finetune, eval_sets=eval_sets or {},
                       log_path=log_path, verbose=verbose, extra=extra)
    finite = all(np.isfinite(w).all() for w in model.get_weights())
    return ("ok" if finite else "diverged"), rows


def adv_finetune(run: Run, attack: str, cfg: AdvFinetuneConfig, *,
                 verbose: int = 1) -> tuple[keras.Model, list[dict[str, Any]]]:
    """Fine-tune the run's classifier on ``attack``'s adversarial ``x_train``; save and log it.

    Returns the fine-tuned model (also saved as ``adv-<attack>``) and the epoch-log rows. A
    run that diverges saves no model; its summary (``logs/adv-<attack>.json``) says
    ``diverged``, with the learning rate and the log.
    """
    attack = get_spec(attack).name
    x, y, info = training_set(run, attack, cfg.mix_clean, cfg.finetune.seed)
    model = run.load_model()
    name = model_name(attack)
    log = run.file(layout.finetune_log(name))
    meta = {"attack": attack, **cfg.to_dict(), **info, "log": str(log)}
    run.write_config(layout.finetune_summary(name), "adv_finetune",
                     {**meta, "status": "running"})
    status, rows = adversarial_finetune(model, x, y, cfg, eval_sets=run.eval_sets(),
                                        log_path=log, verbose=verbose, extra={"attack": attack})
    if status == "diverged":
        run.remove_model(name)
    else:
        meta["model"] = str(run.save_model(model, name))
    run.write_config(layout.finetune_summary(name), "adv_finetune", {**meta, "status": status})
    return model, rows
