"""The adversarial sets of a run (``adv/generate_adv.py``): one resumable file per attack.

``generate(run, cfg, attack)`` attacks a seeded class-balanced sample of the run's ``x_train``
(or test images) with the final model and writes ``adv/<split>-<attack>.npz`` (+ ``.json``:
configuration and summary). Chunks are saved as they finish under ``adv/parts/``, so a killed
run resumes; ``load_adversarial`` reads a set back.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from darekit import io, layout
from darekit.attacks import (
    ATTACKS,
    DEFAULT_ATTACKS,
    AttackResult,
    attack_config,
    check_eps,
    get_spec,
    parse_attacks,
    run_attack,
)
from darekit.config import option
from darekit.data import balanced_subset, budgets_text
from darekit.errors import DareError
from darekit.rundir import Run
from darekit.seeding import derive_seed

SPLITS = ("train", "test")


def adv_path(run: Run, split: str, attack: str) -> Path:
    """``<run>/adv/<split>-<attack>.npz``."""
    return run.file(layout.adv_set(split, attack))


@dataclass(frozen=True)
class GenerateConfig:
    """Options of ``adv/generate_adv.py``. Images are a seeded class-balanced sample
    (``data.balanced_subset``) of ``n`` images of the split (all of them if it has fewer)."""

    attacks: tuple[str, ...] = option(
        DEFAULT_ATTACKS, "attacks, comma-separated; 'all' = the paper's five",
        parse=lambda s: parse_attacks([s]), flag="--attack", metavar="NAMES")
    split: str = option("train", "images to attack: the run's x_train (as the DARE artifact "
                        "does) or the test set", choices=SPLITS)
    n: int = option(5000, "number of images, a seeded class-balanced sample (all of them if "
                    "the split has fewer)")
    eps: float | None = option(None, "budget in each attack's norm",
                               default_text=lambda: budgets_text() + "; C&W and DeepFool "
                               "unclipped")
    params: Mapping[str, Any] = option(default_factory=dict, cli=False)
    seed: int | None = option(None, "image sample and random starts",
                              default_text="the run's seed")
    batch_size: int = option(256, "images per attack call")
    chunk_size: int = option(1000, "images per resumable chunk")
    progress: bool = option(True, "progress bars")

    def __post_init__(self) -> None:
        object.__setattr__(self, "attacks", parse_attacks(self.attacks))
        if self.split not in SPLITS:
            raise DareError(f"--split must be one of {list(SPLITS)}; received {self.split!r}")
        if self.eps is not None:
            check_eps(self.eps)
        for name in ("n", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise DareError(f"--{name.replace('_', '-')} must be a positive integer; "
                                f"received {getattr(self, name)}")
        for key in self.params:
            if not any(key in ATTACKS[a].defaults for a in self.attacks):
                raise DareError(f"--param {key}: none of the attacks {list(self.attacks)} "
                                "takes it")

    def params_for(self, attack: str) -> dict[str, Any]:
        """The ``--param`` values that ``attack`` takes."""
        return {k: v for k, v in self.params.items() if k in ATTACKS[attack].defaults}


def select_images(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded class-balanced sample of ``n`` of ``y`` (all if fewer)."""
    return np.arange(len(y), dtype=np.int64) if n >= len(y) else balanced_subset(y, n, seed)


def _chunk_seed(seed: int, chunk: int) -> int:
    # One independent seed per chunk (Foolbox's random starts: TensorFlow's global RNG or
    # eagerpy's JAX key), so a resumed run redraws exactly the same random starts.
    return derive_seed(seed, chunk)


def generate(run: Run, cfg: GenerateConfig, attack: str, *,
             max_chunks: int | None = None) -> Path | None:
    """Write ``<run>/adv/<split>-<attack>.npz`` (see ``adv/generate_adv.py``); return its path.

    Chunks of ``cfg.chunk_size`` images are saved atomically under ``<run>/adv/parts/``; a
    rerun skips the finished ones, then the final file is assembled and the parts removed.
    ``max_chunks`` stops after computing that many chunks (returns ``None``): for tests.
    """
    spec = get_spec(attack)
    seed = run.seed if cfg.seed is None else int(cfg.seed)
    data = run.data()
    x_all, y_all = (data.x_train, data.y_train) if cfg.split == "train" else \
        (data.x_test, data.y_test)
    idx = select_images(y_all, cfg.n, seed)
    eps = spec.epsilon(run.dataset_name, cfg.eps)
    params = cfg.params_for(attack)
    config = {**attack_config(spec, eps, params), "split": cfg.split, "n": len(idx),
              "n_requested": cfg.n, "selection": "class-balanced (data.balanced_subset)",
              "seed": seed, "batch_size": cfg.batch_size, "chunk_size": cfg.chunk_size,
              "model": run.model_name, "dataset": run.dataset_name,
              "model_epoch": run.history_epochs()[-1]}
    out = adv_path(run, cfg.split, attack)
    if out.is_file() and json.loads(str(io.read_npz(out)["config"])) == config:
        print(f"{out}: already done")
        return out

    parts = run.file(layout.adv_parts(cfg.split, attack))
    plan = parts / "plan.json"
    if plan.is_file() and io.read_json(plan) != {"config": config, "idx": idx.tolist()}:
        print(f"{parts}: made with other options; starting over")
        shutil.rmtree(parts)
    io.write_json(plan, {"config": config, "idx": idx.tolist()})
    io.remove_stale_tmp(parts)

    model = run.load_model()
    starts = range(0, len(idx), cfg.chunk_size)
    computed = 0
    for c, start in enumerate(tqdm(starts, desc=f"{attack} chunks", unit="chunk",
                                   disable=not cfg.progress)):
        path = parts / f"chunk_{c:05d}.npz"
        if path.is_file():
            continue
        if max_chunks is not None and computed >= max_chunks:
            return None
        sel = idx[start:start + cfg.chunk_size]
        res = run_attack(model, x_all[sel], y_all[sel], spec, eps=eps, params=params,
                         batch_size=cfg.batch_size, seed=_chunk_seed(seed, c),
                         progress=cfg.progress)
        io.write_npz(path, x_adv=res.x_adv, success=res.success,
                     clean_correct=res.clean_correct, linf=res.linf, l2=res.l2)
        computed += 1

    chunks = [io.read_npz(parts / f"chunk_{c:05d}.npz") for c in range(len(starts))]
    cat = lambda k: np.concatenate([ch[k] for ch in chunks])
    result = AttackResult(cat("x_adv"), cat("success"), cat("clean_correct"), cat("linf"),
                          cat("l2"), config)
    io.write_npz(out, x_adv=result.x_adv, idx=idx, y=y_all[idx], success=result.success,
                 clean_correct=result.clean_correct, linf=result.linf, l2=result.l2,
                 config=np.asarray(json.dumps(config)))
    io.write_json(out.with_suffix(".json"), {"config": config, "summary": result.summary()})
    shutil.rmtree(parts)
    with contextlib.suppress(OSError):  # adv/parts/ itself, once no attack has parts left
        parts.parent.rmdir()
    return out


@dataclass(frozen=True, eq=False)
class AdvSet:
    """A generated adversarial set: ``x_adv`` ``(N, H, W, C)``, ``idx`` (indices into the
    split's arrays), ``y``, ``success``, ``clean_correct``, ``linf``, ``l2`` ``(N,)``."""

    x_adv: np.ndarray
    idx: np.ndarray
    y: np.ndarray
    success: np.ndarray
    clean_correct: np.ndarray
    linf: np.ndarray
    l2: np.ndarray
    config: dict[str, Any]


def load_adversarial(run: Run, attack: str, split: str = "train") -> AdvSet:
    """Read ``<run>/adv/<split>-<attack>.npz``; a missing file is a ``DareError``."""
    path = adv_path(run, split, get_spec(attack).name)
    if not path.is_file():
        raise DareError(f"no adversarial set {path}; make it first with python "
                        f"adv/generate_adv.py --run-dir {run.path} --attack {attack}"
                        + ("" if split == "train" else f" --split {split}"))
    z = io.read_npz(path)
    return AdvSet(x_adv=z["x_adv"], idx=z["idx"], y=z["y"], success=z["success"],
                  clean_correct=z["clean_correct"], linf=z["linf"], l2=z["l2"],
                  config=json.loads(str(z["config"])))
