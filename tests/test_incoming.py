"""Incoming mail end to end: real provider (with its MX), real daemons, real clients.

smtplib and swaks hand mail to the provider's MX; an IDLE client of the user's daemon
sees it arrive; BODY[] is what was sent plus the provider's one Received: header.
Bob's two devices each show a message exactly once, even when their claims race.  A
delivery that cannot be opened ends as one notice in INBOX, counted by ``leapmail
status`` meanwhile.  The provider's database never holds the plaintext.
"""

import os
import re
import smtplib
import subprocess
import time

import pytest

from leapmail.crypto.sealed import IncomingKeyPair, seal
from leapmail.provider.storage import open_storage
from leapmail_daemon import LeapmailDaemon
from provider_process import ProviderProcess
from test_sync import provider_bytes
from polling import wait_for

ADDRESS = "bob@example.org"
PASSPHRASE = "correct horse battery staple"
DEADLINE = 60
MX_ARGS = ["--mx-port", "0", "--hostname", "mx.example.org"]
TRACE = re.compile(rb"Received: from client\.example \(\[127\.0\.0\.1\]\)\r\n\tby mx\.example\.org "
                   rb"\(leapmail\) with ESMTP id [0-9a-f]{16}\r\n\tfor <bob@example\.org>;\r\n\t"
                   rb"[A-Z][a-z]{2}, [0-9]{1,2} [A-Z][a-z]{2} [0-9]{4} [0-9:]{8} [-+]0000\r\n")


@pytest.fixture(params=["sqlite", "postgresql"])
def provider(request, tmp_path):
    database = None
    if request.param == "postgresql":
        database = request.getfixturevalue("postgres_server").create_database()
    process = ProviderProcess(str(tmp_path / "provider"), database=database, extra_args=MX_ARGS)
    process.code = process.adduser(ADDRESS)
    process.start()
    yield process
    process.stop()


@pytest.fixture
def sqlite_provider(tmp_path):
    process = ProviderProcess(str(tmp_path / "provider"), extra_args=MX_ARGS)
    process.code = process.adduser(ADDRESS)
    process.start()
    yield process
    process.stop()


def device(provider, home, first, extra=()):
    args = ["--provider", provider.url, "--provider-ca", provider.ca_path]
    if first:
        args += ["--enroll", provider.code]
    return LeapmailDaemon(home, PASSPHRASE, ADDRESS, init_args=args, extra_args=list(extra))


def send(provider, message, rcpt=ADDRESS):
    client = smtplib.SMTP("127.0.0.1", provider.mx_port, timeout=30)
    try:
        client.ehlo("client.example")
        assert client.sendmail("sender@example.net", [rcpt], message) == {}
    finally:
        client.quit()


def idle(daemon):
    watcher = daemon.imap()
    watcher.select("INBOX")
    watcher.send(b"I1 IDLE\r\n")
    assert watcher.readline().startswith(b"+ ")
    watcher.sock.settimeout(DEADLINE)
    return watcher


def bodies(daemon):
    client = daemon.imap()
    try:
        client.select("INBOX", readonly=True)
        _, data = client.uid("FETCH", "1:*", "(BODY.PEEK[])")
        return [item[1] for item in data if isinstance(item, tuple)]
    finally:
        client.logout()




def test_smtplib_and_swaks_mail_reaches_an_idle_client_sealed_at_rest(provider, tmp_path, request):
    bob = device(provider, str(tmp_path / "bob"), first=True).start()
    try:
        # The daemon registered its key: the MX takes mail for bob now.
        watcher = idle(bob)
        marker = b"SECRET-MARKER-" + os.urandom(6).hex().encode()
        message = (b"From: Alice <alice@example.net>\r\nTo: bob@example.org\r\n"
                   b"Subject: caf\xc3\xa9 " + marker + b"\r\n\r\n" + marker + b" body\r\n")
        started = time.monotonic()
        send(provider, message)
        assert watcher.readline() == b"* 1 EXISTS\r\n"
        elapsed = time.monotonic() - started
        assert elapsed < 5, elapsed
        assert watcher.readline() == b"* 1 RECENT\r\n"

        swaks_message = b"Subject: via swaks " + marker + b"\r\n\r\nswaks body"
        swaks_file = tmp_path / "swaks.eml"
        swaks_file.write_bytes(swaks_message)
        result = subprocess.run(
            ["swaks", "--server", "127.0.0.1", "--port", str(provider.mx_port), "--helo",
             "client.example", "--from", "sender@example.net", "--to", ADDRESS, "--data",
             "@" + str(swaks_file)], capture_output=True, timeout=60)
        assert result.returncode == 0, result.stdout.decode()
        assert watcher.readline() == b"* 2 EXISTS\r\n"
        assert watcher.readline() == b"* 2 RECENT\r\n"
        watcher.send(b"DONE\r\n")
        assert watcher.readline().startswith(b"I1 OK")
        watcher.logout()

        first, second = bodies(bob)
        trace = TRACE.match(first)
        assert trace, first[:300]
        assert first[trace.end():] == message
        trace = TRACE.match(second)
        # swaks's final CRLF before "." ends the last line (RFC 5321 4.1.1.4).
        assert trace and second[trace.end():] == swaks_message + b"\r\n"
        postgres = request.getfixturevalue("postgres_server") if provider.database else None
        # Imported: the provider's queue is empty, and no copy of the text is anywhere.
        wait_for(lambda: marker not in provider_bytes(provider, postgres), "the vacuum")
        assert marker not in provider_bytes(provider, postgres)
    finally:
        bob.stop()


def test_two_devices_show_each_message_once_even_when_claims_race(sqlite_provider, tmp_path):
    provider = sqlite_provider
    # Leases of 0 s: every claim is up for grabs at once, so both devices fetch, open
    # and import the same deliveries; the import's source keeps it to one message.
    race = ["--incoming-lease", "0"]
    one = device(provider, str(tmp_path / "one"), True, race).start()
    two = device(provider, str(tmp_path / "two"), False, race).start()
    try:
        messages = [b"Subject: race %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(12)]
        for message in messages:
            send(provider, message)

        def settled(daemon):
            found = sorted(b[TRACE.match(b).end():] for b in bodies(daemon))
            return found if len(found) >= len(messages) else None

        for daemon in (one, two):
            wait_for(lambda: settled(daemon), "all messages")
        # Give sync time to bring any duplicate over, then look again: still once each.
        wait_for(lambda: provider_incoming(provider) == 0, "an empty queue")
        for daemon in (one, two):
            wait_for(lambda: not _pending_sync(daemon), "sync to settle")
            assert settled(daemon) == sorted(messages)
    finally:
        one.stop()
        two.stop()


def _pending_sync(daemon):
    out = daemon._leapmail("--home", daemon.home, "status")
    return not re.search(r"pending:\s+0 ", out)


def provider_incoming(provider):
    storage = open_storage(provider.home, provider.database)
    try:
        user_id = storage.find_account(ADDRESS).user_id
        return storage.incoming_count(user_id, 2**40)
    finally:
        storage.close()


def test_an_unopenable_delivery_becomes_one_notice_and_shows_in_status(sqlite_provider, tmp_path):
    provider = sqlite_provider
    bob = device(provider, str(tmp_path / "bob"), True,
                 ["--incoming-retry", "1", "--incoming-attempts", "3"])
    bob.init()
    # Sealed to a key bob does not have, put straight into his queue.
    storage = open_storage(provider.home)
    try:
        user_id = storage.find_account(ADDRESS).user_id
        box = seal(IncomingKeyPair.generate().public_bytes(), b"Subject: lost\r\n\r\nx\r\n")
        storage.deliver([(user_id, "undecryptable01", [box])], int(time.time()) - 60)
    finally:
        storage.close()
    bob.start()
    try:
        status = wait_for(lambda: _status_with(bob, "1 failing to open"), "status to count it")
        assert "last failure: attempt" in status and "not for this key" in status
        [notice] = wait_for(lambda: bodies(bob), "the notice")
        assert b"Subject: A message could not be opened" in notice
        assert b"could not open it after 3 attempts" in notice
        assert b"undecryptable01" in notice
        wait_for(lambda: _status_with(
            bob, "incoming:  0 imported, 0 failing to open (retried with backoff), "
                 "1 replaced by a notice in INBOX"), "status to show the notice")
        assert provider_incoming(provider) == 0
        # Once: a restart does not bring it back, nor a second notice.
        bob.stop()
        bob.start()
        assert len(bodies(bob)) == 1
    finally:
        bob.stop()


def _status_with(daemon, text):
    out = daemon._leapmail("--home", daemon.home, "status")
    return out if text in out else None
