"""A read cache beside the database: encrypted records in one append-only file.

Reading a message body out of SQLCipher decrypts and authenticates every 4 KiB page
the b-tree walk touches, one ``pread`` a page: measured on the benchmark mail, 300
bodies cost 5.4 ms of page crypto and SQL where the bytes themselves are 2.2 MB, and
a cold read, page by page, waits on the disk some 700 times.  A record here is one
``pread`` and one AES-256-GCM call, at an offset the tables know, so the OS can be
asked for a whole batch at once (``posix_fadvise(WILLNEED)``): 300 bodies in 2.4 ms
warm, 5.8 ms cold (``bench/bench_body_fetch.py``).

Nothing here is the truth.  Every record is a copy of document data, bound by its
associated data to the name the caller gives (a document id), so a record that was
never written, was cut short by a crash, belongs to an older file or to another name
reads as ``None``, and the caller reads the documents instead.  That is also why
appends are not fsynced.  The file shows only its own size: records have no framing,
offsets and lengths live in the (encrypted) database.

Layout: ``MAGIC`` (8 bytes), a random file id (16), then records, each
``nonce (12) | ciphertext | tag (16)``.  Appends happen on the store's writer thread
only; reads from any thread.
"""

import errno
import os
import secrets
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"LMcache1"
HEADER_SIZE = len(MAGIC) + 16
NONCE_SIZE = 12
#: What a record adds to the bytes it holds.
OVERHEAD = NONCE_SIZE + 16


def cache_path(store_path):
    """Where the cache of the store at ``store_path`` lives: ``store.db`` -> ``store.cache``."""
    return os.path.splitext(store_path)[0] + ".cache"


class CacheFile:
    """An open cache file.  ``key``: 32 bytes, for this file's records only."""

    def __init__(self, path, key):
        self.path = path
        self._aead = AESGCM(key)
        self._retired = []
        self._fd = None
        self._lock = threading.Lock()

    def _ensure(self):
        # Opened (and made) at the first use, not with the store: a store that only
        # looks, or is refused, leaves no file behind.
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._open()
        return self._fd

    @property
    def id(self):
        self._ensure()
        return self._id

    def _open(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            header = os.pread(fd, HEADER_SIZE, 0)
            if len(header) != HEADER_SIZE or not header.startswith(MAGIC):
                # New, or not ours any more (cut short, overwritten): start afresh.
                os.ftruncate(fd, 0)
                header = MAGIC + secrets.token_bytes(16)
                _write_all(fd, header, 0)
            self._id = header[len(MAGIC):].hex()
            self._end = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    @property
    def size(self):
        self._ensure()
        return self._end

    def append(self, data, name):
        """Store ``data`` under ``name`` (bytes); returns ``(position, length)`` of the
        record.  Writer thread only."""
        nonce = secrets.token_bytes(NONCE_SIZE)
        record = nonce + self._aead.encrypt(nonce, data, name)
        fd = self._ensure()
        position = self._end
        _write_all(fd, record, position)
        self._end = position + len(record)
        return position, len(record)

    def read(self, position, length, name):
        """The data of the record at ``position``, or None if it is not there intact
        under ``name``."""
        if length < OVERHEAD or position < HEADER_SIZE:
            return None
        try:
            record = os.pread(self._ensure(), length, position)
        except OSError:
            return None
        if len(record) != length:
            return None
        try:
            return self._aead.decrypt(record[:NONCE_SIZE], record[NONCE_SIZE:], name)
        except InvalidTag:
            return None

    def prefetch(self, spans):
        """Ask the OS to start reading ``(position, length)`` spans now, all at once:
        the disk serves them together instead of one wait per record."""
        fd = self._ensure()
        for position, length in spans:
            os.posix_fadvise(fd, position, length, os.POSIX_FADV_WILLNEED)

    def rewrite(self, spans):
        """A new file (with a new id) holding only the records at ``spans``, in that
        order; returns their new positions.  Writer thread only.

        Readers that still hold old positions read None from the new file (records
        are bound to their names, not places) and fall back to the documents.
        """
        self._ensure()
        fresh = self.path + ".new"
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            header = MAGIC + secrets.token_bytes(16)
            _write_all(fd, header, 0)
            end, positions = len(header), []
            for position, length in spans:
                record = os.pread(self._fd, length, position)
                positions.append(end)
                _write_all(fd, record, end)
                end += len(record)
            os.fsync(fd)
            os.replace(fresh, self.path)
        except BaseException:
            os.close(fd)
            _unlink(fresh)
            raise
        # A reader may be between reading self._fd and its pread: the old descriptor
        # stays open (and reads the old, unlinked file) until close().
        self._retired.append(self._fd)
        self._fd, self._end, self._id = fd, end, header[len(MAGIC):].hex()
        return positions

    def close(self):
        for fd in [self._fd, *self._retired]:
            if fd is None:
                continue
            try:
                os.close(fd)
            except OSError as e:
                if e.errno != errno.EBADF:
                    raise
        self._fd, self._retired = None, []


def _write_all(fd, data, position):
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, position)
        view = view[written:]
        position += written


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
