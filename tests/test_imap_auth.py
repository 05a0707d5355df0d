"""Authentication over the wire: PLAIN with and without an initial response, the
throttle on repeated failures, and STARTTLS that takes no command sent before it."""

import base64
import socket
import ssl
import time

import pytest_twisted
from twisted.internet import reactor

from imap_support import PASSWORD, USER, RawClient, in_thread
from leapmail.imap.server import IMAPServerFactory, Throttle, is_loopback
from leapmail.tls import context_factory, ensure_certificate


def plain(user, password, authzid=b""):
    return base64.b64encode(authzid + b"\0" + user + b"\0" + password)


@pytest_twisted.ensureDeferred
async def test_authenticate_plain_with_a_continuation(imap_server):
    def client():
        c = imap_server.raw(login=False)
        c.send(b"a AUTHENTICATE PLAIN\r\n")
        assert c.line() == b"+ \r\n"
        c.send(plain(USER.encode(), PASSWORD.encode()) + b"\r\n")
        assert c.line().startswith(b"a OK [CAPABILITY IMAP4rev1 ")
        assert c.command(b"b", b"SELECT INBOX")[-1] == b"b OK [READ-WRITE] Select completed\r\n"
        c.send(b"c AUTHENTICATE PLAIN\r\n")
        # Authenticated: AUTHENTICATE is not allowed any more.
        assert c.line() == b"c BAD Already logged in\r\n"
        c.close()

    await in_thread(client)


@pytest_twisted.ensureDeferred
async def test_authenticate_plain_refusals(imap_server):
    def client():
        c = imap_server.raw(login=False)
        c.send(b"a AUTHENTICATE PLAIN\r\n")
        assert c.line() == b"+ \r\n"
        c.send(b"*\r\n")
        assert c.line() == b"a BAD Authentication cancelled\r\n"
        assert c.command(b"b", b"AUTHENTICATE PLAIN !!notbase64")[-1] == (
            b"b BAD Invalid base64 in the authentication response\r\n")
        assert c.command(b"c", b"AUTHENTICATE CRAM-MD5")[-1] == (
            b"c NO Unsupported authentication mechanism\r\n")
        # Acting for somebody else is not a thing here.
        bad = plain(USER.encode(), PASSWORD.encode(), authzid=b"root")
        assert c.command(b"d", b"AUTHENTICATE PLAIN " + bad)[-1] == (
            b"d NO [AUTHENTICATIONFAILED] Authentication failed\r\n")
        wrong = plain(USER.encode(), PASSWORD.encode() + b"x")
        assert c.command(b"e", b"AUTHENTICATE PLAIN " + wrong)[-1] == (
            b"e NO [AUTHENTICATIONFAILED] Authentication failed\r\n")
        # The user name compares without case, the password exactly.
        good = plain(USER.upper().encode(), PASSWORD.encode())
        assert c.command(b"f", b"AUTHENTICATE PLAIN " + good)[-1].startswith(b"f OK [CAPABILITY")
        c.close()

    await in_thread(client)


def test_throttle_grows_after_the_free_failures_and_resets():
    t = Throttle(free=3, cap=16.0)
    assert [t.failed() for _ in range(9)] == [0, 0, 0, 0.5, 1, 2, 4, 8, 16]
    assert t.failed() == 16
    t.succeeded()
    assert t.failed() == 0


@pytest_twisted.ensureDeferred
async def test_repeated_failures_are_answered_later(imap_server):
    imap_server.factory.throttle = Throttle(free=2, cap=1.0)

    def client():
        c = imap_server.raw(login=False)
        times = []
        for i in range(4):
            start = time.monotonic()
            lines = c.command(b"t%d" % i, b'LOGIN ' + USER.encode() + b' "nope"')
            times.append(time.monotonic() - start)
            assert lines[-1] == b"t%d NO [AUTHENTICATIONFAILED] Authentication failed\r\n" % i
        c.close()
        return times

    times = await in_thread(client)
    # The first two are free; then 0.5 s, then the 1 s cap.
    assert max(times[:2]) < 0.4
    assert times[2] >= 0.5 and times[3] >= 1.0


def _tls_server(tmp_path, account):
    ensure_certificate(str(tmp_path))
    factory = IMAPServerFactory(account, USER, PASSWORD, context_factory(str(tmp_path)))
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_starttls_ignores_commands_sent_before_the_handshake(tmp_path, account):
    listening = _tls_server(tmp_path, account)
    port = listening.getHost().port

    def client():
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        f = raw.makefile("rb")
        greeting = f.readline()
        assert b"STARTTLS" in greeting and b"AUTH=PLAIN" in greeting
        # A man in the middle appends a command after STARTTLS in the same packet.
        raw.sendall(b"a STARTTLS\r\nx LOGIN " + USER.encode() + b' "' + PASSWORD.encode()
                    + b'"\r\n')
        assert f.readline() == b"a OK Begin TLS negotiation now\r\n"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        tls = context.wrap_socket(raw, server_hostname="localhost")
        tf = tls.makefile("rb")
        tls.sendall(b"b CAPABILITY\r\n")
        lines = [tf.readline(), tf.readline()]
        assert lines[1] == b"b OK Capability completed\r\n", lines
        assert b"STARTTLS" not in lines[0] and b"AUTH=PLAIN" in lines[0]
        # The injected LOGIN never ran: we are still not authenticated.
        tls.sendall(b"c SELECT INBOX\r\n")
        assert tf.readline() == b"c BAD Log in first\r\n"
        tls.sendall(b"d STARTTLS\r\n")
        assert tf.readline() == b"d BAD TLS is already active\r\n"
        tls.close()

    try:
        await in_thread(client)
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_login_takes_literals(imap_server):
    def client():
        c = RawClient(imap_server.host, imap_server.port, login=False)
        c.send(b"a LOGIN {%d}\r\n" % len(USER))
        assert c.line() == b"+ OK\r\n"
        c.send(USER.encode() + b" {%d+}\r\n" % len(PASSWORD) + PASSWORD.encode() + b"\r\n")
        assert c.line().startswith(b"a OK [CAPABILITY IMAP4rev1 ")
        c.close()

    await in_thread(client)


@pytest_twisted.ensureDeferred
async def test_nothing_runs_after_logout(imap_server):
    def client():
        c = imap_server.raw()
        c.send(b"a LOGOUT\r\nb CREATE Sneaky\r\n")
        assert c.line() == b"* BYE Logging out\r\n"
        assert c.line() == b"a OK Logout completed\r\n"
        assert c.file.read() == b""
        c.close()
        again = imap_server.raw()
        lines = again.command(b"c", b'LIST "" Sneaky')
        again.close()
        return lines

    assert await in_thread(client) == [b"c OK LIST completed\r\n"]


def test_only_loopback_peers_count_as_local():
    assert [is_loopback(host) for host in (
        "127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1", "192.0.2.2", "10.0.0.1",
        "fd00::2", "::ffff:8.8.8.8", "", "localhost")] == [
        True, True, True, True, False, False, False, False, False, False]


@pytest_twisted.ensureDeferred
async def test_passwords_in_clear_only_on_loopback(tmp_path, account):
    # A peer as one off loopback is treated (machines running the tests need not have
    # any other interface): the server's own decision, over a real connection.
    address = "127.0.0.1"
    ensure_certificate(str(tmp_path))
    factory = IMAPServerFactory(account, USER, PASSWORD, context_factory(str(tmp_path)),
                                cleartext_allowed=lambda host: False)
    listening = reactor.listenTCP(0, factory, interface=address)
    port = listening.getHost().port

    def client():
        raw = socket.create_connection((address, port), timeout=20)
        f = raw.makefile("rb")
        greeting = f.readline()
        assert b"LOGINDISABLED" in greeting and b"AUTH=PLAIN" not in greeting
        raw.sendall(b"a LOGIN " + USER.encode() + b' "' + PASSWORD.encode() + b'"\r\n')
        assert f.readline() == b"a NO [PRIVACYREQUIRED] Log in only after STARTTLS\r\n"
        raw.sendall(b"b AUTHENTICATE PLAIN " + plain(USER.encode(), PASSWORD.encode())
                    + b"\r\n")
        assert f.readline() == b"b NO [PRIVACYREQUIRED] Authenticate only after STARTTLS\r\n"
        raw.sendall(b"c STARTTLS\r\n")
        assert f.readline() == b"c OK Begin TLS negotiation now\r\n"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        tls = context.wrap_socket(raw, server_hostname="localhost")
        tf = tls.makefile("rb")
        tls.sendall(b"d LOGIN " + USER.encode() + b' "' + PASSWORD.encode() + b'"\r\n')
        assert tf.readline().startswith(b"d OK [CAPABILITY IMAP4rev1 ")
        tls.close()

    try:
        await in_thread(client)
    finally:
        await listening.stopListening()
