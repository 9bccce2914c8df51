"""The comparison table on hand-made rows: best-in-N, significance, marks, seeds combined."""

from __future__ import annotations

import math

import numpy as np
import pytest

from darekit import io, layout, report
from darekit.report import Evaluated, counts, rank, rank_all


def row(model, er, *, attack="fgsm", arch="vgg16", comparable=True, seed=0, status="ok",
        **kw):
    return {"dataset": "d", "arch": arch, "attack": attack, "model": model, "er": er,
            "er_low": er - 0.01, "er_high": er + 0.01, "success_rate": 1.0 if comparable
            else 0.5, "comparable": comparable, "clean_accuracy": 0.9,
            "clean_accuracy_low": 0.85, "clean_accuracy_high": 0.95, "robust_accuracy": 0.3,
            "robust_accuracy_low": 0.2, "robust_accuracy_high": 0.4, "budget": 0.1,
            "norm": "linf", "seed": seed, "status": status, **kw}


TABLE = [  # 2 architectures x 2 attacks, 3 methods
    row("original", 0.10), row("dare", 0.30), row("adv-fgsm", 0.20),
    row("original", 0.05, attack="cw"), row("dare", 0.04, attack="cw"),
    row("adv-fgsm", 0.06, attack="cw"),
    row("original", 0.20, arch="alexnet"), row("dare", 0.25, arch="alexnet"),
    row("adv-fgsm", 0.25, arch="alexnet"),
    row("original", 0.01, arch="alexnet", attack="cw"),
    row("dare", 0.09, arch="alexnet", attack="cw"),
    row("adv-fgsm", math.nan, arch="alexnet", attack="cw"),
]


def test_best_in_n_on_a_hand_made_table():
    rk = rank_all(TABLE, None)
    assert rk["d", "vgg16", "fgsm"].best == {"dare"}
    assert rk["d", "vgg16", "cw"].best == {"adv-fgsm"}
    assert rk["d", "alexnet", "fgsm"].best == {"dare", "adv-fgsm"}   # a tie: both are best
    assert rk["d", "alexnet", "cw"].best == {"dare"}                 # NaN never wins
    assert counts(rk, ["original", "dare", "adv-fgsm"]) == {
        "original": (0, 0), "dare": (3, 0), "adv-fgsm": (2, 0)}


def _per_image(base: float, n: int = 80, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    return base + np.random.default_rng(seed).normal(0, noise, n) if noise else np.full(n, base)


def test_a_consistent_win_is_significant_and_a_noisy_one_is_not():
    rng = np.random.default_rng(0)
    runner = rng.uniform(0.1, 0.2, 80)
    clear = {"a": runner + 0.02, "b": runner}
    rows = [row("a", float(np.mean(clear["a"]))), row("b", float(np.mean(runner)))]
    r = rank(rows, clear)
    assert r.best == {"a"} and r.significant and r.runner_up == "b"
    assert r.difference.low == pytest.approx(0.02)
    noisy = {"a": runner + rng.normal(0.001, 0.05, 80), "b": runner}
    rows = [row("a", float(np.mean(noisy["a"]))), row("b", float(np.mean(runner)))]
    r = rank(rows, noisy)
    assert r.best == {"a"} and not r.significant


def test_marks_not_comparable_diverged_and_never_significant_without_comparability():
    runner = np.linspace(0.1, 0.2, 40)
    per = {"a": runner + 0.05, "b": runner, "c": runner}
    rows = [row("a", 0.2, comparable=False), row("b", 0.15), row("c", math.nan,
                                                                  status="diverged")]
    r = rank(rows, per)
    assert r.best == {"a"} and not r.significant      # the winner's ER is not comparable
    lines = report.er_table(rows, {("d", "vgg16", "fgsm"): r})
    assert "†" in lines[2] and "**" in lines[2] and "★" not in lines[2]
    assert "| diverged |" in lines[2]


def test_er_table_marks_the_significant_winner():
    runner = np.linspace(0.1, 0.2, 40)
    per = {("a", "fgsm"): runner + 0.05, ("b", "fgsm"): runner}
    rows = [row("a", float(np.mean(runner + 0.05))), row("b", float(np.mean(runner)))]
    rk = rank_all(rows, per)
    line = report.er_table(rows, rk)[2]
    assert line.startswith("| vgg16 | fgsm | **0.2000 [0.1900, 0.2100] 100%** ★ | 0.1500")
    method = "\n".join(report.method_table(rows, rk))
    assert "| a | 1 of 1 | 1 of 1 | 0.900 [0.850, 0.950] |" in method


def _evaluated(tmp_path, seed: int, shift: float) -> Evaluated:
    """A run whose results.json holds two methods on one scenario; per-image arrays saved."""
    run = tmp_path / f"s{seed}"
    base = np.linspace(0.1, 0.2, 30)
    rows = []
    for model, er in (("dare", base + shift), ("adv-fgsm", base)):
        x_norm = np.ones(30)
        io.write_npz(run / f"{layout.eval_part(model, 'fgsm')}.npz", fooled=np.ones(30, bool),
                     perturbation=er, x_norm=x_norm, clean_correct=np.ones(30, bool))
        rows.append(row(model, float(er.mean()), seed=seed))
    io.write_json(run / layout.RESULTS_JSON, {"results": rows, "definitions": {"er": "ER"}})
    return Evaluated.load(run)


def test_seeds_are_combined_as_mean_and_std(tmp_path):
    evals = [_evaluated(tmp_path, 0, 0.02), _evaluated(tmp_path, 1, 0.04),
             _evaluated(tmp_path, 2, -0.01)]
    md = report.combined_report(evals, tmp_path / "out")
    ers = [0.15 + s for s in (0.02, 0.04, -0.01)]
    mean, std = np.mean(ers), np.std(ers, ddof=1)
    assert f"**{mean:.4f} ± {std:.4f} 100%**" in md
    # dare wins seeds 0 and 1 (significantly: a constant shift), adv-fgsm seed 2
    assert "| dare | 1, 1, 0 of 1 | 1 of 1 | 1, 1, 0 of 1 |" in md
    assert "| adv-fgsm | 0, 0, 1 of 1 | 0 of 1 | 0, 0, 1 of 1 |" in md
    csv = io.read_csv(tmp_path / "out" / "results.csv")
    mean_rows = [r for r in csv if r["seed"] == "mean"]
    assert {r["model"] for r in mean_rows} == {"dare", "adv-fgsm"}
    assert (tmp_path / "out" / "er.png").is_file()


def test_run_report_adds_the_worst_case_per_norm(tmp_path):
    """Two L-inf attacks on two methods: dare looks best under FGSM alone, but PGD finds much
    smaller perturbations on it, so the worst case ranks the baseline first."""
    n = 40
    base = np.linspace(0.1, 0.2, n)
    ers = {("dare", "fgsm"): base + 0.05, ("dare", "pgd"): base - 0.05,
           ("adv-fgsm", "fgsm"): base, ("adv-fgsm", "pgd"): base}
    parts, rows = {}, []
    for (model, attack), er in ers.items():
        parts[model, attack] = {"fooled": np.ones(n, bool), "perturbation": er,
                                "x_norm": np.ones(n), "clean_correct": np.ones(n, bool),
                                "robust_at_budget": np.zeros(n, bool), "lo": er * 0.99,
                                "hi": er}
        rows.append(row(model, float(er.mean()), attack=attack))
    path = report.write_run_report(tmp_path, {"results": rows}, parts)
    md = path.read_text()
    assert "## Worst case per norm" in md
    worst = io.read_json(tmp_path / "results.json")["worst_case"]
    by = {r["model"]: r for r in worst}
    assert set(by) == {"dare", "adv-fgsm"} and {r["attack"] for r in worst} == {"worst-linf"}
    assert by["dare"]["er"] == pytest.approx(float(np.mean(base - 0.05)))
    assert by["adv-fgsm"]["er"] == pytest.approx(float(np.mean(base)))
    assert by["adv-fgsm"]["significantly_best"] and not by["dare"]["best"]
    # The per-attack ranking still has dare best under FGSM.
    per_attack = {(r["model"], r["attack"]): r for r in
                  io.read_json(tmp_path / "results.json")["results"]}
    assert per_attack["dare", "fgsm"]["best"]


def test_verdict_lines_name_the_leaders_ties_and_dare():
    line = report.verdict_line("per attack", {"original": 0, "dare": 2, "dare-s": 1,
                                              "adv-pgd": 3}, 6, {"dare": 1, "adv-pgd": 2})
    assert line == ("**Verdict, per attack**: highest ER in the most scenarios: adv-pgd, "
                    "3 of 6 (significantly 2); DARE (dare, dare-s) together: 3 of 6 "
                    "(significantly 1).")
    tie = report.verdict_line("worst case", {"dare": 2, "adv-pgd": 2}, 4)
    assert "dare and adv-pgd, 2 of 4 each" in tie and "significantly" not in tie
    assert "no scenario" in report.verdict_line("worst case", {}, 0)


def _hard_case(n: int = 40):
    """Per attack, dare has the highest ER under FGSM and under PGD (by 0.02, every image);
    but the cross-check's APGD, on the 30 cross-checked images, breaks dare at much smaller
    perturbations than any of its evaluated attacks found: over the worst case, the baseline
    wins. Returns rows, parts and found (``worstcase.crosscheck_parts``)."""
    from darekit.worstcase import crosscheck_parts

    base = np.linspace(0.1, 0.2, n)
    parts, rows = {}, []
    for model, shift in (("dare", 0.02), ("adv-fgsm", 0.0)):
        for attack in ("fgsm", "pgd"):
            er = base + shift
            parts[model, attack] = {"fooled": np.ones(n, bool), "perturbation": er,
                                    "x_norm": np.ones(n), "clean_correct": np.ones(n, bool),
                                    "robust_at_budget": er > 0.15, "lo": er * 0.99, "hi": er}
            rows.append(row(model, float(er.mean()), attack=attack))
    pick = np.arange(5, 35)
    found = {}
    for model, norms in (("dare", np.full(30, 0.05)), ("adv-fgsm", np.full(30, np.nan))):
        found.update({(model, a): p for a, p in crosscheck_parts(
            {"apgd_ce": norms}, pick, parts[model, "fgsm"], 0.1).items()})
    return rows, parts, found, base


def test_run_report_worst_case_winner_differs_from_the_per_attack_winner(tmp_path):
    rows, parts, found, base = _hard_case()
    path = report.write_run_report(tmp_path, {"results": rows}, parts, found=found)
    js = io.read_json(tmp_path / "results.json")
    per_attack = {(r["model"], r["attack"]): r for r in js["results"]}
    assert per_attack["dare", "fgsm"]["significantly_best"]
    assert per_attack["dare", "pgd"]["significantly_best"]
    worst = {r["model"]: r for r in js["worst_case"]}
    assert worst["dare"]["attacks"] == "apgd_ce,fgsm,pgd"
    assert worst["dare"]["coverage"] == {"apgd_ce": 30}
    expected = np.concatenate([base[:5] + 0.02, np.full(30, 0.05), base[35:] + 0.02])
    assert worst["dare"]["er"] == pytest.approx(float(expected.mean()))
    assert worst["adv-fgsm"]["er"] == pytest.approx(float(base.mean()))
    assert worst["adv-fgsm"]["significantly_best"] and not worst["dare"]["best"]
    # Robust at the budget: APGD broke every cross-checked dare image.
    assert worst["dare"]["robust_accuracy"] == pytest.approx(
        float(np.mean(np.r_[base[:5], base[35:]] + 0.02 > 0.15)) * 10 / 40)
    md = path.read_text()
    per, _, wc = md.partition("## Worst case per norm")
    # Both measures have their counts and a verdict, each naming its own winner.
    assert "| dare | 2 of 2 | 2 of 2 |" in per and "| adv-fgsm | 0 of 2 | 0 of 2 |" in per
    assert ("**Verdict, per attack (the paper's measure)**: highest ER in the most "
            "scenarios: dare, 2 of 2 (significantly 2)") in per
    assert "| adv-fgsm | 1 of 1 | 1 of 1 |" in wc and "| dare | 0 of 1 | 0 of 1 |" in wc
    assert ("**Verdict, worst case per norm**: highest ER in the most scenarios: adv-fgsm, "
            "1 of 1 (significantly 1); DARE (dare): 0 of 1 (significantly 0).") in wc
    assert "minimum over apgd_ce (on 30 of 40 images), fgsm, pgd" in wc


def test_combined_report_has_the_worst_case_with_its_own_counts(tmp_path):
    evals = []
    for seed, dare_wins in ((0, False), (1, False), (2, True)):
        run = tmp_path / f"s{seed}"
        rows, parts, found, _ = _hard_case()
        rows = [{**r, "seed": seed} for r in rows]
        if dare_wins:      # seed 2: APGD found nothing on dare either
            found = {k: {**v, "fooled": np.zeros(40, bool), "robust_at_budget":
                         np.ones(40, bool), "perturbation": np.full(40, np.nan)}
                     for k, v in found.items()}
        report.write_run_report(run / layout.EVAL_DIR, {"results": rows}, parts, seed=seed,
                                found=found)
        for (m, a), arrays in parts.items():
            io.write_npz(run / f"{layout.eval_part(m, a)}.npz", **arrays)
        evals.append(Evaluated.load(run))
    md = report.combined_report(evals, tmp_path / "out")
    per, _, wc = md.partition("Worst case per norm")
    assert "| dare | 1, 1, 1 of 2 |" not in per and "| dare | 2, 2, 2 of 2 | 2 of 2 |" in per
    assert "| adv-fgsm | 1, 1, 0 of 1 | 1 of 1 | 1, 1, 0 of 1 |" in wc
    assert "| dare | 0, 0, 1 of 1 | 0 of 1 | 0, 0, 1 of 1 |" in wc
    assert "**Verdict, per attack (the paper's measure), on the seed means**: " \
           "highest ER in the most scenarios: dare, 2 of 2" in per
    assert "**Verdict, worst case per norm, on the seed means**: highest ER in the most " \
           "scenarios: adv-fgsm, 1 of 1" in wc
    assert "minimum over apgd_ce (on 30 of 40 images), fgsm, pgd" in wc
    csv = io.read_csv(tmp_path / "out" / "results.csv")
    assert {r["model"] for r in csv if r["attack"] == "worst-linf" and r["seed"] == "mean"} \
        == {"dare", "adv-fgsm"}
