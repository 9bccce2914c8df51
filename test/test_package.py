"""The package as a whole: cheap import, one source of defaults, every script's help, the
README's model-first example."""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys

import pytest
from conftest import call_script

import darekit
from darekit.paths import ROOT

SCRIPTS = ["train/train.py", "train/alexnet.py", "train/import_history.py",
           "dare/nnslicer.py", "dare/get_ats.py", "dare/dare.py", "dare/dare-s.py",
           "dare/dare-sl.py", "dare/test.py", "adv/generate_adv.py", "adv/fintune_adv.py",
           "adv/adv_training.py", "reproduce.py"]
CONFIGS = ["darekit.training:TrainConfig", "darekit.slicing:SliceConfig",
           "darekit.mining:MineConfig", "darekit.dare:DareConfig",
           "darekit.finetune:FinetuneConfig", "darekit.adv_finetune:AdvFinetuneConfig",
           "darekit.advsets:GenerateConfig", "darekit.adv_training:PGDConfig",
           "darekit.evaluate:EvalConfig", "darekit.evaluate:SearchConfig",
           "darekit.crosscheck:CrossCheckConfig", "darekit.importer:ImportConfig"]


def test_import_darekit_does_not_import_tensorflow():
    code = "import sys, darekit, darekit.data, darekit.layout, darekit.config; " \
           "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.split() == ["False", "False"]


def test_the_model_first_api_resolves():
    for name in darekit.API:
        assert getattr(darekit, name) is not None, name
    with pytest.raises(AttributeError):
        darekit.no_such_thing  # noqa: B018


@pytest.mark.parametrize("target", CONFIGS)
def test_every_option_has_help_and_no_help_restates_a_default(target):
    module, name = target.split(":")
    cls = getattr(importlib.import_module(module), name)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", False):
            continue
        text = f.metadata["help"]
        text = text() if callable(text) else text
        assert text, f"{name}.{f.name} has no help"
        # The default is shown from the field (or default_text); a help string that spells
        # one out by hand drifts (dare.py --help once gave a learning rate the code did not use).
        assert not re.search(r"\bdefault\b", text), f"{name}.{f.name}: {text!r}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help(script):
    proc = call_script(script, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_help_shows_the_defaults_the_code_uses():
    from darekit.models import get_architecture

    proc = call_script("dare/dare.py", "--help")
    text = " ".join(proc.stdout.split())
    assert f"alexnet {get_architecture('alexnet').dare_lr:g}" in text
    assert f"vgg16 {get_architecture('vgg16').dare_lr:g}" in text
    proc = call_script("train/alexnet.py", "--help")
    text = " ".join(proc.stdout.split())
    assert f"(default: {get_architecture('alexnet').train_defaults['epochs']})" in text


README_EXAMPLE = re.compile(r"```python\n(import darekit as dk.*?)```", re.S)


@pytest.mark.slow
def test_the_readme_example_runs_on_a_model_trained_with_plain_keras(tmp_path, monkeypatch):
    """The README's notebook example, as printed, on a small CNN trained here with plain
    ``model.fit`` and ``ModelCheckpoint`` (not through darekit). The example loads the whole
    training set (30,000 images mined: minutes); here ``dk.load_dataset`` gives its first
    6,000 images (3,000 mined), which the example's code cannot tell apart."""
    import dataclasses

    import keras
    import numpy as np

    import darekit
    from darekit.data import load_dataset

    ds = load_dataset("fashion_mnist")
    small = dataclasses.replace(ds, x_train=ds.x_train[:6000], y_train=ds.y_train[:6000])
    monkeypatch.setattr(darekit, "load_dataset", lambda name, **kw: small)
    keep = np.arange(1000)
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", name="c1")(inputs)
    h = keras.layers.ReLU(name="r1")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(32, 3, padding="same", name="c2")(h)
    h = keras.layers.ReLU(name="r2")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.ReLU(name="fc_relu")(keras.layers.Dense(64, name="fc")(h))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(h))
    model.compile("adam", "sparse_categorical_crossentropy")
    (tmp_path / "ckpts").mkdir()
    model.fit(ds.x_train[keep], ds.y_train[keep], epochs=3, batch_size=64, verbose=0,
              callbacks=[keras.callbacks.ModelCheckpoint(
                  str(tmp_path / "ckpts" / "epoch_{epoch:02d}.keras"))])
    model.save(tmp_path / "my.keras")

    example = README_EXAMPLE.search((ROOT / "README.md").read_text())
    assert example, "README.md has no model-first example"
    code = example.group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 13
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert 0 < scope["report"].er < 1 and scope["report"].fooled.any()
