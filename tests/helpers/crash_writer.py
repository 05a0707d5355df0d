"""Write transactions in a loop and print "ack N" once transaction N is acknowledged.

Numbering starts at argv[3].  Transaction N writes documents tx-N-0 .. tx-N-(k-1) (k = 1 + N % 4) together, and every
fifth one also streams a blob named blob-N.  Several transactions are always in flight,
so acknowledgements come from group commits.  The parent kills us with SIGKILL.
"""

import os
import sys

from twisted.internet import defer, task

from leapmail.store import Store

IN_FLIGHT = 8


def docs_of(n):
    return [(f"tx-{n}-{i}", "test", f"payload {n} {i}".encode() * 10) for i in range(1 + n % 4)]


async def main(reactor, path, key, first):
    store = Store.open(path, key, create=True)
    counter = iter(range(first, 10**9))

    async def worker():
        while True:
            n = next(counter)
            if n % 5 == 0:
                await store.write_blob([os.urandom(100_000) for _ in range(4)], blob_id=f"blob-{n}")
            await store.put_many(docs_of(n))
            sys.stdout.write(f"ack {n}\n")
            sys.stdout.flush()

    print("ready", flush=True)
    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(IN_FLIGHT)])


if __name__ == "__main__":
    task.react(lambda r: defer.ensureDeferred(main(r, sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3]))))
