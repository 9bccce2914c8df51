"""The layout of a run directory, declared once: every stage reads and writes these paths.

Paths are relative to the run directory (``Run.file(rel)`` makes them absolute)::

    config.json                    training config, seed, input shape, versions, git commit
    split.npz                      the 50/50 split as indices into the original training set
    train_log.csv                  loss and accuracy per epoch (train and held-out)
    history/epoch_NNN.weights.h5   weights after NNN complete epochs (1-based)
    architecture.keras             the model of an imported run (its architecture is no
                                   registry entry; train/import_history.py)
    state/                         optimizer state and progress, for --resume
    models/<name>.weights.h5       derived classifiers (dare, dare-s, adv-fgsm, ...)
    models/<name>.keras            the same, standalone (loads without darekit)
    slice/                         Stage 1: masks, scores, summary
    ats/                           Stage 2: regression data and statistics
    dare/                          Stage 3: per-variant epoch logs and summaries
    adv/                           adversarial sets of x_train (and test), resumable parts
    logs/                          adversarial fine-tuning logs
    tune/                          learning-rate selection: held-out images, candidates, choice
    eval/                          evaluation: per (model, attack) parts, results, report, plots
    tensorboard/<stage>/           TensorBoard logs (--tensorboard): train, dare, adv-fgsm, ...
    reproduce.json                 what reproduce.py ran
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG = "config.json"
SPLIT = "split.npz"
TRAIN_LOG = "train_log.csv"
HISTORY = "history"
STATE = "state"
PROGRESS = "state/progress.json"
OPTIMIZER = "state/optimizer.npz"
MODELS = "models"
WEIGHTS_SUFFIX = ".weights.h5"
EXPORT_SUFFIX = ".keras"
EPOCH_RE = re.compile(r"^epoch_(\d{3,})\.weights\.h5$")
ARCHITECTURE = "architecture.keras"
"""An imported run's classifier (logits output) as a standalone Keras file: ``Run.build_model``
rebuilds the architecture from it instead of the registry."""

# Stage 1: slicing
SLICE_DIR = "slice"
MASKS = f"{SLICE_DIR}/masks.npz"
SCORES = f"{SLICE_DIR}/scores.npz"
SLICE_SUMMARY = f"{SLICE_DIR}/summary.json"
SLICE_SUMMARY_CSV = f"{SLICE_DIR}/summary.csv"

# Stage 2: mining
ATS_DIR = "ats"
MINED = f"{ATS_DIR}/data.npz"
MINED_STATS = f"{ATS_DIR}/stats.json"

# Stage 3 and the baselines
DARE_DIR = "dare"
ADV_DIR = "adv"
ADV_PARTS = f"{ADV_DIR}/parts"
LOGS_DIR = "logs"
TUNE_DIR = "tune"
HOLDOUT = f"{TUNE_DIR}/holdout.npz"

# Evaluation
EVAL_DIR = "eval"
EVAL_CONFIG = f"{EVAL_DIR}/config.json"
EVAL_PARTS = f"{EVAL_DIR}/parts"
RESULTS_CSV = f"{EVAL_DIR}/results.csv"
RESULTS_JSON = f"{EVAL_DIR}/results.json"
REPORT = f"{EVAL_DIR}/report.md"
PLOT_ROBUST = f"{EVAL_DIR}/robust_accuracy.png"
PLOT_ER = f"{EVAL_DIR}/er.png"

TENSORBOARD = "tensorboard"
REPRODUCE = "reproduce.json"
PGD_AT_RUN = "pgd-at-run"


def epoch_file(epoch: int) -> str:
    """``history/epoch_007.weights.h5``: the weights after 7 complete epochs (1-based)."""
    return f"{HISTORY}/epoch_{epoch:03d}{WEIGHTS_SUFFIX}"


def model_file(name: str) -> str:
    """``models/<name>.weights.h5``: a derived classifier's weights."""
    return f"{MODELS}/{name}{WEIGHTS_SUFFIX}"


def export_file(name: str) -> str:
    """``models/<name>.keras``: the same classifier as a standalone Keras file."""
    return f"{MODELS}/{name}{EXPORT_SUFFIX}"


def dare_log(variant: str) -> str:
    return f"{DARE_DIR}/{variant}_log.csv"


def dare_summary(variant: str) -> str:
    return f"{DARE_DIR}/{variant}.json"


def finetune_log(name: str) -> str:
    """``logs/<name>.csv`` (per epoch) of an adversarial fine-tuning baseline."""
    return f"{LOGS_DIR}/{name}.csv"


def finetune_summary(name: str) -> str:
    return f"{LOGS_DIR}/{name}.json"


def adv_set(split: str, attack: str) -> str:
    """``adv/<split>-<attack>.npz``: an adversarial set of the split's images."""
    return f"{ADV_DIR}/{split}-{attack}.npz"


def adv_parts(split: str, attack: str) -> str:
    """``adv/parts/<split>-<attack>/``: finished chunks of an unfinished adversarial set."""
    return f"{ADV_PARTS}/{split}-{attack}"


def eval_part(model: str, attack: str) -> str:
    """``eval/parts/<model>__<attack>``, without suffix (``.json`` + ``.npz``)."""
    return f"{EVAL_PARTS}/{model}__{attack}"


def tensorboard(stage: str) -> str:
    """``tensorboard/<stage>/``: TensorBoard logs of a training or fine-tuning stage."""
    return f"{TENSORBOARD}/{stage}"


def tensorboard_for(log_path: str | Path) -> str:
    """The TensorBoard folder of a fine-tuning whose epoch log is ``log_path``:
    ``dare/dare-s_log.csv`` -> ``tensorboard/dare-s``, ``tune/adv-pgd-lr0.01_log.csv`` ->
    ``tensorboard/adv-pgd-lr0.01`` (each candidate of a sweep gets its own)."""
    return tensorboard(Path(log_path).stem.removesuffix("_log"))


def tune_file(method: str) -> str:
    """``tune/<method>.json``: every candidate's figures and the learning rate chosen."""
    return f"{TUNE_DIR}/{method}.json"


# What rewrites a file of the run directory when it is found damaged, by its first folder (or
# its name): the one-line message of a corrupt file says what to do.
_REMEDIES = {
    CONFIG: "the run cannot be used; train it again (or restore the file)",
    SPLIT: "the run cannot be used; train it again (or restore the file)",
    HISTORY: "train the run again (or restore the file)",
    STATE: "delete it and train again without --resume",
    SLICE_DIR: "delete it and rerun dare/nnslicer.py",
    ATS_DIR: "delete it and rerun dare/get_ats.py",
    DARE_DIR: "delete it and rerun dare/dare.py (or dare-s.py, dare-sl.py)",
    ADV_DIR: "delete it and rerun adv/generate_adv.py",
    LOGS_DIR: "delete it and rerun adv/fintune_adv.py",
    TUNE_DIR: "delete it and rerun reproduce.py",
    EVAL_DIR: "delete it and rerun dare/test.py",
    MODELS: "delete it and rerun the stage that made the model",
}


def remedy(path: str | Path) -> str:
    """What to do about a damaged file at ``path`` (absolute, or relative to its run): the
    stage that writes it, found from the run-directory folder it lies in."""
    path = Path(path)
    folders = [f for f in path.parent.parts if f in _REMEDIES]
    if path.parent.name in _REMEDIES:  # the nearest folder first (eval/config.json is eval's)
        return _REMEDIES[path.parent.name]
    if path.name in (CONFIG, SPLIT):
        return _REMEDIES[path.name]
    if folders:
        return _REMEDIES[folders[-1]]
    return "delete it or rerun the stage that writes it"
