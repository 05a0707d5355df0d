"""Whole messages out of the store's read cache, and back to the documents whenever it
cannot answer: exact bytes either way."""

import os

import pytest
import pytest_twisted

from imap_support import in_thread
from leapmail.imap import fetch as fetchlib
from leapmail.mail import bodycache, message as message_module
from leapmail.mail.session import read_meta
from leapmail.store.cachefile import HEADER_SIZE


def _message(i, size):
    head = b"From: a@example.org\r\nSubject: cached %d\r\n\r\n" % i
    line = b"line %d of the body, cached or not\r\n" % i
    return head + (line * (size // len(line) + 1))[:size]


async def _append(account, sizes):
    raws = [_message(i, size) for i, size in enumerate(sizes)]
    for raw in raws:
        await account.append("INBOX", raw)
    view = await account.select("INBOX")
    return raws, view


async def _whole(account, view):
    """What the cache answers for every message of the view: {uid: bytes}."""
    def job(queries):
        metas = read_meta(queries, view.info.id, list(view.uids), with_cache=True)
        found = bodycache.load_whole(queries, metas)
        return {m.uid: found[m.content].raw for m in metas if m.content in found}
    return await account.store.read(job)


async def _rows(account):
    return await account.store.read(
        lambda q: q.execute("SELECT count(*) FROM body_cache").fetchone()[0])


@pytest.fixture(params=["whole", "split"])
def layout(request, monkeypatch):
    """Small messages are one document, bigger ones skeleton and parts: both cached."""
    if request.param == "split":
        monkeypatch.setattr(message_module, "RAW_INLINE_MAX", -1)
    return request.param


@pytest_twisted.ensureDeferred
async def test_appended_messages_are_cached_whole_and_exact(account, layout):
    raws, view = await _append(account, [300, 5_000, 60_000, bodycache.MAX_SIZE + 1])
    cached = await _whole(account, view)
    # Everything up to MAX_SIZE, byte for byte; the bigger one is left to the documents.
    assert cached == {uid: raw for uid, raw in zip(view.uids, raws)
                      if len(raw) <= bodycache.MAX_SIZE}
    assert len(cached) == 3
    assert await _rows(account) == 3


@pytest_twisted.ensureDeferred
async def test_fetch_of_whole_messages_reads_no_content_document(imap_server, monkeypatch):
    raws, view = await _append(imap_server.account, [400, 9_000, 30_000])
    loaded = []
    real = fetchlib.load_contents

    def counted(queries, ids):
        loaded.extend(ids)
        return real(queries, ids)

    monkeypatch.setattr(fetchlib, "load_contents", counted)

    def client():
        c = imap_server.raw()
        c.command(b"s", b"SELECT INBOX")
        whole = c.response(b"f1", b"UID FETCH 1:* (UID BODY.PEEK[])")
        partial = c.response(b"f2", b"UID FETCH 2 (BODY.PEEK[]<10.20> RFC822.SIZE)")
        text = c.response(b"f3", b"UID FETCH 3 (BODY.PEEK[TEXT])")
        c.close()
        return whole, partial, text

    whole, partial, text = await in_thread(client)
    assert whole == b"".join(b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n" % (i, i, len(raw), raw)
                             for i, raw in enumerate(raws, 1)) + b"f1 OK Fetch completed\r\n"
    # RFC822.SIZE before the section, where Dovecot puts it.
    assert partial == (b"* 2 FETCH (UID 2 RFC822.SIZE %d BODY[]<10> {20}\r\n%s)\r\n"
                       % (len(raws[1]), raws[1][10:30]) + b"f2 OK Fetch completed\r\n")
    # Only the section that needs the message's structure read its document.
    body = raws[2].split(b"\r\n\r\n", 1)[1]
    assert text == b"* 3 FETCH (UID 3 BODY[TEXT] {%d}\r\n%s)\r\n" % (len(body), body) + \
        b"f3 OK Fetch completed\r\n"
    assert len(loaded) == 1


@pytest_twisted.ensureDeferred
async def test_a_damaged_or_lost_cache_falls_back_to_the_documents(imap_server):
    account = imap_server.account
    raws, view = await _append(account, [2_000 + 500 * i for i in range(6)])
    cache = account.store.cache
    spans = await account.store.read(
        lambda q: q.execute("SELECT pos, len FROM body_cache ORDER BY pos").fetchall())
    with open(cache.path, "r+b") as f:
        f.seek(spans[1][0] + 40)        # a flipped byte in the second record
        f.write(b"\x00\x01\x02")
    os.truncate(cache.path, spans[4][0] + 10)   # the fifth record cut short, the sixth gone
    assert set(await _whole(account, view)) == {view.uids[i] for i in (0, 2, 3)}

    def client():
        c = imap_server.raw()
        c.command(b"s", b"SELECT INBOX")
        got = c.response(b"f", b"UID FETCH 1:* (BODY.PEEK[])")
        c.close()
        return got

    assert await in_thread(client) == b"".join(
        b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n" % (i, i, len(raw), raw)
        for i, raw in enumerate(raws, 1)) + b"f OK Fetch completed\r\n"


@pytest_twisted.ensureDeferred
async def test_at_start_a_cut_file_loses_its_rows_and_fill_copies_them_again(account):
    raws, view = await _append(account, [3_000] * 8)
    store, cache = account.store, account.store.cache
    spans = await store.read(
        lambda q: q.execute("SELECT pos, len FROM body_cache ORDER BY pos").fetchall())
    os.truncate(cache.path, spans[5][0])        # a crash lost the last three
    cache.close()
    assert await store.transact(bodycache.check) == "cut"
    assert await _rows(account) == 5
    while await store.transact(bodycache.fill):
        pass
    assert await _rows(account) == 8
    assert await _whole(account, view) == dict(zip(view.uids, raws))


@pytest_twisted.ensureDeferred
async def test_at_start_a_new_file_drops_every_row_and_fill_copies_all(account):
    raws, view = await _append(account, [1_000, 20_000, 40_000])
    store, cache = account.store, account.store.cache
    cache.close()
    os.unlink(cache.path)
    assert await store.transact(bodycache.check) == "reset"
    assert await _rows(account) == 0
    assert await _whole(account, view) == {}
    # Small batches: fill picks up where it stopped.
    rounds = 0
    while await store.transact(bodycache.fill, 1, 2):
        rounds += 1
    assert rounds >= 3
    assert await _whole(account, view) == dict(zip(view.uids, raws))
    assert await store.transact(bodycache.check) is None
    assert not await store.transact(bodycache.fill)


@pytest_twisted.ensureDeferred
async def test_copies_of_expunged_messages_are_compacted_away(account, monkeypatch):
    raws, view = await _append(account, [4_000] * 10)
    store, cache = account.store, account.store.cache
    doomed = view.uids[:7]
    await account.change_flags(view.info.id, doomed, "add", ["\\Deleted"])
    assert await account.expunge(view.info.id) == doomed
    assert await _rows(account) == 3
    before = cache.size
    assert await store.transact(bodycache.check) is None   # 28 KB dead is not worth it
    monkeypatch.setattr(bodycache, "COMPACT_MIN_GARBAGE", 0)
    assert await store.transact(bodycache.check) == "compacted"
    record = 4_000 + len(_message(0, 0)) + 28
    assert (before, cache.size) == (HEADER_SIZE + 10 * record, HEADER_SIZE + 3 * record)
    view = await account.select("INBOX")
    assert await _whole(account, view) == dict(zip(view.uids, raws[7:]))
    # The compacted file is the one a later start knows.
    assert await store.transact(bodycache.check) is None
    assert await _rows(account) == 3


@pytest_twisted.ensureDeferred
async def test_a_file_from_before_the_cache_gets_its_messages_copied(db_path, key):
    from leapmail.home import COMPONENTS
    from leapmail.mail.account import Account
    from leapmail.store import Store

    id_key = b"i" * 32
    store = Store.open(db_path, key, COMPONENTS, create=True)
    account = Account(store, id_key)
    await account.setup()
    raws, view = await _append(account, [700, 7_000, 70_000])

    def back_to_version_4(txn):
        txn.execute("DROP TABLE body_cache")
        txn.execute("DROP TABLE mailbox_keywords")  # version 6's
        txn.execute("DELETE FROM mail_state WHERE key LIKE 'body_cache%'")
        txn.execute("UPDATE meta SET value = 4 WHERE key = 'schema.mail'")
    await store.transact(back_to_version_4)
    account.close()
    await store.close()
    os.unlink(store.cache.path)

    store = Store.open(db_path, key, COMPONENTS)
    account = Account(store, id_key)
    assert await _rows(account) == 0
    assert await store.read(lambda q: q.execute(
        "SELECT value FROM mail_state WHERE key = 'body_cache_fill_end'").fetchone()) == (3,)
    await account.setup()                       # check, then fill in the background
    await account._cache_filling
    view = await account.select("INBOX")
    assert await _whole(account, view) == dict(zip(view.uids[:2], raws[:2]))
    # A message appended now is copied as it is stored, and fill has nothing to do.
    await account.append("INBOX", raws[0] + b"again\r\n")
    view = await account.select("INBOX")
    assert len(await _whole(account, view)) == 3
    assert not await store.transact(bodycache.fill)
    account.close()
    await store.close()
