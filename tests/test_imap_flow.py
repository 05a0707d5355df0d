"""Flow control: a client that pipelines more than the server buffers is slowed, not
dropped, and nothing it sent is lost or reordered."""

import pytest_twisted

from imap_support import in_thread
from leapmail.imap import server as imap_server_module


class ObservedServer(imap_server_module.LeapIMAPServer):
    """The real server, noting how much it ever held queued and whether it paused."""

    most_queued = 0
    paused = False

    def _unit_read(self, unit):
        super()._unit_read(unit)
        ObservedServer.most_queued = max(ObservedServer.most_queued, self._queued_bytes)
        ObservedServer.paused |= self._reader.paused


@pytest_twisted.ensureDeferred
async def test_pipelined_literal_plus_appends_beyond_the_read_ahead_bound(imap_server):
    # 40 APPENDs of 1 MiB each with LITERAL+ (no "+" to wait for) is 2.5 times the
    # read-ahead bound: reading must pause and resume.
    assert 40 * 2**20 > 2 * imap_server_module.MAX_QUEUED_BYTES
    factory = imap_server.factory
    factory.buildProtocol = lambda addr: ObservedServer(factory, factory.context_factory)
    bodies = [b"Subject: %d\r\n\r\n" % i + bytes([65 + i % 26]) * (2**20 - 20) for i in range(40)]

    def client():
        c = imap_server.raw()
        c.send(b"".join(b"A%d APPEND INBOX {%d+}\r\n" % (i, len(body)) + body + b"\r\n"
                        for i, body in enumerate(bodies)))
        tagged = []
        while len(tagged) < 40:
            line = c.line()
            if line.startswith(b"A"):
                tagged.append(line)
        c.command(b"s", b"SELECT INBOX")
        out = c.response(b"f", b"UID FETCH 1:* (RFC822.SIZE BODY.PEEK[]<0.12>)")
        c.close()
        return tagged, out

    tagged, out = await in_thread(client)
    assert [t.split(b" ")[0] for t in tagged] == [b"A%d" % i for i in range(40)]
    assert all(b" OK [APPENDUID " in t and t.endswith(b" %d] Append completed\r\n" % (i + 1))
               for i, t in enumerate(tagged))
    for i, body in enumerate(bodies):
        assert (b"* %d FETCH (UID %d RFC822.SIZE %d BODY[]<0> {12}\r\n%s)\r\n"
                % (i + 1, i + 1, len(body), body[:12])) in out
    # Reading paused, and the queue never held more than the bound plus the one
    # command that crossed it.
    assert ObservedServer.paused
    assert ObservedServer.most_queued < imap_server_module.MAX_QUEUED_BYTES + 2**20


@pytest_twisted.ensureDeferred
async def test_status_size_is_the_sum_of_message_sizes(imap_server):
    messages = [b"Subject: a\r\n\r\nshort\r\n", b"Subject: b\r\n\r\n" + b"y" * 5000 + b"\r\n"]

    def client():
        c = imap_server.raw()
        for i, raw in enumerate(messages):
            c.command(b"a%d" % i, b"APPEND Archive {%d+}\r\n" % len(raw) + raw)
        lines = c.command(b"s", b"STATUS Archive (MESSAGES SIZE)")
        c.close()
        return lines

    assert await in_thread(client) == [
        b"* STATUS Archive (MESSAGES 2 SIZE %d)\r\n" % sum(map(len, messages)),
        b"s OK Status completed\r\n"]


@pytest_twisted.ensureDeferred
async def test_vanished_comes_before_fetches_numbered_after_it(imap_server):
    def client():
        a, b = imap_server.raw(), imap_server.raw()
        for i in range(3):
            a.command(b"p%d" % i, b"APPEND INBOX {15+}\r\nSubject: %d\r\n\r\nx" % i)
        b.command(b"e", b"ENABLE QRESYNC")
        b.command(b"s", b"SELECT INBOX")
        a.command(b"s", b"SELECT INBOX")
        a.command(b"d", b"UID STORE 2 +FLAGS.SILENT (\\Deleted)")
        a.command(b"x", b"UID EXPUNGE 2")
        a.command(b"f", b"UID STORE 3 +FLAGS.SILENT (\\Flagged)")
        lines = b.command(b"n", b"NOOP")
        a.close()
        b.close()
        return lines

    lines = await in_thread(client)
    assert [line.split(b" MODSEQ")[0] for line in lines] == [
        b"* 2 FETCH (UID 2", b"* VANISHED 2\r\n", b"* 2 FETCH (UID 3", b"* 2 RECENT\r\n",
        b"n OK NOOP completed\r\n"]


@pytest_twisted.ensureDeferred
async def test_fetch_of_contents_beyond_one_reads_budget_comes_whole_and_in_order(
        imap_server, monkeypatch):
    from leapmail.imap import fetch as fetchlib

    # Small reads, so that they stop at the byte budget, small and big messages mixed
    # (whole documents, split ones, streamed ones).
    monkeypatch.setattr(fetchlib, "CONTENT_BATCH", 7)
    monkeypatch.setattr(fetchlib, "CONTENT_BATCH_BYTES", 40_000)
    cuts = []
    within = fetchlib.within_budget

    def observed(metas, budget=None):
        keep = within(metas, budget)
        cuts.append((keep, len(metas)))
        return keep

    monkeypatch.setattr(fetchlib, "within_budget", observed)
    from leapmail.imap import server as server_module
    metas_read = []
    read_meta = server_module.read_meta

    def counted(queries, mailbox, uids, *args):
        metas_read.append(len(uids))
        return read_meta(queries, mailbox, uids, *args)

    monkeypatch.setattr(server_module, "read_meta", counted)
    sizes = [3_000, 12_000, 30_000, 300_000, 500, 20_000, 9_000, 70_000] * 4
    messages = [b"Subject: %d\r\n\r\n" % i + bytes([97 + i % 26]) * size + b"\r\n"
                for i, size in enumerate(sizes)]

    def client():
        c = imap_server.raw()
        for i, raw in enumerate(messages):
            c.command(b"a%d" % i, b"APPEND INBOX {%d+}\r\n" % len(raw) + raw)
        c.command(b"s", b"SELECT INBOX")
        everything = c.response(b"f1", b"UID FETCH 1:* (UID BODY.PEEK[])")
        some = c.response(b"f2", b"FETCH 2,5:9,13,20:* (BODY.PEEK[])")
        c.close()
        return everything, some

    everything, some = await in_thread(client)
    expected = b"".join(b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n" % (i + 1, i + 1, len(raw), raw)
                        for i, raw in enumerate(messages))
    assert everything == expected + b"f1 OK Fetch completed\r\n"
    wanted = [2, *range(5, 10), 13, *range(20, len(messages) + 1)]
    assert some == b"".join(
        b"* %d FETCH (BODY[] {%d}\r\n%s)\r\n" % (n, len(messages[n - 1]), messages[n - 1])
        for n in wanted) + b"f2 OK Fetch completed\r\n"
    assert any(keep < total for keep, total in cuts)  # reads did stop at the budget
    # The metadata of what a read had no room for is carried, not read again.
    assert sum(metas_read) == len(messages) + len(wanted)


@pytest_twisted.ensureDeferred
async def test_fetch_of_flags_alone_gives_the_bytes_of_the_general_path(imap_server,
                                                                       monkeypatch):
    """FETCH of FLAGS (with UID, MODSEQ) has its own lean read and rendering: the same
    bytes as the general path, \\Recent, keywords in mailbox order and all."""
    from leapmail.imap import fetch as fetchlib
    from leapmail.imap import server as server_module

    lean = []
    read_flags = server_module.read_flags

    def counted(queries, mailbox, uids):
        lean.append(len(uids))
        return read_flags(queries, mailbox, uids)

    monkeypatch.setattr(server_module, "read_flags", counted)
    commands = [b"FETCH 1:* (FLAGS)", b"UID FETCH 1:* (FLAGS)", b"FETCH 1:* (FLAGS UID)",
                b"FETCH 2,4,9,30 FLAGS", b"UID FETCH 5:20 (MODSEQ FLAGS)",
                b"FETCH 3:7 (UID MODSEQ FLAGS)"]

    def client():
        c = imap_server.raw()
        for i in range(30):
            raw = b"Subject: %d\r\n\r\nx" % i
            c.command(b"a%d" % i, b"APPEND INBOX {%d+}\r\n%s" % (len(raw), raw))
        c.command(b"s", b"SELECT INBOX")  # \Recent for this session
        c.command(b"k1", b"STORE 3:9 +FLAGS (Zeta \\Seen)")
        c.command(b"k2", b"STORE 5,7,30 +FLAGS (alpha $Label1 \\Flagged)")
        c.command(b"k3", b"STORE 8 FLAGS (ZETA \\Answered \\Deleted \\Draft)")
        out = [[c.response(b"p", b"FETCH 1:3 (FLAGS)")]]  # before CONDSTORE: no MODSEQ
        c.command(b"e", b"ENABLE CONDSTORE")
        for fast in (True, False):
            if not fast:
                monkeypatch.setattr(fetchlib, "flags_only", lambda items: False)
            out.append([c.response(b"f%d" % i, command) for i, command in enumerate(commands)])
        c.close()
        return out

    plain, fast, general = await in_thread(client)
    assert fast == general
    assert plain == [b"* 1 FETCH (FLAGS (\\Recent))\r\n* 2 FETCH (FLAGS (\\Recent))\r\n"
                     b"* 3 FETCH (FLAGS (\\Seen \\Recent Zeta))\r\np OK Fetch completed\r\n"]
    assert b"* 8 FETCH (FLAGS (\\Answered \\Deleted \\Draft \\Recent Zeta))\r\n" in fast[0]
    assert b"* 5 FETCH (UID 5 MODSEQ (" in fast[4]
    assert sum(lean) == 3 + 30 + 30 + 30 + 4 + 16 + 5
