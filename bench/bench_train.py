"""Training throughput: ``darekit.training.train`` (what ``train/train.py`` runs, with its
per-epoch history, optimizer state, log and progress files) against a bare ``model.fit`` of the
same model on the same data, measured side by side in one process.

    python bench/bench_train.py --model alexnet --n 8000 --epochs 4 --repeats 2

Both sides: same architecture, optimizer, batch size and data (the run's ``x_train``), no
augmentation, the same-sized held-out evaluation after every epoch. Images/s are taken over
epochs 2..E (epoch 1 includes graph tracing), from the start of epoch 2 to the end of
training, so every epoch's checkpoint writing is inside. The sides alternate and the medians
are compared. Ratio = ours / bare; the goal is >= 0.97.
"""
import argparse
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import keras  # noqa: E402

from darekit.data import load_dataset, make_split  # noqa: E402
from darekit.models import get_architecture  # noqa: E402
from darekit.models.common import channel_stats  # noqa: E402
from darekit.rundir import RunData  # noqa: E402
from darekit.training import OPTIMIZERS, TrainConfig, train  # noqa: E402


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="alexnet")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--n", type=int, default=8000, help="subset before the 50/50 split")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    cfg0 = TrainConfig.resolve(a.model, a.dataset, subset=a.n, epochs=a.epochs,
                               batch_size=a.batch_size, augment="none", schedule="constant",
                               warmup_epochs=0, test_subset=1000, verbose=0, seed=0)
    dataset = load_dataset(a.dataset)
    data = RunData.from_split(dataset, make_split(dataset.y_train, 0, a.n))
    n = len(data.x_train)
    hold = (data.x_test[:1000], data.y_test[:1000])
    ours, bare = [], []
    for r in range(a.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            clock = EpochClock()
            train(TrainConfig(**{**cfg0.__dict__, "run_dir": f"{tmp}/run"}), callbacks=[clock])
            ours.append(images_per_s(clock, n))

        keras.utils.set_random_seed(0)
        arch = get_architecture(a.model)
        model = arch.build(dataset.input_shape, dataset.num_classes, *channel_stats(data.x_train))
        model.compile(optimizer=OPTIMIZERS[cfg0.optimizer](cfg0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        clock = EpochClock()
        model.fit(data.x_train, data.y_train, batch_size=a.batch_size, epochs=a.epochs,
                  validation_data=hold, validation_batch_size=256, callbacks=[clock], verbose=0)
        bare.append(images_per_s(clock, n))
        print(f"repeat {r + 1}: ours {ours[-1]:.1f} img/s, bare fit {bare[-1]:.1f} img/s")
    o, b = statistics.median(ours), statistics.median(bare)
    print(f"{a.model} on {a.dataset}, {n} images/epoch, batch {a.batch_size}, "
          f"epochs 2..{a.epochs}, {a.repeats} repeats")
    print(f"train.py (history + state + log per epoch): {o:.1f} img/s")
    print(f"bare model.fit:                            {b:.1f} img/s")
    print(f"ratio ours / bare: {o / b:.3f}  (goal >= 0.97)")


if __name__ == "__main__":
    main()
