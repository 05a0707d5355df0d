"""``leapmail fetch`` from a real Dovecot over loopback, as a real process.

What the store holds is read back with ``leapmail export --format maildir``: every
message's bytes, its flags (the file name's letters) and its INTERNALDATE (mtime)
must be those of Dovecot's Maildir, folder for folder, each message exactly once.
"""

import imaplib
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import pytest_twisted

from dovecot_server import DovecotServer
from test_transfer_files import PASS, leapmail, ok, read_maildir

BIN = os.path.dirname(sys.executable)
FLAG_SETS = [[], ["\\Seen"], ["\\Seen", "\\Flagged"], ["\\Answered", "\\Seen"],
             ["\\Draft"], ["\\Deleted", "\\Seen"]]
LETTERS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S",
           "\\Deleted": "T"}
#: Dovecot Maildir++ folders (its hierarchy separator is ".") and how many messages.
#: INBOX is listed in two UID ranges (leapmail.transfer.fetch.LIST_UIDS).
FOLDERS = {None: 1100, "Archive": 300, "Archive.2019": 300, "Lists.python": 300}


def make_message(i, rng):
    body = b"".join(b"line %d of message %d %s\r\n" % (n, i, b"x" * rng.randrange(80))
                    for n in range(rng.randrange(3, 60)))
    return (b"From: sender%d@example.org\r\nTo: me@example.org\r\n"
            b"Subject: message %d\r\nMessage-ID: <%d@example.org>\r\n\r\n" % (i % 7, i, i)
            ) + body


@pytest.fixture
def home(tmp_path):
    path = str(tmp_path / "acct")
    ok(leapmail("init", "--home", path, "--address", "me@example.org"))
    return path


@pytest.fixture
def dovecot(tmp_path):
    server = DovecotServer(str(tmp_path / "dovecot"), user="legacy", password="old-secret")
    server.start()
    yield server
    server.stop()


def fill(server, folders=FOLDERS):
    """Deliver the messages; returns {export folder name: sorted [(raw, letters, mtime)]}."""
    rng = random.Random(7)
    expected, n = {}, 0
    for folder, count in folders.items():
        batch = []
        for _ in range(count):
            flags = FLAG_SETS[n % len(FLAG_SETS)]
            date = 1300000000 + 3607 * n
            batch.append((make_message(n, rng), flags, date))
            n += 1
        server.deliver(batch, folder)
        expected["" if folder is None else "." + folder] = sorted(
            (raw, "".join(sorted(LETTERS[f] for f in flags)), date) for raw, flags, date in batch)
    return expected


def url(server, mailboxes=""):
    return f"imap://{server.user}@{server.host}:{server.port}/{mailboxes}"


def fetch_env(password):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAPMAIL_")}
    env.update(LEAPMAIL_PASSPHRASE=PASS, LEAPMAIL_FETCH_PASSWORD=password)
    return env


class Running:
    """``leapmail fetch`` in the background; its stderr lines come through a queue."""

    def __init__(self, home, *args, password="old-secret"):
        self.process = subprocess.Popen(
            [os.path.join(BIN, "leapmail"), "--home", home, "fetch", "--insecure", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=fetch_env(password))
        self.lines = queue.Queue()
        self.seen = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.process.stderr:
            self.lines.put(line.decode())
        self.lines.put(None)

    def rest(self):
        """The stderr lines not read yet, once the process has ended."""
        lines = []
        while (line := self.lines.get(timeout=30)) is not None:
            lines.append(line)
        return lines

    def wait_for(self, wanted, timeout=60):
        """The first stderr line for which ``wanted(line)`` is true."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"not seen in {timeout} s; got {self.seen}") from None
            if line is None:
                raise AssertionError(f"fetch ended ({self.process.wait()}): {self.seen}")
            self.seen.append(line)
            if wanted(line):
                return line


def progress_done(line):
    match = re.match(r"fetch \S+: (\d+)/\d+ messages", line)
    return int(match.group(1)) if match else 0


def exported(home, tmp_path, name):
    out = tmp_path / name
    ok(leapmail("--home", home, "export", "--format", "maildir", str(out)))
    return {k: v for k, v in read_maildir(str(out)).items() if v}


def fetched(result):
    return int(re.match(r"fetch: (\d+) messages", result.stdout.decode()).group(1))


def test_fetch_interrupted_twice_then_resumed_copies_each_message_once(home, dovecot,
                                                                      tmp_path):
    expected = fill(dovecot)
    total = sum(FOLDERS.values())
    # 1. Killed (SIGKILL, no chance to clean up) once 400 messages are in.
    run = Running(home, url(dovecot))
    run.wait_for(lambda line: progress_done(line) >= 400)
    run.process.kill()
    run.process.wait()
    # 2. The server goes away in the middle: a clear message, status 1.
    run = Running(home, url(dovecot))
    run.wait_for(lambda line: progress_done(line) > 0)
    dovecot._kill_all()
    assert run.process.wait(timeout=60) == 1
    stderr = "".join(run.seen + run.rest())
    assert "Traceback" not in stderr
    assert re.search(r"leapmail: fetching failed: .*; what was fetched is kept, and "
                     r"running the command again resumes\n$", stderr), stderr
    # 3. Back (on a new port), and run again: the rest comes, nothing twice.
    dovecot.start()
    result = ok(subprocess.run(
        [os.path.join(BIN, "leapmail"), "--home", home, "fetch", "--insecure", url(dovecot)],
        capture_output=True, env=fetch_env("old-secret"), stdin=subprocess.DEVNULL,
        timeout=300))
    assert 0 < fetched(result) < total - 400
    result = ok(subprocess.run(
        [os.path.join(BIN, "leapmail"), "--home", home, "fetch", "--insecure", url(dovecot)],
        capture_output=True, env=fetch_env("old-secret"), stdin=subprocess.DEVNULL,
        timeout=300))
    assert fetched(result) == 0
    assert exported(home, tmp_path, "out") == expected


def test_follow_imports_new_mail_as_idle_announces_it(home, dovecot, tmp_path):
    expected = fill(dovecot, {None: 5, "Work": 3})
    # Named in lower case: the server's spelling is what counts (no duplicates).
    run = Running(home, "--follow", url(dovecot, "inbox,Work"))
    try:
        run.wait_for(lambda line: line == "fetch: following INBOX\n")
        conn = imaplib.IMAP4(dovecot.host, dovecot.port)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.login(dovecot.user, dovecot.password)
        added = []
        for i in range(10):
            raw = make_message(10000 + i, random.Random(i))
            flags = "(\\Seen)" if i % 2 else "()"
            date = 1600000000 + 86400 * i
            typ, _ = conn.append("INBOX", flags, imaplib.Time2Internaldate(date), raw)
            assert typ == "OK"
            added.append((raw, "S" if i % 2 else "", date))
        conn.logout()
        imported = 0
        while imported < 10:
            line = run.wait_for(lambda line: "new messages imported" in line, timeout=30)
            imported += int(re.match(r"fetch: INBOX: (\d+) new", line).group(1))
        assert imported == 10
        # The server drops every connection: the watcher says so, reconnects with
        # backoff, and mail appended meanwhile still arrives.
        for pid in dovecot.imap_pids():
            os.kill(pid, signal.SIGKILL)
        run.wait_for(lambda line: line.startswith("fetch: watching INBOX failed ("))
        raw = make_message(10100, random.Random(1))
        conn = imaplib.IMAP4(dovecot.host, dovecot.port)
        conn.login(dovecot.user, dovecot.password)
        assert conn.append("INBOX", "(\\Flagged)", imaplib.Time2Internaldate(1650000000),
                           raw)[0] == "OK"
        conn.logout()
        added.append((raw, "F", 1650000000))
        run.wait_for(lambda line: line == "fetch: INBOX: 1 new messages imported\n")
    finally:
        run.process.send_signal(signal.SIGINT)
        status = run.process.wait(timeout=60)
    assert status == 0, run.seen + run.rest()
    expected[""] = sorted(expected[""] + added)
    assert exported(home, tmp_path, "out") == expected


def test_named_mailboxes_only(home, dovecot, tmp_path):
    expected = fill(dovecot, {None: 4, "Work": 3, "Work.Old": 2, "Other": 2})
    result = ok(subprocess.run(
        [os.path.join(BIN, "leapmail"), "--home", home, "fetch", "--insecure",
         url(dovecot, "Work.Old,INBOX")],
        capture_output=True, env=fetch_env("old-secret"), stdin=subprocess.DEVNULL,
        timeout=120))
    assert fetched(result) == 6
    assert exported(home, tmp_path, "out") == {k: expected[k] for k in ("", ".Work.Old")}


def run_fetch(home, *args, password="old-secret"):
    return subprocess.run([os.path.join(BIN, "leapmail"), "--home", home, "fetch", *args],
                          capture_output=True, env=fetch_env(password),
                          stdin=subprocess.DEVNULL, timeout=120)


def test_bad_logins_and_addresses_are_clear_failures(home, dovecot):
    result = run_fetch(home, "--insecure", url(dovecot), password="wrong")
    assert (result.returncode, result.stderr.decode()) == (
        1, f"leapmail: {dovecot.host}:{dovecot.port} refused the login for legacy: "
        "[AUTHENTICATIONFAILED] Authentication failed.\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, not listening: connections are refused
        result = run_fetch(home, "--insecure", f"imap://legacy@127.0.0.1:{closed}/")
    assert result.returncode == 1
    assert result.stderr.decode().startswith(f"leapmail: cannot connect to 127.0.0.1:{closed}: ")
    assert "Traceback" not in result.stderr.decode()
    # Dovecot here has no TLS: without --insecure the password is not sent.
    result = run_fetch(home, url(dovecot))
    assert (result.returncode, result.stderr.decode()) == (
        1, f"leapmail: {dovecot.host}:{dovecot.port} does not offer STARTTLS; refusing to "
        "send the password in clear\n")
    result = run_fetch(home, "--insecure", url(dovecot, "Nowhere"))
    assert (result.returncode, result.stderr.decode()) == (
        1, "leapmail: the server has no mailbox 'Nowhere'\n")
    for bad, why in (("http://x/", "the URL must start with imap:// or imaps://"),
                     ("imap://host/", "the URL needs a user and a host (imap://USER@HOST/)")):
        result = run_fetch(home, bad)
        assert (result.returncode, result.stderr.decode()) == (1, f"leapmail: {bad!r}: {why}\n")
    result = subprocess.run(
        [os.path.join(BIN, "leapmail"), "--home", home, "fetch", url(dovecot)],
        capture_output=True, env={k: v for k, v in fetch_env("x").items()
                                  if k != "LEAPMAIL_FETCH_PASSWORD"},
        stdin=subprocess.DEVNULL, timeout=60)
    assert (result.returncode, result.stderr.decode()) == (
        1, "leapmail: no password: set LEAPMAIL_FETCH_PASSWORD, use --password-file, or "
        "run from a terminal\n")


def test_fetch_over_starttls_from_a_leapmail_daemon(home, tmp_path):
    """The TLS path: STARTTLS, the server's certificate pinned with --ca, the password
    from a file, and a username with an '@' in it."""
    from leapmail_daemon import LeapmailDaemon

    with LeapmailDaemon(str(tmp_path / "legacy"), "legacy passphrase", "old@example.org"
                        ) as daemon:
        conn = daemon.imap()
        added = []
        for i in range(5):
            raw = make_message(20000 + i, random.Random(i))
            date = 1500000000 + 86400 * i
            flags = "(\\Flagged)" if i % 2 else "()"
            assert conn.append("INBOX", flags, imaplib.Time2Internaldate(date), raw)[0] == "OK"
            added.append((raw, "F" if i % 2 else "", date))
        conn.logout()
        password_file = tmp_path / "password"
        password_file.write_text(daemon.password + "\n")
        address = f"imap://{daemon.user}@{daemon.host}:{daemon.port}/INBOX"
        result = run_fetch(home, address, "--password-file", str(password_file))
        assert result.returncode == 1
        assert result.stderr.decode().startswith(
            f"leapmail: cannot log in to {daemon.host}:{daemon.port}: ")
        result = ok(run_fetch(home, address, "--password-file", str(password_file),
                              "--ca", os.path.join(daemon.home, "tls-cert.pem")))
        assert fetched(result) == 5
    assert exported(home, tmp_path, "out") == {"": sorted(added)}


def test_a_message_over_the_size_limit_is_reported_and_the_rest_fetched(home, dovecot,
                                                                       tmp_path):
    from leapmail.mail.message import MAX_MESSAGE_SIZE

    small = [(make_message(i, random.Random(i)), ["\\Seen"], 1500000000 + i) for i in range(3)]
    line = b"y" * 998 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + line * (MAX_MESSAGE_SIZE // len(line) + 1)
    dovecot.deliver(small[:2] + [(big, [], 1500000100)] + small[2:])
    result = run_fetch(home, "--insecure", url(dovecot))
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert (f"fetch: INBOX UID 3: {len(big)} bytes, over the size limit of "
            f"{MAX_MESSAGE_SIZE} bytes; skipped\n") in stderr
    assert stderr.endswith("leapmail: 1 problem (see above); everything else was "
                           "fetched\n")
    assert fetched(result) == 3
    assert exported(home, tmp_path, "out") == {
        "": sorted((raw, "S", date) for raw, _, date in small)}


@pytest_twisted.ensureDeferred
async def test_fetch_over_implicit_tls(account, tmp_path):
    """imaps://: TLS from the first byte, from leapmail's IMAP server on a TLS port."""
    from twisted.internet import reactor

    from imap_support import PASSWORD, USER, in_thread
    from leapmail.imap.server import IMAPServerFactory
    from leapmail.tls import context_factory

    added = []
    for i in range(3):
        raw = make_message(30000 + i, random.Random(i))
        await account.append("INBOX", raw, ["\\Seen"] if i else [], 1400000000 + i)
        added.append((raw, "S" if i else "", 1400000000 + i))
    certificates = str(tmp_path / "tls")
    os.makedirs(certificates)
    port = reactor.listenSSL(0, IMAPServerFactory(account, USER, PASSWORD),
                             context_factory(certificates), interface="127.0.0.1")
    try:
        home = str(tmp_path / "acct")
        await in_thread(lambda: ok(leapmail("init", "--home", home, "--address", "me@x.org")))
        address = f"imaps://{USER}@127.0.0.1:{port.getHost().port}/"
        result = await in_thread(
            run_fetch, home, address, "--ca", os.path.join(certificates, "tls-cert.pem"),
            password=PASSWORD)
        assert fetched(ok(result)) == 3
        out = await in_thread(exported, home, tmp_path, "out")
    finally:
        await port.stopListening()
    assert out == {"": sorted(added)}
