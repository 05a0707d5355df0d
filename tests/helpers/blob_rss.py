"""Write then read back a 50 MB blob; print peak-RSS growth and what was checked, as JSON.

Run in its own process so the peak RSS it reports belongs to this work alone.
"""

import hashlib
import json
import random
import resource
import sys

from twisted.internet import defer, task

from leapmail.store import Store

SIZE = 50 * 1024 * 1024
PIECE = 64 * 1024


def pieces(seed):
    """The blob's bytes, regenerated on demand so nothing holds all of them."""
    rng = random.Random(seed)
    for _ in range(SIZE // PIECE):
        yield rng.randbytes(PIECE)


def expected_range(seed, offset, length):
    data = b"".join(pieces(seed))[offset:offset + length]  # only called after measuring
    return data


def peak_rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def main(reactor, path, key):
    store = Store.open(path, key, create=True)
    # Warm up threads, connections and code paths before the baseline.
    warm = await store.write_blob([b"w" * 300_000])
    reader = await store.blob_reader(warm.id)
    async for _ in reader.chunks():
        pass
    baseline = peak_rss_kib()

    want = hashlib.sha256()
    for piece in pieces(7):
        want.update(piece)
    info = await store.write_blob(pieces(7))

    got, size = hashlib.sha256(), 0
    reader = await store.blob_reader(info.id)
    async for chunk in reader.chunks():
        got.update(chunk)
        size += len(chunk)
    peak = peak_rss_kib()

    ranges = {}
    for offset, length in [(0, 10), (262_143, 2), (1_000_000, 700_000), (SIZE - 5, 100)]:
        ranges[f"{offset}+{length}"] = (
            await reader.read(offset, length) == expected_range(7, offset, length)
        )
    await store.close()
    print(json.dumps({
        "size": size, "info_size": info.size, "same_hash": got.digest() == want.digest(),
        "stored_sha256_matches": info.sha256 == want.hexdigest(),
        "baseline_kib": baseline, "peak_kib": peak, "growth_kib": peak - baseline,
        "ranges": ranges,
    }))


if __name__ == "__main__":
    task.react(lambda r: defer.ensureDeferred(main(r, sys.argv[1], bytes.fromhex(sys.argv[2]))))
