"""Training throughput: ``darekit.training.train`` (what ``train/train.py`` runs, with its
per-epoch history, optimizer state, log and progress files) against a bare ``model.fit`` of the
same model on the same data, measured side by side in one process, for each speed option.

    python bench/bench_train.py --model alexnet --n 8000 --epochs 4 --repeats 2
    python bench/bench_train.py --variants train,devices,bf16    # a selection

Variants (each a ``train()`` run; ratio = its images/s over the bare fit's):

- ``train``: the defaults (float32, one device, no augmentation): the checkpointing overhead;
- ``devices``: ``--devices CPU:0,CPU:1``, data-parallel ``MirroredStrategy`` over two logical
  CPU devices of the same cores (what the strategy costs: all-reduces, synchronised batch norm,
  split batches; on a CPU it cannot gain anything);
- ``bf16`` / ``fp16``: ``--precision mixed_bfloat16`` / ``mixed_float16`` (on a CPU these
  measure the kernels' 16-bit support, not a GPU's tensor cores);
- ``xla``: ``--jit-compile``;
- ``augment``: ``--augment crop-flip`` through the NumPy pipeline (``train_dataset``: one
  fancy index per batch, prepared ahead on threads, the same on both backends).

This benchmark runs on TensorFlow (the ``devices`` variant needs its logical CPU devices);
``bench/gpu.py`` measures ``train()`` against a bare fit on either backend.

Both sides: same architecture, optimizer, batch size and data (the run's ``x_train``), the
same-sized held-out evaluation after every epoch. Images/s are taken over epochs 2..E (epoch 1
includes graph tracing), from the start of epoch 2 to the end of training, so every epoch's
checkpoint writing is inside. The sides alternate and the medians are compared. The goal for
``train`` is >= 0.97.
"""
import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import tensorflow as tf

# Two logical CPU devices for the ``devices`` variant: TensorFlow accepts them only before it
# starts. They share the machine's cores and thread pools; one-device runs use CPU:0 as before.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import keras  # noqa: E402

from darekit.data import load_dataset, make_split  # noqa: E402
from darekit.models import get_architecture  # noqa: E402
from darekit.models.common import channel_stats  # noqa: E402
from darekit.rundir import RunData  # noqa: E402
from darekit.training import OPTIMIZERS, TrainConfig, train  # noqa: E402

VARIANTS = {
    "train": {},
    "devices": {"devices": "CPU:0,CPU:1"},
    "bf16": {"precision": "mixed_bfloat16"},
    "fp16": {"precision": "mixed_float16"},
    "xla": {"jit_compile": True},
    "augment": {"augment": "crop-flip"},
}


class EpochClock(keras.callbacks.Callback):
    """Timestamps at the start of every epoch and at the end of training: each interval holds
    one epoch and everything its callbacks did afterwards (checkpoint writing included)."""

    def __init__(self):
        super().__init__()
        self.stamps: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.stamps.append(time.perf_counter())

    def on_train_end(self, logs=None):
        self.stamps.append(time.perf_counter())


def images_per_s(clock: EpochClock, n: int) -> float:
    """Over epochs 2..E (epoch 1 includes graph tracing)."""
    s = clock.stamps[1:]
    return n * (len(s) - 1) / (s[-1] - s[0])


def run_variant(name: str, cfg0: TrainConfig, tmp: str) -> float:
    cfg = TrainConfig(**{**cfg0.__dict__, **VARIANTS[name], "run_dir": f"{tmp}/{name}"})
    clock = EpochClock()
    train(cfg, callbacks=[clock])
    return clock


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="alexnet")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--n", type=int, default=8000, help="subset before the 50/50 split")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of {','.join(VARIANTS)}")
    a = p.parse_args()
    names = [v for v in a.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}")

    cfg0 = TrainConfig.resolve(a.model, a.dataset, subset=a.n, epochs=a.epochs,
                               batch_size=a.batch_size, augment="none", schedule="constant",
                               warmup_epochs=0, test_subset=1000, verbose=0, seed=0)
    dataset = load_dataset(a.dataset)
    data = RunData.from_split(dataset, make_split(dataset.y_train, 0, a.n))
    n = len(data.x_train)
    hold = (data.x_test[:1000], data.y_test[:1000])
    load0 = os.getloadavg()
    results: dict[str, list[float]] = {v: [] for v in ["bare", *names]}
    for r in range(a.repeats):
        keras.utils.set_random_seed(0)
        arch = get_architecture(a.model)
        model = arch.build(dataset.input_shape, dataset.num_classes, *channel_stats(data.x_train))
        model.compile(optimizer=OPTIMIZERS[cfg0.optimizer](cfg0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        clock = EpochClock()
        model.fit(data.x_train, data.y_train, batch_size=a.batch_size, epochs=a.epochs,
                  validation_data=hold, validation_batch_size=256, callbacks=[clock], verbose=0)
        results["bare"].append(images_per_s(clock, n))
        line = [f"bare {results['bare'][-1]:.1f}"]
        for name in names:
            with tempfile.TemporaryDirectory() as tmp:
                results[name].append(images_per_s(run_variant(name, cfg0, tmp), n))
            line.append(f"{name} {results[name][-1]:.1f}")
        print(f"repeat {r + 1} (img/s): " + ", ".join(line), flush=True)
    load1 = os.getloadavg()
    b = statistics.median(results["bare"])
    print(f"{a.model} on {a.dataset}, {n} images/epoch, batch {a.batch_size}, "
          f"epochs 2..{a.epochs}, {a.repeats} repeats, {os.cpu_count()} CPUs; load average "
          f"{load0[0]:.1f} at start, {load1[0]:.1f} at end")
    print(f"{'variant':18s} {'img/s':>8s} {'ratio to bare fit':>18s}")
    print(f"{'bare model.fit':18s} {b:8.1f} {1:18.3f}")
    for name in names:
        o = statistics.median(results[name])
        print(f"{name:18s} {o:8.1f} {o / b:18.3f}")


if __name__ == "__main__":
    main()
