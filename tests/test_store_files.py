"""The store file on disk: encrypted, and never damaged further by a bad open."""

import collections
import hashlib
import os
import sqlite3
import subprocess
import sys
import zlib

import pytest
import pytest_twisted
import sqlcipher3

from leapmail.store import (
    Database,
    NotAStore,
    Store,
    StoreCorrupted,
    StoreLocked,
    StoreMissing,
    StoreTooNew,
    StoreUnreadable,
)
from leapmail.store.database import PAGE_SIZE, connect

from conftest import HERE

MARKER = b"MARKER-7f3a9c-leapmail-plaintext"


def snapshot(directory):
    """Name → SHA-256 of every file in a directory, except our lock file."""
    result = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".lock"):
            continue
        if os.path.isdir(os.path.join(directory, name)):
            result[name] = "directory"
            continue
        with open(os.path.join(directory, name), "rb") as f:
            result[name] = hashlib.sha256(f.read()).hexdigest()
    return result


def chi_square(data):
    counts = collections.Counter(data)
    expected = len(data) / 256
    return sum((counts.get(b, 0) - expected) ** 2 / expected for b in range(256))


async def fill(store, n=300):
    docs = [(f"{MARKER.decode()}-{i}", "note", MARKER * 20 + os.urandom(64)) for i in range(n)]
    await store.put_many(docs)
    await store.write_blob([MARKER * 5000])


@pytest_twisted.ensureDeferred
async def test_marker_appears_nowhere_on_disk(tmp_path, db_path, key):
    s = Store.open(db_path, key, create=True)
    await fill(s)
    # While open, recent pages live in the WAL: check it too, and every other file.
    files = sorted(os.listdir(tmp_path))
    assert "store.db-wal" in files
    assert os.path.getsize(db_path + "-wal") > 0
    for name in files:
        with open(tmp_path / name, "rb") as f:
            assert MARKER not in f.read(), name
    await s.close()
    for name in os.listdir(tmp_path):
        with open(tmp_path / name, "rb") as f:
            data = f.read()
        assert MARKER not in data, name
        assert MARKER[:8] not in data, name

    with open(db_path, "rb") as f:
        data = f.read()
    assert not data.startswith(b"SQLite format 3")
    assert len(data) > 200_000
    # Indistinguishable from random: flat byte histogram, incompressible.
    # chi-square with 255 degrees of freedom: mean 255, sd 22.6; 400 is > 6 sd out.
    assert chi_square(data) < 400
    assert len(zlib.compress(data, 9)) > 0.99 * len(data)

    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(db_path).execute("SELECT * FROM sqlite_master").fetchall()


def test_files_are_private(tmp_path, db_path, key):
    Database.open(db_path, key, create=True).close()
    for name in os.listdir(tmp_path):
        assert os.stat(tmp_path / name).st_mode & 0o077 == 0, name


def test_missing_file_is_not_created_without_asking(db_path, key):
    with pytest.raises(StoreMissing) as err:
        Database.open(db_path, key)
    assert db_path in str(err.value)
    assert not os.path.exists(db_path)


def _make_store(db_path, key, docs=0):
    db = Database.open(db_path, key, create=True)
    if docs:
        conn = db.connect()
        conn.execute("BEGIN")
        for i in range(docs):
            conn.execute(
                "INSERT INTO documents (id, kind, rev, gen, content) VALUES (?, 'n', 1, ?, ?)",
                (f"d{i}", i + 1, os.urandom(200)),
            )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
    db.close()


def _assert_refused(tmp_path, db_path, key, error, *, words):
    before = snapshot(tmp_path)
    with pytest.raises(error) as err:
        Database.open(db_path, key)
    message = str(err.value)
    assert db_path in message
    for word in words:
        assert word in message
    assert snapshot(tmp_path) == before
    return message


def test_wrong_key_is_refused_and_file_untouched(tmp_path, db_path, key):
    _make_store(db_path, key, docs=10)
    _assert_refused(tmp_path, db_path, os.urandom(32), StoreUnreadable, words=["cannot be decrypted"])
    # And the right key still opens it.
    Database.open(db_path, key).close()


@pytest.mark.parametrize(
    "content, error, words",
    [
        (b"", NotAStore, ["empty"]),
        (b"hello, this is a text file\n", StoreCorrupted, ["not a whole number", "not a leapmail store"]),
        (os.urandom(3 * PAGE_SIZE), StoreUnreadable, ["cannot be decrypted"]),
    ],
    ids=["empty", "text", "random"],
)
def test_foreign_files_are_refused(tmp_path, db_path, key, content, error, words):
    with open(db_path, "wb") as f:
        f.write(content)
    _assert_refused(tmp_path, db_path, key, error, words=words)


def test_plain_sqlite_database_is_refused(tmp_path, db_path, key):
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    _assert_refused(tmp_path, db_path, key, NotAStore, words=["unencrypted SQLite"])


def test_sqlcipher_database_of_another_application_is_refused(tmp_path, db_path, key):
    # Same key and cipher settings as ours, but not made by us.
    conn = connect(db_path, key)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    _assert_refused(tmp_path, db_path, key, NotAStore, words=["another application"])


def test_sqlcipher_database_with_default_settings_is_refused(tmp_path, db_path, key):
    conn = sqlcipher3.connect(db_path)
    conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    _assert_refused(tmp_path, db_path, key, StoreUnreadable, words=["cannot be decrypted"])


def test_directory_is_refused(tmp_path, db_path, key):
    os.mkdir(db_path)
    _assert_refused(tmp_path, db_path, key, NotAStore, words=["not a regular file"])


def test_truncated_mid_page_is_refused(tmp_path, db_path, key):
    _make_store(db_path, key, docs=500)
    size = os.path.getsize(db_path)
    os.truncate(db_path, size // 2 + 123)
    _assert_refused(tmp_path, db_path, key, StoreCorrupted, words=["truncated"])


def test_truncated_on_a_page_boundary_is_refused(tmp_path, db_path, key):
    _make_store(db_path, key, docs=500)
    pages = os.path.getsize(db_path) // PAGE_SIZE
    assert pages > 20
    os.truncate(db_path, (pages // 2) * PAGE_SIZE)
    _assert_refused(tmp_path, db_path, key, StoreCorrupted, words=["truncated"])


def test_damaged_first_page_is_refused(tmp_path, db_path, key):
    _make_store(db_path, key, docs=50)
    with open(db_path, "r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 16)
    _assert_refused(tmp_path, db_path, key, StoreUnreadable, words=["cannot be decrypted"])


@pytest_twisted.ensureDeferred
async def test_damaged_inner_page_is_reported_not_raised_from_the_driver(tmp_path, db_path, key):
    _make_store(db_path, key, docs=2000)
    pages = os.path.getsize(db_path) // PAGE_SIZE
    with open(db_path, "r+b") as f:
        f.seek((pages // 2) * PAGE_SIZE + 1000)
        f.write(os.urandom(32))
    before = snapshot(tmp_path)
    db = Database.open(db_path, key)
    problems = db.verify()
    assert problems and any(f"{pages // 2 + 1}" in p for p in problems), problems
    s = Store(db)
    try:
        with pytest.raises(StoreCorrupted) as err:
            await s.read(lambda q: [q.get(f"d{i}") for i in range(2000)])
        assert db_path in str(err.value)
    finally:
        await s.close()
    assert snapshot(tmp_path) == before


def test_newer_schema_is_refused(tmp_path, db_path, key):
    _make_store(db_path, key)
    conn = connect(db_path, key)
    conn.execute("UPDATE meta SET value = 7 WHERE key = 'schema.store'")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    message = _assert_refused(tmp_path, db_path, key, StoreTooNew, words=["newer leapmail", "version 7", "Upgrade"])
    assert "knows up to 1" in message


def test_store_locked_by_another_process(tmp_path, db_path, key):
    holder = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "helpers", "hold_store.py"), db_path, key.hex()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"ready\n"
        before = snapshot(tmp_path)
        with pytest.raises(StoreLocked) as err:
            Database.open(db_path, key)
        assert f"pid {holder.pid}" in str(err.value)
        assert snapshot(tmp_path) == before
    finally:
        holder.stdin.close()
        assert holder.wait(30) == 0
    # Released when the holder exits: opens again.
    Database.open(db_path, key).close()


def test_lock_is_released_by_kill_9(db_path, key):
    holder = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "helpers", "hold_store.py"), db_path, key.hex()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    assert holder.stdout.readline() == b"ready\n"
    holder.kill()
    holder.wait(30)
    Database.open(db_path, key).close()


@pytest_twisted.ensureDeferred
async def test_open_and_close_without_writes_change_no_byte(tmp_path, db_path, key):
    _make_store(db_path, key, docs=100)
    before = snapshot(tmp_path)
    s = Store.open(db_path, key)
    assert (await s.get("d7")).rev == 1
    await s.close()
    assert snapshot(tmp_path) == before


def test_refused_file_with_a_crash_leftover_wal_is_not_checkpointed(tmp_path, db_path, key):
    """A newer schema written into a WAL by a writer that died: the WAL must survive."""
    _make_store(db_path, key, docs=50)
    script = (
        "import os, sys\n"
        "from leapmail.store.database import connect\n"
        "c = connect(sys.argv[1], bytes.fromhex(sys.argv[2]))\n"
        "c.execute(\"UPDATE meta SET value = 9 WHERE key = 'schema.store'\")\n"
        "c.execute(\"INSERT INTO documents (id, kind, rev, gen, content) VALUES ('w', 'n', 1, 999, x'00')\")\n"
        "os._exit(0)\n"  # dies without closing: the commit lives only in the WAL
    )
    subprocess.run([sys.executable, "-c", script, db_path, key.hex()], check=True)
    assert os.path.getsize(db_path + "-wal") > 0
    before = {n: h for n, h in snapshot(tmp_path).items() if not n.endswith("-shm")}
    for _ in range(2):
        with pytest.raises(StoreTooNew):
            Database.open(db_path, key)
    after = {n: h for n, h in snapshot(tmp_path).items() if not n.endswith("-shm")}
    assert after == before
