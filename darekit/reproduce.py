"""The whole study in one call: train with history, slice, mine, DARE / DARE-S / DARE-SL,
adversarial examples and fine-tuning baselines, optionally PGD adversarial training, then the
evaluation and its report; over several seeds (and datasets and architectures), a combined
report.

A study is a list of independent jobs, one per (dataset, architecture, seed), each in its own
run directory. Stages whose outputs exist are skipped, and the long ones (training, attack
generation, evaluation) resume from inside, so rerunning the same command after a crash
continues; a finished job is skipped as a whole.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darekit import io, layout
from darekit.adv_finetune import AdvFinetuneConfig, adv_finetune
from darekit.adv_finetune import model_name as adv_model_name
from darekit.adv_training import AdvTrainConfig, adv_train
from darekit.advsets import GenerateConfig, adv_path, generate
from darekit.attacks import DEFAULT_ATTACKS
from darekit.dare import VARIANTS, DareConfig, run_dare
from darekit.errors import DareError
from darekit.evaluate import EvalConfig, SearchConfig, evaluate_run
from darekit.finetune import FinetuneConfig
from darekit.mining import MineConfig, run_mining
from darekit.paths import runs_dir
from darekit.rundir import Run
from darekit.slicing import SliceConfig, run_slicing
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


QUICK_CROSSCHECK = {"apgd_iter": 50, "dlr_targets": 1, "square_queries": 300}
"""The quick profile's reduced cross-check (on 50 of its 100 test images): APGD-CE and one
targeted APGD-DLR run of 50 iterations, Square with 300 queries, and the transfer attack."""

PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile(
        name="quick",
        doc="real Fashion-MNIST at CPU scale: 4,000 training images (2,000 x_train), short "
            "schedules, approximate slicing, fine-tuning baselines for FGSM and PGD only "
            "(300 adversarial examples each), 100 test images with the precise search, a "
            "reduced cross-check on 50 of them",
        train={"subset": 4000, "epochs": 5, "lr": 0.01, "milestones": (4,),
               "test_subset": 1000, "batch_size": 64},
        slice=SliceConfig(max_per_class=20, mode="approx"),
        mine=MineConfig(max_inputs=1000),
        dare={"epochs": 3, "batch_size": 32},
        generate=GenerateConfig(n=300),
        adv_finetune=AdvFinetuneConfig(finetune=FinetuneConfig(lr=1e-3, epochs=3)),
        pgd_at={"subset": 4000, "epochs": 5, "lr": 0.01, "milestones": (4,),
                "test_subset": 500, "batch_size": 64},
        evaluate=EvalConfig(n=100, search=SearchConfig(), crosscheck_n=50,
                            crosscheck_params=QUICK_CROSSCHECK),
        baselines=("fgsm", "pgd"),
    ),
    Profile(
        name="paper",
        doc="the paper's scale (for GPUs): the full training set and each architecture's "
            "schedule, K=200 images per class for exact slicing, all of x_validation mined, "
            "5,000 adversarial examples per attack, 1,000 test images, the full cross-check",
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
    """One job: a dataset, an architecture, a profile, a seed and the run directory."""

    dataset: str
    model: str
    profile: Profile
    seed: int = 0
    run_dir: Path | None = None
    pgd_at: bool = False
    attacks: tuple[str, ...] = DEFAULT_ATTACKS

    @property
    def path(self) -> Path:
        return self.run_dir or runs_dir() / study_name(self.dataset, self.model,
                                                       self.profile.name, self.seed)


def study_name(dataset: str, model: str, profile: str, seed: int) -> str:
    """``<dataset>-<model>-<profile>-s<seed>``: a job's run directory under ``runs/``."""
    return f"{dataset}-{model}-{profile}-s{seed}"


@dataclass(frozen=True)
class Stage:
    name: str
    done: Callable[[Study], bool]
    run: Callable[[Study], Any]


def _train(s: Study) -> None:
    cfg = TrainConfig.resolve(s.model, s.dataset, **{"verbose": 2, **s.profile.train},
                              seed=s.seed, run_dir=str(s.path),
                              resume=(s.path / layout.CONFIG).is_file())
    train(cfg)


def _trained(s: Study) -> bool:
    if not (s.path / layout.CONFIG).is_file():
        return False
    run = Run(s.path)
    return run.completed_epochs() >= int(run.train_config["epochs"])


def _pgd_at(s: Study) -> None:
    sub = s.path / layout.PGD_AT_RUN
    cfg = AdvTrainConfig.resolve(s.model, s.dataset, **{"verbose": 2, **s.profile.pgd_at},
                                 seed=s.seed, run_dir=str(sub),
                                 resume=(sub / layout.CONFIG).is_file())
    pgd_run = adv_train(cfg)
    # Same architecture, same seed and subset, hence the same x_train: the PGD-trained
    # classifier is one more model of this run for the evaluation.
    Run(s.path).save_model(pgd_run.load_model(), PGD_AT_MODEL)


def evaluation_config(s: Study) -> EvalConfig:
    """The profile's evaluation, on the study's attacks, with the profile's attack budgets.
    Its seed is the profile's, not the job's: every seed of a study is evaluated on the same
    test images with the same attack draws, so seeds differ only in what they trained."""
    return dataclasses.replace(s.profile.evaluate, attacks=s.attacks, params={
        a: s.profile.attack_params[a] for a in s.attacks if a in s.profile.attack_params})


def _stages(s: Study) -> list[Stage]:
    run = lambda: Run.open(s.path)
    stages = [
        Stage("train", _trained, _train),
        Stage("slice", lambda s: (s.path / layout.MASKS).is_file(),
              lambda s: run_slicing(run(), s.profile.slice)),
        Stage("mine", lambda s: (s.path / layout.MINED).is_file(),
              lambda s: run_mining(run(), s.profile.mine)),
    ]
    finished = lambda s, name: Run(s.path).model_path(name).is_file() or \
        name in Run(s.path).diverged_models()
    for v in VARIANTS:
        stages.append(Stage(v, lambda s, v=v: finished(s, v),
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
                            lambda s, a=a: finished(s, adv_model_name(a)),
                            lambda s, a=a: adv_finetune(run(), a, s.profile.adv_finetune,
                                                        verbose=2)))
    if s.pgd_at:
        stages.append(Stage("pgd-at", lambda s: Run(s.path).model_path(PGD_AT_MODEL).is_file(),
                            _pgd_at))
    stages.append(Stage("evaluate", lambda s: False,
                        lambda s: evaluate_run(run(), evaluation_config(s))))
    return stages


def reproduce(s: Study, log: Callable[[str], Any] = print) -> Run:
    """Run every stage of one job that has not finished; return the run."""
    stages = _stages(s)
    io.write_json(s.path / layout.REPRODUCE, {
        "dataset": s.dataset, "model": s.model, "profile": s.profile.name, "seed": s.seed,
        "pgd_at": s.pgd_at, "attacks": list(s.attacks), "stages": [st.name for st in stages]})
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    for i, st in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {st.name}"
        if st.done(s):
            log(f"{head}: done already, skipped")
            continue
        log(f"{head} ...")
        t0 = time.perf_counter()
        st.run(s)
        timings[st.name] = round(time.perf_counter() - t0, 1)
        log(f"{head}: finished in {timings[st.name]:.0f}s "
            f"(total {time.perf_counter() - t_all:.0f}s)")
    _record_timings(s.path, timings)
    report = s.path / layout.REPORT
    if not report.is_file():
        raise DareError(f"the evaluation wrote no report at {report}")
    log(f"report: {report}\nplots: {s.path / layout.PLOT_ROBUST}, {s.path / layout.PLOT_ER}")
    return Run(s.path)


def _record_timings(path: Path, timings: dict[str, float]) -> None:
    """``reproduce.json`` keeps the wall time of every stage that ran (latest sitting wins)."""
    meta = io.read_json(path / layout.REPRODUCE)
    meta["seconds"] = {**meta.get("seconds", {}), **timings}
    io.write_json(path / layout.REPRODUCE, meta)


# ---------------------------------------------------------------------------- several jobs
def combined_dir(studies: Sequence[Study]) -> Path:
    """Where the combined report of several jobs goes:
    ``runs/report-<profile>-<datasets>-<models>-s<seeds>``."""
    part = lambda values: "+".join(dict.fromkeys(str(v) for v in values))
    s0 = studies[0]
    return runs_dir() / (f"report-{s0.profile.name}-{part(s.dataset for s in studies)}-"
                         f"{part(s.model for s in studies)}-s{part(s.seed for s in studies)}")


def write_combined(studies: Sequence[Study], out: Path | None = None) -> Path:
    """The combined report of every finished job among ``studies`` (seeds: mean ± std)."""
    from darekit import report

    done = [s for s in studies if (s.path / layout.RESULTS_JSON).is_file()]
    if not done:
        raise DareError("no job has finished its evaluation yet; nothing to combine")
    out = out or combined_dir(studies)
    text = report.combined_report([report.Evaluated.load(s.path) for s in done], out)
    io.write_text(out / "report.md", text)
    return out / "report.md"


def reproduce_all(studies: Sequence[Study], log: Callable[[str], Any] = print) -> Path | None:
    """Run the jobs one after the other; with more than one, write the combined report."""
    for k, s in enumerate(studies, 1):
        if len(studies) > 1:
            log(f"=== job {k}/{len(studies)}: {s.dataset} {s.model} seed {s.seed} -> {s.path}")
        reproduce(s, log)
    if len(studies) > 1:
        path = write_combined(studies)
        log(f"combined report: {path}")
        return path
    return None
