"""The outbox: messages accepted for sending, kept until the provider has taken them.

Protocol-agnostic: the local SMTP server streams a message in with
:class:`OutboxWriter`, a relay lists what is due, records each attempt and removes an
entry once every recipient is settled (delivered, or refused for good).

The outbox lives in typed tables of its own, not in documents, so that sync never
replicates it: an entry belongs to the device whose mail client heard "250 OK", and
only that device may relay it.  Replicated, it would reach the user's other devices
through the provider, and each would have to be told not to send it (or two would
send it); its plaintext-equivalent would also sit, sealed, at the provider for no
reason.  The store is encrypted at rest, so queued mail is as safe as stored mail.

A message's bytes are kept in chunks of :data:`CHUNK_SIZE`, each written in its own
transaction, so a 50 MB message never sits in one value nor holds the writer for
long.  An entry becomes visible to the relay only when its last chunk and its
envelope commit together (``complete``); one left incomplete by a crash or a client
that hung up mid-DATA is swept when the outbox opens.
"""

import json
import os
import time
from dataclasses import dataclass

from twisted.internet import defer

from leapmail.store import SchemaComponent

CHUNK_SIZE = 256 * 1024

_V1 = """
CREATE TABLE outbox (
    id         TEXT PRIMARY KEY,
    sender     TEXT NOT NULL,
    recipients TEXT NOT NULL,   -- JSON: the addresses still to deliver to
    failed     TEXT NOT NULL,   -- JSON: [[address, code, reply], ...] refused for good
    size       INTEGER NOT NULL,
    accepted   REAL NOT NULL,   -- Unix time the client heard 250
    due        REAL NOT NULL,   -- next attempt, not before
    attempts   INTEGER NOT NULL,
    last_error TEXT,
    complete   INTEGER NOT NULL -- 0 while the message is still coming in
);
CREATE INDEX outbox_by_due ON outbox (complete, due);
CREATE TABLE outbox_chunks (
    entry TEXT NOT NULL,
    seq   INTEGER NOT NULL,
    data  BLOB NOT NULL,
    PRIMARY KEY (entry, seq)
);
"""

OUTBOX = SchemaComponent(name="outbox", migrations=(_V1,))


@dataclass(frozen=True)
class OutboxEntry:
    id: str
    sender: str
    recipients: tuple
    failed: tuple
    size: int
    accepted: float
    due: float
    attempts: int
    last_error: str | None
    chunks: int


_COLUMNS = "id, sender, recipients, failed, size, accepted, due, attempts, last_error"


def _entry(queries, row):
    (chunks,) = queries.execute(
        "SELECT count(*) FROM outbox_chunks WHERE entry = ?", (row[0],)).fetchone()
    return OutboxEntry(row[0], row[1], tuple(json.loads(row[2])),
                       tuple(tuple(f) for f in json.loads(row[3])), row[4], row[5], row[6],
                       row[7], row[8], chunks)


def _write_chunk(txn, entry_id, seq, data):
    if seq == 0:
        txn.execute(
            "INSERT INTO outbox (id, sender, recipients, failed, size, accepted, due, "
            "attempts, complete) VALUES (?, '', '[]', '[]', 0, 0, 0, 0, 0)", (entry_id,))
    txn.execute("INSERT INTO outbox_chunks (entry, seq, data) VALUES (?, ?, ?)",
                (entry_id, seq, data))


def _complete(txn, entry_id, seq, data, sender, recipients, size, now):
    _write_chunk(txn, entry_id, seq, data)
    txn.execute(
        "UPDATE outbox SET sender = ?, recipients = ?, size = ?, accepted = ?, due = ?, "
        "complete = 1 WHERE id = ?",
        (sender, json.dumps(list(recipients)), size, now, now, entry_id))


def _delete(txn, entry_id):
    txn.execute("DELETE FROM outbox_chunks WHERE entry = ?", (entry_id,))
    txn.execute("DELETE FROM outbox WHERE id = ?", (entry_id,))


def _record(txn, entry_id, delivered, failed, error, due):
    row = txn.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (entry_id,)).fetchone()
    if row is None:
        return None
    entry = _entry(txn, row)
    settled = set(delivered) | {f[0] for f in failed}
    recipients = [r for r in entry.recipients if r not in settled]
    failures = [list(f) for f in entry.failed] + [list(f) for f in failed]
    if not recipients and not failures:
        _delete(txn, entry_id)
        return None
    txn.execute(
        "UPDATE outbox SET recipients = ?, failed = ?, attempts = attempts + 1, "
        "last_error = ?, due = ? WHERE id = ?",
        (json.dumps(recipients), json.dumps(failures), error, due, entry_id))
    return _entry(txn, txn.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?",
                                   (entry_id,)).fetchone())


def _sweep(txn):
    for (entry_id,) in txn.execute("SELECT id FROM outbox WHERE complete = 0").fetchall():
        _delete(txn, entry_id)


class OutboxWriter:
    """Streams one message into the outbox from the reactor thread.

    ``write()`` returns a Deferred that fires once every full chunk so far has
    committed: a caller that waits for it holds about two chunks in memory.
    """

    def __init__(self, store, chunk_size=CHUNK_SIZE):
        self._store = store
        self.id = "out-" + os.urandom(16).hex()
        self._chunk_size = chunk_size
        self._buffer = bytearray()
        self._seq = 0
        self.size = 0
        self._pending = defer.succeed(None)
        self._failure = None
        self._closed = False

    def write(self, data):
        if self._closed:
            raise ValueError("outbox writer is closed")
        self._buffer += data
        self.size += len(data)
        while len(self._buffer) >= self._chunk_size:
            chunk = bytes(self._buffer[:self._chunk_size])
            del self._buffer[:self._chunk_size]
            self._submit(_write_chunk, self.id, self._seq, chunk)
            self._seq += 1
        return self._wait()

    def _submit(self, fn, *args):
        self._pending = self._store.transact(fn, *args)
        self._pending.addErrback(self._record_failure)

    def _record_failure(self, failure):
        if self._failure is None:
            self._failure = failure

    def _wait(self):
        # Jobs commit and report in order on the single writer: the newest one's
        # Deferred fires after every earlier one.
        d = defer.Deferred()

        def settled(_):
            if self._failure is not None:
                d.errback(self._failure)
            else:
                d.callback(None)

        self._pending.addBoth(settled)
        return d

    @defer.inlineCallbacks
    def finish(self, sender, recipients):
        """Commit the rest with the envelope; fires with the entry id once durable."""
        self._closed = True
        self._submit(_complete, self.id, self._seq, bytes(self._buffer), sender,
                     list(recipients), self.size, time.time())
        self._buffer = bytearray()
        try:
            yield self._wait()
        except Exception:
            yield self.abort()
            raise
        return self.id

    @defer.inlineCallbacks
    def abort(self):
        """Drop whatever this writer committed: the message never appears."""
        self._closed = True
        self._buffer = bytearray()
        try:
            yield self._wait()
        except Exception:
            pass
        yield self._store.transact(_delete, self.id)


class Outbox:
    """The queue of one account's store."""

    def __init__(self, store):
        self.store = store

    def sweep(self):
        """Drop entries whose message never finished coming in (at start)."""
        return self.store.transact(_sweep)

    def retry_all_now(self, now):
        """Make every entry due now (a restart is a new chance for all of them)."""
        return self.store.transact(lambda txn: txn.execute(
            "UPDATE outbox SET due = ? WHERE complete = 1 AND due > ?", (now, now)))

    def writer(self):
        return OutboxWriter(self.store)

    def due(self, now, limit=50):
        """Entries whose next attempt is due, oldest first."""
        def query(q):
            rows = q.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE complete = 1 AND due <= ? "
                "ORDER BY due LIMIT ?", (now, limit)).fetchall()
            return [_entry(q, row) for row in rows]

        return self.store.read(query)

    def next_due(self):
        """The earliest time an entry is due, or ``None`` if the outbox is empty."""
        return self.store.read(lambda q: q.execute(
            "SELECT min(due) FROM outbox WHERE complete = 1").fetchone()[0])

    def get(self, entry_id):
        def query(q):
            row = q.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ? AND complete = 1",
                            (entry_id,)).fetchone()
            return None if row is None else _entry(q, row)

        return self.store.read(query)

    def chunk(self, entry_id, seq):
        def query(q):
            row = q.execute("SELECT data FROM outbox_chunks WHERE entry = ? AND seq = ?",
                            (entry_id, seq)).fetchone()
            return None if row is None else bytes(row[0])

        return self.store.read(query)

    async def read_all(self, entry):
        """The whole message (for a Sent copy or a bounce's attachment)."""
        return b"".join([await self.chunk(entry.id, seq) for seq in range(entry.chunks)])

    def record_attempts(self, outcomes):
        """After attempts, in one transaction: for each ``(entry_id, delivered, failed,
        error, due)``, the ``delivered`` recipients leave the entry, the ``failed``
        ``(address, code, reply)`` ones move to its failures, the rest wait for
        ``due``.  Fires with the entries as they now are, in order; an entry left with
        no recipient and no failure is removed in the same transaction (``None``)."""
        def job(txn):
            return [_record(txn, *outcome) for outcome in outcomes]

        return self.store.transact(job)

    def remove(self, entry_id):
        return self.store.transact(_delete, entry_id)

    def summary(self):
        """``{"queued", "oldest", "last_error"}`` for status displays."""
        def query(q):
            count, oldest = q.execute(
                "SELECT count(*), min(accepted) FROM outbox WHERE complete = 1").fetchone()
            row = q.execute(
                "SELECT last_error FROM outbox WHERE complete = 1 AND last_error IS NOT NULL "
                "ORDER BY due DESC LIMIT 1").fetchone()
            return {"queued": count, "oldest": oldest, "last_error": row and row[0]}

        return self.store.read(query)
