"""C&W L2 and DeepFool L2: the compiled engine (``darekit.l2``) against Foolbox, side by side.

    python bench/l2_attacks.py                       # TensorFlow (the default backend)
    KERAS_BACKEND=jax python bench/l2_attacks.py     # JAX

The quick profile's scale: AlexNet on Fashion-MNIST (28x28x1) trained briefly (``--train``
images, ``--epochs``; an untrained model is fooled trivially), ``--n`` test images attacked in
one ``run_attack`` call with the registered defaults (C&W 2 x 150 steps, DeepFool 50 steps over
10 classes, staged), op determinism on as the profile has it (``--no-deterministic`` lifts it,
which allows XLA with ``--jit-compile``). Per attack and engine: wall seconds and img/s of the
first call (tracing and compilation included) and of a second call (warm); Foolbox runs once
after its model function is warm. Then the ratio Foolbox / compiled and whether the two agree
(fooled sets, mean minimal L2, largest per-input L2 difference).
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root: see README

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="alexnet")
    p.add_argument("--n", type=int, default=100, help="test images attacked")
    p.add_argument("--train", type=int, default=4000, help="training images")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--attacks", default="cw,deepfool")
    p.add_argument("--engines", default="compiled,foolbox")
    p.add_argument("--batch-size", type=int, default=256, help="the evaluation's batch size")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--jit-compile", action="store_true", help="XLA on TensorFlow (needs "
                   "--no-deterministic; JAX always compiles)")
    args = p.parse_args(argv)

    import keras

    from darekit import attacks as A
    from darekit import backend as B
    from darekit.data import load_dataset
    from darekit.models import get_architecture
    from darekit.models.common import channel_stats
    from darekit.seeding import set_seed

    set_seed(0, deterministic=args.deterministic)
    jit = B.xla_allowed(args.jit_compile)
    ds = load_dataset("fashion_mnist")
    x_tr, y_tr = ds.x_train[:args.train], ds.y_train[:args.train]
    model = get_architecture(args.model).build(ds.input_shape, ds.num_classes,
                                               *channel_stats(x_tr))
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    t = time.perf_counter()
    model.fit(x_tr, y_tr, batch_size=64, epochs=args.epochs, verbose=0)
    t_train = time.perf_counter() - t
    x, y = ds.x_test[:args.n], ds.y_test[:args.n]
    clean = float(np.mean(A.predict_labels(model, x, args.batch_size, jit) == y))
    print(f"{B.versions()}; {args.model} on Fashion-MNIST, {args.train} training images x "
          f"{args.epochs} epochs ({t_train:.0f} s), clean accuracy {clean:.2f} on the {args.n} "
          f"attacked; deterministic {args.deterministic}, XLA {jit}, batch {args.batch_size}")

    for attack in args.attacks.split(","):
        results = {}
        for engine in args.engines.split(","):
            times = []
            for _ in range(2 if engine == "compiled" else 1):
                t = time.perf_counter()
                res = A.run_attack(model, x, y, attack, batch_size=args.batch_size, seed=0,
                                   progress=False, jit_compile=jit, engine=engine)
                times.append(time.perf_counter() - t)
            results[engine] = (times, res)
            s = res.summary()
            first = f"first {times[0]:7.1f} s ({args.n / times[0]:7.1f} img/s)"
            warm = (f", warm {times[1]:7.1f} s ({args.n / times[1]:7.1f} img/s)"
                    if len(times) > 1 else "")
            print(f"{attack:8s} {engine:8s} {first}{warm}; success rate "
                  f"{s['success_rate']:.3f}, mean L2 of fooled {s['mean_l2_fooled']:.4f}")
        if {"compiled", "foolbox"} <= set(results):
            (tc, rc), (tf_, rf) = results["compiled"], results["foolbox"]
            both = rc.fooled & rf.fooled
            diff = np.abs(rc.l2[both] - rf.l2[both]).max() if both.any() else float("nan")
            print(f"{attack:8s} Foolbox / compiled: {tf_[0] / tc[-1]:.1f}x warm, "
                  f"{tf_[0] / tc[0]:.1f}x first call; same fooled set: "
                  f"{bool(np.array_equal(rc.fooled, rf.fooled))}, largest L2 difference "
                  f"{diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
