"""GPU benchmark at paper scale on CIFAR-shaped synthetic data (runs on a CPU too, as a smoke
check with ``--smoke``), on either Keras backend.

    python bench/gpu.py                      # one or more GPUs: VGG16, 25,000 images/epoch
    python bench/gpu.py --backend jax        # Keras on JAX (a GPU machine without TensorFlow)
    python bench/gpu.py --devices GPU:0      # one GPU of several
    python bench/gpu.py --smoke              # this CPU: tiny sizes, same code paths

Measures, through the package's own entry points (``train``, ``adv_train``,
``tune_regression``, ``evaluate_attack``):

0. ``train()`` against a bare ``model.fit`` on the same model and in-memory arrays (no
   augmentation, no history): the package's overhead, history writes included (goal: >= 0.8).
1. VGG16 training images/s (``train()``, the crop-flip recipe, history written every epoch) in
   float32 and in mixed precision (``--mixed``, default ``mixed_float16``); goal on one H100:
   >= 5,000 images/s with mixed precision. ``train img/s`` counts the training steps only
   (epoch start to the start of its validation); ``epoch img/s`` adds validation and the
   checkpoint writes. Epochs 2..E (epoch 1 includes graph tracing).
2. One PGD-7 adversarial-training epoch over one clean epoch (same model, data, batch and
   precision, ``--at-precision``), training steps only.
3. DARE tuning throughput: samples/s of ``tune_regression`` (DARE-S loss, VGG16's sliced
   layers, synthetic targets), epoch 2.
4. Evaluation images/s per attack (``evaluate_attack``: fgsm, pgd, bim with their minimal-epsilon
   search; cw, deepfool) on ``--eval-n`` images of the float32 model, labelled with its own
   predictions so that every image is attacked (the cost per attacked image).

The data are synthetic CIFAR-10 files (class-dependent patterns plus noise, so the model learns
something) written in the official format to a temporary ``DAREKIT_DATA``: the real loader,
split and pipeline run unchanged.
"""
import argparse
import dataclasses
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root

from darekit import backend as B  # noqa: E402  (imports no backend)


def _backend_arg(argv: list[str]) -> str | None:
    """``--backend NAME`` from the command line: read before Keras is imported."""
    for i, a in enumerate(argv):
        if a.startswith("--backend="):
            return a.split("=", 1)[1]
        if a == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
    return None


B.select(_backend_arg(sys.argv[1:]))
import keras  # noqa: E402
import numpy as np  # noqa: E402

GOAL = 5000  # VGG16 training images/s on one H100, 32x32, mixed precision


def write_synthetic_cifar10(folder: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """CIFAR-10's python batches (``data_batch_1..5``, ``test_batch``) holding class patterns
    (a coarse random image per class, upsampled) mixed with per-image noise, as uint8."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0, 255, (10, 8, 8, 3)).repeat(4, 1).repeat(4, 2)

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 10
        rng.shuffle(y)
        x = 0.6 * patterns[y] + 0.4 * rng.uniform(0, 255, (n, 32, 32, 3))
        return x.astype(np.uint8), y

    def batch(path: Path, x: np.ndarray, y: np.ndarray) -> None:
        d = {b"data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072), b"labels": y.tolist()}
        path.write_bytes(pickle.dumps(d, protocol=2))

    folder.mkdir(parents=True, exist_ok=True)
    x, y = images(n_train)
    for i, (xs, ys) in enumerate(zip(np.array_split(x, 5), np.array_split(y, 5),
                                     strict=True), 1):
        batch(folder / f"data_batch_{i}", xs, ys)
    batch(folder / "test_batch", *images(n_test))


class PhaseClock(keras.callbacks.Callback):
    """Per epoch: its start and the start of its validation (its training steps are done);
    the end of training."""

    def __init__(self):
        super().__init__()
        self.begin: list[float] = []
        self.test: list[float] = []
        self.end = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.begin.append(time.perf_counter())

    def on_test_begin(self, logs=None):
        if len(self.test) < len(self.begin):
            self.test.append(time.perf_counter())

    def on_train_end(self, logs=None):
        self.end = time.perf_counter()

    def train_seconds(self) -> float:
        """Median training-step time of epochs 2..E."""
        return statistics.median(t - b for b, t in zip(self.begin[1:], self.test[1:],
                                                       strict=True))

    def epoch_seconds(self) -> float:
        """Median wall time of epochs 2..E, from one epoch's start to the next's (the last
        one's: to the end of training), so validation and checkpoint writes count."""
        marks = [*self.begin[1:], self.end]
        return statistics.median(b - a for a, b in zip(marks[:-1], marks[1:], strict=True))


def device_text() -> str:
    gpus = B.visible_devices("GPU")
    if not gpus:
        return f"CPU only ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return f"{len(gpus)} GPU(s): {', '.join(gpus)} ({B.name()})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU smoke check)")
    p.add_argument("--backend", choices=B.BACKENDS, default=None, help=B.BACKEND_HELP)
    p.add_argument("--model", default="vgg16")
    p.add_argument("--n", type=int, default=None, help="training images per epoch "
                   "(default 25,000; 64 with --smoke)")
    p.add_argument("--epochs", type=int, default=None, help="default 3 (2 with --smoke)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 128; "
                   "32 with --smoke)")
    p.add_argument("--devices", default=None, help="as the scripts' --devices (default: every "
                   "GPU when there are 2 or more)")
    p.add_argument("--mixed", default=None, help="mixed_float16 or mixed_bfloat16 (default: "
                   "mixed_bfloat16 on JAX, mixed_float16 on TensorFlow)",
                   choices=("mixed_float16", "mixed_bfloat16"))
    p.add_argument("--at-precision", default="float32",
                   choices=("float32", "mixed_float16", "mixed_bfloat16"))
    p.add_argument("--dare-n", type=int, default=None, help="DARE samples (default 4,096; 64 "
                   "with --smoke)")
    p.add_argument("--eval-n", type=int, default=None, help="images per attack (default 256; 4 "
                   "with --smoke)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: fit, train, "
                   "at, dare, eval")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    a.mixed = a.mixed or ("mixed_bfloat16" if B.name() == "jax" else "mixed_float16")
    n = a.n or (64 if a.smoke else 25_000)
    epochs = a.epochs or (2 if a.smoke else 3)
    batch = a.batch_size or (32 if a.smoke else 128)
    dare_n = a.dare_n or (64 if a.smoke else 4096)
    eval_n = a.eval_n or (4 if a.smoke else 256)
    skip = set(filter(None, a.skip.split(",")))
    if epochs < 2:
        p.error("--epochs must be at least 2 (epoch 1 includes graph tracing)")

    from darekit import distribute
    from darekit.adv_training import AdvTrainConfig, PGDTrainer, RobustEval
    from darekit.attacks import DEFAULT_ATTACKS
    from darekit.dare import DareConfig, tune_regression
    from darekit.evaluate import evaluate_attack
    from darekit.mining import MineResult
    from darekit.models import get_architecture
    from darekit.rundir import Run
    from darekit.traces import get_ats
    from darekit.training import TrainConfig, train

    tmp = Path(tempfile.mkdtemp(prefix="darekit-gpu-bench-"))
    os.environ["DAREKIT_DATA"] = str(tmp / "data")
    write_synthetic_cifar10(tmp / "data" / "cifar10", 2 * n, max(256, eval_n))
    dist = distribute.distribution(a.devices)
    results: dict = {"device": device_text(), "versions": B.versions(), "model": a.model,
                     "images_per_epoch": n,
                     "epochs": epochs, "global_batch": batch, "replicas": dist.replicas,
                     "devices": list(dist.devices), "load_average_start": os.getloadavg()[0]}
    print(f"{results['device']}; {dist.summary(batch)}; {a.model}, {n} images/epoch, "
          f"epochs 2..{epochs} timed", flush=True)
    common = dict(epochs=epochs, batch_size=batch, augment="crop-flip", schedule="constant",
                  warmup_epochs=0, test_subset=256, verbose=0, seed=0, devices=a.devices)

    def train_run(precision: str) -> PhaseClock:
        clock = PhaseClock()
        train(TrainConfig.resolve(a.model, "cifar10", precision=precision,
                                  run_dir=str(tmp / f"clean-{precision}"), **common),
              callbacks=[clock])
        return clock

    # ----------------------------------------------------------------- 0. train() vs fit
    if "fit" not in skip:
        from darekit.data import load_dataset

        data = load_dataset("cifar10")
        xs, ys = data.x_train[:n], data.y_train[:n]
        bare = PhaseClock()
        model = get_architecture(a.model).build((32, 32, 3), 10)
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=B.xla_allowed(True))
        model.fit(xs, ys, batch_size=batch, epochs=epochs, verbose=0, callbacks=[bare],
                  validation_data=(xs[:256], ys[:256]))
        ours = PhaseClock()
        train(TrainConfig.resolve(a.model, "cifar10", run_dir=str(tmp / "fit-vs-train"),
                                  **{**common, "augment": "none"}),
              callbacks=[ours])
        ratio = bare.epoch_seconds() / ours.epoch_seconds()
        results["train_over_bare_fit"] = ratio
        print(f"train() / bare fit (img/s, history writes included): {ratio:.2f} "
              f"(goal >= 0.8; bare {n / bare.epoch_seconds():.0f}, train() "
              f"{n / ours.epoch_seconds():.0f} img/s)", flush=True)

    # ----------------------------------------------------------------- 1. training
    clocks: dict[str, PhaseClock] = {}
    if "train" not in skip:
        for precision in ("float32", a.mixed):
            c = clocks[precision] = train_run(precision)
            results[f"train_{precision}"] = {"train_images_per_s": n / c.train_seconds(),
                                             "epoch_images_per_s": n / c.epoch_seconds()}
            print(f"train {precision:15s}: {n / c.train_seconds():9.1f} train img/s, "
                  f"{n / c.epoch_seconds():9.1f} epoch img/s", flush=True)
        if B.visible_devices("GPU"):
            got = results[f"train_{a.mixed}"]["train_images_per_s"]
            print(f"goal (one H100, {a.mixed}): >= {GOAL} img/s: "
                  f"{'met' if got >= GOAL else 'NOT met'} ({got:.0f})")

    # ----------------------------------------------------------------- 2. PGD-7 training
    if "at" not in skip:
        at_clock = PhaseClock()
        at = AdvTrainConfig.resolve(a.model, "cifar10", precision=a.at_precision, steps=7,
                                    run_dir=str(tmp / "pgd"), **common)
        tc = at.train
        # adv_train's three hooks (darekit.adv_training.adv_train), with our clock in front.
        train(tc, wrap_model=lambda m: PGDTrainer.wrap(m, at.pgd, tc.seed),
              callbacks=lambda x, y: [at_clock, RobustEval(x, y, at.pgd, 256, tc.seed)],
              extra_config={"pgd": dataclasses.asdict(at.pgd)})
        clean = clocks.get(a.at_precision) or train_run(a.at_precision)
        ratio = at_clock.train_seconds() / clean.train_seconds()
        results["pgd7_epoch_over_clean"] = ratio
        results["pgd7_train_images_per_s"] = n / at_clock.train_seconds()
        print(f"PGD-7 training epoch / clean epoch ({a.at_precision}): "
              f"{at_clock.train_seconds():.2f} s / {clean.train_seconds():.2f} s = {ratio:.2f}",
              flush=True)

    # ----------------------------------------------------------------- 3. DARE tuning
    if "dare" not in skip:
        arch = get_architecture(a.model)
        layers = arch.trace_layers
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 1, (dare_n, 32, 32, 3)).astype("float32")
        y = (np.arange(dare_n) % 10).astype("int64")
        cfg = DareConfig(variant="dare-s", lr=arch.dare_lr, epochs=2, verbose=0,
                         devices=a.devices)
        with distribute.distribution(a.devices).scope():
            model = arch.build((32, 32, 3), 10)
            ats = get_ats(model, x, layers)
            mined = MineResult(x=x, y=y, targets={k: v * 1.1 for k, v in ats.items()},
                               anchor=np.zeros(dare_n, bool), epoch=np.ones(dare_n, int),
                               index=np.arange(dare_n), patches=np.ones(dare_n, int), stats={})
            tuned = tune_regression(model, mined, None, layers, cfg, {}, None)
        seconds = float(tuned.rows[-1]["seconds"])
        results["dare_samples_per_s"] = dare_n / seconds
        print(f"DARE tuning (tune_regression, batch {cfg.batch_size}, {len(layers)} layers): "
              f"{dare_n / seconds:.1f} samples/s", flush=True)

    # ----------------------------------------------------------------- 4. evaluation
    if "eval" not in skip:
        run_dir = tmp / "clean-float32"
        if (run_dir / "config.json").is_file():
            model = Run(run_dir).load_model()
        else:  # training skipped: an untrained model costs the same per attacked image
            model = get_architecture(a.model).build((32, 32, 3), 10)
        x = np.random.default_rng(1).uniform(0, 1, (eval_n, 32, 32, 3)).astype("float32")
        y = np.argmax(model.predict(x, verbose=0), -1)  # every image is attacked
        results["eval_images_per_s"] = {}
        for attack in DEFAULT_ATTACKS:
            t0 = time.perf_counter()
            ev = evaluate_attack(model, x, y, attack, dataset="cifar10", progress=False)
            rate = eval_n / (time.perf_counter() - t0)
            results["eval_images_per_s"][attack] = rate
            print(f"evaluate {attack:9s}: {rate:8.2f} images/s ({ev.rounds} rounds)",
                  flush=True)

    results["load_average_end"] = os.getloadavg()[0]
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
