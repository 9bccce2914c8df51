"""``smallcnn``: a two-block CNN for tests and quick CPU runs (not one of the paper's models).

Same conventions as the paper's architectures (sequential, named layers, ``logits``), so every
stage of the pipeline runs on it in seconds. About 0.42M parameters on 28x28x1 inputs.
"""

from __future__ import annotations

import keras
from keras import layers

from darekit.models import Architecture, register
from darekit.models.common import batch_norm, input_block


def build_smallcnn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    inputs, x = input_block(input_shape, min_size=0)  # any size >= 8 works; no padding
    for b, width in enumerate((32, 64), start=1):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{b}_conv1")(x)
        x = batch_norm(f"block{b}_bn1")(x)
        x = layers.ReLU(name=f"block{b}_relu1")(x)
        x = layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, name="fc1")(x)
    x = layers.ReLU(name="fc1_relu")(x)
    x = layers.Dropout(0.3, name="fc1_drop")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="smallcnn")


register(Architecture(
    name="smallcnn",
    builder=build_smallcnn,
    trace_layers=("block2_relu1", "fc1_relu"),
    # DARE trained stably from 1e-4 to 1e-3 and diverged at 1e-2 (DARE-S up to 0.1).
    dare_lr=3e-4,
    # Adam converges in a handful of epochs on Fashion-MNIST subsets, which is what tests need.
    train_defaults={"epochs": 10, "batch_size": 64, "optimizer": "adam", "lr": 1e-3,
                    "weight_decay": 0.0, "schedule": "constant", "augment": "none"},
))
