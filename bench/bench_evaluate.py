"""Evaluation overhead: our attack path (``darekit.attacks.run_attack``, what ``dare/test.py``
calls for every attack, with its batching, norm bookkeeping and clean-accuracy pass) against
calling Foolbox directly on the same model, images, attack and budget.

    python bench/bench_evaluate.py --model alexnet --n 512 --attack pgd --repeats 3

Both sides use the same ``fb.TensorFlowModel`` over the same compiled inference call, the same
batch size and the same attack object parameters. Times are medians after one warm-up call.
Ratio = ours / direct Foolbox; the goal is <= 1.05.
"""
import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from darekit.attacks import foolbox_model, get_spec, run_attack  # noqa: E402
from darekit.data import load_dataset  # noqa: E402
from darekit.models import get_architecture  # noqa: E402
from darekit.models.common import channel_stats  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: tracing
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="alexnet")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--attack", default="pgd")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    ds = load_dataset("fashion_mnist")
    x, y = ds.x_test[: a.n], ds.y_test[: a.n]
    model = get_architecture(a.model).build(ds.input_shape, 10, *channel_stats(ds.x_train[:5000]))
    spec = get_spec(a.attack)
    eps = None if spec.kind == "minimization" else a.eps

    def ours():
        run_attack(model, x, y, spec, eps=eps, batch_size=a.batch_size, seed=0, progress=False)

    fmodel = foolbox_model(model)
    attack = spec.build()

    def direct():
        tf.random.set_seed(0)
        for i in range(0, len(x), a.batch_size):
            xb = tf.constant(x[i:i + a.batch_size])
            yb = tf.constant(y[i:i + a.batch_size], tf.int64)
            _, clipped, success = attack(fmodel, xb, yb, epsilons=[eps])
            np.asarray(clipped[0]), np.asarray(success)

    t_direct = median_time(direct, a.repeats)
    t_ours = median_time(ours, a.repeats)
    print(f"{a.attack} (eps {eps}) on {a.n} Fashion-MNIST test images, {a.model}, "
          f"batch {a.batch_size}, median of {a.repeats}")
    print(f"direct Foolbox: {t_direct:.2f} s ({a.n / t_direct:.1f} img/s)")
    print(f"run_attack:     {t_ours:.2f} s ({a.n / t_ours:.1f} img/s)")
    print(f"ratio ours / direct: {t_ours / t_direct:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
