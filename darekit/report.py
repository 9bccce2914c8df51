"""Reports of an evaluation: the paper's comparison table with intervals and significance,
robust accuracy, the cross-check, plots; one run, or several (seeds) combined.

The paper counts, per method, the (model, attack) scenarios where it has the highest ER
("best in N of M"). Here a method is also *significantly* best when the paired bootstrap
interval of its ER minus the runner-up's, on the same test images, excludes 0. A method whose
fine-tuning diverged is shown as "diverged".

ER computed from a success rate under 90% averages over the easiest images only: it is marked
(†) and, as in the paper, still ranked, but a win is significant only when both the winner's
and the runner-up's ER are comparable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from darekit import io, layout, plots, stats, worstcase
from darekit.errors import DareError

Key = tuple[str, str]  # (model, attack)
SCENARIO = ("dataset", "arch", "attack")
CROSSCHECK_COLUMNS = (("own_pgd", "PGD (ours)"), ("apgd_ce", "APGD-CE"),
                      ("apgd_t", "APGD-DLR-T"), ("square", "Square"), ("transfer", "transfer"))


# ---------------------------------------------------------------------------- ranking
def per_image_er(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """``(N,)`` relative minimal perturbations of an evaluation part; NaN where not fooled."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(arrays["fooled"], arrays["perturbation"] / arrays["x_norm"], np.nan)


def _ok(row: Mapping[str, Any]) -> bool:
    return row.get("status", "ok") == "ok"


def _rankable(row: Mapping[str, Any]) -> bool:
    return _ok(row) and math.isfinite(float(row["er"]))


def _comparable(row: Mapping[str, Any]) -> bool:
    return bool(row.get("comparable", True))


@dataclass(frozen=True)
class Ranking:
    """One scenario: the best method(s), whether the win is significant, and the paired
    interval of ``ER(best) - ER(runner-up)``."""

    best: frozenset[str]
    significant: bool
    runner_up: str | None
    difference: stats.Interval


def rank(rows: Sequence[Mapping[str, Any]], per_image: Mapping[str, np.ndarray] | None,
         seed: int = 0) -> Ranking:
    """Rank one scenario's ``rows`` (one per method, key ``model``) by ER; ties all count as
    best and no tie is significant. ``per_image``: ``{method: (N,)}`` for the paired
    bootstrap (None: no significance test)."""
    eligible = sorted((r for r in rows if _rankable(r)), key=lambda r: -float(r["er"]))
    if not eligible:
        return Ranking(frozenset(), False, None, stats.NAN)
    top = float(eligible[0]["er"])
    best = frozenset(r["model"] for r in eligible if float(r["er"]) == top)
    rest = [r for r in eligible if r["model"] not in best]
    if len(best) > 1 or not rest or per_image is None:
        return Ranking(best, False, rest[0]["model"] if rest else None, stats.NAN)
    winner, runner = next(iter(best)), rest[0]["model"]
    if winner not in per_image or runner not in per_image:  # a part missing: no test
        return Ranking(best, False, runner, stats.NAN)
    diff = stats.paired_difference(per_image[winner], per_image[runner], seed)
    both = _comparable(eligible[0]) and _comparable(rest[0])
    return Ranking(best, both and diff.low > 0, runner, diff)


def _scenarios(rows: Iterable[Mapping[str, Any]]) -> dict[tuple, list[Mapping[str, Any]]]:
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in SCENARIO), []).append(r)
    return groups


def rank_all(rows: Sequence[Mapping[str, Any]], per_image: Mapping[Key, np.ndarray] | None,
             seed: int = 0) -> dict[tuple, Ranking]:
    """``rank`` for every (dataset, arch, attack) scenario of one run's rows."""
    out = {}
    for key, group in _scenarios(rows).items():
        pi = None if per_image is None else {r["model"]: per_image[r["model"], r["attack"]]
                                             for r in group if (r["model"], r["attack"])
                                             in per_image}
        out[key] = rank(group, pi, seed)
    return out


def counts(rankings: Mapping[tuple, Ranking], methods: Iterable[str]
           ) -> dict[str, tuple[int, int]]:
    """Per method: (best in N, significantly best in K) over the scenarios."""
    out = {m: [0, 0] for m in methods}
    for rk in rankings.values():
        for m in rk.best:
            out.setdefault(m, [0, 0])[0] += 1
            if rk.significant:
                out[m][1] += 1
    return {m: (a, b) for m, (a, b) in out.items()}


# ---------------------------------------------------------------------------- formatting
def _f(v: Any, digits: int = 4) -> str:
    v = float(v)
    return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"


def _ci(row: Mapping[str, Any], name: str, digits: int = 4) -> str:
    v, lo, hi = (row.get(k, math.nan) for k in (name, f"{name}_low", f"{name}_high"))
    if not math.isfinite(float(v)):
        return "n/a"
    if lo is None or not math.isfinite(float(lo)):
        return _f(v, digits)
    return f"{_f(v, digits)} [{_f(lo, digits)}, {_f(hi, digits)}]"


def _pct(v: Any) -> str:
    v = float(v)
    return "n/a" if not math.isfinite(v) else f"{100 * v:.0f}%"


def _methods(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


LEGEND = ("Each cell: ER [95% bootstrap interval] and the attack's success rate on the "
          "correctly classified images. **Bold**: highest ER of the scenario; ★: "
          "significantly best (the paired bootstrap interval of its ER minus the runner-up's "
          "excludes 0, both comparable); †: success rate under 90%: the ER averages over the "
          "easiest images only and is not comparable (ranked as the paper does, never a "
          "significant win).")


def er_table(rows: Sequence[Mapping[str, Any]], rankings: Mapping[tuple, Ranking]) -> list[str]:
    methods = _methods(rows)
    out = ["| model | attack | " + " | ".join(methods) + " |",
           "|---|---|" + "---|" * len(methods)]
    for key, group in _scenarios(rows).items():
        by = {r["model"]: r for r in group}
        rk = rankings[key]
        cells = []
        for m in methods:
            r = by.get(m)
            if r is None:
                cells.append("")
                continue
            if not _ok(r):
                cells.append(str(r["status"]))
                continue
            text = f"{_ci(r, 'er')} {_pct(r['success_rate'])}"
            if not r.get("comparable", True):
                text += " †"
            if m in rk.best:
                text = f"**{text}**" + (" ★" if rk.significant else "")
            cells.append(text)
        out.append(f"| {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return out


def method_table(rows: Sequence[Mapping[str, Any]], rankings: Mapping[tuple, Ranking]
                 ) -> list[str]:
    methods = _methods(rows)
    c = counts(rankings, methods)
    m_total = len(rankings)
    out = ["| method | best in | significantly best in | clean accuracy [95% CI] |",
           "|---|---|---|---|"]
    for m in methods:
        r = next(r for r in rows if r["model"] == m)
        acc = _ci(r, "clean_accuracy", 3) if _ok(r) else str(r["status"])
        out.append(f"| {m} | {c[m][0]} of {m_total} | {c[m][1]} of {m_total} | {acc} |")
    return out


DARE_METHODS = ("dare", "dare-s", "dare-sl")
"""The paper's method and its variants, named together in the verdict lines."""


def verdict_line(label: str, best: Mapping[str, int], total: int,
                 significant: Mapping[str, int] | None = None) -> str:
    """One line: which method has the highest ER in the most of ``total`` scenarios under a
    measure (ties named together), and where DARE's variants stand. ``best``/``significant``:
    per method, scenarios best in / significantly best in (``counts``)."""
    if not total or not best:
        return f"**Verdict, {label}**: no scenario could be ranked."
    sig = significant or {}

    def won(ms: Sequence[str]) -> str:
        b = sum(best.get(m, 0) for m in ms)
        text = f"{b} of {total}"
        if significant is not None:
            text += f" (significantly {sum(sig.get(m, 0) for m in ms)})"
        return text

    top = max(best.values())
    leaders = [m for m, b in best.items() if b == top]
    if top == 0:
        line = f"**Verdict, {label}**: no method is best in any of the {total} scenarios"
    else:
        line = (f"**Verdict, {label}**: highest ER in the most scenarios: "
                f"{' and '.join(leaders)}, {won(leaders[:1])}" + (" each" if len(leaders) > 1
                                                                  else ""))
    dare = [m for m in best if m in DARE_METHODS]
    if dare:
        line += f"; DARE ({', '.join(dare)}){' together' if len(dare) > 1 else ''}: {won(dare)}"
    return line + "."


def robust_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    budgets = {r["attack"]: r["budget"] for r in rows if _ok(r)}
    out = ["| method | " + " | ".join(f"{a} ({_f(budgets.get(a, math.nan), 4)})"
                                      for a in attacks) + " |", "|---|" + "---|" * len(attacks)]
    for m in _methods(rows):
        by = {r["attack"]: r for r in rows if r["model"] == m}
        out.append(f"| {m} | " + " | ".join(
            _ci(by[a], "robust_accuracy", 3) if a in by and _ok(by[a]) else
            (str(by[a]["status"]) if a in by else "") for a in attacks) + " |")
    return out


def crosscheck_table(checks: Sequence[Mapping[str, Any]]) -> list[str]:
    if not checks:
        return []
    present = [(k, label) for k, label in CROSSCHECK_COLUMNS
               if any(k in c.get("robust_accuracy", {}) for c in checks)]
    out = ["| method | clean | " + " | ".join(label for _, label in present) +
           " | worst case | possible gradient masking |",
           "|---|---|" + "---|" * (len(present) + 2)]
    for c in checks:
        ra = c.get("robust_accuracy", {})
        cells = [_f(ra[k], 3) if k in ra else "" for k, _ in present]
        flag = f"**yes**: {c.get('masking_reason', '')}" \
            if c.get("possible_gradient_masking") else "no"
        out.append(f"| {c['model']} | {_f(c['clean_accuracy'], 3)} | " + " | ".join(cells) +
                   f" | {_f(c['worst_case_accuracy'], 3)} | {flag} |")
    return out


STATUS_MEANING = {
    "diverged": "the fine-tuning diverged (the weights became NaN/inf)",
    "no-op": "the fine-tuning did not move the weights: the model is the original",
}


def not_result_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Why each method shown with a status instead of figures (``diverged``, ``no-op``) is not
    a result: one bullet per method (its learning rate and reason), or nothing."""
    seen: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        if not _ok(r):
            seen.setdefault(str(r["model"]), r)
    if not seen:
        return []
    out = ["Not results (no model evaluated; never ranked):", ""]
    for m, r in seen.items():
        status = str(r["status"])
        why = r.get("why") or STATUS_MEANING.get(status, status)
        lr = r.get("lr")
        at = f" at lr {float(lr):g}" if lr is not None and math.isfinite(float(lr)) else ""
        out.append(f"- **{m}**: {status}{at}: {why}")
    return [*out, ""]


def precision_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    fixed = [r for r in rows if _ok(r) and math.isfinite(float(r.get("bracket", math.nan)))
             and int(r.get("rounds", 1)) > 1]
    if not fixed:
        return []
    worst = max(fixed, key=lambda r: float(r["bracket"]))
    b = float(worst["bracket"])
    return [f"Minimal-epsilon search: the largest relative bracket left is {b:.4f} "
            f"({worst['model']} / {worst['attack']}), so every fixed-epsilon ER overstates its "
            f"bracketed minimum by at most {100 * b / (1 - b):.2f}%.", ""]


def definitions_markdown(definitions: Mapping[str, str]) -> str:
    return "Definitions:\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in
                                          definitions.items()) + "\n"


# ---------------------------------------------------------------------------- plots
def _curves(parts: Mapping[Key, Mapping[str, np.ndarray]], rows: Sequence[Mapping[str, Any]]
            ) -> list[plots.Panel]:
    """Robust accuracy against epsilon, from each input's minimal perturbation: an input is
    robust at eps when it is classified correctly and not fooled within eps."""
    panels = []
    for attack in dict.fromkeys(r["attack"] for r in rows):
        row = next((r for r in rows if r["attack"] == attack and _ok(r)), None)
        if row is None:
            continue
        budget = float(row["budget"])
        eps = np.linspace(0, 2.5 * budget, 41)
        curves = {}
        for m in _methods(rows):
            a = parts.get((m, attack))
            if a is None:
                continue
            pert = np.where(a["fooled"], a["perturbation"], np.inf)
            k = np.array([int(np.sum(a["clean_correct"] & (pert > e))) for e in eps])
            n = len(pert)
            ci = [stats.wilson(int(v), n) for v in k]
            curves[m] = plots.Curve(eps, k / n, np.array([c.low for c in ci]),
                                    np.array([c.high for c in ci]))
        panels.append(plots.Panel(attack, row["norm"], budget, curves))
    return panels


def _er_matrix(rows: Sequence[Mapping[str, Any]], value: str = "er", low: str = "er_low",
               high: str = "er_high"
               ) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
    methods, attacks = _methods(rows), list(dict.fromkeys(r["attack"] for r in rows))
    mats = [np.full((len(methods), len(attacks)), np.nan) for _ in range(3)]
    for r in rows:
        if not _ok(r):
            continue
        i, j = methods.index(r["model"]), attacks.index(r["attack"])
        for mat, k in zip(mats, (value, low, high), strict=True):
            mat[i, j] = float(r.get(k, math.nan))
    return methods, attacks, mats[0], mats[1], mats[2]


# ---------------------------------------------------------------------------- one run
def _verdict(rows: Sequence[Mapping[str, Any]], rankings: Mapping[tuple, Ranking],
             label: str) -> str:
    c = counts(rankings, _methods(rows))
    return verdict_line(label, {m: v[0] for m, v in c.items()}, len(rankings),
                        {m: v[1] for m, v in c.items()})


WORST_LEGEND = (
    "Per test image, the smallest perturbation that any attack of the norm found "
    "(`darekit.worstcase`; L-inf: also what the cross-check's APGD found at the budget, on the "
    "images it ran on); an image is robust at the budget only if every attack of the norm "
    "left it robust. The paper's measure is per attack (above); this one does not reward a "
    "method on which one attack happens to be weak. Rankings as above, over these rows only.")


def worst_case_lines(worst: Sequence[Mapping[str, Any]]) -> list[str]:
    """One bullet per distinct description of the worst-case rows (``worstcase.describe``):
    over which attacks each minimum was taken, and on how many images."""
    seen = dict.fromkeys(worstcase.describe(r) for r in worst)
    return [f"- {d}" for d in seen] + ([""] if seen else [])


def _worst_case(rows: Sequence[Mapping[str, Any]],
                parts: Mapping[Key, Mapping[str, np.ndarray]], seed: int,
                found: Mapping[Key, Mapping[str, Any]] | None = None
                ) -> tuple[list[dict[str, Any]], dict[tuple, Ranking]]:
    """The worst-case rows (of the methods whose every row is a result) and their rankings;
    ``found``: the cross-check's APGD results (``worstcase.worst_case_rows``)."""
    bad = {r["model"] for r in rows if not _ok(r)}
    ok_rows = [r for r in rows if r["model"] not in bad]
    worst, per_image = worstcase.worst_case_rows(
        ok_rows, {k: v for k, v in parts.items() if k[0] not in bad}, seed,
        {k: v for k, v in (found or {}).items() if k[0] not in bad})
    rankings = rank_all(worst, per_image, seed)
    for r in worst:
        rk = rankings[tuple(r[k] for k in SCENARIO)]
        r["best"] = r["model"] in rk.best
        r["significantly_best"] = r["best"] and rk.significant
    return worst, rankings


def write_run_report(out_dir: Path, results: Mapping[str, Any],
                     parts: Mapping[Key, Mapping[str, np.ndarray]], seed: int = 0, *,
                     found: Mapping[Key, Mapping[str, Any]] | None = None) -> Path:
    """``results.csv``, ``results.json`` (rows with their ranking, the worst-case rows with
    theirs, the cross-check, the attack configurations, the definitions), ``report.md`` and
    the two plots, into ``out_dir``. ``found``: ``{(model, apgd attack): arrays}``, what the
    cross-check's APGD found per image (``worstcase.crosscheck_parts``), for the worst case."""
    rows = [dict(r) for r in results["results"]]
    per_image = {k: per_image_er(a) for k, a in parts.items()}
    rankings = rank_all(rows, per_image, seed)
    for r in rows:
        rk = rankings[tuple(r[k] for k in SCENARIO)]
        r["best"] = r["model"] in rk.best
        r["significantly_best"] = r["best"] and rk.significant
    worst, worst_rankings = _worst_case(rows, parts, seed, found)
    io.write_csv(out_dir / "results.csv", rows)
    io.write_json(out_dir / "results.json", {**results, "results": rows, "worst_case": worst})
    first = rows[0] if rows else {"arch": "?", "dataset": "?"}
    title = f"{first['arch']} on {first['dataset']}"
    lines = [f"# Robustness of {title}", "", f"Run: `{results.get('run', '')}`", "",
             "## Empirical Robustness (higher is more robust)", "", LEGEND, "",
             *er_table(rows, rankings), "", *method_table(rows, rankings), "",
             _verdict(rows, rankings, "per attack (the paper's measure)"), "",
             *not_result_lines(rows), *precision_lines(rows),
             "## Robust accuracy at the budget [95% Wilson interval]", "", *robust_table(rows), ""]
    if worst:
        lines += ["## Worst case per norm (higher is more robust)", "", WORST_LEGEND, "",
                  *worst_case_lines(worst),
                  *er_table(worst, worst_rankings), "", *method_table(worst, worst_rankings),
                  "", _verdict(worst, worst_rankings, "worst case per norm"), "",
                  "Robust accuracy at the budget, worst case [95% Wilson interval]:", "",
                  *robust_table(worst), ""]
    checks = results.get("crosscheck") or []
    if checks:
        n = checks[0].get("n", "?")
        lines += [f"## Cross-check of robust accuracy at the L-inf budget ({n} images)", "",
                  "Worst case: robust under every attack of the row, the package's PGD "
                  "included. Possible gradient masking: a gradient-free or transfer attack "
                  "left fewer images robust than the white-box attacks.", "",
                  *crosscheck_table(checks), ""]
    lines.append(definitions_markdown(results.get("definitions", {})))
    io.write_text(out_dir / "report.md", "\n".join(lines))
    n_images = next((int(r["n"]) for r in rows if r.get("n")), None)  # the plots' captions
    plots.save(plots.robust_accuracy_curves(_curves(parts, rows),
                                            f"{title}: robust accuracy vs epsilon", n=n_images),
               out_dir / "robust_accuracy.png")
    methods, attacks, v, lo, hi = _er_matrix(rows)
    plots.save(plots.er_bars(attacks, methods, v, lo, hi, title, n=n_images),
               out_dir / "er.png")
    return out_dir / "report.md"


# ---------------------------------------------------------------------------- several runs
@dataclass(frozen=True)
class Evaluated:
    """An evaluated run, read back: ``results.json`` and the per-image arrays of its parts."""

    path: Path
    results: dict[str, Any]
    parts: dict[Key, dict[str, np.ndarray]]

    @classmethod
    def load(cls, run_path: str | Path) -> Evaluated:
        run_path = Path(run_path)
        path = run_path / layout.RESULTS_JSON
        if not path.is_file():
            raise DareError(f"run {run_path} has not been evaluated (no {path})")
        results = io.read_json(path)
        parts = {}
        for r in results["results"]:
            f = run_path / f"{layout.eval_part(r['model'], r['attack'])}.npz"
            if f.is_file():
                parts[r["model"], r["attack"]] = io.read_npz(f)
        return cls(run_path, results, parts)


def combined_report(evals: Sequence[Evaluated], out_dir: Path | None = None) -> str:
    """One Markdown report over several evaluated runs. Runs of the same dataset and
    architecture with different seeds are combined: per cell the mean ± std of ER across
    seeds, and "best in N of M" per seed and on the seed means. With ``out_dir``, the
    report, ``results.csv`` (per seed and mean rows) and ``er.png`` are written there."""
    lines = ["# Robustness comparison", "", "Runs:", "",
             *(f"- `{e.path}`" for e in evals), ""]
    table_rows: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], list[Evaluated]] = {}
    for e in evals:
        r0 = e.results["results"][0]
        groups.setdefault((r0["dataset"], r0["arch"]), []).append(e)
    for (dataset, arch), group in groups.items():
        seeds = sorted({int(r["seed"]) for e in group for r in e.results["results"]})
        grows = [r for e in group for r in e.results["results"]]
        lines += [f"## {arch} on {dataset}: seeds {', '.join(map(str, seeds))}", ""]
        lines += _seed_section(group, grows, table_rows)
    if out_dir is not None:
        io.write_csv(out_dir / "results.csv", table_rows)
        means = [r for r in table_rows if r["seed"] == "mean"]
        methods, attacks, v, lo, hi = _er_matrix(means, "er", "er_low", "er_high")
        plots.save(plots.er_bars(attacks, methods, v, lo, hi, "ER, mean ± std across seeds",
                                 note="Error bars: mean ± one standard deviation of ER across "
                                 "seeds (not a 95% interval)."), out_dir / "er.png")
    defs = next((e.results.get("definitions") for e in evals), {}) or {}
    lines.append(definitions_markdown(defs))
    return "\n".join(lines)


def _seed_section(group: Sequence[Evaluated], rows: Sequence[Mapping[str, Any]],
                  table_rows: list[dict[str, Any]]) -> list[str]:
    methods = _methods(rows)
    per_seed: dict[int, dict[tuple, Ranking]] = {}
    for e in group:
        seed = int(e.results["results"][0]["seed"])
        per_image = {k: per_image_er(a) for k, a in e.parts.items()}
        per_seed[seed] = rank_all(e.results["results"], per_image, seed)
    seeds = sorted(per_seed)
    cells, mean_rows = _mean_rows(rows)
    table_rows += [{**r, "seed": r["seed"]} for r in rows] + mean_rows
    mean_rank = rank_all(mean_rows, None)
    out = ["ER: mean ± std across seeds (success rate: mean). **Bold**: highest mean ER; "
           "†: a seed's success rate under 90% (ER not comparable).", "",
           "| model | attack | " + " | ".join(methods) + " |",
           "|---|---|" + "---|" * len(methods)]
    out += _mean_table(cells, mean_rows, mean_rank, methods)
    m_total = len(cells)
    c_seed = {s: counts(per_seed[s], methods) for s in seeds}
    c_mean = counts(mean_rank, methods)
    out += ["", "| method | best in, per seed | best in, on the seed means | significantly "
            "best in, per seed | clean accuracy, mean ± std |", "|---|---|---|---|---|"]
    for m in methods:
        acc = [r for r in mean_rows if r["model"] == m and r["status"] == "ok"]
        acc_txt = f"{_f(acc[0]['clean_accuracy'], 3)} ± {_f(acc[0]['clean_accuracy_std'], 3)}" \
            if acc else "n/a"
        out.append(f"| {m} | " + ", ".join(str(c_seed[s][m][0]) for s in seeds) +
                   f" of {m_total} | {c_mean[m][0]} of {m_total} | " +
                   ", ".join(str(c_seed[s][m][1]) for s in seeds) + f" of {m_total} | "
                   f"{acc_txt} |")
    out += ["", verdict_line("per attack (the paper's measure), on the seed means",
                             {m: c[0] for m, c in c_mean.items()}, m_total)]
    out += ["", "Robust accuracy at the budget, mean ± std across seeds:", "",
            "| method | " + " | ".join(dict.fromkeys(r["attack"] for r in mean_rows)) + " |",
            "|---|" + "---|" * len(dict.fromkeys(r["attack"] for r in mean_rows))]
    for m in methods:
        out.append(f"| {m} | " + " | ".join(
            f"{_f(r['robust_accuracy'], 3)} ± {_f(r['robust_accuracy_std'], 3)}"
            if r["status"] == "ok" else str(r["status"])
            for r in mean_rows if r["model"] == m) + " |")
    out += ["", *not_result_lines([{**r, "model": f"{r['model']} (s{r['seed']})"}
                                   for r in rows if not _ok(r)])]
    worst = [r for e in group for r in e.results.get("worst_case") or []]
    if worst:
        out += _worst_seed_lines(worst, table_rows)
    checks = [c for e in group for c in (e.results.get("crosscheck") or [])]
    if checks:
        out += ["", "Cross-check (robust accuracy at the L-inf budget), per seed:", "",
                *crosscheck_table([{**c, "model": f"{c['model']} (s{c['seed']})"}
                                   for c in checks])]
    out.append("")
    return out


def _worst_seed_lines(worst: Sequence[Mapping[str, Any]], table_rows: list[dict[str, Any]]
                      ) -> list[str]:
    """The worst case across seeds: ER and robust accuracy mean ± std per (norm, method), its
    own "best in" counts per seed (each run's ranking, with its paired tests) and on the seed
    means, and its verdict."""
    methods = _methods(worst)
    seeds = sorted({int(r["seed"]) for r in worst})
    cells, mean_rows = _mean_rows(worst)
    for r in mean_rows:
        r["worst_case"] = True
    table_rows += [{**r, "coverage": ", ".join(f"{a}: {k}" for a, k in
                                               (r.get("coverage") or {}).items())}
                   for r in worst] + mean_rows
    mean_rank = rank_all(mean_rows, None)
    m_total = len(cells)
    c_mean = counts(mean_rank, methods)
    c_seed = {s: {m: (sum(bool(r.get("best")) for r in worst if r["model"] == m
                          and int(r["seed"]) == s),
                      sum(bool(r.get("significantly_best")) for r in worst if r["model"] == m
                          and int(r["seed"]) == s)) for m in methods} for s in seeds}
    out = ["", "Worst case per norm (per image, the smallest perturbation any attack of the "
           "norm found; see each run's report): ER mean ± std across seeds, **bold**: "
           "highest mean ER.", "", *worst_case_lines(worst),
           "| model | measure | " + " | ".join(methods) + " |",
           "|---|---|" + "---|" * len(methods)]
    out += _mean_table(cells, mean_rows, mean_rank, methods)
    out += ["", "| method | best in, per seed | best in, on the seed means | significantly "
            "best in, per seed | robust accuracy at the budget, mean ± std |",
            "|---|---|---|---|---|"]
    for m in methods:
        ra = "; ".join(f"{r['attack']} {_f(r['robust_accuracy'], 3)} ± "
                       f"{_f(r['robust_accuracy_std'], 3)}"
                       for r in mean_rows if r["model"] == m and r["status"] == "ok")
        out.append(f"| {m} | " + ", ".join(str(c_seed[s][m][0]) for s in seeds) +
                   f" of {m_total} | {c_mean[m][0]} of {m_total} | " +
                   ", ".join(str(c_seed[s][m][1]) for s in seeds) + f" of {m_total} | {ra} |")
    return out + ["", verdict_line("worst case per norm, on the seed means",
                                   {m: c[0] for m, c in c_mean.items()}, m_total)]


def _mean_rows(rows: Sequence[Mapping[str, Any]]
               ) -> tuple[dict[tuple, dict[str, list[Mapping[str, Any]]]], list[dict[str, Any]]]:
    """Rows grouped per (scenario, method), and one row per group with the mean and standard
    deviation across seeds."""
    cells: dict[tuple, dict[str, list[Mapping[str, Any]]]] = {}
    for r in rows:
        cells.setdefault(tuple(r[k] for k in SCENARIO), {}).setdefault(r["model"], []).append(r)
    mean_rows = []
    for key, by in cells.items():
        for m, rs in by.items():
            ok = [r for r in rs if _ok(r)]
            er_m, er_s = stats.mean_std(float(r["er"]) for r in ok)
            sr_m, _ = stats.mean_std(float(r["success_rate"]) for r in ok)
            ra_m, ra_s = stats.mean_std(float(r["robust_accuracy"]) for r in ok)
            ca_m, ca_s = stats.mean_std(float(r["clean_accuracy"]) for r in ok)
            status = "ok" if ok else rs[0].get("status", "missing")
            mean_rows.append({
                "dataset": key[0], "arch": key[1], "attack": key[2], "model": m,
                "seed": "mean", "seeds": len(ok), "status": status,
                "er": er_m, "er_std": er_s, "er_low": er_m - er_s, "er_high": er_m + er_s,
                "success_rate": sr_m, "robust_accuracy": ra_m, "robust_accuracy_std": ra_s,
                "clean_accuracy": ca_m, "clean_accuracy_std": ca_s,
                "comparable": all(r.get("comparable", True) for r in ok),
                "diverged_seeds": sum(r.get("status") == "diverged" for r in rs),
                "noop_seeds": sum(r.get("status") == "no-op" for r in rs)})
    return cells, mean_rows


def _mean_table(cells: Mapping[tuple, Any], mean_rows: Sequence[Mapping[str, Any]],
                mean_rank: Mapping[tuple, Ranking], methods: Sequence[str]) -> list[str]:
    """One line per scenario: mean ± std of ER and the mean success rate per method."""
    out = []
    for key in cells:
        rk = mean_rank[key]
        line = []
        for m in methods:
            r = next((x for x in mean_rows if (x["model"], *[x[k] for k in SCENARIO]) ==
                      (m, *key)), None)
            if r is None:
                line.append("")
                continue
            if r["status"] != "ok":
                line.append(str(r["status"]))
                continue
            text = f"{_f(r['er'])} ± {_f(r['er_std'])} {_pct(r['success_rate'])}"
            if r["diverged_seeds"]:
                text += f" ({r['diverged_seeds']} diverged)"
            if r["noop_seeds"]:
                text += f" ({r['noop_seeds']} no-op)"
            if not r["comparable"]:
                text += " †"
            line.append(f"**{text}**" if m in rk.best else text)
        out.append(f"| {key[1]} | {key[2]} | " + " | ".join(line) + " |")
    return out
