"""Activation traces ("ats"), as SADL's ``get_ats`` computes them.

The trace of a layer is its output for one input, with conv feature maps reduced to one value
per channel (the mean over spatial positions, SADL's ``_aggr_output``); dense outputs are kept
as they are. ``trace_model`` is a Keras model that *shares the classifier's layers* and outputs
these traces: it is DARE's regression model R, and ``get_ats`` is ``trace_model(...).predict``.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

from darekit.errors import DareError


def trace_model(model: keras.Model, layer_names: Sequence[str]) -> keras.Model:
    """A model ``x -> [trace of each layer]`` sharing every layer (and weight) with ``model``.

    Conv outputs ``(B, H, W, C)`` become ``(B, C)`` by a spatial mean (a weightless layer
    named ``<layer>_ats``); dense outputs ``(B, U)`` pass through. Outputs are in the order of
    ``layer_names``.
    """
    outputs = []
    for name in layer_names:
        try:
            out = model.get_layer(name).output
        except ValueError:
            raise DareError(f"model {model.name} has no layer {name!r}") from None
        if len(out.shape) == 4:
            out = keras.layers.GlobalAveragePooling2D(name=f"{name}_ats")(out)
        elif len(out.shape) != 2:
            raise DareError(f"layer {name!r} has output shape {out.shape}; traces need "
                            "(batch, units) or (batch, H, W, channels)")
        outputs.append(out)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, outputs, name=f"{model.name}_traces")


def get_ats(model: keras.Model, x: np.ndarray, layer_names: Sequence[str],
            batch_size: int = 256) -> dict[str, np.ndarray]:
    """Activation traces of ``x`` ``(N, H, W, C)``: ``{layer: (N, units)}`` float32."""
    tm = trace_model(model, layer_names)
    outs = tm.predict(x, batch_size=batch_size, verbose=0)
    if len(layer_names) == 1:
        outs = [outs]
    return {name: np.asarray(o, dtype=np.float32) for name, o in zip(layer_names, outs,
                                                                     strict=True)}


def trace_units(model: keras.Model, layer_names: Sequence[str]) -> dict[str, int]:
    """Number of trace units per layer (channels for conv layers)."""
    return {name: int(model.get_layer(name).output.shape[-1]) for name in layer_names}
