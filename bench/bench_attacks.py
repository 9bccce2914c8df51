"""Cost of PGD adversarial training and speed of our compiled PGD, measured side by side.

    python bench/bench_attacks.py --model smallcnn --n 4096 --repeats 3

(a) one PGD-7 adversarial-training epoch (``PGDTrainer``, the attack inside Keras' compiled
    train step) over one clean training epoch of the same architecture, data, batch and
    optimizer (the brief's floor 8 = 1 + 7 forward/backward passes, if an attack step cost a
    training step; goal <= 8.5). Measured below it on CPU: an attack step runs in inference
    mode and back-propagates to the input only (no weight gradients, no optimizer update);
(b) our compiled PGD (``adv_training.pgd_function``) against Foolbox's ``LinfPGD`` at equal
    settings (eps, 7 steps of eps/4, random start), images/s, on the same images and model,
    with both robust accuracies as a strength check.

Real Fashion-MNIST images, untrained-then-briefly-trained weights do not matter for timing.
Each timing is the median of ``--repeats`` after one warm-up (tracing excluded).
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root: see README

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: tracing and first-call allocation
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--n", type=int, default=4096, help="training images")
    p.add_argument("--n-attack", type=int, default=1024, help="images attacked in (b)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import keras
    import tensorflow as tf

    from darekit import attacks as A
    from darekit.adv_training import PGDConfig, PGDTrainer, pgd_function
    from darekit.data import load_dataset
    from darekit.models import get_architecture
    from darekit.models.common import channel_stats
    from darekit.seeding import set_seed

    set_seed(0)
    ds = load_dataset("fashion_mnist")
    x, y = ds.x_train[:args.n], ds.y_train[:args.n]
    pgd = PGDConfig(eps=args.eps, steps=args.steps)
    arch = get_architecture(args.model)

    def compiled(wrap: bool) -> keras.Model:
        set_seed(0)
        m = arch.build(ds.input_shape, ds.num_classes, *channel_stats(x))
        m = PGDTrainer.wrap(m, pgd) if wrap else m
        m.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
        return m

    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size).cache()
    clean_m, adv_m = compiled(False), compiled(True)
    t_clean = median_time(lambda: clean_m.fit(data, epochs=1, verbose=0), args.repeats)
    t_adv = median_time(lambda: adv_m.fit(data, epochs=1, verbose=0), args.repeats)

    # (b) on a briefly trained model (a random one is trivially fooled)
    model = clean_m
    xa, ya = ds.x_test[:args.n_attack], ds.y_test[:args.n_attack]
    f = pgd_function(model, pgd)

    def ours():
        out = []
        for b, i in enumerate(range(0, len(xa), args.batch_size)):
            xb = tf.constant(xa[i:i + args.batch_size])
            yb = tf.constant(ya[i:i + args.batch_size], tf.int64)
            out.append(f(xb, yb, tf.constant([0, b], tf.int64)).numpy())
        return np.concatenate(out)

    params = {"steps": pgd.steps, "abs_stepsize": pgd.step_size, "random_start": True}
    theirs = lambda: A.run_attack(model, xa, ya, "pgd", eps=pgd.eps, params=params,
                                  batch_size=args.batch_size, seed=0, progress=False)
    t_ours = median_time(ours, args.repeats)
    t_fb = median_time(theirs, args.repeats)
    pred = lambda a: np.argmax(model.predict(a, batch_size=512, verbose=0), -1)
    ra_ours, ra_fb = float(np.mean(pred(ours()) == ya)), theirs().robust_accuracy

    print(f"model {args.model}, Fashion-MNIST, {args.n} training images, batch "
          f"{args.batch_size}, PGD eps {pgd.eps} x {pgd.steps} steps of {pgd.step_size:.4g}, "
          f"random start; median of {args.repeats} after a warm-up")
    print(f"(a) clean epoch {t_clean:.2f} s, PGD-{pgd.steps} AT epoch {t_adv:.2f} s: "
          f"ratio {t_adv / t_clean:.2f} (nominal floor {pgd.steps + 1}, goal <= "
          f"{pgd.steps + 1.5})")
    print(f"(b) our PGD {len(xa) / t_ours:.0f} img/s, Foolbox LinfPGD {len(xa) / t_fb:.0f} "
          f"img/s: ratio {t_fb / t_ours:.2f}; robust accuracy ours {ra_ours:.3f}, "
          f"Foolbox {ra_fb:.3f} (clean {np.mean(pred(xa) == ya):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
