"""The worst case per norm (``darekit.worstcase``) against hand-computed minima, on inputs
chosen to break it: disjoint and overlapping fooled sets, ties, nothing fooled, one attack."""

from __future__ import annotations

import math

import numpy as np
import pytest

from darekit.errors import DareError
from darekit.worstcase import combine, crosscheck_parts, describe, worst_case_rows

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


# ------------------------------------------------------------------------ the cross-check's APGD
def test_crosscheck_parts_map_the_subset_back_and_say_nothing_elsewhere():
    # N = 6 evaluated images; the cross-check ran on images 1, 3, 4. APGD-CE broke 1 and 4;
    # image 4 is misclassified clean by the evaluation (a borderline logit): no evidence.
    ref = {"clean_correct": np.array([1, 1, 1, 1, 0, 1], bool), "x_norm": np.full(6, 2.0)}
    out = crosscheck_parts({"apgd_ce": [0.1, NAN, 0.08], "apgd_t": [NAN, NAN, NAN],
                            "square": [0.1, 0.1, 0.1]}, np.array([1, 3, 4]), ref, 0.1)
    assert set(out) == {"apgd_ce", "apgd_t"}          # Square is not an attack of the minimum
    a = out["apgd_ce"]
    np.testing.assert_array_equal(a["covered"], [0, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(a["fooled"], [0, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(a["perturbation"], [NAN, 0.1, NAN, NAN, NAN, NAN])
    np.testing.assert_array_equal(a["robust_at_budget"], [1, 0, 1, 1, 1, 1])
    assert a["eps"] == 0.1 and not out["apgd_t"]["fooled"].any()
    with pytest.raises(DareError, match="distinct"):
        crosscheck_parts({"apgd_ce": [0.1, 0.1]}, np.array([1, 1]), ref, 0.1)
    with pytest.raises(DareError, match="in \\[0, 6\\)"):
        crosscheck_parts({"apgd_ce": [0.1]}, np.array([6]), ref, 0.1)


def test_apgd_joins_the_linf_minimum_only_where_it_ran():
    ref = part([0, 0, 0, 0], [9] * 4, [1] * 4)
    # PGD: images 0 (0.3) and 1 (0.2) fooled, 2 and 3 robust. APGD ran on images 1, 2 only:
    # it found 0.1 on image 1 and broke image 2 (0.1), which PGD left robust.
    parts = {"pgd": part([1, 1, 0, 0], [0.3, 0.2, 9, 9], [0, 0, 1, 1]),
             **crosscheck_parts({"apgd_ce": [0.1, 0.1]}, np.array([1, 2]), ref, 0.1)}
    w = combine(parts, {"pgd": "linf", "apgd_ce": "linf"})["linf"]
    np.testing.assert_allclose(w["perturbation"], [0.3, 0.1, 0.1, NAN])
    np.testing.assert_array_equal(w["robust_at_budget"], [0, 0, 0, 1])
    assert list(w["attacks"]) == ["apgd_ce", "pgd"] and list(w["covered"]) == [2, 4]
    # An attack claiming a result outside its images is refused.
    bad = dict(parts["apgd_ce"], fooled=np.array([1, 1, 1, 0], bool))
    with pytest.raises(DareError, match="did not run on"):
        combine({**parts, "apgd_ce": bad}, {"pgd": "linf", "apgd_ce": "linf"})


def _apgd(model_ref, values, pick=(1, 2), eps=0.1):
    return crosscheck_parts({"apgd_ce": values}, np.array(pick), model_ref, eps)["apgd_ce"]


def test_rows_take_apgd_with_its_coverage_and_leave_it_out_when_one_model_lacks_it():
    rows = [_row(m, a, "linf") for m in ("original", "dare") for a in ("fgsm", "pgd")]
    parts = {(m, a): part([1, 1, 0, 0], [0.2, 0.5, 9, 9], [0, 0, 1, 1])
             for m in ("original", "dare") for a in ("fgsm", "pgd")}
    ref = parts["original", "fgsm"]
    found = {("original", "apgd_ce"): _apgd(ref, [0.1, 0.1]),
             ("dare", "apgd_ce"): _apgd(ref, [NAN, NAN])}
    out, per_image = worst_case_rows(rows, parts, found=found)
    by = {r["model"]: r for r in out}
    assert by["original"]["attacks"] == "apgd_ce,fgsm,pgd" == by["dare"]["attacks"]
    assert by["original"]["coverage"] == {"apgd_ce": 2} and not by["original"]["left_out"]
    # APGD lowered image 1's minimum to 0.1 and broke image 2 on original, not on dare.
    np.testing.assert_allclose(per_image["original", "worst-linf"], [0.2, 0.05, 0.1, NAN])
    np.testing.assert_allclose(per_image["dare", "worst-linf"], [0.2, 0.25, NAN, NAN])
    assert by["original"]["robust_accuracy"] == pytest.approx(0.25)
    assert by["dare"]["robust_accuracy"] == pytest.approx(0.5)
    line = describe(by["original"])
    assert "worst-linf: minimum over apgd_ce (on 2 of 4 images), fgsm, pgd" in line
    assert "no evidence" in line

    # An evaluation cached before the cross-check kept its per-image results: dare has none.
    # APGD is then left out for every model (never a minimum over unequal attacks), and said.
    out, _ = worst_case_rows(rows, parts, found={k: v for k, v in found.items()
                                                 if k[0] == "original"})
    assert {r["attacks"] for r in out} == {"fgsm,pgd"}
    assert all("apgd_ce: no per-image results for dare" in r["left_out"] for r in out)
    assert "left out: apgd_ce" in describe(out[0])
    # Run at another budget than the evaluation's: left out too.
    other = {k: {**v, "eps": 0.05} for k, v in found.items()}
    out, _ = worst_case_rows(rows, parts, found=other)
    assert {r["attacks"] for r in out} == {"fgsm,pgd"}
    assert "another budget" in out[0]["left_out"]


def test_apgd_alone_makes_no_worst_case_of_a_norm_not_evaluated():
    # Only L2 attacks evaluated: APGD's L-inf results must not invent an L-inf worst case.
    rows = [_row("original", a, "l2") for a in ("cw", "deepfool")]
    parts = {("original", a): part([1, 1, 0, 0], [0.2, 0.5, 9, 9], [0, 0, 1, 1])
             for a in ("cw", "deepfool")}
    found = {("original", "apgd_ce"): _apgd(parts["original", "cw"], [0.1, 0.1])}
    out, _ = worst_case_rows(rows, parts, found=found)
    assert [(r["attack"], r["attacks"]) for r in out] == [("worst-l2", "cw,deepfool")]


def test_crosscheck_keeps_the_norm_of_what_each_attack_found():
    """On a tiny dense model: ``CrossCheckResult.linf`` is NaN exactly where the attack did not
    break a correctly classified input, within the budget elsewhere; and it is what the
    adversarial of that attack measures (APGD-CE's, rerun from the same seeds)."""
    import keras

    from darekit import backend as B
    from darekit import crosscheck as C

    init = lambda k: keras.initializers.GlorotUniform(seed=k)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Dense(32, activation="relu", kernel_initializer=init(0))(
        keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10, kernel_initializer=init(1))(h))
    x = np.random.default_rng(0).uniform(size=(40, 8, 8, 1)).astype(np.float32)
    pred = np.argmax(B.to_numpy(model(x, training=False)), axis=1)
    y = np.concatenate([pred[:30], (pred[30:] + 1) % 10])     # 10 misclassified clean
    cfg = C.CrossCheckConfig(eps=0.3, apgd_iter=10, dlr_targets=2, square_queries=50,
                             batch_size=16)
    res = C.cross_check(model, x, y, cfg)
    assert set(res.linf) == set(cfg.attacks)
    for a, norms in res.linf.items():
        broken = res.clean_correct & ~res.robust[a]
        np.testing.assert_array_equal(~np.isnan(norms), broken)
        assert broken.any() and np.all(norms[broken] <= cfg.eps + 1e-6)
        assert np.all(norms[broken] > 0)
    # APGD-CE again, batch by batch as cross_check runs it: the same norms.
    ce, _ = C._classifiers(model, x.shape[1:], 10, cfg.batch_size)
    for b, rows in enumerate(C._batches(res.clean_correct, cfg.batch_size)):
        xa = C._apgd(ce, x[rows], C._one_hot(y[rows], 10), cfg, targeted=False,
                     keys=(C._key("apgd_ce"), b))
        d = np.abs(xa.astype(np.float64) - x[rows]).reshape(len(rows), -1).max(axis=1)
        hit = ~np.isnan(res.linf["apgd_ce"][rows])
        np.testing.assert_allclose(res.linf["apgd_ce"][rows][hit], d[hit])


@pytest.mark.slow
def test_evaluation_takes_apgd_into_the_worst_case_and_reads_old_parts(fm_run, tmp_path):
    """A run evaluated under FGSM and PGD on the margin, cross-checked on 16 of its 20 images:
    the L-inf worst case takes APGD where it ran. An evaluation whose cross-check parts were
    cached before the per-image results were kept still loads: APGD is left out, and said."""
    import shutil

    from darekit import io, layout
    from darekit.evaluate import EvalConfig, evaluate_run
    from darekit.rundir import Run

    dst = tmp_path / "run"
    shutil.copytree(fm_run, dst, ignore=shutil.ignore_patterns("eval", "models", "ats",
                                                               "slice", "adv", "logs"))
    run = Run.open(dst)
    run.save_model(run.load_model(1), "epoch1")
    cfg = EvalConfig(n=20, attacks=("fgsm", "pgd-margin"), crosscheck_n=16,
                     crosscheck_params={"apgd_iter": 5, "dlr_targets": 1,
                                        "square_queries": 20})
    evaluate_run(run, cfg, progress=False)
    out = dst / layout.EVAL_DIR
    worst = io.read_json(out / "results.json")["worst_case"]
    assert {r["model"] for r in worst} == {"original", "epoch1"}
    for r in worst:
        assert r["attacks"] == "apgd_ce,apgd_t,fgsm,pgd-margin" and not r["left_out"]
        assert r["coverage"] == {"apgd_ce": 16, "apgd_t": 16}
    assert "apgd_ce (on 16 of 20 images)" in (out / "report.md").read_text()

    # An older cross-check part of epoch1: no per-image arrays. Nothing is recomputed.
    npz = dst / layout.EVAL_PARTS / "epoch1__crosscheck.npz"
    arrays = io.read_npz(npz)
    io.write_npz(npz, **{k: v for k, v in arrays.items()
                         if not k.startswith("linf/") and k != "pick"})
    before = (dst / layout.EVAL_PARTS / "epoch1__crosscheck.json").stat().st_mtime
    evaluate_run(run, cfg, progress=False)
    assert (dst / layout.EVAL_PARTS / "epoch1__crosscheck.json").stat().st_mtime == before
    worst = io.read_json(out / "results.json")["worst_case"]
    assert {r["attacks"] for r in worst} == {"fgsm,pgd-margin"}
    assert all("no per-image results for epoch1" in r["left_out"] for r in worst)
    assert "left out: apgd_ce" in (out / "report.md").read_text()
