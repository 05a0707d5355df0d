"""An account's home directory: the sealed secrets bundle and the encrypted store.

Layout (``init`` creates the directory 0700 and every file in it 0600)::

    secrets.json    the secrets bundle, sealed under the passphrase
    config.json     non-secret settings (the account address; the provider's URL)
    provider-ca.pem the provider's certificate, pinned at init (if one was given)
    sync-status.json  what the sync loop last did (see leapmail.sync.service)
    store.db        the SQLCipher store, keyed with the bundle's storage key
    store.db-wal, store.db-shm, store.db.lock   SQLite's WAL files and our lock
    tls-cert.pem, tls-key.pem   the daemon's TLS certificate (see leapmail.tls)
"""

import fcntl
import functools
import json
import os

from leapmail.crypto import SecretsBundle, new_client_password, seal, unseal
from leapmail.errors import LeapmailError
from leapmail.fsutil import atomic_write
from leapmail.mail.account import keyed_id, setup_mailboxes
from leapmail.mail.outbox import OUTBOX
from leapmail.mail.schema import MAIL
from leapmail.store import Database, Store
from leapmail.sync.schema import SYNC

#: The schema components of an account's store.
COMPONENTS = (MAIL, SYNC, OUTBOX)


class HomeError(LeapmailError):
    pass


def default_home():
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.environ.get("LEAPMAIL_HOME") or os.path.join(base, "leapmail")


class Home:
    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.secrets_path = os.path.join(self.path, "secrets.json")
        self.config_path = os.path.join(self.path, "config.json")
        self.store_path = os.path.join(self.path, "store.db")

    def __repr__(self):
        return f"<Home {self.path}>"

    def exists(self):
        return os.path.exists(self.secrets_path)

    def create(self, passphrase, address):
        """Create an account, or finish one whose creation was interrupted."""
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        if self.exists():
            bundle = self.unlock(passphrase)
            if os.path.exists(self.store_path):
                raise HomeError(f"{self.path} already holds an account; nothing was changed")
        elif os.path.exists(self.store_path):
            raise HomeError(
                f"{self.store_path} exists but {self.secrets_path} does not: without its "
                "secrets the store cannot be opened, and init will not replace them. "
                "Restore secrets.json from a backup, or choose an empty directory."
            )
        else:
            bundle = SecretsBundle.generate()
            atomic_write(self.config_path, _json({"address": address}))
            atomic_write(self.secrets_path, seal(bundle, passphrase))
        database = Database.open(self.store_path, bundle.storage_key, COMPONENTS, create=True)
        try:
            database.run(setup_mailboxes, functools.partial(keyed_id, bundle.id_key))
        finally:
            database.close()
        return bundle

    def check_new(self):
        """Refuse to set an account up where one (or a part of one) already is."""
        for path in (self.secrets_path, self.store_path):
            if os.path.exists(path):
                raise HomeError(f"{path} exists: {self.path} already holds an account; "
                                "nothing was changed")

    def write_secrets(self, sealed):
        atomic_write(self.secrets_path, sealed)

    def write_config(self, config):
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        atomic_write(self.config_path, _json(config))

    def create_store(self, bundle, sealed, setup=True):
        """Write the sealed bundle and a new store; returns the open :class:`Database`.

        ``setup=False`` leaves the mailboxes out: a device joining an account gets them
        from the provider.
        """
        self.write_secrets(sealed)
        database = Database.open(self.store_path, bundle.storage_key, COMPONENTS, create=True)
        if setup:
            try:
                database.run(setup_mailboxes, functools.partial(keyed_id, bundle.id_key))
            except BaseException:
                database.close()
                raise
        return database

    def provider(self):
        """``(url, ca_pem or None)`` of the account's provider, or ``None`` if local-only."""
        config = self.config()
        url = config.get("provider") if isinstance(config, dict) else None
        if not url:
            return None
        ca = config.get("provider_ca")
        if not ca:
            return url, None
        path = os.path.join(self.path, ca)
        try:
            with open(path, "rb") as f:
                return url, f.read()
        except OSError as e:
            raise HomeError(f"cannot read the provider certificate {path}: {e.strerror}"
                            ) from None

    def config(self):
        try:
            with open(self.config_path, "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return {}
        except ValueError:
            raise HomeError(f"{self.config_path} is not valid JSON; fix or remove it") from None

    def address(self):
        """The account's mail address: the username of its local IMAP and SMTP."""
        config = self.config()
        address = config.get("address") if isinstance(config, dict) else None
        if not isinstance(address, str) or not address:
            raise HomeError(
                f"{self.config_path} does not name the account's address; "
                'write {"address": "you@example.org"} into it'
            )
        return address

    def unlock(self, passphrase):
        """Open the secrets bundle.

        A bundle sealed before client passwords existed gets one here, re-sealed under
        the same passphrase, so every unlocked bundle has a ``client_password``.
        """
        bundle = self._read_bundle(passphrase)
        if bundle.client_password is None:
            bundle = self._add_client_password(passphrase)
        return bundle

    def _read_bundle(self, passphrase):
        try:
            with open(self.secrets_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise HomeError(
                f"no account in {self.path}: create one with 'leapmail init --home {self.path}'"
            ) from None
        return unseal(data, passphrase, path=self.secrets_path)

    def _add_client_password(self, passphrase):
        # The daemon and 'leapmail credentials' may both be the first to unlock an old
        # bundle; without the lock each would store a different password and one of
        # them would hand out a password that no longer works.
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            bundle = self._read_bundle(passphrase)
            if bundle.client_password is None:
                bundle.client_password = new_client_password()
                atomic_write(self.secrets_path, seal(bundle, passphrase))
        finally:
            os.close(fd)
        return bundle

    def change_passphrase(self, old, new):
        """Re-seal the bundle under ``new``; the store and its keys stay as they are."""
        bundle = self.unlock(old)
        atomic_write(self.secrets_path, seal(bundle, new))

    def open_database(self, bundle, components=COMPONENTS, upgrade=True):
        return Database.open(self.store_path, bundle.storage_key, components, upgrade=upgrade)

    def open_store(self, bundle, components=COMPONENTS, reactor=None):
        return Store.open(self.store_path, bundle.storage_key, components, reactor=reactor)


def _json(value):
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode("utf-8")
