"""Several jobs of a study at once: subprocesses on one machine, or tasks on a Ray cluster.

A job is one (dataset, architecture, seed) of ``reproduce.py``, run as the same command a user
could type (``python reproduce.py --dataset D --model M --seed S --profile P ...``) with its
output in ``<run dir>/reproduce.log``. Jobs are independent and resumable, so the sweep only
schedules them: this module knows run directories and commands, never models, and imports
neither TensorFlow nor Ray (Ray only inside ``run_ray``).

Engines:

- ``local`` (``run_local``): ``workers`` jobs at a time, each in its own subprocess. Worker
  slot k (0..workers-1) is pinned to GPU k mod #GPUs with ``CUDA_VISIBLE_DEVICES`` (the GPUs of
  the parent's ``CUDA_VISIBLE_DEVICES``, else those ``nvidia-smi`` lists); pinning the slot
  rather than the k-th job keeps two jobs off one GPU while another GPU idles. With no GPU the
  jobs share the CPU cores, each limited to its share of the threads.
- ``ray`` (``run_ray``): each job is a Ray task asking for one GPU (``num_gpus=1``) and
  ``cpus_per_job`` CPUs, or on a cluster without GPUs for the CPUs only; Ray sets the task's
  ``CUDA_VISIBLE_DEVICES``, which the job's subprocess inherits. Every node must see the
  checkout, its Python environment and the run directories at the same paths (a shared file
  system): the driver writes the combined report from the jobs' run directories.

Finished-job rule (``finished``): a job is finished when its run directory holds
``eval/results.json`` and its ``reproduce.json`` records the same job (dataset, model,
profile, seed, ``pgd_at``, attacks) with ``"finished": true``. ``reproduce.py`` rewrites
``reproduce.json`` without that mark when a sitting starts and ``mark_finished`` adds it once
every stage has run or was found done and the job's report exists, so an interrupted or failed
sitting, or a job rerun with other stages (``--pgd-at``, other attacks), is not finished. A
rerun of a sweep skips finished jobs; the others rerun their command, whose stages skip what is
done.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darekit import io, layout
from darekit.errors import DareError
from darekit.paths import ROOT

LOG = "reproduce.log"
"""A job's stdout and stderr, appended to at every sitting, in its run directory."""

ENGINES = ("local", "ray")

Log = Callable[[str], Any]


# ---------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    """One job of a sweep: what it is, its run directory, and its ``reproduce.py`` options."""

    dataset: str
    model: str
    profile: str
    seed: int
    path: Path
    attacks: tuple[str, ...]
    pgd_at: bool = False
    options: tuple[str, ...] = ()  # reproduce.py options beyond dataset, model, seed, profile

    @property
    def name(self) -> str:
        return f"{self.dataset} {self.model} seed {self.seed}"

    @property
    def log(self) -> Path:
        return self.path / LOG

    @classmethod
    def of(cls, study: Any, options: Sequence[str] = ()) -> Job:
        """The job of a ``darekit.reproduce.Study`` (read by attribute: no import of it)."""
        return cls(study.dataset, study.model, study.profile.name, study.seed,
                   Path(study.path), tuple(study.attacks), study.pgd_at, tuple(options))

    @property
    def identity(self) -> dict[str, Any]:
        """What ``reproduce.json`` must record for this job."""
        return identity(self)

    def command(self, python: str | None = None) -> list[str]:
        """``[python, <repo>/reproduce.py, --dataset, D, --model, M, --seed, S, ...]``."""
        return [python or sys.executable, str(ROOT / "reproduce.py"),
                "--dataset", self.dataset, "--model", self.model, "--seed", str(self.seed),
                "--profile", self.profile, *self.options]

    def shell(self) -> str:
        """The command as one shell line (what ``--list-jobs`` prints)."""
        return shlex.join(self.command())


def identity(job: Any) -> dict[str, Any]:
    """The fields of ``reproduce.json`` that name a job (a ``Job`` or a ``Study``)."""
    profile = job.profile if isinstance(job.profile, str) else job.profile.name
    return {"dataset": job.dataset, "model": job.model, "profile": profile,
            "seed": int(job.seed), "pgd_at": bool(job.pgd_at), "attacks": list(job.attacks)}


def finished(path: Path, identity: Mapping[str, Any]) -> bool:
    """The finished-job rule (module docstring): ``eval/results.json`` exists and
    ``reproduce.json`` records the job ``identity`` with ``"finished": true``."""
    path = Path(path)
    meta_path = path / layout.REPRODUCE
    if not (path / layout.RESULTS_JSON).is_file() or not meta_path.is_file():
        return False
    try:
        meta = io.read_json(meta_path)
    except (OSError, ValueError, io.CorruptFileError):  # truncated, damaged: not finished
        return False
    return meta.get("finished") is True and all(
        io.jsonable(meta.get(k)) == io.jsonable(v) for k, v in identity.items())


def mark_finished(path: Path) -> None:
    """Record in ``reproduce.json`` that every stage of the job ran (``reproduce.py`` calls it
    after a job's last stage; the next sitting's ``reproduce.json`` drops the mark)."""
    meta = io.read_json(Path(path) / layout.REPRODUCE)
    meta.update(finished=True, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    io.write_json(Path(path) / layout.REPRODUCE, meta)


@dataclass(frozen=True)
class Outcome:
    """How a job of a sweep ended: ``finished`` now, ``skipped`` (finished before), or
    ``failed`` (with the exit code, or None when the engine lost the job)."""

    job: Job
    status: str
    returncode: int | None = None
    seconds: float = 0.0
    detail: str = ""


# ---------------------------------------------------------------------------- one subprocess
def run_logged(command: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
               echo: bool = False, running: set[subprocess.Popen] | None = None) -> int:
    """Run ``command``, appending its stdout and stderr to ``log_path`` (and copying them to
    our stdout with ``echo``); return its exit code. ``running`` holds the subprocess while it
    runs (for the caller to stop it). An exception here (Ctrl-C, a Ray cancellation) terminates
    the subprocess first: no job outlives its sweep."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n"
                  .encode())
        log.flush()
        proc = subprocess.Popen(list(command), stdout=subprocess.PIPE if echo else log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env) if env is not None else None)
        if running is not None:
            running.add(proc)
        try:
            if echo:
                assert proc.stdout is not None
                for line in iter(proc.stdout.readline, b""):
                    log.write(line)
                    log.flush()
                    _echo(line)
            return proc.wait()
        except BaseException:
            stop_process(proc)
            raise
        finally:
            if running is not None:
                running.discard(proc)


def _echo(line: bytes) -> None:
    out = getattr(sys.stdout, "buffer", None)  # a captured stdout may take text only
    if out is not None:
        out.write(line)
    else:
        sys.stdout.write(line.decode(errors="replace"))
    sys.stdout.flush()


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds. Every file a job writes is renamed into
    place, so a stopped job leaves nothing half-written and its next sitting resumes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def job_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment for a job's subprocess: unbuffered output (the log follows the job)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}


# ---------------------------------------------------------------------------- local engine
def visible_gpus() -> list[str]:
    """The GPUs a job may be pinned to: the entries of ``CUDA_VISIBLE_DEVICES`` when it is set
    (empty or ``-1``: none), else the indices ``nvidia-smi`` lists (none without it). Read
    without importing TensorFlow, which would take seconds and could initialise CUDA."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        gpus = []
        for token in (t.strip() for t in env.split(",")):
            if not token or token == "-1":  # CUDA stops at the first invalid entry
                break
            gpus.append(token)
        return gpus
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [t.strip() for t in out.splitlines() if t.strip()]


def slot_env(slot: int, workers: int, gpus: Sequence[str],
             cpus: int | None = None) -> dict[str, str]:
    """Environment overrides of worker ``slot`` (0-based) of ``workers``: its GPU, or with no
    GPU its share of the CPU threads. A user's own settings win."""
    if gpus:
        env = {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]}
        if workers > len(gpus):
            # Several jobs share a GPU: TensorFlow would otherwise reserve all its memory, and
            # JAX 75% of it; each JAX job gets its share (90% of the GPU split evenly).
            per_gpu = -(-workers // len(gpus))
            env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / per_gpu:.3f}"
            env = {k: v for k, v in env.items() if k not in os.environ}
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        return env
    if workers < 2:
        return {}
    share = str(max(1, (cpus or os.cpu_count() or 1) // workers))
    # TensorFlow sizes its thread pools to all cores in every process: N jobs would run N x
    # that many threads on the same cores.
    return {k: share for k in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS")
            if k not in os.environ}


def run_local(jobs: Sequence[Job], workers: int = 1, log: Log = print,
              echo: bool | None = None) -> list[Outcome]:
    """Run ``jobs`` as subprocesses, ``workers`` at a time; return one outcome per job (in the
    order they ended). ``echo`` (default: with one worker) also copies a job's output to our
    stdout. Ctrl-C stops the running jobs and raises ``KeyboardInterrupt``."""
    if workers < 1:
        raise DareError(f"--jobs must be a positive integer; received {workers}")
    echo = workers == 1 if echo is None else echo
    gpus = visible_gpus()
    log(f"{len(jobs)} job(s), {min(workers, len(jobs))} at a time, "
        + (f"GPUs {','.join(gpus)} (worker k on GPU k mod {len(gpus)})" if gpus else
           "no GPU: the jobs share the CPU"))
    slots: queue.Queue[int] = queue.Queue()
    for k in range(workers):
        slots.put(k)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()
    procs: set[subprocess.Popen] = set()

    def one(job: Job) -> None:
        if stop.is_set():
            return
        slot = slots.get()
        try:
            env = slot_env(slot, workers, gpus)
            where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else "CPU"
            log(f"[start] {job.name} on {where}; log {job.log}")
            t0 = time.perf_counter()
            rc = run_logged(job.command(), job.log, job_env(env), echo=echo, running=procs)
            out = Outcome(job, "finished" if rc == 0 else "failed", rc,
                          round(time.perf_counter() - t0, 1))
            with lock:
                outcomes.append(out)
                n = len(outcomes)
            log(f"[{'done' if rc == 0 else 'FAILED'} {n}/{len(jobs)}] {job.name} "
                f"({'exit ' + str(rc) + ', ' if rc else ''}{out.seconds:.0f}s)")
        finally:
            slots.put(slot)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")
    futures = [pool.submit(one, j) for j in jobs]
    try:
        for f in futures:
            f.result()
    except BaseException:
        # Ctrl-C reaches the main thread only (and, from a terminal, the subprocesses): start
        # nothing more and stop the running jobs; their stages resume at the next sweep.
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(procs):
            stop_process(proc)
        pool.shutdown(wait=True)
        raise
    pool.shutdown()
    return outcomes


# ---------------------------------------------------------------------------- Ray engine
def ray_missing() -> str | None:
    """None when Ray can be imported, else the one-line reason (checked before any work)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return ("--engine ray needs Ray, which is not installed: pip install 'darekit[cluster]' "
                "(or pip install 'ray[default]')")
    return None


def _ray_task(command: list[str], log_path: str, env: dict[str, str]) -> int:
    """The body of a job's Ray task: the job's command, in a subprocess that inherits the
    task's ``CUDA_VISIBLE_DEVICES`` (set by Ray for ``num_gpus=1``)."""
    return run_logged(command, Path(log_path), {**os.environ, **env})


def run_ray(jobs: Sequence[Job], address: str | None = None, cpus_per_job: int = 1,
            max_running: int | None = None, log: Log = print) -> list[Outcome]:
    """Run ``jobs`` as Ray tasks (one GPU and ``cpus_per_job`` CPUs each; the CPUs only on a
    cluster without GPUs), at most ``max_running`` at once (None: as many as the cluster
    fits). ``address``: ``ray.init``'s (None: ``RAY_ADDRESS``, a running cluster or a new
    local one; ``auto``: the running cluster; ``local``: a new single-machine Ray)."""
    reason = ray_missing()
    if reason:
        raise DareError(reason)
    import ray

    if not ray.is_initialized():
        # The workers import this module: make the checkout importable there (a bare
        # checkout is not installed), and keep their output out of ours (it is in the logs).
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        kwargs: dict[str, Any] = {"log_to_driver": False,
                                  "runtime_env": {"env_vars": {"PYTHONPATH": path}}}
        if address == "local":
            kwargs["include_dashboard"] = False
        ray.init(address=address, **kwargs)
    gpu = ray.cluster_resources().get("GPU", 0) >= 1
    log(f"Ray: {len(jobs)} job(s), each asking for "
        + (f"1 GPU and {cpus_per_job} CPU(s)" if gpu else
           f"{cpus_per_job} CPU(s) (the cluster has no GPU)"))
    # Each job's subprocess gets the driver's darekit settings (data, runs, offline), and on a
    # CPU-only cluster its threads are sized to what it asked for.
    env = {k: v for k, v in os.environ.items() if k.startswith("DAREKIT_")}
    env["PYTHONUNBUFFERED"] = "1"
    if not gpu:
        env.update(TF_NUM_INTRAOP_THREADS=str(cpus_per_job), OMP_NUM_THREADS=str(cpus_per_job))
    task = ray.remote(_ray_task).options(num_gpus=1 if gpu else 0, num_cpus=cpus_per_job,
                                         max_retries=0)
    waiting = list(jobs)
    running: dict[Any, tuple[Job, float]] = {}
    outcomes: list[Outcome] = []
    try:
        while waiting or running:
            while waiting and (max_running is None or len(running) < max_running):
                job = waiting.pop(0)
                job.path.mkdir(parents=True, exist_ok=True)
                running[task.remote(job.command(), str(job.log), env)] = (job, time.perf_counter())
                log(f"[submitted] {job.name}; log {job.log}")
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                job, t0 = running.pop(ref)
                seconds = round(time.perf_counter() - t0, 1)
                try:
                    rc, detail = ray.get(ref), ""
                except ray.exceptions.RayError as e:  # worker or node lost: the job failed
                    rc, detail = None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
                outcomes.append(Outcome(job, "finished" if rc == 0 else "failed", rc, seconds,
                                        detail))
                log(f"[{'done' if rc == 0 else 'FAILED'} {len(outcomes)}/{len(jobs)}] "
                    f"{job.name} ({detail or ('exit ' + str(rc) + ', ' if rc else '')}"
                    f"{seconds:.0f}s)")
    except BaseException:
        for ref in running:  # a KeyboardInterrupt in each task stops its subprocess
            ray.cancel(ref)
        raise
    return outcomes


# ---------------------------------------------------------------------------- the sweep
@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a batch system's time limit, ``kill``) acts as Ctrl-C: the running jobs are
    stopped instead of outliving the sweep."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_sweep(jobs: Sequence[Job], combine: Callable[[list[Job]], Path] | None = None, *,
              engine: str = "local", workers: int | None = None, address: str | None = None,
              cpus_per_job: int = 1, log: Log = print) -> int:
    """Skip the finished jobs, run the others on ``engine``, then write the combined report
    over every finished job (``combine``, when there are several jobs). Return the exit code:
    0, or 1 when a job failed (each is listed with its log on stderr)."""
    if engine not in ENGINES:
        raise DareError(f"--engine must be one of {list(ENGINES)}; received {engine!r}")
    done_before = [j for j in jobs if finished(j.path, j.identity)]
    todo = [j for j in jobs if j not in done_before]
    for j in done_before:
        log(f"[skipped] {j.name}: finished already ({j.path / layout.REPORT})")
    t0 = time.perf_counter()
    with _sigterm_interrupts():
        if not todo:
            outcomes: list[Outcome] = []
        elif engine == "ray":
            outcomes = run_ray(todo, address, cpus_per_job, workers, log)
        else:
            outcomes = run_local(todo, workers or 1, log)
    outcomes += [Outcome(j, "skipped") for j in done_before]
    # A job counts as finished by the rule, not by its exit code alone.
    ok = [o.job for o in outcomes if o.status != "failed"
          and finished(o.job.path, o.job.identity)]
    failed = [o for o in outcomes if o.job not in ok]
    log(f"{len(ok)} of {len(jobs)} job(s) finished ({len(done_before)} before this sweep), "
        f"{len(failed)} failed, in {time.perf_counter() - t0:.0f}s")
    code = 0
    if failed:
        code = 1
        for o in failed:
            why = o.detail or (f"exit {o.returncode}" if o.returncode else
                               "exited 0 but left no finished job")
            print(f"failed: {o.job.name} ({why}); log: {o.job.log}", file=sys.stderr)
    if combine is not None and len(jobs) > 1:
        if ok:
            order = [j for j in jobs if j in ok]  # the command line's order, not completion's
            log(f"combined report: {combine(order)}")
        else:
            print("no job finished: no combined report", file=sys.stderr)
    return code

