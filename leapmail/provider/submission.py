"""The provider's submission service: authenticated ESMTP for its users' devices.

STARTTLS first (AUTH in the clear is refused with 538), then AUTH PLAIN or LOGIN with
the account address and a device token (the sync API's, checked the same way).  The
envelope sender must be the authenticated address.  Recipients:

- the provider's own users go through the same intake as the MX
  (:mod:`leapmail.provider.intake`), sealed and stored for them;
- an unknown user of a domain the provider hosts is refused (550 5.1.1);
- anyone else goes through the configured smarthost, which must take the message
  before the client hears 250 (the client's queue keeps it until then, so nothing is
  lost); a smarthost's refusal is passed back, 4xx as 451 and 5xx as 554, with its
  text.  Without a smarthost such recipients are refused (550 5.7.1).

Local recipients' copies are sealed by the intake as the message arrives: no plaintext
of theirs is ever written at the provider.  A message with recipients elsewhere is
also spooled (memory, then an unlinked temporary file under the provider's home: it
leaves in the clear anyway, as with any MTA) so that it can go to the smarthost before
the intake commits.  The smarthost is told
nothing unless it accepts every recipient meant for it; a failure of the intake after
the smarthost took the message makes the client send again, and the smarthost's
recipients may then get it twice: the rarer failure costs a duplicate, not a loss.
"""

import hmac
import os
import tempfile
import time

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.mail.smtp import rfc822date

from leapmail.provider.api import device_of_token
from leapmail.smtp.client import SMTPClientError, SMTPConnection
from leapmail.smtp.protocol import Backend, Reply, SMTPServer
from leapmail.twistd import ListeningService

DEFAULT_MAX_SIZE = 50 * 1024 * 1024
MAX_RECIPIENTS = 100
#: Bytes of a message kept in memory before the spool goes to a file.
SPOOL_MEMORY = 1024 * 1024
PIECE = 256 * 1024


def parse_smarthost(value):
    """``HOST[:PORT]`` (port 25 by default) as ``(host, port)``."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, "25"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--smarthost must be HOST[:PORT], not {value!r}")
    return host, int(port)


class SubmissionBackend(Backend):
    log = Logger()

    def __init__(self, storage, run, hostname, spool_dir, intake=None, smarthost=None,
                 reactor=None, now=time.time):
        self.storage = storage
        self._run = run
        self.hostname = hostname
        self.spool_dir = spool_dir
        self.intake = intake
        self.smarthost = smarthost
        self._reactor = reactor
        self._now = now

    async def authenticate(self, username, password):
        device = await self._run(device_of_token, self.storage, password.encode("utf-8"))
        if device is None or self._now() >= device.expires:
            return None
        address = await self._run(self.storage.address_of, device.user_id)
        if address is None or not hmac.compare_digest(
                address.encode("utf-8"), username.lower().encode("utf-8")):
            return None
        return address

    def check_sender(self, identity, address):
        if address.lower() != identity.lower():
            raise Reply(553, "5.7.1", f"the sender must be the authenticated address "
                                      f"<{identity}>")

    async def _is_local(self, address):
        return self.intake is not None and await self.intake.accepts(address.lower())

    async def check_recipient(self, identity, address):
        if await self._is_local(address):
            return
        domain = address.rpartition("@")[2].lower()
        if await self._run(self.storage.has_domain, domain):
            if await self._run(self.storage.find_account, address.lower()) is not None:
                # An account not set up to receive yet: it will be, so not for good.
                raise Reply(450, "4.2.1", f"<{address}> cannot receive mail yet; try "
                                          "again later")
            raise Reply(550, "5.1.1", f"<{address}>: no such user here")
        if self.smarthost is None:
            raise Reply(550, "5.7.1", f"<{address}>: this provider delivers to its own "
                                      "users only (no smarthost is configured for other "
                                      "domains)")

    def receiver(self, identity, sender, recipients, peer):
        return _SubmissionReceiver(self, sender, recipients, peer)


class _SubmissionReceiver:
    """One message: local recipients' copies are sealed by the intake as the bytes
    arrive; only a message with recipients elsewhere is spooled (it leaves in the
    clear anyway)."""

    def __init__(self, backend, sender, recipients, peer):
        self._backend = backend
        self._sender = sender
        self._recipients = recipients
        helo, ip, secure = peer
        helo = (helo or b"unknown").decode("ascii", "replace")
        self._trace = (
            f"Received: from {helo} ([{ip}])\r\n\tby {backend.hostname} with "
            f"{'ESMTPSA' if secure else 'ESMTPA'}; {rfc822date().decode()}\r\n"
        ).encode("ascii", "replace")
        self._started = None
        self._local = self._remote = ()
        self._intake = None
        self._spool = None
        self._aborted = False

    def _start(self):
        if self._started is None:
            self._started = defer.ensureDeferred(self._classify())
        return self._started

    async def _classify(self):
        backend = self._backend
        self._local = [r for r in self._recipients if await backend._is_local(r)]
        self._remote = [r for r in self._recipients if r not in self._local]
        if self._remote:
            self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY,
                                                        dir=backend.spool_dir)
        if self._local:
            from leapmail.provider.intake import IntakeError

            try:
                self._intake = backend.intake.receiver(self._local, self._trace)
            except IntakeError as e:
                raise _intake_reply(e) from None
        if self._aborted:  # the client left while we were looking
            self.abort()

    def write(self, data):
        if self._started is not None and self._started.called:
            self._take(data)
            return None
        # The first piece waits for the recipients to be sorted out; the server reads
        # nothing more meanwhile.
        d = defer.Deferred()
        self._start().addCallbacks(lambda _: d.callback(self._take(data)), d.errback)
        return d

    def _take(self, data):
        if self._intake is not None:
            self._intake.write(data)
        if self._spool is not None:
            self._spool.write(data)

    async def _pieces(self, trace):
        if trace:
            yield self._trace
        self._spool.seek(0)
        while True:
            piece = self._spool.read(PIECE)
            if not piece:
                return
            yield piece

    async def finish(self):
        from leapmail.provider.intake import IntakeError

        try:
            await self._start()
            if self._remote:
                await self._to_smarthost(self._remote)
            if self._intake is not None:
                try:
                    await self._intake.finish()
                except IntakeError as e:
                    raise _intake_reply(e) from None
                self._intake = None
            return f"delivered to {len(self._recipients)} recipient(s)"
        finally:
            self.abort()

    async def _to_smarthost(self, recipients):
        backend = self._backend
        if backend.smarthost is None:
            raise Reply(550, "5.7.1", "no smarthost is configured for other domains")
        host, port = backend.smarthost
        reactor = backend._reactor
        if reactor is None:
            from twisted.internet import reactor
        try:
            conn = await SMTPConnection.open(reactor, host, port, backend.hostname)
        except SMTPClientError as e:
            raise _passed_back(e.code, e.text, f"the smarthost {host}:{port}") from None
        try:
            accepted, refused = await conn.send(self._sender, recipients,
                                                self._pieces(trace=True), all_or_nothing=True)
        except SMTPClientError as e:
            raise _passed_back(e.code, e.text, f"the smarthost {host}:{port}") from None
        finally:
            await conn.close()
        if refused:
            rcpt, code, text = refused[0]
            raise _passed_back(code, text, f"the smarthost refused <{rcpt}>")

    def abort(self):
        self._aborted = True
        if self._intake is not None:
            intake, self._intake = self._intake, None
            intake.abort()
        if self._spool is not None:
            self._spool.close()


def _intake_reply(error):
    status, _, text = error.text.partition(" ")
    if not status[:1].isdigit():
        status, text = f"{str(error.code)[0]}.0.0", error.text
    return Reply(error.code, status, f"local delivery failed: {text}")


def _passed_back(code, text, who):
    if not code:
        return Reply(451, "4.4.1", f"{who}: {text}; try again later")
    status = text.split(" ", 1)[0] if text[:2] in ("4.", "5.") else None
    if 500 <= code < 600:
        return Reply(554, status if status and status[0] == "5" else "5.0.0",
                     f"{who}: {code} {text}")
    return Reply(451, status if status and status[0] == "4" else "4.0.0",
                 f"{who}: {code} {text}")


class SubmissionService(ListeningService):
    """Listens for devices submitting mail; logs ``submission listening on HOST:PORT``.

    Starts after the :class:`~leapmail.provider.service.ProviderService` whose storage
    and thread pool it uses (and stops before it)."""

    log = Logger()

    def __init__(self, provider, interface, port, tls, hostname, smarthost=None,
                 max_size=DEFAULT_MAX_SIZE, intake_factory=None, reactor=None):
        self.provider = provider
        self.interface = interface
        self.requested_port = port
        self.tls = tls
        self.hostname = hostname
        self.smarthost = smarthost
        self.max_size = max_size
        self._intake_factory = intake_factory
        self._reactor = reactor

    def startService(self):
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        pool = self.provider.threadpool

        def run(fn, *args):
            return deferToThreadPool(reactor, pool, fn, *args)

        intake = self._intake_factory(self.provider) if self._intake_factory else None
        spool_dir = os.path.join(self.provider.home, "spool") if getattr(
            self.provider, "home", None) else None
        if spool_dir:
            os.makedirs(spool_dir, mode=0o700, exist_ok=True)
        backend = SubmissionBackend(self.provider.storage, run, self.hostname, spool_dir,
                                    intake=intake, smarthost=self.smarthost, reactor=reactor)
        factory = protocol.ServerFactory()
        factory.buildProtocol = lambda addr: SMTPServer(
            backend, self.hostname, tls=self.tls, require_tls=True, max_size=self.max_size,
            max_recipients=MAX_RECIPIENTS)
        self.listen_on(reactor, "submission", self.interface, self.requested_port, factory)
        service.Service.startService(self)
