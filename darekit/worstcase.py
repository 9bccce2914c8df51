"""The worst case beside the paper's per-attack measure.

The paper reports Empirical Robustness per attack; a method can then look robust because one
attack is weak on it. The worst case of a norm takes, for each test image, the smallest
perturbation that *any* attack of that norm found (L-inf: FGSM, BIM, PGD, ...; L2: C&W,
DeepFool), and an image counts as robust at the budget only if every attack of the norm left it
robust. ER and robust accuracy of these minima are reported as the pseudo-attacks
``worst-linf`` and ``worst-l2``, with their own rankings ("best in N", "significantly best in
K").

Model-first: ``combine(parts, norms)`` takes one model's per-attack arrays (as
``AttackEvaluation.arrays()``) and returns the worst case per norm; ``worst_case_rows`` does it
for every model of an evaluation, as rows shaped like the per-attack rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from darekit.errors import DareError

PREFIX = "worst-"
"""``worst-<norm>``: the pseudo-attack name of a norm's worst case."""


def name(norm: str) -> str:
    return f"{PREFIX}{norm}"


def is_worst_case(attack: str) -> bool:
    return attack.startswith(PREFIX)


def combine(parts: Mapping[str, Mapping[str, np.ndarray]], norms: Mapping[str, str],
            min_attacks: int = 2) -> dict[str, dict[str, np.ndarray]]:
    """The worst case per norm of one model on one set of N test images.

    ``parts``: ``{attack: arrays}`` with ``clean_correct``, ``fooled``, ``perturbation`` (NaN
    where not fooled), ``x_norm``, ``robust_at_budget``, each ``(N,)``; ``norms``: ``{attack:
    norm}``. Norms with fewer than ``min_attacks`` attacks in ``parts`` are left out (one attack
    is its own worst case). Returns ``{norm: arrays}`` with the same keys plus ``lo``/``hi``
    (NaN: no bracket), ``source`` ``(N,)`` int (index into ``attacks`` of the attack that found
    the minimum; -1 where none fooled) and ``attacks`` (the attacks combined, sorted).
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
        }
    return out


def worst_case_rows(rows: Sequence[Mapping[str, Any]],
                    parts: Mapping[tuple[str, str], Mapping[str, np.ndarray]], seed: int = 0
                    ) -> tuple[list[dict[str, Any]], dict[tuple[str, str], np.ndarray]]:
    """Rows of the worst case per (model, norm), shaped like the per-attack rows of ``rows``
    (``evaluate``'s summaries: ER and robust accuracy with intervals), and their per-image
    relative perturbations ``{(model, worst-<norm>): (N,)}`` for the paired significance tests.

    A model gets a norm's worst case only when it was evaluated under every attack of that norm
    that any model was (otherwise its worst case would be over fewer attacks than the others',
    and rankings would compare unequal things).
    """
    from darekit.evaluate import AttackEvaluation

    norms = {r["attack"]: r["norm"] for r in rows if r.get("norm")}
    everyone: dict[str, set[str]] = {}
    for attack, norm in norms.items():
        everyone.setdefault(norm, set()).add(attack)
    by_model: dict[str, dict[str, Mapping[str, np.ndarray]]] = {}
    for (model, attack), arrays in parts.items():
        if not is_worst_case(attack) and attack in norms:
            by_model.setdefault(model, {})[attack] = arrays
    first_row = {r["model"]: r for r in rows}
    out_rows: list[dict[str, Any]] = []
    per_image: dict[tuple[str, str], np.ndarray] = {}
    for model, mparts in sorted(by_model.items()):
        for norm, arrays in combine(mparts, norms).items():
            if set(arrays["attacks"]) != everyone[norm]:
                continue
            budgets = {r["budget"] for r in rows if r["model"] == model and r["norm"] == norm}
            ev = AttackEvaluation(
                attack=name(norm), norm=norm, clean_correct=arrays["clean_correct"],
                fooled=arrays["fooled"], perturbation=arrays["perturbation"],
                x_norm=arrays["x_norm"], robust_at_budget=arrays["robust_at_budget"],
                budget=float(min(budgets)), lo=arrays["lo"], hi=arrays["hi"], rounds=0,
                evaluations=0, seconds=0.0, config={"attacks": list(arrays["attacks"])})
            base = first_row[model]
            row = {k: base[k] for k in ("dataset", "arch", "seed", "model") if k in base}
            row.update(ev.summary(seed), worst_case=True,
                       attacks=",".join(arrays["attacks"]))
            out_rows.append(row)
            per_image[model, name(norm)] = ev.per_image()
    return out_rows, per_image
