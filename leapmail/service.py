"""The daemon as a twistd service: ``twistd -n leapmail --home DIR``.

For now it unlocks the account and holds its store open; the IMAP and SMTP listeners
and the sync loop are services that later releases add under this one.
"""

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from leapmail.errors import LeapmailError
from leapmail.home import Home, default_home
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
    """Owns the open store.  The store's threads start here, after twistd has forked."""

    log = Logger()

    def __init__(self, database):
        self.database = database
        self.store = None

    def startService(self):
        service.Service.startService(self)
        # twistd may have forked since makeService locked the store: name the real holder.
        self.database.claim()
        freeze_startup_heap()
        self.store = Store(self.database)
        self.log.info("store {path} open", path=self.database.path)

    def stopService(self):
        service.Service.stopService(self)
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
    StoreService(database).setServiceParent(top)
    return top
