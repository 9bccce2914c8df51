"""The architecture registry: ``ARCHITECTURES[name]`` builds a Keras model and declares, once,
the names of the layers that slicing and activation traces use.

Every model built here
- takes pixels in [0, 1], NHWC;
- zero-pads 28x28 inputs to 32x32 where the architecture needs it (layer ``pad``), then
  normalises per channel (layer ``normalize``, Keras' ``Normalization``, statistics of
  ``x_train``);
- outputs **logits** from a Dense layer named ``logits`` (softmax lives only in the loss);
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


@dataclass(frozen=True)
class Architecture:
    """One registered architecture.

    Attributes:
        name: registry key (``vgg16``...).
        builder: ``builder(input_shape, num_classes) -> keras.Model``, starting with
            ``common.input_block`` (optional ``pad``, then ``normalize``).
        trace_layers: names of the layers whose outputs are the "neurons" that slicing and
            activation traces use (post-activation outputs; conv layers count channels).
        dare_lr: DARE's default fine-tuning learning rate for this architecture.
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
        model = self.builder(tuple(input_shape), int(num_classes))
        if mean is not None or std is not None:
            set_normalization(model.get_layer(NORMALIZE), mean, std)
        return model


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
