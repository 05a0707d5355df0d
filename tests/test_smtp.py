"""Outgoing mail end to end, all real processes: msmtp and swaks (Debian) and raw
sockets as mail clients → Alice's daemon (local SMTP, outbox, relay) → the provider's
submission port → a smarthost (Twisted's own ESMTP server, tests/helpers/smtp_sink.py)
or the provider's own users.

Waiting is for a condition with a deadline (a file appearing, a status line), never
for a fixed time.
"""


import os
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time

import pytest

from leapmail_daemon import BIN, HERE, LeapmailDaemon, TwistdProcess
from provider_process import ProviderProcess
from polling import wait_for

ALICE = "alice@example.org"
PASSPHRASE = "correct horse battery staple"
MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@elsewhere.test>\r\n"
    b"Subject: lunch?\r\n"
    b"Date: Sun, 22 Nov 2026 08:00:00 +0000\r\n"
    b"Message-ID: <lunch-1@example.org>\r\n"
    b"\r\n"
    b"Noon at the usual place?\r\n"
    b".a line that starts with a dot\r\n"
    b"\r\n"
    b"Alice\r\n"
)
TRACE = re.compile(rb"Received: from [^\r\n]+\r\n\tby [^\r\n]+; [^\r\n]+\r\n\Z")


class SinkProcess(TwistdProcess):
    listening = re.compile(rb"sink listening on ([0-9.]+):([0-9]+)")

    def __init__(self, directory):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        super().__init__(directory.rstrip("/") + "-sink.log")

    def start(self):
        self.run([sys.executable, os.path.join(HERE, "helpers", "smtp_sink.py"),
                  self.directory])
        return self

    def messages(self):
        """``{file name: bytes}`` of what the sink took so far."""
        found = {}
        for name in sorted(os.listdir(self.directory)):
            if name.endswith(".eml") and not name.startswith("."):
                with open(os.path.join(self.directory, name), "rb") as f:
                    found[name] = f.read()
        return found




@pytest.fixture
def sink(tmp_path):
    process = SinkProcess(str(tmp_path / "sink")).start()
    yield process
    process.stop()


@pytest.fixture
def provider(tmp_path, sink):
    process = ProviderProcess(str(tmp_path / "provider"), submission=True,
                              extra_args=["--smarthost", f"127.0.0.1:{sink.port}"])
    process.code = process.adduser(ALICE)
    process.start()
    yield process
    process.stop()


def alice_daemon(provider, home, *extra):
    return LeapmailDaemon(home, PASSPHRASE, ALICE, init_args=[
        "--provider", provider.url, "--provider-ca", provider.ca_path, "--enroll",
        provider.code], extra_args=[
        "--submission", f"127.0.0.1:{provider.submission_port}", *extra])


@pytest.fixture
def alice(provider, tmp_path):
    daemon = alice_daemon(provider, str(tmp_path / "alice")).start()
    yield daemon
    daemon.stop()


def status(daemon):
    result = subprocess.run([os.path.join(BIN, "leapmail"), "--home", daemon.home, "status"],
                            capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def queued(daemon):
    match = re.search(r"^outbox: +(\d+) queued", status(daemon), re.M)
    return None if match is None else int(match.group(1))


def mailbox(daemon, name):
    """The BODY[] of every message in a mailbox, in UID order."""
    client = daemon.imap()
    try:
        typ, _ = client.select(name, readonly=True)
        assert typ == "OK"
        _, data = client.uid("FETCH", "1:*", "(BODY.PEEK[])")
        return [item[1] for item in data if isinstance(item, tuple)]
    finally:
        client.logout()


def msmtp(daemon, tmp_path, recipients, message):
    rc = tmp_path / "msmtprc"
    rc.write_text(
        "account default\n"
        "host 127.0.0.1\n"
        f"port {daemon.smtp_port}\n"
        "auth on\n"
        f"user {daemon.user}\n"
        f"password {daemon.password}\n"
        "tls on\n"
        "tls_starttls on\n"
        f"tls_trust_file {daemon.home}/tls-cert.pem\n"
        f"from {ALICE}\n"
    )
    rc.chmod(0o600)
    return subprocess.run(["msmtp", "-C", str(rc), *recipients], input=message,
                          capture_output=True, timeout=120)


def swaks(*args):
    result = subprocess.run(["swaks", "--hide-informational", "--suppress-data", *args],
                            capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
    return result.returncode, result.stdout.decode(errors="replace")


def smtp_chat(port, lines, until_closed=False):
    """Say ``lines`` one at a time on a raw connection; returns every reply line
    (and with ``until_closed``, ``b"<closed>"`` once the server has closed)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    f = sock.makefile("rb")
    replies = []

    def reply():
        while True:
            line = f.readline()
            if not line:
                replies.append(b"<closed>")
                return
            replies.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return

    reply()
    for line in lines:
        sock.sendall(line)
        reply()
    if until_closed and replies[-1] != b"<closed>":
        replies.append(f.read() or b"<closed>")
    sock.close()
    return replies


def test_msmtp_through_the_daemon_and_provider_to_a_smarthost_with_a_sent_copy(
        provider, sink, tmp_path):
    alice = alice_daemon(provider, str(tmp_path / "alice"), "--save-sent").start()
    try:
        result = msmtp(alice, tmp_path, ["bob@elsewhere.test"], MESSAGE)
        assert result.returncode == 0, result.stderr
        got = wait_for(sink.messages, "the message at the smarthost")
        assert list(got) == ["0001-bob@elsewhere.test.eml"]
        data = got["0001-bob@elsewhere.test.eml"]
        # Exactly the client's bytes, after the provider's one trace field.
        assert data.endswith(MESSAGE)
        assert TRACE.match(data[:-len(MESSAGE)]), data[:-len(MESSAGE)]
        assert wait_for(lambda: mailbox(alice, "Sent"), "the Sent copy") == [MESSAGE]
        wait_for(lambda: queued(alice) == 0, "an empty outbox")
        assert len(sink.messages()) == 1
        assert mailbox(alice, "INBOX") == []
    finally:
        alice.stop()


def test_without_save_sent_nothing_goes_into_sent(alice, sink, tmp_path):
    result = msmtp(alice, tmp_path, ["bob@elsewhere.test"], MESSAGE)
    assert result.returncode == 0, result.stderr
    wait_for(sink.messages, "the message at the smarthost")
    wait_for(lambda: queued(alice) == 0, "an empty outbox")
    assert mailbox(alice, "Sent") == []


def test_provider_down_the_message_stays_queued_across_a_crash(provider, sink, tmp_path):
    alice = alice_daemon(provider, str(tmp_path / "alice")).start()
    try:
        provider.stop()
        result = msmtp(alice, tmp_path, ["bob@elsewhere.test"], MESSAGE)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: queued(alice) == 1, "the status to show one queued message")
        assert re.search(r"^relay: +.*cannot connect", status(alice), re.M), status(alice)
        alice.kill()  # a crash: the 250 was given, so the message must survive it
        provider.start()
        alice.start()
        got = wait_for(sink.messages, "the message at the smarthost")
        wait_for(lambda: queued(alice) == 0, "an empty outbox")
        assert list(sink.messages()) == list(got) == ["0001-bob@elsewhere.test.eml"]
        assert sink.messages()["0001-bob@elsewhere.test.eml"].endswith(MESSAGE)
    finally:
        alice.stop()


def test_a_refused_recipient_gets_one_bounce_and_the_others_the_message(alice, sink,
                                                                          tmp_path):
    # nobody@example.org: the provider hosts example.org and has no such user (550 5.1.1
    # at RCPT); bob@elsewhere.test goes through the smarthost.
    result = msmtp(alice, tmp_path, ["nobody@example.org", "bob@elsewhere.test"], MESSAGE)
    assert result.returncode == 0, result.stderr
    got = wait_for(sink.messages, "the message at the smarthost")
    assert list(got) == ["0001-bob@elsewhere.test.eml"]
    inbox = wait_for(lambda: mailbox(alice, "INBOX"), "the bounce")
    wait_for(lambda: queued(alice) == 0, "an empty outbox")
    inbox = mailbox(alice, "INBOX")
    assert len(inbox) == 1
    bounce = inbox[0]
    assert b"Content-Type: multipart/report; report-type=delivery-status" in bounce
    status_part = bounce.split(b"Content-Type: message/delivery-status\r\n\r\n")[1]
    status_part = status_part.split(b"\r\n--")[0]
    assert b"Final-Recipient: rfc822; nobody@example.org\r\n" in status_part
    assert b"Action: failed\r\n" in status_part
    assert b"Status: 5.1.1\r\n" in status_part
    assert b"bob@elsewhere.test" not in status_part
    assert b"Subject: lunch?\r\n" in bounce.split(b"Content-Type: text/rfc822-headers")[1]


def test_a_smarthost_refusal_bounces_every_recipient_once(alice, sink, tmp_path):
    result = msmtp(alice, tmp_path, ["reject-me@elsewhere.test"], MESSAGE)
    assert result.returncode == 0, result.stderr
    inbox = wait_for(lambda: mailbox(alice, "INBOX"), "the bounce")
    wait_for(lambda: queued(alice) == 0, "an empty outbox")
    inbox = mailbox(alice, "INBOX")
    assert len(inbox) == 1
    assert b"Final-Recipient: rfc822; reject-me@elsewhere.test\r\n" in inbox[0]
    assert b"Status: 5.1.1\r\n" in inbox[0]
    assert b"550 5.1.1 no such user at the sink" in inbox[0]
    assert sink.messages() == {}


# -- bad input at the local SMTP ----------------------------------------------------------

def test_local_smtp_refusals(alice, tmp_path):
    base = ["--server", "127.0.0.1", "--port", str(alice.smtp_port), "--from", ALICE,
            "--to", "bob@elsewhere.test"]
    code, out = swaks(*base, "--auth", "PLAIN", "--auth-user", alice.user,
                      "--auth-password", "wrong")
    assert code != 0 and "<** 535 5.7.8 authentication credentials invalid" in out, out
    code, out = swaks(*base)
    assert code != 0 and "<** 530 5.7.0 authentication required" in out, out
    code, out = swaks("--server", "127.0.0.1", "--port", str(alice.smtp_port),
                      "--from", "mallory@example.org", "--to", "bob@elsewhere.test",
                      "--auth", "LOGIN", "--auth-user", alice.user,
                      "--auth-password", alice.password)
    assert code != 0 and ("<** 553 5.7.1 the sender must be this account's address "
                          f"<{ALICE}>") in out, out
    replies = smtp_chat(alice.smtp_port, [
        b"EHLO me\r\n", _auth_plain(alice), f"MAIL FROM:<{ALICE}>\r\n".encode(),
        b"RCPT TO:<not an address>\r\n", b"RCPT TO:<bob@@elsewhere.test>\r\n",
        b"MAIL FROM:<x>\r\n"])
    assert replies[-3:] == [
        b"501 5.1.3 the recipient address is not a valid address",
        b"501 5.1.3 the recipient address is not a valid address",
        b"503 5.5.1 nested MAIL command"]
    replies = smtp_chat(alice.smtp_port, [
        b"EHLO me\r\n", _auth_plain(alice), b"MAIL FROM:<alice@@example.org>\r\n",
        b"DATA\r\n"])
    assert replies[-2:] == [b"553 5.1.7 the sender address is not a valid address",
                            b"503 5.5.1 need MAIL and RCPT before DATA"]


def _auth_plain(daemon):
    import base64

    return b"AUTH PLAIN " + base64.b64encode(
        b"\0" + daemon.user.encode() + b"\0" + daemon.password.encode()) + b"\r\n"


def test_local_smtp_bounds_and_drops(alice, sink, tmp_path):
    hello = [b"EHLO me\r\n", _auth_plain(alice)]
    replies = smtp_chat(alice.smtp_port, hello + [
        f"MAIL FROM:<{ALICE}> SIZE=60000000\r\n".encode()])
    assert replies[-1] == b"552 5.3.4 message too big: the limit is 52428800 bytes"
    # 8-bit bytes in the header.
    replies = smtp_chat(alice.smtp_port, hello + [
        f"MAIL FROM:<{ALICE}>\r\n".encode(), b"RCPT TO:<bob@elsewhere.test>\r\n",
        b"DATA\r\n", b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n.\r\n"])
    assert replies[-1].startswith(b"554 5.6.0 the header has 8-bit bytes")
    # Too many recipients.
    lines = hello + [f"MAIL FROM:<{ALICE}>\r\n".encode()] + [
        f"RCPT TO:<r{i}@elsewhere.test>\r\n".encode() for i in range(101)]
    replies = smtp_chat(alice.smtp_port, lines)
    assert replies[-2] == b"250 2.1.5 recipient OK"
    assert replies[-1] == b"452 4.5.3 too many recipients: at most 100 per message"
    # A command line past the bound closes the connection.
    replies = smtp_chat(alice.smtp_port, [b"NOOP " + b"x" * 10000 + b"\r\n"],
                        until_closed=True)
    assert replies[-2:] == [b"500 5.5.2 line too long", b"<closed>"]
    # Pipelined junk is answered in order, then the connection is closed.
    sock = socket.create_connection(("127.0.0.1", alice.smtp_port), timeout=30)
    sock.sendall(b"EHLO me\r\n" + b"BOGUS\r\n" * 20)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    assert data.count(b"500 5.5.1 command not recognized\r\n") == 10
    assert data.endswith(b"421 4.7.0 too many errors; closing the connection\r\n")
    # A connection dropped in the middle of DATA leaves nothing behind: the next
    # message is the only one that goes out.
    sock = socket.create_connection(("127.0.0.1", alice.smtp_port), timeout=30)
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(b"EHLO me\r\n" + _auth_plain(alice) + f"MAIL FROM:<{ALICE}>\r\n".encode()
                 + b"RCPT TO:<dropped@elsewhere.test>\r\nDATA\r\n")
    while not f.readline().startswith(b"354"):
        pass
    sock.sendall(b"Subject: half\r\n\r\n" + b"x" * 1_000_000)
    sock.close()
    result = msmtp(alice, tmp_path, ["bob@elsewhere.test"], MESSAGE)
    assert result.returncode == 0, result.stderr
    wait_for(sink.messages, "the message at the smarthost")
    wait_for(lambda: queued(alice) == 0, "an empty outbox")
    assert list(sink.messages()) == ["0001-bob@elsewhere.test.eml"]


def test_an_oversized_message_is_refused_and_not_queued(alice, sink):
    sock = socket.create_connection(("127.0.0.1", alice.smtp_port), timeout=60)
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(b"EHLO me\r\n" + _auth_plain(alice) + f"MAIL FROM:<{ALICE}>\r\n".encode()
                 + b"RCPT TO:<big@elsewhere.test>\r\nDATA\r\n")
    while not f.readline().startswith(b"354"):
        pass
    line = b"y" * 998 + b"\r\n"
    chunk = b"Subject: big\r\n\r\n" + line * 1024
    for _ in range(52):
        sock.sendall(chunk)
    sock.sendall(b".\r\nQUIT\r\n")
    assert f.readline() == b"552 5.3.4 message too big: the limit is 52428800 bytes\r\n"
    assert f.readline() == b"221 2.0.0 bye\r\n"
    sock.close()
    # Nothing was queued: a restart's relay run finds nothing to send.
    alice.stop()
    alice.start()
    wait_for(lambda: queued(alice) == 0, "the relay's status after the restart")
    assert sink.messages() == {}


# -- bad input at the provider's submission port ----------------------------------------

def test_submission_refusals(provider, alice):
    base = ["--server", "127.0.0.1", "--port", str(provider.submission_port),
            "--to", "bob@elsewhere.test", "--from", ALICE]
    # Without TLS, AUTH is not offered, and mail without AUTH is refused.
    code, out = swaks(*base, "--auth", "PLAIN", "--auth-user", ALICE,
                      "--auth-password", "x" * 43)
    # swaks's 28: the server offered no authentication (RFC 4954: not before TLS).
    assert code == 28 and "AUTH" not in out and "MAIL FROM" not in out, out
    code, out = swaks(*base)
    assert code != 0 and "<** 530 5.7.0 authentication required" in out, out
    # AUTH in the clear, said anyway.
    replies = smtp_chat(provider.submission_port,
                        [b"EHLO me\r\n", b"AUTH PLAIN AGFsaWNlAHg=\r\n"])
    assert replies[-1] == b"538 5.7.11 encryption required: use STARTTLS before AUTH"
    # Inside TLS, a wrong token (swaks has no TLS here: Python's smtplib).
    with submission_client(provider) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            client.login(ALICE, "x" * 43)
        assert e.value.smtp_code == 535


def submission_client(provider):
    client = smtplib.SMTP("127.0.0.1", provider.submission_port, timeout=60)
    client.starttls(context=ssl.create_default_context(cafile=provider.ca_path))
    return client


def test_submission_takes_only_the_authenticated_sender(provider, alice):
    token = device_token(provider)
    with submission_client(provider) as client:
        client.login("carol@example.org", token)
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            client.sendmail(ALICE, ["bob@elsewhere.test"], MESSAGE)
        assert (e.value.smtp_code, e.value.smtp_error) == (
            553, b"5.7.1 the sender must be the authenticated address <carol@example.org>")
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            client.sendmail("carol@example.org", ["nobody@example.org"], MESSAGE)
        assert e.value.recipients == {"nobody@example.org": (
            550, b"5.1.1 <nobody@example.org>: no such user here")}


def device_token(provider):
    """Enroll carol@example.org through the API: her device token."""
    import base64
    import hashlib
    import http.client
    import json

    code = provider.adduser("carol@example.org")
    kdf = {"name": "scrypt", "version": 1, "salt": base64.b64encode(b"s" * 16).decode(), "n": 16384,
           "r": 8, "p": 1}
    body = {"address": "carol@example.org", "code": code,
            "login": {"kdf": kdf, "verifier": base64.b64encode(
                hashlib.sha256(b"k" * 32).digest()).decode()},
            "bundle": base64.b64encode(b"sealed").decode(), "device": "test"}
    conn = http.client.HTTPSConnection("127.0.0.1", provider.port, timeout=60,
                                       context=ssl.create_default_context(
                                           cafile=provider.ca_path))
    try:
        conn.request("POST", "/v1/enroll", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 201, answer
    return answer["token"]





def test_commands_pipelined_after_starttls_are_not_taken(alice):
    # CVE-2011-0411: what came in the clear with STARTTLS must not count as said
    # inside TLS.
    sock = socket.create_connection(("127.0.0.1", alice.smtp_port), timeout=30)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"220 ")
    sock.sendall(b"EHLO me\r\n")
    while f.readline()[3:4] == b"-":
        pass
    sock.sendall(b"STARTTLS\r\n" + _auth_plain(alice) + b"MAIL FROM:<" + ALICE.encode()
                 + b">\r\n")
    assert f.readline() == b"220 2.0.0 ready to start TLS\r\n"
    context = ssl.create_default_context(cafile=f"{alice.home}/tls-cert.pem")
    tls = context.wrap_socket(sock, server_hostname="127.0.0.1")
    tf = tls.makefile("rb")
    # Inside TLS the session starts over: no EHLO, no AUTH, no MAIL yet.
    tls.sendall(b"MAIL FROM:<" + ALICE.encode() + b">\r\n")
    assert tf.readline() == b"503 5.5.1 say EHLO first\r\n"
    tls.sendall(b"EHLO me\r\n")
    lines = []
    while True:
        line = tf.readline()
        lines.append(line)
        if line[3:4] != b"-":
            break
    assert b"250-AUTH PLAIN LOGIN\r\n" in lines or b"250 AUTH PLAIN LOGIN\r\n" in lines
    assert not any(b"STARTTLS" in line for line in lines)
    tls.sendall(b"MAIL FROM:<" + ALICE.encode() + b">\r\n")
    assert tf.readline() == b"530 5.7.0 authentication required\r\n"
    tls.close()


def test_submission_delivers_to_the_providers_own_users_through_the_intake(provider, sink):
    from leapmail.crypto.sealed import IncomingKeyPair
    from leapmail.provider.storage import open_storage

    token = device_token(provider)
    key = IncomingKeyPair.generate()
    # The device side of registering an incoming key is not this test's business:
    # the key goes straight into the provider's database.
    storage = open_storage(provider.home, None)
    try:
        carol = storage.find_account("carol@example.org").user_id
        storage.set_incoming_key(carol, key.public_bytes())
        message = MESSAGE.replace(b"bob@elsewhere.test", b"carol@example.org")
        # A client that hangs up in the middle of DATA leaves nothing behind.
        dropped = submission_client(provider)
        dropped.login("carol@example.org", token)
        assert dropped.mail("carol@example.org")[0] == 250
        assert dropped.rcpt("carol@example.org")[0] == 250
        dropped.putcmd("data")
        assert dropped.getreply()[0] == 354
        dropped.send(b"Subject: half\r\n\r\n" + b"partial line\r\n" * 100_000)
        dropped.close()
        with submission_client(provider) as client:
            client.login("carol@example.org", token)
            refused = client.sendmail("carol@example.org",
                                      ["Carol@example.org", "bob@elsewhere.test"], message)
            assert refused == {}
        [record] = storage.claim_incoming(carol, "test-device", 10, time.time() + 60,
                                          time.time())
        box = b"".join(storage.incoming_chunk(carol, record.id, n)
                       for n in range(record.chunks))
    finally:
        storage.close()
    opened = key.open(box)
    assert opened.endswith(message)
    assert TRACE.match(opened[:-len(message)]), opened[:-len(message)]
    [(name, data)] = sink.messages().items()
    assert name == "0001-bob@elsewhere.test.eml" and data.endswith(message)


def test_a_big_message_arrives_byte_exact(alice, sink):
    # Dot-stuffed lines everywhere, also across the 256 KiB pieces and chunks the
    # message is cut into on its way.
    lines = [b"Subject: big\r\nFrom: <alice@example.org>\r\n\r\n"]
    for i in range(120_000):
        lines.append(b"." * (i % 3) + b"line %06d of a big message, with some padding\r\n" % i)
    message = b"".join(lines)
    assert len(message) > 6_000_000
    client = smtplib.SMTP("127.0.0.1", alice.smtp_port, timeout=120)
    try:
        client.login(alice.user, alice.password)
        assert client.sendmail(ALICE, ["bob@elsewhere.test"], message) == {}
    finally:
        client.quit()
    got = wait_for(sink.messages, "the message at the smarthost")
    data = got["0001-bob@elsewhere.test.eml"]
    assert data.endswith(message)
    assert TRACE.match(data[:-len(message)])


def test_a_token_the_provider_refuses_is_replaced_and_the_mail_still_goes(alice, provider,
                                                                          sink, tmp_path):
    import sqlite3

    # Every device token of the provider expires now (as after 30 days).
    db = sqlite3.connect(os.path.join(provider.home, "provider.db"))
    with db:
        assert db.execute("UPDATE devices SET expires = 0").rowcount == 1
    db.close()
    result = msmtp(alice, tmp_path, ["bob@elsewhere.test"], MESSAGE)
    assert result.returncode == 0, result.stderr
    # Well within the sync loop's long poll (25 s): the relay logged in by itself.
    got = wait_for(sink.messages, "the message at the smarthost", deadline=15)
    assert list(got) == ["0001-bob@elsewhere.test.eml"]
    assert "logged in to the provider again (new device token)" in alice.log_text()


def test_a_40_mb_message_is_queued_without_being_held_in_memory(alice, provider):
    from dovecot_server import reset_peak, vm_hwm, vm_rss

    provider.stop()
    line = b"z" * 78 + b"\r\n"
    body = line * (40 * 1024 * 1024 // len(line))
    message = b"Subject: huge\r\n\r\n" + body
    client = smtplib.SMTP("127.0.0.1", alice.smtp_port, timeout=120)
    try:
        client.login(alice.user, alice.password)
        before = vm_rss(alice.pid)
        reset_peak(alice.pid)
        assert client.sendmail(ALICE, ["bob@elsewhere.test"], message) == {}
        peak = vm_hwm(alice.pid)
    finally:
        client.quit()
    # The message streams into the outbox a piece at a time: the daemon's peak grows
    # by a few pieces and chunks, not by the message.
    assert peak - before < 16 * 1024 * 1024, (before, peak)
    wait_for(lambda: queued(alice) == 1, "the status to show the message queued")


def test_alice_sends_with_msmtp_and_bob_finds_it_in_his_inbox(provider, tmp_path):
    bob_code = provider.adduser("bob@example.org")
    alice = alice_daemon(provider, str(tmp_path / "alice")).start()
    bob = LeapmailDaemon(str(tmp_path / "bob"), "bob's passphrase", "bob@example.org",
                         init_args=["--provider", provider.url, "--provider-ca",
                                    provider.ca_path, "--enroll", bob_code]).start()
    try:
        message = MESSAGE.replace(b"bob@elsewhere.test", b"bob@example.org")
        result = msmtp(alice, tmp_path, ["bob@example.org"], message)
        assert result.returncode == 0, result.stderr
        [got] = wait_for(lambda: mailbox(bob, "INBOX"), "the message in Bob's INBOX")
        # Exactly what msmtp sent, after the provider's one trace field.
        assert got.endswith(message)
        assert TRACE.match(got[:-len(message)]), got[:-len(message)]
        wait_for(lambda: queued(alice) == 0, "Alice's empty outbox")
        assert mailbox(bob, "INBOX") == [got]
        assert mailbox(alice, "INBOX") == []
    finally:
        alice.stop()
        bob.stop()


def test_a_bad_submission_address_is_one_line_and_exit_status_1(tmp_path):
    import json

    home = str(tmp_path / "home")
    env = dict(os.environ, LEAPMAIL_PASSPHRASE=PASSPHRASE)
    subprocess.run([os.path.join(BIN, "leapmail"), "init", "--home", home, "--address",
                    ALICE], env=env, check=True, capture_output=True, timeout=120)
    with open(os.path.join(home, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(home, "config.json"), "w") as f:
        json.dump(dict(config, provider="https://127.0.0.1:1"), f)
    result = subprocess.run(
        [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "leapmail", "--home", home,
         "--imap-port", "0", "--smtp-port", "0", "--submission", "nonsense"],
        env=env, capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 1
    assert result.stderr.decode().endswith(
        "leapmail: the submission address must be HOST:PORT, not 'nonsense'\n")
    assert b"Traceback" not in result.stdout + result.stderr
