"""Data parallelism (``--devices``) and mixed precision (``--precision``): ``darekit.distribute``.

Multi-device runs need two logical CPU devices, which TensorFlow only accepts before it starts:
they run in one child process (``_child_main``, started once per module), and the tests here
compare what it wrote. The child trains a tiny BN network without dropout (dropout draws
different masks per replica, which no tolerance could absorb) on the same 128 real
Fashion-MNIST images, once on ``CPU:0`` and once data-parallel on ``CPU:0,CPU:1``.

Tolerance (multi-device vs one device): every weight tensor within ``1e-3 * max|w|`` and the
epoch's losses within a relative ``1e-4``. The two runs compute the same step with float sums
in a different order: each replica sums the gradient of its 32 images and the replicas' sums
are added (vs one sum over 64), and synchronised batch norm takes the batch variance as
``E[x^2] - E[x]^2`` of all-reduced sums (vs ``tf.nn.moments``' two-pass formula). Measured on
this machine (one epoch of 2 steps, SGD + Nesterov momentum): 4.1e-5 of ``max|w|`` and 3.8e-6
relative in the loss for plain training, 2.1e-6 and 3.9e-7 for PGD training, 1e-7 for DARE-S
and DARE-SL (batch norm frozen: only the order of sums differs). A real mistake is far outside:
per-replica batch norm gave 8x ``max|w|`` (moving mean) and 3.5e-3 in the loss; replicas
drawing the same PGD random start gave 0.26x and 7e-4.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import call_script

from darekit import backend as B
from darekit import distribute, io, layout
from darekit.dare import DareConfig
from darekit.distribute import Distribution, distribution, normalize_devices, parse_devices
from darekit.errors import DareError
from darekit.finetune import FinetuneConfig
from darekit.models import ARCHITECTURES, Architecture, get_architecture, register
from darekit.models.common import batch_norm, input_block
from darekit.paths import ROOT
from darekit.rundir import Run
from darekit.training import PAD, TrainConfig, epoch_draws, train, train_dataset

TINY = "tinycnn_distribute_test"
TWO = "CPU:0,CPU:1"
W_TOL = 1e-3      # of max|w| per weight tensor (see the module docstring)
LOSS_RTOL = 1e-4  # relative, per logged loss


def build_tiny(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """conv (no bias) -> BN -> ReLU -> pool -> dense -> logits: every kind of weight the
    architectures have, batch norm included, and no dropout."""
    inputs, x = input_block(input_shape, min_size=0)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(x)
    x = batch_norm("bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.MaxPooling2D(4, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.ReLU(name="fc_relu")(keras.layers.Dense(16, name="fc")(x))
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="logits")(x), name=TINY)


def _register_tiny() -> None:
    if TINY not in ARCHITECTURES:
        register(Architecture(TINY, build_tiny, ("relu", "fc_relu"), dare_lr=1e-2))


@pytest.fixture
def tiny():
    """The tiny architecture in the registry for one test only (other modules parametrize
    over the registry)."""
    _register_tiny()
    yield TINY
    ARCHITECTURES.pop(TINY, None)


# SGD with Nesterov momentum and weight decay (a stateful optimizer: keras-team/keras#23085),
# crop-flip augmentation, 128 training images in 2 global batches of 64 (32 per replica).
COMMON = dict(subset=256, test_subset=50, epochs=1, batch_size=64, optimizer="sgd", lr=0.05,
              momentum=0.9, nesterov=True, weight_decay=5e-4, augment="crop-flip", verbose=0,
              seed=0, deterministic=True)
PGD_STEPS = 2
# The dtype of the input normalisation's sample count (int32: JAX runs in 32 bits by default).
COUNT = "int32" if B.name() == "jax" else "int64"


def _child_main(out: Path) -> None:
    """What the child process runs, with two logical CPU devices configured."""
    from darekit.adv_training import AdvTrainConfig, adv_train
    from darekit.dare import tune
    from darekit.mining import MineResult
    from darekit.traces import get_ats

    _register_tiny()
    for devices, tag in (("CPU:0", "one"), (TWO, "two")):
        train(TrainConfig.resolve(TINY, "fashion_mnist", devices=devices,
                                  run_dir=str(out / f"plain-{tag}"), **COMMON))
        adv_train(AdvTrainConfig.resolve(TINY, "fashion_mnist", devices=devices,
                                         steps=PGD_STEPS, run_dir=str(out / f"pgd-{tag}"),
                                         **COMMON))
    # Resume: 1 epoch (above) + 1 resumed, against 2 epochs straight, both on two devices.
    adv_train(AdvTrainConfig.resolve(TINY, "fashion_mnist", devices=TWO, steps=PGD_STEPS,
                                     run_dir=str(out / "pgd-two-straight"),
                                     **{**COMMON, "epochs": 2}))
    adv_train(AdvTrainConfig.from_options({"run_dir": str(out / "pgd-two"), "resume": True,
                                           "epochs": 2}))
    # Without building the optimizer's slots before the first distributed step (the
    # workaround for keras-team/keras#23085): does Keras' lazy build fail, or differ?
    saved, distribute.build_optimizer = distribute.build_optimizer, lambda model: None
    try:
        adv_train(AdvTrainConfig.resolve(TINY, "fashion_mnist", devices=TWO, steps=PGD_STEPS,
                                         run_dir=str(out / "pgd-two-lazy"), **COMMON))
        lazy = "ok"
    except Exception as e:  # reported to the parent, which fails with the message
        lazy = f"{type(e).__name__}: {str(e)[:500]}"
    finally:
        distribute.build_optimizer = saved
    # DARE-S (regression model sharing the classifier's layers) and DARE-SL (cross-entropy
    # fine-tuning) on synthetic regression data, on one device and on two.
    run = Run(out / "plain-one")
    x = run.data().x_validation[:64]
    y = run.data().y_validation[:64]
    ats = get_ats(run.load_model(), x, ("relu", "fc_relu"))
    rng = np.random.default_rng(0)
    mined = MineResult(x=x, y=y, targets={k: v + rng.normal(0, 0.1, v.shape).astype("float32")
                                          for k, v in ats.items()},
                       anchor=np.zeros(64, bool), epoch=np.ones(64, int), index=np.arange(64),
                       patches=np.ones(64, int), stats={})
    tuned = {}
    for variant in ("dare-s", "dare-sl"):
        for devices, tag in (("CPU:0", "one"), (TWO, "two")):
            cfg = DareConfig(variant=variant, lr=0.05, epochs=2, batch_size=16, verbose=0,
                             devices=devices)
            dist = distribution(devices)
            with dist.scope():
                model = run.load_model()
                tune(model, mined, cfg, layers=("relu", "fc_relu"))
            for i, w in enumerate(model.get_weights()):
                tuned[f"{variant}/{tag}/{i}"] = w
    np.savez(out / "tuned.npz", **tuned)
    other = distribution("CPU:1")  # one device that is not the default one: placed there
    with other.scope():
        placed = keras.Variable(1.0).value.device
    (out / "child.json").write_text(json.dumps({"lazy_optimizer": lazy, "placed": placed,
                                                "other": other.describe()}))


CHILD = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path[:0] = [{root!r}, {test!r}]
import test_distribute
test_distribute._child_main(__import__("pathlib").Path({out!r}))
"""


@pytest.fixture(scope="module")
def child(tmp_path_factory) -> Path:
    if B.name() != "tensorflow":
        pytest.skip("the MirroredStrategy child sets TensorFlow's logical devices")
    """Run ``_child_main`` once (about a minute on 2 CPU cores); return its output folder."""
    out = tmp_path_factory.mktemp("distribute")
    code = CHILD.format(root=str(ROOT), test=str(Path(__file__).parent), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def _log(run_dir: Path) -> list[dict]:
    return io.read_csv(run_dir / layout.TRAIN_LOG)


def _assert_close_weights(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        scale = max(float(np.max(np.abs(v))), 1e-12)
        assert np.max(np.abs(u - v)) <= W_TOL * scale, (i, np.max(np.abs(u - v)) / scale)


def _assert_same_training(two: Path, one: Path, tiny: str) -> None:
    """The two-device run did what the one-device run did, within the tolerance; its history
    loads, here, in a process without a strategy, into the plain architecture."""
    r2, r1 = _log(two)[0], _log(one)[0]  # epoch 1 (the two-device PGD run was resumed)
    for key in ("loss", "val_loss"):
        assert float(r2[key]) == pytest.approx(float(r1[key]), rel=LOSS_RTOL), key
    m2, m1 = Run(two).load_model(1), Run(one).load_model(1)
    assert {w.dtype for w in m2.weights} == {"float32", COUNT}
    _assert_close_weights(m2.get_weights(), m1.get_weights())


@pytest.mark.slow
@pytest.mark.tensorflow_only
def test_two_devices_train_like_one(child, tiny):
    _assert_same_training(child / "plain-two", child / "plain-one", tiny)
    dist = Run(child / "plain-two").config["train"]["distribution"]
    assert dist == {"strategy": "MirroredStrategy", "replicas": 2, "devices": ["CPU:0", "CPU:1"],
                    "precision": "float32", "global_batch_size": 64, "per_replica_batch_size": 32,
                    "jit_compile": False, "sync_batch_norm": True}
    one = Run(child / "plain-one").config["train"]["distribution"]
    assert one["strategy"] == "default" and one["replicas"] == 1
    # The history format does not depend on the devices: same files, same datasets.
    import h5py

    def names(path: Path) -> list[str]:
        with h5py.File(path) as f:
            found: list[str] = []
            f.visit(found.append)
            return found
    assert names(child / "plain-two" / layout.epoch_file(1)) == \
        names(child / "plain-one" / layout.epoch_file(1))


@pytest.mark.slow
@pytest.mark.tensorflow_only
def test_two_devices_pgd_train_like_one(child, tiny):
    """PGD adversarial training (crafted inside the distributed step, SGD + momentum): each
    replica draws its rows of the global batch's random start, so the attack is the same."""
    _assert_same_training(child / "pgd-two", child / "pgd-one", tiny)
    first = _log(child / "pgd-two")[0]
    assert 0 <= float(first["robust_accuracy"]) <= 1


@pytest.mark.slow
@pytest.mark.tensorflow_only
def test_resumed_two_device_run_continues_exactly(child, tiny):
    """1 epoch, then --resume to 2 (optimizer state, PGD seeds from the step counter, same
    batches) equals 2 epochs straight, bit for bit (deterministic ops, same devices)."""
    resumed, straight = child / "pgd-two", child / "pgd-two-straight"
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(_log(resumed)) == drop(_log(straight))
    assert Run(resumed).history_epochs() == [1, 2]
    for a, b in zip(Run(resumed).load_model().get_weights(),
                    Run(straight).load_model().get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.tensorflow_only
def test_optimizer_slots_built_in_scope_change_nothing(child, tiny):
    """keras-team/keras#23085 (stateful optimizers in custom train steps under a strategy):
    in this Keras (3.15.1), with SGD + Nesterov momentum, our PGD step also works when Keras
    builds the slots lazily; building them first (``distribute.build_optimizer``, kept as
    the workaround) gives bit-identical training."""
    status = json.loads((child / "child.json").read_text())["lazy_optimizer"]
    assert status == "ok", status
    for a, b in zip(Run(child / "pgd-two-lazy").load_model(1).get_weights(),
                    Run(child / "pgd-two").load_model(1).get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.tensorflow_only
def test_one_named_device_other_than_the_default_is_placed(child):
    info = json.loads((child / "child.json").read_text())
    assert info["placed"].endswith("CPU:1"), info
    assert info["other"]["strategy"] == "default" and info["other"]["replicas"] == 1


@pytest.mark.slow
@pytest.mark.tensorflow_only
def test_dare_tuning_on_two_devices_like_one(child):
    tuned = np.load(child / "tuned.npz")
    for variant in ("dare-s", "dare-sl"):
        n = len([k for k in tuned.files if k.startswith(f"{variant}/one/")])
        assert n > 0
        _assert_close_weights([tuned[f"{variant}/two/{i}"] for i in range(n)],
                              [tuned[f"{variant}/one/{i}"] for i in range(n)])


# ---------------------------------------------------------------------------- JAX: DataParallel
def _jax_child_main(out: Path) -> None:
    """Under JAX with two host devices: plain and PGD training on ``CPU:0`` and data-parallel
    on ``CPU:0,CPU:1`` (``keras.distribution.DataParallel``), and one ``mixed_bfloat16`` run."""
    from darekit.adv_training import AdvTrainConfig, adv_train

    _register_tiny()
    assert distribute.visible_devices() == ["CPU:0", "CPU:1"], distribute.visible_devices()
    # 51 held-out images: DataParallel shards evenly, so the run keeps 50 (even_batches).
    common = {**COMMON, "test_subset": 51}
    for devices, tag in (("CPU:0", "one"), (TWO, "two")):
        train(TrainConfig.resolve(TINY, "fashion_mnist", devices=devices,
                                  run_dir=str(out / f"plain-{tag}"), **common))
        adv_train(AdvTrainConfig.resolve(TINY, "fashion_mnist", devices=devices,
                                         steps=PGD_STEPS, run_dir=str(out / f"pgd-{tag}"),
                                         **common))
    train(TrainConfig.resolve(TINY, "fashion_mnist", precision="mixed_bfloat16",
                              run_dir=str(out / "bf16"), **common))


JAX_CHILD = """
import sys
sys.path[:0] = [{root!r}, {test!r}]
import test_distribute
test_distribute._jax_child_main(__import__("pathlib").Path({out!r}))
"""


@pytest.mark.slow
def test_jax_data_parallel_trains_like_one_device(tmp_path, tiny):
    """JAX: ``--devices CPU:0,CPU:1`` (two host devices, ``XLA_FLAGS``) trains with
    ``DataParallel`` what one device trains, within the tolerance, plain and PGD; batch norm
    needs no synchronising (one SPMD program); ``mixed_bfloat16`` runs and saves float32."""
    pytest.importorskip("jax")
    code = JAX_CHILD.format(root=str(ROOT), test=str(Path(__file__).parent), out=str(tmp_path))
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for kind in ("plain", "pgd"):
        two, one = tmp_path / f"{kind}-two", tmp_path / f"{kind}-one"
        r2, r1 = _log(two)[0], _log(one)[0]
        assert float(r2["loss"]) == pytest.approx(float(r1["loss"]), rel=LOSS_RTOL), kind
        # held out: 51 images on one device, 50 on two (counts of correct ones are integers)
        for row, n in ((r1, 51), (r2, 50)):
            correct = float(row["val_accuracy"]) * n
            assert correct == pytest.approx(round(correct), abs=1e-4), (kind, n, correct)
        _assert_close_weights(Run(two).load_model(1).get_weights(),
                              Run(one).load_model(1).get_weights())
        d = Run(two).config["train"]["distribution"]
        assert d["strategy"] == "DataParallel" and d["replicas"] == 2 and d["even_batches"] == 2
        assert d["jit_compile"] is True
    bf16 = Run(tmp_path / "bf16")
    assert bf16.config["train"]["distribution"]["precision"] == "mixed_bfloat16"
    assert np.isfinite(float(_log(tmp_path / "bf16")[0]["loss"]))
    assert {w.dtype for w in bf16.load_model(1).weights} == {"float32", COUNT}


# ---------------------------------------------------------------------------- fast tests
def test_device_names_are_parsed_and_checked():
    assert parse_devices("gpu:0, /device:GPU:1") == ("GPU:0", "GPU:1")
    assert parse_devices("/job:localhost/replica:0/task:0/device:CPU:3") == ("CPU:3",)
    assert parse_devices(None) is None and normalize_devices(" ") is None
    assert normalize_devices("cpu:0,cpu:1") == TWO
    for bad, message in (("GPU0", "not a device name"), ("GPU:0,gpu:0", "twice"),
                         ("CPU:0,GPU:0", "mixes")):
        with pytest.raises(DareError, match=message):
            parse_devices(bad)


def test_one_device_means_no_strategy():
    auto = distribution()  # this machine: no GPU
    assert auto.replicas == 1 and auto.strategy_name == "default"
    assert auto.strategy is B.default_strategy()
    assert auto.devices == ((distribute.visible_devices("GPU") or ["CPU:0"])[0],)
    named = distribution("CPU:0", "mixed_bfloat16")
    assert named.replicas == 1 and not named.placed  # the default device: nothing to place
    assert named.summary(32) == ("distribution: one device (CPU:0), no strategy, global batch "
                                 "32 = 32 per replica; precision mixed_bfloat16")
    with pytest.raises(DareError, match="not visible"):
        distribution("GPU:7")


def test_global_batch_and_xla_under_a_strategy():
    class Fake:  # a strategy's only property used here
        num_replicas_in_sync = 4

    d = Distribution(Fake(), ("GPU:0", "GPU:1", "GPU:2", "GPU:3"), "float32")
    assert d.per_replica_batch(128) == 32
    assert d.describe(128)["per_replica_batch_size"] == 32
    with pytest.raises(DareError, match="multiple of the 4 replicas"):
        d.check_batch(130)
    # XLA cannot compile a MirroredStrategy step; on JAX every step is compiled
    assert d.jit_compile(True) is (B.name() == "jax")
    assert distribution().jit_compile(True) is True


def test_configs_take_devices_and_precision():
    for make in (lambda **k: TrainConfig.resolve("smallcnn", "fashion_mnist", **k),
                 FinetuneConfig, DareConfig):
        assert make(devices="gpu:0, gpu:1").devices == "GPU:0,GPU:1"
        assert make().devices is None and make().precision == "float32"
        with pytest.raises(DareError, match="--precision"):
            make(precision="float8")
        with pytest.raises(DareError, match="--devices"):
            make(devices="GPU:0,GPU:0")


@pytest.mark.parametrize("script", ["train/train.py", "adv/adv_training.py",
                                    "adv/fintune_adv.py", "dare/dare.py", "dare/dare-sl.py"])
def test_scripts_have_the_options(script):
    proc = call_script(script, "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "--devices" in text and "--precision" in text and "mixed_float16" in text
    assert "global batch size" in text and "batch/replicas" in text
    # multi-worker is broken with Keras 3 (argparse may wrap the name at its hyphen)
    assert "keras-team/keras#20585" in text.replace("keras- team", "keras-team")


@pytest.mark.parametrize(("args", "message"), [
    (["--devices", "GPU:7"], "not visible"),
    (["--devices", "GPU"], "not a device name"),
    (["--precision", "float8"], "invalid choice"),
])
def test_bad_devices_stop_before_any_work(tmp_path, args, message):
    proc = call_script("train/train.py", "--model", "smallcnn", "--dataset", "fashion_mnist",
                       "--run-dir", tmp_path / "r", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_logits_losses_and_weights_float32(tmp_path, precision):
    before = keras.config.dtype_policy().name
    with distribution(None, precision).scope():
        model = get_architecture("smallcnn").build((28, 28, 1), 10)
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert keras.config.dtype_policy().name == before  # the scope restores the policy
    assert model.get_layer("fc1").compute_dtype == precision.removeprefix("mixed_")
    assert model.get_layer("logits").compute_dtype == "float32"
    assert model.outputs[0].dtype == "float32"
    assert {w.dtype for w in model.weights} == {"float32", COUNT}
    # float16 needs loss scaling: compile wraps the optimizer (bfloat16 has float32's range)
    scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (precision == "mixed_float16")
    x = np.random.default_rng(0).uniform(size=(8, 28, 28, 1)).astype("float32")
    logs = model.train_on_batch(x, np.arange(8) % 10, return_dict=True)
    assert np.isfinite(logs["loss"])
    # the weights file loads into a float32 model of the architecture
    path = tmp_path / "m.weights.h5"
    keras.Model(model.inputs, model.outputs).save_weights(path)
    plain = get_architecture("smallcnn").build((28, 28, 1), 10)
    plain.load_weights(path)
    assert plain.get_layer("fc1").compute_dtype == "float32"
    for a, b in zip(plain.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_mixed_float16_run_resumes_in_float32(tmp_path, tiny):
    """Loss-scaled training writes the same history and optimizer files; a run can go on in
    another precision (the loss scale is kept apart from the optimizer's own state)."""
    rd = tmp_path / "mixed"
    cfg = TrainConfig.resolve(tiny, "fashion_mnist", precision="mixed_float16",
                              run_dir=str(rd), **{**COMMON, "subset": 128, "batch_size": 32,
                                                  "deterministic": False})
    train(cfg)
    state = io.read_npz(rd / layout.OPTIMIZER)
    assert "loss_scale" in state and state["loss_scale"] > 0
    run = Run(rd)
    assert run.config["train"]["distribution"]["precision"] == "mixed_float16"
    train(TrainConfig.from_options({"run_dir": str(rd), "resume": True, "epochs": 2,
                                    "precision": "float32"}))
    assert run.history_epochs() == [1, 2] and [int(r["epoch"]) for r in _log(rd)] == [1, 2]
    assert all(np.isfinite(float(r["loss"])) for r in _log(rd))
    model = run.load_model()
    assert model.get_layer("fc").compute_dtype == "float32"
    assert not np.array_equal(run.load_model(1).get_weights()[-2], model.get_weights()[-2])


def test_batched_augmentation_makes_the_per_image_batches():
    """``TrainBatches`` augments a whole batch with one fancy index: every image must be
    exactly what a per-image pad-crop-flip with that image's draws makes, whatever the batch
    size (an image's draws depend on ``(seed, epoch, index)`` alone), and the batches of an
    epoch do not depend on the epochs before it (resume depends on it)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(40, 12, 12, 3)).astype("float32")
    y = rng.integers(0, 10, 40)
    cfg = TrainConfig.resolve("smallcnn", "fashion_mnist", epochs=3, batch_size=16,
                              augment="crop-flip", seed=3)

    def per_image(e):  # the reference: one image at a time, with np.pad and slicing
        order, dy, dx, flip = epoch_draws(cfg.seed, e, len(x))
        out = []
        for i in order:
            p = np.pad(x[i], ((PAD, PAD), (PAD, PAD), (0, 0)))[dy[i]:dy[i] + 12,
                                                                dx[i]:dx[i] + 12]
            out.append((p[:, ::-1] if flip[i] else p, y[i]))
        return out

    reference = per_image(1) + per_image(2)
    ours, steps = train_dataset(x, y, cfg, initial_epoch=1)
    got = [(a, b) for xb, yb in ours for a, b in zip(xb, yb, strict=True)]
    assert steps == 3 and len(list(ours)) == 6 and len(got) == len(reference) == 80
    for (xa, ya), (xb, yb) in zip(got, reference, strict=True):
        np.testing.assert_array_equal(xa, xb)
        assert ya == yb
    # Another batch size regroups the same augmented images; the crops do move images.
    other, _ = train_dataset(x, y, dataclasses.replace(cfg, batch_size=7), initial_epoch=1)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in other]),
                                  np.stack([a for a, _ in got]))
    assert not np.array_equal(np.stack([a for a, _ in got[:40]]), x[epoch_draws(3, 1, 40)[0]])
    plain = dataclasses.replace(cfg, augment="none")
    batches = list(train_dataset(x, y, plain, 0)[0])
    assert sorted(np.concatenate([b[1] for b in batches[:3]]).tolist()) == sorted(y.tolist())
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches[:3]]),
                                  x[epoch_draws(3, 0, 40)[0]])
