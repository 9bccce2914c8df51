"""A run directory: one trained model with its history, and everything later stages add.

Its layout is declared in ``darekit.layout``; every file is written atomically. Models are
stored as weights (the architecture is rebuilt from ``config.json``, or from the run's
``architecture.keras`` for an imported run, so a weights file that does not belong to the run
fails loudly instead of loading silently) and, for derived classifiers, also as standalone
``.keras`` files that load with a plain Keras, without darekit.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np

from darekit import io, layout
from darekit.data import Dataset, Split, balanced_subset, load_dataset
from darekit.errors import DareError
from darekit.models import get_architecture
from darekit.models.common import STD_FLOOR
from darekit.provenance import provenance


def weights_view(model: keras.Model) -> keras.Model:
    """An uncompiled model over the same layers: its ``save_weights`` writes the layers'
    weights only. (A compiled model's file also carries the optimizer's slots, which doubles
    a history of SGD-with-momentum checkpoints; resume state is saved apart.)"""
    return keras.Model(_single(model.inputs), _single(model.outputs), name=model.name)


def _single(tensors: list) -> Any:
    """A lone tensor rather than a list of one: a model saved as ``.keras`` then takes a
    plain array (Keras warns when a list-structured model is called with an array)."""
    return tensors[0] if len(tensors) == 1 else tensors


@dataclass(frozen=True)
class RunData:
    """The run's data: ``x_*`` are ``(N, H, W, C)`` float32 in [0, 1], ``y_*`` int64."""

    dataset: Dataset
    split: Split
    x_train: np.ndarray
    y_train: np.ndarray
    x_validation: np.ndarray
    y_validation: np.ndarray

    @property
    def x_test(self) -> np.ndarray:
        return self.dataset.x_test

    @property
    def y_test(self) -> np.ndarray:
        return self.dataset.y_test

    @classmethod
    def from_split(cls, dataset: Dataset, split: Split) -> RunData:
        x, y = dataset.x_train, dataset.y_train
        return cls(dataset, split, x[split.train_idx], y[split.train_idx],
                   x[split.validation_idx], y[split.validation_idx])


class Run:
    """Handle on a run directory. ``Run.open`` checks it holds a trained model."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # ------------------------------------------------------------------ opening / config
    @classmethod
    def open(cls, path: str | Path, *, need_history: bool = True, writable: bool = False) -> Run:
        """Open an existing run; fail with a clear message when it is not a trained run, or
        (``writable``: a stage is about to add files) when it cannot be written to: before
        the stage's work, not when it saves its result."""
        run = cls(path)
        if not (run.path / layout.CONFIG).is_file():
            raise DareError(f"no run at {run.path} (no {layout.CONFIG}); train one first, e.g. "
                            f"python train/train.py --model vgg16 --run-dir {run.path}")
        if need_history and not run.history_epochs():
            raise DareError(f"run {run.path} has no training history ({layout.HISTORY}/ is empty); "
                            "train it first or resume it with --resume")
        if writable:
            io.check_writable(run.path)
        return run

    def file(self, rel: str) -> Path:
        return self.path / rel

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        return io.read_json(self.path / layout.CONFIG)

    @property
    def train_config(self) -> dict[str, Any]:
        return self.config["train"]

    @property
    def model_name(self) -> str:
        return self.train_config["model"]

    @property
    def dataset_name(self) -> str:
        return self.train_config["dataset"]

    @property
    def seed(self) -> int:
        return int(self.train_config["seed"])

    @property
    def trace_layers(self) -> tuple[str, ...]:
        """The layers slicing and activation traces use: the run's own (recorded in its
        config, e.g. for an imported model) or else its architecture's."""
        own = self.train_config.get("trace_layers")
        return tuple(own) if own else get_architecture(self.model_name).trace_layers

    @property
    def dare_lr(self) -> float:
        """DARE's default learning rate for this run's model (the architecture's)."""
        own = self.train_config.get("dare_lr")
        return float(own) if own is not None else get_architecture(self.model_name).dare_lr

    def write_config(self, rel: str, section: str, cfg: dict[str, Any]) -> None:
        """Write ``{section: cfg, run: ..., provenance...}`` to ``<run>/<rel>`` atomically."""
        io.write_json(self.path / rel, {section: cfg, "run": str(self.path), **provenance()})

    # ------------------------------------------------------------------ data
    def split(self) -> Split:
        p = self.path / layout.SPLIT
        if not p.is_file():
            raise DareError(f"run {self.path} has no {layout.SPLIT}; it was not created by "
                            "train.py")
        return Split.load(p)

    def data(self) -> RunData:
        """The dataset split exactly as training saw it (``x_train``/``x_validation``/test)."""
        return RunData.from_split(load_dataset(self.dataset_name), self.split())

    def eval_sets(self, data: RunData | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The sets fine-tuning stages log accuracy on: ``x_validation`` and the test images
        training held out (the run's ``--test-subset``, a seeded class-balanced subset, or
        the whole test set)."""
        data = data or self.data()
        x, y = data.x_test, data.y_test
        n = self.train_config.get("test_subset")
        if n is not None and n < len(y):
            keep = balanced_subset(y, int(n), self.seed)
            x, y = x[keep], y[keep]
        return {"validation": (data.x_validation, data.y_validation), "test": (x, y)}

    # ------------------------------------------------------------------ history
    def completed_epochs(self) -> int:
        p = self.path / layout.PROGRESS
        return int(io.read_json(p)["epoch"]) if p.is_file() else 0

    def history_epochs(self) -> list[int]:
        """Epochs whose weights are saved and complete (never one that a kill cut short)."""
        folder = self.path / layout.HISTORY
        if not folder.is_dir():
            return []
        done = self.completed_epochs()
        found = (int(m.group(1)) for p in folder.iterdir() if (m := layout.EPOCH_RE.match(p.name)))
        return sorted(e for e in found if e <= done)

    def epoch_path(self, epoch: int) -> Path:
        return self.path / layout.epoch_file(epoch)

    # ------------------------------------------------------------------ models
    @property
    def architecture_file(self) -> Path | None:
        """The file an imported run's architecture is rebuilt from (None: the registry's)."""
        rel = self.train_config.get("architecture_file")
        return self.path / rel if rel else None

    @functools.cached_property
    def _architecture_json(self) -> str:
        """An imported run's architecture (Keras JSON), read once from its ``.keras`` file."""
        path = self.architecture_file
        if path is None or not path.is_file():
            raise DareError(f"run {self.path} is imported but its architecture file {path} "
                            "is missing")
        return keras.saving.load_model(path, compile=False).to_json()

    def build_model(self) -> keras.Model:
        """A freshly initialised, uncompiled model of the run's architecture and input shape:
        the registry's, or for an imported run the one in its ``architecture.keras``."""
        cfg = self.train_config
        if self.architecture_file is not None:
            # From the JSON config: the weights in the file are not read again for every model.
            return keras.models.model_from_json(self._architecture_json)
        arch = get_architecture(cfg["model"])
        return arch.build(tuple(cfg["input_shape"]), int(cfg["num_classes"]))

    def _load_into(self, model: keras.Model, path: Path) -> keras.Model:
        if not path.is_file():
            raise DareError(f"model file {path} does not exist")
        try:
            with warnings.catch_warnings():
                # Keras only *warns* when a file lacks some layers and leaves them freshly
                # initialised; a partial load must fail like a shape mismatch does.
                warnings.simplefilter("error", UserWarning)
                with _legacy_upgraded(path) as readable:
                    model.load_weights(str(readable))
        except Exception as e:  # h5py/Keras raise many types on a shape or layer mismatch
            raise DareError(f"model file {path} does not match run {self.path} "
                            f"({self.model_name} on {self.dataset_name}): "
                            f"{str(e).splitlines()[0][:200]}") from None
        return model

    def load_model(self, epoch: int | None = None) -> keras.Model:
        """The classifier after ``epoch`` epochs (default: the last complete epoch)."""
        epochs = self.history_epochs()
        if not epochs:
            raise DareError(f"run {self.path} has no training history")
        epoch = epochs[-1] if epoch is None else epoch
        if epoch not in epochs:
            raise DareError(f"run {self.path} has no epoch {epoch}; "
                            f"it has {epochs[0]}..{epochs[-1]}")
        return self._load_into(self.build_model(), self.epoch_path(epoch))

    def model_path(self, name: str) -> Path:
        return self.path / layout.model_file(name)

    def export_path(self, name: str) -> Path:
        return self.path / layout.export_file(name)

    def save_model(self, model: keras.Model, name: str) -> Path:
        """Save a derived classifier (``dare``, ``adv-fgsm``...) into ``models/``, atomically:
        its weights (``<name>.weights.h5``, what the pipeline loads) and the standalone
        ``<name>.keras`` (architecture and weights, no optimizer; opens with a plain
        ``keras.saving.load_model``, without darekit). Returns the weights file."""
        path, export = self.model_path(name), self.export_path(name)
        view = weights_view(model)
        # The export goes first out of the way: a kill between the two writes leaves a missing
        # .keras beside the new weights, never a stale one that disagrees with them.
        export.unlink(missing_ok=True)
        io.save_with(path, view.save_weights)
        io.save_with(export, view.save)
        return path

    def remove_model(self, name: str) -> None:
        """Delete a derived classifier's files (weights and export), e.g. after a divergence."""
        self.model_path(name).unlink(missing_ok=True)
        self.export_path(name).unlink(missing_ok=True)

    def weights_path(self, name: str) -> Path:
        """The weights file of ``name``; ``original`` is the last epoch of the history."""
        if name == "original":
            epochs = self.history_epochs()
            if not epochs:
                raise DareError(f"run {self.path} has no training history")
            return self.epoch_path(epochs[-1])
        return self.model_path(name)

    def load_named(self, name: str, into: keras.Model | None = None) -> keras.Model:
        """Load a derived classifier; ``original`` is the last epoch of the history.
        ``into``: a model of this run to load the weights into (its compiled functions stay
        valid: an evaluation reuses them across methods) instead of a new one."""
        return self._load_into(into if into is not None else self.build_model(),
                               self.weights_path(name))

    def not_results(self) -> dict[str, dict[str, Any]]:
        """``{name: {"status", "lr", "log", "why"}}`` of the fine-tuned classifiers whose last
        run is not a result, as their summaries in ``dare/`` and ``logs/`` record it:
        ``diverged`` (the weights became NaN/inf) or ``no-op`` (they did not move). Neither
        has a model to evaluate; the evaluation and the report show the status instead. A
        summary written before ``no-op`` existed (``status: ok`` with ``moved: false``)
        counts as ``no-op`` too."""
        out = {}
        for folder in (layout.DARE_DIR, layout.LOGS_DIR):
            for path in sorted((self.path / folder).glob("*.json")):
                if io.TMP_MARK in path.name:
                    continue
                meta = io.read_json(path)
                section = next((v for k, v in meta.items() if isinstance(v, dict)
                                and k in ("dare", "adv_finetune")), {})
                info = section.get("summary", section)
                status = info.get("status", "ok")
                if status == "ok" and info.get("moved") is False:
                    status = "no-op"
                if status != "ok":
                    why = info.get("why") or ("the weights became NaN/inf"
                                              if status == "diverged" else
                                              "the weights did not move")
                    out[path.stem] = {"status": status, "lr": section.get("lr"),
                                      "log": info.get("log"), "why": why}
        return out

    def diverged_models(self) -> dict[str, dict[str, Any]]:
        """``not_results()`` restricted to the runs that diverged."""
        return {k: v for k, v in self.not_results().items() if v["status"] == "diverged"}

    def named_models(self) -> list[str]:
        """``original`` plus every derived classifier saved in ``models/`` (its weights file;
        the standalone ``.keras`` exports beside them are not listed twice), less those whose
        last run is not a result (``not_results``: e.g. a model an older darekit saved
        although its weights did not move)."""
        folder = self.path / layout.MODELS
        suffix = layout.WEIGHTS_SUFFIX
        names = sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")
                       if io.TMP_MARK not in p.name) if folder.is_dir() else []
        skip = self.not_results() if names else {}
        return ["original", *(n for n in names if n not in skip)]


# ---------------------------------------------------------------------------- legacy files
_LEGACY_NORM = "layers/channel_normalization"  # darekit's former custom layer (mean, std)
_NORM = "layers/normalization"  # keras.layers.Normalization (mean, variance, count)


@contextlib.contextmanager
def _legacy_upgraded(path: Path) -> Iterator[Path]:
    """``path``, or a temporary upgraded copy when it is a weights file written before the
    models used Keras' ``Normalization`` (``channel_normalization`` with ``mean``, ``std``):
    runs trained then keep loading. The file itself is never changed."""
    if not path.name.endswith(layout.WEIGHTS_SUFFIX) or not _is_legacy(path):
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        with h5py.File(copy, "r+") as f:
            f.move(_LEGACY_NORM, _NORM)
            vars_ = f[f"{_NORM}/vars"]
            std = np.maximum(np.asarray(vars_["1"], "float64"), STD_FLOOR)
            del vars_["1"]
            vars_["1"] = (std * std).astype("float32")
            vars_["2"] = np.int64(0)
        yield copy


def _is_legacy(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return _LEGACY_NORM in f and _NORM not in f
    except OSError:  # not HDF5: let Keras report it
        return False
