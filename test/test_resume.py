"""A resumed run equals an uninterrupted one, bit for bit (issue 16, item 3).

Training is interrupted inside epoch ``K + 1`` (a callback raises ``KeyboardInterrupt``, as
Ctrl-C does), so ``K`` epochs are complete; ``--resume`` then finishes it. Every weight, the
optimizer's state and the log must equal those of a run that never stopped. The tiny network
has every kind of state a resume must carry: batch norm's moving statistics, dropout (whose
seed generator advances every step), SGD momentum and the optimizer's step counter, and the
input pipeline's shuffle and crop-flip augmentation. Runs on either backend (deterministic ops:
TF's op determinism; JAX on a CPU is deterministic).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from darekit import io, layout
from darekit.adv_training import AdvTrainConfig, adv_train
from darekit.models import ARCHITECTURES, Architecture, register
from darekit.models.common import batch_norm, input_block
from darekit.rundir import Run
from darekit.training import TrainConfig, train

TINY = "tinycnn_resume_test"
EPOCHS, K = 3, 1
COMMON = dict(subset=96, test_subset=20, epochs=EPOCHS, batch_size=16, optimizer="sgd",
              lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, augment="crop-flip",
              schedule="constant", verbose=0, seed=0, deterministic=True)


def build_tiny(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """conv -> BN -> ReLU -> pool -> dropout -> dense -> dropout -> logits."""
    inputs, x = input_block(input_shape, min_size=0)
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(x)
    x = keras.layers.ReLU(name="relu")(batch_norm("bn")(x))
    x = keras.layers.MaxPooling2D(4, name="pool")(x)
    x = keras.layers.Dropout(0.3, name="drop1")(keras.layers.Flatten(name="flatten")(x))
    x = keras.layers.ReLU(name="fc_relu")(keras.layers.Dense(16, name="fc")(x))
    x = keras.layers.Dropout(0.3, name="drop2")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="logits")(x), name=TINY)


@pytest.fixture
def tiny():
    if TINY not in ARCHITECTURES:
        register(Architecture(TINY, build_tiny, ("relu", "fc_relu"), dare_lr=1e-2))
    yield TINY
    ARCHITECTURES.pop(TINY, None)


class CtrlC(keras.callbacks.Callback):
    """Raises ``KeyboardInterrupt`` after the second batch of the 0-based ``epoch``."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch, self._current = epoch, -1

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._current == self.epoch and batch == 1:
            raise KeyboardInterrupt


def _same_run(resumed: Run, straight: Run) -> None:
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(io.read_csv(resumed.file(layout.TRAIN_LOG))) == \
        drop(io.read_csv(straight.file(layout.TRAIN_LOG)))
    assert resumed.history_epochs() == straight.history_epochs() == list(range(1, EPOCHS + 1))
    for epoch in range(K + 1, EPOCHS + 1):
        a, b = resumed.load_model(epoch).get_weights(), straight.load_model(epoch).get_weights()
        assert len(a) == len(b)
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            np.testing.assert_array_equal(u, v, err_msg=f"epoch {epoch}, weight {i}")
    oa = io.read_npz(resumed.file(layout.OPTIMIZER))
    ob = io.read_npz(straight.file(layout.OPTIMIZER))
    assert sorted(oa) == sorted(ob)
    for k in oa:
        np.testing.assert_array_equal(oa[k], ob[k], err_msg=k)


def test_interrupted_then_resumed_training_equals_uninterrupted(tmp_path, tiny):
    straight = tmp_path / "straight"
    train(TrainConfig.resolve(tiny, "fashion_mnist", run_dir=str(straight), **COMMON))
    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig.resolve(tiny, "fashion_mnist", run_dir=str(stopped), **COMMON),
              callbacks=[CtrlC(K)])
    assert Run(stopped).completed_epochs() == K
    train(TrainConfig.from_options({"run_dir": str(stopped), "resume": True}))
    _same_run(Run(stopped), Run(straight))


def test_interrupted_then_resumed_pgd_training_equals_uninterrupted(tmp_path, tiny):
    """PGD adversarial training: its random starts come from (seed, optimizer step), and the
    robust accuracy logged per epoch must agree too."""
    pgd = dict(steps=2)
    straight = tmp_path / "straight"
    adv_train(AdvTrainConfig.resolve(tiny, "fashion_mnist", run_dir=str(straight), **pgd,
                                     **COMMON))
    stopped = tmp_path / "stopped"
    cfg = AdvTrainConfig.resolve(tiny, "fashion_mnist", run_dir=str(stopped), **pgd, **COMMON)
    from darekit import adv_training, training

    with pytest.raises(KeyboardInterrupt):
        training.train(cfg.train, wrap_model=lambda m: adv_training.PGDTrainer.wrap(
            m, cfg.pgd, cfg.train.seed), callbacks=lambda x, y: [
            adv_training.RobustEval(x, y, cfg.pgd, 256, cfg.train.seed), CtrlC(K)],
            extra_config={"pgd": {"eps": cfg.pgd.eps, "steps": cfg.pgd.steps,
                                  "step_size": cfg.pgd.step_size,
                                  "random_start": cfg.pgd.random_start}})
    assert Run(stopped).completed_epochs() == K
    adv_train(AdvTrainConfig.from_options({"run_dir": str(stopped), "resume": True}))
    _same_run(Run(stopped), Run(straight))
