"""Replication of store documents with the provider: push, pull, merge.

The store's generation numbers every local write, so "what to push" is a range scan
of the documents table after ``push_gen``; the provider's change sequence numbers
every write there, so "what to pull" is the feed after ``pull_seq``.  Both positions
move only in the same transaction as the work they account for, so an interruption at
any point (the daemon killed, the provider gone mid-batch) repeats at most one batch,
and repeating a batch changes nothing: a pulled revision already seen is skipped, and
a push the provider took but we did not record comes back as our own revision.

Pulled batches are applied whole or not at all: one transaction, after every document
in it has been opened and checked.  A document that fails (tampered, replayed, not
ours) stops the batch, and the error stays visible until the provider serves a good one.

That transaction holds the store's only writer, which IMAP commands need too, so a
batch is sized to be applied in about :data:`APPLY_TARGET` seconds; and while one is
applied the next is fetched and opened (a new device catching up is otherwise one
long alternation of waiting for the provider and waiting for the writer).  Pulls are
one at a time, whoever asks (the pull loop, or a push settling a conflict).

Blobs (big attachments) travel as one wire document per chunk, pushed before the
blob's own document, so a device never holds more than a batch in memory.
"""

import json
import time
from dataclasses import dataclass

from twisted.internet import defer, threads

from leapmail.crypto.wire import WireError
from leapmail.errors import LeapmailError
from leapmail.store.documents import BLOB_KIND, Document
from leapmail.sync.remote import Conflict, ProviderError
from leapmail.sync.schema import get_state, set_state

#: Kind of the wire documents that carry blob chunks (they are no store documents).
CHUNK_KIND = "blob-chunk"
#: One push: at most this many documents and about this many bytes (the provider
#: takes 1,000 and 32 MiB; staying well under keeps each request short).
PUSH_MAX_DOCS = 500
PUSH_MAX_BYTES = 4 * 1024 * 1024
#: A pulled batch is applied in one store job, which holds the store's only writer:
#: IMAP commands that write wait for it.  The number of documents asked for is
#: adjusted so that applying a batch takes about APPLY_TARGET seconds (from what the
#: last batches took per document), between PULL_MIN and PULL_LIMIT; the provider
#: bounds the bytes.
APPLY_TARGET = 0.1
PULL_FIRST = 100
PULL_MIN = 20
PULL_LIMIT = 1000
#: A push batch looks at up to this many times PUSH_MAX_DOCS local changes, most of
#: which, after a pull, are pulled documents with nothing to push.
SCAN_FACTOR = 10


class SyncRefused(LeapmailError):
    """Something the provider served cannot be applied; nothing of its batch was."""


class Replayed(SyncRefused):
    """The provider served a revision older than one this device has seen."""


@dataclass
class Outgoing:
    wire_id: str
    kind: str
    doc_id: str
    base: int
    gen: int
    data: bytes


def _sync_row(queries, wire_id):
    return queries.execute(
        "SELECT remote_rev, synced_gen FROM sync_docs WHERE wire_id = ?", (wire_id,)
    ).fetchone()


def _record(txn, wire_id, doc_id, kind, rev, synced_gen):
    txn.execute(
        "INSERT INTO sync_docs (wire_id, doc_id, kind, remote_rev, synced_gen) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (wire_id) DO UPDATE SET "
        "remote_rev = excluded.remote_rev, synced_gen = excluded.synced_gen",
        (wire_id, doc_id, kind, rev, synced_gen),
    )


# -- pushing ---------------------------------------------------------------------------

def collect_push(queries, keys, max_docs=PUSH_MAX_DOCS, max_bytes=PUSH_MAX_BYTES):
    """A read job: the next batch of local changes, sealed.

    Returns ``(items, push_gen)``: ``push_gen`` is where the next batch starts once
    these are pushed (it moves even when every change was skipped).
    """
    start = get_state(queries, "push_gen", 0)
    position = start
    items, size = [], 0
    # After a pull most rows are skipped (written from what was pulled): SQLite reads
    # their content only for the rows that go out, and a read looks at many of them.
    rows = queries.execute(
        "SELECT d.id, d.kind, d.gen, d.deleted, "
        "CASE WHEN s.synced_gen = d.gen THEN NULL ELSE d.content END, "
        "s.remote_rev, s.synced_gen "
        "FROM documents d LEFT JOIN sync_docs s ON s.doc_id = d.id AND s.kind = d.kind "
        "WHERE d.gen > ? ORDER BY d.gen LIMIT ?",
        (start, max_docs * SCAN_FACTOR),
    )
    for doc_id, kind, gen, deleted, content, remote_rev, synced_gen in rows:
        if synced_gen == gen:
            position = gen  # written here from what was pulled: nothing to push
            continue
        if deleted and not remote_rev:
            position = gen  # never reached the provider: nothing to delete there
            continue
        extra = []
        if kind == BLOB_KIND:
            extra, complete = _chunk_items(queries, keys, doc_id, deleted, content,
                                           max_bytes - size)
            if not complete:
                items += extra
                return items, position
        item_size = len(content or b"") + sum(len(e.data) for e in extra)
        if items and (size + item_size > max_bytes or len(items) + len(extra) >= max_docs):
            break
        items += extra
        rev = (remote_rev or 0) + 1
        items.append(Outgoing(keys.wire_id(kind, doc_id), kind, doc_id, remote_rev or 0, gen,
                              keys.seal(kind, doc_id, rev, content, deleted=bool(deleted))))
        size += item_size
        position = gen
    return items, position


def _chunk_items(queries, keys, blob_id, deleted, content, budget):
    """The chunk documents a blob needs pushed first; ``complete`` if all fit."""
    items = []
    if deleted:
        for wire_id, doc_id, remote_rev in queries.execute(
            "SELECT wire_id, doc_id, remote_rev FROM sync_docs WHERE kind = ? "
            "AND doc_id >= ? AND doc_id < ?",
            (CHUNK_KIND, blob_id + "#", blob_id + "$"),
        ).fetchall():
            items.append(Outgoing(wire_id, CHUNK_KIND, doc_id, remote_rev, 0,
                                  keys.seal(CHUNK_KIND, doc_id, remote_rev + 1, None, True)))
        return items, True
    info = json.loads(content)
    count = -(-info["size"] // info["chunk_size"]) or 1
    used = 0
    for seq in range(count):
        doc_id = f"{blob_id}#{seq}"
        wire_id = keys.wire_id(CHUNK_KIND, doc_id)
        row = _sync_row(queries, wire_id)
        if row is not None and row[1] != CHUNK_REPUSH:
            continue
        base = row[0] if row is not None else 0
        row = queries.execute(
            "SELECT data FROM blob_chunks WHERE blob_id = ? AND seq = ?", (blob_id, seq)
        ).fetchone()
        data = bytes(row[0]) if row else b""
        if items and used + len(data) > budget:
            return items, False
        items.append(Outgoing(wire_id, CHUNK_KIND, doc_id, base, 0,
                              keys.seal(CHUNK_KIND, doc_id, base + 1, data)))
        used += len(data)
    return items, True


def record_pushed(txn, items, revs, push_gen):
    """A write job: the provider took ``items`` at ``revs``."""
    for item, rev in zip(items, revs):
        _record(txn, item.wire_id, item.doc_id, item.kind, rev, item.gen)
    set_state(txn, "push_gen", push_gen)


def pending_count(queries):
    """Local changes not pushed yet (approximately: a doc changed twice counts once)."""
    start = get_state(queries, "push_gen", 0)
    (count,) = queries.execute(
        "SELECT count(*) FROM documents d LEFT JOIN sync_docs s "
        "ON s.doc_id = d.id AND s.kind = d.kind "
        "WHERE d.gen > ? AND (s.synced_gen IS NULL OR s.synced_gen != d.gen) "
        "AND NOT (d.deleted AND s.remote_rev IS NULL)",
        (start,),
    ).fetchone()
    return count


# -- pulling ---------------------------------------------------------------------------

def open_all(keys, changes):
    """Decrypt and check a batch (on a thread); any failure refuses the whole batch."""
    opened = []
    for wire_id, rev, _seq, data in changes:
        if rev < 1:
            raise SyncRefused(f"the provider served document {wire_id} at revision {rev}")
        try:
            kind, doc_id, deleted, content = keys.open(wire_id, rev, data)
        except WireError as e:
            raise SyncRefused(f"refused a document from the provider: {e}") from None
        opened.append((wire_id, rev, kind, doc_id, deleted, content))
    return opened


def apply_pulled(txn, mergers, opened, pull_seq=None, keepers=None):
    """A write job: apply opened documents, merging with local changes; all or nothing.

    ``keepers`` (``{kind: in_use(txn, doc_id)}``) name the kinds whose deletion by
    another device is refused while something here still uses the document: a
    message content expunged there while it was copied here stays, and is pushed
    again, live, on top of the deletion."""
    batch = _Batch(txn, opened)
    for item in opened:
        _apply_one(txn, mergers, keepers or {}, batch, *item)
    batch.write_records()
    if pull_seq is not None:
        set_state(txn, "pull_seq", pull_seq)


def timed_apply_pulled(txn, mergers, opened, pull_seq=None, keepers=None):
    """:func:`apply_pulled`; returns how long it took (seconds, on the writer)."""
    started = time.perf_counter()
    apply_pulled(txn, mergers, opened, pull_seq, keepers)
    return time.perf_counter() - started


class _Batch:
    """What applying one batch reads of ``sync_docs`` and ``documents``, read up front
    in a few queries rather than two per document, and the ``sync_docs`` rows it
    writes, written at the end in one statement."""

    def __init__(self, txn, opened):
        self._txn = txn
        self._rows = {}
        wire_ids = [item[0] for item in opened]
        for start in range(0, len(wire_ids), 500):
            chunk = wire_ids[start:start + 500]
            self._rows.update(
                (wire_id, (remote_rev, synced_gen)) for wire_id, remote_rev, synced_gen in
                txn.execute("SELECT wire_id, remote_rev, synced_gen FROM sync_docs WHERE "
                            f"wire_id IN ({','.join('?' * len(chunk))})", chunk))
        # Local documents as they were before the batch: good for a document until
        # the batch writes it, and for none once a merge ran (a merge may write others).
        # Not read for revisions seen already (our own pushes, echoed by the feed).
        ids = [doc_id for wire_id, rev, kind, doc_id, _, _ in opened
               if kind != CHUNK_KIND and rev > self._rows.get(wire_id, (0,))[0]]
        self._locals = txn.get_many(ids, include_deleted=True)
        self._fresh = set(ids)
        self._records = {}

    def row(self, wire_id):
        """``(remote_rev, synced_gen)`` of a wire document, or None."""
        return self._rows.get(wire_id)

    def local(self, doc_id):
        if doc_id in self._fresh:
            return self._locals.get(doc_id)
        return self._txn.get(doc_id, include_deleted=True)

    def wrote(self, doc_id=None):
        """``doc_id`` was written (``None``: any document may have been)."""
        if doc_id is None:
            self._fresh.clear()
        else:
            self._fresh.discard(doc_id)

    def record(self, wire_id, doc_id, kind, rev, synced_gen):
        self._rows[wire_id] = (rev, synced_gen)
        self._records[wire_id] = (wire_id, doc_id, kind, rev, synced_gen)

    def write_records(self):
        self._txn.conn.executemany(
            "INSERT INTO sync_docs (wire_id, doc_id, kind, remote_rev, synced_gen) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (wire_id) DO UPDATE SET "
            "remote_rev = excluded.remote_rev, synced_gen = excluded.synced_gen",
            list(self._records.values()))


def _same(a, b):
    return bool(a.deleted) == bool(b.deleted) and (a.content or None) == (b.content or None)


#: ``synced_gen`` of a blob chunk whose deletion elsewhere was refused here: pushed
#: again (on top of that deletion) with its blob.
CHUNK_REPUSH = -1


def _apply_one(txn, mergers, keepers, batch, wire_id, rev, kind, doc_id, deleted, content):
    row = batch.row(wire_id)
    if row is not None:
        if rev < row[0]:
            raise Replayed(
                f"the provider served an old revision ({rev}) of document {wire_id} after "
                f"revision {row[0]}: a replay; refused")
        if rev == row[0]:
            return  # our own push, echoed by the feed; or a batch repeated
    if kind == CHUNK_KIND:
        blob_id, _, seq = doc_id.rpartition("#")
        in_use = keepers.get(BLOB_KIND)
        if deleted and in_use is not None and in_use(txn, blob_id):
            batch.record(wire_id, doc_id, kind, rev, CHUNK_REPUSH)
            return
        if deleted:
            txn.execute("DELETE FROM blob_chunks WHERE blob_id = ? AND seq = ?",
                        (blob_id, int(seq)))
        else:
            txn.execute("INSERT OR REPLACE INTO blob_chunks (blob_id, seq, data) VALUES (?, ?, ?)",
                        (blob_id, int(seq), content))
        batch.record(wire_id, doc_id, kind, rev, 0)
        return
    remote = Document(doc_id, kind, rev, 0, content, bool(deleted))
    local = batch.local(doc_id)
    if local is not None and local.kind != kind:
        raise SyncRefused(f"document {wire_id} changes kind from {local.kind} to {kind}")
    if deleted and local is not None and not local.deleted:
        in_use = keepers.get(kind)
        if in_use is not None and in_use(txn, doc_id):
            # Written again: a new local revision, pushed on top of the deletion.
            txn.write(doc_id, kind, local.content, deleted=False)
            batch.wrote(doc_id)
            batch.record(wire_id, doc_id, kind, rev, 0)
            return
    dirty = local is not None and (row is None or local.gen > row[1])
    synced = row[1] if row else 0
    if local is not None and _same(local, remote):
        synced = local.gen
    else:
        result = remote
        if dirty:
            result = mergers.get(kind, _keep_remote)(txn, local, remote)
            batch.wrote()
        if _same(result, remote):
            if local is None and deleted:
                synced = 0
            else:
                synced = txn.write(doc_id, kind, content, deleted=bool(deleted)).gen
                batch.wrote(doc_id)
            _blob_follow(txn, kind, doc_id, deleted)
        elif not _same(result, local):
            # Merged: written here, and pushed later on top of the remote revision.
            txn.write(doc_id, kind, result.content, deleted=result.deleted)
            batch.wrote(doc_id)
            _blob_follow(txn, kind, doc_id, result.deleted)
    batch.record(wire_id, doc_id, kind, rev, synced)


def _keep_remote(txn, local, remote):
    return remote


def _blob_follow(txn, kind, doc_id, deleted):
    if kind == BLOB_KIND and deleted:
        txn.execute("DELETE FROM blob_chunks WHERE blob_id = ?", (doc_id,))


# -- one exchange ----------------------------------------------------------------------

class Replicator:
    """Push and pull for one store and one provider client.

    Every call is one bounded step; :mod:`leapmail.sync.service` decides when to take
    them and what to do after a failure.  Steps that write locally run one at a time.
    """

    def __init__(self, store, keys, client):
        self.store = store
        self.keys = keys
        self.client = client
        self.mergers, self.keepers = {}, {}
        for component in store.database.components:
            self.mergers.update(component.mergers)
            self.keepers.update(component.keepers)
        # Local writes of the exchange (applying a batch, recording a push) one at a time.
        self._lock = defer.DeferredLock()
        # One pull at a time: the pull loop and a push settling a conflict both pull,
        # and without this they would fetch and apply every batch twice.
        self._pull_lock = defer.DeferredLock()
        # The next batch of the feed, fetched and opened while this one is applied:
        # ``(since, Deferred)``.  At most one, so at most two batches are held.
        self._prefetched = None
        # Pushes recorded so far: a batch fetched before a push was recorded may hold
        # an older revision of a document pushed since, which is no replay.
        self._pushes = 0
        #: Documents asked for per pull, and the seconds applying one took lately.
        self.pull_limit = PULL_FIRST
        self._per_doc = None

    def close(self):
        """Drop a batch fetched ahead (the client is closing; nobody will use it)."""
        self._drop_prefetched()

    async def push(self):
        """Push every local change; returns the number of documents pushed.

        A push refused for a stale revision is settled by pulling: the feed brings
        the other device's revisions in the order they were written (a moved
        message's copy before the tombstone that names it), each merged with the local
        change, and the merged documents go out on the next round.
        """
        pushed, conflicts_in_a_row = 0, 0
        while True:
            conflict = None
            await self._lock.acquire()
            try:
                items, position = await self.store.read(collect_push, self.keys)
                if not items:
                    if position != await self.store.read(get_state, "push_gen", 0):
                        await self.store.transact(record_pushed, [], [], position)
                        continue
                    return pushed
                try:
                    _, revs = await self.client.push(
                        [(i.wire_id, i.base, i.data) for i in items])
                except Conflict as e:
                    conflict = e
                else:
                    await self.store.transact(record_pushed, items, revs, position)
                    self._pushes += 1
                    pushed += len(items)
            finally:
                self._lock.release()
            if conflict is not None:
                conflicts_in_a_row += 1
                if conflicts_in_a_row > 5:
                    raise ProviderError(
                        "pushes keep conflicting although every revision the provider "
                        "serves has been merged; will retry later")
                while await self.pull():
                    pass
                await self._resolve(conflict.conflicts)
            else:
                conflicts_in_a_row = 0

    async def _resolve(self, conflicts):
        """Apply the provider's current revision of documents a push conflicted on
        that the feed has not brought (a no-op for those it has)."""
        ids = []
        for entry in conflicts:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                raise ProviderError("the provider's conflict answer is malformed")
            ids.append(entry["id"])
        changes = await self.client.get_docs(ids)
        opened = await threads.deferToThread(open_all, self.keys, changes)
        await self._lock.acquire()
        try:
            await self.store.transact(apply_pulled, self.mergers, opened, None,
                                          self.keepers)
        finally:
            self._lock.release()

    async def pull(self, wait=0):
        """Pull one batch of the change feed; returns whether more is waiting.

        While a batch is being applied the next one is fetched and opened (when the
        provider said more is waiting), so the provider, the network and decryption
        work beside the store's writer instead of in turn.
        """
        if wait:
            return await self._long_poll(wait)
        await self._pull_lock.acquire()
        try:
            since = await self.store.read(get_state, "pull_seq", 0)
            prefetched, self._prefetched = self._prefetched, None
            if prefetched is not None and prefetched[0] == since:
                fetching = prefetched[1]
            else:
                _discard(prefetched)
                fetching = defer.ensureDeferred(self._fetch(since, 0))
            count, seq, more, opened, pushes = await fetching
            if more and count:
                self._prefetched = (seq, defer.ensureDeferred(self._fetch(seq, 0)))
            if not await self._apply(opened, seq, pushes):
                self._drop_prefetched()
                return True
            return more and bool(count)
        finally:
            self._pull_lock.release()

    async def _long_poll(self, wait):
        # The wait holds no lock: a push that must pull to settle a conflict does not
        # wait for it.  If such a pull moved the position meanwhile, what the long poll
        # brought is stale and dropped: the caller pulls again at once.
        since = await self.store.read(get_state, "pull_seq", 0)
        count, seq, more, opened, pushes = await self._fetch(since, wait)
        await self._pull_lock.acquire()
        try:
            if await self.store.read(get_state, "pull_seq", 0) != since:
                return True
            self._drop_prefetched()
            if not await self._apply(opened, seq, pushes):
                return True
            return more and bool(count)
        finally:
            self._pull_lock.release()

    async def _fetch(self, since, wait):
        """One batch of the feed after ``since``, opened: every check but the replay
        check (which needs the store) is made here, before anything is applied."""
        pushes = self._pushes
        changes, seq, more = await self.client.changes(since, self.pull_limit, wait)
        if seq < since:
            raise SyncRefused(
                f"the provider's change feed went back from {since} to {seq}; refused")
        opened = await threads.deferToThread(open_all, self.keys, changes)
        return len(changes), seq, more, opened, pushes  # the sealed bytes can go

    async def _apply(self, opened, seq, pushes):
        """Apply a fetched batch; False if it turned out stale (fetch it again)."""
        await self._lock.acquire()
        try:
            took = await self.store.transact(timed_apply_pulled, self.mergers, opened, seq,
                                                 self.keepers)
        except Replayed:
            if pushes != self._pushes:
                return False  # an old revision, but not a replay: we pushed meanwhile
            raise
        finally:
            self._lock.release()
        if len(opened) >= PULL_MIN:
            per_doc = took / len(opened)
            self._per_doc = per_doc if self._per_doc is None else (self._per_doc + per_doc) / 2
            # Growing at most twofold: a batch of cheap documents (our own, echoed)
            # says little about the next.
            self.pull_limit = max(PULL_MIN, min(PULL_LIMIT, 2 * self.pull_limit,
                                                int(APPLY_TARGET / self._per_doc)))
        return True

    def _drop_prefetched(self):
        _discard(self._prefetched)
        self._prefetched = None


def _discard(prefetched):
    """Cancel a batch fetched ahead that will not be used, and silence its failure."""
    if prefetched is not None:
        fetching = prefetched[1]
        fetching.addErrback(lambda _: None)
        fetching.cancel()
