"""What the twistd plugins (the daemon's and the provider's) share.

Option checks that give one clear line for a bad value, the way a service that
cannot start (a port in use) tells the user in one line rather than a traceback, and
what every listening service does: listen and say where, and close its connections
when it stops.
"""

import ipaddress
import re
import sys

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import ILoggingContext, IProtocolFactory
from twisted.python import usage
from zope.interface import implementer

from leapmail.errors import LeapmailError


class StartError(LeapmailError):
    """A service cannot start; the message is the whole story, for one line on stderr."""


def parse_port(name, value):
    """``value`` as a port number 0..65535, else a :class:`usage.UsageError`."""
    text = str(value)
    # int() alone would also take " 1984", "+1984", "1_984" and non-ASCII digits.
    if re.fullmatch(r"[0-9]{1,5}", text) and int(text) <= 65535:
        return int(text)
    raise usage.UsageError(f"--{name} must be a port number from 0 to 65535, not {text!r}")


def parse_address(value):
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise usage.UsageError(
            f"--listen must be an IP address such as 127.0.0.1 or ::1, not {value!r}"
        ) from None


def host_port(host, port):
    """``HOST:PORT`` as people write it, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_failure(error):
    """Why ``listenTCP``/``listenSSL`` failed, as the end of a sentence."""
    cause = getattr(error, "socketError", None)
    text = getattr(cause, "strerror", None) or str(cause or error)
    return text[:1].lower() + text[1:]


def listen(reactor, name, interface, port, factory, log, tls=None):
    """Listen on ``interface:port`` (TLS from the start if ``tls`` is a context
    factory) and log ``NAME listening on HOST:PORT`` with the port bound, which is how
    whoever asked for port 0 learns it.  A port that cannot be had is a
    :class:`StartError` with the reason, logged too."""
    try:
        if tls is not None:
            listening = reactor.listenSSL(port, factory, tls, interface=interface)
        else:
            listening = reactor.listenTCP(port, factory, interface=interface)
    except CannotListenError as e:
        message = f"cannot listen on {host_port(interface, port)}: {listen_failure(e)}"
        log.error("{message}", message=message)
        raise StartError(message) from None
    bound = listening.getHost()
    log.info("{name} listening on {address}", name=name,
             address=host_port(bound.host, bound.port))
    return listening


@implementer(IProtocolFactory, ILoggingContext)
class ConnectionTracker:
    """Stands in for a server factory towards ``listenTCP``, remembering every
    connection, so that shutdown can close them before what they use goes away.

    The protocol objects are the factory's own, untouched in their transport: only
    their ``connectionLost`` is observed.
    """

    def __init__(self, factory, reactor):
        self.factory = factory
        self._reactor = reactor
        self._live = set()
        self._all_gone = []

    def logPrefix(self):
        # Twisted names the listening port after this; name it after the real server.
        if ILoggingContext.providedBy(self.factory):
            return self.factory.logPrefix()
        return self.factory.__class__.__name__

    def doStart(self):
        self.factory.doStart()

    def doStop(self):
        self.factory.doStop()

    def buildProtocol(self, addr):
        protocol = self.factory.buildProtocol(addr)
        if protocol is None:
            return None
        self._live.add(protocol)
        lost = protocol.connectionLost

        def connectionLost(reason):
            try:
                return lost(reason)
            finally:
                self._live.discard(protocol)
                if not self._live:
                    waiting, self._all_gone = self._all_gone, []
                    for d in waiting:
                        d.callback(None)

        protocol.connectionLost = connectionLost
        return protocol

    def _wait(self):
        if not self._live:
            return defer.succeed(None)
        d = defer.Deferred()
        self._all_gone.append(d)
        return d

    @defer.inlineCallbacks
    def close_all(self, grace):
        for protocol in list(self._live):
            shutdown = getattr(protocol, "shutdown", None)
            if shutdown is not None:
                shutdown()  # says BYE first (RFC 3501 7.1.5)
            else:
                protocol.transport.loseConnection()
        gone = self._wait()
        timer = self._reactor.callLater(grace, self._abort_all)
        try:
            yield gone
        finally:
            if timer.active():
                timer.cancel()

    def _abort_all(self):
        for protocol in list(self._live):
            protocol.transport.abortConnection()



def report_start_errors(program):
    """Make a :class:`StartError` that reaches ``sys.excepthook`` one line on stderr.

    twistd passes a failure in startService on only as an exception: to its waiting
    parent when it daemonizes, else as a traceback.
    """
    previous = sys.excepthook

    def hook(kind, value, tb):
        if isinstance(value, StartError):
            # twistd has redirected sys.stderr into its log by now; the user is on the
            # real one.
            print(f"{program}: {value}", file=sys.__stderr__, flush=True)
            return
        previous(kind, value, tb)

    sys.excepthook = hook


class ListeningService(service.Service):
    """A service that serves one port: :meth:`listen_on` when it starts; when it
    stops, no new connection, then the open ones closed, after ``close_grace``
    seconds for what they are in the middle of."""

    close_grace = 0
    port = None
    _connections = None

    def listen_on(self, reactor, name, interface, port, factory, tls=None):
        self._connections = ConnectionTracker(factory, reactor)
        self.port = listen(reactor, name, interface, port, self._connections, self.log,
                           tls=tls)
        return self.port

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            yield port.stopListening()
        if self._connections is not None:
            yield self._connections.close_all(self.close_grace)
