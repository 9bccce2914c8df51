"""ddmin: the result fails, is 1-minimal, and the batched driver is the same algorithm."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from darekit.ddmin import ddmin, ddmin_batched, ddmin_search


def _monotone(culprits: frozenset[int]):
    """Fails iff the subset contains every culprit (one minimal failing set)."""
    return lambda s: culprits <= set(s)


def _any_of(groups: list[frozenset[int]]):
    """Fails iff the subset contains some group entirely (monotone, several minimal sets)."""
    return lambda s: any(g <= set(s) for g in groups)


def _non_monotone(table: dict[frozenset[int], bool], n: int):
    """An arbitrary predicate, failing on the full set and passing on the empty set."""
    full = frozenset(range(n))
    return lambda s: frozenset(s) == full or (bool(s) and table.get(frozenset(s), False))


def _check_one_minimal(result, test):
    assert test(result), "ddmin's result must fail the test"
    for drop in range(len(result)):
        assert not test(result[:drop] + result[drop + 1:]), (
            f"removing {result[drop]} from {result} still fails: not 1-minimal")


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 24).flatmap(
    lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1), min_size=1))))
def test_monotone_single_culprit_set_is_found_exactly(case):
    n, culprits = case
    test = _monotone(frozenset(culprits))
    result = ddmin(list(range(n)), test)
    _check_one_minimal(result, test)
    assert set(result) == culprits  # the only 1-minimal failing set


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 16).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.sets(st.integers(0, n - 1), min_size=1), min_size=1, max_size=4))))
def test_monotone_several_groups(case):
    n, groups = case
    test = _any_of([frozenset(g) for g in groups])
    _check_one_minimal(ddmin(list(range(n)), test), test)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 7).flatmap(lambda n: st.tuples(st.just(n), st.dictionaries(
    st.frozensets(st.integers(0, n - 1), min_size=1), st.booleans()))))
def test_non_monotone_predicates(case):
    n, table = case
    test = _non_monotone(table, n)
    _check_one_minimal(ddmin(list(range(n)), test), test)


def test_items_of_any_type_and_order_kept():
    items = list("abcdefgh")
    assert ddmin(items, lambda s: "g" in s and "b" in s) == ["b", "g"]


def test_preconditions():
    with pytest.raises(ValueError, match="does not fail"):
        ddmin([1, 2, 3], lambda s: False)
    with pytest.raises(ValueError, match="non-empty"):
        ddmin([], lambda s: True)


def test_cache_never_asks_twice():
    asked = []

    def test(s):
        asked.append(tuple(s))
        return {3, 11} <= set(s)

    ddmin(list(range(16)), test)
    assert len(asked) == len(set(asked))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 10_000)), min_size=1, max_size=8))
def test_batched_driver_equals_plain_ddmin(cases):
    """Many searches advance together; each gets exactly what a plain ddmin run gets."""
    preds = []
    for n, seed in cases:
        culprits = frozenset({seed % n, (seed // 7) % n})
        preds.append(_monotone(culprits))
    calls = []

    def test_batch(batch):
        calls.append(len(batch))
        assert len({i for i, _ in batch}) == len(batch)  # at most one query per search
        return [preds[i](s) for i, s in batch]

    results, queries = ddmin_batched([n for n, _ in cases], test_batch)
    for (n, _), pred, got, q in zip(cases, preds, results, queries, strict=True):
        asked = []
        plain = ddmin(list(range(n)), lambda s, p=pred, a=asked: a.append(1) or p(s))
        assert list(got) == plain
        assert q == len(asked)
    assert sum(calls) == queries.sum()
    assert len(calls) == queries.max()  # one round per step of the longest search


def test_known_failing_skips_the_full_set_query():
    search = ddmin_search(4, known_failing=True)
    first = next(search)
    assert first != (0, 1, 2, 3)
    seen = [first]
    try:
        verdict = 2 in first
        while True:
            q = search.send(verdict)
            seen.append(q)
            verdict = 2 in q
    except StopIteration as stop:
        assert stop.value == (2,)
    assert (0, 1, 2, 3) not in seen
    assert not list(itertools.chain.from_iterable(s for s in seen if not s))  # never empty


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 10_000)), min_size=1, max_size=8),
       st.booleans())
def test_finished_reports_every_search_once_as_it_ends(cases, known_failing):
    """The progress callback: each round, how many searches ended in it; all of them in all."""
    preds = [_monotone(frozenset({seed % n, (seed // 7) % n})) for n, seed in cases]
    active = []  # searches still asking, before each round
    reports = []

    def test_batch(batch):
        active.append(len(batch))
        return [preds[i](s) for i, s in batch]

    def finished(k):
        reports.append(k)

    results, _ = ddmin_batched([n for n, _ in cases], test_batch, known_failing=known_failing,
                               finished=finished)
    assert sum(reports) == len(cases) and all(k >= 0 for k in reports)
    # after each round, the searches that ended are those that do not ask in the next one
    after = reports[len(reports) - len(active):]
    nxt = [*active[1:], 0][:len(active)]
    assert [a - b for a, b in zip(active, nxt, strict=True)] == after
