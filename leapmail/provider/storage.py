"""The provider's storage: one small interface, two implementations.

:class:`IProviderStorage` is everything the HTTP API (:mod:`leapmail.provider.api`)
asks of a database: accounts and their enrollment, devices and their tokens, the
sealed secrets bundle, and each account's documents with their revisions and change
sequence numbers.  :class:`SQLStorage` implements it once, in SQL both SQLite and
PostgreSQL understand; :mod:`leapmail.provider.sqlite` and
:mod:`leapmail.provider.postgres` supply the connection, the transaction flavours and
the cross-process change notification.  The same test suite runs against both.

The interface is blocking.  The API runs it in a thread pool; every thread gets its
own connection, opened on first use.

What is stored, per account: the address; the SHA-256 of its one-time enrollment
code and the code's expiry; once claimed, the login KDF parameters (JSON), the login
verifier (SHA-256 of the login key), the sealed secrets bundle; and ``seq``, the
account's change sequence number.  Per device: a random id, a name, the SHA-256 of
its token and the token's expiry.  Per document: id, revision, the ``seq`` of its
last write and the data, an opaque blob.  No token, code or login key is ever
stored, only hashes.

Change sequence numbers: a push of ``n`` documents adds ``n`` to the account's
``seq`` (``UPDATE users SET seq = seq + n ... RETURNING seq``) before it checks base
revisions, and each document gets one of the ``n`` numbers.  That update locks the
account's row until the push commits, so pushes to one account are serialized and
numbers are handed out in commit order: a reader never sees ``seq`` 10 committed while
9 is still to come.  A push that conflicts rolls back, number bump included.  A
delivery of incoming mail adds 1 with no document, so that a long poll from before it
sees the head move.
"""

import hmac
import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from zope.interface import Interface, implementer

from leapmail.errors import LeapmailError

#: Bump when the schema changes; a database made by a newer release is refused, an
#: older one gets the new tables (every CREATE is IF NOT EXISTS).
SCHEMA_VERSION = 2
#: The PostgreSQL NOTIFY channel pushes announce themselves on (payload: user id).
NOTIFY_CHANNEL = "leapmail_changes"
#: A sealed delivery is stored in rows of at most this many bytes: a 50 MB message is
#: never one value to read (or to hold in memory) at once.
INCOMING_CHUNK = 1024 * 1024


# -- errors -------------------------------------------------------------------------


class StorageError(LeapmailError):
    """The storage refuses or fails an operation; ``str()`` is fit for a log line."""


class Unavailable(StorageError):
    """The database cannot be reached or is too busy right now (HTTP 503)."""


class UserExists(StorageError):
    def __init__(self, address):
        super().__init__(f"the account {address} exists already")
        self.address = address


class EnrollmentRefused(StorageError):
    """Unknown address or wrong enrollment code (the API gives both the same answer)."""

    def __init__(self):
        super().__init__("wrong enrollment code")


class CodeUsed(StorageError):
    """The right code, but the account was claimed with it already."""

    def __init__(self):
        super().__init__("this enrollment code has been used already")


class CodeExpired(StorageError):
    """The right code, but too late."""

    def __init__(self):
        super().__init__("this enrollment code has expired; ask for a new account")


class LoginChanged(StorageError):
    """The login verifier changed meanwhile (another passphrase change won)."""

    def __init__(self):
        super().__init__("the login changed meanwhile")


class NoSuchAccount(StorageError):
    """An operation named an account that does not exist (or is not claimed yet)."""

    def __init__(self, user_id):
        super().__init__(f"no claimed account with id {user_id}")


class Conflict(StorageError):
    """A push whose base revisions are not current; nothing was written.

    ``conflicts`` lists ``(id, current_rev)`` for every offending document, in the
    order of the push (``current_rev`` 0: the document does not exist).
    """

    def __init__(self, conflicts):
        super().__init__(f"{len(conflicts)} documents are not at their base revision")
        self.conflicts = list(conflicts)


# -- records ------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountRecord:
    """An account as login sees it.  ``login_kdf`` and ``verifier`` are ``None``
    until the account is claimed."""

    user_id: int
    address: str
    login_kdf: dict | None
    verifier: bytes | None

    @property
    def claimed(self):
        return self.login_kdf is not None


@dataclass(frozen=True)
class DeviceRecord:
    user_id: int
    device_id: str
    name: str
    #: Unix time (seconds) from which the token is refused.
    expires: int


@dataclass(frozen=True)
class Doc:
    id: str
    rev: int
    seq: int
    data: bytes


@dataclass(frozen=True)
class Incoming:
    """A sealed delivery waiting in an account's incoming queue."""

    id: str
    #: Bytes of the sealed box.
    size: int
    #: Unix time the provider accepted it.
    received: int
    #: Failed attempts to open or import it so far.
    attempts: int
    #: How many rows (of at most ``INCOMING_CHUNK`` bytes) hold it, in order from 0.
    chunks: int


@dataclass(frozen=True)
class Changes:
    docs: list
    #: Where to ask from next time: the last ``seq`` in ``docs``, or the account's
    #: current one when ``docs`` is empty.
    seq: int
    more: bool


# -- the interface ------------------------------------------------------------------


class IProviderStorage(Interface):
    """What the provider's API needs of a database.  Every method blocks.

    Times are integer Unix seconds, passed in by the caller (whose clock tests can
    control).  Hashes are 32-byte SHA-256 digests.  ``user_id`` is the storage's own
    integer id of an account.
    """

    def create_user(address, code_hash, code_expires, now):
        """Create an unclaimed account with the hash of its enrollment code.

        Raises :class:`UserExists`.
        """

    def find_account(address):
        """The :class:`AccountRecord` of ``address``, or ``None``."""

    def claim(address, code_hash, now, login_kdf, verifier, bundle,
              device_id, device_name, token_hash, token_expires):
        """Enroll, atomically: check the code, store the login KDF parameters (a dict),
        the verifier and the bundle, register the first device.  Returns the user id.

        Raises :class:`EnrollmentRefused` (unknown address or wrong code, told apart
        by nobody), :class:`CodeUsed` (right code, already claimed) or
        :class:`CodeExpired` (right code, too late).  The code hash is compared in
        constant time.
        """

    def change_login(user_id, old_verifier, login_kdf, verifier, bundle):
        """Replace login parameters, verifier and bundle if the verifier is still
        ``old_verifier``; else raise :class:`LoginChanged`."""

    def add_device(user_id, device_id, device_name, token_hash, token_expires, now):
        """Register a device (a login) of a claimed account."""

    def device_by_token_hash(token_hash):
        """The :class:`DeviceRecord` whose token hashes to ``token_hash``, or ``None``
        (expired devices included: the caller tells expired from unknown)."""

    def get_bundle(user_id):
        """The account's sealed secrets bundle (bytes)."""

    def address_of(user_id):
        """The account's address, or ``None`` (submission: who a token logs in as)."""

    def push(user_id, docs):
        """Write ``docs``, a sequence of ``(id, base_rev, data)`` with distinct ids, all
        or nothing, each at ``base_rev + 1``.

        Returns ``(seq, revs)``: the account's sequence number after the write and the
        new revisions in order.  Raises :class:`Conflict` when any document's current
        revision is not its base; nothing is written then.
        """

    def changes(user_id, since, limit, max_bytes):
        """:class:`Changes`: the latest revision of documents written after ``since``,
        in ``seq`` order, at most ``limit`` of them and no more than ``max_bytes`` of
        data, but at least one if there is any."""

    def doc_sizes(user_id, ids):
        """``{id: size of data}`` for those of ``ids`` the account has."""

    def get_docs(user_id, ids):
        """The :class:`Doc` of each of ``ids`` the account has, in the order of ``ids``."""

    def head(user_id):
        """The account's current change sequence number."""

    def set_incoming_key(user_id, public_key):
        """Register (or replace) the public key incoming mail is sealed to."""

    def incoming_key(address):
        """``(user_id, public_key)`` of the claimed account ``address`` if it has
        registered an incoming key, else ``None``."""

    def has_domain(domain):
        """Whether any account's address is in ``domain`` (lower case)."""

    def deliver(deliveries, now):
        """Store sealed deliveries, all or nothing, and announce them to each account's
        change feed (its ``seq`` goes up by one, with no document).  ``deliveries``: ``[(user_id, delivery_id, chunks)]``, ``chunks``
        an iterable of bytes of at most ``INCOMING_CHUNK`` each (read as it is stored).
        """

    def claim_incoming(user_id, device_id, limit, lease_until, now, reclaim=False):
        """Lease up to ``limit`` claimable deliveries to ``device_id`` until
        ``lease_until``; returns their :class:`Incoming` records, oldest first.

        Claimable: due (its not-before time has come) and not leased (or the lease has
        ended; the holder's own included, so a claim always makes progress).  Of two
        devices claiming at once, each delivery goes to one of them.  ``reclaim``: the
        device's own leases count as claimable too (a restarted daemon takes back
        what it had claimed before it stopped, instead of waiting out the lease)."""

    def incoming_record(user_id, device_id, delivery_id, now):
        """The :class:`Incoming` record of a delivery ``device_id`` may read (leased to
        it, or claimable), else ``None``."""

    def incoming_chunk(user_id, delivery_id, n):
        """Row ``n`` of a delivery's sealed bytes, or ``None``."""

    def fail_incoming(user_id, device_id, delivery_id, not_before, error):
        """Release a delivery leased to ``device_id`` (even if the lease has run out,
        as long as no other device has claimed it since) after a failed attempt: counted, and not claimable before ``not_before``.  Returns whether it
        was found."""

    def delete_incoming(user_id, ids):
        """Delete those of ``ids`` the account has; returns how many."""

    def incoming_count(user_id, now):
        """How many of the account's deliveries are claimable now."""

    def listen(callback):
        """Have ``callback(user_id)`` called, from a thread of the storage's, whenever
        another process commits a push (``callback(None)``: some may have been missed,
        wake every waiter).  Returns a function that stops the listening, or ``None``
        when this storage has no other processes to hear from."""

    def close():
        """Close every connection.  The storage is unusable afterwards."""


# -- one implementation for both SQL databases --------------------------------------


def dumps_kdf(kdf):
    return json.dumps(kdf, separators=(",", ":"), sort_keys=True)


class _Cursor:
    """A DB-API cursor that takes ``?`` placeholders, whatever the driver wants."""

    def __init__(self, cursor, placeholder):
        self._cursor = cursor
        self._placeholder = placeholder

    def execute(self, sql, params=()):
        if self._placeholder != "?":
            sql = sql.replace("?", self._placeholder)
        self._cursor.execute(sql, params)
        return self

    def executemany(self, sql, rows):
        if self._placeholder != "?":
            sql = sql.replace("?", self._placeholder)
        self._cursor.executemany(sql, rows)
        return self

    def one(self, sql, params=()):
        return self.execute(sql, params)._cursor.fetchone()

    def all(self, sql, params=()):
        return self.execute(sql, params)._cursor.fetchall()

    @property
    def rowcount(self):
        return self._cursor.rowcount


def _marks(values):
    return ", ".join("?" * len(values))


@implementer(IProviderStorage)
class SQLStorage:
    """:class:`IProviderStorage` in SQL; subclasses connect and name the dialect."""

    #: The driver's parameter marker.
    placeholder = "?"
    #: Appended to the SELECT that locks an account row for claiming.
    for_update = ""
    #: Driver exceptions: a unique-constraint violation, and "cannot work now".
    integrity_errors = ()
    unavailable_errors = ()

    def __init__(self):
        self._local = threading.local()
        self._connections = []
        self._lock = threading.Lock()
        self._closed = False

    # -- what subclasses provide ------------------------------------------------

    def _connect(self):
        raise NotImplementedError

    def _begin(self, cursor, write):
        raise NotImplementedError

    def _notify(self, cursor, user_id):
        """Tell other processes, at commit, that ``user_id`` has new changes."""

    def _schema(self):
        """The CREATE statements, in order, the ``meta`` table's first."""
        raise NotImplementedError

    def _lock_schema(self, cursor):
        """Keep two processes creating the schema at once from colliding."""

    def describe(self):
        """Where the data is, for logs (never a password)."""
        raise NotImplementedError

    def _cursor(self, conn):
        return conn.cursor()

    def _among(self, values):
        """``(sql, params)``: the test that a column is one of ``values``."""
        return f"IN ({_marks(values)})", values

    def listen(self, callback):
        return None

    # -- connections and transactions -------------------------------------------

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise Unavailable("the provider's storage is closed")
            try:
                conn = self._connect()
            except self.unavailable_errors as e:
                raise Unavailable(f"cannot connect to {self.describe()}: "
                                  f"{_first_line(e)}") from None
            with self._lock:
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    def release(self):
        """Close the calling thread's connection, if it has one."""
        self._drop_connection()

    def _drop_connection(self):
        conn = self._local.__dict__.pop("conn", None)
        if conn is None:
            return
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        try:
            conn.close()
        except Exception:
            pass

    @contextmanager
    def _transaction(self, write=False):
        conn = self._connection()
        raw = self._cursor(conn)
        began = False
        try:
            self._begin(raw, write)
            began = True
            yield _Cursor(raw, self.placeholder)
            raw.execute("COMMIT")
        except BaseException as e:
            if began:
                try:
                    raw.execute("ROLLBACK")
                except Exception:
                    # A connection that cannot even roll back is of no further use.
                    self._drop_connection()
            if isinstance(e, self.unavailable_errors) and not isinstance(
                    e, self.integrity_errors):
                self._drop_connection_if_broken(conn)
                raise Unavailable(f"{self.describe()}: {_first_line(e)}") from None
            raise
        finally:
            try:
                raw.close()
            except Exception:
                pass

    def _drop_connection_if_broken(self, conn):
        self._drop_connection()

    def create_schema(self):
        with self._transaction(write=True) as c:
            self._lock_schema(c)
            meta, *rest = self._schema()
            c.execute(meta)
            row = c.one("SELECT value FROM meta WHERE key = 'schema_version'")
            if row is None or int(row[0]) < SCHEMA_VERSION:
                for statement in rest:
                    c.execute(statement)
                c.execute("DELETE FROM meta WHERE key = 'schema_version'")
                c.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                          (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StorageError(
                    f"{self.describe()} was made by a newer release of leapmail "
                    f"(schema {row[0]}); upgrade leapmail")

    def close(self):
        self._closed = True
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except Exception:
                pass

    # -- accounts ---------------------------------------------------------------

    def create_user(self, address, code_hash, code_expires, now):
        try:
            with self._transaction(write=True) as c:
                if c.one("SELECT 1 FROM users WHERE address = ?", (address,)):
                    raise UserExists(address)
                c.execute(
                    "INSERT INTO users (address, code_hash, code_expires, created_at) "
                    "VALUES (?, ?, ?, ?)", (address, bytes(code_hash), int(code_expires), int(now)))
        except self.integrity_errors:
            # Another process created it between our look and our insert.
            raise UserExists(address) from None

    def find_account(self, address):
        with self._transaction() as c:
            row = c.one("SELECT id, login_kdf, verifier FROM users WHERE address = ?",
                        (address,))
        if row is None:
            return None
        user_id, kdf, verifier = row
        return AccountRecord(
            user_id=user_id, address=address,
            login_kdf=None if kdf is None else json.loads(kdf),
            verifier=None if verifier is None else bytes(verifier),
        )

    def claim(self, address, code_hash, now, login_kdf, verifier, bundle,
              device_id, device_name, token_hash, token_expires):
        with self._transaction(write=True) as c:
            row = c.one("SELECT id, code_hash, code_expires, claimed_at FROM users "
                        "WHERE address = ?" + self.for_update, (address,))
            if row is None:
                # The same comparison as for a real account, to take the same time.
                hmac.compare_digest(bytes(code_hash), bytes(32))
                raise EnrollmentRefused()
            user_id, stored, expires, claimed_at = row
            if not hmac.compare_digest(bytes(stored), bytes(code_hash)):
                raise EnrollmentRefused()
            if claimed_at is not None:
                raise CodeUsed()
            if int(now) >= expires:
                raise CodeExpired()
            c.execute("UPDATE users SET claimed_at = ?, login_kdf = ?, verifier = ?, bundle = ? "
                      "WHERE id = ? AND claimed_at IS NULL",
                      (int(now), dumps_kdf(login_kdf), bytes(verifier), bytes(bundle), user_id))
            if c.rowcount != 1:
                raise CodeUsed()
            self._insert_device(c, user_id, device_id, device_name, token_hash,
                                token_expires, now)
        return user_id

    def change_login(self, user_id, old_verifier, login_kdf, verifier, bundle):
        """Replace the login verifier and sealed bundle (a passphrase change), if the
        verifier is still ``old_verifier``: of two changes at once, one wins whole."""
        with self._transaction(write=True) as c:
            c.execute("UPDATE users SET login_kdf = ?, verifier = ?, bundle = ? "
                      "WHERE id = ? AND verifier = ?",
                      (dumps_kdf(login_kdf), bytes(verifier), bytes(bundle), user_id,
                       bytes(old_verifier)))
            if c.rowcount != 1:
                raise LoginChanged()

    def add_device(self, user_id, device_id, device_name, token_hash, token_expires, now):
        with self._transaction(write=True) as c:
            if not c.one("SELECT 1 FROM users WHERE id = ? AND claimed_at IS NOT NULL",
                         (user_id,)):
                raise NoSuchAccount(user_id)
            self._insert_device(c, user_id, device_id, device_name, token_hash,
                                token_expires, now)

    @staticmethod
    def _insert_device(c, user_id, device_id, device_name, token_hash, token_expires, now):
        c.execute("INSERT INTO devices (user_id, id, name, token_hash, expires, created_at) "
                  "VALUES (?, ?, ?, ?, ?, ?)",
                  (user_id, device_id, device_name, bytes(token_hash), int(token_expires),
                   int(now)))

    def address_of(self, user_id):
        with self._transaction() as c:
            row = c.one("SELECT address FROM users WHERE id = ?", (user_id,))
        return None if row is None else row[0]

    def device_by_token_hash(self, token_hash):
        token_hash = bytes(token_hash)
        with self._transaction() as c:
            row = c.one("SELECT user_id, id, name, expires, token_hash FROM devices "
                        "WHERE token_hash = ?", (token_hash,))
        if row is None or not hmac.compare_digest(bytes(row[4]), token_hash):
            return None
        return DeviceRecord(user_id=row[0], device_id=row[1], name=row[2], expires=row[3])

    def get_bundle(self, user_id):
        with self._transaction() as c:
            row = c.one("SELECT bundle FROM users WHERE id = ? AND claimed_at IS NOT NULL",
                        (user_id,))
        if row is None:
            raise NoSuchAccount(user_id)
        return bytes(row[0])

    # -- documents --------------------------------------------------------------

    def push(self, user_id, docs):
        docs = [(doc_id, int(base), data) for doc_id, base, data in docs]
        ids = [doc_id for doc_id, _, _ in docs]
        if len(set(ids)) != len(ids):
            raise ValueError("a push names a document twice")
        if not docs:
            return self.head(user_id), []
        with self._transaction(write=True) as c:
            # Takes the account's row lock first: pushes to one account queue here.
            row = c.one("UPDATE users SET seq = seq + ? WHERE id = ? AND claimed_at IS NOT NULL "
                        "RETURNING seq", (len(docs), user_id))
            if row is None:
                raise NoSuchAccount(user_id)
            first = row[0] - len(docs) + 1
            current = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                among, params = self._among(chunk)
                current.update(c.all(
                    f"SELECT id, rev FROM docs WHERE user_id = ? AND id {among}",
                    (user_id, *params)))
            conflicts = [(doc_id, current.get(doc_id, 0)) for doc_id, base, _ in docs
                         if current.get(doc_id, 0) != base]
            if conflicts:
                raise Conflict(conflicts)
            revs = [base + 1 for _, base, _ in docs]
            c.executemany(
                "INSERT INTO docs (user_id, id, rev, seq, data) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (user_id, id) DO UPDATE "
                "SET rev = excluded.rev, seq = excluded.seq, data = excluded.data",
                [(user_id, doc_id, rev, first + i, bytes(data))
                 for i, ((doc_id, _, data), rev) in enumerate(zip(docs, revs))])
            self._notify(c, user_id)
        return row[0], revs

    def changes(self, user_id, since, limit, max_bytes):
        with self._transaction() as c:
            row = c.one("SELECT seq FROM users WHERE id = ?", (user_id,))
            if row is None:
                raise NoSuchAccount(user_id)
            head = row[0]
            # Sizes first: never read more data than the answer will carry.
            rows = c.all("SELECT id, rev, seq, length(data) FROM docs "
                         "WHERE user_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                         (user_id, since, limit + 1))
            taken, total = [], 0
            for doc_id, rev, seq, size in rows[:limit]:
                if taken and total + size > max_bytes:
                    break
                taken.append((doc_id, rev, seq))
                total += size
            if not taken:
                return Changes([], head, False)
            last = taken[-1][2]
            data = dict(c.all("SELECT id, data FROM docs WHERE user_id = ? AND seq > ? "
                              "AND seq <= ?", (user_id, since, last)))
        docs = [Doc(doc_id, rev, seq, bytes(data[doc_id])) for doc_id, rev, seq in taken]
        return Changes(docs, last, len(taken) < len(rows))

    def doc_sizes(self, user_id, ids):
        ids = list(ids)
        sizes = {}
        with self._transaction() as c:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                among, params = self._among(chunk)
                sizes.update(c.all(
                    f"SELECT id, length(data) FROM docs WHERE user_id = ? AND id {among}",
                    (user_id, *params)))
        return sizes

    def get_docs(self, user_id, ids):
        ids = list(ids)
        found = {}
        with self._transaction() as c:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                among, params = self._among(chunk)
                for doc_id, rev, seq, data in c.all(
                        f"SELECT id, rev, seq, data FROM docs WHERE user_id = ? "
                        f"AND id {among}", (user_id, *params)):
                    found[doc_id] = Doc(doc_id, rev, seq, bytes(data))
        return [found[doc_id] for doc_id in dict.fromkeys(ids) if doc_id in found]

    def head(self, user_id):
        with self._transaction() as c:
            row = c.one("SELECT seq FROM users WHERE id = ?", (user_id,))
        if row is None:
            raise NoSuchAccount(user_id)
        return row[0]

    # -- incoming mail ----------------------------------------------------------

    def set_incoming_key(self, user_id, public_key):
        with self._transaction(write=True) as c:
            if not c.one("SELECT 1 FROM users WHERE id = ? AND claimed_at IS NOT NULL",
                         (user_id,)):
                raise NoSuchAccount(user_id)
            c.execute("INSERT INTO incoming_keys (user_id, public_key) VALUES (?, ?) "
                      "ON CONFLICT (user_id) DO UPDATE SET public_key = excluded.public_key",
                      (user_id, bytes(public_key)))

    def incoming_key(self, address):
        with self._transaction() as c:
            row = c.one("SELECT u.id, k.public_key FROM users u JOIN incoming_keys k "
                        "ON k.user_id = u.id WHERE u.address = ? AND u.claimed_at IS NOT NULL",
                        (address,))
        return None if row is None else (row[0], bytes(row[1]))

    def has_domain(self, domain):
        pattern = "%@" + domain.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with self._transaction() as c:
            return c.one("SELECT 1 FROM users WHERE address LIKE ? ESCAPE '\\' LIMIT 1",
                         (pattern,)) is not None

    def deliver(self, deliveries, now):
        with self._transaction(write=True) as c:
            users = set()
            for user_id, delivery_id, chunks in deliveries:
                size = n = 0
                for data in chunks:
                    if len(data) > INCOMING_CHUNK:
                        raise ValueError("a delivery chunk over INCOMING_CHUNK bytes")
                    c.execute("INSERT INTO incoming_chunks (user_id, incoming_id, n, data) "
                              "VALUES (?, ?, ?, ?)", (user_id, delivery_id, n, bytes(data)))
                    size += len(data)
                    n += 1
                c.execute("INSERT INTO incoming (user_id, id, size, chunks, received, "
                          "not_before, lease_until, attempts) VALUES (?, ?, ?, ?, ?, 0, 0, 0)",
                          (user_id, delivery_id, size, n, int(now)))
                users.add(user_id)
            for user_id in sorted(users):
                # A new sequence number with no document: a long poll that began
                # before it (or whose wake-up was lost) sees its head move and answers.
                c.execute("UPDATE users SET seq = seq + 1 WHERE id = ?", (user_id,))
                self._notify(c, user_id)

    _INCOMING = "id, size, received, attempts, chunks"

    def claim_incoming(self, user_id, device_id, limit, lease_until, now, reclaim=False):
        now = int(now)
        claimed = []
        # Free, or (reclaim) leased to this device already.
        free = "(lease_until <= ? OR lease_device = ?)" if reclaim else "lease_until <= ?"
        free_args = (now, device_id) if reclaim else (now,)
        with self._transaction(write=True) as c:
            rows = c.all(f"SELECT {self._INCOMING} FROM incoming WHERE user_id = ? "
                         f"AND not_before <= ? AND {free} "
                         "ORDER BY received, id LIMIT ?",
                         (user_id, now, *free_args, int(limit)))
            for row in rows:
                # The condition again: on PostgreSQL a concurrent claim may have taken
                # the row since the SELECT (the UPDATE waits for it, then re-checks).
                c.execute("UPDATE incoming SET lease_device = ?, lease_until = ? "
                          f"WHERE user_id = ? AND id = ? AND not_before <= ? AND {free}",
                          (device_id, int(lease_until), user_id, row[0], now, *free_args))
                if c.rowcount == 1:
                    claimed.append(Incoming(*row))
        return claimed

    def incoming_record(self, user_id, device_id, delivery_id, now):
        now = int(now)
        with self._transaction() as c:
            row = c.one(f"SELECT {self._INCOMING} FROM incoming WHERE user_id = ? AND id = ? "
                        "AND (lease_device = ? OR (lease_until <= ? AND not_before <= ?))",
                        (user_id, delivery_id, device_id, now, now))
        return None if row is None else Incoming(*row)

    def incoming_chunk(self, user_id, delivery_id, n):
        with self._transaction() as c:
            row = c.one("SELECT data FROM incoming_chunks WHERE user_id = ? AND incoming_id = ? "
                        "AND n = ?", (user_id, delivery_id, int(n)))
        return None if row is None else bytes(row[0])

    def fail_incoming(self, user_id, device_id, delivery_id, not_before, error):
        with self._transaction(write=True) as c:
            c.execute("UPDATE incoming SET attempts = attempts + 1, not_before = ?, "
                      "lease_device = NULL, lease_until = 0, error = ? "
                      "WHERE user_id = ? AND id = ? AND lease_device = ?",
                      (int(not_before), str(error)[:200], user_id, delivery_id, device_id))
            return c.rowcount == 1

    def delete_incoming(self, user_id, ids):
        ids = list(dict.fromkeys(ids))
        deleted = 0
        with self._transaction(write=True) as c:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                among, params = self._among(chunk)
                c.execute(f"DELETE FROM incoming_chunks WHERE user_id = ? "
                          f"AND incoming_id {among}", (user_id, *params))
                c.execute(f"DELETE FROM incoming WHERE user_id = ? AND id {among}",
                          (user_id, *params))
                deleted += c.rowcount
        return deleted

    def incoming_count(self, user_id, now):
        now = int(now)
        with self._transaction() as c:
            row = c.one("SELECT count(*) FROM incoming WHERE user_id = ? AND not_before <= ? "
                        "AND lease_until <= ?", (user_id, now, now))
        return row[0]


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else error.__class__.__name__


def open_storage(home, database=None):
    """The storage for a provider home: ``database`` is ``None`` (SQLite in
    ``HOME/provider.db``), a ``postgresql://`` / ``postgres://`` URL, or
    ``sqlite:PATH``.  The schema is created or checked before this returns."""
    import os

    if database is None or database == "":
        from leapmail.provider.sqlite import SQLiteStorage

        storage = SQLiteStorage(os.path.join(home, "provider.db"))
    elif database.startswith(("postgresql://", "postgres://")):
        from leapmail.provider.postgres import PostgresStorage

        storage = PostgresStorage(database)
    elif database.startswith("sqlite:"):
        from leapmail.provider.sqlite import SQLiteStorage

        path = database[len("sqlite:"):]
        if path.startswith("//"):
            path = path[2:]
        storage = SQLiteStorage(os.path.join(home, path))
    else:
        raise StorageError("--database must be a postgresql:// URL or sqlite:PATH")
    try:
        storage.create_schema()
        # The calling thread (the main one, perhaps about to fork into a daemon) keeps
        # no connection; the threads that serve open their own.
        storage.release()
    except BaseException:
        storage.close()
        raise
    return storage
