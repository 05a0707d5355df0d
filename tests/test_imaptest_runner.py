"""tools/imaptest_runner.py, on scripts of our own in imaptest's format, against the
server over a real socket: a true script passes, each kind of wrong one fails and
says where, and a script for an extension we lack is skipped."""

import os
import sys

import pytest_twisted
from imap_support import PASSWORD, USER, imap_server, in_thread  # noqa: F401

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
import imaptest_runner  # noqa: E402

MBOX = (b"From someone@example.org  Mon Jan  8 09:10:11 2024\n"
        b"From: Ann <ann@example.org>\nSubject: one\n\nfirst\n\n"
        b"From someone@example.org  Tue Jan  9 10:11:12 2024 +0200\n"
        b"From: <bob (Bob) @ example.org>\nSubject: two\n\nsecond\n\n"
        b"From someone@example.org  Wed Jan 10 11:12:13 2024\n"
        b"Subject: three\n\nthird\n\n")

TRUE = """connections: 2

# variables captured in one reply are compared in the next ones
1 ok fetch 1:* (uid internaldate)
* 1 fetch (uid $uid1 internaldate " 8-Jan-2024 09:10:11 +0000")
* 2 fetch (uid $uid2 internaldate " 9-Jan-2024 10:11:12 +0200")
* 3 fetch (uid $uid3 internaldate $date3)

1 ok store 2 +flags (\\flagged $$work)
* 2 fetch (flags (\\flagged $$work))
2 ok noop
* 2 fetch (flags ($$work \\flagged))
! 1 fetch (flags (\\flagged $$work))

1 ok search from bob@example.org
* search 2
1 ok uid search subject t
* search $uid2 $uid3

1 ok store 1 +flags \\deleted
1 ok expunge
* $1 expunge
! $2 expunge

# connection 2 has not heard of the expunge yet (FETCH may not tell it)
2 ok fetch 3 (uid body.peek[text])
* 3 fetch (uid $uid3 body[text] {{{
third


}}})
2 tag1 fetch 2 (uid)
2 tag2 noop
2 tag2 ok
2 tag1 ok
* $2 fetch (uid $uid2)
* 1 expunge

1 bad fetch
1 no select nonexistent
1 ok select $mailbox
* ok [uidvalidity $]

# a literal of the script's own, sent after the server's "+"
1 ok append $mailbox (\\seen) {{{
Subject: four

fourth
}}}
1 ok fetch 3 (flags body.peek[text])
* 3 fetch (flags (\\seen) body[text] "fourth")
"""


def run(server, directory, name, text):
    with open(os.path.join(directory, "default.mbox"), "wb") as f:
        f.write(MBOX)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    runner = imaptest_runner.Runner(server.host, server.port, USER, PASSWORD, "imaptest",
                                    timeout=20)
    return runner.run(imaptest_runner.read_script(path))


@pytest_twisted.ensureDeferred
async def test_a_true_script_passes(imap_server, tmp_path):  # noqa: F811
    assert await in_thread(run, imap_server, str(tmp_path), "true", TRUE) == ("pass", "")


@pytest_twisted.ensureDeferred
async def test_wrong_scripts_fail_where_they_are_wrong(imap_server, tmp_path):  # noqa: F811
    wrong = TRUE.replace("* 2 fetch (flags ($$work \\flagged))",
                         "* 2 fetch (flags ($$work))")
    wrong = wrong.replace("* search $uid2 $uid3", "* search $uid3 $uid2")
    wrong = wrong.replace("1 no select nonexistent", "1 ok select nonexistent")
    wrong = wrong.replace("! $2 expunge", "! $1 expunge")
    outcome, detail = await in_thread(run, imap_server, str(tmp_path), "wrong", wrong)
    assert outcome == "fail"
    groups = [line.split(" (")[0].strip() for line in detail.splitlines()
              if line.strip().startswith("group")]
    assert groups == ["group 3", "group 5", "group 7", "group 11"]
    assert "missing 1 untagged replies, first (line 12): 2 fetch" in detail
    assert "unexpected untagged match: $1 expunge" in detail
    assert "expected tagged reply 'ok', got '1." in detail


@pytest_twisted.ensureDeferred
async def test_scripts_for_missing_extensions_are_skipped(imap_server, tmp_path):  # noqa: F811
    script = "capabilities: IMAP4rev1 THREAD=REFERENCES\n\nok thread references us-ascii all\n"
    assert await in_thread(run, imap_server, str(tmp_path), "thread", script) == (
        "skip", "capabilities not advertised: THREAD=REFERENCES")


class _Connection:
    def __init__(self, number):
        self.number = number
        self.exists = None
        self.uidvalidity = None
        self.readonly = False


def test_state_tracking_catches_what_no_server_may_do():
    """What imaptest checks beyond the scripts: \\Recent for one session only (RFC 3501
    2.3.2), a message count that only EXPUNGE lowers, numbers within the count."""
    runner = imaptest_runner.Runner("127.0.0.1", 0, USER, PASSWORD, "imaptest")
    runner.recent_owner = {}
    one, two = _Connection(1), _Connection(2)
    problems = []

    def feed(conn, line):
        runner.track(conn, imaptest_runner.parse_args(line), problems)

    for conn in (one, two):
        runner.forget_mailbox(conn, "SELECT imaptest")
        feed(conn, "3 EXISTS")
        feed(conn, "OK [UIDVALIDITY 77] ok")
    feed(one, "1 FETCH (UID 5 FLAGS (\\Seen \\Recent))")
    feed(one, "1 FETCH (FLAGS (\\Recent) UID 5)")
    assert problems == []
    feed(two, "1 FETCH (UID 5 FLAGS (\\Recent))")
    assert problems == ["connection 2: UID 5 is \\Recent on connection 1 too"]
    del problems[:]
    feed(two, "2 EXPUNGE")
    feed(two, "2 EXISTS")
    feed(two, "4 FETCH (UID 9)")
    feed(two, "1 EXISTS")
    feed(two, "0 EXPUNGE")
    assert problems == ["connection 2: FETCH of message 4 with 2 messages",
                        "connection 2: EXISTS went down from 2 to 1 without EXPUNGE",
                        "connection 2: EXPUNGE 0 with 1 messages"]
    # A new SELECT starts over; EXAMINE may see \Recent without taking it.
    runner.forget_mailbox(two, "EXAMINE imaptest")
    feed(two, "OK [UIDVALIDITY 77]")
    feed(two, "1 EXISTS")
    feed(two, "1 FETCH (UID 5 FLAGS (\\Recent))")
    assert len(problems) == 3
