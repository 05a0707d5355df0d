"""Opening a SQLCipher store file: create, lock, validate, migrate — and connections to it.

Everything here is blocking; :mod:`leapmail.store.store` runs it off the reactor.

Choices that matter for safety:

- The database is keyed with the raw 256-bit storage key (``PRAGMA key = "x'…'"``), not
  a passphrase, so SQLCipher skips its own PBKDF2 and every connection opens at once.
  The first 16 bytes of the file are SQLCipher's random salt and every page is encrypted
  and authenticated, so the file carries no SQLite header and reads as random bytes.
- ``journal_mode=WAL`` (set when the file is created; it is persistent) lets readers on
  their own connections run beside the single writer.
- ``synchronous=FULL``: in WAL mode ``NORMAL`` survives a crash of the process but may
  lose the last commits on power loss, because the WAL is not fsynced at each commit.  We
  acknowledge a write only when it is durable, so we pay one fsync per commit and win
  the throughput back with group commit (the writer commits many queued jobs at once).
- A separate lock file (``flock``) keeps a second daemon out.  The kernel releases it when
  the process dies, even by ``kill -9``, so a stale lock never needs manual cleanup.
"""

import errno
import fcntl
import os
import urllib.parse

import sqlcipher3

from leapmail.store.errors import (
    NotAStore,
    StoreCorrupted,
    StoreError,
    StoreIOError,
    StoreLocked,
    StoreMissing,
    StoreTooNew,
    StoreUnreadable,
)
from leapmail.fsutil import fsync_dir

#: ``PRAGMA application_id`` of our files: "LMai".
APPLICATION_ID = 0x4C4D6169
PAGE_SIZE = 4096
SQLITE_MAGIC = b"SQLite format 3\x00"
#: SQLCipher settings of our file format, pinned so that a change of the library's
#: defaults can never make existing stores unreadable.  AES-256-CBC per 4 KiB page with
#: a random IV, authenticated by HMAC-SHA256: as strong as the default HMAC-SHA512 at
#: 256-bit keys, and 1.5x faster to read on CPUs with SHA extensions (bench/).
CIPHER_SETTINGS = (
    f"PRAGMA cipher_page_size = {PAGE_SIZE}",
    "PRAGMA cipher_hmac_algorithm = HMAC_SHA256",
    "PRAGMA cipher_kdf_algorithm = PBKDF2_HMAC_SHA512",
    "PRAGMA cipher_plaintext_header_size = 0",
)
WRITER_CACHE_KIB = 2000
READER_CACHE_KIB = 6000
_WAL_HEADER = 32
_WAL_FRAME_HEADER = 24


def classify(path, exc):
    """Turn a driver exception into a :class:`StoreError` a user can act on."""
    if isinstance(exc, StoreError):
        return exc
    message = str(exc)
    lowered = message.lower()
    if "file is not a database" in lowered:
        return StoreUnreadable(path)
    if "malformed" in lowered or "corrupt" in lowered:
        return StoreCorrupted(path, message)
    if "disk" in lowered or "full" in lowered or "readonly" in lowered or "i/o" in lowered:
        return StoreIOError(path, message)
    return None


def connect(path, key, *, driver=sqlcipher3, readonly=False):
    """A configured connection to an existing store file.  The key is not checked here.

    ``readonly`` opens the file read-only (``mode=ro``), not merely ``query_only``:
    such a connection never checkpoints the WAL into the file when it closes, so
    looking at a file we end up refusing cannot change it.
    """
    if readonly:
        target, uri = "file:" + urllib.parse.quote(path) + "?mode=ro", True
    else:
        target, uri = path, False
    conn = driver.connect(
        target, isolation_level=None, check_same_thread=False, timeout=60, uri=uri
    )
    try:
        if driver is sqlcipher3:
            # A wrong key is reported by us, with the file's name; SQLCipher's own log
            # lines on stderr would only alarm.
            conn.execute("PRAGMA cipher_log_level = NONE")
            conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
            for pragma in CIPHER_SETTINGS:
                conn.execute(pragma)
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA temp_store = MEMORY")
        # Page cache: decrypted pages are what SQLCipher saves work on, so readers get
        # more (index pages of a 100k-document store stay hot) than the writer, whose
        # cache mostly holds pages it just wrote.  Bounded, because every connection
        # keeps its own and big blobs stream through them.
        conn.execute(f"PRAGMA cache_size = -{READER_CACHE_KIB if readonly else WRITER_CACHE_KIB}")
        conn.execute("PRAGMA foreign_keys = ON")
    except Exception:
        conn.close()
        raise
    return conn


class _LockFile:
    """An exclusive ``flock`` on ``<db>.lock``; the file names the holder's pid."""

    def __init__(self, path):
        self.path = path
        self.fd = None

    def acquire(self, db_path):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _recorded_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreLocked(db_path, None if holder is None else str(holder)) from None
            raise
        self.fd = fd
        self.record_pid()

    def record_pid(self):
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def release(self):
        if self.fd is not None:
            # The file stays: unlinking a lock file races with the next opener.
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def _recorded_pid(fd):
    """The pid a lock file names, or ``None`` (empty, or being rewritten)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def lock_holder(db_path):
    """The pid of the process holding the store open, or ``None`` if none does."""
    try:
        fd = os.open(db_path + ".lock", os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            holder = _recorded_pid(fd)
            return 0 if holder is None else holder
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class Database:
    """An open, validated, locked and migrated store file.

    ``components`` are :class:`~leapmail.store.schema.SchemaComponent` objects, each with
    its own versioned migrations (the store core, then the mail core, ...).
    """

    def __init__(self, path, key, components, driver, lock):
        self.path = path
        self._key = key
        self.components = components
        self.driver = driver
        self._lock = lock

    def __repr__(self):
        return f"<Database {self.path}>"

    @classmethod
    def open(cls, path, key, components=(), *, create=False, upgrade=True, driver=sqlcipher3):
        """Open a store file, refusing anything that is not a sound store of this key.

        Validation only reads (through a read-only connection); nothing is written
        before the file has passed.  ``upgrade=False`` also skips migrations and the
        sweep of unfinished blobs, for tools that must look without touching.
        """
        from leapmail.store.schema import CORE

        path = os.path.abspath(path)
        components = (CORE, *[c for c in components if c is not CORE])
        if not os.path.exists(path) and not create:
            raise StoreMissing(path)
        lock = _LockFile(path + ".lock")
        lock.acquire(path)
        try:
            if not os.path.exists(path):
                _create(path, key, driver)
            else:
                _precheck(path)
            db = cls(path, key, components, driver, lock)
            db._validate()
            if upgrade:
                db._upgrade()
        except BaseException:
            lock.release()
            raise
        return db

    def run(self, fn, *args):
        """Run one write job ``fn(txn, *args)`` here and now, blocking (for tools that
        run without a reactor, before or instead of a :class:`Store`)."""
        from leapmail.store.documents import Committer

        conn = self.connect()
        try:
            committer = Committer(conn, self.path, self.indexers(), lambda e: (
                classify(self.path, e) if isinstance(e, self.driver.Error) else None))
            ((ok, value),) = committer.run_batch([(fn, args)])
        finally:
            conn.close()
        if not ok:
            raise value
        return value

    def indexers(self):
        """``{kind: [indexer, ...]}`` of every component."""
        result = {}
        for component in self.components:
            for kind, indexer in component.indexers.items():
                result.setdefault(kind, []).append(indexer)
        return result

    def claim(self):
        """Record this process as the lock holder (after a daemon forked away from us)."""
        self._lock.record_pid()

    def connect(self, readonly=False):
        try:
            conn = connect(self.path, self._key, driver=self.driver, readonly=readonly)
        except self.driver.Error as e:
            raise classify(self.path, e) or e
        for component in self.components:
            for name, (arity, function) in component.functions.items():
                conn.create_function(name, arity, function, deterministic=True)
        return conn

    def open_cache(self):
        """The read cache beside this file (:mod:`leapmail.store.cachefile`), under a
        key of its own derived from the store key."""
        from leapmail.crypto.kdf import subkey
        from leapmail.store.cachefile import CacheFile, cache_path

        return CacheFile(cache_path(self.path), subkey(self._key, b"leapmail store cache v1"))

    def close(self):
        self._lock.release()

    def verify(self):
        """Check every page: authentication (HMAC) and B-tree structure.  O(file size).

        Returns a list of problems, empty when the file is sound.
        """
        conn = self._inspecting_connection()
        problems = []
        try:
            if self.driver is sqlcipher3:
                problems += [row[0] for row in conn.execute("PRAGMA cipher_integrity_check")]
            problems += [
                row[0] for row in conn.execute("PRAGMA quick_check") if row[0] != "ok"
            ]
        except self.driver.DatabaseError as e:
            problems.append(str(e))
        finally:
            conn.close()
        return problems

    def _inspecting_connection(self):
        """A connection for looking at a file not yet known to be sound.

        If a WAL is present (the last writer crashed), closing a writable connection
        would checkpoint it into the file, so we read through a read-only one.  With no
        WAL a writable connection changes nothing, and tidies away the WAL and shm
        files that SQLite creates on open — which a read-only one would leave behind.
        """
        return self.connect(readonly=os.path.exists(self.path + "-wal"))

    def _validate(self):
        from leapmail.store.schema import check_versions

        conn = self._inspecting_connection()
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            page_count = conn.execute("PRAGMA page_count").fetchone()[0]
            if app_id != APPLICATION_ID:
                raise NotAStore(self.path, "it is a database of another application")
            if mode != "wal":
                raise NotAStore(self.path, f"journal mode is {mode!r}, ours is 'wal'")
            _check_length(self.path, page_count)
            check_versions(self, conn)
        except self.driver.DatabaseError as e:
            raise classify(self.path, e) or StoreUnreadable(self.path) from None
        finally:
            conn.close()

    def _upgrade(self):
        from leapmail.store.schema import upgrade

        conn = self.connect()
        try:
            upgrade(self, conn)
        except self.driver.Error as e:
            raise classify(self.path, e) or e
        finally:
            conn.close()


def _precheck(path):
    """Cheap checks on the raw file before the driver touches it."""
    if not os.path.isfile(path):
        raise NotAStore(path, "it is not a regular file")
    size = os.path.getsize(path)
    if size == 0:
        raise NotAStore(path, "the file is empty")
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if head == SQLITE_MAGIC:
        raise NotAStore(path, "it is an unencrypted SQLite database")
    if size % PAGE_SIZE:
        raise StoreCorrupted(
            path,
            f"its size, {size} bytes, is not a whole number of {PAGE_SIZE}-byte pages: it "
            "was truncated, or is not a leapmail store",
        )


def _check_length(path, page_count):
    """Catch truncation on a page boundary: pages the header counts must exist somewhere.

    Pages written since the last checkpoint may live only in the WAL, so the file may
    legitimately be shorter than ``page_count`` by at most the WAL's frame count.
    """
    file_pages = os.path.getsize(path) // PAGE_SIZE
    try:
        wal_size = os.path.getsize(path + "-wal")
    except FileNotFoundError:
        wal_size = 0
    wal_frames = max(0, wal_size - _WAL_HEADER) // (PAGE_SIZE + _WAL_FRAME_HEADER)
    if page_count > file_pages + wal_frames:
        raise StoreCorrupted(
            path, f"truncated: {file_pages} pages on disk, {page_count} expected"
        )


def _create(path, key, driver):
    """Create a new store so that a crash leaves either nothing or a complete file."""
    from leapmail.store.schema import CORE

    tmp = path + ".creating"
    for leftover in (tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal"):
        # Only ever written under the lock we hold, by a creation that did not finish.
        try:
            os.unlink(leftover)
        except FileNotFoundError:
            pass
    # Created 0600 before SQLite opens it; SQLite gives the WAL the same mode.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    conn = connect(tmp, key, driver=driver)
    try:
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise StoreIOError(path, "the file system does not support WAL mode")
        conn.execute("BEGIN IMMEDIATE")
        CORE.bootstrap(conn)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))


def known_versions(components):
    return {c.name: len(c.migrations) for c in components}


def check_not_newer(path, stored, components):
    known = known_versions(components)
    for name, version in stored.items():
        if name in known and version > known[name]:
            raise StoreTooNew(path, name, version, known[name])
