"""Chunked blobs: bounded memory, exact bytes, clean failures."""

import json
import os

import pytest
import pytest_twisted

from leapmail.store import CHUNK_SIZE, BlobExists, BlobMissing, Store

from conftest import run_helper


def test_50mb_blob_round_trips_in_bounded_memory(tmp_path, key):
    result = run_helper("blob_rss", tmp_path / "store.db", key.hex())
    report = json.loads(result.stdout)
    assert report["size"] == report["info_size"] == 50 * 1024 * 1024
    assert report["same_hash"] and report["stored_sha256_matches"]
    assert all(report["ranges"].values()), report["ranges"]
    assert report["growth_kib"] < 20 * 1024, report


@pytest_twisted.ensureDeferred
async def test_sizes_around_chunk_boundaries(store):
    for size in (0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE):
        data = os.urandom(size)
        # Fed in odd-sized pieces, so chunking does not depend on the caller's pieces.
        pieces = [data[i:i + 99_991] for i in range(0, len(data), 99_991)]
        info = await store.write_blob(pieces)
        assert info.size == size
        reader = await store.blob_reader(info.id)
        got = [chunk async for chunk in reader.chunks()]
        assert b"".join(got) == data
        assert all(len(c) == CHUNK_SIZE for c in got[:-1])
        assert await reader.read(0, size + 100) == data
        assert await reader.read(size, 10) == b""
        if size > 2:
            assert await reader.read(size - 2, 10) == data[-2:]


@pytest_twisted.ensureDeferred
async def test_named_blob_cannot_be_written_twice(store):
    await store.write_blob([b"one"], blob_id="blob-x")
    with pytest.raises(BlobExists):
        await store.write_blob([b"two"], blob_id="blob-x")
    reader = await store.blob_reader("blob-x")
    assert await reader.read(0, 10) == b"one"


@pytest_twisted.ensureDeferred
async def test_deleted_blob_is_gone_and_its_chunks_freed(store):
    info = await store.write_blob([os.urandom(CHUNK_SIZE * 2)])
    tomb = await store.delete_blob(info.id)
    assert tomb.deleted
    with pytest.raises(BlobMissing):
        await store.blob_reader(info.id)
    chunks = await store.read(lambda q: q.execute("SELECT count(*) FROM blob_chunks").fetchone()[0])
    assert chunks == 0


@pytest_twisted.ensureDeferred
async def test_failing_source_leaves_nothing_behind(store):
    def source():
        yield os.urandom(CHUNK_SIZE * 2 + 5)
        raise OSError("source vanished")

    with pytest.raises(OSError):
        await store.write_blob(source(), blob_id="blob-broken")
    counts = await store.read(lambda q: (
        q.execute("SELECT count(*) FROM blob_chunks").fetchone()[0],
        q.execute("SELECT count(*) FROM pending_blobs").fetchone()[0],
        q.get("blob-broken"),
    ))
    assert counts == (0, 0, None)


@pytest_twisted.ensureDeferred
async def test_unfinished_blob_is_swept_on_next_open(db_path, key):
    store = Store.open(db_path, key, create=True)
    writer = store.blob_writer("blob-half")
    await writer.write(os.urandom(CHUNK_SIZE * 3))  # three chunks committed, never finished
    await store.close()
    store = Store.open(db_path, key)
    try:
        counts = await store.read(lambda q: (
            q.execute("SELECT count(*) FROM blob_chunks").fetchone()[0],
            q.execute("SELECT count(*) FROM pending_blobs").fetchone()[0],
        ))
        assert counts == (0, 0)
        with pytest.raises(BlobMissing):
            await store.blob_reader("blob-half")
    finally:
        await store.close()
