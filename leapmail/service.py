"""The daemon as a twistd service: ``twistd -n leapmail --home DIR``.

For now it unlocks the account, holds its store open and keeps the mail core running
(full-text indexing); the IMAP and SMTP listeners and the sync loop are services that
later releases add under this one.
"""

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


class Options(usage.Options):
    synopsis = "[--home DIR]"
    longdesc = (
        "Run the leapmail daemon for the account in DIR. The passphrase is read from "
        "$LEAPMAIL_PASSPHRASE, else asked for on the terminal."
    )
    optParameters = [["home", None, None, "account directory", str]]

    def postOptions(self):
        if self["home"] is None:
            self["home"] = default_home()


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

    def stopService(self):
        service.Service.stopService(self)
        if self.account is not None:
            self.account.close()
        if self.store is not None:
            return self.store.close()
        self.database.close()
        return None


def makeService(options):
    home = Home(options["home"])
    try:
        bundle = home.unlock(read_passphrase())
        # Validate, lock and migrate now, so a bad file is reported before daemonizing.
        database = home.open_database(bundle)
    except LeapmailError as e:
        raise SystemExit(f"leapmail: {e}") from None
    top = service.MultiService()
    StoreService(database, bundle.id_key).setServiceParent(top)
    return top
