"""darekit: a reproduction of DARE (Delta debugging Aided Robustness Enhancement, ASE 2022).

All logic lives in this package; the scripts under ``train/``, ``adv/`` and ``dare/`` are thin
entry points that mirror the original artifact's layout. ``import darekit`` is cheap: it does
not import TensorFlow (the modules that need it do).
"""

__version__ = "0.2.0"

import logging as _logging
import os as _os

# TensorFlow's C++ INFO and WARNING lines (oneDNN, CUDA notices) and its Python-side warnings
# (retracing notices when each historical model of a run gets its own compiled function, which
# is expected) stay off stderr, so that a bad option's one-line error stays one line.
# TF_CPP_MIN_LOG_LEVEL works only if set before TensorFlow loads (here: before any darekit
# module imports Keras); GLOG_minloglevel, ABSL_MIN_LOG_LEVEL and TF_ENABLE_ONEDNN_OPTS do not
# silence the absl and cpu_feature_guard lines (measured on TF 2.21, AMD EPYC). For CPUs that
# print them anyway, the scripts also import the backend with those lines filtered out of file
# descriptor 2 (``darekit.cli.quiet_stderr``). ``DAREKIT_TF_LOGS=1`` keeps them all.
if _os.environ.get("DAREKIT_TF_LOGS") != "1":
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _logging.getLogger("tensorflow").setLevel(_logging.ERROR)

# The model-first API, one import away: ``import darekit as dk; dk.tune(model, ...)``.
# Resolved on first use, so that ``import darekit`` stays cheap.
API = {
    "load_dataset": "darekit.data", "make_split": "darekit.data",
    "import_model": "darekit.importer", "find_checkpoints": "darekit.importer",
    "find_trace_layers": "darekit.slicing", "slice_model": "darekit.slicing",
    "SliceConfig": "darekit.slicing",
    "mine": "darekit.mining", "MineConfig": "darekit.mining",
    "tune": "darekit.dare", "DareConfig": "darekit.dare",
    "adversarial_finetune": "darekit.adv_finetune", "AdvFinetuneConfig": "darekit.adv_finetune",
    "evaluate_attack": "darekit.evaluate", "SearchConfig": "darekit.evaluate",
    "cross_check": "darekit.crosscheck", "CrossCheckConfig": "darekit.crosscheck",
    "Run": "darekit.rundir",
}


def __getattr__(name: str):
    if name in API:
        import importlib

        return getattr(importlib.import_module(API[name]), name)
    raise AttributeError(f"module 'darekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
