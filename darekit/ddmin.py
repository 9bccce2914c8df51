"""Zeller's delta debugging (ddmin), generic, with a batched driver for many runs at once.

One algorithm, three ways to drive it:

- ``ddmin_search(n)``: a generator over the indices ``0..n-1``. It yields candidate subsets
  (sorted index tuples) and receives, via ``send``, whether each candidate *fails* (is
  failure-inducing). Its return value is a 1-minimal failing subset.
- ``ddmin(items, test)``: the classic function on any list and predicate (a thin wrapper).
- ``ddmin_batched(sizes, test_batch)``: advances many searches together; every round collects
  the pending candidate of each active search and answers them all with one ``test_batch``
  call (one model call for many inputs in ``darekit.mining``).

Contract (Zeller & Hildebrandt, TSE 2002): ``test(items)`` fails and ``test([])`` passes. The
result ``S`` fails, and removing any single element of ``S`` makes the test pass (1-minimal).
Answers are cached per search, so a subset is never asked twice.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")
Subset = tuple[int, ...]
Search = Generator[Subset, bool, Subset]


def _split(c: Subset, n: int) -> list[Subset]:
    """``c`` cut into ``n`` contiguous, near-equal, non-empty parts."""
    return [tuple(int(i) for i in part) for part in np.array_split(np.asarray(c), n) if len(part)]


def ddmin_search(n_items: int, *, known_failing: bool = False) -> Search:
    """ddmin over ``0..n_items-1`` as a coroutine: yield a subset, receive ``True`` if it fails.

    Args:
        n_items: how many items the failing configuration has (>= 1).
        known_failing: skip the initial check that the full set fails (the caller has seen it).

    Returns (as ``StopIteration.value``): a 1-minimal failing subset, sorted.

    Raises:
        ValueError: ``n_items < 1``, or the full set does not fail.
    """
    if n_items < 1:
        raise ValueError("ddmin needs a non-empty failing configuration")
    cache: dict[Subset, bool] = {}

    def fails(s: Subset) -> Generator[Subset, bool, bool]:
        if s not in cache:
            cache[s] = bool((yield s))
        return cache[s]

    c: Subset = tuple(range(n_items))
    if known_failing:
        cache[c] = True
    elif not (yield from fails(c)):
        raise ValueError("ddmin: the full configuration does not fail the test")
    n = 2
    while len(c) >= 2:
        parts = _split(c, min(n, len(c)))
        for part in parts:  # reduce to a subset
            if (yield from fails(part)):
                c, n = part, 2
                break
        else:
            # Complements; with two parts they are the parts themselves (cached, not re-asked).
            for part in parts:
                rest = tuple(i for i in c if i not in set(part))
                if (yield from fails(rest)):
                    c, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= len(c):  # finest granularity and nothing smaller fails: 1-minimal
                    break
                n = min(len(c), 2 * n)
    return c


def ddmin(items: Sequence[T], test: Callable[[list[T]], bool]) -> list[T]:
    """A 1-minimal subset of ``items`` for which ``test`` returns True ("fails").

    ``test(list(items))`` must be True and ``test([])`` False. Order of ``items`` is kept.
    """
    items = list(items)
    search = ddmin_search(len(items))
    try:
        query = next(search)
        while True:
            query = search.send(bool(test([items[i] for i in query])))
    except StopIteration as stop:
        return [items[i] for i in stop.value]


def ddmin_batched(sizes: Sequence[int],
                  test_batch: Callable[[list[tuple[int, Subset]]], Sequence[bool]],
                  *, known_failing: bool = False,
                  finished: Callable[[int], object] | None = None
                  ) -> tuple[list[Subset], np.ndarray]:
    """Run ``len(sizes)`` ddmin searches together, one ``test_batch`` call per round.

    Args:
        sizes: number of items of each search (>= 1 each).
        test_batch: receives ``[(search_id, subset), ...]`` (at most one entry per search) and
            returns, in the same order, whether each subset fails.
        known_failing: the full set of every search is known to fail (not re-asked).
        finished: called after each round with the number of searches that ended in it (a
            progress bar's ``update``); the counts add up to ``len(sizes)``.

    Returns:
        ``(results, queries)``: a 1-minimal failing subset per search, and ``(len(sizes),)``
        the number of subsets each search asked.
    """
    searches = {i: ddmin_search(int(n), known_failing=known_failing) for i, n in enumerate(sizes)}
    results: list[Subset] = [()] * len(sizes)
    queries = np.zeros(len(sizes), dtype=np.int64)
    pending: dict[int, Subset] = {}

    def advance(i: int, verdict: bool | None) -> None:
        try:
            pending[i] = next(searches[i]) if verdict is None else searches[i].send(verdict)
            queries[i] += 1
        except StopIteration as stop:
            results[i] = stop.value
            pending.pop(i, None)

    for i in searches:
        advance(i, None)
    if finished is not None and len(pending) < len(sizes):
        finished(len(sizes) - len(pending))
    while pending:
        batch = list(pending.items())
        verdicts = test_batch(batch)
        if len(verdicts) != len(batch):
            raise ValueError(f"test_batch answered {len(verdicts)} of {len(batch)} queries")
        for (i, _), v in zip(batch, verdicts, strict=True):
            advance(i, bool(v))
        if finished is not None:
            finished(len(batch) - len(pending))
    return results, queries
