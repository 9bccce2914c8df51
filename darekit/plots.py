"""PNG plots of an evaluation: robust accuracy against epsilon, and ER per method and attack."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from darekit import io  # noqa: E402
from darekit.rundir import Run  # noqa: E402


def _save(fig, path) -> None:
    io.save_with(path, lambda p: fig.savefig(p, dpi=120, bbox_inches="tight", format="png"))
    plt.close(fig)


def plot_run(run: Run, rows: Sequence[Mapping[str, Any]]) -> None:
    """``eval/robust_accuracy.png`` and ``eval/er.png`` for one run's evaluation rows."""
    from darekit.evaluate import EVAL_DIR

    methods = list(dict.fromkeys(r["model"] for r in rows))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    out = run.path / EVAL_DIR

    fig, axes = plt.subplots(1, len(attacks), figsize=(3.2 * len(attacks), 3.0), squeeze=False)
    for ax, attack in zip(axes[0], attacks, strict=True):
        for m in methods:
            part = out / "parts" / f"{m}__{attack}.npz"
            if not part.is_file():
                continue
            a = io.read_npz(part)
            budget = next(float(r["budget"]) for r in rows if r["attack"] == attack)
            eps = np.linspace(0, 2.5 * budget, 60)
            pert = np.where(a["fooled"], a["perturbation"], np.inf)
            ra = [np.mean(a["clean_correct"] & (pert > e)) for e in eps]
            ax.plot(eps, ra, label=m)
            ax.axvline(budget, color="0.7", lw=0.8, ls="--")
        norm = next(r["norm"] for r in rows if r["attack"] == attack)
        ax.set(title=attack, xlabel=f"epsilon ({norm})", ylim=(0, 1))
    axes[0][0].set_ylabel("robust accuracy")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{run.model_name} on {run.dataset_name}: robust accuracy vs epsilon", y=1.04)
    _save(fig, out / "robust_accuracy.png")

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(attacks) * max(1, len(methods)) / 3, 3.2))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        vals = [next((float(r["er"]) for r in rows if r["model"] == m and r["attack"] == a),
                     np.nan) for a in attacks]
        ax.bar(np.arange(len(attacks)) + i * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(attacks)) + 0.4 - width / 2, attacks)
    ax.set(ylabel="Empirical Robustness", title=f"{run.model_name} on {run.dataset_name}")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    _save(fig, out / "er.png")
