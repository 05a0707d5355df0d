"""The IDLE client (leapmail.client) against leapmail's server and against Dovecot.

Real servers on loopback: leapmail's in process and as a daemon (STARTTLS with its
pinned certificate), Dovecot from Debian's packages.  News must reach the listener
while idling: another session's APPEND within a second, its EXPUNGE and its flag change.
"""

import functools
import os
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from dovecot_server import DovecotServer
from imap_support import PASSWORD, USER, in_thread
from leapmail.client.protocol import MailboxListener
from leapmail.client.session import ClientError, MailboxWatcher, open_session
from leapmail.imap.server import IMAPServerFactory, LeapIMAPServer
from leapmail_daemon import LeapmailDaemon

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"


class Recorder(MailboxListener):
    """Records news, and fires a Deferred when a wanted piece arrives."""

    def __init__(self):
        self.events = []
        self._waiting = []

    def _got(self, event):
        self.events.append((time.monotonic(), event))
        for wanted, d in list(self._waiting):
            if wanted(event):
                self._waiting.remove((wanted, d))
                d.callback(event)

    def wait(self, wanted, timeout=10):
        for _, event in self.events:
            if wanted(event):
                return defer.succeed(event)
        d = defer.Deferred()
        self._waiting.append((wanted, d))
        return d.addTimeout(timeout, reactor)

    def exists(self, count):
        self._got(("exists", count))

    def recent(self, count):
        self._got(("recent", count))

    def expunged(self, seq):
        self._got(("expunge", seq))

    def flags_changed(self, seq, flags, uid):
        self._got(("flags", seq, tuple(sorted(flags))))


async def exercise(client, other_session, within):
    """IDLE on INBOX while ``other_session`` (blocking imaplib) changes it; the APPEND
    must reach the listener ``within`` seconds."""
    recorder = Recorder()
    client.listener = recorder
    await client.select("INBOX")
    await client.idle()
    assert client.idling

    def append(conn):
        conn.append("INBOX", None, None, MESSAGE)

    started = time.monotonic()
    await in_thread(other_session, append)
    event = await recorder.wait(lambda e: e[0] == "exists")
    latency = time.monotonic() - started
    assert event == ("exists", 1)
    assert latency < within, latency

    def flag(conn):
        conn.select("INBOX")
        conn.store("1", "+FLAGS", "(\\Flagged)")

    await in_thread(other_session, flag)
    event = await recorder.wait(lambda e: e[0] == "flags")
    assert event[:2] == ("flags", 1) and "\\Flagged" in event[2]

    def expunge(conn):
        conn.select("INBOX")
        conn.store("1", "+FLAGS", "(\\Deleted)")
        conn.expunge()

    await in_thread(other_session, expunge)
    assert await recorder.wait(lambda e: e[0] == "expunge") == ("expunge", 1)
    await client.done()
    assert not client.idling
    # The connection is usable after DONE.
    await client.noop()
    await client.logout()


@pytest_twisted.ensureDeferred
async def test_idle_news_from_leapmail(imap_server):
    client = await open_session(reactor, imap_server.host, imap_server.port, USER, PASSWORD,
                                security="none")

    def other(action):
        conn = imap_server.imaplib()
        try:
            action(conn)
        finally:
            conn.logout()

    await exercise(client, other, within=1.0)


@pytest_twisted.ensureDeferred
async def test_idle_news_from_dovecot(tmp_path):
    dovecot = DovecotServer(str(tmp_path / "dovecot"))
    await in_thread(dovecot.start)
    try:
        client = await open_session(reactor, dovecot.host, dovecot.port, dovecot.user,
                                    dovecot.password, security="none")

        def other(action):
            import imaplib

            conn = imaplib.IMAP4(dovecot.host, dovecot.port)
            conn.login(dovecot.user, dovecot.password)
            try:
                action(conn)
            finally:
                conn.logout()

        # Dovecot notices another session's change through its own notifier, about
        # half a second later: the point here is that the client hears it.
        await exercise(client, other, within=5.0)
    finally:
        await in_thread(dovecot.stop)


@pytest_twisted.ensureDeferred
async def test_uidplus_results(imap_server):
    client = await open_session(reactor, imap_server.host, imap_server.port, USER, PASSWORD,
                                security="none")
    import io

    uidvalidity, uid = await client.append_uid("INBOX", io.BytesIO(MESSAGE))
    assert uid == 1 and uidvalidity > 0
    await client.append_uid("INBOX", io.BytesIO(MESSAGE))
    await client.select("INBOX")
    result = await client.copy_uids("1:2", "Archive", uid=True)
    archive = await imap_server.account.mailbox("Archive")
    assert result == (archive.uidvalidity, "1:2", "1:2")
    await client.logout()


@pytest_twisted.ensureDeferred
async def test_starttls_with_the_pinned_certificate_and_a_wrong_password(tmp_path):
    daemon = LeapmailDaemon(str(tmp_path / "home"), "pw", USER)
    await in_thread(daemon.start)
    try:
        with open(os.path.join(daemon.home, "tls-cert.pem"), "rb") as f:
            pem = f.read()
        client = await open_session(reactor, daemon.host, daemon.port, daemon.user,
                                    daemon.password, security="starttls", ca_pem=pem)
        assert client.startedTLS
        await client.select("INBOX")
        await client.logout()
        with pytest.raises(ClientError, match="refused the login"):
            await open_session(reactor, daemon.host, daemon.port, daemon.user, "wrong",
                               security="starttls", ca_pem=pem)
        other = str(tmp_path / "other")
        os.makedirs(other)
        from leapmail.tls import ensure_certificate

        with open(ensure_certificate(other)[0], "rb") as f:
            stranger = f.read()
        with pytest.raises(ClientError, match="cannot log in"):
            await open_session(reactor, daemon.host, daemon.port, daemon.user,
                               daemon.password, security="starttls", ca_pem=stranger)
    finally:
        await in_thread(daemon.stop)


@pytest_twisted.ensureDeferred
async def test_implicit_tls(account, tmp_path):
    from leapmail.tls import context_factory

    home = str(tmp_path / "tls")
    os.makedirs(home)
    port = reactor.listenSSL(0, IMAPServerFactory(account, USER, PASSWORD),
                             context_factory(home), interface="127.0.0.1")
    try:
        with open(os.path.join(home, "tls-cert.pem"), "rb") as f:
            pem = f.read()
        client = await open_session(reactor, "127.0.0.1", port.getHost().port, USER,
                                    PASSWORD, security="tls", ca_pem=pem)
        await client.select("INBOX")
        await client.logout()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_unreachable_server_is_a_clear_error():
    with pytest.raises(ClientError, match="cannot connect to 127.0.0.1:1"):
        await open_session(reactor, "127.0.0.1", 1, USER, PASSWORD, security="none")


@pytest_twisted.ensureDeferred
async def test_the_watcher_recovers_after_the_server_restarts(account):
    factory = IMAPServerFactory(account, USER, PASSWORD)
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    port = listening.getHost().port
    recorder = Recorder()
    watcher = MailboxWatcher(
        reactor, functools.partial(open_session, reactor, "127.0.0.1", port, USER, PASSWORD,
                                   security="none"),
        "INBOX", recorder, backoff_cap=0.5)
    ready = watcher.when_ready()
    watcher.start()
    try:
        first = await ready.addTimeout(10, reactor)
        await account.append("INBOX", MESSAGE)
        assert await recorder.wait(lambda e: e == ("exists", 1)) == ("exists", 1)
        # The server goes away (its connections too) and comes back on the same port.
        await listening.stopListening()
        first.transport.abortConnection()
        ready = watcher.when_ready()
        listening = reactor.listenTCP(port, factory, interface="127.0.0.1")
        second = await ready.addTimeout(20, reactor)
        assert second is not first
        await account.append("INBOX", MESSAGE)
        assert await recorder.wait(lambda e: e == ("exists", 2)) == ("exists", 2)
    finally:
        await watcher.stop()
        await listening.stopListening()


class _NoIdle(LeapIMAPServer):
    def capabilities(self):
        caps = super().capabilities()
        caps.pop(b"IDLE", None)
        return caps


class _NoIdleFactory(IMAPServerFactory):
    def buildProtocol(self, addr):
        return _NoIdle(self, self.context_factory)


@pytest_twisted.ensureDeferred
async def test_without_idle_the_watcher_polls(account):
    factory = _NoIdleFactory(account, USER, PASSWORD)
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    recorder = Recorder()
    watcher = MailboxWatcher(
        reactor, functools.partial(open_session, reactor, "127.0.0.1",
                                   listening.getHost().port, USER, PASSWORD, security="none"),
        "INBOX", recorder, poll=0.2)
    ready = watcher.when_ready()
    watcher.start()
    try:
        client = await ready.addTimeout(10, reactor)
        assert not client.idling
        await account.append("INBOX", MESSAGE)
        assert await recorder.wait(lambda e: e == ("exists", 1)) == ("exists", 1)
    finally:
        await watcher.stop()
        await listening.stopListening()

