"""Sync end to end: a real provider process and two real daemons, driven over IMAP.

Every test runs against the provider on SQLite and on PostgreSQL.  Devices are compared
by what IMAP shows: per mailbox, the multiset of (BODY[], FLAGS) — UIDs are each
device's own.  Waiting is for a condition, with a deadline, never for a fixed time.
"""

import hashlib
import imaplib
import os
import random
import re
import time

import pytest

from leapmail_daemon import LeapmailDaemon
from mail_corpus import corpus
from provider_process import ProviderProcess

ADDRESS = "alice@example.org"
PASSPHRASE = "correct horse battery staple"
DEADLINE = 60


@pytest.fixture(params=["sqlite", "postgresql"])
def provider(request, tmp_path):
    database = None
    if request.param == "postgresql":
        database = request.getfixturevalue("postgres_server").create_database()
    process = ProviderProcess(str(tmp_path / "provider"), database=database)
    process.code = process.adduser(ADDRESS)
    process.start()
    yield process
    process.stop()


def first_device(provider, home):
    return LeapmailDaemon(home, PASSPHRASE, ADDRESS, init_args=[
        "--provider", provider.url, "--provider-ca", provider.ca_path, "--enroll",
        provider.code])


def other_device(provider, home):
    return LeapmailDaemon(home, PASSPHRASE, ADDRESS, init_args=[
        "--provider", provider.url, "--provider-ca", provider.ca_path])


@pytest.fixture
def devices(provider, tmp_path):
    one = first_device(provider, str(tmp_path / "one")).start()
    two = other_device(provider, str(tmp_path / "two")).start()
    yield one, two
    one.stop()
    two.stop()


def connect(daemon):
    return daemon.imap()


def state(daemon):
    """``{mailbox: sorted [(sha256 of BODY[], flags)]}`` as the device shows it."""
    client = connect(daemon)
    try:
        result = {}
        _, lines = client.list()
        for line in lines:
            name = re.match(rb'\(([^)]*)\) "/" (.+)$', line).group(2).decode()
            status, _ = client.select(name, readonly=True)
            if status != "OK":
                continue  # deleted by sync since LIST: the next look will agree
            messages = []
            _, data = client.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[])")
            for item in data:
                if isinstance(item, tuple):
                    flags = re.search(rb"FLAGS \(([^)]*)\)", item[0]).group(1).decode()
                    flags = " ".join(sorted(f for f in flags.split() if f != "\\Recent"))
                    messages.append((hashlib.sha256(item[1]).hexdigest(), flags))
            result[name] = sorted(messages)
        return result
    finally:
        try:
            client.logout()
        except (imaplib.IMAP4.error, OSError):
            pass  # the server hung up already (a BYE for a deleted mailbox)


def wait_same(one, two, expect=None, deadline=DEADLINE):
    """Wait until both devices show the same mailboxes and messages (and ``expect``)."""
    end = time.monotonic() + deadline
    while True:
        try:
            a, b = state(one), state(two)
        except imaplib.IMAP4.abort:
            # The mailbox being read was deleted by sync meanwhile: the server says BYE
            # (as Dovecot does), and the next look will agree.
            a, b = None, ()
        if a == b and (expect is None or expect(a)):
            return a
        if time.monotonic() > end:
            raise AssertionError(f"devices did not converge:\n{a}\n!=\n{b}")
        time.sleep(0.1)


def append(daemon, mailbox, messages, flags=""):
    client = connect(daemon)
    try:
        for raw in messages:
            status, _ = client.append(mailbox, flags or None, None, raw)
            assert status == "OK"
    finally:
        client.logout()


def by_subject(daemon, mailbox):
    """``{subject: flags}`` of a mailbox, or ``None`` if it does not exist."""
    client = connect(daemon)
    try:
        status, [count] = client.select(mailbox)
        if status != "OK":
            return None  # not there (yet): a new device creates or pulls it shortly
        if count == b"0":
            return {}
        _, data = client.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        out = {}
        for item in data:
            if isinstance(item, tuple):
                flags = re.search(rb"FLAGS \(([^)]*)\)", item[0]).group(1).decode().split()
                subject = item[1].decode().split(":", 1)[1].strip()
                out[subject] = sorted(f for f in flags if f != "\\Recent")
        return out
    finally:
        client.logout()


def note(subject, body="text"):
    return (f"From: bob@example.org\r\nTo: {ADDRESS}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.org>\r\n\r\n{body}\r\n").encode()


def test_appends_flags_moves_expunges_and_renames_reach_the_other_device(devices):
    one, two = devices
    # What imaplib sends: it turns bare line ends into CRLF.
    messages = [imaplib.MapCRLF.sub(b"\r\n", raw) for _, raw in corpus()][:150]
    append(one, "INBOX", messages)
    append(one, "INBOX", [note("flag-me"), note("move-me"), note("drop-me")], "\\Seen")
    a = wait_same(one, two, lambda s: len(s.get("INBOX", ())) == len(messages) + 3)
    # BODY[] byte-exact: every corpus message, by hash, on the second device (as IMAP
    # shows it: a NUL byte goes out as 0x80).
    assert sorted(h for h, _ in a["INBOX"]) == sorted(
        [hashlib.sha256(m.replace(b"\0", b"\x80")).hexdigest() for m in messages]
        + [hashlib.sha256(note(s)).hexdigest() for s in ("flag-me", "move-me", "drop-me")])

    client = connect(two)
    client.create("Projects/R&AOk-sum&AOk-")
    client.select("INBOX")
    _, [uids] = client.uid("SEARCH", "HEADER", "Subject", "flag-me")
    client.uid("STORE", uids, "+FLAGS", "(\\Flagged $Important)")
    _, [uids] = client.uid("SEARCH", "HEADER", "Subject", "move-me")
    client.uid("MOVE", uids, "Archive")
    _, [uids] = client.uid("SEARCH", "HEADER", "Subject", "drop-me")
    client.uid("STORE", uids, "+FLAGS", "\\Deleted")
    client.expunge()
    client.rename("Projects", "Work")
    client.create("Doomed")
    client.subscribe("Work/R&AOk-sum&AOk-")
    client.unsubscribe("Junk")
    client.logout()
    wait_same(one, two, lambda s: "Doomed" in s)
    client = connect(one)
    client.delete("Doomed")
    client.logout()

    final = wait_same(one, two, lambda s: "Work/R&AOk-sum&AOk-" in s and "Doomed" not in s)
    assert "Projects" not in final and "Work" in final
    for daemon in (one, two):
        client = connect(daemon)
        _, subscribed = client.lsub()
        client.logout()
        names = sorted(line.split(b' "/" ')[1].decode() for line in subscribed)
        assert names == ["Archive", "Drafts", "Sent", "Trash", "Work/R&AOk-sum&AOk-"]
    assert by_subject(one, "Archive") == {"move-me": ["\\Seen"]}
    inbox = by_subject(one, "INBOX")
    assert inbox["flag-me"] == ["$Important", "\\Flagged", "\\Seen"]
    assert "move-me" not in inbox and "drop-me" not in inbox
    assert len(final["INBOX"]) == len(messages) + 1


def test_concurrent_changes_while_apart_are_all_kept(provider, devices):
    one, two = devices
    subjects = ["a", "b", "c", "d", "e"]
    append(one, "INBOX", [note(s) for s in subjects])
    wait_same(one, two, lambda s: len(s["INBOX"]) == 5)

    provider.stop()
    c1, c2 = connect(one), connect(two)
    c1.select("INBOX")
    c2.select("INBOX")

    def uid(client, subject):
        _, [found] = client.uid("SEARCH", "HEADER", "Subject", f'"{subject}"')
        return found.decode()

    # Device one flags a and b, moves c; device two marks a and c seen, moves b,
    # removes nothing one added.  Every change must survive.
    c1.uid("STORE", uid(c1, "a"), "+FLAGS", "\\Flagged")
    c1.uid("STORE", uid(c1, "b"), "+FLAGS", "\\Flagged")
    c1.uid("MOVE", uid(c1, "c"), "Archive")
    c1.uid("STORE", uid(c1, "d"), "+FLAGS", "$Later")
    c2.uid("STORE", uid(c2, "a"), "+FLAGS", "\\Seen")
    c2.uid("STORE", uid(c2, "c"), "+FLAGS", "\\Seen")
    c2.uid("MOVE", uid(c2, "b"), "Trash")
    c2.uid("STORE", uid(c2, "d"), "+FLAGS", "\\Answered")
    c2.create("Both")
    c1.create("Both")
    c1.logout()
    c2.logout()
    append(one, "Both", [note("from-one")])
    append(two, "Both", [note("from-two")])

    provider.start()
    wait_same(one, two, lambda s: len(s.get("Both", ())) == 2 and len(s["INBOX"]) == 3)
    for daemon in (one, two):
        assert by_subject(daemon, "INBOX") == {
            "a": ["\\Flagged", "\\Seen"], "d": ["$Later", "\\Answered"], "e": []}
        assert by_subject(daemon, "Archive") == {"c": ["\\Seen"]}
        assert by_subject(daemon, "Trash") == {"b": ["\\Flagged"]}
        assert by_subject(daemon, "Both") == {"from-one": [], "from-two": []}


def test_a_copy_made_while_another_device_expunges_the_last_one_keeps_its_content(
        provider, devices):
    one, two = devices
    # Small (one document), multipart (content and parts) and big (a chunked blob).
    attachment = bytes(random.Random(3).getrandbits(8) for _ in range(400_000))
    big = (b"From: bob@example.org\r\nSubject: big\r\nContent-Type: multipart/mixed; "
           b"boundary=x\r\n\r\n--x\r\n\r\nsee attached\r\n--x\r\n"
           b"Content-Type: application/octet-stream\r\n\r\n" + attachment + b"\r\n--x--\r\n")
    small, parted = note("small"), (
        b"Subject: parted\r\nContent-Type: multipart/alternative; boundary=y\r\n\r\n"
        b"--y\r\nContent-Type: text/plain\r\n\r\n" + b"p" * 40_000 +
        b"\r\n--y\r\nContent-Type: text/html\r\n\r\n<p>h</p>\r\n--y--\r\n")
    append(one, "INBOX", [small, parted, big])
    wait_same(one, two, lambda s: len(s["INBOX"]) == 3)

    provider.stop()
    c1, c2 = connect(one), connect(two)
    c1.select("INBOX")
    c2.select("INBOX")
    # One expunges the only copy; two, not knowing, copies it elsewhere.
    c1.uid("STORE", "1:*", "+FLAGS", "\\Deleted")
    c1.expunge()
    c2.uid("COPY", "1:*", "Archive")
    c1.logout()
    c2.logout()

    provider.start()
    want = sorted(hashlib.sha256(raw).hexdigest() for raw in (small, parted, big))
    final = wait_same(one, two, lambda s: not s["INBOX"] and len(s.get("Archive", ())) == 3)
    assert sorted(digest for digest, _ in final["Archive"]) == want


def test_a_provider_and_a_device_killed_during_a_big_sync_lose_nothing(provider, tmp_path):
    rng = random.Random(5)
    one = first_device(provider, str(tmp_path / "one")).start()
    try:
        batch = [note(f"bulk-{i}", "x" * rng.randrange(10, 3000)) for i in range(2000)]
        client = connect(one)
        for i, raw in enumerate(batch):
            client.append("INBOX", None, None, raw)
            if i in (400, 1300):
                provider.kill()
                provider.start()
        client.logout()
        two = other_device(provider, str(tmp_path / "two")).start()
        try:
            for _ in range(3):
                # Kill the provider while the second device is pulling.
                time.sleep(rng.uniform(0.2, 1.0))
                provider.kill()
                provider.start()
            # And the second device itself, as a crash: it resumes where it was.
            time.sleep(rng.uniform(0.1, 0.5))
            two.kill()
            two.start()
            final = wait_same(one, two, lambda s: len(s["INBOX"]) == 2000, deadline=180)
            assert sorted(h for h, _ in final["INBOX"]) == sorted(
                hashlib.sha256(raw).hexdigest() for raw in batch)
        finally:
            two.stop()
    finally:
        one.stop()


MARKERS = [b"MARKER-SUBJECT-7f3a", b"MARKER-BODY-19c2", b"MARKER-ATTACHMENT-5be1",
           b"MARKER-MAILBOX-88d0"]


def test_the_provider_stores_no_plaintext(provider, devices, postgres_server_if_used):
    one, two = devices
    # Bytes 32..231: 8-bit, big enough to be a blob, and no line ends or NULs that
    # imaplib or IMAP would change on the way.
    noise = bytes(b % 200 + 32 for b in os.urandom(401_000))
    attachment = noise[:400_000] + MARKERS[2] + noise[400_000:]
    raw = (b"From: bob@example.org\r\nTo: alice@example.org\r\nSubject: " + MARKERS[0]
           + b"\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
           b"--b1\r\nContent-Type: text/plain\r\n\r\nhello " + MARKERS[1]
           + b"\r\n--b1\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Transfer-Encoding: 8bit\r\n\r\n" + attachment + b"\r\n--b1--\r\n")
    client = connect(one)
    client.create(MARKERS[3].decode())
    client.append(MARKERS[3].decode(), "(\\Flagged)", None, raw)
    client.logout()
    final = wait_same(one, two, lambda s: len(s.get(MARKERS[3].decode(), ())) == 1)
    assert final[MARKERS[3].decode()] == [(hashlib.sha256(raw).hexdigest(), "\\Flagged")]

    data = provider_bytes(provider, postgres_server_if_used)
    assert len(data) > len(attachment)  # the attachment's ciphertext is in there
    for marker in MARKERS + [b"Flagged", b"INBOX", b"alice@example.org\r\n"]:
        # Raw (SQLite's file) or hex (bytea in a PostgreSQL dump).
        assert marker not in data, marker
        assert marker.hex().encode() not in data, marker


@pytest.fixture
def postgres_server_if_used(provider, request):
    return request.getfixturevalue("postgres_server") if provider.database else None


def provider_bytes(provider, postgres):
    if postgres is None:
        out = b""
        for name in os.listdir(provider.home):
            if name.startswith("provider.db"):
                with open(os.path.join(provider.home, name), "rb") as f:
                    out += f.read()
        return out
    database = provider.database.rsplit("/", 1)[1]
    return postgres._run("pg_dump", "-h", postgres.dir, "-p", str(postgres.port),
                         database).stdout


def test_mail_appended_on_one_device_reaches_an_idle_client_on_the_other(devices):
    one, two = devices
    wait_same(one, two, lambda s: "INBOX" in s)
    watcher = connect(two)
    watcher.select("INBOX")
    watcher.send(b"I1 IDLE\r\n")
    assert watcher.readline().startswith(b"+ ")
    watcher.sock.settimeout(DEADLINE)
    started = time.monotonic()
    append(one, "INBOX", [note("pushed")])
    line = watcher.readline()
    elapsed = time.monotonic() - started
    assert line == b"* 1 EXISTS\r\n"
    assert watcher.readline() == b"* 1 RECENT\r\n"
    # A long poll, not a timer: well under the 25 s the poll waits.
    assert elapsed < 5, elapsed
    watcher.send(b"DONE\r\n")
    assert watcher.readline().startswith(b"I1 OK")
    watcher.logout()
