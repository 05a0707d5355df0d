"""The provider's storage in PostgreSQL (``--database postgresql://...``), with psycopg 3.

Any number of provider processes, on any number of machines, can share one database:
they keep no state of their own that matters.  Each thread of each process has its
own connection (autocommit mode, transactions begun explicitly): writes run at READ
COMMITTED, where the account row lock of ``UPDATE users SET seq = seq + n`` serializes
pushes to one account across every process; reads run at REPEATABLE READ, so that one
answer is one snapshot.

A push ends with ``pg_notify('leapmail_changes', USER_ID)``, delivered at commit to
every process listening: :meth:`PostgresStorage.listen` keeps one connection per
process in ``LISTEN`` on a thread of its own, and reconnects if it breaks (telling its
callback to wake everyone, since notifications may have been missed meanwhile).

The connection URL may hold a password; :meth:`describe` (what logs and errors show)
never does.
"""

import threading
import urllib.parse

import psycopg
from twisted.logger import Logger

from leapmail.provider.storage import NOTIFY_CHANNEL, SQLStorage

CONNECT_TIMEOUT = 10
#: How often the listener thread looks up from waiting to see whether it must stop.
LISTEN_POLL = 0.5
#: Pause between attempts to re-open a broken listener connection.
LISTEN_RETRY = 1.0

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS users (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        address TEXT NOT NULL UNIQUE,
        code_hash BYTEA NOT NULL,
        code_expires BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        claimed_at BIGINT,
        login_kdf TEXT,
        verifier BYTEA,
        bundle BYTEA,
        seq BIGINT NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS devices (
        user_id BIGINT NOT NULL REFERENCES users (id),
        id TEXT NOT NULL,
        name TEXT NOT NULL,
        token_hash BYTEA NOT NULL UNIQUE,
        expires BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (user_id, id)
    )""",
    """CREATE TABLE IF NOT EXISTS docs (
        user_id BIGINT NOT NULL REFERENCES users (id),
        id TEXT NOT NULL,
        rev BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (user_id, id)
    )""",
    # Document data is ciphertext: compressing it is wasted work.
    "ALTER TABLE docs ALTER COLUMN data SET STORAGE EXTERNAL",
    "CREATE INDEX IF NOT EXISTS docs_by_seq ON docs (user_id, seq)",
    """CREATE TABLE IF NOT EXISTS incoming_keys (
        user_id BIGINT PRIMARY KEY REFERENCES users (id),
        public_key BYTEA NOT NULL
    )""",
    # A sealed delivery: what the daemon claims (a lease: lease_device until
    # lease_until), and when it may try again after failing (not_before).
    """CREATE TABLE IF NOT EXISTS incoming (
        user_id BIGINT NOT NULL REFERENCES users (id),
        id TEXT NOT NULL,
        size BIGINT NOT NULL,
        chunks BIGINT NOT NULL,
        received BIGINT NOT NULL,
        not_before BIGINT NOT NULL,
        lease_device TEXT,
        lease_until BIGINT NOT NULL,
        attempts BIGINT NOT NULL,
        error TEXT,
        PRIMARY KEY (user_id, id)
    )""",
    "CREATE INDEX IF NOT EXISTS incoming_due ON incoming (user_id, not_before)",
    """CREATE TABLE IF NOT EXISTS incoming_chunks (
        user_id BIGINT NOT NULL,
        incoming_id TEXT NOT NULL,
        n BIGINT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (user_id, incoming_id, n)
    )""",
    "ALTER TABLE incoming_chunks ALTER COLUMN data SET STORAGE EXTERNAL",
]

#: Any constant: the advisory lock two processes creating the schema take in turn.
_SCHEMA_LOCK = 0x6C6D5F7072


def redact(url):
    """``url`` with any password replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "the PostgreSQL database"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, "***" if k.lower() in ("password", "passfile", "sslpassword") else v)
             for k, v in query]
    return urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path, urllib.parse.urlencode(query), ""))


class PostgresStorage(SQLStorage):
    placeholder = "%s"
    for_update = " FOR UPDATE"
    integrity_errors = (psycopg.IntegrityError,)
    unavailable_errors = (psycopg.OperationalError,)

    log = Logger()

    def __init__(self, url):
        super().__init__()
        self._url = url
        self._listeners = []

    def describe(self):
        return redact(self._url)

    def _connect(self):
        return psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                               application_name="leapmail-provider")

    def _begin(self, cursor, write):
        cursor.execute("BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def _drop_connection_if_broken(self, conn):
        if conn.closed or conn.broken:
            self._drop_connection()

    def _cursor(self, conn):
        # Results in binary: document data comes as its bytes rather than as hex text
        # to decode, which made reading the change feed 2.5 times as fast.
        return conn.cursor(binary=True)

    def _among(self, values):
        # One array parameter, not one parameter per id: psycopg prepares a statement
        # run five times, and PostgreSQL's generic plan for "id IN ($2, ..., $501)"
        # took 200-300 ms for the 500 ids of a push to an account of 20,000 documents
        # (bench_sync), against under 10 ms for "id = ANY($2)".
        return "= ANY(?)", [list(values)]

    def _lock_schema(self, cursor):
        cursor.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))

    def _schema(self):
        return SCHEMA

    def _notify(self, cursor, user_id):
        cursor.execute("SELECT pg_notify(?, ?)", (NOTIFY_CHANNEL, str(user_id)))

    def listen(self, callback):
        listener = _Listener(self._url, self.describe(), callback)
        listener.start()
        self._listeners.append(listener)

        def stop():
            if listener in self._listeners:
                self._listeners.remove(listener)
            listener.stop()

        return stop

    def close(self):
        for listener in list(self._listeners):
            listener.stop()
        self._listeners = []
        super().close()


class _Listener(threading.Thread):
    log = Logger()

    def __init__(self, url, description, callback):
        super().__init__(name="leapmail-provider-listen", daemon=True)
        self._url = url
        self._description = description
        self._callback = callback
        self._stopping = threading.Event()
        self._ready = threading.Event()

    def wait_ready(self, timeout=None):
        """Block until the first ``LISTEN`` is in place (tests use this)."""
        return self._ready.wait(timeout)

    def stop(self):
        self._stopping.set()
        if self is not threading.current_thread():
            self.join(LISTEN_POLL * 4 + CONNECT_TIMEOUT)

    def run(self):
        failures = 0
        while not self._stopping.is_set():
            conn = None
            try:
                conn = psycopg.connect(self._url, autocommit=True,
                                       connect_timeout=CONNECT_TIMEOUT,
                                       application_name="leapmail-provider-listen")
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                if failures:
                    self.log.info("listening to {db} again", db=self._description)
                failures = 0
                self._ready.set()
                # Anything committed before LISTEN took effect went unheard.
                self._callback(None)
                while not self._stopping.is_set():
                    for note in conn.notifies(timeout=LISTEN_POLL):
                        try:
                            user_id = int(note.payload)
                        except ValueError:
                            continue
                        self._callback(user_id)
            except psycopg.Error as e:
                failures += 1
                if failures == 1:
                    message = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    self.log.warn("lost the change notifications of {db}: {error}; "
                                  "retrying", db=self._description, error=message)
                self._stopping.wait(LISTEN_RETRY)
            except Exception:
                self.log.failure("change listener failed")
                self._stopping.wait(LISTEN_RETRY)
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
