"""VGG16 and VGG19 for 32x32 inputs (CIFAR-10, SVHN; Fashion-MNIST is padded to 32x32).

Follows the first author's earlier Keras VGG (research/dare-paper.md section 9.2): every conv is
``Conv2D(3x3, same, no bias)`` -> ``BatchNormalization`` -> ``ReLU``; ``M`` is a 2x2 max-pool;
after the fifth pool the 1x1x512 map is flattened and fed to two ``Dense(4096)`` -> ``ReLU`` ->
``Dropout(0.5)`` layers, then ``Dense(num_classes)`` (logits). The graph is a strict chain.

Parameters on (32, 32, 3), 10 classes (Keras counts BN moving statistics and the 7
normalisation weights -- mean, variance, count -- too): VGG16 33,650,897 (paper 33.6M), VGG19
38,964,433 (paper 39.0M). Fashion-MNIST (padded) differs only by conv1's input channels:
33,649,741 and 38,963,277.
"""

from __future__ import annotations

import keras
from keras import layers

from darekit.models import Architecture, register
from darekit.models.common import batch_norm, input_block

# Per block: the conv widths; a 2x2 max-pool closes every block.
CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}
FC_WIDTH = 4096
DROPOUT = 0.5


def build_vgg(config: tuple[tuple[int, ...], ...], input_shape: tuple[int, int, int],
              num_classes: int, name: str) -> keras.Model:
    inputs, x = input_block(input_shape, min_size=32)
    for b, widths in enumerate(config, start=1):
        for i, filters in enumerate(widths, start=1):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                              name=f"block{b}_conv{i}")(x)
            x = batch_norm(f"block{b}_bn{i}")(x)
            x = layers.ReLU(name=f"block{b}_relu{i}")(x)
        x = layers.MaxPooling2D(2, strides=2, name=f"block{b}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    for j in (1, 2):
        x = layers.Dense(FC_WIDTH, name=f"fc{j}")(x)
        x = layers.ReLU(name=f"fc{j}_relu")(x)
        x = layers.Dropout(DROPOUT, name=f"fc{j}_drop")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def _trace_layers(config: tuple[tuple[int, ...], ...]) -> tuple[str, ...]:
    """Post-ReLU outputs of the last conv block, then of the two hidden Dense layers."""
    b = len(config)
    convs = tuple(f"block{b}_relu{i}" for i in range(1, len(config[-1]) + 1))
    return convs + ("fc1_relu", "fc2_relu")


# Why: the earlier repo's recipe (section 9.2): SGD with momentum 0.9, Nesterov, weight decay
# 5e-4, step schedule x0.2 at epochs 60/120/160 with a one-epoch warm-up. Base LR 0.05 rather
# than its 0.1 is our (conservative) choice for a plain, non-residual net; not yet validated on a
# GPU. Crop+flip is the standard CIFAR augmentation, aimed at the paper's 88.7%/90.6%.
VGG_TRAIN_DEFAULTS = {
    "epochs": 200,
    "batch_size": 128,
    "optimizer": "sgd",
    "lr": 0.05,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "schedule": "step",
    "milestones": (60, 120, 160),
    "gamma": 0.2,
    "augment": "crop-flip",
    "warmup_epochs": 1,
}

# dare_lr: the artifact's "lr_rate is mostly set to 10e-7" for VGG (research/dare-paper.md
# section 9.6) is a rate for a summed regression loss; this package averages the loss over the
# slice, where 1e-7 would leave the weights where they are (docs/method.md, Stage 3).
for _name, _paper in (("vgg16", 33_600_000), ("vgg19", 39_000_000)):
    register(Architecture(
        name=_name,
        builder=lambda shape, n, _c=CONFIGS[_name], _n=_name: build_vgg(_c, shape, n, _n),
        trace_layers=_trace_layers(CONFIGS[_name]),
        dare_lr=0.01,  # untested at scale (AlexNet 0.03, smallcnn 3e-4)
        train_defaults=dict(VGG_TRAIN_DEFAULTS),
        paper_params=_paper,
    ))
