"""The architecture registry: ``ARCHITECTURES[name]`` builds a Keras model and declares, once,
the names of the layers that slicing and activation traces use.

Every model built here
- takes pixels in [0, 1], NHWC;
- zero-pads 28x28 inputs to 32x32 where the architecture needs it (layer ``pad``), then
  normalises per channel (layer ``normalize``, Keras' ``Normalization``, statistics of
  ``x_train``);
- outputs **logits** from a Dense layer named ``logits`` (softmax lives only in the loss),
  computed in float32 even when built under a mixed-precision dtype policy
  (``float32_logits``: the loss and its gradient start from float32 logits);
- is made of Keras' built-in layers only, so its ``.keras`` file loads without darekit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from darekit.errors import DareError
from darekit.models.common import NORMALIZE, set_normalization

LOGITS = "logits"
"""Name of the final Dense layer of every registered architecture (outputs logits)."""

DEFAULT_DARE_LR = 1e-3
"""DARE's learning rate for a model that is not in the registry (an imported one, the notebook
API): the largest rate at which every architecture measured here trained stably (smallcnn
1e-4..1e-3, AlexNet 1e-4..0.1, with the regression loss averaged over the slice; quick
scale). The story, in one place: each registered architecture has one measured default
(``Architecture.dare_lr``: AlexNet 0.03, smallcnn 3e-4; VGG and ResNet 0.01, untested at
scale); ``dare/dare.py`` uses the run's (an imported run records this one, or its
``--dare-lr``); the study profiles try each default times 0.1, 1 and 10 and keep the best on
held-out images (``darekit.tuning``). A rate that leaves the weights where they are is a
``no-op`` run and not a result."""


@dataclass(frozen=True)
class Architecture:
    """One registered architecture.

    Attributes:
        name: registry key (``vgg16``...).
        builder: ``builder(input_shape, num_classes) -> keras.Model``, starting with
            ``common.input_block`` (optional ``pad``, then ``normalize``).
        trace_layers: names of the layers whose outputs are the "neurons" that slicing and
            activation traces use (post-activation outputs; conv layers count channels).
        dare_lr: DARE's default fine-tuning learning rate for this architecture (measured;
            see ``DEFAULT_DARE_LR`` for the rates' story).
        train_defaults: ``TrainConfig`` field overrides that reproduce the paper's accuracy on
            a GPU (see ``darekit.training``).
        paper_params: parameter count the paper reports on CIFAR-10 shapes (None if not given).
    """

    name: str
    builder: Callable[[tuple[int, int, int], int], keras.Model]
    trace_layers: tuple[str, ...]
    dare_lr: float
    train_defaults: Mapping[str, Any] = field(default_factory=dict)
    paper_params: int | None = None

    def build(self, input_shape: tuple[int, int, int], num_classes: int,
              mean: np.ndarray | None = None, std: np.ndarray | None = None) -> keras.Model:
        """Build the model; ``mean``/``std`` ``(C,)`` (per channel) set the normalisation layer
        (default: mean 0, std 1, as before any statistics are loaded)."""
        model = float32_logits(self.builder(tuple(input_shape), int(num_classes)))
        if mean is not None or std is not None:
            set_normalization(model.get_layer(NORMALIZE), mean, std)
        return model


def copy_weights(source: keras.Model, target: keras.Model) -> keras.Model:
    """Give ``target`` the weights of ``source`` (same architecture); return ``target``.
    Layers holding tensors derived from their weights (``Normalization``) refresh them, as
    they do after ``load_weights``."""
    target.set_weights(source.get_weights())
    for layer in target.layers:
        finalize = getattr(layer, "finalize_state", None)
        if finalize is not None:
            finalize()
    return target


def float32_logits(model: keras.Model) -> keras.Model:
    """``model``, or under a mixed-precision policy a copy whose ``logits`` layer computes in
    float32 (the other layers keep the policy; every variable is float32 either way).

    Why: with float16 logits the softmax cross-entropy and its gradient lose precision (and can
    overflow); Keras' mixed-precision guide keeps the last layer in float32. The builders create
    every layer under the global policy, so the graph is cloned with that one layer's dtype
    changed, and the weights copied (a mixed model starts from the float32 one's values).
    """
    try:
        logits = model.get_layer(LOGITS)
    except ValueError:
        return model
    if logits.compute_dtype == "float32":
        return model

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if layer.name == LOGITS:
            config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    return copy_weights(model, keras.models.clone_model(model, clone_function=clone))


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    if arch.name in ARCHITECTURES:
        raise ValueError(f"architecture {arch.name!r} registered twice")
    ARCHITECTURES[arch.name] = arch
    return arch


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise DareError(f"unknown model {name!r}; "
                        f"expected one of {sorted(ARCHITECTURES)}") from None


# Importing the modules fills the registry (each calls ``register`` once).
from darekit.models import alexnet, resnet, small, vgg  # noqa: E402,F401
