"""Documents, the reads and writes on them, and the group-committing batch runner.

These classes run on a store thread with a connection that thread owns; the reactor
sees them only through :class:`leapmail.store.store.Store`.
"""

import json
from dataclasses import dataclass

from leapmail.store.errors import KindMismatch, RevisionConflict

#: Kinds the store itself writes.
BLOB_KIND = "blob"

_COLUMNS = "id, kind, rev, gen, deleted, content"


@dataclass(frozen=True)
class Document:
    """One revision of a document.  ``content`` is ``None`` for a tombstone."""

    id: str
    kind: str
    rev: int
    gen: int
    content: bytes = None
    deleted: bool = False

    def json(self):
        return json.loads(self.content)

    @classmethod
    def _from_row(cls, row):
        doc_id, kind, rev, gen, deleted, content = row
        return cls(doc_id, kind, rev, gen, None if content is None else bytes(content), bool(deleted))


class Queries:
    """Reads shared by readers and the writer (which also sees its own uncommitted work)."""

    def __init__(self, conn, path, cache=None):
        self.conn = conn
        self.path = path
        #: The store's :class:`~leapmail.store.cachefile.CacheFile`, if it has one.
        self.cache = cache

    def execute(self, sql, params=()):
        """Run SQL on this connection: how typed tables of other layers are queried."""
        return self.conn.execute(sql, params)

    def get(self, doc_id, include_deleted=False):
        row = self.conn.execute(
            f"SELECT {_COLUMNS} FROM documents WHERE id = ?", (doc_id,)
        ).fetchone()
        if row is None or (row[4] and not include_deleted):
            return None
        return Document._from_row(row)

    def get_many(self, doc_ids, include_deleted=False):
        """Documents by id, as a dict; missing ids are absent.  Batched to bound SQL size."""
        found = {}
        ids = list(doc_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(
                f"SELECT {_COLUMNS} FROM documents WHERE id IN ({marks})", chunk
            ):
                if include_deleted or not row[4]:
                    found[row[0]] = Document._from_row(row)
        return found

    def contents_of(self, doc_ids, kind):
        """``{id: content}`` of the live documents of ``kind`` among ``doc_ids``.

        What :meth:`get_many` reads, less: no :class:`Document` per row, for read paths
        that go through thousands of documents a second (message bodies).
        """
        found = {}
        ids = list(doc_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self.conn.execute(
                f"SELECT id, content FROM documents WHERE id IN ({marks}) AND kind = ? "
                "AND deleted = 0", (*chunk, kind)))
        return found

    def changes_since(self, generation, limit=1000):
        """Documents (tombstones included) written after ``generation``, oldest first."""
        return [
            Document._from_row(row)
            for row in self.conn.execute(
                f"SELECT {_COLUMNS} FROM documents WHERE gen > ? ORDER BY gen LIMIT ?",
                (generation, limit),
            )
        ]

    def generation(self):
        return int(
            self.conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]
        )

    def count(self, kind=None):
        if kind is None:
            sql, params = "SELECT count(*) FROM documents WHERE deleted = 0", ()
        else:
            sql, params = "SELECT count(*) FROM documents WHERE deleted = 0 AND kind = ?", (kind,)
        return self.conn.execute(sql, params).fetchone()[0]


class Transaction(Queries):
    """The writes of one atomic job.  Everything it does commits together or not at all."""

    def __init__(self, conn, path, counter, indexers, cache=None):
        super().__init__(conn, path, cache)
        self._counter = counter
        self._indexers = indexers
        self.events = []
        self._finally = []

    def before_commit(self, action):
        """Run ``action()`` at the end of this job, inside it (a failure aborts the job).

        For work best done once per job rather than once per document: SQLite makes
        an FTS5 table flush its pending terms at every later write statement, so
        full-text inserts gathered at the end cost one flush instead of one each.
        """
        self._finally.append(action)

    def _finish(self):
        actions, self._finally = self._finally, []
        for action in actions:
            action()

    def emit(self, event):
        """Announce ``event`` to the store's subscribers once this job has committed.

        Indexers use this to report what a write meant (a message arrived, flags
        changed), whoever wrote it: a local command or a document pulled by sync.
        Events of a job that rolls back are never delivered.
        """
        self.events.append(event)

    def put(self, doc_id, kind, content, expected_rev=None):
        """Write a new revision.  ``expected_rev=0`` means "must not exist yet"."""
        return self._put(doc_id, kind, content, expected_rev)

    def write(self, doc_id, kind, content, deleted=False):
        """Write a revision as sync received it: a live document or a tombstone of ``kind``.

        Unlike :meth:`delete`, a tombstone is written even for a document this store
        never had, so that what the provider holds is mirrored exactly.
        """
        if not deleted:
            return self._put(doc_id, kind, content, None)
        old = self.get(doc_id, include_deleted=True)
        self._check(doc_id, old, kind, None)
        return self._tombstone(old, doc_id, kind, content)

    def _tombstone(self, old, doc_id, kind, note):
        new = Document(doc_id, kind, (old.rev if old else 0) + 1, self._counter.advance(),
                       None if note is None else bytes(note), True)
        self._write(old, new)
        return new

    def _put(self, doc_id, kind, content, expected_rev):
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise TypeError("document content must be bytes")
        old = self.get(doc_id, include_deleted=True)
        self._check(doc_id, old, kind, expected_rev)
        new = Document(
            doc_id, kind, (old.rev if old else 0) + 1, self._counter.advance(), bytes(content)
        )
        self._write(old, new)
        return new

    def put_json(self, doc_id, kind, value, expected_rev=None):
        data = json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")
        return self.put(doc_id, kind, data, expected_rev)

    def delete(self, doc_id, expected_rev=None, note=None):
        """Replace a document by a tombstone (kept so sync can replicate the deletion).

        ``note`` (bytes) travels with the tombstone: what the deletion meant, for a
        device that merges it with a concurrent change (a move names its target).
        """
        old = self.get(doc_id, include_deleted=True)
        if old is None or old.deleted:
            if expected_rev not in (None, 0):
                raise RevisionConflict(self.path, doc_id, expected_rev, old.rev if old else 0)
            return None
        self._check(doc_id, old, old.kind, expected_rev)
        return self._tombstone(old, doc_id, old.kind, note)

    def _check(self, doc_id, old, kind, expected_rev):
        current = old.rev if old and not old.deleted else 0
        if expected_rev is not None and expected_rev != current:
            raise RevisionConflict(self.path, doc_id, expected_rev, current)
        if old is not None and old.kind != kind:
            raise KindMismatch(self.path, doc_id, old.kind, kind)

    def _write(self, old, new):
        self.conn.execute(
            "INSERT INTO documents (id, kind, rev, gen, deleted, content) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "rev = excluded.rev, gen = excluded.gen, deleted = excluded.deleted, "
            "content = excluded.content",
            (new.id, new.kind, new.rev, new.gen, int(new.deleted), new.content),
        )
        for indexer in self._indexers.get(new.kind, ()):
            indexer(self, old if old and not old.deleted else None, new)


class GenerationCounter:
    """The last generation handed out; owned by the single writer."""

    def __init__(self, value):
        self.value = value

    def advance(self):
        self.value += 1
        return self.value


class Committer:
    """Runs jobs ``fn(txn, *args)`` in batches: one savepoint per job, one commit per batch.

    Group commit: every job of a batch becomes durable with one fsync, and a job that
    fails rolls back alone.  A job's result is reported only after the commit succeeded.
    """

    def __init__(self, conn, path, indexers, classify, cache=None):
        self.cache = cache
        self.conn = conn
        self.path = path
        self.indexers = indexers
        self.classify = classify
        self.counter = GenerationCounter(Queries(conn, path).generation())
        self.events = []

    def run_batch(self, jobs):
        """``jobs`` is a list of ``(fn, args)``; returns a list of ``(ok, result_or_exc)``.

        Afterwards ``self.events`` holds the events of the jobs that committed.

        Never raises: whatever goes wrong, every job gets an outcome, so no caller
        waits forever and the writer thread lives on.
        """
        start = self.counter.value
        self.events = []
        try:
            return self._run(jobs, start)
        except BaseException as e:
            self.events = []
            # The batch as a whole is lost (disk full, I/O error, a broken savepoint,
            # a failed commit): including the jobs that had succeeded inside it.
            self.counter.value = start
            try:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
            except Exception:
                pass
            cause = e.cause if isinstance(e, _BatchLost) else e
            return [(False, self._classified(cause))] * len(jobs)

    def _run(self, jobs, start):
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        outcomes = []
        for fn, args in jobs:
            saved = self.counter.value
            conn.execute("SAVEPOINT job")
            txn = Transaction(conn, self.path, self.counter, self.indexers, self.cache)
            try:
                result = fn(txn, *args)
                txn._finish()
            except Exception as e:
                self.counter.value = saved
                if not conn.in_transaction:
                    raise _BatchLost(e) from e
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
                outcomes.append((False, self._classified(e)))
            else:
                conn.execute("RELEASE job")
                outcomes.append((True, result))
                self.events.extend(txn.events)
        if self.counter.value != start:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (self.counter.value,))
        conn.execute("COMMIT")
        return outcomes

    def _classified(self, exc):
        return self.classify(exc) or exc


class _BatchLost(Exception):
    """A job's error that also aborted the enclosing transaction."""

    def __init__(self, cause):
        super().__init__(str(cause))
        self.cause = cause
