"""The store's read cache file: records that read back only intact and under their name."""

import os
import stat

import pytest

from leapmail.store.cachefile import HEADER_SIZE, MAGIC, OVERHEAD, CacheFile, cache_path


@pytest.fixture
def cache(tmp_path):
    c = CacheFile(str(tmp_path / "store.cache"), os.urandom(32))
    yield c
    c.close()


def test_the_cache_lives_beside_the_store():
    assert cache_path("/home/u/.leapmail/store.db") == "/home/u/.leapmail/store.cache"


def test_no_file_until_first_use(tmp_path):
    c = CacheFile(str(tmp_path / "store.cache"), os.urandom(32))
    assert os.listdir(tmp_path) == []
    assert c.size == HEADER_SIZE
    c.close()
    assert os.listdir(tmp_path) == ["store.cache"]


def test_records_read_back_under_their_name_only(tmp_path, cache):
    message = b"Subject: one\r\n\r\nbody one\r\n"
    first = cache.append(message, b"message a")
    second = cache.append(b"x" * 70_000, b"message b")
    assert first == (HEADER_SIZE, 26 + OVERHEAD) and len(message) == 26
    assert second == (HEADER_SIZE + 26 + OVERHEAD, 70_000 + OVERHEAD)
    assert cache.size == second[0] + second[1]
    assert cache.read(*first, b"message a") == message
    assert cache.read(*second, b"message b") == b"x" * 70_000
    # Another name, another place, a shifted span: nothing, never other bytes.
    assert cache.read(*first, b"message b") is None
    assert cache.read(second[0], first[1], b"message a") is None
    assert cache.read(first[0] + 1, first[1], b"message a") is None
    assert cache.read(first[0], first[1] - 1, b"message a") is None
    assert cache.read(cache.size, 100, b"message a") is None  # past the end
    assert cache.read(0, 40, b"message a") is None  # the header is no record
    mode = stat.S_IMODE(os.stat(cache.path).st_mode)
    assert mode == 0o600


def test_the_file_holds_no_plaintext_and_no_framing(cache):
    marker = b"MARKER-7f3a9c-plaintext"
    for i in range(20):
        cache.append(marker + b" %d" % i, b"message %d" % i)
    with open(cache.path, "rb") as f:
        data = f.read()
    assert marker not in data
    assert data[:len(MAGIC)] == MAGIC
    assert len(data) == HEADER_SIZE + sum(len(marker) + len(b" %d" % i) + OVERHEAD
                                          for i in range(20))


def test_a_damaged_record_reads_as_none(cache):
    span = cache.append(b"hello world", b"n")
    with open(cache.path, "r+b") as f:
        f.seek(span[0] + OVERHEAD)
        f.write(b"\xff")
    assert cache.read(*span, b"n") is None


def test_a_file_cut_short_or_overwritten_starts_afresh(tmp_path):
    key = os.urandom(32)
    path = str(tmp_path / "store.cache")
    c = CacheFile(path, key)
    span = c.append(b"data", b"n")
    first_id = c.id
    c.close()
    # Reopened intact: same id, same record.
    c = CacheFile(path, key)
    assert (c.id, c.read(*span, b"n")) == (first_id, b"data")
    c.close()
    with open(path, "r+b") as f:
        f.write(b"garbage!")
    c = CacheFile(path, key)
    assert c.id != first_id
    assert c.size == HEADER_SIZE
    assert c.read(*span, b"n") is None
    c.close()


def test_another_key_reads_nothing(tmp_path):
    path = str(tmp_path / "store.cache")
    c = CacheFile(path, os.urandom(32))
    span = c.append(b"secret", b"n")
    c.close()
    other = CacheFile(path, os.urandom(32))
    assert other.read(*span, b"n") is None
    other.close()


def test_rewrite_keeps_the_given_records_only(cache):
    spans = [cache.append(b"record %d" % i * 50, b"n%d" % i) for i in range(10)]
    old_id, old_size = cache.id, cache.size
    kept = [1, 4, 9]
    positions = cache.rewrite([spans[i] for i in kept])
    assert cache.id != old_id
    assert cache.size < old_size
    assert positions[0] == HEADER_SIZE
    for i, position in zip(kept, positions):
        assert cache.read(position, spans[i][1], b"n%d" % i) == b"record %d" % i * 50
    # Positions of the old file mean nothing in the new one.
    assert cache.read(*spans[0], b"n0") is None
    assert sorted(os.listdir(os.path.dirname(cache.path))) == ["store.cache"]
    assert os.path.getsize(cache.path) == cache.size


def test_prefetch_takes_spans_in_any_order(cache):
    spans = [cache.append(os.urandom(5000), b"n%d" % i) for i in range(5)]
    cache.prefetch(reversed(spans))
    assert cache.read(*spans[2], b"n2") is not None
