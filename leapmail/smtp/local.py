"""The daemon's local SMTP: mail clients submit here, messages go into the outbox.

The login is the IMAP one (the account address and its client password, compared in
constant time); the envelope sender must be the account's address.  The 250 after
DATA is sent only once the message and its envelope have committed to the store: a
message a client was told is accepted survives a crash, and the relay
(:mod:`leapmail.smtp.relay`) hands it on.
"""

import hmac
import ipaddress

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger

from leapmail.smtp.protocol import Backend, Reply, SMTPServer
from leapmail.twistd import ListeningService, StartError, host_port

#: Recipients in one message.
MAX_RECIPIENTS = 100
MAX_SIZE = 50 * 1024 * 1024


class OutboxBackend(Backend):
    def __init__(self, address, password, outbox, relay=None):
        self.address = address
        self._password = password.encode("utf-8")
        self.outbox = outbox
        self.relay = relay

    def authenticate(self, username, password):
        ok_user = hmac.compare_digest(username.lower().encode("utf-8"),
                                      self.address.lower().encode("utf-8"))
        ok_pass = hmac.compare_digest(password.encode("utf-8"), self._password)
        return self.address if ok_user and ok_pass else None

    def check_sender(self, identity, address):
        if address.lower() != self.address.lower():
            raise Reply(553, "5.7.1", f"the sender must be this account's address "
                                      f"<{self.address}>")
        if self.relay is None:
            raise Reply(554, "5.3.5", "this account has no provider: it cannot send mail")

    def receiver(self, identity, sender, recipients, peer):
        return _OutboxReceiver(self.outbox.writer(), sender, recipients, self.relay)


class _OutboxReceiver:
    def __init__(self, writer, sender, recipients, relay):
        self._writer = writer
        self._sender = sender
        self._recipients = recipients
        self._relay = relay
        self._done = False

    def write(self, data):
        return self._writer.write(data)

    async def finish(self):
        entry_id = await self._writer.finish(self._sender, self._recipients)
        self._done = True
        if self._relay is not None:
            self._relay.queued()
        return f"queued as {entry_id}"

    def abort(self):
        if not self._done:
            self._done = True
            self._writer.abort().addErrback(lambda f: None)


class SMTPService(ListeningService):
    """Listens for mail clients once the account exists (after ``StoreService``).

    Logs ``SMTP listening on HOST:PORT`` with the port actually bound.
    """

    log = Logger()

    def __init__(self, store_service, interface, port, address, password,
                 context_factory=None, relay_factory=None, reactor=None):
        self._store_service = store_service
        self.interface = interface
        self.requested_port = port
        self.address = address
        self._password = password
        self._tls = context_factory
        self._relay_factory = relay_factory
        self._reactor = reactor
        self.relay = None

    def __repr__(self):
        return f"<SMTPService {host_port(self.interface, self.requested_port)}>"

    def startService(self):
        from leapmail.mail.outbox import Outbox

        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        store = self._store_service.store
        if store is None:
            raise StartError("SMTPService must start after StoreService")
        outbox = Outbox(store)
        if self._relay_factory is not None:
            self.relay = self._relay_factory(outbox, self._store_service.account)
        backend = OutboxBackend(self.address, self._password, outbox, self.relay)
        loopback = ipaddress.ip_address(self.interface).is_loopback
        self.listen_on(reactor, "SMTP", self.interface, self.requested_port,
                       _Factory(self, backend, loopback))
        service.Service.startService(self)
        if self.relay is not None:
            self.relay.start()

    @defer.inlineCallbacks
    def stopService(self):
        # Connections close at once (close_grace 0): a message not yet answered 250
        # is still the client's to send.
        yield ListeningService.stopService(self)
        if self.relay is not None:
            yield self.relay.stop()


class _Factory(protocol.ServerFactory):
    def __init__(self, owner, backend, loopback):
        self.owner = owner
        self.backend = backend
        self.loopback = loopback

    def buildProtocol(self, addr):
        # Off loopback the password must not cross the network in the clear.
        return SMTPServer(self.backend, "localhost", tls=self.owner._tls,
                          require_tls=not self.loopback, max_size=MAX_SIZE,
                          max_recipients=MAX_RECIPIENTS)
