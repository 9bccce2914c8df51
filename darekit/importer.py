"""Import a foreign Keras classifier and its training history as a run directory.

``train/import_history.py`` is the whole of it. A model trained anywhere with Keras (any
architecture, ``model.fit`` with ``keras.callbacks.ModelCheckpoint``) becomes a run that every
later stage (``dare/nnslicer.py``, ``dare/get_ats.py``, ``dare/dare*.py``, ``adv/...``,
``dare/test.py``) opens unchanged:

- ``import_model(model, dataset)``, model-first: checks that ``model`` takes the dataset's
  images (float32 pixels in [0, 1], NHWC) and outputs logits, strips a softmax output, names
  the logits layer ``logits`` (what slicing walks back to), resolves the traced layers and
  measures clean test accuracy (near chance suggests another input scaling).
- ``import_history(cfg)``: reads the checkpoints folder, imports the model with its last
  checkpoint, and writes the run directory (``config.json`` with ``model: imported``,
  ``split.npz``, ``history/epoch_NNN.weights.h5`` of the logits model for every checkpoint,
  ``state/progress.json``, and ``architecture.keras``, from which ``Run.build_model`` rebuilds
  the architecture). The directory is assembled under a temporary name and renamed into place
  at the end: an error or a kill leaves no half-imported run.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from darekit import io, layout
from darekit.config import option
from darekit.data import (
    DATASETS,
    Dataset,
    Split,
    balanced_subset,
    dataset_spec,
    load_dataset,
    make_split,
)
from darekit.errors import DareError
from darekit.models import DEFAULT_DARE_LR, LOGITS
from darekit.paths import default_run_dir, mark_latest
from darekit.provenance import provenance
from darekit.rundir import Run

IMPORTED = "imported"
"""``train.model`` of an imported run (no registry architecture has this name)."""


CHECKPOINT_KINDS = {".keras": "keras", layout.WEIGHTS_SUFFIX: "weights"}
"""Checkpoint file suffixes ``ModelCheckpoint`` writes: full models or weights only."""

NEAR_CHANCE = 2.0
"""Clean accuracy below ``NEAR_CHANCE / num_classes`` is reported as near chance."""

_ACTIVATION_LAYERS = (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU,
                      keras.layers.PReLU, keras.layers.ELU, keras.layers.Softmax)


def _parse_layers(s: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in s.split(",") if t.strip())


@dataclass(frozen=True)
class ImportConfig:
    """Options of ``train/import_history.py``; ``model``, ``history``, ``dataset`` are required."""

    model: str = option("", "the classifier: a Keras model file (.keras) whose architecture "
                        "the checkpoints fit", metavar="FILE")
    history: str = option("", "folder of per-epoch checkpoints as keras.callbacks."
                          "ModelCheckpoint writes them: .keras or .weights.h5 files, one kind, "
                          "numbered by epoch in their names (e.g. epoch_{epoch:02d}.keras)",
                          metavar="DIR")
    dataset: str = option("", "the dataset the model was trained on",
                          choices=lambda: sorted(DATASETS))
    split: str | None = option(None, ".npz with train_idx and validation_idx, indices into the "
                               "original training set (x_train trained the model, x_validation "
                               "is DARE's fine-tuning data; the format split.npz has)",
                               metavar="NPZ", default_text="a new seeded stratified 50/50 split, "
                               "with a warning")
    layers: tuple[str, ...] = option((), "comma-separated layers that slicing and activation "
                                     "traces use (post-activation outputs, e.g. the ReLU "
                                     "layers of the last conv block and the FC layers)",
                                     parse=_parse_layers, metavar="A,B,...",
                                     default_text="found from the model by "
                                     "darekit.slicing.find_trace_layers")
    dare_lr: float = option(DEFAULT_DARE_LR, "DARE's learning rate for this run when "
                            "dare/dare.py gets no --lr")
    seed: int = option(0, "seed of the split (when --split is not given) and of the "
                       "accuracy check's images")
    check_images: int = option(500, "class-balanced test images the clean accuracy check uses")
    run_dir: str | None = option(None, "run directory to create",
                                 default_text="runs/<dataset>-imported-s<seed>")

    REQUIRED = ("model", "history", "dataset")

    def __post_init__(self) -> None:
        for name in self.REQUIRED:
            if not getattr(self, name):
                raise DareError(f"--{name} is required")
        dataset_spec(self.dataset)  # raises on an unknown name
        if not self.dare_lr > 0:
            raise DareError(f"--dare-lr must be positive; received {self.dare_lr}")
        if self.seed < 0:
            raise DareError(f"--seed must be >= 0; received {self.seed}")
        if self.check_images < 10:
            raise DareError(f"--check-images must be at least 10; received {self.check_images}")


# --------------------------------------------------------------------------- checkpoints
@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint file: the weights after ``epoch`` epochs (as its name numbers them)."""

    epoch: int
    path: Path


_EPOCH_WORD = re.compile(r"epoch\D{0,2}?(\d+)", re.IGNORECASE)  # epoch_03, epoch-3, Epoch3
_DECIMAL = re.compile(r"\d+\.\d+")  # a metric in the name, e.g. {val_loss:.2f}
_INTEGER = re.compile(r"\d+")


def epoch_of(stem: str) -> tuple[int, str] | None:
    """The epoch number in a checkpoint's name (without suffix) and the name's template.

    The number after the word "epoch" if there is one, else the last integer once decimals
    (metrics such as ``{val_loss:.2f}``) are set aside: ``epoch_03`` -> 3,
    ``model.03-0.45`` -> 3, ``ckpt-12`` -> 12. The template (``epoch_#``, ``model.#-F``) is the
    name with the number as ``#`` and decimals as ``F``: one folder, one template.
    None when the name holds no number.
    """
    m = _EPOCH_WORD.search(stem)
    if m is not None:
        start, end = m.span(1)
    else:
        masked = _DECIMAL.sub(lambda d: "F" * len(d.group()), stem)  # same length, same spans
        ints = list(_INTEGER.finditer(masked))
        if not ints:
            return None
        start, end = ints[-1].span()
    template = _DECIMAL.sub("F", stem[:start]) + "#" + _DECIMAL.sub("F", stem[end:])
    return int(stem[start:end]), template


def _kind(name: str) -> str | None:
    for suffix, kind in CHECKPOINT_KINDS.items():
        if name.endswith(suffix):
            return kind
    return None


def find_checkpoints(folder: str | os.PathLike) -> list[Checkpoint]:
    """The checkpoints in ``folder`` (``.keras`` or ``.weights.h5`` files), oldest first.

    Other files are ignored. Raises ``DareError`` when there are none, when both kinds are
    mixed, when a name holds no epoch number or the names follow different templates, or
    when two files claim the same epoch.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DareError(f"checkpoint folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and io.TMP_MARK not in p.name and _kind(p.name) is not None)
    if not files:
        raise DareError(f"no checkpoints in {folder}: expected .keras or .weights.h5 files "
                        "numbered by epoch, as keras.callbacks.ModelCheckpoint(filepath="
                        "'.../epoch_{epoch:02d}.keras') writes them")
    kinds = {_kind(p.name) for p in files}
    if len(kinds) > 1:
        raise DareError(f"{folder} mixes .keras and .weights.h5 checkpoints; keep one kind")
    found: dict[int, Path] = {}
    templates: dict[str, Path] = {}
    for p in files:
        stem = p.name[: -len(next(s for s in CHECKPOINT_KINDS if p.name.endswith(s)))]
        parsed = epoch_of(stem)
        if parsed is None:
            raise DareError(f"checkpoint {p.name} in {folder} has no epoch number in its name "
                            "(expected e.g. epoch_03.keras)")
        epoch, template = parsed
        templates.setdefault(template, p)
        if epoch in found:
            raise DareError(f"checkpoints {found[epoch].name} and {p.name} in {folder} both "
                            f"claim epoch {epoch}")
        found[epoch] = p
    if len(templates) > 1:
        a, b = list(templates.values())[:2]
        raise DareError(f"mixed checkpoint names in {folder} ({a.name}, {b.name}): keep one "
                        "series of epochs per folder")
    return [Checkpoint(e, found[e]) for e in sorted(found)]


def load_checkpoint(model: keras.Model, checkpoint: Checkpoint | str | os.PathLike) -> None:
    """Load a checkpoint's weights into ``model`` (the architecture that wrote it); a file
    that does not fit, even partly, is a ``DareError``."""
    path = checkpoint.path if isinstance(checkpoint, Checkpoint) else Path(checkpoint)
    try:
        with warnings.catch_warnings():
            # Keras only warns when a file lacks some layers; a partial load must fail.
            warnings.simplefilter("error", UserWarning)
            model.load_weights(str(path))
    except Exception as e:  # Keras/h5py raise many types on a mismatch
        if _damaged(path, e):
            raise DareError(f"checkpoint {path} is corrupt or truncated ({_first_line(e)}); "
                            "replace it with a complete copy") from None
        raise DareError(f"checkpoint {path} does not fit the model {model.name!r}: "
                        f"{_mismatch(e)}") from None


def load_source_model(path: str | os.PathLike) -> keras.Model:
    """The foreign classifier from a Keras model file (``.keras``; compile state ignored)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DareError(f"model file {path} does not exist")
    if path.name.endswith(layout.WEIGHTS_SUFFIX):
        raise DareError(f"--model {path} holds weights only; give the model file (.keras) "
                        "whose architecture the checkpoints fit")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:
        if _damaged(path, e):
            raise DareError(f"model file {path} is corrupt or truncated (not a readable "
                            f"{''.join(path.suffixes) or 'Keras'} file); replace it with a "
                            "complete copy") from None
        raise DareError(f"cannot load model {path}: {_mismatch(e)}") from None


def _damaged(path: Path, e: BaseException) -> bool:
    """Whether loading ``path`` failed because the file is damaged rather than foreign: a
    ``.keras`` file is a zip archive (Keras says "File not found" when it is not one), a
    ``.weights.h5`` an HDF5 file (h5py says "truncated file" or cannot open it)."""
    import zipfile

    if not path.is_file():
        return False
    if path.name.endswith(".keras"):
        try:
            with zipfile.ZipFile(path) as z:
                return z.testzip() is not None
        except (zipfile.BadZipFile, OSError, EOFError):
            return True
    text = str(e)
    return isinstance(e, OSError) and ("truncated" in text or "Unable to" in text
                                       or "signature" in text)


_KERAS_MISMATCH = re.compile(r"A total of (\d+) objects could not be loaded\. Example error "
                             r"message for object <(\w+) name=([^,>]+)[^>]*>:\s*(.*)", re.S)


def _mismatch(e: BaseException) -> str:
    """One line of what did not fit, from Keras' many-line messages: the first layer that did
    not load and why (the shapes), without the variable's values that Keras prints."""
    text = str(e)
    m = _KERAS_MISMATCH.match(text.strip())
    if m is None:
        if "Skipping nested container" in text:  # Keras' warning for a different structure
            return "its layers are not the model's (another architecture)"
        return _first_line(e)
    n, kind, name, detail = m.groups()
    detail = " ".join(detail.split("Target variable:")[0].split())
    shapes = dict(re.findall(r"(variable|value)\.shape=(\([^)]*\))", detail))
    why = f"the model has shape {shapes['variable']}, the file {shapes['value']}" \
        if len(shapes) == 2 else detail[:160]
    return (f"{n} layers did not load, the first {kind} {name!r}: {why} (a checkpoint of "
            "another architecture?)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:240]


# --------------------------------------------------------------------------- the model
@dataclass
class ImportedModel:
    """A foreign classifier made fit for the pipeline.

    Attributes:
        model: pixels ``(B, H, W, C)`` -> logits ``(B, K)``, uncompiled, output layer named
            ``logits``. It shares every layer with ``source`` but the output layer, which is a
            copy when it had to be renamed or lose its softmax: ``sync`` refreshes the copy
            after new weights are loaded into ``source``.
        source: the model as given.
        trace_layers: the layers slicing and activation traces use.
        accuracy: clean accuracy on ``check_images`` class-balanced test images.
        notes: what was changed (e.g. a stripped softmax), for the user.
        warnings: what may be wrong (near-chance accuracy, a model slicing cannot walk).
    """

    model: keras.Model
    source: keras.Model
    trace_layers: tuple[str, ...]
    accuracy: float
    check_images: int
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    copies: list[tuple[keras.layers.Layer, keras.layers.Layer]] = field(default_factory=list)

    def sync(self) -> None:
        """Copy ``source``'s current output-layer weights into the renamed copy."""
        for original, copy in self.copies:
            copy.set_weights(original.get_weights())


def _trailing(layer: keras.layers.Layer) -> str | None:
    """``"softmax"`` or ``"linear"`` for a weightless output layer that can be stripped (a
    ``Softmax`` layer, ``Activation("softmax")``, ``Activation("linear")``), else None."""
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    if isinstance(layer, keras.layers.Activation):
        name = getattr(layer.activation, "__name__", None)
        return name if name in ("softmax", "linear") else None
    return None


def _activation_name(layer: keras.layers.Layer) -> str | None:
    """The built-in activation a layer applies (None: none, or linear)."""
    act = getattr(layer, "activation", None)
    name = getattr(act, "__name__", None)
    return None if act is None or name == "linear" else (name or repr(act))


def _output_layer(model: keras.Model) -> keras.layers.Layer:
    if len(model.outputs) != 1:
        raise DareError(f"the model has {len(model.outputs)} outputs; DARE needs a classifier "
                        "with one (the logits)")
    history = getattr(model.outputs[0], "_keras_history", None)
    layer = history[0] if history else model.layers[-1]
    if len(layer._inbound_nodes) != 1:  # a shared layer: its input is ambiguous
        raise DareError(f"the output layer {layer.name!r} is shared (called more than once)")
    return layer


def _to_logits(model: keras.Model) -> tuple[keras.Model, list[str], list[tuple[Any, Any]]]:
    """``model`` with its output as logits from a layer named ``logits``: a softmax output
    (a final ``Softmax``/``Activation("softmax")`` layer, or a final layer with
    ``activation="softmax"``) is stripped, and so is a final ``Activation("linear")``; another
    non-linear output is an error. Returns the model, notes, and (original, copy) pairs of the
    output layer when it had to be copied (renamed or made linear)."""
    notes: list[str] = []
    out_layer = _output_layer(model)
    stripped = []
    while (kind := _trailing(out_layer)) is not None:
        notes.append(f"stripped the {kind} output layer {out_layer.name!r} "
                     f"({type(out_layer).__name__}): the run's models end at its input, the "
                     "logits")
        stripped.append(out_layer)
        prev = out_layer.input._keras_history[0]
        if isinstance(prev, keras.layers.InputLayer) or len(prev._inbound_nodes) != 1:
            raise DareError(f"no single layer computes the logits before the {kind} layer "
                            f"{out_layer.name!r}")
        out_layer = prev
    act = _activation_name(out_layer)
    if isinstance(out_layer, _ACTIVATION_LAYERS) or (act is not None and act != "softmax"):
        what = act or type(out_layer).__name__
        raise DareError(f"the model's output layer {out_layer.name!r} applies {what!r}; DARE "
                        "needs logits (a linear output, optionally followed by a softmax, "
                        "which is stripped)")
    taken = [la for la in model.layers
             if la.name == LOGITS and la is not out_layer and la not in stripped]
    if taken:
        raise DareError(f"the model has a layer named {LOGITS!r} that is not its output layer; "
                        "rename it")
    copies = []
    if act == "softmax" or out_layer.name != LOGITS:
        if act == "softmax":
            notes.append(f"stripped the softmax activation of the output layer "
                         f"{out_layer.name!r}: the run's models output logits")
        config = {**out_layer.get_config(), "name": LOGITS}
        if act == "softmax":
            config["activation"] = "linear"
        copy = type(out_layer).from_config(config)
        outputs = copy(out_layer.input)
        copy.set_weights(out_layer.get_weights())
        copies.append((out_layer, copy))
        if out_layer.name != LOGITS:
            notes.append(f"the output layer {out_layer.name!r} is named {LOGITS!r} in the run "
                         "(slicing walks back to it)")
    else:
        outputs = out_layer.output
    logits = keras.Model(model.inputs[0], outputs, name=model.name)
    return logits, notes, copies


def as_logits(model: keras.Model) -> keras.Model:
    """``model`` ending at its logits (a softmax output stripped; see ``_to_logits``); the
    same object when it already outputs logits from a layer named ``logits``."""
    logits, _, copies = _to_logits(model)
    return model if not copies and logits.outputs[0] is model.outputs[0] else logits


def _check_input(model: keras.Model, dataset: Dataset) -> None:
    if len(model.inputs) != 1:
        raise DareError(f"the model has {len(model.inputs)} inputs; DARE needs one (images)")
    x = model.inputs[0]
    want = dataset.input_shape
    got = tuple(x.shape[1:])
    if len(got) != 3 or any(g is not None and g != w for g, w in zip(got, want, strict=True)):
        hint = ""
        if len(got) == 3 and got == (want[2], want[0], want[1]):
            hint = " (channels-first: the pipeline feeds NHWC images)"
        elif len(got) != 3:
            hint = " (the pipeline feeds NHWC images; put a Flatten/Reshape inside the model)"
        raise DareError(f"the model takes inputs of shape {got} but {dataset.name} images are "
                        f"{want} (float32 pixels in [0, 1], NHWC){hint}")
    if not str(x.dtype).startswith(("float", "bfloat")):
        raise DareError(f"the model takes {x.dtype} inputs; the pipeline feeds float32 pixels "
                        "in [0, 1]")


def _check_output(model: keras.Model, x: np.ndarray, num_classes: int) -> np.ndarray:
    if tuple(model.output.shape[1:]) != (num_classes,):
        raise DareError(f"the model outputs shape {tuple(model.output.shape[1:])}; "
                        f"expected ({num_classes},), one logit per class")
    z = np.asarray(model.predict(x, batch_size=256, verbose=0), dtype=np.float64)
    if not np.all(np.isfinite(z)):
        raise DareError("the model's outputs are not finite on test images")
    if np.all((z >= 0) & (z <= 1)) and np.allclose(z.sum(axis=1), 1.0, atol=1e-3):
        raise DareError("the model's outputs are probabilities (in [0, 1], summing to 1) though "
                        "no softmax output layer was found; DARE needs logits: remove the "
                        "softmax from the model")
    return z


def resolve_trace_layers(model: keras.Model, layers: Sequence[str] | None) -> tuple[str, ...]:
    """``layers`` if given, else ``darekit.slicing.find_trace_layers(model)`` where it exists;
    checked to exist in ``model`` with ``(B, units)`` or ``(B, H, W, C)`` outputs."""
    from darekit import slicing
    from darekit.traces import trace_model

    if not layers:
        find = getattr(slicing, "find_trace_layers", None)
        if find is None:
            raise DareError("pass --layers (comma-separated layer names to slice and trace, "
                            "e.g. the ReLU layers of the last conv block and the FC layers); "
                            "this version cannot find them from the model")
        layers = find(model)
    layers = tuple(layers)
    names = [la.name for la in model.layers]
    missing = [n for n in layers if n not in names]
    if missing:
        raise DareError(f"the model has no layer(s) {missing}; its layers: {', '.join(names)}")
    if len(set(layers)) != len(layers) or not layers:
        raise DareError(f"--layers must name distinct layers; received {list(layers)}")
    trace_model(model, layers)  # the traces must be (B, units) or (B, H, W, C)
    return layers


def import_model(model: keras.Model, dataset: Dataset, *, layers: Sequence[str] | None = None,
                 check_images: int = 500, seed: int = 0, split: Split | None = None,
                 ) -> ImportedModel:
    """Make ``model`` (with its final weights) fit for the pipeline on ``dataset``.

    Checks that it takes ``dataset``'s images ``(B, H, W, C)`` float pixels and outputs
    ``(B, num_classes)``; strips a softmax output; names the logits layer ``logits``;
    resolves ``layers`` (``resolve_trace_layers``); measures clean accuracy on
    ``check_images`` class-balanced test images. Raises ``DareError`` on anything that does
    not fit; near-chance accuracy and a model slicing cannot walk are ``warnings``.

    ``split``: the split the model was trained with (``train_idx``: the images it trained on,
    ``validation_idx``: the held-out images DARE mines and tunes on), checked as
    ``check_split`` does: overlapping indices are an error. Without it, a warning says that
    ``x_validation`` may hold images the model trained on. Warnings go to stderr too.
    """
    from darekit import slicing

    if split is not None:
        check_split(split, len(dataset.y_train))
    _check_input(model, dataset)
    logits, notes, copies = _to_logits(model)
    k = dataset.num_classes
    idx = balanced_subset(dataset.y_test, min(check_images, len(dataset.y_test)), seed)
    x, y = dataset.x_test[idx], dataset.y_test[idx]
    z = _check_output(logits, x, k)
    trace_layers = resolve_trace_layers(logits, layers)
    accuracy = float(np.mean(np.argmax(z, axis=1) == y))
    found = []
    if accuracy < NEAR_CHANCE / k:
        found.append(f"clean accuracy {accuracy:.3f} on {len(y)} {dataset.name} test images is "
                     f"near chance ({1 / k:.3f}): the model may expect other inputs than the "
                     "float32 pixels in [0, 1] (NHWC) every stage feeds it, e.g. [0, 255] or "
                     "its own normalisation; check before going on")
    check = getattr(slicing, "check_sliceable", None)  # where this version of slicing has it
    try:
        if check is not None:
            check(logits, trace_layers)
    except DareError as e:
        found.append(f"dare/nnslicer.py cannot slice this model ({e}); dare/dare-s.py and "
                     "dare/dare-sl.py need no slice")
    if split is None:
        found.append(NO_SPLIT_WARNING.format(dataset=dataset.name))
    for message in found:
        _warn(message)
    return ImportedModel(logits, model, trace_layers, accuracy, len(y), notes, found, copies)


# --------------------------------------------------------------------------- the split
NO_SPLIT_WARNING = (
    "no split given: the {dataset} images the model trained on are unknown, and "
    "x_validation (which DARE mines and fine-tunes on) may hold some of them; pass the split "
    "the model was trained with (train_idx: the images it trained on, validation_idx: held "
    "out)")


def check_split(split: Split, n_train: int, where: str = "the split") -> Split:
    """``split`` checked against a training set of ``n_train`` images: 1-D integer indices in
    range, no repeats, both non-empty, and no index in both ``train_idx`` and
    ``validation_idx`` (an image the model trained on would be DARE's held-out data).
    Raises ``DareError`` naming ``where``; returns ``split``."""
    for key in ("train_idx", "validation_idx"):
        a = np.asarray(getattr(split, key))
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) or len(a) == 0:
            raise DareError(f"{key} in {where} must be a non-empty 1-D integer array; "
                            f"received {a.dtype}{a.shape}")
        if a.min() < 0 or a.max() >= n_train:
            raise DareError(f"{key} in {where} holds indices outside 0..{n_train - 1}, the "
                            "original training set")
        if len(np.unique(a)) != len(a):
            raise DareError(f"{key} in {where} repeats indices")
    both = np.intersect1d(split.train_idx, split.validation_idx)
    if both.size:
        raise DareError(f"train_idx and validation_idx in {where} overlap ({both.size} "
                        f"indices, e.g. {both[:5].tolist()}): x_validation must hold no image "
                        "the model trained on")
    return split


def read_split(path: str | os.PathLike, n_train: int, seed: int) -> Split:
    """A split from an ``.npz`` with ``train_idx`` and ``validation_idx`` (``seed`` and
    ``subset`` optional, as ``Split.save`` writes them), checked against a training set of
    ``n_train`` images: 1-D integer indices in range, no repeats, disjoint, both non-empty."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DareError(f"split file {path} does not exist")
    try:
        z = io.read_npz(path)
    except Exception as e:
        raise DareError(f"cannot read split file {path}: {_first_line(e)}") from None
    missing = [k for k in ("train_idx", "validation_idx") if k not in z]
    if missing:
        raise DareError(f"split file {path} has no {' or '.join(missing)} (it has "
                        f"{sorted(z)})")
    subset = int(z["subset"]) if "subset" in z else -1
    split = Split(z["train_idx"], z["validation_idx"],
                  seed=int(z["seed"]) if "seed" in z else seed,
                  subset=None if subset < 0 else subset)
    check_split(split, n_train, str(path))
    return Split(*(np.sort(a.astype(np.int64)) for a in (split.train_idx,
                                                         split.validation_idx)),
                 seed=split.seed, subset=split.subset)


# --------------------------------------------------------------------------- the run
def _target(cfg: ImportConfig) -> Path:
    path = Path(cfg.run_dir).expanduser() if cfg.run_dir else \
        default_run_dir(cfg.dataset, IMPORTED, cfg.seed)
    path = path.resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        what = "holds a run" if (path / layout.CONFIG).is_file() else "is not empty"
        raise DareError(f"{path} {what}; choose another --run-dir")
    return path


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def import_history(cfg: ImportConfig, log: Callable[[str], Any] = print) -> Run:
    """Create a run directory from ``cfg.model`` and the checkpoints in ``cfg.history``.

    Everything is checked (checkpoint names, the model, every checkpoint's fit, the split)
    before the run directory appears; it is built under a temporary sibling name and renamed
    into place. Notes go to ``log``, warnings to stderr. Returns the opened run.
    """
    checkpoints = find_checkpoints(cfg.history)
    target = _target(cfg)
    io.check_writable(target.parent, "folder of the new run")  # before any work
    dataset = load_dataset(cfg.dataset)
    source = load_source_model(cfg.model)
    given = [w.copy() for w in source.get_weights()]
    load_checkpoint(source, checkpoints[-1])
    final_differs = len(given) != len(source.get_weights()) or not all(
        np.array_equal(a, b) for a, b in zip(given, source.get_weights(), strict=False))
    if cfg.split:
        split = read_split(cfg.split, len(dataset.y_train), cfg.seed)
        log(f"split: {cfg.split} ({len(split.train_idx)} x_train, "
            f"{len(split.validation_idx)} x_validation)")
    else:
        split = make_split(dataset.y_train, cfg.seed)
    # The split is passed (made or read): import_model's own no-split warning would repeat the
    # one below. import_model prints its warnings; an error there stays the only line.
    imported = import_model(source, dataset, layers=cfg.layers or None,
                            check_images=cfg.check_images, seed=cfg.seed, split=split)
    del given
    if not cfg.split:
        _warn(f"no --split: created a seeded stratified 50/50 split of the {dataset.name} "
              f"training set (seed {cfg.seed}). The model may have been trained on images "
              "that are now in x_validation, which DARE mines and fine-tunes on; pass --split "
              "with the indices the model was trained on (train_idx) and held out "
              "(validation_idx)")
    for note in imported.notes:
        log(note)
    if final_differs:
        log(f"the weights in {cfg.model} differ from the last checkpoint "
            f"({checkpoints[-1].path.name}); the run's final model is the last checkpoint")

    train_cfg = {
        "model": IMPORTED, "dataset": cfg.dataset, "seed": cfg.seed,
        "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes,
        "epochs": checkpoints[-1].epoch, "history_epochs": [c.epoch for c in checkpoints],
        "trace_layers": list(imported.trace_layers), "dare_lr": cfg.dare_lr,
        "architecture_file": layout.ARCHITECTURE,
        "source_model": str(Path(cfg.model).expanduser().resolve()),
        "source_history": str(Path(cfg.history).expanduser().resolve()),
        "source_checkpoints": [c.path.name for c in checkpoints],
        "split": str(Path(cfg.split).expanduser().resolve()) if cfg.split else None,
        "n_train": len(split.train_idx), "n_validation": len(split.validation_idx),
        "notes": imported.notes, "warnings": imported.warnings,
        "clean_accuracy": {"images": imported.check_images, "accuracy": imported.accuracy},
        "import": asdict(cfg),
    }
    for stale in target.parent.glob(f".{target.name}{io.TMP_MARK}*"):  # of a killed import
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}{io.TMP_MARK}{os.getpid()}")
    try:
        _write_run(tmp, target, imported, checkpoints, split, train_cfg)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.rmdir()  # checked empty above
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mark_latest(target)
    run = Run.open(target)
    log(f"imported {len(checkpoints)} checkpoints (epochs {checkpoints[0].epoch}.."
        f"{checkpoints[-1].epoch}); clean accuracy {imported.accuracy:.4f} on "
        f"{imported.check_images} test images; traced layers {', '.join(run.trace_layers)}")
    return run


def _write_run(tmp: Path, target: Path, imported: ImportedModel,
               checkpoints: Sequence[Checkpoint], split: Split, train_cfg: dict[str, Any]
               ) -> None:
    """Write the run into ``tmp``: split, history, architecture, then config and progress."""
    split.save(tmp / layout.SPLIT)
    logits = imported.model
    for c in checkpoints:
        load_checkpoint(imported.source, c)
        imported.sync()
        io.save_with(tmp / layout.epoch_file(c.epoch), logits.save_weights)
    # The last checkpoint is loaded now: the architecture file carries the final model.
    io.save_with(tmp / layout.ARCHITECTURE, logits.save)
    io.write_json(tmp / layout.CONFIG, {"train": train_cfg, "run": str(target), **provenance()})
    io.write_json(tmp / layout.PROGRESS, {"epoch": checkpoints[-1].epoch})
    # Self-check: the run rebuilds the final model exactly (architecture file + weights).
    x = np.random.default_rng(0).uniform(0, 1, (8, *train_cfg["input_shape"])).astype("float32")
    rebuilt = Run(tmp).load_model()
    if not np.allclose(rebuilt(x, training=False), logits(x, training=False), atol=1e-5):
        raise DareError("the imported run does not reproduce the model's logits; please "
                        "report this with the model file")
