"""What ``--deterministic`` (TensorFlow op determinism) costs: training and evaluation of the
same model on the same data, with and without it, side by side.

    python bench/bench_determinism.py --model alexnet --n 4000 --epochs 3 --eval-n 100

Op determinism is process-wide and cannot be turned off again, so each side runs in its own
subprocess (the sides alternate, ``--repeats`` times, and the medians are compared). A side
trains ``--epochs`` epochs on a class-balanced subset of ``--n`` real Fashion-MNIST images
(images/s over epochs 2..E: epoch 1 includes tracing), then evaluates the trained model under
PGD with the precise search on ``--eval-n`` test images, as ``dare/test.py`` does (with XLA when
not deterministic; deterministic runs cannot use it: ``darekit.seeding.xla_allowed``).
Ratio = deterministic / default time (above 1: determinism costs that factor).
"""
import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

SIDE = """
import json, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
import keras
from darekit.training import TrainConfig, train
from darekit.evaluate import evaluate_attack
from darekit.rundir import Run
cfg = TrainConfig.resolve({model!r}, "fashion_mnist", subset={n}, epochs={epochs}, lr=0.01,
                          verbose=0, run_dir={run!r}, deterministic={det})
class Clock(keras.callbacks.Callback):  # epoch starts and the end of training
    stamps = []
    def on_epoch_begin(self, epoch, logs=None): self.stamps.append(time.perf_counter())
    def on_train_end(self, logs=None): self.stamps.append(time.perf_counter())
clock = Clock()
train(cfg, callbacks=[clock])
s = clock.stamps[1:]  # epochs 2..E
run = Run.open({run!r})
d = run.data()
t0 = time.perf_counter()
ev = evaluate_attack(run.load_model(), d.x_test[:{eval_n}], d.y_test[:{eval_n}], "pgd",
                     dataset="fashion_mnist", progress=False, jit_compile=True)
print(json.dumps({{"train_img_s": len(d.x_train) * (len(s) - 1) / (s[-1] - s[0]),
                  "eval_s": time.perf_counter() - t0, "er": ev.er,
                  "jit": ev.config["jit_compile"]}}))
"""


def side(args, det: bool, tmp: str, k: int) -> dict:
    code = SIDE.format(root=str(ROOT), bench=str(ROOT / "bench"), model=args.model, n=args.n,
                       epochs=args.epochs, run=f"{tmp}/{'det' if det else 'default'}-{k}",
                       det=det, eval_n=args.eval_n)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="alexnet")
    p.add_argument("--n", type=int, default=4000, help="training subset (half is x_train)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--eval-n", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    rows = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            for det in (False, True):
                r = side(args, det, tmp, k)
                rows[det].append(r)
                print(f"repeat {k + 1} {'deterministic' if det else 'default      '}: "
                      f"train {r['train_img_s']:.1f} img/s, evaluation {r['eval_s']:.1f} s "
                      f"(XLA {r['jit']}), ER {r['er']:.5f}", flush=True)
    med = {det: {key: statistics.median(r[key] for r in rows[det])
                 for key in ("train_img_s", "eval_s")} for det in rows}
    print(f"training: default {med[False]['train_img_s']:.1f} img/s, deterministic "
          f"{med[True]['train_img_s']:.1f} img/s: time ratio "
          f"{med[False]['train_img_s'] / med[True]['train_img_s']:.2f}")
    print(f"evaluation (PGD, {args.eval_n} images): default {med[False]['eval_s']:.1f} s, "
          f"deterministic {med[True]['eval_s']:.1f} s: time ratio "
          f"{med[True]['eval_s'] / med[False]['eval_s']:.2f}")


if __name__ == "__main__":
    main()
