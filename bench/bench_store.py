"""Throughput of the encrypted document store against plain SQLite, measured in one run.

What is measured: documents written and read per second through the public, Deferred
API of :class:`leapmail.store.Store` under Twisted's reactor --

1. single writes, sequential: ``await put()`` before the next one (one fsync each);
2. single writes, concurrent: 200 ``put()`` calls in flight (group commit shares fsyncs);
3. batched writes: ``put_many()`` of 1000 documents per transaction;
4. single reads: ``await get()`` of random ids, one at a time;
5. batched reads: ``get_many()`` of 1000 random ids per call.

Documents are ~1 KiB of random-looking text with 40-hex-character ids.  Every workload
runs on a fresh store in its own temporary directory (the read workloads on a store
filled beforehand, untimed), with ``synchronous=FULL`` as in production.  Each workload
is measured ``--rounds`` times (default 3), encrypted and plain alternating which goes
first, and the best rate of each is kept: on a small shared machine the noise (other
processes, thread wake-up latency, which dominates a single ``get()``) only ever slows
a run down.

The baseline is the *same* ``Store`` code opened with ``driver=sqlite3`` (the standard
library's unencrypted SQLite): no ``PRAGMA key`` is issued, and everything else --
the writer thread, group commit, savepoints, reader pool, WAL, fsyncs, Twisted thread
hops -- is identical.  The ratio ``plain / encrypted`` is therefore the cost of
encryption (SQLCipher's per-page AES + HMAC), not of our own code.  One caveat: the
``sqlcipher3`` wheel bundles its own SQLite, whose version may differ from the
stdlib's; both versions are printed.

The issue's target is the encrypted store within 2x of plain SQLite on every workload.

Usage: ``.venv/bin/python bench/bench_store.py [--quick] [--rounds R] [--dir DIR] [--strict]``;
``--quick`` divides every N by 10, ``--strict`` exits 1 if a ratio exceeds 2x.
"""

import argparse
import base64
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time

import sqlcipher3
from twisted.internet import defer, task

from leapmail.store import Store

TARGET = 2.0
KIND = "bench"
DOC_SIZE = 1024
CONCURRENCY = 200
BATCH = 1000
SQLITE_MAGIC = b"SQLite format 3\x00"

# name -> N (documents per measurement, divided by 10 with --quick)
WORKLOADS = {
    "write_seq": 2000,
    "write_conc": 20000,
    "write_batch": 100000,
    "read_single": 5000,
    "read_batch": 100000,
}
LABELS = {
    "write_seq": "single writes, sequential",
    "write_conc": f"single writes, {CONCURRENCY} in flight",
    "write_batch": f"batched writes, put_many x{BATCH}",
    "read_single": "single reads, get()",
    "read_batch": f"batched reads, get_many x{BATCH}",
}
DRIVERS = (("encrypted", sqlcipher3), ("plain", sqlite3))


class Corpus:
    """Deterministic ids and contents, generated before any timing starts."""

    def __init__(self, seed=1984, distinct_contents=2048):
        rng = random.Random(seed)
        self._rng = rng
        # Random bytes, base64-encoded: printable like a mail body, and incompressible
        # enough that no layer gets an unfair shortcut.  A pool of distinct contents is
        # cycled so 100k documents do not cost 100 MB of memory.
        raw = DOC_SIZE * 3 // 4
        self.contents = [base64.b64encode(rng.randbytes(raw)) for _ in range(distinct_contents)]
        self._seen = set()

    def ids(self, n):
        out = []
        while len(out) < n:
            doc_id = "%040x" % self._rng.getrandbits(160)
            if doc_id not in self._seen:
                self._seen.add(doc_id)
                out.append(doc_id)
        return out

    def docs(self, ids):
        pool = self.contents
        return [(doc_id, KIND, pool[i % len(pool)]) for i, doc_id in enumerate(ids)]

    def sample(self, population, n, per_call):
        """``n`` random ids from ``population``, distinct within each call of ``per_call``."""
        out = []
        while len(out) < n:
            out += self._rng.sample(population, min(per_call, n - len(out)))
        return out


# -- workloads: each returns the number of documents it handled ---------------------------


async def write_seq(store, docs):
    for doc_id, kind, content in docs:
        await store.put(doc_id, kind, content)
    return len(docs)


async def write_conc(store, docs):
    feed = iter(docs)

    async def worker():
        for doc_id, kind, content in feed:
            await store.put(doc_id, kind, content)

    await defer.gatherResults(
        [defer.ensureDeferred(worker()) for _ in range(CONCURRENCY)], consumeErrors=True
    )
    return len(docs)


async def write_batch(store, docs):
    for start in range(0, len(docs), BATCH):
        await store.put_many(docs[start:start + BATCH])
    return len(docs)


async def read_single(store, ids):
    for doc_id in ids:
        doc = await store.get(doc_id)
        if doc is None:
            raise AssertionError(f"document {doc_id} missing")
    return len(ids)


async def read_batch(store, ids):
    for start in range(0, len(ids), BATCH):
        chunk = ids[start:start + BATCH]
        found = await store.get_many(chunk)
        if len(found) != len(chunk):
            raise AssertionError(f"get_many returned {len(found)} of {len(chunk)} documents")
    return len(ids)


# -- running ---------------------------------------------------------------------------


def open_store(base, name, driver, key):
    directory = tempfile.mkdtemp(prefix=f"{name}-", dir=base)
    path = os.path.join(directory, "store.db")
    store = Store.open(path, key, create=True, driver=driver)
    # Make sure the comparison is what it claims: the baseline file really is plain
    # SQLite, the other really is not.
    with open(path, "rb") as f:
        plain = f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    if plain != (driver is sqlite3):
        raise AssertionError(f"{path}: expected {'plain' if driver is sqlite3 else 'encrypted'} file")
    return store, directory


async def close_store(store, directory):
    await store.close()
    shutil.rmtree(directory, ignore_errors=True)


async def timed(fn, store, items):
    start = time.perf_counter()
    count = await fn(store, items)
    return count / (time.perf_counter() - start)


async def warm_readers(store, ids):
    """Open the reader connections before timing: connection setup is not a read."""
    await defer.gatherResults([store.get(doc_id) for doc_id in ids[:8]], consumeErrors=True)
    await store.get_many(ids[:BATCH])


async def run(reactor, args):
    scale = 10 if args.quick else 1
    n = {name: max(BATCH if "batch" in name else 1, count // scale) for name, count in WORKLOADS.items()}
    n_read_population = max(n["read_single"], n["read_batch"])
    base = tempfile.mkdtemp(prefix="leapmail-bench-", dir=args.dir)
    key = os.urandom(32)
    corpus = Corpus()

    # Same inputs for both drivers.
    inputs = {name: corpus.docs(corpus.ids(n[name])) for name in ("write_seq", "write_conc", "write_batch")}
    population = corpus.docs(corpus.ids(n_read_population))
    population_ids = [doc_id for doc_id, _, _ in population]
    functions = {
        "write_seq": write_seq,
        "write_conc": write_conc,
        "write_batch": write_batch,
        "read_single": read_single,
        "read_batch": read_batch,
    }

    probe = sqlcipher3.connect(":memory:")
    probe.execute("PRAGMA key = 'probe'")
    provider = probe.execute("PRAGMA cipher_provider_version").fetchone()
    cipher = probe.execute("PRAGMA cipher_version").fetchone()
    probe.close()
    print(f"leapmail store benchmark{' (--quick)' if args.quick else ''}: ~{DOC_SIZE} B documents, "
          f"synchronous=FULL, best of {args.rounds} round(s), stores under {base}")
    print(f"encrypted: SQLCipher {cipher[0] if cipher else '?'} on SQLite {sqlcipher3.sqlite_version}"
          f" ({provider[0] if provider else '?'}); plain: stdlib sqlite3, SQLite {sqlite3.sqlite_version}")
    sys.stdout.flush()

    results = {}

    def record(name, label, rate):
        results[name, label] = max(results.get((name, label), 0.0), rate)

    def drivers(round_no):
        # Alternate which driver goes first, so a drift in machine state (other load,
        # dirty pages being written back) does not always favour the same one.
        return DRIVERS if round_no % 2 == 0 else DRIVERS[::-1]

    total = time.perf_counter()
    try:
        # Write workloads: a fresh, empty store per workload, driver and round.
        for round_no in range(args.rounds):
            for name in ("write_seq", "write_conc", "write_batch"):
                for label, driver in drivers(round_no):
                    store, directory = open_store(base, f"{name}-{label}", driver, key)
                    try:
                        record(name, label, await timed(functions[name], store, inputs[name]))
                    finally:
                        await close_store(store, directory)
        # Read workloads: one freshly filled store per driver (filled untimed), both
        # kept open; each round reads a new random sample of ids.
        stores = {}
        try:
            for label, driver in DRIVERS:
                stores[label] = open_store(base, f"read-{label}", driver, key)
                await write_batch(stores[label][0], population)
                await warm_readers(stores[label][0], population_ids)
            for round_no in range(args.rounds):
                samples = {
                    "read_single": corpus.sample(population_ids, n["read_single"], 1),
                    "read_batch": corpus.sample(population_ids, n["read_batch"], BATCH),
                }
                for name in ("read_single", "read_batch"):
                    for label, _ in drivers(round_no):
                        store = stores[label][0]
                        record(name, label, await timed(functions[name], store, samples[name]))
        finally:
            for store, directory in stores.values():
                await close_store(store, directory)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    elapsed = time.perf_counter() - total

    header = f"{'workload':<36} {'N':>7} {'encrypted/s':>12} {'plain/s':>12} {'ratio':>7}"
    print()
    print(header)
    print("-" * len(header))
    worst = 0.0
    for name in WORKLOADS:
        enc, plain = results[name, "encrypted"], results[name, "plain"]
        ratio = plain / enc
        worst = max(worst, ratio)
        flag = "" if ratio <= TARGET else "  > 2x"
        print(f"{LABELS[name]:<36} {n[name]:>7} {enc:>12,.0f} {plain:>12,.0f} {ratio:>6.2f}x{flag}")
    print("-" * len(header))
    print("docs/s: best of the rounds; ratio = plain docs/s / encrypted docs/s "
          "(how many times slower the encrypted store is)")
    print(f"benchmark time: {elapsed:.1f} s")
    ok = worst <= TARGET
    verdict = "within" if ok else "NOT within"
    print(f"target: every ratio within {TARGET:g}x of plain SQLite: {'yes' if ok else 'NO'} "
          f"(worst {worst:.2f}x, {verdict} {TARGET:g}x)")
    if args.strict and not ok:
        raise SystemExit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="scale every N down by 10x")
    parser.add_argument("--dir", default=None,
                        help="where to create the temporary stores (default: the system temp dir)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure every workload this many times and keep the best (default 3)")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 if any ratio exceeds 2x")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
