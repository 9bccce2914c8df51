"""The worst case beside the paper's per-attack measure.

The paper reports Empirical Robustness per attack; a method can then look robust because one
attack is weak on it. The worst case of a norm takes, for each test image, the smallest
perturbation that *any* attack of that norm found (L-inf: FGSM, BIM, PGD, ...; L2: C&W,
DeepFool), and an image counts as robust at the budget only if every attack of the norm left it
robust. ER and robust accuracy of these minima are reported as the pseudo-attacks
``worst-linf`` and ``worst-l2``, with their own rankings ("best in N", "significantly best in
K").

Beside the evaluated attacks, the L-inf worst case takes what the cross-check's APGD attacks
found (``FOUND``: ART's APGD-CE and targeted APGD-DLR, run at the L-inf budget): for an image
they broke, the L-inf norm of their adversarial is a perturbation that an attack found (at most
the budget, not a minimal one), and the image is not robust at the budget. The cross-check may
run on a subset of the N images (``--crosscheck-n``): an image outside it is no evidence of
anything, so there APGD counts as "not run" (neither fooled nor robust-breaking), and each
row says on how many images every attack of its minimum ran (``coverage``).

Model-first: ``combine(parts, norms)`` takes one model's per-attack arrays (as
``AttackEvaluation.arrays()``; ``crosscheck_parts`` makes the cross-check's into the same) and
returns the worst case per norm; ``worst_case_rows`` does it for every model of an evaluation,
as rows shaped like the per-attack rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from darekit.errors import DareError

PREFIX = "worst-"
"""``worst-<norm>``: the pseudo-attack name of a norm's worst case."""


FOUND: dict[str, str] = {"apgd_ce": "linf", "apgd_t": "linf"}
"""Cross-check attacks (``darekit.crosscheck``) whose per-image results join the worst case,
with their norm."""


def name(norm: str) -> str:
    return f"{PREFIX}{norm}"


def is_worst_case(attack: str) -> bool:
    return attack.startswith(PREFIX)


def combine(parts: Mapping[str, Mapping[str, np.ndarray]], norms: Mapping[str, str],
            min_attacks: int = 2) -> dict[str, dict[str, np.ndarray]]:
    """The worst case per norm of one model on one set of N test images.

    ``parts``: ``{attack: arrays}`` with ``clean_correct``, ``fooled``, ``perturbation`` (NaN
    where not fooled), ``x_norm``, ``robust_at_budget``, each ``(N,)``, and optionally
    ``covered`` ``(N,)`` bool (where the attack ran: ``crosscheck_parts``; elsewhere its arrays
    must be neutral: not fooled, robust); ``norms``: ``{attack: norm}``. Norms with fewer than
    ``min_attacks`` attacks in ``parts`` are left out (one attack is its own worst case).
    Returns ``{norm: arrays}`` with the same keys plus ``lo``/``hi`` (NaN: no bracket),
    ``source`` ``(N,)`` int (index into ``attacks`` of the attack that found the minimum; -1
    where none fooled), ``attacks`` (the attacks combined, sorted) and ``covered`` (per attack
    of ``attacks``, the number of images it ran on).
    """
    by_norm: dict[str, list[str]] = {}
    for attack in sorted(parts):
        if attack not in norms:
            raise DareError(f"no norm known for attack {attack!r}")
        by_norm.setdefault(norms[attack], []).append(attack)
    out: dict[str, dict[str, np.ndarray]] = {}
    for norm, attacks in sorted(by_norm.items()):
        if len(attacks) < min_attacks:
            continue
        first = parts[attacks[0]]
        for a in attacks[1:]:
            for key in ("clean_correct", "x_norm"):
                if not np.array_equal(parts[a][key], first[key]):
                    raise DareError(f"cannot combine {attacks[0]} and {a}: their {key} differ "
                                    "(not the same test images)")
        fooled = np.stack([np.asarray(parts[a]["fooled"], bool) for a in attacks])
        pert = np.stack([np.where(parts[a]["fooled"], parts[a]["perturbation"], np.inf)
                         for a in attacks]).astype(np.float64)
        source = np.argmin(pert, axis=0)
        any_fooled = fooled.any(axis=0)
        smallest = np.where(any_fooled, pert[source, np.arange(pert.shape[1])], np.nan)
        robust = np.stack([np.asarray(parts[a]["robust_at_budget"], bool) for a in attacks])
        for a in attacks:
            if "covered" in parts[a]:
                outside = ~np.asarray(parts[a]["covered"], bool)
                if (np.asarray(parts[a]["fooled"], bool) & outside).any() or \
                        not np.asarray(parts[a]["robust_at_budget"], bool)[outside].all():
                    raise DareError(f"{a} claims results on images it did not run on")
        out[norm] = {
            "clean_correct": np.asarray(first["clean_correct"], bool),
            "fooled": any_fooled,
            "perturbation": smallest,
            "x_norm": np.asarray(first["x_norm"], np.float64),
            "robust_at_budget": robust.all(axis=0),
            "lo": np.full(len(smallest), np.nan),
            "hi": np.full(len(smallest), np.nan),
            "source": np.where(any_fooled, source, -1),
            "attacks": np.array(attacks),
            "covered": np.array([int(np.sum(parts[a]["covered"])) if "covered" in parts[a]
                                 else len(smallest) for a in attacks]),
        }
    return out


def crosscheck_parts(linf: Mapping[str, np.ndarray], pick: np.ndarray,
                     reference: Mapping[str, np.ndarray], eps: float
                     ) -> dict[str, dict[str, Any]]:
    """One model's cross-check results as ``combine`` parts on the evaluation's N images.

    ``linf``: ``{attack: (K,)}`` (``CrossCheckResult.linf``: the L-inf norm of the adversarial
    that broke each of the K cross-checked images, NaN where none did), restricted to
    ``FOUND``; ``pick`` ``(K,)``: their indices among the N images; ``reference``: an
    evaluation part of the same model (its ``clean_correct`` and ``x_norm`` ``(N,)``);
    ``eps``: the cross-check's L-inf budget (kept as ``eps``: ``worst_case_rows`` checks it
    against the evaluation's).

    Inside ``pick``, an image is fooled when the attack broke it and the evaluation also found
    it correctly classified (a borderline logit can round differently in another batch);
    outside, the attack did not run: not fooled, perturbation NaN, robust (neutral for the
    minimum and for the AND of robust flags), ``covered`` False.
    """
    clean = np.asarray(reference["clean_correct"], bool)
    n, pick = len(clean), np.asarray(pick, np.int64)
    if pick.ndim != 1 or (pick.size and (pick.min() < 0 or pick.max() >= n)) \
            or len(np.unique(pick)) != len(pick):
        raise DareError(f"cross-check indices must be distinct and in [0, {n})")
    covered = np.zeros(n, bool)
    covered[pick] = True
    out = {}
    for attack, norms in linf.items():
        if attack not in FOUND:
            continue
        norms = np.asarray(norms, np.float64)
        if norms.shape != pick.shape:
            raise DareError(f"{attack}: {norms.shape} norms for {len(pick)} cross-checked images")
        fooled = np.zeros(n, bool)
        fooled[pick] = ~np.isnan(norms)
        fooled &= clean
        pert = np.full(n, np.nan)
        pert[pick] = norms
        out[attack] = {"clean_correct": clean, "fooled": fooled,
                       "perturbation": np.where(fooled, pert, np.nan),
                       "x_norm": np.asarray(reference["x_norm"], np.float64),
                       "robust_at_budget": ~fooled, "covered": covered, "eps": float(eps)}
    return out


def worst_case_rows(rows: Sequence[Mapping[str, Any]],
                    parts: Mapping[tuple[str, str], Mapping[str, np.ndarray]], seed: int = 0,
                    found: Mapping[tuple[str, str], Mapping[str, Any]] | None = None
                    ) -> tuple[list[dict[str, Any]], dict[tuple[str, str], np.ndarray]]:
    """Rows of the worst case per (model, norm), shaped like the per-attack rows of ``rows``
    (``evaluate``'s summaries: ER and robust accuracy with intervals), and their per-image
    relative perturbations ``{(model, worst-<norm>): (N,)}`` for the paired significance tests.

    A model gets a norm's worst case only when it was evaluated under every attack of that norm
    that any model was (otherwise its worst case would be over fewer attacks than the others',
    and rankings would compare unequal things). ``found``: ``{(model, attack): arrays}`` of
    ``FOUND`` attacks (``crosscheck_parts``, plus ``eps`` their budget); such an attack joins a
    norm that has evaluated attacks, and only when every model of that norm's worst case has
    it at the norm's budget: otherwise it is left out for all of them, and each row says why
    (``left_out``). Each row names the attacks of its minimum (``attacks``) and, where one ran
    on fewer than the N images, on how many (``coverage``).
    """
    from darekit.evaluate import AttackEvaluation

    found = found or {}
    norms = {r["attack"]: r["norm"] for r in rows if r.get("norm")}
    everyone: dict[str, set[str]] = {}
    for attack, norm in norms.items():
        everyone.setdefault(norm, set()).add(attack)
    by_model: dict[str, dict[str, Mapping[str, np.ndarray]]] = {}
    for (model, attack), arrays in parts.items():
        if not is_worst_case(attack) and attack in norms:
            by_model.setdefault(model, {})[attack] = arrays
    budgets = {(r["model"], r["norm"]): float(r["budget"]) for r in rows if r.get("norm")}
    # Which FOUND attacks join each norm: those every model of the norm's worst case has.
    joins: dict[str, list[str]] = {}
    left_out: dict[str, list[str]] = {}
    for norm, attacks in everyone.items():
        members = [m for m, mp in by_model.items() if attacks <= set(mp)]
        for a in sorted(x for x, n in FOUND.items() if n == norm):
            if not any((m, a) in found for m in members):
                continue                          # not run at all: nothing to say
            lacking = [m for m in members if (m, a) not in found]
            other = [m for m in members if (m, a) in found and not math.isclose(
                float(found[m, a].get("eps", math.nan)), budgets.get((m, norm), math.nan),
                rel_tol=1e-9)]
            if lacking:
                left_out.setdefault(norm, []).append(
                    f"{a}: no per-image results for {', '.join(sorted(lacking))} (a "
                    "cross-check cached before they were kept: delete its "
                    "eval/parts/*__crosscheck.* to recompute)")
            elif other:
                left_out.setdefault(norm, []).append(
                    f"{a}: run at another budget than the evaluation's for "
                    f"{', '.join(sorted(other))}")
            else:
                joins.setdefault(norm, []).append(a)
    first_row = {r["model"]: r for r in rows}
    out_rows: list[dict[str, Any]] = []
    per_image: dict[tuple[str, str], np.ndarray] = {}
    order = list(dict.fromkeys(r["model"] for r in rows))   # the per-attack rows' order
    for model, mparts in sorted(by_model.items(), key=lambda kv: (
            order.index(kv[0]) if kv[0] in order else len(order), kv[0])):
        extra = {a: found[model, a] for a in sum(joins.values(), []) if (model, a) in found}
        all_norms = {**norms, **{a: FOUND[a] for a in extra}}
        for norm, arrays in combine({**mparts, **extra}, all_norms).items():
            if set(arrays["attacks"]) != everyone[norm] | set(joins.get(norm, [])):
                continue
            attacks = [str(a) for a in arrays["attacks"]]
            n = len(arrays["clean_correct"])
            ev = AttackEvaluation(
                attack=name(norm), norm=norm, clean_correct=arrays["clean_correct"],
                fooled=arrays["fooled"], perturbation=arrays["perturbation"],
                x_norm=arrays["x_norm"], robust_at_budget=arrays["robust_at_budget"],
                budget=budgets[model, norm], lo=arrays["lo"], hi=arrays["hi"], rounds=0,
                evaluations=0, seconds=0.0, config={"attacks": attacks})
            base = first_row[model]
            row = {k: base[k] for k in ("dataset", "arch", "seed", "model") if k in base}
            coverage = {a: int(c) for a, c in zip(attacks, arrays["covered"], strict=True)
                        if int(c) < n}
            row.update(ev.summary(seed), worst_case=True, attacks=",".join(attacks),
                       coverage=coverage, left_out="; ".join(left_out.get(norm, [])))
            out_rows.append(row)
            per_image[model, name(norm)] = ev.per_image()
    return out_rows, per_image


def describe(row: Mapping[str, Any]) -> str:
    """One line: over which attacks a worst-case row's minimum was taken, on how many images
    each ran, and what was left out."""
    n = row.get("n", "?")
    cov = row.get("coverage") or {}
    parts = [f"{a} (on {cov[a]} of {n} images)" if a in cov else a
             for a in str(row.get("attacks", "")).split(",") if a]
    text = f"{row['attack']}: minimum over {', '.join(parts)}"
    if cov:
        text += ("; outside the cross-checked images the minimum is over the other attacks "
                 "only (no evidence there)")
    if row.get("left_out"):
        text += f"; left out: {row['left_out']}"
    return text
