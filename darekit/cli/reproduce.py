"""``reproduce.py``: the whole study in one command; several jobs as a sweep."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from darekit.cli import RERUN, Parser, int_list, parse_args, positive_int, run


def _names(s: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in s.split(",") if t.strip())


def parser() -> Parser:
    from darekit.attacks import ATTACKS
    from darekit.data import DATASETS
    from darekit.models import ARCHITECTURES
    from darekit.reproduce import PROFILES

    p = Parser(prog="reproduce.py", description="Train with history, slice, mine, DARE / "
               "DARE-S / DARE-SL, adversarial examples and fine-tuning baselines, optionally "
               "PGD adversarial training, evaluation and report; one job per (dataset, model, "
               "seed), each in its own run directory, then a combined report. Finished stages "
               "are skipped: rerun the same command to continue after an interruption. With "
               "several jobs the command is a sweep: each job runs in its own process (the "
               "command --list-jobs prints), its output in <run dir>/reproduce.log; finished "
               "jobs (eval/results.json written and reproduce.json marked finished) are "
               "skipped, failed ones are listed and the exit code is 1.")
    p.add_argument("--dataset", "--datasets", dest="datasets", type=_names,
                   default=("fashion_mnist",), metavar="NAMES",
                   help=f"comma-separated, of {', '.join(sorted(DATASETS))} "
                        "(default: fashion_mnist)")
    p.add_argument("--model", "--models", dest="models", type=_names, default=("alexnet",),
                   metavar="NAMES", help=f"comma-separated, of {', '.join(sorted(ARCHITECTURES))}"
                   " (default: alexnet)")
    p.add_argument("--profile", choices=list(PROFILES), default="quick",
                   help="; ".join(f"{k}: {v.doc}" for k, v in PROFILES.items()))
    p.add_argument("--seed", "--seeds", dest="seeds", type=int_list, default=(0,),
                   metavar="SEEDS", help="one seed per job, comma-separated (default: 0)")
    p.add_argument("--run-dir", type=Path, help="run directory of a single job (default "
                   "runs/<dataset>-<model>-<profile>-s<seed>)")
    p.add_argument("--pgd-at", action=argparse.BooleanOptionalAction, default=False,
                   help="also train the PGD adversarial-training baseline (Madry) from scratch")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="op determinism in every stage, so that the seed repeats the run bit "
                        "for bit (TensorFlow then runs without XLA: about 1.7x the "
                        "evaluation's time on a CPU); default: the profile's (on for study "
                        "and verdict, off for quick)")
    p.add_argument("--attack", action="append", metavar="NAME",
                   help=f"attacks (default: the profile's, e.g. verdict's six, else the "
                        f"paper's five); registered: {', '.join(sorted(ATTACKS))}")
    g = p.add_argument_group("sweep (several jobs)")
    g.add_argument("--jobs", type=positive_int, metavar="N",
                   help="local engine: run N jobs at a time, each in its own subprocess; worker "
                        "k of N is pinned to GPU k mod #GPUs with CUDA_VISIBLE_DEVICES (the "
                        "GPUs in $CUDA_VISIBLE_DEVICES, else those nvidia-smi lists); without a "
                        "GPU the jobs share the CPU cores (default 1). With --engine ray: at "
                        "most N jobs at once (default: as many as the cluster fits)")
    g.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: subprocesses on this machine; ray: one Ray task per job, each "
                        "asking for 1 GPU (num_gpus=1) and --cpus-per-job CPUs, running the "
                        "same command (needs pip install 'darekit[cluster]', and the checkout, "
                        "its environment and runs/ at the same paths on every node) "
                        "(default: local)")
    g.add_argument("--address", metavar="ADDR",
                   help="--engine ray: the cluster: auto (the one `ray start --head` started), "
                        "HOST:PORT or ray://HOST:PORT, or local (a new single-machine Ray) "
                        "(default: $RAY_ADDRESS, else a running cluster, else a new local one)")
    g.add_argument("--cpus-per-job", type=positive_int, metavar="N",
                   help="--engine ray: CPUs each job asks for (default 1). On a cluster "
                        "without GPUs a job asks for these CPUs instead of a GPU, and its "
                        "TensorFlow uses that many threads: set it to the cores one job should "
                        "have (e.g. a node's core count for one job per node)")
    g.add_argument("--list-jobs", action="store_true",
                   help="print one shell command per job (for a batch scheduler: Slurm, PBS) "
                        "and exit, running nothing; afterwards this command without "
                        "--list-jobs skips the finished jobs and writes the combined report")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(parser, argv, "reproduce.py")

    def body() -> int:
        from darekit import sweep
        from darekit.attacks import parse_attacks
        from darekit.data import dataset_spec
        from darekit.errors import DareError
        from darekit.models import get_architecture
        from darekit.reproduce import (
            PROFILES,
            Study,
            check,
            combined_dir,
            reproduce_all,
            write_combined,
        )

        # Every check before any work: a sweep must not fail on its 9th job's typo.
        for d in args.datasets:
            dataset_spec(d)
        for m in args.models:
            get_architecture(m)
        jobs = list(dict.fromkeys((d, m, s) for d in args.datasets for m in args.models
                                  for s in args.seeds))
        if not jobs:
            raise DareError("no job: --datasets, --models and --seeds must each name one")
        if args.run_dir is not None and len(jobs) > 1:
            raise DareError(f"--run-dir names one job's directory; this command has "
                            f"{len(jobs)} jobs (drop --run-dir)")
        if args.engine != "ray":
            given = [o for o, v in (("--address", args.address),
                                    ("--cpus-per-job", args.cpus_per_job)) if v is not None]
            if given:
                raise DareError(f"{' and '.join(given)}: only with --engine ray")
        elif not args.list_jobs and (reason := sweep.ray_missing()):
            raise DareError(reason)
        # None: the profile's attacks (Study), else the paper's five.
        attacks = parse_attacks(args.attack) if args.attack else None
        profile = PROFILES[args.profile]
        if args.deterministic is not None:
            profile = dataclasses.replace(profile, deterministic=args.deterministic)
        studies = [Study(dataset=d, model=m, profile=profile, seed=s,
                         run_dir=args.run_dir, pgd_at=args.pgd_at, attacks=attacks)
                   for d, m, s in jobs]
        for s in studies:  # the data too, unless only listing (a login node may lack them)
            check(s, data=not args.list_jobs)
        # A job's command carries the options that change what it runs; each job resolves
        # its own run directory from them (and $DAREKIT_RUNS), as a user's command would.
        options = [*(["--backend", args.backend] if args.backend else []),
                   *(["--pgd-at"] if args.pgd_at else []),
                   *([] if args.deterministic is None else
                     ["--deterministic" if args.deterministic else "--no-deterministic"]),
                   *(["--attack", ",".join(attacks)] if args.attack else []),
                   *(["--run-dir", str(args.run_dir.resolve())] if args.run_dir else [])]
        sweep_jobs = [sweep.Job.of(s, options) for s in studies]
        from darekit import backend as B
        if profile.deterministic and B.name() == "jax":
            # Read when JAX starts: each job's process inherits it (a job run right here
            # warns instead when it is missing on a GPU).
            B.deterministic_env()
        if args.list_jobs:
            for j in sweep_jobs:
                print(j.shell())
            return 0
        if args.engine == "local" and len(studies) == 1:
            reproduce_all(studies)  # one job: right here, its output on the terminal
            return 0
        by_path = {s.path: s for s in studies}
        combine = lambda done: write_combined([by_path[j.path] for j in done],
                                              combined_dir(studies))
        try:
            return sweep.run_sweep(sweep_jobs, combine, engine=args.engine, workers=args.jobs,
                                   address=args.address, cpus_per_job=args.cpus_per_job or 1)
        except KeyboardInterrupt:
            print("interrupted: rerun the same command to continue (finished jobs are "
                  "skipped, the others resume)", file=sys.stderr)
            return 130

    return run(body, RERUN)
