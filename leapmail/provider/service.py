"""The provider as a twistd service::

    twistd -n leapmail-provider --home DIR --port P [--listen ADDR] [--database URL]
                                [--tls-cert FILE --tls-key FILE] [--token-lifetime SECONDS]
                                [--mx-port M [--max-message-size BYTES] [--hostname NAME]]
                                [--submission-port S [--smarthost HOST[:PORT]]]

Serves the sync API (:mod:`leapmail.provider.api`) over HTTPS on ``ADDR:P``
(127.0.0.1 unless told otherwise) and logs ``Provider listening on HOST:PORT`` once
it listens.  The certificate is ``DIR/tls-cert.pem`` (key ``DIR/tls-key.pem``), made
self-signed for ``localhost`` and ``127.0.0.1`` on first start, unless
``--tls-cert``/``--tls-key`` name a pair of your own.

Storage: SQLite in ``DIR/provider.db`` by default, or PostgreSQL
(``--database postgresql://USER:PASSWORD@HOST/DB``), which any number of front ends
can share; the URL's password never reaches the log.

With ``--mx-port`` it also runs the MX (:mod:`leapmail.provider.mx`, docs/incoming.rst)
on ``ADDR:M`` and logs ``MX listening on HOST:PORT`` before the HTTPS line.

With ``--submission-port`` it also serves authenticated SMTP submission
(:mod:`leapmail.provider.submission`) with the same certificate for STARTTLS.
"""

import os
import re

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from leapmail.errors import LeapmailError
from leapmail.twistd import (
    StartError,
    listen,
    parse_address,
    parse_port,
    report_start_errors,
)

DEFAULT_PORT = 4430
DEFAULT_LISTEN = "127.0.0.1"
#: Threads for storage calls: each has its own database connection.
THREADS = 8


def parse_lifetime(value):
    text = str(value)
    if re.fullmatch(r"[0-9]{1,10}", text):
        return int(text)
    raise usage.UsageError(f"--token-lifetime must be a number of seconds, not {text!r}")


class Options(usage.Options):
    synopsis = ("--home DIR [--port PORT] [--listen ADDRESS] [--database URL] "
                "[--tls-cert FILE --tls-key FILE] [--token-lifetime SECONDS]")
    longdesc = (
        "Run a leapmail provider's sync endpoint (HTTPS) for the accounts in DIR. "
        "A port of 0 takes any free port; the log says which "
        "(\"Provider listening on HOST:PORT\")."
    )
    optParameters = [
        ["home", None, None, "the provider's directory (secret, certificate, SQLite database)"],
        ["port", None, str(DEFAULT_PORT), "HTTPS port (0: any free port)"],
        ["listen", None, DEFAULT_LISTEN, "IP address to listen on"],
        ["database", None, None,
         "postgresql://USER:PASSWORD@HOST[:PORT]/DB (default: SQLite in DIR/provider.db)"],
        ["tls-cert", None, None, "certificate (PEM) to serve instead of DIR/tls-cert.pem"],
        ["tls-key", None, None, "its private key (PEM)"],
        ["token-lifetime", None, "2592000", "seconds a device token is good for (30 days)"],
        ["mx-port", None, None, "SMTP port of the MX for incoming mail (0: any free port; "
         "default: no MX)"],
        ["max-message-size", None, str(50 * 1024 * 1024), "largest message the MX and submission accept, "
         "in bytes"],
        ["hostname", None, None, "the MX's name in greetings and Received: headers "
         "(default: this machine's FQDN)"],
        ["submission-port", None, None,
         "serve authenticated SMTP submission on this port (0: any free port; the log "
         "says \"submission listening on HOST:PORT\"); not served unless given"],
        ["smarthost", None, None,
         "HOST[:PORT] that submission hands mail for other domains to (default port 25); "
         "without one, such mail is refused"],
    ]

    def postOptions(self):
        if not self["home"]:
            raise usage.UsageError("--home DIR is required")
        self["port"] = parse_port("port", self["port"])
        self["listen"] = parse_address(self["listen"])
        self["token-lifetime"] = parse_lifetime(self["token-lifetime"])
        if self["mx-port"] is not None:
            self["mx-port"] = parse_port("mx-port", self["mx-port"])
        if not re.fullmatch(r"[0-9]{1,12}", self["max-message-size"]):
            raise usage.UsageError("--max-message-size must be a number of bytes")
        self["max-message-size"] = int(self["max-message-size"])
        if self["hostname"] is None:
            import socket

            self["hostname"] = socket.getfqdn()
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", self["hostname"]):
            raise usage.UsageError("--hostname must be a DNS name")
        if self["submission-port"] is not None:
            self["submission-port"] = parse_port("submission-port", self["submission-port"])
        if self["smarthost"] is not None:
            from leapmail.provider.submission import parse_smarthost

            try:
                self["smarthost"] = parse_smarthost(self["smarthost"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")


def prepare_home(path):
    """Create the provider's directory (0700) if it does not exist."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise StartError(f"cannot create {path}: {e.strerror}") from None
    if not os.path.isdir(path):
        raise StartError(f"{path} is not a directory")
    return path


def tls_options(home, cert=None, key=None):
    """Server TLS options: the given pair, else the home's (made on first start)."""
    from OpenSSL import SSL
    from twisted.internet import ssl

    from leapmail.tls import TLSError, _load_pair, context_factory

    if cert is None:
        return context_factory(home)
    cert_obj, key_obj = _load_pair(cert, key)
    try:
        options = ssl.CertificateOptions(privateKey=key_obj, certificate=cert_obj)
        options.getContext()
    except SSL.Error as e:
        raise TLSError(f"OpenSSL cannot use {cert} with {key}: {e}") from None
    return options


class ProviderService(service.Service):
    """The thread pool, the API and the HTTPS listener, started and stopped in order."""

    log = Logger()

    def __init__(self, storage, secret, interface, port, tls, token_lifetime,
                 reactor=None, threads=THREADS, mx_port=None, max_message_size=50 * 1024 * 1024,
                 hostname="localhost"):
        self.storage = storage
        self.secret = secret
        self.interface = interface
        self.requested_port = port
        self.tls = tls
        self.token_lifetime = token_lifetime
        self._reactor = reactor
        self._threads = threads
        self.threadpool = None
        self.api = None
        self.port = None
        self.mx_port, self.max_message_size, self.hostname = mx_port, max_message_size, hostname
        self.intake = None
        self.mx = None

    def startService(self):
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        from leapmail.provider.api import ProviderAPI

        self.threadpool = ThreadPool(minthreads=1, maxthreads=self._threads,
                                     name="leapmail-provider")
        self.threadpool.start()
        self.api = ProviderAPI(self.storage, self.threadpool, self.secret,
                               token_lifetime=self.token_lifetime, reactor=reactor)
        self.api.start()
        from leapmail.provider.intake import Intake

        self.intake = Intake(self.storage, self.threadpool, self.max_message_size,
                             self.hostname, reactor, wake=self.api.waiters.wake)
        if self.mx_port is not None:
            self.mx = self._listen(reactor, "MX", self.mx_port,
                                   lambda: self._mx_factory(), tls=False)
        self.port = self._listen(reactor, "Provider", self.requested_port, self.api.site,
                                 tls=True)
        service.Service.startService(self)

    def _mx_factory(self):
        from leapmail.provider.mx import MXFactory

        return MXFactory(self.intake, tls=self.tls)

    def _listen(self, reactor, name, port, factory, tls):
        """:func:`leapmail.twistd.listen` on the provider's interface with
        ``factory()``; what started is shut down again if the port cannot be had."""
        try:
            return listen(reactor, name, self.interface, port, factory(), self.log,
                          self.tls if tls else None)
        except StartError:
            self._shutdown()
            raise

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        if self.mx is not None:
            mx, self.mx = self.mx, None
            yield mx.stopListening()
        if self.port is not None:
            port, self.port = self.port, None
            yield port.stopListening()
        self._shutdown()

    def _shutdown(self):
        if self.mx is not None:
            mx, self.mx = self.mx, None
            mx.stopListening()
        if self.api is not None:
            self.api.stop()
        if self.threadpool is not None:
            pool, self.threadpool = self.threadpool, None
            pool.stop()
        self.storage.close()


def makeService(options):
    from leapmail.provider.api import load_secret
    from leapmail.provider.storage import open_storage

    try:
        home = prepare_home(options["home"])
        secret = load_secret(home)
        tls = tls_options(home, options["tls-cert"], options["tls-key"])
        storage = open_storage(home, options["database"])
    except LeapmailError as e:
        raise SystemExit(f"leapmail-provider: {e}") from None
    except OSError as e:
        raise SystemExit(f"leapmail-provider: {e.strerror}: {e.filename}") from None
    Logger().info("provider storage: {where}", where=storage.describe())
    report_start_errors("leapmail-provider")
    provider = ProviderService(storage, secret, options["listen"], options["port"], tls,
                               options["token-lifetime"], mx_port=options["mx-port"],
                               max_message_size=options["max-message-size"],
                               hostname=options["hostname"])
    provider.home = home
    if options["submission-port"] is None:
        return provider
    return _with_submission(provider, options, tls)


def _with_submission(provider, options, tls):
    """The provider's services under one parent, submission started after (and
    stopped before) the storage, threads and intake it uses."""
    from leapmail.provider.submission import SubmissionService

    top = service.MultiService()
    provider.setServiceParent(top)
    SubmissionService(provider, options["listen"], options["submission-port"], tls,
                      options["hostname"], smarthost=options["smarthost"],
                      max_size=options["max-message-size"],
                      intake_factory=lambda provider: provider.intake).setServiceParent(top)
    return top
