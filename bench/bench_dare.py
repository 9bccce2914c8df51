"""Benchmarks of the DARE stages, as ratios measured in one run, plus a quick robustness figure.

    python bench/bench_dare.py --run-dir /tmp/bench-alexnet --model alexnet --subset 4000

Trains the run if ``--run-dir`` holds none (Fashion-MNIST subset, Adam, a few epochs), then:
- slicing throughput in images/s, exact and approximate (gradient x delta), and the Jaccard
  agreement of their masks;
- ``get_ats`` (Stage 2) time over one plain prediction pass of ``x_validation`` by the final
  model, and the model queries per input (goal <= 30);
- one DARE fine-tuning epoch over one plain ``fit`` epoch on the same data (goal <= 1.2);
- clean accuracy and the mean minimal FGSM epsilon (over an epsilon grid, on test images the
  model classifies correctly) of the original classifier and of DARE, DARE-S and DARE-SL.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root: see README

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def fgsm_min_eps(model, x: np.ndarray, y: np.ndarray, grid: np.ndarray,
                 batch_size: int = 500) -> dict[str, float]:
    """Per correctly classified image, the smallest ``eps`` in ``grid`` at which one FGSM step
    ``clip(x + eps * sign(grad CE))`` changes the prediction; unfooled images count as
    ``grid[-1]``. Returns the mean, the fraction fooled within the grid, and clean accuracy."""
    import tensorflow as tf

    from darekit.mining import fgsm_directions

    pred = model.predict(x, batch_size=batch_size, verbose=0).argmax(-1)
    ok = pred == y
    xs, ys = x[ok], y[ok]
    sign = fgsm_directions(model, xs, ys, 1.0)
    fn = tf.function(lambda b: tf.argmax(model(b, training=False), -1),
                     input_signature=[tf.TensorSpec((None, *x.shape[1:]), tf.float32)])
    min_eps = np.full(len(xs), np.inf)
    for eps in grid:
        todo = np.flatnonzero(np.isinf(min_eps))
        if not len(todo):
            break
        adv = np.clip(xs[todo] + eps * sign[todo], 0, 1).astype(np.float32)
        fooled = np.concatenate([fn(adv[i:i + batch_size]).numpy()
                                 for i in range(0, len(adv), batch_size)]) != ys[todo]
        min_eps[todo[fooled]] = eps
    fooled = np.isfinite(min_eps)
    return {"clean_accuracy": float(ok.mean()),
            "mean_min_eps": float(np.where(fooled, min_eps, grid[-1]).mean()),
            "fooled_fraction": float(fooled.mean())}


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--model", default="alexnet")
    p.add_argument("--subset", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--slice-per-class", type=int, default=10)
    p.add_argument("--max-inputs", type=int, default=None)
    p.add_argument("--dare-epochs", type=int, default=5)
    p.add_argument("--dare-lr", type=float, default=None,
                   help="lr of DARE and DARE-S (default: the architecture's dare_lr)")
    p.add_argument("--eval-images", type=int, default=500)
    p.add_argument("--eval-only", action="store_true",
                   help="only the accuracy/robustness figure of already tuned models")
    args = p.parse_args(argv)

    import keras

    from darekit.dare import VARIANTS, DareConfig, masked_sse, run_dare, sample_masks
    from darekit.mining import MineConfig, load_mined, run_mining
    from darekit.models import get_architecture
    from darekit.rundir import Run
    from darekit.slicing import SliceConfig, mask_jaccard, run_slicing, slice_model
    from darekit.traces import trace_model
    from darekit.training import TrainConfig, train

    out: dict = {}
    path = pathlib.Path(args.run_dir)
    if not (path / "config.json").is_file():
        cfg = TrainConfig.resolve(args.model, "fashion_mnist", subset=args.subset,
                                  epochs=args.epochs, optimizer="adam", lr=1e-3,
                                  weight_decay=0.0, schedule="constant", augment="none",
                                  test_subset=2000, run_dir=str(path), verbose=0)
        _, out["train_seconds"] = timed(train, cfg)
    run = Run.open(path)
    arch = get_architecture(run.model_name)
    data = run.data()
    out["config"] = {"model": run.model_name, "dataset": run.dataset_name,
                     "x_train": len(data.x_train), "x_validation": len(data.x_validation),
                     "history_epochs": run.history_epochs()}

    if not args.eval_only:
        # ---- slicing throughput, exact vs approx
        model = run.load_model()
        res = {}
        for mode in ("exact", "approx"):
            scfg = SliceConfig(mode=mode, max_per_class=args.slice_per_class)
            res[mode] = slice_model(model, data.x_train, data.y_train, arch.trace_layers, scfg)
        out["slicing"] = {
            "images": int(res["exact"].images.sum()),
            "exact_images_per_s": res["exact"].images_per_second,
            "approx_images_per_s": res["approx"].images_per_second,
            "approx_speedup": res["exact"].seconds / res["approx"].seconds,
            "jaccard_exact_vs_approx": mask_jaccard(res["exact"].masks(), res["approx"].masks()),
            "exact_slice_fraction": {k: float(m.mean()) for k, m in res["exact"].masks().items()},
        }
        print(json.dumps(out["slicing"], indent=1), flush=True)
        run_slicing(run, SliceConfig(max_per_class=args.slice_per_class), log=lambda s: None)

        # ---- mining vs one plain prediction pass over x_validation
        xv = data.x_validation if args.max_inputs is None else data.x_validation[:args.max_inputs]
        model.predict(xv[:512], batch_size=256, verbose=0)  # warm-up
        _, t_pred = timed(model.predict, xv, batch_size=256, verbose=0)
        mined, t_mine = timed(run_mining, run, MineConfig(max_inputs=args.max_inputs),
                              log=lambda s: None)
        out["mining"] = {"seconds": t_mine, "plain_predict_seconds": t_pred,
                         "ratio": t_mine / t_pred,
                         "model_queries_per_input": mined.stats["model_queries_per_input"],
                         "ddmin_queries_per_collected": mined.stats[
                             "ddmin_queries_per_collected_input"]["mean"],
                         "failure_rate": mined.stats["failure_rate"],
                         "collected": mined.stats["collected"],
                         "s_star_mean": mined.stats["s_star_size"].get("mean")}
        print(json.dumps(out["mining"], indent=1), flush=True)

        # ---- one DARE epoch vs one plain fit epoch on the same data
        m = load_mined(run)
        reg_model = run.load_model()
        r = trace_model(reg_model, arch.trace_layers)
        units = {n: int(o.shape[-1]) for n, o in zip(arch.trace_layers, r.outputs, strict=True)}
        masks = {k: v for k, v in np.load(run.file("slice/masks.npz")).items()}
        sm = sample_masks(masks, m.y, units)
        y_true = [np.concatenate([m.targets[n], sm[n]], 1) for n in arch.trace_layers]
        for la in reg_model.layers:
            if isinstance(la, keras.layers.BatchNormalization):
                la.trainable = False
        r.compile(optimizer=keras.optimizers.SGD(1e-9), loss=[masked_sse] * len(y_true))
        plain = run.load_model()
        plain.compile(optimizer=keras.optimizers.SGD(1e-9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        fits = {"dare": lambda: r.fit(m.x, y_true, batch_size=32, verbose=0),
                "plain": lambda: plain.fit(m.x, m.y, batch_size=32, verbose=0)}
        times = {name: np.inf for name in fits}
        for name in fits:
            fits[name]()  # the first epoch traces the step function
        for _ in range(3):  # interleaved, best of 3: the CPU is shared with other jobs
            for name, fit in fits.items():
                times[name] = min(times[name], timed(fit)[1])
        out["dare_epoch"] = {"samples": len(m.y), "dare_seconds": times["dare"],
                             "fit_seconds": times["plain"],
                             "ratio": times["dare"] / times["plain"]}
        print(json.dumps(out["dare_epoch"], indent=1), flush=True)

        for v in VARIANTS:
            lr = args.dare_lr if VARIANTS[v].use_transform else None
            res_v = run_dare(run, DareConfig(variant=v, lr=lr, epochs=args.dare_epochs,
                                             verbose=0), log=lambda s: None)
            keys = ("moved", "max_rel_change", "accuracy_before", "accuracy_after", "seconds")
            out.setdefault("variants", {})[v] = {"lr": lr, **{k: res_v.summary[k] for k in keys}}

    # ---- accuracy and FGSM minimal epsilon
    grid = np.round(np.arange(0.005, 0.3001, 0.005), 4)
    xt, yt = data.x_test[:args.eval_images], data.y_test[:args.eval_images]
    out["robustness"] = {name: fgsm_min_eps(run.load_named(name), xt, yt, grid)
                         for name in ["original", *VARIANTS]
                         if name == "original" or run.model_path(name).is_file()}
    print(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
