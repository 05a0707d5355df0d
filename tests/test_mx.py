"""The provider's MX as a real process, driven by smtplib, swaks and a raw socket.

Accounts get their incoming key through the storage layer here (the daemon's part is
in test_incoming.py); what the MX stored is read back the same way and opened with the
private key."""

import os
import smtplib
import socket
import subprocess

import pytest

from leapmail.crypto.sealed import IncomingKeyPair
from leapmail.provider.storage import open_storage
from provider_process import ProviderProcess

MAX = 200_000
MARKER = b"MX-PLAINTEXT-MARKER-51c2"


@pytest.fixture(scope="module")
def mx(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("mx") / "provider")
    process = ProviderProcess(home, extra_args=["--mx-port", "0", "--max-message-size",
                                                str(MAX), "--hostname", "mx.example.org"])
    keys = IncomingKeyPair.generate()
    process.keys = keys
    process.start()
    storage = open_storage(process.home)
    for address in ("alice@example.org", "bob@example.org"):
        storage.create_user(address, b"h" * 32, 2**40, 0)
        storage.claim(address, b"h" * 32, 1, {"name": "scrypt"}, os.urandom(32), b"bundle",
                      "dev1", "laptop", os.urandom(32), 2**40)
    storage.set_incoming_key(storage.find_account("alice@example.org").user_id,
                             keys.public_bytes())
    process.storage = storage
    yield process
    storage.close()
    process.stop()


@pytest.fixture
def inbox(mx):
    """Read and empty alice's incoming queue: ``take()`` -> [plaintext, ...]."""
    user_id = mx.storage.find_account("alice@example.org").user_id

    def take():
        out = []
        for record in mx.storage.claim_incoming(user_id, "test", 100, 0, 2**40):
            box = b"".join(mx.storage.incoming_chunk(user_id, record.id, n)
                           for n in range(record.chunks))
            out.append(mx.keys.open(box))
            mx.storage.delete_incoming(user_id, [record.id])
        return out

    take()
    yield take


def smtp(mx):
    client = smtplib.SMTP("127.0.0.1", mx.mx_port, timeout=30)
    client.ehlo("client.example")
    return client


def split_trace(stored):
    head, sep, rest = stored.partition(b"\r\n\t")
    assert head.startswith(b"Received: from client.example ([127.0.0.1])")
    by, sep2, rest = rest.partition(b"\r\n\t")
    assert by.startswith((b"by mx.example.org (leapmail) with ESMTP id ",
                          b"by mx.example.org (leapmail) with ESMTPS id "))
    for_line, _, rest = rest.partition(b"\r\n\t")
    assert for_line == b"for <alice@example.org>;"
    date, _, message = rest.partition(b"\r\n")
    assert date.endswith((b"+0000", b"-0000"))
    return message


def test_smtplib_delivery_is_byte_exact_with_8bit_headers(mx, inbox):
    client = smtp(mx)
    for ext in ("size", "8bitmime", "pipelining", "enhancedstatuscodes"):
        assert client.has_extn(ext), ext
    assert client.esmtp_features["size"] == str(MAX)
    message = (b"From: Z\xc3\xbcrich <z@example.net>\r\nSubject: caf\xe9 " + MARKER + b"\r\n"
               b"\r\n.leading dot\r\n" + b"line\r\n" * 1000 + b"no final newline")
    refused = client.sendmail("z@example.net", ["alice@example.org"], message,
                              mail_options=["BODY=8BITMIME"])
    assert refused == {}
    code, reply = client.noop()
    client.quit()
    [stored] = inbox()
    # smtplib ends the data with CRLF; the rest is as sent.
    assert split_trace(stored) == message + b"\r\n"
    with open(os.path.join(mx.home, "provider.db"), "rb") as f:
        assert MARKER not in f.read()
    wal = os.path.join(mx.home, "provider.db-wal")
    if os.path.exists(wal):
        with open(wal, "rb") as f:
            assert MARKER not in f.read()


def test_unknown_users_foreign_domains_and_bad_addresses(mx, inbox):
    client = smtp(mx)
    client.mail("z@example.net")
    assert client.rcpt("nobody@example.org") == (550, b"5.1.1 no such user here")
    # An account without an incoming key cannot receive yet.
    assert client.rcpt("bob@example.org") == (550, b"5.1.1 no such user here")
    assert client.rcpt("alice@elsewhere.net") == (
        550, b"5.7.1 relaying denied: not a domain of this provider")
    assert client.rcpt("<no-at-sign>") == (553, b"5.1.3 malformed recipient address")
    assert client.rcpt("<a@b@c>") == (553, b"5.1.3 malformed recipient address")
    assert client.docmd("DATA") == (503, b"5.5.1 MAIL and RCPT first")
    assert client.docmd("RCPT TO:<alice@example.org> NOTIFY=NEVER")[0] == 501
    client.quit()
    assert inbox() == []


def test_oversized_messages_are_refused_552_and_nothing_stored(mx, inbox):
    client = smtp(mx)
    code, text = client.mail("z@example.net", [f"SIZE={MAX + 1}"])
    assert (code, text) == (552, f"5.3.4 message exceeds the size limit of {MAX} bytes".encode())
    client.rset()
    # Undeclared: refused at the end of DATA, once the client has sent it all.
    assert client.mail("z@example.net")[0] == 250
    assert client.rcpt("alice@example.org")[0] == 250
    code, text = client.data(b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 3000)
    assert (code, text) == (552, f"5.3.4 message exceeds the size limit of {MAX} bytes".encode())
    # The connection goes on.
    assert client.sendmail("z@example.net", ["alice@example.org"], b"Subject: small\r\n\r\nok\r\n") == {}
    client.quit()
    assert [split_trace(m) for m in inbox()] == [b"Subject: small\r\n\r\nok\r\n"]


def test_a_connection_dropped_mid_data_stores_nothing(mx, inbox):
    sock = socket.create_connection(("127.0.0.1", mx.mx_port), timeout=30)
    sock.sendall(b"EHLO client.example\r\nMAIL FROM:<z@example.net>\r\n"
                 b"RCPT TO:<alice@example.org>\r\nDATA\r\n")
    received = b""
    while b"354" not in received:
        received += sock.recv(4096)
    sock.sendall(b"Subject: cut\r\n\r\n" + b"partial line\r\n" * 1000)
    sock.close()
    # The same connection's successor finds the MX fine, and only its message stored.
    client = smtp(mx)
    assert client.sendmail("z@example.net", ["alice@example.org"], b"Subject: after\r\n\r\nx\r\n") == {}
    client.quit()
    assert [split_trace(m) for m in inbox()] == [b"Subject: after\r\n\r\nx\r\n"]


def test_pipelined_commands_are_answered_in_order(mx, inbox):
    sock = socket.create_connection(("127.0.0.1", mx.mx_port), timeout=30)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"220 mx.example.org")
    # Everything in one write, RCPTs that need the database included (RFC 2920).
    sock.sendall(b"EHLO client.example\r\nMAIL FROM:<z@example.net>\r\n"
                 b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<alice@example.org>\r\n"
                 b"RCPT TO:<ALICE@example.org>\r\nDATA\r\nSubject: piped\r\n\r\nbody\r\n.\r\n"
                 b"MAIL FROM:<z@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
                 b"Subject: second\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
    replies = []
    while True:
        line = reader.readline()
        if not line:
            break
        if line[3:4] == b" ":
            replies.append(line[:3].decode())
    assert replies == ["250", "250", "550", "250", "250", "354", "250", "250", "250", "354",
                       "250", "221"]
    # (Deliveries of one second come back in no particular order.)
    second, first = sorted(inbox(), key=lambda m: b"piped" in m)
    # Two names of one account: one copy; the trace names no single "for" then.
    assert b"\r\n\tfor <" not in first
    assert first.split(b"\r\n\t")[-1].split(b"\r\n", 1)[1] == b"Subject: piped\r\n\r\nbody\r\n"
    assert split_trace(second) == b"Subject: second\r\n\r\n.dot\r\n"


def test_garbage_and_long_lines_get_clear_replies(mx, inbox):
    sock = socket.create_connection(("127.0.0.1", mx.mx_port), timeout=30)
    reader = sock.makefile("rb")
    reader.readline()
    sock.sendall(b"\xff\xfe BOGUS\r\nEHLO client.example\r\n"
                 b"MAIL FROM:<z@example.net> SIZE=abc\r\n")
    assert reader.readline() == b"500 5.5.1 command not recognized\r\n"
    while not reader.readline().startswith(b"250 "):
        pass
    assert reader.readline() == b"501 5.5.4 SIZE takes a number of bytes\r\n"
    sock.sendall(b"NOOP " + b"x" * (70 * 1024) + b"\r\n")
    assert reader.readline().startswith(b"500 5.5.6 line longer than")
    assert reader.readline() == b""
    sock.close()


def test_starttls_starts_the_session_over_and_drops_what_was_piped_in_the_clear(
        mx, inbox):
    import ssl

    sock = socket.create_connection(("127.0.0.1", mx.mx_port), timeout=30)
    reader = sock.makefile("rb")
    reader.readline()
    sock.sendall(b"MAIL FROM:<z@example.net>\r\n")
    assert reader.readline() == b"503 5.5.1 say EHLO first\r\n"
    sock.sendall(b"EHLO client.example\r\n")
    while not reader.readline().startswith(b"250 "):
        pass
    # The injection of CVE-2011-0411: a command sent in the clear behind STARTTLS.
    sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@example.net>\r\n")
    assert reader.readline().startswith(b"220 ")
    context = ssl.create_default_context(cafile=mx.ca_path)
    context.check_hostname = False
    tls = context.wrap_socket(sock, server_hostname="127.0.0.1")
    reader = tls.makefile("rb")
    # Nothing answers the injected MAIL, and EHLO must come again (RFC 3207 4.2).
    tls.sendall(b"MAIL FROM:<z@example.net>\r\n")
    assert reader.readline() == b"503 5.5.1 say EHLO first\r\n"
    tls.sendall(b"EHLO client.example\r\nMAIL FROM:<z@example.net>\r\n"
                b"RCPT TO:<alice@example.org>\r\nDATA\r\n")
    replies = []
    while len(replies) < 4:
        line = reader.readline()
        if line[3:4] == b" ":
            replies.append(line[:3])
    assert replies == [b"250", b"250", b"250", b"354"]
    tls.sendall(b"Subject: over TLS\r\n\r\nsecret\r\n.\r\nQUIT\r\n")
    assert reader.readline().startswith(b"250 ")
    tls.close()
    (stored,) = inbox()
    assert b" with ESMTPS id " in stored.split(b"\r\n\r\n")[0]  # RFC 3848
    assert split_trace(stored) == b"Subject: over TLS\r\n\r\nsecret\r\n"


def test_swaks_delivery(mx, inbox, tmp_path):
    body = tmp_path / "message.eml"
    message = b"From: swaks@example.net\r\nSubject: via swaks\r\n\r\nHello from swaks.\r\n"
    # swaks ends the data with CRLF "." CRLF; that CRLF ends the message's last line.
    body.write_bytes(message[:-2])
    result = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(mx.mx_port), "--helo",
         "client.example", "--from", "swaks@example.net", "--to", "alice@example.org",
         "--data", "@" + str(body), "--pipeline"],
        capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert b"<-  250 2.0.0 message accepted for delivery" in result.stdout
    [stored] = inbox()
    assert split_trace(stored) == message


def test_a_client_making_too_many_errors_is_dropped(mx, inbox):
    sock = socket.create_connection(("127.0.0.1", mx.mx_port), timeout=30)
    reader = sock.makefile("rb")
    reader.readline()
    # Pipelined abuse: a burst of unknown-user probes, all in one write.
    sock.sendall(b"EHLO client.example\r\nMAIL FROM:<z@example.net>\r\n"
                 + b"".join(b"RCPT TO:<probe%d@example.org>\r\n" % i for i in range(40)))
    lines = []
    while True:
        line = reader.readline()
        if not line:
            break
        lines.append(line)
    codes = [line[:3] for line in lines if line[3:4] == b" "]
    assert codes == [b"250", b"250"] + [b"550"] * 20 + [b"421"]
    assert lines[-1] == b"421 4.7.0 too many errors; closing the connection\r\n"
    sock.close()
