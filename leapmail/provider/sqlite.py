"""The provider's storage in one SQLite file (the default: ``HOME/provider.db``).

WAL mode, so readers never wait for the writer; ``synchronous=FULL``, because a push
the provider acknowledged must survive a power cut (a device that was told ``seq`` 10
would otherwise never learn of a different document 10 written after the restart).
Writers take the database lock up front (``BEGIN IMMEDIATE``) and wait up to
:data:`BUSY_TIMEOUT` seconds for each other; that is what serializes pushes here.

Change notification stays within the process: nothing to listen to.
"""

import os
import sqlite3

from leapmail.provider.storage import SQLStorage, StorageError

BUSY_TIMEOUT = 30.0

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS users (
        id INTEGER PRIMARY KEY,
        address TEXT NOT NULL UNIQUE,
        code_hash BLOB NOT NULL,
        code_expires INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        claimed_at INTEGER,
        login_kdf TEXT,
        verifier BLOB,
        bundle BLOB,
        seq INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS devices (
        user_id INTEGER NOT NULL REFERENCES users (id),
        id TEXT NOT NULL,
        name TEXT NOT NULL,
        token_hash BLOB NOT NULL UNIQUE,
        expires INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (user_id, id)
    )""",
    """CREATE TABLE IF NOT EXISTS docs (
        user_id INTEGER NOT NULL REFERENCES users (id),
        id TEXT NOT NULL,
        rev INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        UNIQUE (user_id, id)
    )""",
    "CREATE INDEX IF NOT EXISTS docs_by_seq ON docs (user_id, seq)",
    """CREATE TABLE IF NOT EXISTS incoming_keys (
        user_id INTEGER PRIMARY KEY REFERENCES users (id),
        public_key BLOB NOT NULL
    )""",
    # A sealed delivery: what the daemon claims (a lease: lease_device until
    # lease_until), and when it may try again after failing (not_before).
    """CREATE TABLE IF NOT EXISTS incoming (
        user_id INTEGER NOT NULL REFERENCES users (id),
        id TEXT NOT NULL,
        size INTEGER NOT NULL,
        chunks INTEGER NOT NULL,
        received INTEGER NOT NULL,
        not_before INTEGER NOT NULL,
        lease_device TEXT,
        lease_until INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        error TEXT,
        PRIMARY KEY (user_id, id)
    )""",
    "CREATE INDEX IF NOT EXISTS incoming_due ON incoming (user_id, not_before)",
    """CREATE TABLE IF NOT EXISTS incoming_chunks (
        user_id INTEGER NOT NULL,
        incoming_id TEXT NOT NULL,
        n INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (user_id, incoming_id, n)
    )""",
]


class SQLiteStorage(SQLStorage):
    integrity_errors = (sqlite3.IntegrityError,)
    unavailable_errors = (sqlite3.OperationalError,)

    def __init__(self, path):
        super().__init__()
        self.path = os.path.abspath(path)
        try:
            # Created 0600 before SQLite sees it; SQLite gives its -wal and -shm files
            # the same mode.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
        except OSError as e:
            raise StorageError(f"cannot open {self.path}: {e.strerror}") from None

    def describe(self):
        return self.path

    def _connect(self):
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                               check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StorageError(f"{self.path}: cannot use WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StorageError(f"{self.path} is not a usable SQLite database: {e}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _begin(self, cursor, write):
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def _drop_connection_if_broken(self, conn):
        # "database is locked" and its kind leave the connection as good as it was.
        pass

    def _schema(self):
        return SCHEMA
