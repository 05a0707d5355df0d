"""An acknowledged write survives kill -9; a transaction is never half there."""

import os
import random
import re
import signal
import subprocess
import sys

from leapmail.store import Database

from conftest import HERE

sys.path.insert(0, os.path.join(HERE, "helpers"))
from crash_writer import docs_of  # noqa: E402

ROUNDS = 25


def test_acknowledged_writes_survive_sigkill(tmp_path, key):
    rng = random.Random()
    path = str(tmp_path / "store.db")
    acked_total = 0
    for round_ in range(ROUNDS):
        child = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "helpers", "crash_writer.py"), path, key.hex(),
             str(1 + round_ * 1_000_000)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert child.stdout.readline() == b"ready\n", child.stderr.read()
        # A random moment: after a random number of acknowledgements, while the child
        # keeps writing with several transactions in flight.
        wanted = rng.randint(1, 400)
        acked = []
        while len(acked) < wanted:
            line = child.stdout.readline()
            assert line.startswith(b"ack "), (line, child.stderr.read())
            acked.append(int(line.split()[1]))
        child.send_signal(signal.SIGKILL)
        # Lines the child printed before dying are acknowledgements too.
        rest = child.stdout.read()
        acked += [int(n) for n in re.findall(rb"ack (\d+)", rest)]
        assert child.wait() == -signal.SIGKILL
        acked_total += len(acked)

        db = Database.open(path, key)
        conn = db.connect(readonly=True)
        try:
            present = {}
            for (doc_id, content) in conn.execute(
                "SELECT id, content FROM documents WHERE kind = 'test'"
            ):
                present[doc_id] = bytes(content)
            for n in acked:
                for doc_id, _, content in docs_of(n):
                    assert present.get(doc_id) == content, (round_, n, doc_id)
            # Atomicity: any transaction that is there at all is there entirely.
            seen = {int(doc_id.split("-")[1]) for doc_id in present}
            for n in seen:
                assert all(doc_id in present for doc_id, _, _ in docs_of(n)), (round_, n)
            # Generations are dense and the counter matches the newest one.
            gens = [g for (g,) in conn.execute("SELECT gen FROM documents ORDER BY gen")]
            assert gens == list(range(1, len(gens) + 1))
            (counter,) = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
            assert counter == len(gens)
            # Blobs: finished ones complete, unfinished ones swept on open.
            for (blob_id, size) in conn.execute(
                "SELECT id, json_extract(content, '$.size') FROM documents WHERE kind = 'blob'"
            ):
                (stored,) = conn.execute(
                    "SELECT sum(length(data)) FROM blob_chunks WHERE blob_id = ?", (blob_id,)
                ).fetchone()
                assert stored == size == 400_000
            orphans = conn.execute(
                "SELECT count(*) FROM blob_chunks WHERE blob_id NOT IN "
                "(SELECT id FROM documents WHERE kind = 'blob')"
            ).fetchone()[0]
            assert orphans == 0
            assert conn.execute("SELECT count(*) FROM pending_blobs").fetchone()[0] == 0
        finally:
            conn.close()
            db.close()
    assert acked_total >= ROUNDS
