"""The worst case per norm (``darekit.worstcase``) against hand-computed minima, on inputs
chosen to break it: disjoint and overlapping fooled sets, ties, nothing fooled, one attack."""

from __future__ import annotations

import math

import numpy as np
import pytest

from darekit.errors import DareError
from darekit.worstcase import combine, worst_case_rows

NAN = np.nan


def part(fooled, pert, robust, x_norm=(1.0, 2.0, 1.0, 4.0), correct=(1, 1, 1, 1)):
    fooled = np.array(fooled, bool)
    return {"clean_correct": np.array(correct, bool), "fooled": fooled,
            "perturbation": np.where(fooled, np.array(pert, float), NAN),
            "x_norm": np.array(x_norm, float), "robust_at_budget": np.array(robust, bool)}


NORMS = {"fgsm": "linf", "pgd": "linf", "bim": "linf", "cw": "l2", "deepfool": "l2"}


def test_per_image_minimum_over_attacks_of_one_norm():
    parts = {
        # fgsm fools images 0, 1 (0.2, 0.5); pgd fools 1, 2 (0.3, 0.1); image 3 survives both
        "fgsm": part([1, 1, 0, 0], [0.2, 0.5, 9, 9], [0, 0, 1, 1]),
        "pgd": part([0, 1, 1, 0], [9, 0.3, 0.1, 9], [1, 0, 0, 1]),
        # An L2 attack must not leak into the L-inf minimum, even with smaller numbers.
        "cw": part([1, 1, 1, 1], [0.01, 0.01, 0.01, 0.01], [0, 0, 0, 0]),
    }
    out = combine(parts, NORMS)
    assert set(out) == {"linf"}  # one L2 attack: its own worst case, not combined
    w = out["linf"]
    np.testing.assert_array_equal(w["fooled"], [True, True, True, False])
    np.testing.assert_allclose(w["perturbation"], [0.2, 0.3, 0.1, NAN])
    np.testing.assert_array_equal(w["robust_at_budget"], [False, False, False, True])
    assert list(w["attacks"]) == ["fgsm", "pgd"]
    np.testing.assert_array_equal(w["source"], [0, 1, 1, -1])
    # ER over the fooled images: 0.2/1, 0.3/2, 0.1/1 (image 3 has no minimal perturbation).
    er = np.nanmean(w["perturbation"] / w["x_norm"])
    assert er == pytest.approx((0.2 + 0.15 + 0.1) / 3)


def test_ties_and_nothing_fooled():
    parts = {"cw": part([1, 0, 0, 0], [0.4, 9, 9, 9], [0, 1, 1, 1]),
             "deepfool": part([1, 0, 0, 0], [0.4, 9, 9, 9], [0, 1, 1, 1])}
    w = combine(parts, NORMS)["l2"]
    np.testing.assert_allclose(w["perturbation"], [0.4, NAN, NAN, NAN])
    assert w["source"][0] in (0, 1)
    none = {"cw": part([0] * 4, [9] * 4, [1] * 4), "deepfool": part([0] * 4, [9] * 4, [1] * 4)}
    w = combine(none, NORMS)["l2"]
    assert not w["fooled"].any() and np.isnan(w["perturbation"]).all()
    assert w["robust_at_budget"].all()


def test_refuses_parts_of_other_images():
    parts = {"fgsm": part([1, 0, 0, 0], [0.1, 9, 9, 9], [0, 1, 1, 1]),
             "pgd": part([1, 0, 0, 0], [0.1, 9, 9, 9], [0, 1, 1, 1], x_norm=(1, 1, 1, 1))}
    with pytest.raises(DareError, match="x_norm differ"):
        combine(parts, NORMS)
    with pytest.raises(DareError, match="no norm known"):
        combine({"mystery": parts["fgsm"]}, NORMS)


def _row(model, attack, norm):
    return {"dataset": "fashion_mnist", "arch": "alexnet", "seed": 0, "model": model,
            "attack": attack, "norm": norm, "budget": 0.1 if norm == "linf" else 1.0}


def test_rows_only_for_models_evaluated_under_every_attack_of_the_norm():
    rows = [_row("original", a, "linf") for a in ("fgsm", "pgd")] + [_row("adv-fgsm", "fgsm",
                                                                          "linf")]
    parts = {("original", "fgsm"): part([1, 1, 0, 0], [0.2, 0.5, 9, 9], [0, 0, 1, 1]),
             ("original", "pgd"): part([0, 1, 1, 0], [9, 0.3, 0.1, 9], [1, 0, 0, 1]),
             # adv-fgsm was evaluated under FGSM only: no worst case over fewer attacks.
             ("adv-fgsm", "fgsm"): part([1, 0, 0, 0], [0.05, 9, 9, 9], [0, 1, 1, 1])}
    out, per_image = worst_case_rows(rows, parts)
    assert [(r["model"], r["attack"]) for r in out] == [("original", "worst-linf")]
    r = out[0]
    assert r["worst_case"] and r["attacks"] == "fgsm,pgd" and r["seed"] == 0
    assert r["er"] == pytest.approx((0.2 + 0.15 + 0.1) / 3)
    assert r["robust_accuracy"] == pytest.approx(0.25)     # only image 3 survives both
    assert r["n_fooled"] == 3 and r["success_rate"] == pytest.approx(0.75)
    assert r["robust_accuracy_low"] < 0.25 < r["robust_accuracy_high"]
    np.testing.assert_allclose(per_image["original", "worst-linf"], [0.2, 0.15, 0.1, NAN])
    assert not math.isnan(r["er_low"]) and r["er_low"] <= r["er"] <= r["er_high"]
