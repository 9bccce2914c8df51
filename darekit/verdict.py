"""The GPU verdict's two ends: what a GPU run sends back, and the local report over all runs.

A verdict (Fashion-MNIST, VGG16/VGG19/AlexNet, three seeds, ``reproduce.py
--profile verdict``) runs as several GPU runs of a few minutes each (``scripts/gpu-verdict.sh``
per architecture). The GPU machine is wiped after each run and returns at most 8 files of at
most 16 MiB, so each run sends back its results only:

- ``pack`` (on the GPU machine): per run directory the files in ``RETURNED`` (results,
  per-image evaluation arrays, report, plots, logs, provenance, per-stage wall times; never
  weights, the history, adversarial sets or mined data) in one ``.tar.gz``, split into parts of
  at most ``PART_BYTES`` when larger;
- ``combine`` (here): unpacks what came back, checks that no (architecture, seed) arrived
  twice, and writes one report over every run with ``darekit.report.combined_report`` (mean
  ± std across seeds per scenario, best-in counts per seed and on the means, the cross-check,
  ``results.csv``, ``er.png``), a ``results.json`` holding the same rows as numbers, and the
  runs' test accuracy and wall time per stage.

``python -m darekit.verdict pack|combine ...`` (``scripts/combine-verdict.py`` is ``combine``).
"""

from __future__ import annotations

import argparse
import io as _io
import math
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from darekit import io, layout
from darekit.errors import DareError

RETURNED: tuple[str, ...] = (
    layout.CONFIG, layout.REPRODUCE, "reproduce.log", layout.TRAIN_LOG,
    f"{layout.SLICE_DIR}/summary.json", f"{layout.SLICE_DIR}/summary.csv",
    layout.MINED_STATS,
    f"{layout.DARE_DIR}/*.json", f"{layout.DARE_DIR}/*.csv",
    f"{layout.LOGS_DIR}/*.json", f"{layout.LOGS_DIR}/*.csv",
    f"{layout.TUNE_DIR}/*.json", f"{layout.TUNE_DIR}/*.csv",
    f"{layout.ADV_DIR}/*.json",
    f"{layout.EVAL_DIR}/*", f"{layout.EVAL_PARTS}/*",
)
"""Glob patterns, relative to a run directory, of what a GPU run sends back."""

NEVER = (".h5", ".keras")
"""Suffixes never sent back (weights), whatever a pattern matches."""

PART_BYTES = 15 * 2**20
"""Largest file sent back (the device returns files of at most 16 MiB)."""


# ---------------------------------------------------------------------------- on the GPU
def returned_files(run_dir: Path) -> list[Path]:
    """The files of ``run_dir`` that a GPU run sends back (``RETURNED``), sorted."""
    run_dir = Path(run_dir)
    found = {p for pattern in RETURNED for p in run_dir.glob(pattern)
             if p.is_file() and not p.name.endswith(NEVER) and ".tmp" not in p.name}
    return sorted(found)


def pack(run_dirs: Iterable[Path], out_dir: Path, name: str,
         extra: Path | None = None, part_bytes: int = PART_BYTES) -> list[Path]:
    """Write ``out_dir/<name>.tar.gz`` holding ``<name>/runs/<run>/<file>`` for every existing
    run directory of ``run_dirs`` (``returned_files``) and ``<name>/gpu/`` (the folder
    ``extra``: timings, versions, the script's log). Larger than ``part_bytes``, it is split
    into ``<name>.tar.gz.part00``, ``part01``...; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = _io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for run in run_dirs:
            run = Path(run)
            for f in returned_files(run) if run.is_dir() else []:
                tar.add(f, arcname=f"{name}/runs/{run.name}/{f.relative_to(run).as_posix()}")
        if extra is not None and Path(extra).is_dir():
            for f in sorted(p for p in Path(extra).rglob("*") if p.is_file()):
                tar.add(f, arcname=f"{name}/gpu/{f.relative_to(extra).as_posix()}")
    data = buf.getvalue()
    if len(data) <= part_bytes:
        io.write_bytes(out_dir / f"{name}.tar.gz", data)
        return [out_dir / f"{name}.tar.gz"]
    written = []
    for k in range(math.ceil(len(data) / part_bytes)):
        path = out_dir / f"{name}.tar.gz.part{k:02d}"
        io.write_bytes(path, data[k * part_bytes:(k + 1) * part_bytes])
        written.append(path)
    return written


# ---------------------------------------------------------------------------- here
def _archives(paths: Sequence[Path]) -> dict[Path, list[Path]]:
    """``{archive path: its files in order}`` among ``paths`` (``.tar.gz`` or its
    ``.partNN`` pieces); a file given twice counts once."""
    out: dict[Path, list[Path]] = {}
    for p in sorted({q.resolve() for q in paths}):
        if p.name.endswith(".tar.gz"):
            out.setdefault(p, []).append(p)
        elif ".tar.gz.part" in p.name:
            out.setdefault(p.with_name(p.name.rsplit(".part", 1)[0]), []).append(p)
    return out


def unpack(inputs: Sequence[str | Path], into: Path) -> list[Path]:
    """The run directories (those holding ``eval/results.json``) that ``inputs`` hold: folders
    (searched as they are, and for archives), ``.tar.gz`` files or their ``.partNN`` pieces,
    extracted under ``into``. Raises ``DareError`` on a missing input or a missing part."""
    files: list[Path] = []
    folders: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            folders.append(p)
            files += [f for f in p.iterdir() if f.is_file()]
        elif p.is_file():
            files.append(p)
        else:
            raise DareError(f"{p} does not exist")
    for k, (name, parts) in enumerate(sorted(_archives(files).items())):
        if parts[0].name.endswith(".tar.gz"):
            if len(parts) > 1 or any(".part" in q.name for q in parts):
                raise DareError(f"{name} came back whole and in parts; pass one of them")
        else:
            numbers = [int(q.name.rsplit(".part", 1)[1]) for q in parts]
            if numbers != list(range(len(parts))):
                raise DareError(f"{name}: parts {numbers} came back; expected "
                                f"0..{len(parts) - 1} without gaps")
        data = b"".join(q.read_bytes() for q in parts)
        dest = into / f"{k:02d}"
        dest.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(fileobj=_io.BytesIO(data), mode="r:gz") as tar:
                tar.extractall(dest, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DareError(f"{name}: not a readable .tar.gz ({e})") from None
        folders.append(dest)
    runs = {r.parent.parent.resolve() for f in folders
            for r in f.rglob(layout.RESULTS_JSON.split("/")[-1])
            if r.parent.name == layout.EVAL_DIR}
    return sorted(runs)


def _number(text: str) -> Any:
    """A CSV cell as JSON: int, float, bool, None (empty) or the text."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def run_facts(run_dir: Path) -> dict[str, Any]:
    """What one run says about itself: architecture, seed, profile, backend and versions,
    epochs trained, the last epoch's held-out (test) accuracy, and wall time per stage."""
    run_dir = Path(run_dir)
    cfg = io.read_json(run_dir / layout.CONFIG) if (run_dir / layout.CONFIG).is_file() else {}
    meta = (io.read_json(run_dir / layout.REPRODUCE)
            if (run_dir / layout.REPRODUCE).is_file() else {})
    train = cfg.get("train", {})
    log = io.read_csv(run_dir / layout.TRAIN_LOG) if (run_dir / layout.TRAIN_LOG).is_file() \
        else []
    last = log[-1] if log else {}
    return {
        "run": run_dir.name,
        "arch": meta.get("model", train.get("model")),
        "dataset": meta.get("dataset", train.get("dataset")),
        "seed": meta.get("seed", train.get("seed")),
        "profile": meta.get("profile"),
        "finished": meta.get("finished", False),
        "epochs": len(log),
        "test_accuracy": _number(last.get("val_accuracy", "")),
        "versions": cfg.get("versions"),
        "seconds": meta.get("seconds", {}),
    }


def _runs_markdown(facts: Sequence[dict[str, Any]]) -> list[str]:
    stages = list(dict.fromkeys(k for f in facts for k in f["seconds"]))
    out = ["## Runs: training and wall time per stage (seconds)", "",
           "Test accuracy: the last epoch's held-out accuracy in `train_log.csv` (all 10,000 "
           "test images unless the profile sets a test subset).", "",
           "| arch | seed | epochs | test accuracy | " + " | ".join(stages) + " | total |",
           "|---|---|---|---|" + "---|" * (len(stages) + 1)]
    for f in sorted(facts, key=lambda f: (str(f["arch"]), str(f["seed"]))):
        acc = f["test_accuracy"]
        cells = [str(f["seconds"].get(s, "")) for s in stages]
        out.append(f"| {f['arch']} | {f['seed']} | {f['epochs']} | "
                   f"{'' if acc is None else f'{acc:.4f}'} | " + " | ".join(cells) +
                   f" | {sum(f['seconds'].values()):.0f} |")
    return out + [""]


def combine(inputs: Sequence[str | Path], out_dir: Path) -> Path:
    """One report over the GPU runs that ``inputs`` hold (``unpack``): ``report.md``,
    ``results.csv`` and ``er.png`` (``darekit.report.combined_report``: per scenario mean ±
    sample std across seeds), ``results.json`` (the same rows with numbers, the runs' facts,
    the inputs). Returns the report's path. Raises ``DareError`` when no evaluated run is
    found, one (architecture, seed) arrives twice, or the runs come from different profiles."""
    from darekit import report

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="darekit-verdict-") as tmp:
        runs = unpack(inputs, Path(tmp))
        if not runs:
            raise DareError("no evaluated run (eval/results.json) in "
                            + ", ".join(map(str, inputs)))
        facts = [run_facts(r) for r in runs]
        profiles = sorted({str(f["profile"]) for f in facts})
        if len(profiles) > 1:  # one scenario's seeds must come from one configuration
            raise DareError(f"the runs come from different profiles ({', '.join(profiles)}); "
                            "combine one profile's runs at a time")
        seen: dict[tuple, str] = {}
        for f in facts:
            key = (f["dataset"], f["arch"], f["seed"])
            if key in seen:
                raise DareError(f"{key[1]} seed {key[2]} came back twice ({seen[key]} and "
                                f"{f['run']}); pass each run once")
            seen[key] = f["run"]
        order = sorted(range(len(runs)), key=lambda k: (str(facts[k]["arch"]),
                                                        int(facts[k]["seed"] or 0)))
        evals = [report.Evaluated.load(runs[k]) for k in order]
        out_dir.mkdir(parents=True, exist_ok=True)
        text = report.combined_report(evals, out_dir)
    # The temporary paths mean nothing once gone: name each run by its directory.
    for k in order:
        text = text.replace(f"`{runs[k]}`", f"`{runs[k].name}`")
    text += "\n" + "\n".join(_runs_markdown([facts[k] for k in order]))
    io.write_text(out_dir / "report.md", text)
    rows = [{k: _number(v) for k, v in r.items()}
            for r in io.read_csv(out_dir / "results.csv")]
    io.write_json(out_dir / "results.json", {
        "inputs": [str(p) for p in inputs],
        "runs": [facts[k] for k in order],
        "rows": rows,
    })
    return out_dir / "report.md"


# ---------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    """``pack`` (the GPU side of ``scripts/gpu-verdict.sh``) or ``combine`` (here)."""
    p = argparse.ArgumentParser(prog="python -m darekit.verdict",
                                description="The GPU verdict: pack a GPU run's results, or "
                                "combine the results that came back into one report.")
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="pack run directories' results into OUT (GPU side)")
    pk.add_argument("runs", nargs="+", type=Path, help="run directories (missing: skipped)")
    pk.add_argument("--out", type=Path, required=True, help="folder to write the archive to")
    pk.add_argument("--name", required=True, help="archive name (no suffix)")
    pk.add_argument("--extra", type=Path, help="a folder packed as <name>/gpu/")
    cb = sub.add_parser("combine", help="one report over what the GPU runs sent back")
    cb.add_argument("inputs", nargs="+", help="folders, .tar.gz files or their .partNN pieces")
    cb.add_argument("--out", type=Path, help="report folder (default: runs/verdict)")
    args = p.parse_args(argv)
    try:
        if args.command == "pack":
            for f in pack(args.runs, args.out, args.name, args.extra):
                print(f"{f} ({f.stat().st_size / 2**20:.2f} MiB)")
            return 0
        from darekit.paths import runs_dir

        out = args.out or runs_dir() / "verdict"
        print(f"report: {combine(args.inputs, out)}")
        return 0
    except DareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

