"""Store work never stalls the reactor."""

import time

import pytest_twisted
from twisted.internet import defer, task

from leapmail.runtime import freeze_startup_heap

DOCS = 100_000
BATCH = 1000
SINGLES = 10_000  # of the DOCS, written one put() at a time
IN_FLIGHT = 200


@pytest_twisted.ensureDeferred
async def test_looping_call_keeps_ticking_during_100k_writes(store):
    # As the daemon does once started: without it, CPython's full GC passes over the
    # test runner's own heap stall every thread for tens of milliseconds.
    freeze_startup_heap()
    ticks = []
    loop = task.LoopingCall(lambda: ticks.append(time.monotonic()))
    loop.start(0.010, now=True)
    try:
        payload = b"x" * 200
        batched = DOCS - SINGLES
        pending = []
        for start in range(0, batched, BATCH):
            pending.append(
                store.put_many([(f"b{i}", "note", payload) for i in range(start, start + BATCH)])
            )
            if len(pending) >= 4:
                await pending.pop(0)
        await defer.gatherResults(pending)

        counter = iter(range(SINGLES))

        async def single_writer():
            for i in counter:
                await store.put(f"s{i}", "note", payload)

        await defer.gatherResults(
            [defer.ensureDeferred(single_writer()) for _ in range(IN_FLIGHT)]
        )
    finally:
        loop.stop()

    assert await store.read(lambda q: q.count("note")) == DOCS
    assert await store.generation() == DOCS
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 20
    worst = max(gaps)
    print(f"ticks={len(ticks)} worst gap={worst * 1000:.1f} ms")
    assert worst < 0.050, f"reactor stalled for {worst * 1000:.1f} ms"
