"""Processes that race for one output's lease (test_lease). Kept apart from the test module so
that a spawned process imports only the lease, not torch."""

from __future__ import annotations

import multiprocessing

from pipeline.restore.lease import Lease, LeaseHeld


def contend(base: str, side: int, rounds: int, options: dict | None, conditional,
            settle_s: float, barrier, results) -> None:
    """Race the other process of the pair for ``rounds`` outputs, one after another: both wait
    at the barrier, then try to take ``{base}/{round}``'s lease at once; the winner holds it
    until both have tried, so the loser cannot win after a release."""
    won = []
    for k in range(rounds):
        lease = Lease(f"{base}/{k}", f"run-{side}", options, conditional=conditional)
        lease.settle_s = settle_s
        barrier.wait()
        try:
            lease.acquire()
            won.append(k)
        except LeaseHeld:
            pass
        barrier.wait()
        if won and won[-1] == k:
            lease.release()
    results.put((base, side, won))


def race(bases: list[str], rounds: int, options: dict | None = None,
         conditional: bool | None = None, settle_s: float = 0.3) -> list[int]:
    """A pair of processes per base, each pair racing ``rounds`` times.

    Returns:
        How many times each round had a number of winners other than one, over all pairs
        (a list of the offending counts: empty when the lease held every time).
    """
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    barriers = [ctx.Barrier(2) for _ in bases]
    procs = [ctx.Process(target=contend, args=(base, side, rounds, options, conditional,
                                               settle_s, barrier, results))
             for base, barrier in zip(bases, barriers) for side in (0, 1)]
    for p in procs:
        p.start()
    got = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    wins: dict[tuple[str, int], int] = {}
    for base, _, won in got:
        for k in won:
            wins[base, k] = wins.get((base, k), 0) + 1
    return [n for key in ((b, k) for b in bases for k in range(rounds))
            if (n := wins.get(key, 0)) != 1]
