"""Search in SQL, checked against a plain evaluation over the corpus, key by key."""

import datetime
import random
import re

import pytest
import pytest_twisted
from twisted.internet import defer

from leapmail.mail import flags as F, mime
from leapmail.mail.schema import ADDRESS_FIELDS, addresses_text
from leapmail.mail.search import QueryError

from mail_corpus import corpus

TZ = [0, 120, -300, 330]


def reference(node, m):
    """What a query means, evaluated directly on one message's bytes and metadata."""
    kind = node[0]
    if kind == "all":
        return True
    if kind == "and":
        return all(reference(c, m) for c in node[1])
    if kind == "or":
        return reference(node[1], m) or reference(node[2], m)
    if kind == "not":
        return not reference(node[1], m)
    if kind == "flag":
        return bool(m["bits"] & node[1]) == node[2]
    if kind == "keyword":
        return (node[1].lower() in [k.lower() for k in m["keywords"]]) == node[2]
    if kind == "uid":
        return any(lo <= m["uid"] <= hi for lo, hi in node[1])
    if kind == "larger":
        return len(m["raw"]) > node[1]
    if kind == "smaller":
        return len(m["raw"]) < node[1]
    if kind in ("internal", "sent"):
        day = m["internal_day"] if kind == "internal" else m["sent_day"]
        if day is None:
            day = datetime.date(1970, 1, 1).toordinal()  # no usable Date:, as Dovecot
        target = node[2].toordinal()
        return {"before": day < target, "on": day == target, "since": day >= target}[node[1]]
    if kind == "modseq":
        return m["modseq"] >= node[1]
    if kind == "header":
        values = [v for k, v in m["headers"] if k == node[1].lower()]
        return bool(values) and any(node[2].casefold() in v.casefold() for v in values)
    if kind == "body":
        return node[1].lower() in m["body"].lower()
    if kind == "text":
        return node[1].lower() in m["body"].lower() or node[1].lower() in m["header_text"].lower()
    raise AssertionError(kind)


def describe(raw):
    # The text model itself (mime.search_text) is checked against Dovecot in
    # tests/test_imap_dovecot_diff.py; here the SQL and the index are checked on it.
    root = mime.parse(raw, dovecot_line_ends=True)
    headers = []
    for n, v in mime.header_fields(raw, root.start, root.header_end):
        name = n.decode("latin-1").lower()
        headers.append((name, mime.decode_header_value(v)))
        # FROM, TO, CC, BCC also match the envelope's addresses (RFC 3501 6.4.4),
        # where the header puts something between an address's parts.
        if name in ADDRESS_FIELDS and re.search(rb'[("\\\n\r]| @|@ ', v) \
                and addresses_text(v) is not None:
            headers.append((name, addresses_text(v)))
    header_text, body = mime.search_text(raw, root)
    return {"headers": headers, "header_text": header_text, "body": body}


QUERIES = [
    ("all",),
    ("flag", F.SEEN, True), ("flag", F.SEEN, False), ("flag", F.DELETED, True),
    ("flag", F.FLAGGED, False), ("flag", F.ANSWERED, True), ("flag", F.DRAFT, True),
    ("keyword", "$Work", True), ("keyword", "$work", True), ("keyword", "$Work", False),
    ("keyword", "nothing", True),
    ("uid", [(1, 5), (100, 120)]), ("uid", []),
    ("larger", 5000), ("smaller", 800), ("larger", 0),
    ("internal", "before", datetime.date(2024, 3, 1)),
    ("internal", "on", datetime.date(2024, 2, 10)),
    ("internal", "since", datetime.date(2024, 2, 20)),
    ("sent", "before", datetime.date(2024, 1, 1)),
    ("sent", "since", datetime.date(2020, 1, 1)),
    ("sent", "on", datetime.date(2024, 5, 17)),
    ("header", "subject", "report"), ("header", "Subject", "REPORT"),
    ("header", "from", "example"), ("header", "to", "@"), ("header", "cc", ""),
    ("header", "x-nothing", ""), ("header", "message-id", "<"),
    ("header", "subject", "é"), ("header", "subject", "ü"),
    ("body", "hello"), ("body", "HELLO"), ("body", "lorem"), ("body", "x"),
    ("body", "é"), ("body", "Grüße"), ("body", "quoted-printable"),
    ("text", "example"), ("text", "subject"), ("text", "zz"), ("text", "hello world"),
    ("or", ("flag", F.SEEN, True), ("body", "hello")),
    ("not", ("or", ("larger", 2000), ("keyword", "$Work", True))),
    ("and", [("flag", F.SEEN, False), ("not", ("header", "subject", "x")), ("smaller", 100000)]),
    ("and", []),
    ("modseq", 50),
]


@pytest_twisted.ensureDeferred
async def test_every_key_matches_the_reference(account):
    rng = random.Random(7)
    messages = []
    for name, raw in corpus():
        bits = rng.choice([0, F.SEEN, F.SEEN | F.FLAGGED, F.DELETED, F.ANSWERED, F.DRAFT])
        keywords = rng.choice([[], ["$Work"], ["$work", "other"]])
        flags = [n for n, b in F.SYSTEM.values() if bits & b] + keywords
        tz = rng.choice(TZ)
        when = int(datetime.datetime(2024, 2, 1, tzinfo=datetime.timezone.utc).timestamp()) + rng.randrange(0, 40 * 86400)
        _, uid = await account.append("INBOX", raw, flags=flags, internal_date=when, tz_minutes=tz)
        zone = datetime.timezone(datetime.timedelta(minutes=tz))
        m = {"uid": uid, "raw": raw, "bits": bits, "keywords": F.normalize(keywords),
             "internal_day": datetime.datetime.fromtimestamp(when, zone).date().toordinal(),
             **describe(raw)}
        messages.append(m)
    view = await account.select("INBOX")
    metas = await view.meta(view.uids)
    for m, meta in zip(messages, metas):
        m["modseq"] = meta.modseq
    contents = await account.store.read(lambda q: dict(q.execute("SELECT doc_id, sent_day FROM contents")))
    for m, meta in zip(messages, metas):
        m["sent_day"] = contents[meta.content]
    assert any(m["sent_day"] for m in messages)
    for query in QUERIES:
        got = await view.search(query)
        want = [m["uid"] for m in messages if reference(query, m)]
        assert got == want, query
    # The queries are not vacuous: most select something and something is left out.
    counts = [len(await view.search(q)) for q in QUERIES]
    assert sum(1 for c in counts if 0 < c < len(messages)) > len(QUERIES) // 2
    view.close()


@pytest_twisted.ensureDeferred
async def test_expunged_messages_leave_the_index(account):
    _, uid = await account.append("INBOX", b"Subject: unique-needle\r\n\r\nneedle in body\r\n")
    view = await account.select("INBOX")
    assert await view.search(("text", "unique-needle")) == [uid]
    await view.store_flags([uid], "add", ["\\Deleted"])
    await view.expunge()
    assert await view.search(("text", "unique-needle")) == []
    rows = await account.store.read(lambda q: (
        q.execute("SELECT count(*) FROM text_index").fetchone()[0],
        q.execute("SELECT count(*) FROM header_fields").fetchone()[0]))
    assert rows == (0, 0)
    view.close()


@pytest_twisted.ensureDeferred
async def test_unknown_key_is_a_clean_error(account):
    view = await account.select("INBOX")
    with pytest.raises(QueryError):
        await view.search(("bogus",))
    view.close()


async def _pending(account):
    return await account.store.read(lambda q: (
        q.execute("SELECT count(*) FROM text_pending").fetchone()[0],
        q.execute("SELECT count(*) FROM text_index").fetchone()[0]))


@pytest_twisted.ensureDeferred
async def test_text_search_right_after_import_sees_everything(account):
    batch = [(b"Subject: s%d\r\n\r\nbody word%d zebra\r\n" % (i, i % 7), (), None) for i in range(350)]
    account.text_indexer.close()  # no background help: the search must scan the queue
    await account.append_many("INBOX", batch)
    assert (await _pending(account))[0] == 350
    view = await account.select("INBOX")
    found = await view.search(("body", "word3 zebra"))
    assert found == [i + 1 for i in range(350) if i % 7 == 3]
    # Answered without waiting for the index: the queue is the indexer's to work off.
    assert await _pending(account) == (350, 0)
    view.close()


@pytest_twisted.ensureDeferred
async def test_text_search_over_indexed_and_queued_messages_alike(account):
    from leapmail.mail.textindex import index_batch

    def message(i):
        return (b"Subject: =?utf-8?q?K=C3=B6ln_%d?=\r\n\r\nplain %s\r\n"
                % (i, b"ZEBRA" if i % 3 == 0 else b"horse"), (), None)

    account.text_indexer.close()
    await account.append_many("INBOX", [message(i) for i in range(30)])
    await index_batch(account.store, limit=1000)  # the first 30 are indexed
    await account.append_many("INBOX", [message(i) for i in range(30, 60)])
    await account.append_many("Archive", [message(i) for i in range(60, 70)])
    assert await _pending(account) == (40, 30)
    view = await account.select("INBOX")
    zebras = [i + 1 for i in range(60) if i % 3 == 0]
    assert await view.search(("body", "zebra")) == zebras
    assert await view.search(("not", ("body", "zebra"))) == [
        i for i in range(1, 61) if i not in zebras]
    assert await view.search(("text", "köln 4")) == [5] + list(range(41, 51))
    assert await view.search(("or", ("body", "ze"), ("text", "KÖLN 59"))) == zebras + [60]
    assert await view.search(("and", [("body", "horse"), ("uid", [(30, 40)])])) == [
        u for u in range(30, 41) if u - 1 not in range(0, 60, 3)]
    view.close()


COMMENTED = (b"From: <user-from (comment)@ (comment) domain.org>\r\n"
             b"To: groupname: one@domain.org, two@domain.org;\r\n\r\nbody\r\n")


@pytest_twisted.ensureDeferred
async def test_envelope_addresses_reach_a_file_from_before_them(db_path, key):
    """Schema version 4 adds the envelope-address rows of SEARCH FROM/TO/CC/BCC; a
    file written by version 3 gets them for the mail it already holds."""
    from leapmail.mail.account import Account
    from leapmail.mail.schema import MAIL
    from leapmail.store import Store

    id_key = b"i" * 32
    store = Store.open(db_path, key, [MAIL], create=True)
    account = Account(store, id_key)
    await account.setup()
    await account.append("INBOX", COMMENTED)
    view = await account.select("INBOX")
    assert await view.search(("header", "from", "user-from@domain.org")) == [1]
    view.close()

    def back_to_version_3(txn):
        txn.execute("DELETE FROM header_fields WHERE value = 'user-from@domain.org'")
        txn.execute("DROP TABLE body_cache")  # version 5's
        txn.execute("DROP TABLE mailbox_keywords")  # version 6's
        txn.execute("UPDATE meta SET value = 3 WHERE key = 'schema.mail'")
    await store.transact(back_to_version_3)
    view = await account.select("INBOX")
    assert await view.search(("header", "from", "user-from@domain.org")) == []
    view.close()
    account.close()
    await store.close()

    store = Store.open(db_path, key, [MAIL])
    account = Account(store, id_key)
    view = await account.select("INBOX")
    assert await view.search(("header", "from", "user-from@domain.org")) == [1]
    assert await view.search(("header", "from", "comment")) == [1]
    assert await view.search(("header", "to", "groupname: one@domain.org")) == [1]
    rows = await store.read(lambda q: q.execute(
        "SELECT name, value FROM header_fields ORDER BY name, value").fetchall())
    assert rows == [
        ("from", "<user-from (comment)@ (comment) domain.org>"),
        ("from", "user-from@domain.org"),
        ("to", "groupname: one@domain.org, two@domain.org;"),
    ]
    view.close()
    account.close()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_text_indexing_resumes_after_restart(db_path, key):
    from leapmail.mail.account import Account
    from leapmail.mail.schema import MAIL
    from leapmail.store import Store

    id_key = b"i" * 32
    store = Store.open(db_path, key, [MAIL], create=True)
    account = Account(store, id_key)
    account.text_indexer.close()
    await account.setup()
    await account.append_many(
        "INBOX", [(b"Subject: x%d\r\n\r\nresumable text\r\n" % i, (), None) for i in range(120)])
    assert (await _pending(account))[0] == 120
    account.close()
    await store.close()

    store = Store.open(db_path, key, [MAIL])
    account = Account(store, id_key)  # kicks the indexer: it works without any search
    done = defer.Deferred()

    async def wait_until_indexed():
        while (await _pending(account))[0]:
            await account.store.transact(lambda txn: None)  # let queued batches commit
        done.callback(None)

    defer.ensureDeferred(wait_until_indexed())
    await done
    assert await _pending(account) == (0, 120)
    view = await account.select("INBOX")
    assert len(await view.search(("text", "resumable"))) == 120
    view.close()
    account.close()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_indexing_keeps_up_with_a_stream_of_single_appends(account):
    from leapmail.mail.textindex import BATCH

    # A stream of single APPENDs never pauses: after BATCH of them indexing starts
    # at once (checked as the APPEND returns, before any indexing job could finish).
    for i in range(BATCH - 1):
        await account.append("INBOX", b"Subject: single %d\r\n\r\nsingle text\r\n" % i)
        assert not account.text_indexer.active
    await account.append("INBOX", b"Subject: last\r\n\r\nsingle text\r\n")
    assert account.text_indexer.active
    view = await account.select("INBOX")
    assert len(await view.search(("text", "single text"))) == BATCH
    view.close()


@pytest_twisted.ensureDeferred
async def test_indexing_waits_for_a_bulk_import_to_pause(account):
    from leapmail.mail.textindex import BATCH

    await account.append_many(
        "INBOX", [(b"Subject: bulk %d\r\n\r\nbulk text\r\n" % i, (), None)
                  for i in range(2 * BATCH)])
    assert not account.text_indexer.active
    view = await account.select("INBOX")
    assert len(await view.search(("body", "bulk text"))) == 2 * BATCH
    view.close()


@pytest_twisted.ensureDeferred
async def test_keywords_of_a_file_from_before_their_list_get_one(db_path, key):
    """Schema version 6 keeps each mailbox's keywords in order of first appearance; a
    file written by version 5 gets the list from the messages it holds (UID order)."""
    from leapmail.mail.account import Account
    from leapmail.mail.schema import MAIL
    from leapmail.store import Store

    id_key = b"i" * 32
    store = Store.open(db_path, key, [MAIL], create=True)
    account = Account(store, id_key)
    await account.setup()
    for i in range(2):
        await account.append("INBOX", b"Subject: %d\r\n\r\nx\r\n" % i)
    view = await account.select("INBOX")
    await account.change_flags(view.info.id, [1], "add", ["Zeta", "Alpha"])
    await account.change_flags(view.info.id, [2], "add", ["beta", "zeta"])
    view.close()

    def back_to_version_5(txn):
        txn.execute("DROP TABLE mailbox_keywords")
        txn.execute("UPDATE meta SET value = 5 WHERE key = 'schema.mail'")
    await store.transact(back_to_version_5)
    account.close()
    await store.close()

    store = Store.open(db_path, key, [MAIL])
    account = Account(store, id_key)
    view = await account.select("INBOX")
    assert (await view.overview())["keywords"] == ["Zeta", "Alpha", "beta"]
    assert [m.flags for m in await view.meta([1, 2])] == [("Zeta", "Alpha"), ("Zeta", "beta")]
    view.close()
    account.close()
    await store.close()
