"""ResNet18 for 32x32 inputs (Kuang Liu's pytorch-cifar ResNet18; not in the DARE paper).

3x3 stem conv (64, stride 1) -> BN -> ReLU; four stages of two BasicBlocks with 64/128/256/512
channels and strides 1/2/2/2; a BasicBlock is conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the
identity (or ``1x1 conv (stride) -> BN`` when the shape changes), ``Add``, ``ReLU``. Then global
average pooling and ``Dense(num_classes)`` (logits). Convs have no bias. Fashion-MNIST is padded
to 32x32.

Parameters on (32, 32, 3), 10 classes: 11,183,569 in Keras (BN moving statistics and the 7
normalisation weights -- mean, variance, count -- included); the PyTorch reference counts
11,173,962 without them.

Layer names: ``stem_conv/bn/relu``; ``stage{s}_block{b}_conv1/bn1/relu1/conv2/bn2``,
``stage{s}_block{b}_shortcut_conv/bn``, ``stage{s}_block{b}_add``, ``stage{s}_block{b}_out``
(the block's final ReLU); ``avg_pool``; ``logits``.

Sliced and traced layers: the outputs of the last stage's blocks, ``stage4_block1_out`` and
``stage4_block2_out`` (512 channels at 4x4), what ``darekit.slicing.find_trace_layers`` finds
(the ReLU after each ``Add`` at the final resolution; no hidden Dense layer). The contribution
analysis walks the residual graph: ``Add``, ``GlobalAveragePooling2D`` and the strided convs
all have exact rules.
"""

from __future__ import annotations

import keras
from keras import layers

from darekit.models import Architecture, register
from darekit.models.common import batch_norm, input_block

STAGES: tuple[tuple[int, int], ...] = ((64, 1), (128, 2), (256, 2), (512, 2))
BLOCKS_PER_STAGE = 2


def _basic_block(x, filters: int, stride: int, prefix: str):
    in_filters = x.shape[-1]
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                      name=f"{prefix}_conv1")(x)
    y = batch_norm(f"{prefix}_bn1")(y)
    y = layers.ReLU(name=f"{prefix}_relu1")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{prefix}_conv2")(y)
    y = batch_norm(f"{prefix}_bn2")(y)
    shortcut = x
    if stride != 1 or in_filters != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                 name=f"{prefix}_shortcut_conv")(x)
        shortcut = batch_norm(f"{prefix}_shortcut_bn")(shortcut)
    y = layers.Add(name=f"{prefix}_add")([y, shortcut])
    return layers.ReLU(name=f"{prefix}_out")(y)


def build_resnet18(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    inputs, x = input_block(input_shape, min_size=32)
    x = layers.Conv2D(64, 3, padding="same", use_bias=False, name="stem_conv")(x)
    x = batch_norm("stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for s, (filters, stride) in enumerate(STAGES, start=1):
        for b in range(1, BLOCKS_PER_STAGE + 1):
            x = _basic_block(x, filters, stride if b == 1 else 1, f"stage{s}_block{b}")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="resnet18")


# Why: pytorch-cifar's classic recipe (SGD 0.1, momentum 0.9, wd 5e-4, x0.1 at epochs 100/150,
# 200 epochs, crop+flip), which reaches ~93-95% on full CIFAR-10.
RESNET_TRAIN_DEFAULTS = {
    "epochs": 200,
    "batch_size": 128,
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 5e-4,
    "schedule": "step",
    "milestones": (100, 150),
    "gamma": 0.1,
    "augment": "crop-flip",
    "warmup_epochs": 0,
}

# dare_lr 0.01: our choice (the paper has no ResNet), between AlexNet's 0.03 and the default for
# models outside the registry (DEFAULT_DARE_LR); a BN net trained with SGD like AlexNet.
register(Architecture(
    name="resnet18",
    builder=build_resnet18,
    trace_layers=tuple(f"stage{len(STAGES)}_block{b}_out"
                       for b in range(1, BLOCKS_PER_STAGE + 1)),
    dare_lr=0.01,  # untested at scale (AlexNet 0.03, smallcnn 3e-4)
    train_defaults=dict(RESNET_TRAIN_DEFAULTS),
    paper_params=11_173_962,
))
