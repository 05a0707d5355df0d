"""CONDSTORE and QRESYNC (RFC 7162) over the wire.

Mod-sequences are compared with each other, never with constants: the server picks
the numbers, the RFC fixes how they relate (positive, growing with every change,
HIGHESTMODSEQ the largest of them).
"""

import re
import pytest_twisted

from dovecot import fetch_items
from imap_support import in_thread
from test_imap_clients import M1, M2, M3, M4, Wire, code_value, fetch_map
from test_imap_sessions import Known, start_idle, stop_idle
SYSTEM = b"\\Answered \\Flagged \\Deleted \\Seen \\Draft"


def highestmodseq(untagged):
    return int(code_value(untagged, b"HIGHESTMODSEQ"))


def modseq_of(items):
    value = items[b"MODSEQ"]
    assert isinstance(value, list) and len(value) == 1 and isinstance(value[0], int), value
    assert value[0] >= 1
    return value[0]


def fetch_lines(untagged):
    return [u for u in untagged if u.split(b" ", 3)[2:3] == [b"FETCH"]]


def uid_set(text):
    """A sequence set without "*" as a sorted list of numbers."""
    out = []
    for part in text.split(b","):
        low, _, high = part.partition(b":")
        out.extend(range(int(low), int(high or low) + 1))
    return sorted(out)


class KnownUIDs(Known):
    """:class:`Known` that also follows ``* VANISHED`` (without EARLIER)."""

    def apply(self, untagged):
        for response in untagged:
            if response.startswith(b"* VANISHED ") and not response.startswith(
                    b"* VANISHED (EARLIER)"):
                for uid in uid_set(response[len(b"* VANISHED "):]):
                    assert uid in self.uids, ("VANISHED for an unknown UID", uid, self.uids)
                    self.uids.remove(uid)
            else:
                super().apply([response])


def load(w, messages, mailbox=b"INBOX"):
    for m in messages:
        status, _ = w.append(mailbox, m)
        assert status.startswith(b"OK [APPENDUID "), status


# -- enabling -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_enable_and_select_parameters(imap_server):
    def body():
        w = Wire(imap_server)
        load(w, [M1, M2])
        # QRESYNC parameters and the VANISHED modifier need ENABLE QRESYNC first.
        assert w.run(b"SELECT INBOX (QRESYNC (1 1))")[0].startswith(b"BAD")
        assert w.run(b"SELECT INBOX (BOGUS)")[0].startswith(b"BAD")
        assert w.run(b"SELECT INBOX ()")[0].startswith(b"BAD")
        w.ok(b"SELECT INBOX")
        assert w.run(b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)")[0].startswith(b"BAD")
        w.ok(b"UNSELECT")
        # ENABLE QRESYNC (RFC 7162 3.2.3: implies CONDSTORE).
        assert w.run(b"ENABLE QRESYNC") == (b"OK", [b"* ENABLED QRESYNC"])
        status, untagged = w.run(b"SELECT INBOX (CONDSTORE)")
        assert status == b"OK [READ-WRITE]"
        h = highestmodseq(untagged)
        assert h >= 1
        # CONDSTORE is on, but a FETCH of FLAGS alone is answered as asked (RFC 7162
        # 3.1 exempts it; Dovecot too); asked for MODSEQ, it comes with UID.
        assert w.run(b"FETCH 1:2 (FLAGS)") == (b"OK", [
            b"* 1 FETCH (FLAGS ())", b"* 2 FETCH (FLAGS ())"])
        _, untagged = w.run(b"FETCH 1:2 (FLAGS MODSEQ)")
        got = fetch_map(untagged)
        assert sorted(got) == [1, 2]
        assert [got[i][b"UID"] for i in (1, 2)] == [1, 2]
        assert max(modseq_of(got[i]) for i in (1, 2)) == h
        # VANISHED only in UID FETCH, only with CHANGEDSINCE.
        assert w.run(b"FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)")[0].startswith(b"BAD")
        assert w.run(b"UID FETCH 1:* (FLAGS) (VANISHED)")[0].startswith(b"BAD")
        assert w.run(b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE x)")[0].startswith(b"BAD")
        assert w.run(b"UID FETCH 1:* (FLAGS) (BOGUS 1)")[0].startswith(b"BAD")
        # Malformed QRESYNC parameters.
        for params in (b"(QRESYNC)", b"(QRESYNC ())", b"(QRESYNC (0 1))", b"(QRESYNC (1))",
                       b"(QRESYNC (1 x))", b"(QRESYNC (1 1 1:x))", b"(QRESYNC (1 1 1:2 (1:2)))"):
            assert w.run(b"SELECT INBOX " + params)[0].startswith(b"BAD"), params
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_status_highestmodseq_matches_select(imap_server):
    """STATUS HIGHESTMODSEQ is the mailbox's HIGHESTMODSEQ, the one SELECT reports: a
    mailbox with persistent mod-sequences has a positive one (RFC 7162 3.1.2.1 and 7:
    ``mod-sequence-value = 1*DIGIT ;; Positive``; 0 means "no mod-sequences").  The
    HIGHESTMODSEQ response code sent when STATUS enables CONDSTORE in the selected
    state follows the same grammar."""
    def body():
        w = Wire(imap_server)
        w.ok(b"CREATE Fresh")
        _, untagged = w.run(b"STATUS Fresh (HIGHESTMODSEQ)")
        status_value = int(untagged[-1].split()[-1][:-1])
        _, untagged = w.run(b"EXAMINE Fresh")
        select_value = highestmodseq(untagged)
        assert select_value >= 1
        assert status_value == select_value
        # After changes, both still agree.
        load(w, [M1, M2], b"Fresh")
        w.ok(b"SELECT Fresh")
        w.ok(b"STORE 1 +FLAGS (\\Seen)")
        other = Wire(imap_server)
        _, untagged = other.run(b"STATUS Fresh (HIGHESTMODSEQ)")
        status_value = int(untagged[-1].split()[-1][:-1])
        _, untagged = other.run(b"EXAMINE Fresh")
        assert status_value == highestmodseq(untagged)
        # STATUS enabling CONDSTORE while an empty mailbox is selected.
        third = Wire(imap_server)
        third.ok(b"CREATE Empty")
        _, untagged = third.run(b"EXAMINE Empty")
        empty_value = highestmodseq(untagged)
        _, untagged = third.run(b"STATUS Empty (HIGHESTMODSEQ)")
        for response in untagged:
            if response.startswith(b"* OK [HIGHESTMODSEQ "):
                assert highestmodseq([response]) == empty_value
        assert untagged[-1] == b"* STATUS Empty (HIGHESTMODSEQ %d)" % empty_value
        for c in (w, other, third):
            c.close()

    await in_thread(body)


# -- CONDSTORE: FETCH, STORE, SEARCH ----------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_fetch_changedsince(imap_server):
    def body():
        w = Wire(imap_server)
        load(w, [M1, M2, M3, M4])
        status, untagged = w.run(b"SELECT INBOX (CONDSTORE)")
        h0 = highestmodseq(untagged)
        _, untagged = w.run(b"FETCH 1:4 (MODSEQ)")
        assert len(untagged) == 4
        before = {seq: modseq_of(items) for seq, items in fetch_map(untagged).items()}
        assert max(before.values()) == h0
        for seq, line in zip((1, 2, 3, 4), untagged):
            assert line == b"* %d FETCH (UID %d MODSEQ (%d))" % (seq, seq, before[seq])

        # Our change: its FETCH carries MODSEQ, bigger than anything before.
        _, untagged = w.run(b"STORE 2 +FLAGS (\\Seen)")
        assert len(untagged) == 1
        m1 = modseq_of(fetch_map(untagged)[2])
        assert m1 > h0
        assert untagged[0] == b"* 2 FETCH (UID 2 MODSEQ (%d) FLAGS (\\Seen \\Recent))" % m1
        # A change elsewhere (by a session without CONDSTORE) arrives with MODSEQ.
        other = Wire(imap_server)
        other.ok(b"SELECT INBOX")
        # A keyword new to the mailbox: both sessions hear its FLAGS first.
        new_keyword = [b"* FLAGS (" + SYSTEM + b" $Other)",
                       b"* OK [PERMANENTFLAGS (" + SYSTEM + b" $Other \\*)]"]
        _, untagged = other.run(b"STORE 4 +FLAGS ($Other)")
        assert untagged == new_keyword + [b"* 4 FETCH (FLAGS ($Other))"]  # no MODSEQ nor UID
        _, untagged = w.run(b"NOOP")
        assert untagged[:2] == new_keyword
        untagged = untagged[2:]
        assert len(untagged) == 1
        m2 = modseq_of(fetch_map(untagged)[4])
        assert m2 > m1
        assert untagged[0] == b"* 4 FETCH (UID 4 MODSEQ (%d) FLAGS ($Other \\Recent))" % m2

        # CHANGEDSINCE: exactly what changed after the given mod-sequence, with MODSEQ.
        assert w.run(b"FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % h0) == (b"OK", [
            b"* 2 FETCH (UID 2 FLAGS (\\Seen \\Recent) MODSEQ (%d))" % m1,
            b"* 4 FETCH (UID 4 FLAGS ($Other \\Recent) MODSEQ (%d))" % m2])
        assert w.run(b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % m1) == (b"OK", [
            b"* 4 FETCH (UID 4 FLAGS ($Other \\Recent) MODSEQ (%d))" % m2])
        assert w.run(b"FETCH 1:3 (FLAGS) (CHANGEDSINCE %d)" % h0) == (b"OK", [
            b"* 2 FETCH (UID 2 FLAGS (\\Seen \\Recent) MODSEQ (%d))" % m1])
        assert w.run(b"FETCH 1:* (FLAGS) (CHANGEDSINCE %d)" % m2) == (b"OK", [])
        assert w.run(b"UID FETCH 1:* (UID) (CHANGEDSINCE %d)" % m1) == (b"OK", [
            b"* 4 FETCH (UID 4 MODSEQ (%d))" % m2])
        # CHANGEDSINCE 0: everything.
        _, untagged = w.run(b"FETCH 1:* (FLAGS) (CHANGEDSINCE 0)")
        assert sorted(fetch_map(untagged)) == [1, 2, 3, 4]

        # FETCH BODY[] sets \Seen: a new mod-sequence, reported with the FLAGS.
        _, untagged = w.run(b"FETCH 3 (BODY[HEADER.FIELDS (Subject)])")
        items = fetch_map(untagged)[3]
        m3 = modseq_of(items)
        assert m3 > m2 and b"\\Seen" in items[b"FLAGS"]
        # The news reached the other session, and HIGHESTMODSEQ moved to the top.
        _, untagged = w.run(b"SELECT INBOX")
        assert highestmodseq(untagged) == m3
        _, untagged = other.run(b"STATUS Archive (MESSAGES)")
        assert b"* 3 FETCH (FLAGS (\\Seen))" in untagged

        # A plain session turns CONDSTORE on with FETCH MODSEQ: answered with UID from
        # then on; a FETCH of FLAGS alone stays as asked (RFC 7162 3.1).
        plain = Wire(imap_server)
        plain.ok(b"SELECT INBOX")
        assert plain.run(b"FETCH 1 (FLAGS)") == (b"OK", [b"* 1 FETCH (FLAGS ())"])
        _, untagged = plain.run(b"FETCH 1 (MODSEQ)")
        assert untagged[-1] == b"* 1 FETCH (UID 1 MODSEQ (%d))" % before[1]
        assert plain.run(b"FETCH 1 (FLAGS)") == (b"OK", [b"* 1 FETCH (FLAGS ())"])
        assert plain.run(b"FETCH 1 (FLAGS MODSEQ)") == (
            b"OK", [b"* 1 FETCH (UID 1 FLAGS () MODSEQ (%d))" % before[1]])
        for c in (w, other, plain):
            c.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_store_unchangedsince(imap_server):
    def body():
        w = Wire(imap_server)
        load(w, [M1, M2, M3, M4, M1])
        _, untagged = w.run(b"SELECT INBOX (CONDSTORE)")
        h0 = highestmodseq(untagged)
        _, untagged = w.run(b"STORE 2 +FLAGS (\\Seen)")
        m1 = modseq_of(fetch_map(untagged)[2])
        # Message 2 changed after h0: the conditional STORE skips it and says so
        # (RFC 7162 3.1.3: OK [MODIFIED 2]); the others change and report MODSEQ.
        status, untagged = w.run(b"STORE 1:4 (UNCHANGEDSINCE %d) +FLAGS (\\Flagged)" % h0)
        assert status == b"OK [MODIFIED 2]"
        got = fetch_map(untagged)
        assert sorted(got) == [1, 3, 4]
        for seq in (1, 3, 4):
            assert b"\\Flagged" in got[seq][b"FLAGS"] and got[seq][b"UID"] == seq
            assert modseq_of(got[seq]) > m1
        _, untagged = w.run(b"FETCH 2 (FLAGS)")
        assert b"\\Flagged" not in fetch_map(untagged)[2][b"FLAGS"]
        # UNCHANGEDSINCE 0 always fails (3.1.3); nothing changes.
        _, untagged = w.run(b"FETCH 1:5 (MODSEQ)")
        snapshot = {s: modseq_of(i) for s, i in fetch_map(untagged).items()}
        assert w.run(b"STORE 1:5 (UNCHANGEDSINCE 0) +FLAGS (\\Deleted)") == (
            b"OK [MODIFIED 1:5]", [])
        _, untagged = w.run(b"FETCH 1:5 (FLAGS MODSEQ)")
        got = fetch_map(untagged)
        assert {s: modseq_of(i) for s, i in got.items()} == snapshot
        assert not any(b"\\Deleted" in i[b"FLAGS"] for i in got.values())
        # UNCHANGEDSINCE at the current value succeeds: no MODIFIED code.
        current = max(snapshot.values())
        status, untagged = w.run(b"STORE 5 (UNCHANGEDSINCE %d) +FLAGS ($Ok)" % current)
        assert status == b"OK"
        assert modseq_of(fetch_map(untagged)[5]) > current

        # Make UIDs differ from sequence numbers, then: UID STORE names UIDs in
        # MODIFIED, STORE names sequence numbers.
        w.ok(b"STORE 1 +FLAGS.SILENT (\\Deleted)")
        w.ok(b"EXPUNGE")  # seq 1..4 = UID 2..5
        other = Wire(imap_server)
        other.ok(b"SELECT INBOX")
        _, untagged = w.run(b"NOOP")
        x = max(modseq_of(i) for i in fetch_map(w.run(b"FETCH 1:4 (MODSEQ)")[1]).values())
        other.ok(b"UID STORE 3 +FLAGS ($Changed)")
        status, untagged = w.run(b"UID STORE 2:5 (UNCHANGEDSINCE %d) +FLAGS ($Done)" % x)
        assert status == b"OK [MODIFIED 3]"
        done = fetch_map(untagged)
        # (The news of UID 3's change may come along; our own changes surely do.)
        assert sorted(s for s, i in done.items() if b"$Done" in i[b"FLAGS"]) == [1, 3, 4]
        assert all(done[s][b"UID"] == s + 1 for s in done)
        x = max(modseq_of(i) for i in fetch_map(w.run(b"FETCH 1:4 (MODSEQ)")[1]).values())
        other.ok(b"UID STORE 4 +FLAGS ($Again)")
        status, untagged = w.run(b"STORE 1:4 (UNCHANGEDSINCE %d) -FLAGS ($Done)" % x)
        assert status == b"OK [MODIFIED 3]"  # UID 4 is sequence number 3
        # Syntax.
        assert w.run(b"STORE 1 (UNCHANGEDSINCE) +FLAGS (\\Seen)")[0].startswith(b"BAD")
        assert w.run(b"STORE 1 (UNCHANGEDSINCE x) +FLAGS (\\Seen)")[0].startswith(b"BAD")
        assert w.run(b"STORE 1 (BOGUS 1) +FLAGS (\\Seen)")[0].startswith(b"BAD")
        w.close()
        other.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_conditional_store_silent_still_reports_modseq(imap_server):
    """RFC 7162 3.1.3: "If the operation is successful, the server MUST update the
    mod-sequence attribute of the message.  An untagged FETCH response MUST be sent,
    even if the .SILENT suffix is specified, and the response MUST include the MODSEQ
    message data item.\""""
    def body():
        w = Wire(imap_server)
        load(w, [M1, M2])
        _, untagged = w.run(b"SELECT INBOX (CONDSTORE)")
        h = highestmodseq(untagged)
        status, untagged = w.run(b"STORE 1 (UNCHANGEDSINCE %d) +FLAGS.SILENT (\\Answered)" % h)
        assert status == b"OK"
        assert len(untagged) == 1 and untagged[0].startswith(b"* 1 FETCH ("), untagged
        items = fetch_items(untagged[0].split(b" ", 3)[3])
        assert items[b"UID"] == 1 and modseq_of(items) > h
        status, untagged = w.run(b"UID STORE 2 (UNCHANGEDSINCE %d) FLAGS.SILENT ($A)" % h)
        assert status == b"OK"
        assert untagged[:2] == [b"* FLAGS (" + SYSTEM + b" $A)",  # a new keyword
                                b"* OK [PERMANENTFLAGS (" + SYSTEM + b" $A \\*)]"]
        untagged = untagged[2:]
        assert len(untagged) == 1 and untagged[0].startswith(b"* 2 FETCH ("), untagged
        assert modseq_of(fetch_items(untagged[0].split(b" ", 3)[3])) > h
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_search_modseq(imap_server):
    def body():
        w = Wire(imap_server)
        load(w, [M1, M2, M3, M4])
        _, untagged = w.run(b"SELECT INBOX (CONDSTORE)")
        h0 = highestmodseq(untagged)
        _, untagged = w.run(b"STORE 2 +FLAGS (\\Seen)")
        m2 = modseq_of(fetch_map(untagged)[2])
        _, untagged = w.run(b"STORE 4 +FLAGS (\\Draft)")
        m4 = modseq_of(fetch_map(untagged)[4])
        # MODSEQ n: messages with a mod-sequence >= n; the response ends with the
        # highest mod-sequence among them (RFC 7162 3.1.5).
        assert w.run(b"SEARCH MODSEQ %d" % (h0 + 1)) == (
            b"OK", [b"* SEARCH 2 4 (MODSEQ %d)" % m4])
        assert w.run(b"SEARCH MODSEQ %d" % m2) == (b"OK", [b"* SEARCH 2 4 (MODSEQ %d)" % m4])
        assert w.run(b"SEARCH MODSEQ %d" % (m2 + 1)) == (b"OK", [b"* SEARCH 4 (MODSEQ %d)" % m4])
        assert w.run(b"UID SEARCH MODSEQ %d SEEN" % (h0 + 1)) == (
            b"OK", [b"* SEARCH 2 (MODSEQ %d)" % m2])
        # Nothing found: no MODSEQ part.
        assert w.run(b"SEARCH MODSEQ %d" % (m4 + 1)) == (b"OK", [b"* SEARCH"])
        # The entry-name form (a flag's own mod-sequence may be the message's).
        assert w.run(b'SEARCH MODSEQ "/flags/\\\\draft" all %d' % (h0 + 1)) == (
            b"OK", [b"* SEARCH 2 4 (MODSEQ %d)" % m4])
        # MODSEQ 1: every message.
        _, untagged = w.run(b"SEARCH MODSEQ 1")
        assert untagged == [b"* SEARCH 1 2 3 4 (MODSEQ %d)" % m4]
        # With ESEARCH, MODSEQ is a return data item.
        tag = w.next_tag()
        assert w.run(b"SEARCH RETURN (ALL COUNT) MODSEQ %d" % (h0 + 1), tag=tag) == (
            b"OK", [b'* ESEARCH (TAG "' + tag + b'") ALL 2,4 COUNT 2 MODSEQ %d' % m4])
        tag = w.next_tag()
        assert w.run(b"UID SEARCH RETURN (MAX) OR MODSEQ %d FLAGGED" % (m4 + 1), tag=tag) == (
            b"OK", [b'* ESEARCH (TAG "' + tag + b'") UID'])
        # MIN or MAX alone: the MODSEQ of the message returned; both (without ALL or
        # COUNT): the higher of the two (RFC 7162 3.1.5; imaptest's esearch-condstore).
        # Message 4 was changed last, message 2 before it.
        _, untagged = w.run(b"STORE 3 +FLAGS (\\Seen)")
        m3 = modseq_of(fetch_map(untagged)[3])
        for options, data in ((b"MIN", b"MIN 2 MODSEQ %d" % m2),
                              (b"MAX", b"MAX 3 MODSEQ %d" % m3),
                              (b"MIN MAX", b"MIN 2 MAX 3 MODSEQ %d" % m3),
                              (b"", b"ALL 2:3 MODSEQ %d" % m3),
                              (b"COUNT", b"COUNT 2 MODSEQ %d" % m3)):
            tag = w.next_tag()
            assert w.run(b"SEARCH RETURN (%s) 1:3 MODSEQ %d" % (options, h0 + 1), tag=tag) == (
                b"OK", [b'* ESEARCH (TAG "' + tag + b'") ' + data]), options
        tag = w.next_tag()
        assert w.run(b"SEARCH RETURN (MIN MAX) 2:4 MODSEQ %d" % (h0 + 1), tag=tag) == (
            b"OK", [b'* ESEARCH (TAG "' + tag + b'") MIN 2 MAX 4 MODSEQ %d' % m4])
        # Syntax.
        for criteria in (b"MODSEQ", b"MODSEQ x", b'MODSEQ "/flags/\\\\draft" bogus 1',
                         b'MODSEQ "/flags/\\\\draft" all'):
            assert w.run(b"SEARCH " + criteria)[0].startswith(b"BAD"), criteria
        w.close()

    await in_thread(body)


# -- QRESYNC ---------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_qresync_select_after_reconnect(imap_server):
    def body():
        # Session 1 sees eight messages, notes UIDVALIDITY and HIGHESTMODSEQ, leaves.
        first = Wire(imap_server)
        load(first, [M1, M2, M3, M4, M1, M2, M3, M4])
        assert first.run(b"ENABLE QRESYNC") == (b"OK", [b"* ENABLED QRESYNC"])
        _, untagged = first.run(b"SELECT INBOX")
        uidvalidity = int(code_value(untagged, b"UIDVALIDITY"))
        h = highestmodseq(untagged)
        _, untagged = first.run(b"STORE 8 +FLAGS (\\Seen)")  # a change seen here
        h = modseq_of(fetch_map(untagged)[8])
        assert first.run(b"LOGOUT")[0] == b"OK"
        first.close()

        # Session 2 changes flags of some messages and expunges others (one of which
        # had changed first).
        second = Wire(imap_server)
        second.ok(b"SELECT INBOX")
        second.ok(b"UID STORE 2,4,5 +FLAGS (\\Flagged)")
        second.ok(b"UID STORE 7 +FLAGS ($Label)")
        second.ok(b"UID STORE 4,6 +FLAGS (\\Deleted)")
        assert second.run(b"EXPUNGE") == (b"OK", [b"* 4 EXPUNGE", b"* 5 EXPUNGE"])
        second.ok(b"UID STORE 1 +FLAGS (\\Deleted)")
        second.ok(b"UID STORE 1 -FLAGS (\\Deleted)")  # changed twice, back to as it was
        # Now: UIDs 1 2 3 5 7 8 at sequence numbers 1..6.

        # Session 1 again: exactly the expunged UIDs as VANISHED (EARLIER), then FETCH
        # (UID FLAGS MODSEQ) for exactly the changed messages, then the tagged OK.
        again = Wire(imap_server)
        again.ok(b"ENABLE QRESYNC")
        status, untagged = again.run(b"SELECT INBOX (QRESYNC (%d %d 1:8))" % (uidvalidity, h))
        assert status == b"OK [READ-WRITE]"
        assert b"* 6 EXISTS" in untagged
        h2 = highestmodseq(untagged)
        assert h2 > h
        head = untagged.index(b"* OK [HIGHESTMODSEQ %d]" % h2)
        resync = untagged[head + 1:]
        assert resync[0] == b"* VANISHED (EARLIER) 4,6"
        changed = fetch_map(resync[1:])
        assert len(resync) == 1 + len(changed)
        assert sorted(changed) == [1, 2, 4, 5]
        assert [changed[s][b"UID"] for s in (1, 2, 4, 5)] == [1, 2, 5, 7]
        assert changed[1][b"FLAGS"] == []
        assert changed[2][b"FLAGS"] == [b"\\Flagged"]
        assert changed[4][b"FLAGS"] == [b"\\Flagged"]
        assert changed[5][b"FLAGS"] == [b"$Label"]
        assert all(set(i) == {b"UID", b"FLAGS", b"MODSEQ"} for i in changed.values())
        assert all(h < modseq_of(i) <= h2 for i in changed.values())
        assert max(modseq_of(i) for i in changed.values()) <= h2
        known = KnownUIDs([1, 2, 3, 5, 7, 8])
        known.check(again, [1, 2, 3, 5, 7, 8])

        # Without the known UIDs: the same.
        again.ok(b"UNSELECT")
        status, untagged = again.run(b"SELECT INBOX (QRESYNC (%d %d))" % (uidvalidity, h))
        resync = untagged[untagged.index(b"* OK [HIGHESTMODSEQ %d]" % h2) + 1:]
        assert resync[0] == b"* VANISHED (EARLIER) 4,6"
        assert sorted(fetch_map(resync[1:])) == [1, 2, 4, 5]
        # Known UIDs limit VANISHED to themselves.
        status, untagged = again.run(b"EXAMINE INBOX (QRESYNC (%d %d 1:3,6))"
                                     % (uidvalidity, h))
        assert status == b"OK [READ-ONLY]"
        resync = untagged[untagged.index(b"* OK [HIGHESTMODSEQ %d]" % h2) + 1:]
        assert resync[0] == b"* VANISHED (EARLIER) 6"
        assert sorted(fetch_map(resync[1:])) == [1, 2, 4, 5]
        # Sequence match data does not change what is right to report.
        status, untagged = again.run(b"EXAMINE INBOX (QRESYNC (%d %d 1:8 (1:8 1:8)))"
                                     % (uidvalidity, h))
        resync = untagged[untagged.index(b"* OK [HIGHESTMODSEQ %d]" % h2) + 1:]
        assert resync[0] == b"* VANISHED (EARLIER) 4,6"
        assert sorted(fetch_map(resync[1:])) == [1, 2, 4, 5]
        # Up to date: nothing to report.
        status, untagged = again.run(b"SELECT INBOX (QRESYNC (%d %d 1:8))" % (uidvalidity, h2))
        assert untagged[-1] == b"* OK [HIGHESTMODSEQ %d]" % h2
        # Another UIDVALIDITY: no resynchronization at all (3.2.5.2).
        status, untagged = again.run(b"SELECT INBOX (QRESYNC (%d %d 1:8))"
                                     % (uidvalidity + 1, h))
        assert status == b"OK [READ-WRITE]"
        assert untagged[-1] == b"* OK [HIGHESTMODSEQ %d]" % h2
        assert not any(u.startswith((b"* VANISHED", b"* 1 FETCH")) for u in untagged)

        # UID FETCH ... (CHANGEDSINCE h VANISHED): VANISHED (EARLIER) first, then the
        # changed messages (3.2.6).
        known = KnownUIDs([1, 2, 3, 5, 7, 8])
        status, untagged = known.run(again, b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)"
                                     % h)
        assert status == b"OK"
        assert untagged[0] == b"* VANISHED (EARLIER) 4,6"
        got = fetch_map(untagged[1:])
        assert sorted(got) == [1, 2, 4, 5] and len(untagged) == 5
        assert all(set(i) == {b"UID", b"FLAGS", b"MODSEQ"} for i in got.values())
        status, untagged = again.run(b"UID FETCH 1:100 (FLAGS) (CHANGEDSINCE %d VANISHED)" % h)
        assert untagged[0] == b"* VANISHED (EARLIER) 4,6"
        status, untagged = again.run(b"UID FETCH 5:6 (FLAGS) (CHANGEDSINCE %d VANISHED)" % h)
        assert untagged[0] == b"* VANISHED (EARLIER) 6"
        assert [fetch_map(untagged[1:])[4][b"UID"]] == [5] and len(untagged) == 2
        assert again.run(b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE %d VANISHED)" % h2) == (b"OK", [])

        # A message appended later is a change too.
        status, _ = second.append(b"INBOX", M1, b"$New")
        assert status.endswith(b" 9]")
        third = Wire(imap_server)
        third.ok(b"ENABLE QRESYNC")
        status, untagged = third.run(b"SELECT INBOX (QRESYNC (%d %d 1:8))" % (uidvalidity, h2))
        h3 = highestmodseq(untagged)
        assert h3 > h2
        resync = untagged[untagged.index(b"* OK [HIGHESTMODSEQ %d]" % h3) + 1:]
        assert len(resync) == 1
        items = fetch_map(resync)[7]
        assert items[b"UID"] == 9 and b"$New" in items[b"FLAGS"] and modseq_of(items) == h3
        for c in (second, again, third):
            c.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_qresync_expunges_arrive_as_vanished(imap_server):
    def body():
        a = Wire(imap_server)
        load(a, [M1, M2, M3, M4, M1, M2, M3, M4])
        a.ok(b"ENABLE QRESYNC")
        a.ok(b"SELECT INBOX")
        b = Wire(imap_server)
        b.ok(b"SELECT INBOX")
        c = Wire(imap_server)  # without QRESYNC: EXPUNGE as usual
        c.ok(b"SELECT INBOX")
        known_a = KnownUIDs(range(1, 9))
        known_c = Known(range(1, 9))

        # Expunged elsewhere: "* VANISHED 2:3" at the next NOOP, never "* n EXPUNGE".
        b.ok(b"UID STORE 2:3 +FLAGS.SILENT (\\Deleted)")
        b.ok(b"EXPUNGE")
        status, untagged = known_a.run(a, b"FETCH 1:8 (UID)")  # not during FETCH
        assert not any(u.startswith(b"* VANISHED") or u.endswith(b"EXPUNGE") for u in untagged)
        status, untagged = known_a.run(a, b"NOOP")
        assert untagged[-2:] == [b"* VANISHED 2:3", b"* 6 RECENT"]
        assert not any(u.endswith(b" EXPUNGE") for u in untagged)
        known_a.check(a, [1, 4, 5, 6, 7, 8])
        status, untagged = known_c.run(c, b"NOOP")
        assert [u for u in untagged if u.endswith(b"EXPUNGE")] == [b"* 2 EXPUNGE"] * 2
        known_c.check(c, [1, 4, 5, 6, 7, 8])

        # While idling: at once.
        tag = start_idle(a)
        b.ok(b"UID STORE 5 +FLAGS.SILENT (\\Deleted)")
        news = a.read_response()
        assert news.startswith(b"* 3 FETCH (UID 5 ") and b"MODSEQ (" in news, news
        b.ok(b"UID EXPUNGE 5")
        assert a.read_response() == b"* VANISHED 5"
        assert a.read_response() == b"* 5 RECENT"  # one of the \Recent ones went
        assert stop_idle(a, tag) == (b"OK", [])
        known_a.apply([news, b"* VANISHED 5"])
        known_a.check(a, [1, 4, 6, 7, 8])

        # Our own EXPUNGE, UID EXPUNGE and MOVE answer with VANISHED too.
        a.ok(b"UID STORE 6 +FLAGS.SILENT (\\Deleted)")
        # With QRESYNC the tagged OK carries the new HIGHESTMODSEQ (RFC 7162 3.2.10),
        # as Dovecot's does.
        status, untagged = known_a.run(a, b"EXPUNGE")
        assert untagged == [b"* VANISHED 6", b"* 4 RECENT"]
        assert re.fullmatch(rb"OK \[HIGHESTMODSEQ \d+\]", status), status
        a.ok(b"UID STORE 7,8 +FLAGS.SILENT (\\Deleted)")
        status, untagged = known_a.run(a, b"UID EXPUNGE 8")
        assert untagged == [b"* VANISHED 8", b"* 3 RECENT"]
        assert re.fullmatch(rb"OK \[HIGHESTMODSEQ \d+\]", status), status
        status, untagged = known_a.run(a, b"UID MOVE 1,4 Archive")
        assert status == b"OK"
        assert untagged[0].startswith(b"* OK [COPYUID ")
        assert untagged[1:] == [b"* VANISHED 1,4", b"* 1 RECENT"]
        known_a.check(a, [7])
        # The QRESYNC-less session hears EXPUNGE for all of it (5, 6, 8, 1, 4).
        status, untagged = known_c.run(c, b"NOOP")
        assert len([u for u in untagged if u.endswith(b" EXPUNGE")]) == 5
        known_c.check(c, [7])
        # CLOSE expunges without a word, VANISHED or not.
        assert a.run(b"CLOSE") == (b"OK", [])
        status, untagged = known_c.run(c, b"NOOP")
        assert untagged == [b"* 1 EXPUNGE"]
        assert known_c.uids == []
        for s in (a, b, c):
            s.close()

    await in_thread(body)
