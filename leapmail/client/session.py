"""Connecting, logging in, and watching a mailbox with IDLE.

:func:`open_session` connects (plain, STARTTLS or implicit TLS), checks the server's
certificate (against a given CA certificate, else the system's authorities) and logs
in with AUTHENTICATE PLAIN where the server offers it, else LOGIN.  It refuses to send
a password over an unencrypted connection unless told ``security="none"``.

:class:`MailboxWatcher` keeps one mailbox selected and reports its news to a listener:
with IDLE (re-issued before the 30 minutes after which RFC 2177 lets a server drop an
idle client), or by NOOP polling where the server lacks IDLE, reconnecting with
exponential backoff after any failure.
"""

import random
from base64 import b64encode

from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger
from twisted.mail.imap4 import Command, IMAP4Exception

from leapmail.client.protocol import IdleClient
from leapmail.errors import LeapmailError

#: RFC 2177: a server may log out a client idle for 30 minutes; re-issue before.
IDLE_RENEW = 29 * 60
NOOP_INTERVAL = 60
SECURITIES = ("starttls", "tls", "none")


class ClientError(LeapmailError):
    pass


class _Factory(protocol.ClientFactory):
    def __init__(self, context):
        self.context = context

    def buildProtocol(self, addr):
        client = IdleClient(self.context)
        client.factory = self
        return client


def tls_options(host, ca_pem=None):
    if ca_pem is not None:
        return optionsForClientTLS(host, trustRoot=Certificate.loadPEM(ca_pem))
    return optionsForClientTLS(host)


async def open_session(reactor, host, port, username, password, security="starttls",
                       ca_pem=None, timeout=30):
    """A logged-in :class:`~leapmail.client.protocol.IdleClient`."""
    if security not in SECURITIES:
        raise ClientError(f"security must be one of {', '.join(SECURITIES)}, not {security!r}")
    context = tls_options(host, ca_pem) if security != "none" else None
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if security == "tls":
        endpoint = wrapClientTLS(context, endpoint)
    try:
        client = await endpoint.connect(_Factory(context))
        await client.greeted
    except Exception as e:
        raise ClientError(f"cannot connect to {host}:{port}: {_reason(e)}") from None
    try:
        capabilities = await client.getCapabilities()
        if security == "starttls":
            if b"STARTTLS" not in capabilities:
                raise ClientError(f"{host}:{port} does not offer STARTTLS; refusing to send "
                                  "the password in clear")
            capabilities = await client.startTLS(context)
        await _login(client, capabilities, username, password)
    except ClientError:
        client.transport.loseConnection()
        raise
    except IMAP4Exception as e:
        client.transport.loseConnection()
        raise ClientError(f"{host}:{port} refused the login for {username}: "
                          f"{_text(e)}") from None
    except Exception as e:
        client.transport.loseConnection()
        raise ClientError(f"cannot log in to {host}:{port}: {_reason(e)}") from None
    return client


async def _login(client, capabilities, username, password):
    if b"PLAIN" in (capabilities.get(b"AUTH") or []):
        token = b64encode(b"\0" + username.encode("utf-8") + b"\0" + password.encode("utf-8"))
        if b"SASL-IR" in capabilities:
            await client.sendCommand(Command(b"AUTHENTICATE", b"PLAIN " + token))
        else:
            await client.sendCommand(Command(
                b"AUTHENTICATE", b"PLAIN", (), lambda _: client.sendLine(token)))
    else:
        await client.login(username.encode("utf-8"), password.encode("utf-8"))


def _text(error):
    value = error.args[0] if error.args else error
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _reason(error):
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return getattr(error, "getErrorMessage", lambda: str(error))() or type(error).__name__


class MailboxWatcher:
    """Keeps ``mailbox`` selected on a server and tells ``listener`` its news.

    ``connect()`` is an async callable giving a logged-in client (e.g. a partial of
    :func:`open_session`).  ``start()`` runs until ``stop()``; ``connected`` fires
    every time a new connection is ready and idling (or polling).
    """

    log = Logger()

    def __init__(self, reactor, connect, mailbox, listener, renew=IDLE_RENEW,
                 poll=NOOP_INTERVAL, backoff_cap=30.0, rng=random.random, readonly=False):
        self.reactor = reactor
        self.readonly = readonly  # EXAMINE: watch without taking \Recent or setting \Seen
        self._connect = connect
        self.mailbox = mailbox
        self.listener = listener
        self.renew = renew
        self.poll = poll
        self.backoff_cap = backoff_cap
        self._rng = rng
        self.client = None
        self.running = False
        self._task = None
        self._wakeup = None
        self.ready = []  # Deferreds for the next time the watcher is idling

    def when_ready(self):
        d = defer.Deferred()
        self.ready.append(d)
        return d

    def start(self):
        self.running = True
        self._task = defer.ensureDeferred(self._run())
        return self._task

    async def stop(self):
        self.running = False
        if self._wakeup is not None and not self._wakeup.called:
            self._wakeup.cancel()
        client = self.client
        if client is not None:
            client.transport.loseConnection()
        try:
            await self._task
        except Exception:
            pass

    async def _run(self):
        failures = 0
        while self.running:
            try:
                self.client = await self._connect()
                self.client.listener = self.listener
                if self.readonly:
                    await self.client.examine(self.mailbox)
                else:
                    await self.client.select(self.mailbox)
                failures = 0
                await self._watch(self.client)
            except Exception as e:
                if not self.running:
                    return
                failures += 1
                delay = min(self.backoff_cap, 0.5 * 2 ** (failures - 1)) * (0.5 + self._rng() / 2)
                self.log.warn("watching {mailbox} failed ({error}); again in {delay:.1f} s",
                              mailbox=self.mailbox, error=_reason(e), delay=delay)
                if self.client is not None:
                    self.client.transport.loseConnection()
                    self.client = None
                await self._sleep(delay)

    async def _watch(self, client):
        idle = b"IDLE" in (await client.getCapabilities())
        while self.running:
            if idle:
                await client.idle()
            self._announce_ready()
            ended = await self._sleep(self.renew if idle else self.poll, client.lost)
            if ended:
                raise ClientError("the server closed the connection")
            if not self.running:
                return
            if idle:
                await client.done()
            else:
                await client.noop()

    def _announce_ready(self):
        waiting, self.ready = self.ready, []
        for d in waiting:
            d.callback(self.client)

    def _sleep(self, seconds, interrupt=None):
        """Wait ``seconds``; fires with True if ``interrupt`` fired first (or ``stop()``)."""
        d = defer.Deferred()

        def fire(value):
            if not d.called:
                d.callback(value)

        def interrupted(result):
            fire(True)
            return result

        timer = self.reactor.callLater(seconds, fire, False)
        if interrupt is not None:
            interrupt.addBoth(interrupted)
        self._wakeup = d

        def finished(result):
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(finished)
        d.addErrback(lambda f: f.trap(defer.CancelledError) and True)
        return d
