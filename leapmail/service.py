"""The daemon as a twistd service::

    twistd -n leapmail --home DIR [--imap-port P] [--smtp-port Q] [--listen ADDR]
                       [--submission HOST:PORT] [--save-sent]

It unlocks the account, holds its store open, keeps the mail core running (full-text
indexing), syncs with the provider, serves IMAP on ``ADDR:P`` and SMTP on ``ADDR:Q``
(the outbox and its relay to the provider: :mod:`leapmail.smtp`).
"""

import ipaddress

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from leapmail.errors import LeapmailError
from leapmail.home import Home, default_home
from leapmail.mail.account import Account
from leapmail.passphrase import read_passphrase
from leapmail.runtime import freeze_startup_heap
from leapmail.store import Store
from leapmail.twistd import (
    ListeningService,
    StartError,
    host_port,
    parse_address,
    parse_port,
    report_start_errors,
)

DEFAULT_IMAP_PORT = 1984
DEFAULT_SMTP_PORT = 2013
#: Loopback only: the client password travels in the clear unless the client uses
#: STARTTLS, and nothing but this machine's own mail clients should reach the daemon.
DEFAULT_LISTEN = "127.0.0.1"
#: How long open IMAP connections get to close by themselves at shutdown before they
#: are cut, so that a stuck client cannot hold the store open.
CLOSE_GRACE_SECONDS = 2.0


class Options(usage.Options):
    synopsis = "[--home DIR] [--imap-port PORT] [--smtp-port PORT] [--listen ADDRESS]"
    longdesc = (
        "Run the leapmail daemon for the account in DIR. The passphrase is read from "
        "$LEAPMAIL_PASSPHRASE, else asked for on the terminal. A port of 0 takes any "
        "free port; the log says which (\"IMAP listening on HOST:PORT\")."
    )
    optParameters = [
        ["home", None, None, "account directory (default: $LEAPMAIL_HOME, else "
         "$XDG_DATA_HOME/leapmail, else ~/.local/share/leapmail)"],
        ["imap-port", None, str(DEFAULT_IMAP_PORT), "IMAP port (0: any free port)"],
        ["smtp-port", None, str(DEFAULT_SMTP_PORT), "SMTP port (0: any free port)"],
        ["submission", None, None, "the provider's submission service, HOST:PORT "
         "(default: config.json's \"submission\", else the provider's host, port 587)"],
        ["listen", None, DEFAULT_LISTEN,
         "IP address to listen on; anything but loopback exposes the account to the network"],
        ["incoming-retry", None, "60", "seconds before the first retry of incoming mail "
         "that would not open (doubled each time)"],
        ["incoming-attempts", None, "5", "attempts before a notice replaces such mail"],
        ["incoming-lease", None, "300", "seconds a claim on incoming mail holds"],
    ]

    optFlags = [
        ["save-sent", None, "keep a copy of every message sent in Sent (also: "
         "\"save_sent\": true in config.json)"],
    ]

    def postOptions(self):
        if self["home"] is None:
            self["home"] = default_home()
        for name in ("imap-port", "smtp-port"):
            self[name] = parse_port(name, self[name])
        self["listen"] = parse_address(self["listen"])
        for name, low in (("incoming-retry", 0), ("incoming-attempts", 1), ("incoming-lease", 0)):
            if not str(self[name]).isdigit() or not low <= int(self[name]) <= 86400:
                raise usage.UsageError(f"--{name} must be a whole number from {low} to 86400")
            self[name] = int(self[name])


class DaemonService(service.MultiService):
    """The daemon's top service.

    Unlike a plain MultiService, it stops its children one at a time, last started
    first, and waits for each to finish stopping before it stops the next: the IMAP
    and SMTP listeners and their connections must be gone before the store they use
    closes.
    """

    log = Logger()

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        for child in reversed(list(self)):
            try:
                yield defer.maybeDeferred(child.stopService)
            except Exception:
                # Keep going: the store must still be closed if a listener failed to stop.
                self.log.failure("error while stopping {service}", service=child)


class StoreService(service.Service):
    """Owns the open store and the account's mail.

    The store's threads start here, after twistd has forked.
    """

    log = Logger()

    def __init__(self, database, id_key):
        self.database = database
        self._id_key = id_key
        self.store = None
        self.account = None

    def startService(self):
        service.Service.startService(self)
        # twistd may have forked since makeService locked the store: name the real holder.
        self.database.claim()
        freeze_startup_heap()
        self.store = Store(self.database)
        self.account = Account(self.store, self._id_key)
        defer.ensureDeferred(self.account.setup()).addErrback(
            lambda f: self.log.failure("could not create the standard mailboxes", f))
        self.log.info("store {path} open", path=self.database.path)

    def bulk_import(self, active):
        """Sync is catching up (``True``) or done (``False``): the full-text indexer
        waits meanwhile, as for any bulk import."""
        if self.account is not None:
            self.account.text_indexer.bulk_imports += 1 if active else -1

    def stopService(self):
        service.Service.stopService(self)
        if self.account is not None:
            self.account.close()
        if self.store is not None:
            return self.store.close()
        self.database.close()
        return None


class IMAPService(ListeningService):
    """Listens for IMAP clients once the account exists (after ``StoreService`` starts).

    Logs ``IMAP listening on HOST:PORT`` with the port actually bound, which is how a
    caller that asked for port 0 learns which one it got.
    """

    log = Logger()
    close_grace = CLOSE_GRACE_SECONDS

    def __init__(self, store_service, interface, port, username, password,
                 context_factory=None, reactor=None):
        self._store_service = store_service
        self.interface = interface
        self.requested_port = port
        self._username = username
        self._password = password
        self._context_factory = context_factory
        self._reactor = reactor

    def __repr__(self):
        return f"<IMAPService {host_port(self.interface, self.requested_port)}>"

    def startService(self):
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        account = self._store_service.account
        if account is None:
            raise StartError("IMAPService must start after StoreService")
        # Imported here, not at module level: twistd imports this module to list its
        # plugins, and nothing of the IMAP server should load for that.
        from leapmail.imap.server import IMAPServerFactory

        factory = IMAPServerFactory(
            account, self._username, self._password, context_factory=self._context_factory
        )
        self.listen_on(reactor, "IMAP", self.interface, self.requested_port, factory)
        service.Service.startService(self)
        bound = self.port.getHost()
        if not ipaddress.ip_address(bound.host).is_loopback:
            self.log.warn(
                "IMAP is reachable from other machines on {address}; mail clients there "
                "should use STARTTLS", address=host_port(bound.host, bound.port))


def _login_key(home, passphrase):
    """The key to log in to the provider with when a token expires (see
    leapmail.enrollment), derived now, while the passphrase is at hand."""
    from leapmail.crypto import ScryptParams, UnsupportedKDF
    from leapmail.crypto.kdf import derive_login_key

    try:
        params = ScryptParams.from_dict(home.config()["login_kdf"])
    except (KeyError, TypeError, UnsupportedKDF):
        return None
    return derive_login_key(passphrase, params)


def _incoming_service(bundle, store_service, sync, username, options, top):
    """Incoming mail (docs/incoming.rst), if the account has its key pair."""
    from base64 import b64decode

    from leapmail.crypto.sealed import IncomingKeyPair
    from leapmail.incoming.service import IncomingService

    private = bundle.keypairs.get("incoming")
    if private is None:
        Logger().warn("this account has no incoming-mail key (it was set up before "
                      "leapmail had one): mail sent to {address} stays at the provider",
                      address=username)
        return
    keypair = IncomingKeyPair.from_private_bytes(b64decode(private))
    IncomingService(store_service, sync, keypair, username,
                    lease=options.get("incoming-lease", 300),
                    retry_first=options.get("incoming-retry", 60),
                    attempts=options.get("incoming-attempts", 5)).setServiceParent(top)


def makeService(options):
    home = Home(options["home"])
    try:
        from leapmail.tls import context_factory

        passphrase = read_passphrase()
        bundle = home.unlock(passphrase)
        username = home.address()
        provider = home.provider()
        login_key = _login_key(home, passphrase) if provider is not None else None
        del passphrase
        # Checked before the store is locked: a bad address is one line, like the rest.
        submission = _submission(home, options, provider) if provider is not None else None
        # Validate, lock and migrate now, so a bad file is reported before daemonizing.
        database = home.open_database(bundle)
        try:
            tls = context_factory(home.path)
        except BaseException:
            database.close()
            raise
    except LeapmailError as e:
        raise SystemExit(f"leapmail: {e}") from None
    report_start_errors("leapmail")
    top = DaemonService()
    store_service = StoreService(database, bundle.id_key)
    store_service.setServiceParent(top)
    sync = None
    if provider is not None:
        from leapmail.crypto.wire import WireKeys
        from leapmail.sync.service import SyncService

        # Between the store and IMAP: started after the store opens, stopped before
        # it closes (children stop in reverse order).
        sync = SyncService(store_service, WireKeys(bundle.storage_key), username, provider[0],
                           provider[1], home.path, login_key=login_key,
                           on_catching_up=store_service.bulk_import)
        sync.setServiceParent(top)
        _incoming_service(bundle, store_service, sync, username, options, top)
    IMAPService(
        store_service, options["listen"], options["imap-port"], username,
        bundle.client_password, context_factory=tls,
    ).setServiceParent(top)
    relay_factory = None
    if sync is not None:
        relay_factory = _relay_factory(home, options, username, provider, submission, sync)
    from leapmail.smtp.local import SMTPService

    SMTPService(store_service, options["listen"], options["smtp-port"], username,
                bundle.client_password, context_factory=tls,
                relay_factory=relay_factory).setServiceParent(top)
    return top


def _relay_factory(home, options, address, provider, submission, credentials):
    """How the SMTP service makes its relay to the provider's submission port."""
    from twisted.internet.ssl import Certificate, optionsForClientTLS

    host, port, provider_host = submission
    if provider[1] is not None:
        tls = optionsForClientTLS(provider_host, trustRoot=Certificate.loadPEM(provider[1]))
    else:
        tls = optionsForClientTLS(provider_host)
    save_sent = bool(options["save-sent"] or home.config().get("save_sent"))

    def make(outbox, account):
        from leapmail.smtp.relay import Relay

        return Relay(outbox, account, address, host, port, tls, credentials, home.path,
                     save_sent=save_sent)

    return make


def _submission(home, options, provider):
    """``(host, port, provider_host)`` of the provider's submission service: the
    option, else config.json's ``"submission"``, else the provider's host, port 587.
    The certificate is checked against the provider's host name whatever address
    is dialled."""
    from urllib.parse import urlsplit

    provider_host = urlsplit(provider[0]).hostname or "localhost"
    where = options["submission"] or home.config().get("submission")
    if not where:
        return provider_host, 587, provider_host
    host, sep, port = str(where).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LeapmailError(f"the submission address must be HOST:PORT, not {where!r}")
    return host, int(port), provider_host
