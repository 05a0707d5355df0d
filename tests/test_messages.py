"""Messages through the mail core: import, byte-exact reassembly, sessions, events, GC."""

import pytest
import pytest_twisted
from twisted.internet import defer
from hypothesis import HealthCheck, given, settings, strategies as st

from leapmail.mail import message as message_module, mime
from leapmail.mail.errors import NoSuchMailbox
from leapmail.mail.headers import filter_fields
from leapmail.mail.message import load_content, read_range

from mail_corpus import corpus


async def content_of(account, view, uid):
    (meta,) = await view.meta([uid])
    return meta, await account.store.read(load_content, meta.content)


async def section(account, content, path=(), part=None):
    rng = content.section_range(path, part)
    if rng is None:
        return None
    return await account.store.read(read_range, content, *rng)


async def doc_counts(account):
    return await account.store.read(lambda q: {
        kind: n for kind, n in q.execute(
            "SELECT kind, count(*) FROM documents WHERE deleted = 0 GROUP BY kind")
    })


@pytest.fixture(params=["whole", "split"])
def layout(request, monkeypatch):
    """Both ways a message is stored: whole in its content document (small ones) and
    split into skeleton and part documents (what bigger ones get)."""
    if request.param == "split":
        monkeypatch.setattr(message_module, "RAW_INLINE_MAX", -1)
    return request.param


@pytest_twisted.ensureDeferred
async def test_corpus_round_trips_every_section(account, layout):
    messages = corpus()
    assert len(messages) >= 200
    for name, raw in messages:
        _, uid = await account.append("INBOX", raw)
    view = await account.select("INBOX")
    assert view.exists == len(messages)
    metas = await view.meta(view.uids)
    for (name, raw), meta in zip(messages, metas):
        root = mime.parse(raw, dovecot_line_ends=True)  # as the store parses
        wanted = [(p, part) for p in _paths(root) for part in (None, "HEADER", "TEXT", "MIME")]

        def read_all(q):
            # Everything from the stored documents alone: the raw bytes are not consulted.
            content = load_content(q, meta.content)
            out = []
            for path, part in wanted:
                rng = content.section_range(path, part)
                out.append(None if rng is None else read_range(q, content, *rng))
            return content, out

        content, got = await account.store.read(read_all)
        assert meta.size == len(raw) == content.size, name
        for (path, part), data in zip(wanted, got):
            rng = mime.section_range(raw, root, path, part)
            assert data == (None if rng is None else raw[rng[0]:rng[1]]), (name, path, part)
        assert got[0] == raw and wanted[0] == ((), None)
        header = await section(account, content, (), "HEADER")
        assert filter_fields(header, ["subject", "from"], True) == filter_fields(
            raw[:root.body_start], ["subject", "from"], True)
    view.close()


def _format_1(raw, keyed_id):
    """The documents format 1 wrote for ``raw``: ``(content_id, content, {part_id: part})``.

    Format 1 split every message and decoded everything at once; stores written
    then must stay readable.
    """
    from leapmail.mail import codec
    from leapmail.mail.bodystructure import bodystructure
    from leapmail.mail.envelope import envelope
    from leapmail.mail.headers import first_value, split_fields
    from leapmail.mail.message import _sent, encode_tree

    root = mime.parse(raw, dovecot_line_ends=True)
    leaves = mime.leaves(root)
    bodies = [raw[leaf.body_start:leaf.end] for leaf in leaves]
    ids = [keyed_id("part", body) for body in bodies]
    header = raw[root.start:root.body_start]
    content = codec.dumps({
        "format": 1, "size": len(raw), "tree": encode_tree(root),
        "skeleton": mime.skeleton(raw, root), "parts": ids,
        "part_sizes": [len(body) for body in bodies], "envelope": envelope(header),
        "bodystructure": bodystructure(raw, root, canonical_plain=True),
        **_sent(first_value(split_fields(header), "date")),
    })
    parts = {i: codec.dumps({"size": len(body), "data": body}) for i, body in zip(ids, bodies)}
    return keyed_id("message", raw), content, parts


@pytest_twisted.ensureDeferred
async def test_format_1_documents_are_still_read(account):
    from leapmail.mail import codec
    from leapmail.mail.bodystructure import bodystructure
    from leapmail.mail.envelope import envelope
    from leapmail.mail.schema import MESSAGE_KIND, PART_KIND

    messages = corpus()[:80]
    written = [_format_1(raw, account.keyed_id) for _, raw in messages]

    def write(txn):
        for content_id, content, parts in written:
            for part_id, part in parts.items():
                if txn.get(part_id) is None:
                    txn.put(part_id, PART_KIND, part)
            if txn.get(content_id) is None:
                txn.put(content_id, MESSAGE_KIND, content)

    await account.store.transact(write)
    for (name, raw), (content_id, _, _) in zip(messages, written):
        root = mime.parse(raw, dovecot_line_ends=True)
        wanted = [(p, part) for p in _paths(root) for part in (None, "HEADER", "TEXT", "MIME")]

        def read_all(q):
            content = load_content(q, content_id)
            return content, [None if rng is None else read_range(q, content, *rng)
                             for rng in (content.section_range(*w) for w in wanted)]

        content, got = await account.store.read(read_all)
        assert content.raw is None and content.size == len(raw), name
        for (path, part), data in zip(wanted, got):
            rng = mime.section_range(raw, root, path, part)
            assert data == (None if rng is None else raw[rng[0]:rng[1]]), (name, path, part)
        # As stored: CBOR gives lists for tuples.
        assert content.envelope == codec.loads(codec.dumps(
            envelope(raw[root.start:root.body_start]))), name
        assert content.bodystructure == codec.loads(codec.dumps(
            bodystructure(raw, root, canonical_plain=True))), name


@pytest_twisted.ensureDeferred
async def test_small_messages_are_one_document_big_ones_are_split(account):
    small = b"Subject: small\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n\r\nhi\r\n--x--\r\n"
    big = small.replace(b"hi", b"y" * message_module.RAW_INLINE_MAX)
    await account.append("INBOX", small)
    assert await doc_counts(account) == {"mailbox": 6, "subscription": 5, "flags": 1,
                                         "message": 1}
    await account.append("INBOX", big)
    counts = await doc_counts(account)
    assert (counts["message"], counts["part"]) == (2, 1)
    view = await account.select("INBOX")
    try:
        for uid, raw in ((1, small), (2, big)):
            _, content = await content_of(account, view, uid)
            assert (content.raw is not None) == (raw is small)
            assert await section(account, content) == raw
            assert await section(account, content, (1,)) == raw[raw.index(b"\r\n\r\n", 60) + 4:
                                                               raw.index(b"\r\n--x--")]
    finally:
        view.close()


def _paths(root, limit=40):
    """Section paths of a tree, IMAP numbering, bounded so deep corpora stay fast."""
    out, stack = [()], [((), root)]
    while stack and len(out) < limit:
        path, e = stack.pop()
        target = e.children[0] if e.message and e.children else e
        if target.multipart:
            for i, child in enumerate(target.children, 1):
                out.append(path + (i,))
                stack.append((path + (i,), child))
        elif path == ():
            out.append((1,))
    return out


ANY_BYTES = st.binary(max_size=3000) | st.lists(st.sampled_from(
    [b"--b\r\n", b"--b--\r\n", b"\r\n", b"\n", b"Content-Type: multipart/mixed; boundary=b\r\n",
     b"Content-Type: message/rfc822\r\n", b"Subject: x\r\n", b"body\r\n", b"\x00", b"\xff"]),
    max_size=40).map(b"".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=ANY_BYTES)
@pytest_twisted.ensureDeferred
async def test_any_bytes_come_back_identical(account, raw):
    await _round_trip(account, raw)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=ANY_BYTES)
@pytest_twisted.ensureDeferred
async def test_any_bytes_come_back_identical_when_split(account, raw):
    # Not the monkeypatch fixture: hypothesis runs many examples per test call.
    saved, message_module.RAW_INLINE_MAX = message_module.RAW_INLINE_MAX, -1
    try:
        await _round_trip(account, raw)
    finally:
        message_module.RAW_INLINE_MAX = saved


async def _round_trip(account, raw):
    _, uid = await account.append("INBOX", raw)
    view = await account.select("INBOX")
    try:
        _, content = await content_of(account, view, uid)
        assert await section(account, content) == raw
    finally:
        view.close()


@pytest_twisted.ensureDeferred
async def test_uids_increase_and_are_never_reused(account):
    first = [(await account.append("INBOX", b"Subject: %d\r\n\r\nx" % i))[1] for i in range(3)]
    assert first == [1, 2, 3]
    view = await account.select("INBOX")
    await view.store_flags([3], "add", ["\\Deleted"])
    assert await view.expunge() == [3]
    _, uid = await account.append("INBOX", b"Subject: 4\r\n\r\nx")
    assert uid == 4
    status = await account.status("INBOX")
    assert (status["messages"], status["uidnext"]) == (3, 5)
    view.close()


@pytest_twisted.ensureDeferred
async def test_an_import_source_is_imported_once_even_after_expunge_or_move(account):
    raw = b"Subject: once\r\n\r\nbody"
    assert await account.append("INBOX", raw, source=b"incoming\0a") == (
        (await account.mailbox("INBOX")).uidvalidity, 1)
    assert (await account.append("INBOX", raw, source=b"incoming\0a"))[1] is None
    assert (await account.append("INBOX", raw, source=b"incoming\0b"))[1] == 2
    _, uids = await account.append_many("INBOX", [
        (raw, (), None, b"incoming\0a"), (raw, (), None, b"incoming\0c"),
        (raw, (), None, b"incoming\0c"), (raw, (), None)])
    assert uids == [None, 3, None, 4]
    view = await account.select("INBOX")
    await view.move([1], "Archive")
    await view.store_flags([2], "add", ["\\Deleted"])
    await view.expunge()
    assert (await account.append("INBOX", raw, source=b"incoming\0a"))[1] is None
    assert (await account.append("Archive", raw, source=b"incoming\0b"))[1] is None
    assert (await account.status("INBOX"))["messages"] == 2
    assert (await account.status("Archive"))["messages"] == 1
    view.close()


@pytest_twisted.ensureDeferred
async def test_copy_shares_content_and_gc_removes_it_after_last_expunge(account):
    attachment = b"A" * 300_000  # big enough for a blob
    raw = (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n\r\nhello\r\n--x\r\n"
           b"Content-Type: application/octet-stream\r\n\r\n" + attachment + b"\r\n--x--\r\n")
    validity, uid = await account.append("INBOX", raw, flags=["\\Flagged", "$Work"],
                                         internal_date=1_700_000_000)
    before = await doc_counts(account)
    assert before["message"] == 1 and before["part"] == 2 and before["blob"] == 1
    view = await account.select("INBOX")
    target_validity, pairs = await view.copy([uid], "Archive")
    assert pairs == [(uid, 1)]
    assert target_validity == (await account.mailbox("Archive")).uidvalidity
    after = await doc_counts(account)
    assert {k: after[k] for k in ("message", "part", "blob")} == {"message": 1, "part": 2, "blob": 1}
    assert after["flags"] == before["flags"] + 1

    archive = await account.select("Archive")
    (meta,) = await archive.meta([1])
    assert meta.flags == ("\\Flagged", "$Work") and meta.internal_date == 1_700_000_000

    await view.store_flags([uid], "add", ["\\Deleted"])
    await view.expunge()
    assert (await doc_counts(account))["message"] == 1  # still in Archive
    await archive.store_flags([1], "add", ["\\Deleted"])
    await archive.expunge()
    counts = await doc_counts(account)
    assert "message" not in counts and "part" not in counts and "blob" not in counts
    chunks = await account.store.read(lambda q: q.execute("SELECT count(*) FROM blob_chunks").fetchone()[0])
    assert chunks == 0
    view.close()
    archive.close()


@pytest_twisted.ensureDeferred
async def test_move_gives_new_uids_and_expunges_the_source(account):
    for i in range(3):
        await account.append("INBOX", b"Subject: %d\r\n\r\nbody" % i)
    view = await account.select("INBOX")
    _, pairs = await view.move([1, 3], "Trash")
    assert pairs == [(1, 1), (3, 2)]
    updates = view.updates()
    assert [(u.kind, u.seq) for u in updates] == [("expunge", 1), ("expunge", 2)]
    assert view.uids == [2]
    with pytest.raises(NoSuchMailbox):
        await view.copy([2], "Nowhere")
    view.close()


@pytest_twisted.ensureDeferred
async def test_two_sessions_see_each_others_changes_at_the_right_moments(account):
    await account.append("INBOX", b"Subject: a\r\n\r\n1")
    await account.append("INBOX", b"Subject: b\r\n\r\n2")
    first = await account.select("INBOX")
    second = await account.select("INBOX")
    woken = []
    second.on_change = woken.append
    # \Recent went to exactly one session: the first to select.
    assert first.recent == {1, 2} and second.recent == set()

    await first.store_flags([1], "add", ["\\Seen"])
    await account.append("INBOX", b"Subject: c\r\n\r\n3")
    await first.store_flags([2], "add", ["\\Deleted"])
    await first.expunge()
    assert woken  # IDLE would have been woken
    # While a sequence-number command runs, expunges wait; the numbering holds.
    held = second.updates(expunges=False)
    assert [(u.kind, u.seq, u.uid) for u in held] == [("flags", 1, 1), ("flags", 2, 2), ("exists", 0, 0)]
    assert held[0].flags == ("\\Seen",)
    assert second.uids == [1, 2, 3] and second.exists == 3
    rest = second.updates()
    assert [(u.kind, u.seq, u.uid) for u in rest] == [("expunge", 2, 2)]
    assert second.uids == [1, 3]
    # The new message was recent for the first session (it was selected first).
    first.updates()
    assert first.recent == {1, 3} and second.recent == set()

    third = await account.select("INBOX")
    assert third.recent == set() and third.uids == [1, 3]
    for v in (first, second, third):
        v.close()


@pytest_twisted.ensureDeferred
async def test_recent_waits_for_the_next_session_when_nobody_is_selected(account):
    await account.append("INBOX", b"Subject: a\r\n\r\n1")
    readonly = await account.select("INBOX", readonly=True)
    # EXAMINE reports \Recent as SELECT would, without taking it (RFC 3501 6.3.2).
    assert readonly.recent == {1}
    view = await account.select("INBOX")
    assert view.recent == {1}
    view.close()
    readonly.close()
    again = await account.select("INBOX")
    assert again.recent == set()
    again.close()


@pytest_twisted.ensureDeferred
async def test_flag_changes_carry_modseq_and_unchanged_since(account):
    await account.append("INBOX", b"Subject: a\r\n\r\n1", flags=["\\Seen"])
    await account.append("INBOX", b"Subject: b\r\n\r\n2")
    view = await account.select("INBOX")
    base = (await account.status("INBOX"))["highestmodseq"]
    changed, refused = await view.store_flags([1, 2], "add", ["\\Flagged", "$Label1"])
    assert sorted(changed) == [1, 2]
    assert [changed[1][1], changed[2][1]] == [base + 1, base + 2]
    assert changed[1][0] == ("\\Flagged", "\\Seen", "$Label1")
    changed, refused = await view.store_flags([1, 2], "remove", ["\\flagged"], unchanged_since=base + 1)
    assert list(changed) == [1] and refused == [2]
    # "set" replaces the whole list (here: drops \Seen, respells the keyword) ...
    changed, _ = await view.store_flags([1], "set", ["$label1"])
    assert changed[1][0] == ("$label1",)
    # ... while adding a keyword already there, in any case, changes nothing.
    changed, _ = await view.store_flags([1], "add", ["$LABEL1"])
    assert changed == {}
    view.close()


@pytest_twisted.ensureDeferred
async def test_deleting_a_selected_mailbox_tells_its_sessions(account):
    await account.create_mailbox("doomed")
    await account.append("doomed", b"Subject: a\r\n\r\n1")
    view = await account.select("doomed")
    await account.delete_mailbox("doomed")
    assert view.deleted
    assert "message" not in await doc_counts(account)
    view.close()


@pytest_twisted.ensureDeferred
async def test_rename_inbox_moves_messages_and_leaves_it_empty(account):
    for i in range(3):
        await account.append("INBOX", b"Subject: %d\r\n\r\nbody" % i, flags=["\\Seen"])
    await account.create_mailbox("INBOX/child")
    await account.rename_mailbox("INBOX", "Old mail")
    assert (await account.status("INBOX"))["messages"] == 0
    status = await account.status("Old mail")
    assert (status["messages"], status["unseen"], status["uidnext"]) == (3, 0, 4)
    assert "INBOX/child" in [m.name for m in await account.mailboxes()]
    _, uid = await account.append("INBOX", b"Subject: new\r\n\r\nx")
    assert uid == 4  # INBOX's UIDs are never reused


@pytest_twisted.ensureDeferred
async def test_append_many_is_one_transaction(account):
    batch = [(b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i), ["\\Seen"] if i % 2 else [], 1_700_000_000 + i)
             for i in range(50)]
    validity, uids = await account.append_many("INBOX", batch)
    assert uids == list(range(1, 51))
    assert validity == (await account.mailbox("INBOX")).uidvalidity
    status = await account.status("INBOX")
    assert (status["messages"], status["unseen"]) == (50, 25)
    with pytest.raises(NoSuchMailbox):
        await account.append_many("nowhere", batch)
    assert (await account.status("INBOX"))["messages"] == 50


@pytest_twisted.ensureDeferred
async def test_50mb_attachment_imports_and_streams_back_exactly(account):
    import hashlib

    from leapmail.mail.message import STREAM_CHUNK, iter_range
    from mail_corpus import big_message

    raw = big_message()
    assert len(raw) > 50_000_000
    _, uid = await account.append("INBOX", raw)
    counts = await doc_counts(account)
    assert counts["blob"] == 1  # the attachment body lives in a chunked blob
    view = await account.select("INBOX")
    _, content = await content_of(account, view, uid)
    digest, pieces, largest = hashlib.sha256(), 0, 0
    async for piece in iter_range(account.store, content, 0, content.size):
        digest.update(piece)
        pieces += 1
        largest = max(largest, len(piece))
    assert digest.digest() == hashlib.sha256(raw).digest()
    assert largest == STREAM_CHUNK and pieces == -(-len(raw) // STREAM_CHUNK)
    start, end = content.section_range((2,), None)
    middle = (start + end) // 2
    assert await account.store.read(read_range, content, middle, middle + 1000) == raw[middle:middle + 1000]
    assert await view.search(("header", "subject", "big")) == [uid]
    # Over 16 MB the attachment stays out of the full-text index, its text part does not.
    assert await view.search(("body", "See attachment")) == [uid]
    await account.text_indexer.flush()
    assert await view.search(("body", "See attachment")) == [uid]
    assert await account.store.read(
        lambda q: q.execute("SELECT body FROM text_index").fetchone()[0]) == "See attachment."
    # The file name is in the part's header: TEXT finds it, BODY does not (as Dovecot).
    assert await view.search(("text", "big.bin")) == [uid]
    assert await view.search(("body", "big.bin")) == []
    view.close()


@pytest_twisted.ensureDeferred
async def test_big_flag_changes_and_expunges_let_other_writes_through(account):
    from leapmail.mail.account import WRITE_BATCH

    count = 2 * WRITE_BATCH + 500
    _, uids = await account.append_many(
        "INBOX", [(b"Subject: %d\r\n\r\nx\r\n" % i, (), None) for i in range(count)])
    view = await account.select("INBOX")
    order = []
    store = defer.ensureDeferred(view.store_flags(uids, "add", ["\\Deleted"]))
    store.addCallback(lambda result: order.append("store") or result)
    other = account.create_mailbox("Elsewhere")
    other = defer.ensureDeferred(other)
    other.addCallback(lambda _: order.append("other"))
    changed, refused = await store
    await other
    # The STORE went in batches: a write queued behind its first batch did not wait
    # for all of it.
    assert order == ["other", "store"]
    assert len(changed) == count and refused == []
    keep = set(uids[::3])
    expunged = await view.expunge([u for u in uids if u not in keep])
    assert expunged == [u for u in uids if u not in keep]
    status = await account.status("INBOX")
    assert status["messages"] == len(keep) and status["deleted"] == len(keep)
    view.close()
