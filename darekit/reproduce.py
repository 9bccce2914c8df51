"""The whole study in one call: train with history, slice, mine, DARE / DARE-S / DARE-SL,
adversarial examples and fine-tuning baselines, optionally PGD adversarial training, then the
evaluation and its report.

Stages whose outputs exist are skipped, and the long ones (training, attack generation,
evaluation) resume from inside, so rerunning the same command after a crash continues.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darekit import io
from darekit.adv_finetune import AdvFinetuneConfig, adv_finetune
from darekit.adv_finetune import model_name as adv_model_name
from darekit.adv_training import AdvTrainConfig, adv_train
from darekit.attacks import DEFAULT_ATTACKS, GenerateConfig, adv_path, generate
from darekit.dare import VARIANTS, DareConfig, run_dare
from darekit.errors import DareError
from darekit.evaluate import EVAL_DIR, EvalConfig, SearchConfig, evaluate_run
from darekit.finetune import FinetuneConfig
from darekit.mining import DATA as MINED
from darekit.mining import MineConfig, run_mining
from darekit.paths import default_run_dir
from darekit.rundir import Run
from darekit.slicing import MASKS, SliceConfig, run_slicing
from darekit.training import TrainConfig, train

PGD_AT_MODEL = "pgd-at"


@dataclass(frozen=True)
class Profile:
    """Every stage's options for one scale of the study."""

    name: str
    doc: str
    train: dict[str, Any]                 # TrainConfig overrides (architecture defaults else)
    slice: SliceConfig
    mine: MineConfig
    dare: dict[str, Any]                  # DareConfig overrides, shared by the three variants
    generate: GenerateConfig
    adv_finetune: AdvFinetuneConfig
    pgd_at: dict[str, Any]                # AdvTrainConfig overrides (Madry's recipe else)
    evaluate: EvalConfig
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # per attack
    baselines: tuple[str, ...] | None = None  # attacks with a fine-tuning baseline; None: all


QUICK_ATTACKS = {
    "pgd": {"steps": 7, "rel_stepsize": 2.5 / 7},
    "bim": {"steps": 5, "rel_stepsize": 0.4},
    "cw": {"binary_search_steps": 3, "steps": 20},
    "deepfool": {"steps": 20, "candidates": 4},
}
"""Cheaper attack budgets for the quick profile (fewer steps, same step lengths in units of
epsilon); the paper profile uses the registered defaults (``darekit.attacks``)."""

PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile(
        name="quick",
        doc="real Fashion-MNIST at CPU scale: 4,000 training images (2,000 x_train), short "
            "schedules, approximate slicing, fine-tuning baselines for FGSM and PGD only "
            "(300 adversarial examples each), cheaper attack budgets, 100 test images",
        train={"subset": 4000, "epochs": 5, "lr": 0.01, "milestones": (4,),
               "test_subset": 1000, "batch_size": 64},
        slice=SliceConfig(max_per_class=20, mode="approx"),
        mine=MineConfig(max_inputs=1000),
        dare={"epochs": 3, "batch_size": 32},
        generate=GenerateConfig(n=300),
        adv_finetune=AdvFinetuneConfig(finetune=FinetuneConfig(lr=1e-3, epochs=3)),
        pgd_at={"subset": 4000, "epochs": 5, "lr": 0.01, "milestones": (4,),
                "test_subset": 500, "batch_size": 64},
        evaluate=EvalConfig(n=100, search=SearchConfig(grid=4, max_rounds=2)),
        attack_params=QUICK_ATTACKS,
        baselines=("fgsm", "pgd"),
    ),
    Profile(
        name="paper",
        doc="the paper's scale (for GPUs): the full training set and each architecture's "
            "schedule, K=200 images per class for exact slicing, all of x_validation mined, "
            "5,000 adversarial examples per attack, 1,000 test images",
        train={},
        slice=SliceConfig(),
        mine=MineConfig(),
        dare={},
        generate=GenerateConfig(n=5000),
        adv_finetune=AdvFinetuneConfig(),
        pgd_at={},
        evaluate=EvalConfig(n=1000),
    ),
)}


@dataclass(frozen=True)
class Study:
    """One invocation: a dataset, an architecture, a profile and the run directory."""

    dataset: str
    model: str
    profile: Profile
    seed: int = 0
    run_dir: Path | None = None
    pgd_at: bool = False
    attacks: tuple[str, ...] = DEFAULT_ATTACKS

    @property
    def path(self) -> Path:
        return self.run_dir or default_run_dir(self.dataset, self.model, self.seed).with_name(
            f"{self.dataset}-{self.model}-{self.profile.name}-s{self.seed}")


@dataclass(frozen=True)
class Stage:
    name: str
    done: Callable[[Study], bool]
    run: Callable[[Study], Any]


def _train(s: Study) -> None:
    cfg = TrainConfig.resolve(s.model, s.dataset, **{"verbose": 2, **s.profile.train},
                              seed=s.seed, run_dir=str(s.path),
                              resume=(s.path / "config.json").is_file())
    train(cfg)


def _trained(s: Study) -> bool:
    if not (s.path / "config.json").is_file():
        return False
    run = Run(s.path)
    return run.completed_epochs() >= int(run.train_config["epochs"])


def _pgd_at(s: Study) -> None:
    sub = s.path / "pgd-at-run"
    cfg = AdvTrainConfig.resolve(s.model, s.dataset, **{"verbose": 2, **s.profile.pgd_at},
                                 seed=s.seed, run_dir=str(sub),
                                 resume=(sub / "config.json").is_file())
    pgd_run = adv_train(cfg)
    # Same architecture, same seed and subset, hence the same x_train: the PGD-trained
    # classifier is one more model of this run for the evaluation.
    Run(s.path).save_model(pgd_run.load_model(), PGD_AT_MODEL)


def _stages(s: Study) -> list[Stage]:
    run = lambda: Run.open(s.path)
    stages = [
        Stage("train", _trained, _train),
        Stage("slice", lambda s: (s.path / MASKS).is_file(),
              lambda s: run_slicing(run(), s.profile.slice)),
        Stage("mine", lambda s: (s.path / MINED).is_file(),
              lambda s: run_mining(run(), s.profile.mine)),
    ]
    for v in VARIANTS:
        stages.append(Stage(v, lambda s, v=v: Run(s.path).model_path(v).is_file(),
                            lambda s, v=v: run_dare(run(), DareConfig(variant=v, verbose=2,
                                                                      **s.profile.dare))))
    baselines = s.attacks if s.profile.baselines is None else \
        tuple(a for a in s.attacks if a in s.profile.baselines)
    for a in baselines:
        gen = dataclasses.replace(s.profile.generate, attacks=(a,),
                                  params=dict(s.profile.attack_params.get(a, {})))
        stages.append(Stage(f"generate {a}", lambda s, a=a: adv_path(Run(s.path), "train",
                                                                     a).is_file(),
                            lambda s, a=a, gen=gen: generate(run(), gen, a)))
        stages.append(Stage(f"adv-finetune {a}",
                            lambda s, a=a: Run(s.path).model_path(adv_model_name(a)).is_file(),
                            lambda s, a=a: adv_finetune(run(), a, s.profile.adv_finetune,
                                                        verbose=2)))
    if s.pgd_at:
        stages.append(Stage("pgd-at", lambda s: Run(s.path).model_path(PGD_AT_MODEL).is_file(),
                            _pgd_at))
    ev = dataclasses.replace(s.profile.evaluate, attacks=s.attacks, params={
        a: s.profile.attack_params[a] for a in s.attacks if a in s.profile.attack_params})
    stages.append(Stage("evaluate", lambda s: False, lambda s: evaluate_run(run(), ev)))
    return stages


def reproduce(s: Study, log: Callable[[str], Any] = print) -> Run:
    """Run every stage that has not finished; return the run. See the module docstring."""
    stages = _stages(s)
    io.write_json(s.path / "reproduce.json", {
        "dataset": s.dataset, "model": s.model, "profile": s.profile.name, "seed": s.seed,
        "pgd_at": s.pgd_at, "attacks": list(s.attacks), "stages": [st.name for st in stages]})
    t_all = time.perf_counter()
    for i, st in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {st.name}"
        if st.done(s):
            log(f"{head}: done already, skipped")
            continue
        log(f"{head} ...")
        t0 = time.perf_counter()
        st.run(s)
        log(f"{head}: finished in {time.perf_counter() - t0:.0f}s "
            f"(total {time.perf_counter() - t_all:.0f}s)")
    report = s.path / EVAL_DIR / "report.md"
    if not report.is_file():
        raise DareError(f"the evaluation wrote no report at {report}")
    log(f"report: {report}\nplots: {report.parent / 'robust_accuracy.png'}, "
        f"{report.parent / 'er.png'}")
    return Run(s.path)
