"""Documents, revisions, generations, transactions and indexers, through the Deferred API."""

import threading

import pytest
import pytest_twisted
from twisted.internet import defer

from leapmail.store import (
    KindMismatch,
    RevisionConflict,
    SchemaComponent,
    Store,
    StoreClosed,
)


@pytest_twisted.ensureDeferred
async def test_put_get_revisions_and_generations(store):
    first = await store.put("d1", "note", b"one")
    assert (first.id, first.kind, first.rev, first.gen, first.content) == ("d1", "note", 1, 1, b"one")
    second = await store.put("d1", "note", b"two")
    assert (second.rev, second.gen) == (2, 2)
    other = await store.put("d2", "note", b"\x00\xff binary")
    assert (other.rev, other.gen) == (1, 3)
    got = await store.get("d1")
    assert got == second
    assert await store.get("missing") is None
    assert await store.generation() == 3


@pytest_twisted.ensureDeferred
async def test_expected_revision_is_enforced(store):
    await store.put("d", "note", b"a", expected_rev=0)
    with pytest.raises(RevisionConflict) as err:
        await store.put("d", "note", b"b", expected_rev=0)
    assert (err.value.expected, err.value.actual) == (0, 1)
    await store.put("d", "note", b"b", expected_rev=1)
    with pytest.raises(RevisionConflict):
        await store.put("d", "note", b"c", expected_rev=1)
    assert (await store.get("d")).content == b"b"
    # The failed writes consumed no generation.
    assert await store.generation() == 2


@pytest_twisted.ensureDeferred
async def test_kind_cannot_change(store):
    await store.put("d", "note", b"a")
    with pytest.raises(KindMismatch):
        await store.put("d", "other", b"a")


@pytest_twisted.ensureDeferred
async def test_delete_leaves_a_tombstone_in_the_change_log(store):
    await store.put("a", "note", b"1")
    await store.put("b", "note", b"2")
    tomb = await store.delete("a")
    assert (tomb.rev, tomb.gen, tomb.deleted, tomb.content) == (2, 3, True, None)
    assert await store.get("a") is None
    assert (await store.get("a", include_deleted=True)).deleted
    assert await store.delete("a") is None
    changes = await store.changes_since(0)
    assert [(c.id, c.gen, c.deleted) for c in changes] == [("b", 2, False), ("a", 3, True)]
    # Re-creating after deletion continues the revision sequence.
    again = await store.put("a", "note", b"back", expected_rev=0)
    assert (again.rev, again.gen) == (3, 4)


@pytest_twisted.ensureDeferred
async def test_changes_since_pages_in_generation_order(store):
    await store.put_many([(f"d{i}", "note", b"x") for i in range(25)])
    await store.put("d3", "note", b"y")
    seen, since = [], 0
    while True:
        page = await store.changes_since(since, limit=10)
        if not page:
            break
        seen += [(c.id, c.gen) for c in page]
        since = page[-1].gen
    assert len(seen) == 25
    assert [g for _, g in seen] == sorted(g for _, g in seen)
    assert seen[-1] == ("d3", 26)
    assert "d3" not in [i for i, _ in seen[:-1]]


@pytest_twisted.ensureDeferred
async def test_transaction_is_atomic_and_failures_do_not_touch_neighbours(store):
    def good(txn, name):
        txn.put(name, "note", b"ok")
        return name

    def bad(txn):
        txn.put("half-1", "note", b"x")
        txn.put("half-2", "note", b"x")
        raise ValueError("changed my mind")

    # Queued together so that they share one commit (group commit).
    results = await defer.DeferredList(
        [store.transact(good, "before"), store.transact(bad), store.transact(good, "after")],
        consumeErrors=True,
    )
    assert results[0] == (True, "before")
    assert results[1][0] is False and results[1][1].check(ValueError)
    assert results[2] == (True, "after")
    docs = await store.get_many(["before", "half-1", "half-2", "after"])
    assert sorted(docs) == ["after", "before"]
    # Generations stay dense: the rolled-back job gave its generations back.
    assert [d.gen for d in await store.changes_since(0)] == [1, 2]


@pytest_twisted.ensureDeferred
async def test_read_sees_one_snapshot(store):
    await store.put_many([("a", "n", b"1"), ("b", "n", b"1")])

    def two_reads(q):
        first = q.get("a").content
        # A commit between the two reads must not be visible inside this read job.
        done = threading.Event()
        writes.append(done)
        done.wait(10)
        return first, q.get("b").content

    writes = []
    reading = store.read(two_reads)
    while not writes:
        await _tick()
    await store.put_many([("a", "n", b"2"), ("b", "n", b"2")])
    writes[0].set()
    assert await reading == (b"1", b"1")
    assert (await store.get("b")).content == b"2"


def _tick():
    from twisted.internet import reactor

    d = defer.Deferred()
    reactor.callLater(0.001, d.callback, None)
    return d


@pytest_twisted.ensureDeferred
async def test_closed_store_refuses_work(db_path, key):
    s = Store.open(db_path, key, create=True)
    await s.close()
    with pytest.raises(StoreClosed):
        await s.put("a", "n", b"")
    with pytest.raises(StoreClosed):
        await s.get("a")
    await s.close()  # closing twice is harmless


def _notes_v1(conn):
    conn.execute("CREATE TABLE notes (doc_id TEXT PRIMARY KEY, title TEXT)")
    conn.execute("CREATE INDEX notes_title ON notes (title)")


def _notes_v2(conn):
    conn.execute("ALTER TABLE notes ADD COLUMN length INTEGER")
    conn.execute("UPDATE notes SET length = -1")


def _index_note(txn, old, new):
    if new.deleted:
        txn.execute("DELETE FROM notes WHERE doc_id = ?", (new.id,))
        return
    title = new.json()["title"]
    txn.execute(
        "INSERT INTO notes (doc_id, title) VALUES (?, ?) "
        "ON CONFLICT (doc_id) DO UPDATE SET title = excluded.title",
        (new.id, title),
    )


def _index_note_v2(txn, old, new):
    _index_note(txn, old, new)
    if not new.deleted:
        txn.execute("UPDATE notes SET length = ? WHERE doc_id = ?", (len(new.content), new.id))


@pytest_twisted.ensureDeferred
async def test_component_tables_follow_documents_and_migrate(db_path, key):
    v1 = SchemaComponent("notes", (_notes_v1,), {"note": _index_note})
    s = Store.open(db_path, key, [v1], create=True)
    await s.transact(lambda t: t.put_json("n1", "note", {"title": "hello"}))
    await s.transact(lambda t: t.put_json("n2", "note", {"title": "world"}))
    await s.delete("n2")

    def fail_after_index(txn):
        txn.put_json("n3", "note", {"title": "ghost"})
        raise RuntimeError("abort")

    with pytest.raises(RuntimeError):
        await s.transact(fail_after_index)
    rows = await s.read(lambda q: q.execute("SELECT doc_id, title FROM notes").fetchall())
    assert rows == [("n1", "hello")]
    await s.close()

    v2 = SchemaComponent("notes", (_notes_v1, _notes_v2), {"note": _index_note_v2})
    s = Store.open(db_path, key, [v2])
    rows = await s.read(lambda q: q.execute("SELECT doc_id, title, length FROM notes").fetchall())
    assert rows == [("n1", "hello", -1)]
    await s.transact(lambda t: t.put_json("n1", "note", {"title": "again"}))
    rows = await s.read(lambda q: q.execute("SELECT doc_id, title, length FROM notes").fetchall())
    assert rows == [("n1", "again", len(b'{"title":"again"}'))]
    versions = await s.read(
        lambda q: dict(q.execute("SELECT key, value FROM meta WHERE key LIKE 'schema.%'"))
    )
    assert versions == {"schema.store": 1, "schema.notes": 2}
    await s.close()


@pytest_twisted.ensureDeferred
async def test_writer_survives_a_job_that_breaks_the_transaction(store):
    def rogue(txn):
        txn.put("lost", "n", b"x")
        txn.execute("ROLLBACK")  # ends the batch's transaction under the writer's feet

    def fatal(txn):
        raise SystemExit("not an Exception")

    results = await defer.DeferredList(
        [store.put("neighbour", "n", b"1"), store.transact(rogue)], consumeErrors=True
    )
    assert [ok for ok, _ in results] == [False, False]
    with pytest.raises(SystemExit):
        await store.transact(fatal)
    # The writer lives on, and the lost batch left nothing and consumed no generation.
    doc = await store.put("after", "n", b"2")
    assert doc.gen == 1
    assert sorted(await store.get_many(["neighbour", "lost", "after"])) == ["after"]


@pytest_twisted.ensureDeferred
async def test_events_are_delivered_after_commit_and_only_for_committed_jobs(store):
    heard = []
    unsubscribe = store.subscribe(lambda events: heard.append(list(events)))

    def announce(txn, name, fail):
        txn.put(name, "n", b"x")
        txn.emit(("wrote", name))
        if fail:
            raise ValueError("no")
        return name

    order = []
    d1 = store.transact(announce, "a", False)
    d1.addCallback(lambda r: order.append(("result", r, len(heard))))
    d2 = store.transact(announce, "b", True)
    d3 = store.transact(announce, "c", False)
    await d1
    with pytest.raises(ValueError):
        await d2
    await d3
    flat = [e for batch in heard for e in batch]
    assert flat == [("wrote", "a"), ("wrote", "c")]
    # The subscriber heard of the commit before the job's caller got its result.
    assert order[0][:2] == ("result", "a") and order[0][2] >= 1
    unsubscribe()
    await store.transact(announce, "d", False)
    assert [e for batch in heard for e in batch] == flat
