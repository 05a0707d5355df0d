"""Several sessions on one mailbox, pipelining, and what bad input does to a session.

RFC 3501 7.4.1 is the rule for news from elsewhere: EXPUNGE may be sent with any
command except FETCH, STORE and SEARCH (UID variants excepted) and at once while in
IDLE (RFC 2177); EXISTS and FETCH FLAGS may come at any time.  After every step the
session that hears the news checks that its sequence numbers still agree with the
server's (``Known``).  IDLE news is waited for with the socket timeout as the only
deadline: no sleeps.
"""

import random
import socket

import pytest_twisted

from dovecot import fetch_items
from imap_support import in_thread
from test_imap_clients import CRLF, M1, M2, M3, M4, Wire, lines

APPENDLIMIT = 67108864
SYSTEM = b"\\Answered \\Flagged \\Deleted \\Seen \\Draft"


class Known:
    """What a client knows of its selected mailbox: UIDs by sequence number (None
    for a message announced by EXISTS whose UID it has not fetched yet).

    ``apply`` follows the untagged responses a session receives and fails on any
    that contradicts what the client knows (a FETCH naming a UID at another sequence
    number, EXISTS shrinking, an EXPUNGE past the end).
    """

    def __init__(self, uids=()):
        self.uids = list(uids)

    def apply(self, untagged):
        for response in untagged:
            parts = response.split(b" ", 3)
            if len(parts) < 3 or parts[0] != b"*" or not parts[1].isdigit():
                continue
            n = int(parts[1])
            if parts[2] == b"EXISTS":
                assert n >= len(self.uids), ("EXISTS shrank", n, self.uids)
                self.uids.extend([None] * (n - len(self.uids)))
            elif parts[2] == b"EXPUNGE":
                assert 1 <= n <= len(self.uids), ("EXPUNGE out of range", n, self.uids)
                del self.uids[n - 1]
            elif parts[2] == b"FETCH":
                assert 1 <= n <= len(self.uids), ("FETCH out of range", response, self.uids)
                items = fetch_items(parts[3])
                if b"UID" in items:
                    if self.uids[n - 1] is None:
                        self.uids[n - 1] = items[b"UID"]
                    assert self.uids[n - 1] == items[b"UID"], (response, self.uids)

    def run(self, w, text):
        status, untagged = w.run(text)
        self.apply(untagged)
        return status, untagged

    def check(self, w, expected):
        """``FETCH 1:* UID`` agrees with what the client knows, and that is ``expected``
        (the messages this client has been told about, expunged ones included until it
        has been told)."""
        status, untagged = self.run(w, b"FETCH 1:* (UID)")
        assert status == b"OK", status
        assert self.uids == list(expected), (self.uids, expected)
        assert not any(u.split()[2:3] == [b"EXPUNGE"] for u in untagged), untagged


def expunges(untagged):
    return [u for u in untagged if u.endswith(b" EXPUNGE")]


def setup_inbox(server, messages):
    """Append ``messages`` to INBOX; return (A, B) both with INBOX selected, A first."""
    a = Wire(server)
    for m in messages:
        status, _ = a.append(b"INBOX", m)
        assert status.startswith(b"OK [APPENDUID ")
    assert a.run(b"SELECT INBOX")[0] == b"OK [READ-WRITE]"
    b = Wire(server)
    assert b.run(b"SELECT INBOX")[0] == b"OK [READ-WRITE]"
    return a, b


def start_idle(w):
    tag = w.next_tag()
    w.send(tag + b" IDLE\r\n")
    line = w.raw.line()
    assert line.startswith(b"+ "), line
    return tag


def stop_idle(w, tag):
    w.send(b"DONE\r\n")
    return w.collect(tag)


# -- news from other sessions ---------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_idle_hears_exists_flags_and_expunge_at_once(imap_server):
    def body():
        a, b = setup_inbox(imap_server, [M1, M2, M3])
        known = Known([1, 2, 3])
        known.check(b, [1, 2, 3])
        tag = start_idle(b)

        # APPEND elsewhere: "* 4 EXISTS" (and RECENT) while idling.
        status, _ = a.append(b"INBOX", M4)
        assert status.startswith(b"OK [APPENDUID ")
        assert b.read_response() == b"* 4 EXISTS"
        recent = b.read_response()
        assert recent.startswith(b"* ") and recent.endswith(b" RECENT"), recent
        known.apply([b"* 4 EXISTS"])

        # STORE elsewhere: a keyword new to the mailbox, so its FLAGS first (RFC 3501
        # 7.2.6, as Dovecot), then an untagged FETCH with the new flags.
        assert a.run(b"STORE 2 +FLAGS (\\Flagged $Urgent)")[0] == b"OK"
        assert b.read_response() == b"* FLAGS (" + SYSTEM + b" $Urgent)"
        assert b.read_response() == (b"* OK [PERMANENTFLAGS (" + SYSTEM
                                     + b" $Urgent \\*)] Flags permitted.")
        news = b.read_response()
        assert news.startswith(b"* 2 FETCH ("), news
        items = fetch_items(news.split(b" ", 3)[3])
        assert sorted(items[b"FLAGS"]) == [b"$Urgent", b"\\Flagged"]
        assert items.get(b"UID", 2) == 2
        assert set(items) <= {b"UID", b"FLAGS", b"MODSEQ"}
        known.apply([news])

        # EXPUNGE elsewhere: "* 1 EXPUNGE" at once, while still idling.
        assert a.run(b"STORE 1 +FLAGS.SILENT (\\Deleted)") == (b"OK", [])
        news = b.read_response()
        assert news.startswith(b"* 1 FETCH ("), news  # the \Deleted flag first
        assert fetch_items(news.split(b" ", 3)[3])[b"FLAGS"] == [b"\\Deleted"]
        assert a.run(b"EXPUNGE") == (b"OK", [b"* 1 EXPUNGE", b"* 3 RECENT"])
        assert b.read_response() == b"* 1 EXPUNGE"
        known.apply([b"* 1 EXPUNGE"])

        assert stop_idle(b, tag) == (b"OK", [])
        known.check(b, [2, 3, 4])
        # And A's numbering is the same.
        Known([2, 3, 4]).check(a, [2, 3, 4])
        a.close()
        b.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_expunge_waits_for_a_command_that_may_carry_it(imap_server):
    """RFC 3501 7.4.1: "An EXPUNGE response MUST NOT be sent when no command is in
    progress, nor while responding to a FETCH, STORE, or SEARCH command" - the UID
    variants may carry it, NOOP must."""
    def body():
        a, b = setup_inbox(imap_server, [M1, M2, M3, M4])
        known = Known([1, 2, 3, 4])
        assert a.run(b"STORE 2 +FLAGS.SILENT (\\Deleted)") == (b"OK", [])
        assert a.run(b"EXPUNGE") == (b"OK", [b"* 2 EXPUNGE", b"* 3 RECENT"])

        # B still numbers 4 messages: FETCH, STORE and SEARCH say nothing of the
        # expunge, and whatever they return uses B's numbering.
        status, untagged = known.run(b, b"FETCH 1:4 (FLAGS)")
        assert status == b"OK" and expunges(untagged) == []
        status, untagged = known.run(b, b"FETCH 4 (BODY.PEEK[HEADER.FIELDS (Date)])")
        assert status == b"OK" and expunges(untagged) == []
        date = b"Date: Mon, 01 Apr 2024 09:00:00 +0200\r\n\r\n"
        assert untagged[-1] == (b"* 4 FETCH (BODY[HEADER.FIELDS (DATE)] {%d}\r\n%s)"
                                % (len(date), date))
        status, untagged = known.run(b, b"STORE 3 +FLAGS (\\Seen)")
        assert status == b"OK" and expunges(untagged) == []
        assert [u for u in untagged if b"FETCH" in u] == [b"* 3 FETCH (FLAGS (\\Seen))"]
        status, untagged = known.run(b, b"SEARCH ALL")
        assert status == b"OK" and expunges(untagged) == []
        assert untagged[-1] in (b"* SEARCH 1 3 4", b"* SEARCH 1 2 3 4")
        status, untagged = known.run(b, b"SEARCH SEEN")
        assert untagged[-1] == b"* SEARCH 3"
        known.check(b, [1, 2, 3, 4])

        # NOOP carries it.
        status, untagged = known.run(b, b"NOOP")
        assert (status, untagged) == (b"OK", [b"* 2 EXPUNGE"])
        known.check(b, [1, 3, 4])
        assert b.run(b"SEARCH SEEN") == (b"OK", [b"* SEARCH 2"])

        # A UID command may carry it (RFC 3501 7.4.1 note).  (A hears of B's \Seen.)
        a.ok(b"STORE 1 +FLAGS.SILENT (\\Deleted)")
        a.ok(b"EXPUNGE")
        status, untagged = known.run(b, b"UID FETCH 1:* (FLAGS)")
        assert status == b"OK"
        if expunges(untagged):
            assert expunges(untagged) == [b"* 1 EXPUNGE"]
        else:
            status, untagged = known.run(b, b"NOOP")
            assert untagged[-1] == b"* 1 EXPUNGE"
        known.check(b, [3, 4])

        # Other commands that may carry it: CHECK, STATUS, LIST.
        a.append(b"INBOX", M1)
        status, untagged = known.run(b, b"NOOP")
        assert untagged[0] == b"* 3 EXISTS"
        known.check(b, [3, 4, 5])
        for command in (b"CHECK", b"STATUS Archive (MESSAGES)", b'LIST "" INBOX'):
            a.ok(b"STORE 1 +FLAGS.SILENT (\\Deleted)")
            a.ok(b"EXPUNGE")
            status, untagged = known.run(b, command)
            assert status == b"OK"
            assert expunges(untagged) == [b"* 1 EXPUNGE"], (command, untagged)
        assert known.uids == []
        a.close()
        b.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_sequence_numbers_stay_coherent(imap_server):
    """Random appends, flag changes and expunges in A; B keeps up through NOOP,
    FETCH, SEARCH and IDLE and its numbering always matches the server's."""
    rng = random.Random(3501)

    def body():
        a, b = setup_inbox(imap_server, [M1, M2, M3, M4, M1, M2])
        server_uids = [1, 2, 3, 4, 5, 6]  # what A (which hears everything) sees
        next_uid = 7
        known = Known(server_uids)
        for step in range(40):
            action = rng.choice(["append", "append", "expunge", "expunge", "flags"])
            if action == "append" or not server_uids:
                status, untagged = a.append(b"INBOX", rng.choice([M1, M2, M3, M4]))
                assert status.endswith(b" %d]" % next_uid), status
                server_uids.append(next_uid)
                next_uid += 1
            elif action == "expunge":
                victims = rng.sample(server_uids, min(len(server_uids), rng.randint(1, 3)))
                uid_set = b",".join(b"%d" % u for u in victims)
                a.ok(b"UID STORE " + uid_set + b" +FLAGS.SILENT (\\Deleted)")
                untagged = a.ok(b"UID EXPUNGE " + uid_set)
                for response in untagged:
                    if response.endswith(b" EXPUNGE"):
                        del server_uids[int(response.split()[1]) - 1]
                assert not set(victims) & set(server_uids)
            else:
                uid = rng.choice(server_uids)
                a.ok(b"UID STORE %d FLAGS (\\Flagged $S%d)" % (uid, step))
            # B: commands that must not expunge, then one that brings it up to date.
            how = rng.choice(["noop", "idle", "fetch-then-noop", "search-then-noop"])
            if how == "fetch-then-noop":
                status, untagged = known.run(b, b"FETCH 1:* (FLAGS)") if known.uids else (
                    b"OK", [])
                assert expunges(untagged) == []
            elif how == "search-then-noop":
                status, untagged = known.run(b, b"SEARCH FLAGGED")
                assert status == b"OK" and expunges(untagged) == []
            if how == "idle":
                tag = start_idle(b)
                status, untagged = stop_idle(b, tag)
                known.apply(untagged)
                assert status == b"OK"
            status, untagged = known.run(b, b"NOOP")
            assert status == b"OK"
            assert known.uids == server_uids or None in known.uids, (step, known.uids)
            if server_uids:
                known.check(b, server_uids)
        a.close()
        b.close()

    await in_thread(body)


# -- pipelining -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_pipelined_commands_answer_in_order(imap_server):
    """Commands sent together are answered one after another, in order, also after a
    command that waits on the store (twisted#9282), and with a LITERAL+ in the
    middle."""
    def body():
        w = Wire(imap_server)
        for m in (M1, M2):
            w.append(b"INBOX", m)
        message = lines(b"Subject: pipelined", b"", b"body")
        batch = (
            b"p1 SELECT INBOX\r\n"
            b"p2 FETCH 1 (FLAGS)\r\n"
            b"p3 APPEND INBOX (\\Flagged) {%d+}\r\n" % len(message) + message + b"\r\n"
            b"p4 NOOP\r\n"
            b"p5 SEARCH SUBJECT pipelined\r\n"
            b"p6 STORE 1 +FLAGS (\\Seen)\r\n"
            b"p7 UID FETCH 1:* (UID FLAGS)\r\n"
            b"p8 STATUS Archive (MESSAGES)\r\n"
            b"p9 SEARCH CHARSET UTF-8 TEXT {4+}\r\nlazy\r\n"
            b"p10 COPY 1:2 Archive\r\n"
            b"p11 STATUS Archive (MESSAGES)\r\n"
            b"p12 LOGOUT\r\n"
        )
        w.send(batch)
        answers = []
        for i in range(1, 13):
            answers.append(w.collect(b"p%d" % i))
        statuses = [s for s, _ in answers]
        assert statuses[0] == b"OK [READ-WRITE]"
        assert statuses[2].startswith(b"OK [APPENDUID ") and statuses[2].endswith(b" 3]")
        assert statuses[9].startswith(b"OK [COPYUID ")
        assert all(s.startswith(b"OK") for s in statuses), statuses
        assert answers[1][1] == [b"* 1 FETCH (FLAGS (\\Recent))"]
        assert b"* 3 EXISTS" in answers[2][1] + answers[3][1]
        assert answers[4][1][-1] == b"* SEARCH 3"
        assert answers[5][1] == [b"* 1 FETCH (FLAGS (\\Seen \\Recent))"]
        assert answers[6][1] == [
            b"* 1 FETCH (UID 1 FLAGS (\\Seen \\Recent))",
            b"* 2 FETCH (UID 2 FLAGS (\\Recent))",
            b"* 3 FETCH (UID 3 FLAGS (\\Flagged \\Recent))"]
        assert answers[7][1] == [b"* STATUS Archive (MESSAGES 0)"]
        assert answers[8][1] == [b"* SEARCH 1"]
        assert answers[10][1] == [b"* STATUS Archive (MESSAGES 2)"]
        assert answers[11][1] == [b"* BYE"]
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_many_pipelined_appends_and_fetches(imap_server):
    """More commands than the server reads ahead of the running one."""
    def body():
        w = Wire(imap_server)
        w.ok(b"SELECT INBOX")
        batch = bytearray()
        for i in range(1, 201):
            message = lines(b"Subject: number %d" % i, b"", b"x" * i)
            batch += b"a%d APPEND INBOX {%d+}\r\n" % (i, len(message)) + message + CRLF
            batch += b"f%d UID FETCH %d (RFC822.SIZE)\r\n" % (i, i)
        w.send(bytes(batch))
        for i in range(1, 201):
            status, _ = w.collect(b"a%d" % i)
            assert status.endswith(b" %d]" % i), status
            status, untagged = w.collect(b"f%d" % i)
            assert status == b"OK"
            size = len(lines(b"Subject: number %d" % i, b"", b"x" * i))
            assert untagged[-1] == b"* %d FETCH (UID %d RFC822.SIZE %d)" % (i, i, size)
        w.close()

    await in_thread(body)


# -- bad input ------------------------------------------------------------------------------

def still_works(w):
    assert w.run(b"NOOP") == (b"OK", [])


@pytest_twisted.ensureDeferred
async def test_overlong_line_is_bad_and_the_session_goes_on(imap_server):
    def body():
        w = Wire(imap_server)
        w.append(b"INBOX", M1)
        w.ok(b"SELECT INBOX")
        # A command line over 64 KiB (no literal): tagged BAD, the rest is discarded.
        w.send(b"long1 SEARCH SUBJECT " + b"x" * (70 * 1024) + CRLF)
        status, untagged = w.collect(b"long1")
        assert status.startswith(b"BAD") and untagged == []
        still_works(w)
        # Much longer, in several writes.
        w.send(b"long2 FETCH 1 (BODY.PEEK[HEADER.FIELDS (")
        for _ in range(20):
            w.send(b"X-Field " * 8192)
        w.send(b")])\r\n")
        status, untagged = w.collect(b"long2")
        assert status.startswith(b"BAD") and untagged == []
        still_works(w)
        # A line just under the limit is fine, and the line after a literal counts on
        # its own.
        items = b"(" + b"MESSAGES " * 7000 + b"UIDNEXT)"
        assert len(items) > 60 * 1024
        assert w.run(b"STATUS INBOX " + items) == (
            b"OK", [b"* STATUS INBOX (MESSAGES 1 UIDNEXT 2)"])
        assert w.run(b"STATUS {5+}\r\nINBOX " + items) == (
            b"OK", [b"* STATUS INBOX (MESSAGES 1 UIDNEXT 2)"])
        assert w.run(b"FETCH 1 (RFC822.SIZE)") == (b"OK", [b"* 1 FETCH (RFC822.SIZE %d)"
                                                          % len(M1)])
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_long_search_strings_within_the_line_limit(imap_server):
    """A valid SEARCH with long strings (a 60 KiB line, 60 KB literals) is answered
    like any other - Dovecot: "* SEARCH" and OK - not with an internal error."""
    def body():
        w = Wire(imap_server)
        w.append(b"INBOX", M1)
        w.ok(b"SELECT INBOX")
        assert w.run(b"SEARCH SUBJECT " + b"y" * (60 * 1024)) == (b"OK", [b"* SEARCH"])
        assert w.run(b"SEARCH BODY " + b"y" * (60 * 1024)) == (b"OK", [b"* SEARCH"])
        assert w.run(b"SEARCH TEXT {60000+}\r\n" + b"y" * 60000) == (b"OK", [b"* SEARCH"])
        assert w.run(b"SEARCH HEADER X-Long {60000+}\r\n" + b"y" * 60000) == (
            b"OK", [b"* SEARCH"])
        # Many keys (Dovecot: fine).
        assert w.run(b"SEARCH" + b" UID 1" * 10240) == (b"OK", [b"* SEARCH 1"])
        assert w.run(b"SEARCH" + b" OR UID 1 UID 2" * 2000 + b" ALL") == (
            b"OK", [b"* SEARCH 1"])
        # A long string that does match.
        long_subject = b"Subject: " + b"q" * 50000
        w.append(b"INBOX", lines(long_subject, b"", b"body"))
        assert w.run(b"SEARCH SUBJECT " + b"q" * 50000) == (b"OK", [b"* SEARCH 2"])
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_append_over_appendlimit_is_toobig(imap_server):
    def body():
        w = Wire(imap_server)
        _, untagged = w.run(b"STATUS INBOX (MESSAGES UIDNEXT)")
        before = untagged
        # Synchronizing literal: refused instead of "+", nothing more is expected.
        w.send(b"big1 APPEND INBOX {%d}\r\n" % (APPENDLIMIT + 1))
        status, untagged = w.collect(b"big1")
        assert (status, untagged) == (b"NO [TOOBIG]", [])
        still_works(w)
        # LITERAL+: the client sends the literal anyway; the server answers NO [TOOBIG]
        # and swallows it, and the bytes are never taken for commands.
        w.send(b"big2 APPEND INBOX {%d+}\r\n" % (APPENDLIMIT + 1))
        chunk = (b"x001 LOGOUT\r\n" * 5000)[:65536]
        left = APPENDLIMIT + 1
        while left:
            piece = chunk[:min(left, len(chunk))]
            w.send(piece)
            left -= len(piece)
        w.send(CRLF)
        status, untagged = w.collect(b"big2")
        assert (status, untagged) == (b"NO [TOOBIG]", [])
        still_works(w)
        # With flags and a date too.
        w.send(b'big3 APPEND INBOX (\\Seen) "01-Jan-2024 00:00:00 +0000" {%d}\r\n'
               % (APPENDLIMIT + 1))
        assert w.collect(b"big3") == (b"NO [TOOBIG]", [])
        still_works(w)
        assert w.run(b"STATUS INBOX (MESSAGES UIDNEXT)") == (b"OK", before)
        # A message within the limit still goes in, with the next UID.
        status, _ = w.append(b"INBOX", M1)
        assert status.startswith(b"OK [APPENDUID ") and status.endswith(b" 1]")
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_bad_commands_get_bad_and_the_session_goes_on(imap_server):
    def body():
        w = Wire(imap_server)
        # Before SELECT: selected-state commands are BAD.
        for command in (b"FETCH 1 FLAGS", b"UID FETCH 1 FLAGS", b"STORE 1 +FLAGS (\\Seen)",
                        b"SEARCH ALL", b"EXPUNGE", b"CLOSE", b"COPY 1 Archive", b"MOVE 1 Trash",
                        b"CHECK", b"UNSELECT"):
            status, untagged = w.run(command)
            assert status.startswith(b"BAD") and untagged == [], (command, status)
            still_works(w)
        for m in (M1, M2, M3):
            w.append(b"INBOX", m)
        w.ok(b"SELECT INBOX")
        # Binary junk: no usable tag, so an untagged BAD.
        w.send(b"\x00\xff\xfe\x80junk \x01\x02\r\n")
        assert w.read_response().startswith(b"* BAD")
        still_works(w)
        # Junk after a good tag: tagged BAD.
        assert w.run(b"\xff\xfe\x00 \x80")[0].startswith(b"BAD")
        still_works(w)
        # Unknown commands, a missing command, unknown UID commands.
        for command in (b"FROB", b"FROB 1 2 3", b"", b"UID", b"UID FROB 1", b"UID COPYX 1 A",
                        b"X-UNKNOWN", b"FETCH", b"SELECT"):
            status, untagged = w.run(command)
            assert status.startswith(b"BAD") and untagged == [], (command, status)
            still_works(w)
        # Malformed sequence sets.
        for seqset in (b"0", b"1:", b"abc", b"4294967296", b"0:2", b"1,,2", b"1:2:3", b"-1",
                       b"1,", b":1", b"*:", b"1.5", b"4294967296:*"):
            for command in (b"FETCH %s FLAGS", b"UID FETCH %s FLAGS",
                            b"STORE %s +FLAGS (\\Seen)", b"COPY %s Archive",
                            b"SEARCH %s", b"UID SEARCH UID %s"):
                status, untagged = w.run(command % seqset)
                assert status.startswith(b"BAD"), (command % seqset, status)
                assert untagged == [], (command % seqset, untagged)
            still_works(w)
        # Sequence numbers past the end are BAD for FETCH (RFC 3501 6.4.8: a number
        # greater than the number of messages is invalid); UIDs past the end are not.
        assert w.run(b"FETCH 4 FLAGS")[0].startswith(b"BAD")
        assert w.run(b"FETCH 1:9 FLAGS")[0].startswith(b"BAD")
        assert w.run(b"UID FETCH 4 FLAGS") == (b"OK", [])
        still_works(w)
        # SEARCH syntax errors.
        for criteria in (b"", b"FOO", b"SINCE", b"SINCE notadate", b"SINCE 32-Jan-2024",
                         b"SINCE 1-Foo-2024", b"(ALL", b"ALL)", b"OR ALL", b"NOT", b"LARGER x",
                         b"LARGER", b"HEADER Subject", b"UID abc", b"KEYWORD", b'SUBJECT "x',
                         b"CHARSET", b"RETURN (MIN", b"RETURN (FOO) ALL", b"ALL ALL)"):
            status, untagged = w.run(b"SEARCH " + criteria)
            assert status.startswith(b"BAD"), (criteria, status)
            assert untagged == [], (criteria, untagged)
            still_works(w)
        # An unknown charset: NO [BADCHARSET (the ones we know)] (RFC 3501 6.4.4).
        assert w.run(b"SEARCH CHARSET KOI8-R SUBJECT x") == (
            b"NO [BADCHARSET (US-ASCII UTF-8)]", [])
        assert w.run(b"UID SEARCH CHARSET X-NONE ALL") == (
            b"NO [BADCHARSET (US-ASCII UTF-8)]", [])
        assert w.run(b"SEARCH RETURN (COUNT) CHARSET KOI8-R ALL") == (
            b"NO [BADCHARSET (US-ASCII UTF-8)]", [])
        assert w.run(b"SEARCH CHARSET utf-8 SUBJECT alpha") == (b"OK", [b"* SEARCH 1"])
        # Bad arguments elsewhere.
        for command in (b"SELECT", b"SELECT INBOX extra", b"STATUS INBOX", b"STATUS INBOX MESSAGES",
                        b"CREATE", b"RENAME INBOX", b"FETCH 1 (FLAGS", b"FETCH 1 FLAGS)",
                        b"FETCH 1 BODY[HEADER", b"FETCH 1 BODY[]<1>", b"FETCH 1 BODY[]<a.b>",
                        b"STORE 1 +FLAGS", b"STORE 1 FLAGS (\\Seen", b"LIST", b'LIST ""',
                        b"LOGIN a b", b"NOOP extra", b"CAPABILITY extra"):
            status, untagged = w.run(command)
            assert status.startswith(b"BAD"), (command, status)
            still_works(w)
        # The selected mailbox survived all of it.
        assert w.run(b"FETCH 1:* (UID)") == (b"OK", [
            b"* 1 FETCH (UID 1)", b"* 2 FETCH (UID 2)", b"* 3 FETCH (UID 3)"])
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_too_many_bad_commands_close_the_connection(imap_server):
    def body():
        w = Wire(imap_server)
        for _ in range(200):
            try:
                status, untagged = w.run(b"FROB")
            except (EOFError, ConnectionError):
                break
            assert status.startswith(b"BAD")
        else:
            raise AssertionError("200 bad commands in a row and the connection is still open")
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_disconnect_in_the_middle_of_an_append_literal(imap_server):
    def body():
        watcher = Wire(imap_server)
        watcher.append(b"INBOX", M1)
        _, before = watcher.run(b"STATUS INBOX (MESSAGES UIDNEXT)")
        assert before == [b"* STATUS INBOX (MESSAGES 1 UIDNEXT 2)"]
        watcher.ok(b"SELECT INBOX")
        idle_tag = start_idle(watcher)

        message = lines(b"Subject: never finished", b"", b"x" * 5000)
        # LITERAL+: half of the literal, then the client is gone.
        quitter = Wire(imap_server)
        quitter.send(b"q1 APPEND INBOX {%d+}\r\n" % len(message) + message[:2500])
        quitter.raw.sock.shutdown(socket.SHUT_RDWR)
        quitter.close()
        # Synchronizing literal: "+", half, gone.
        quitter = Wire(imap_server)
        quitter.send(b"q1 APPEND INBOX (\\Seen) {%d}\r\n" % len(message))
        assert quitter.raw.line().startswith(b"+")
        quitter.send(message[:100])
        quitter.close()
        # Gone right after the literal's announcement.
        quitter = Wire(imap_server)
        quitter.send(b"q1 APPEND INBOX {%d+}\r\n" % len(message))
        quitter.close()

        # A new session, after a few round trips that let the server see every close.
        other = Wire(imap_server)
        for _ in range(5):
            still_works(other)
        assert other.run(b"STATUS INBOX (MESSAGES UIDNEXT)") == (b"OK", before)
        _, untagged = other.run(b"EXAMINE INBOX")
        assert b"* 1 EXISTS" in untagged and b"* OK [UIDNEXT 2]" in untagged
        # The idling session heard nothing of it and is fine; its next news is a real
        # APPEND, with the next UID.
        status, _ = other.append(b"INBOX", M2)
        assert status.endswith(b" 2]"), status
        assert watcher.read_response() == b"* 2 EXISTS"
        assert watcher.read_response().endswith(b" RECENT")
        assert stop_idle(watcher, idle_tag) == (b"OK", [])
        assert watcher.run(b"FETCH 1:* (UID RFC822.SIZE)") == (b"OK", [
            b"* 1 FETCH (UID 1 RFC822.SIZE %d)" % len(M1),
            b"* 2 FETCH (UID 2 RFC822.SIZE %d)" % len(M2)])
        watcher.close()
        other.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_unauthenticated_session_cannot_do_anything(imap_server):
    def body():
        w = Wire(imap_server, login=False)
        for command in (b"SELECT INBOX", b"LIST \"\" *", b"STATUS INBOX (MESSAGES)",
                        b"CREATE X", b"NAMESPACE", b"APPEND INBOX {1+}\r\nx", b"IDLE",
                        b"FETCH 1 FLAGS", b"ENABLE QRESYNC"):
            status, untagged = w.run(command)
            assert status.startswith(b"BAD"), (command, status)
        # ID, NOOP, CAPABILITY are fine; LOGOUT too.
        assert w.run(b"NOOP") == (b"OK", [])
        assert w.run(b"ID NIL")[0] == b"OK"
        assert w.run(b"LOGOUT") == (b"OK", [b"* BYE"])
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_news_of_one_message_is_told_once_as_it_is_now(imap_server):
    """Several flag changes elsewhere to one message between two commands come as one
    FETCH with the flags as they are then, in sequence order (as Dovecot tells them);
    UID and MODSEQ only once CONDSTORE is on (RFC 7162 3.1)."""
    def body():
        a, b = Wire(imap_server), Wire(imap_server)
        for m in (M1, M2, M3):
            a.append(b"INBOX", m)
        a.ok(b"SELECT INBOX")
        b.ok(b"SELECT INBOX")
        a.ok(b"STORE 3 +FLAGS ($One)")
        a.ok(b"STORE 1 +FLAGS (\\Flagged)")
        a.ok(b"STORE 3 +FLAGS ($Two)")
        a.ok(b"STORE 3 -FLAGS ($One)")
        # The mailbox's new keywords once, as they are now, then each message once.
        assert b.run(b"NOOP") == (b"OK", [
            b"* FLAGS (" + SYSTEM + b" $One $Two)",
            b"* OK [PERMANENTFLAGS (" + SYSTEM + b" $One $Two \\*)]",
            b"* 1 FETCH (FLAGS (\\Flagged))", b"* 3 FETCH (FLAGS ($Two))"])
        # b's own silent change is not echoed; with another change it is told, whole.
        assert b.run(b"STORE 2 +FLAGS.SILENT (\\Seen)") == (b"OK", [])
        a.ok(b"STORE 2 +FLAGS (\\Answered)")
        assert b.run(b"STORE 2 +FLAGS.SILENT (\\Draft)") == (b"OK", [
            b"* 2 FETCH (FLAGS (\\Answered \\Seen \\Draft))"])
        # ENABLE CONDSTORE with a mailbox selected says its HIGHESTMODSEQ; from then
        # on news carries UID and MODSEQ.
        status, untagged = b.run(b"ENABLE CONDSTORE")
        assert status == b"OK" and untagged[0].startswith(b"* OK [HIGHESTMODSEQ ")
        highest = int(untagged[0].split()[3].rstrip(b"]"))
        assert untagged[1:] == [b"* ENABLED CONDSTORE"]
        a.ok(b"STORE 1 -FLAGS (\\Flagged)")
        a.ok(b"STORE 1 +FLAGS ($Three)")
        assert b.run(b"NOOP") == (b"OK", [
            b"* FLAGS (" + SYSTEM + b" $One $Two $Three)",
            b"* OK [PERMANENTFLAGS (" + SYSTEM + b" $One $Two $Three \\*)]",
            b"* 1 FETCH (UID 1 MODSEQ (%d) FLAGS ($Three))" % (highest + 2)])
        a.raw.close()
        b.raw.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_fetch_uid_of_a_message_expunged_elsewhere_but_not_yet_told(imap_server):
    """imaptest's expunge script: until a command may tell the EXPUNGE, the session
    still has the message, and its UID is answered (from what the session knows)."""
    def body():
        a, b = Wire(imap_server), Wire(imap_server)
        for m in (M1, M2, M3):
            a.append(b"INBOX", m)
        a.ok(b"SELECT INBOX")
        b.ok(b"SELECT INBOX")
        a.ok(b"STORE 2 +FLAGS.SILENT (\\Deleted)")
        a.ok(b"EXPUNGE")
        assert b.run(b"FETCH 2 UID") == (b"OK", [b"* 2 FETCH (UID 2)",
                                                 b"* 2 FETCH (FLAGS (\\Deleted))"])
        assert b.run(b"FETCH 1:3 UID") == (b"OK", [b"* 1 FETCH (UID 1)", b"* 2 FETCH (UID 2)",
                                                   b"* 3 FETCH (UID 3)"])
        assert b.run(b"FETCH 2 (UID RFC822.SIZE)") == (b"OK", [])  # the rest is gone
        assert b.run(b"NOOP") == (b"OK", [b"* 2 EXPUNGE"])
        assert b.run(b"FETCH 2 UID") == (b"OK", [b"* 2 FETCH (UID 3)"])
        a.raw.close()
        b.raw.close()

    await in_thread(body)
