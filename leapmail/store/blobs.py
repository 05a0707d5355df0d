"""Chunked blobs: large byte strings written and read one chunk at a time.

A blob is a run of ``blob_chunks`` rows plus a document of kind ``blob`` (written last)
recording its size, chunk size and SHA-256.  Chunks are written in their own small
transactions, so a 50 MB attachment never sits in memory and never holds the writer for
long; until the blob document commits the blob does not exist, and an interrupted
write is swept away on the next open.
"""

import hashlib
import os
from dataclasses import dataclass

from twisted.internet import defer

from leapmail.store.documents import BLOB_KIND
from leapmail.store.errors import BlobExists, BlobMissing, StoreCorrupted

#: 256 KiB: large enough that per-row overhead vanishes, small enough to hold freely.
CHUNK_SIZE = 256 * 1024


@dataclass(frozen=True)
class BlobInfo:
    id: str
    size: int
    chunk_size: int
    sha256: str

    @property
    def chunks(self):
        return -(-self.size // self.chunk_size)


def new_blob_id():
    return "blob-" + os.urandom(16).hex()


def _write_chunk(txn, blob_id, seq, data):
    if seq == 0:
        busy = txn.execute(
            "SELECT 1 FROM pending_blobs WHERE blob_id = ?", (blob_id,)
        ).fetchone()
        if busy or txn.get(blob_id) is not None:
            raise BlobExists(txn.path, blob_id)
        txn.execute("INSERT INTO pending_blobs (blob_id) VALUES (?)", (blob_id,))
    txn.execute(
        "INSERT INTO blob_chunks (blob_id, seq, data) VALUES (?, ?, ?)", (blob_id, seq, data)
    )


def _finish(txn, blob_id, size, chunk_size, sha256):
    txn.execute("DELETE FROM pending_blobs WHERE blob_id = ?", (blob_id,))
    txn.put_json(blob_id, BLOB_KIND, {"size": size, "chunk_size": chunk_size, "sha256": sha256})
    return BlobInfo(blob_id, size, chunk_size, sha256)


def _abort(txn, blob_id):
    txn.execute("DELETE FROM blob_chunks WHERE blob_id = ?", (blob_id,))
    txn.execute("DELETE FROM pending_blobs WHERE blob_id = ?", (blob_id,))


def delete_blob(txn, blob_id):
    """Tombstone the blob document and drop its chunks (a job for ``Store.transact``)."""
    txn.execute("DELETE FROM blob_chunks WHERE blob_id = ?", (blob_id,))
    return txn.delete(blob_id)


def info(queries, blob_id):
    doc = queries.get(blob_id)
    if doc is None or doc.kind != BLOB_KIND:
        raise BlobMissing(queries.path, blob_id)
    meta = doc.json()
    return BlobInfo(blob_id, meta["size"], meta["chunk_size"], meta["sha256"])


def read_range(queries, blob_id, offset, length):
    """Bytes ``[offset, offset + length)`` of a blob, clipped to its size."""
    blob = info(queries, blob_id)
    end = min(blob.size, offset + length)
    if offset >= end:
        return b""
    first, last = offset // blob.chunk_size, (end - 1) // blob.chunk_size
    parts = []
    for seq, data in queries.execute(
        "SELECT seq, data FROM blob_chunks WHERE blob_id = ? AND seq BETWEEN ? AND ? "
        "ORDER BY seq",
        (blob_id, first, last),
    ):
        base = seq * blob.chunk_size
        parts.append(bytes(data[max(offset - base, 0):end - base]))
    data = b"".join(parts)
    if len(data) != end - offset:
        raise StoreCorrupted(queries.path, f"blob {blob_id} is missing chunks")
    return data


class BlobWriter:
    """Streams bytes into a new blob from the reactor thread.

    ``write()`` returns a Deferred that fires once every full chunk buffered so far
    has committed; callers that wait for it keep memory bounded to about two chunks.
    """

    def __init__(self, store, blob_id=None, chunk_size=CHUNK_SIZE):
        self._store = store
        self.id = blob_id or new_blob_id()
        self._chunk_size = chunk_size
        self._buffer = bytearray()
        self._seq = 0
        self._size = 0
        self._hash = hashlib.sha256()
        self._pending = defer.succeed(None)
        self._closed = False
        self._failure = None
        self._owned = False

    def write(self, data):
        if self._closed:
            raise ValueError("blob writer is closed")
        self._buffer += data
        self._size += len(data)
        self._hash.update(data)
        while len(self._buffer) >= self._chunk_size:
            chunk = bytes(self._buffer[: self._chunk_size])
            del self._buffer[: self._chunk_size]
            self._submit(chunk)
        return self._wait()

    def _submit(self, chunk):
        self._pending = self._store.transact(_write_chunk, self.id, self._seq, chunk)
        if self._seq == 0:
            self._pending.addCallback(self._claimed)
        self._pending.addErrback(self._record_failure)
        self._seq += 1

    def _claimed(self, _):
        # Chunk 0 registered the blob as ours: only now may abort() delete chunks,
        # never those of an existing blob that happens to have the same id.
        self._owned = True

    def _record_failure(self, failure):
        if self._failure is None:
            self._failure = failure

    def _wait(self):
        # Jobs commit and report in order on the single writer: the newest chunk's
        # Deferred fires after every earlier one.
        d = defer.Deferred()

        def settled(_):
            if self._failure is not None:
                d.errback(self._failure)
            else:
                d.callback(None)

        self._pending.addBoth(settled)
        return d

    @defer.inlineCallbacks
    def finish(self):
        """Flush and publish the blob; fires with its :class:`BlobInfo`."""
        self._closed = True
        if self._buffer or self._seq == 0:
            self._submit(bytes(self._buffer))
            self._buffer = bytearray()
        try:
            yield self._wait()
        except Exception:
            yield self.abort()
            raise
        result = yield self._store.transact(
            _finish, self.id, self._size, self._chunk_size, self._hash.hexdigest()
        )
        return result

    @defer.inlineCallbacks
    def abort(self):
        """Drop whatever this writer committed; the blob never appears."""
        self._closed = True
        self._buffer = bytearray()
        try:
            yield self._wait()
        except Exception:
            pass
        if self._owned:
            yield self._store.transact(_abort, self.id)


class BlobReader:
    """Reads a blob chunk by chunk (or by byte range) on the store's reader threads."""

    def __init__(self, store, blob_info):
        self._store = store
        self.info = blob_info

    def read(self, offset, length):
        return self._store.read(read_range, self.info.id, offset, length)

    async def chunks(self):
        """Async iterator over the blob's bytes, one chunk at a time."""
        size = self.info.chunk_size
        for seq in range(self.info.chunks):
            yield await self.read(seq * size, size)
