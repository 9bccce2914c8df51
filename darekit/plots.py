"""PNG plots of an evaluation, as pure functions of arrays: each returns a Matplotlib figure;
``save`` writes one atomically. No run directory, no file paths in here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from darekit import io  # noqa: E402


def save(fig: Figure, path: str | Path) -> None:
    """Write ``fig`` as a PNG, atomically, and close it."""
    io.save_with(path, lambda p: fig.savefig(p, dpi=120, bbox_inches="tight", format="png"))
    plt.close(fig)


@dataclass(frozen=True)
class Curve:
    """Robust accuracy against epsilon for one method: ``eps``, ``value``, ``low``, ``high``
    ``(K,)`` (the band is the 95% interval)."""

    eps: np.ndarray
    value: np.ndarray
    low: np.ndarray
    high: np.ndarray


@dataclass(frozen=True)
class Panel:
    """One attack's curves: ``{method: Curve}``, its norm and budget (a dashed line)."""

    attack: str
    norm: str
    budget: float
    curves: Mapping[str, Curve]


# Six methods on one panel: colour alone does not tell them apart (nor in grey print), so each
# method also gets its own line style and marker, the same in every panel.
_STYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1)))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _caption(fig: Figure, text: str | None, y: float = -0.02) -> None:
    """``text`` under the figure (``y`` in figure coordinates, below the x labels)."""
    if text:
        fig.text(0.5, y, text, ha="center", va="top", fontsize=7, wrap=True)


def robust_accuracy_curves(panels: Sequence[Panel], title: str, n: int | None = None,
                           note: str | None = None) -> Figure:
    """One panel per attack: robust accuracy against epsilon with 95% bands, per method;
    one legend for the figure and a caption saying what the bands are over ``n`` test images
    (``note``: replaces the caption)."""
    k = max(1, len(panels))
    fig, axes = plt.subplots(1, k, figsize=(3.2 * k, 3.0), squeeze=False)
    methods = list(dict.fromkeys(m for p in panels for m in p.curves))
    handles = {}
    for ax, panel in zip(axes[0], panels, strict=False):
        for method, c in panel.curves.items():
            i = methods.index(method)
            every = max(1, len(c.eps) // 8)
            (line,) = ax.plot(c.eps, c.value, label=method, lw=1.2,
                              ls=_STYLES[i % len(_STYLES)], marker=_MARKERS[i % len(_MARKERS)],
                              markevery=(i % every, every), ms=3.5, color=f"C{i % 10}")
            ax.fill_between(c.eps, c.low, c.high, color=line.get_color(), alpha=0.10, lw=0)
            handles.setdefault(method, line)
        ax.axvline(panel.budget, color="0.6", lw=0.8, ls="--")
        ax.set(title=panel.attack, xlabel=f"epsilon ({panel.norm})", ylim=(0, 1))
    axes[0][0].set_ylabel("robust accuracy")
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="center left",
                   bbox_to_anchor=(0.91, 0.5), fontsize=7, frameon=False)
    fig.suptitle(title, y=1.04)
    over = f" over N = {n} test images per method" if n else ""
    _caption(fig, note or f"Bands: 95% Wilson intervals of robust accuracy{over}; dashed "
             "vertical line: the attack's budget.", y=-0.06)
    return fig


def er_bars(attacks: Sequence[str], methods: Sequence[str], value: np.ndarray,
            low: np.ndarray, high: np.ndarray, title: str,
            ylabel: str = "Empirical Robustness", n: int | None = None,
            note: str | None = None) -> Figure:
    """Grouped bars: ``value[m, a]`` for method ``m`` and attack ``a`` ``(M, A)``, with error
    bars from ``low`` to ``high`` (NaN: no bar, no error bar). The caption says the bars are
    95% bootstrap intervals over ``n`` test images; ``note`` replaces it (e.g. for mean ± std
    across seeds)."""
    value, low, high = (np.asarray(v, float) for v in (value, low, high))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(attacks) * max(1, len(methods)) / 3, 3.2))
    width = 0.8 / max(1, len(methods))
    xs = np.arange(len(attacks))
    for i, m in enumerate(methods):
        err = np.stack([value[i] - low[i], high[i] - value[i]])
        err = np.where(np.isfinite(err), np.maximum(err, 0), 0)
        ax.bar(xs + i * width, value[i], width, yerr=err, capsize=2, label=m,
               error_kw={"lw": 0.8})
    ax.set_xticks(xs + 0.4 - width / 2, attacks)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    over = f" over N = {n} test images" if n else ""
    _caption(fig, note or f"Error bars: 95% percentile-bootstrap intervals of ER{over}.")
    return fig
