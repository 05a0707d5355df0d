"""The provider's storage interface, one suite run against SQLite and PostgreSQL."""

import hashlib
import os
import stat
import threading

import pytest

from leapmail.provider.storage import (
    CodeExpired, CodeUsed, Conflict, EnrollmentRefused, IProviderStorage, NoSuchAccount,
    UserExists, open_storage,
)

NOW = 1_800_000_000
WEEK = 7 * 86400
KDF = {"name": "scrypt", "version": 1, "n": 2, "r": 1, "p": 1, "salt": "c2FsdHNhbHRzYWx0c2FsdA=="}


def h(text):
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).digest()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    """``(home, database)`` for :func:`open_storage`, one fresh database per test."""
    if request.param == "sqlite":
        return str(tmp_path), None
    server = request.getfixturevalue("postgres_server")
    return str(tmp_path), server.create_database()


@pytest.fixture
def storage(backend):
    s = open_storage(*backend)
    yield s
    s.close()


def make_user(storage, address="alice@example.org", code="code-a"):
    storage.create_user(address, h(code), NOW + WEEK, NOW)
    return storage.claim(address, h(code), NOW, KDF, h(b"login key " + address.encode()),
                         b"bundle of " + address.encode(), "dev1", "laptop",
                         h("token of " + address), NOW + 3600)


def test_both_implement_the_interface(storage):
    assert IProviderStorage.providedBy(storage)


def test_reopening_keeps_the_data(backend):
    s = open_storage(*backend)
    try:
        uid = make_user(s)
        s.push(uid, [("a", 0, b"x")])
    finally:
        s.close()
    s = open_storage(*backend)
    try:
        assert s.head(uid) == 1
        assert [d.data for d in s.get_docs(uid, ["a"])] == [b"x"]
    finally:
        s.close()


def test_sqlite_file_is_private(tmp_path):
    s = open_storage(str(tmp_path))
    try:
        make_user(s)
    finally:
        s.close()
    for name in os.listdir(tmp_path):
        if name.startswith("provider.db"):
            assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name


# -- accounts and enrollment --------------------------------------------------------


def test_create_user_once(storage):
    storage.create_user("alice@example.org", h("c"), NOW + WEEK, NOW)
    with pytest.raises(UserExists) as err:
        storage.create_user("alice@example.org", h("other"), NOW + WEEK, NOW)
    assert str(err.value) == "the account alice@example.org exists already"
    account = storage.find_account("alice@example.org")
    assert account.address == "alice@example.org"
    assert not account.claimed
    assert account.login_kdf is None and account.verifier is None
    assert storage.find_account("bob@example.org") is None


def test_claim_stores_login_bundle_and_first_device(storage):
    storage.create_user("alice@example.org", h("code"), NOW + WEEK, NOW)
    uid = storage.claim("alice@example.org", h("code"), NOW + 5, KDF, h("key"), b"\0bundle\xff",
                        "d1", "laptop", h("tok"), NOW + 100)
    account = storage.find_account("alice@example.org")
    assert (account.user_id, account.login_kdf, account.verifier) == (uid, KDF, h("key"))
    assert account.claimed
    assert storage.get_bundle(uid) == b"\0bundle\xff"
    device = storage.device_by_token_hash(h("tok"))
    assert (device.user_id, device.device_id, device.name, device.expires) == (
        uid, "d1", "laptop", NOW + 100)
    assert storage.head(uid) == 0


def test_claim_refuses_wrong_code_unknown_address_reuse_and_expiry(storage):
    storage.create_user("alice@example.org", h("code"), NOW + WEEK, NOW)
    args = (KDF, h("key"), b"b", "d1", "laptop", h("tok"), NOW + 100)
    with pytest.raises(EnrollmentRefused):
        storage.claim("alice@example.org", h("wrong"), NOW, *args)
    with pytest.raises(EnrollmentRefused):
        storage.claim("nobody@example.org", h("code"), NOW, *args)
    # Expired: refused, and the account stays unclaimed.
    with pytest.raises(CodeExpired):
        storage.claim("alice@example.org", h("code"), NOW + WEEK, *args)
    assert not storage.find_account("alice@example.org").claimed
    assert storage.device_by_token_hash(h("tok")) is None
    storage.claim("alice@example.org", h("code"), NOW + WEEK - 1, *args)
    with pytest.raises(CodeUsed):
        storage.claim("alice@example.org", h("code"), NOW, KDF, h("key2"), b"b2", "d2", "x",
                      h("tok2"), NOW + 100)
    # A wrong code on a claimed account learns nothing more than on any other.
    with pytest.raises(EnrollmentRefused):
        storage.claim("alice@example.org", h("wrong"), NOW, KDF, h("key2"), b"b2", "d2", "x",
                      h("tok2"), NOW + 100)
    account = storage.find_account("alice@example.org")
    assert account.verifier == h("key")
    assert storage.device_by_token_hash(h("tok2")) is None


def test_concurrent_claims_one_wins(backend):
    stores = [open_storage(*backend) for _ in range(6)]
    try:
        stores[0].create_user("alice@example.org", h("code"), NOW + WEEK, NOW)
        barrier = threading.Barrier(len(stores))
        outcomes = [None] * len(stores)

        def claim(i):
            barrier.wait()
            try:
                stores[i].claim("alice@example.org", h("code"), NOW, KDF, h(f"key{i}"), b"b",
                                f"d{i}", "x", h(f"tok{i}"), NOW + 100)
                outcomes[i] = "ok"
            except CodeUsed:
                outcomes[i] = "used"

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(outcomes) == ["ok"] + ["used"] * (len(stores) - 1)
        winner = outcomes.index("ok")
        assert stores[0].find_account("alice@example.org").verifier == h(f"key{winner}")
        assert [stores[0].device_by_token_hash(h(f"tok{i}")) is not None
                for i in range(len(stores))] == [i == winner for i in range(len(stores))]
    finally:
        for s in stores:
            s.close()


def test_devices_and_tokens(storage):
    uid = make_user(storage)
    storage.add_device(uid, "dev2", "phone", h("second token"), NOW + 50, NOW)
    d = storage.device_by_token_hash(h("second token"))
    assert (d.user_id, d.device_id, d.name, d.expires) == (uid, "dev2", "phone", NOW + 50)
    assert storage.device_by_token_hash(h("token of alice@example.org")).device_id == "dev1"
    assert storage.device_by_token_hash(h("no such token")) is None
    assert storage.device_by_token_hash(bytes(32)) is None
    with pytest.raises(NoSuchAccount):
        storage.add_device(uid + 1000, "dev3", "x", h("t3"), NOW + 50, NOW)
    # An unclaimed account has no devices to add to.
    storage.create_user("carol@example.org", h("c"), NOW + WEEK, NOW)
    carol = storage.find_account("carol@example.org").user_id
    with pytest.raises(NoSuchAccount):
        storage.add_device(carol, "dev3", "x", h("t3"), NOW + 50, NOW)


# -- documents ----------------------------------------------------------------------


def test_push_creates_and_updates(storage):
    uid = make_user(storage)
    assert storage.push(uid, [("a", 0, b"A1"), ("b", 0, b"B1")]) == (2, [1, 1])
    assert storage.push(uid, [("a", 1, b"A2")]) == (3, [2])
    assert storage.push(uid, []) == (3, [])
    docs = storage.get_docs(uid, ["b", "a", "missing"])
    assert [(d.id, d.rev, d.seq, d.data) for d in docs] == [("b", 1, 2, b"B1"), ("a", 2, 3, b"A2")]
    assert storage.head(uid) == 3
    assert storage.doc_sizes(uid, ["a", "b", "zz"]) == {"a": 2, "b": 2}


def test_a_conflict_writes_nothing(storage):
    uid = make_user(storage)
    storage.push(uid, [("a", 0, b"A1"), ("b", 0, b"B1")])
    storage.push(uid, [("b", 1, b"B2")])
    with pytest.raises(Conflict) as err:
        storage.push(uid, [("new", 0, b"N"), ("b", 1, b"B3"), ("a", 1, b"A2"), ("a2", 4, b"x")])
    assert err.value.conflicts == [("b", 2), ("a2", 0)]
    # Nothing written: not the good documents, not the sequence number.
    assert storage.head(uid) == 3
    assert storage.get_docs(uid, ["new"]) == []
    assert [(d.id, d.rev, d.data) for d in storage.get_docs(uid, ["a", "b"])] == [
        ("a", 1, b"A1"), ("b", 2, b"B2")]
    with pytest.raises(Conflict) as err:
        storage.push(uid, [("a", 0, b"exists already")])
    assert err.value.conflicts == [("a", 1)]
    # The next push gets the next number: the conflicting ones used none.
    assert storage.push(uid, [("new", 0, b"N")]) == (4, [1])
    with pytest.raises(ValueError):
        storage.push(uid, [("x", 0, b"1"), ("x", 0, b"2")])


def test_push_to_unknown_account(storage):
    with pytest.raises(NoSuchAccount):
        storage.push(12345, [("a", 0, b"x")])


def test_changes_in_seq_order_latest_revision_only(storage):
    uid = make_user(storage)
    storage.push(uid, [("a", 0, b"A1"), ("b", 0, b"B1"), ("c", 0, b"C1")])
    storage.push(uid, [("a", 1, b"A2")])
    ch = storage.changes(uid, 0, 1000, 8 << 20)
    assert [(d.id, d.rev, d.seq, d.data) for d in ch.docs] == [
        ("b", 1, 2, b"B1"), ("c", 1, 3, b"C1"), ("a", 2, 4, b"A2")]
    assert (ch.seq, ch.more) == (4, False)
    ch = storage.changes(uid, 3, 1000, 8 << 20)
    assert [d.id for d in ch.docs] == ["a"]
    # Nothing new: the account's current number, whatever was asked.
    for since in (4, 99):
        assert storage.changes(uid, since, 1000, 8 << 20) == type(ch)([], 4, False)


def test_changes_limits(storage):
    uid = make_user(storage)
    storage.push(uid, [(f"d{i}", 0, bytes(100)) for i in range(5)])
    ch = storage.changes(uid, 0, 2, 1 << 20)
    assert ([d.id for d in ch.docs], ch.seq, ch.more) == (["d0", "d1"], 2, True)
    ch = storage.changes(uid, 2, 3, 1 << 20)
    assert ([d.id for d in ch.docs], ch.seq, ch.more) == (["d2", "d3", "d4"], 5, False)
    ch = storage.changes(uid, 0, 1000, 250)
    assert ([d.id for d in ch.docs], ch.seq, ch.more) == (["d0", "d1"], 2, True)
    ch = storage.changes(uid, 0, 1000, 500)
    assert ([d.id for d in ch.docs], ch.more) == (["d0", "d1", "d2", "d3", "d4"], False)
    # A document bigger than the byte limit still comes, alone.
    storage.push(uid, [("big", 0, bytes(1000)), ("small", 0, b"s")])
    ch = storage.changes(uid, 5, 1000, 250)
    assert ([d.id for d in ch.docs], ch.seq, ch.more) == (["big"], 6, True)
    assert len(ch.docs[0].data) == 1000
    ch = storage.changes(uid, 6, 1000, 250)
    assert ([d.id for d in ch.docs], ch.seq, ch.more) == (["small"], 7, False)


def test_accounts_are_isolated(storage):
    alice = make_user(storage, "alice@example.org", "ca")
    bob = make_user(storage, "bob@example.org", "cb")
    storage.push(alice, [("x", 0, b"alice's x"), ("y", 0, b"alice's y")])
    storage.push(alice, [("x", 1, b"alice's x2")])
    assert storage.head(bob) == 0
    assert storage.changes(bob, 0, 1000, 1 << 20).docs == []
    assert storage.get_docs(bob, ["x", "y"]) == []
    assert storage.doc_sizes(bob, ["x"]) == {}
    # Bob's x is his own: base 0, not Alice's revision.
    with pytest.raises(Conflict) as err:
        storage.push(bob, [("x", 2, b"bob's x")])
    assert err.value.conflicts == [("x", 0)]
    assert storage.push(bob, [("x", 0, b"bob's x")]) == (1, [1])
    assert [d.data for d in storage.get_docs(bob, ["x"])] == [b"bob's x"]
    assert [d.data for d in storage.get_docs(alice, ["x"])] == [b"alice's x2"]
    assert storage.get_bundle(bob) == b"bundle of bob@example.org"
    assert storage.device_by_token_hash(h("token of bob@example.org")).user_id == bob


def test_concurrent_pushers_get_commit_ordered_numbers(backend):
    """Several threads (each with its own connection) push to one account while a
    follower reads the change feed: numbers come out dense, each once, and the
    follower, resuming from the last ``seq`` it saw, ends with every document's latest
    revision.  A number committed before a smaller one would make it skip a write."""
    writers, rounds = 5, 30
    stores = [open_storage(*backend) for _ in range(writers + 1)]
    try:
        uid = make_user(stores[0])
        barrier = threading.Barrier(writers + 1)
        results = [[] for _ in range(writers)]
        done = threading.Event()

        def write(w):
            s = stores[w]
            revs = {}
            barrier.wait()
            for r in range(rounds):
                batch = [(f"w{w}-{k}", revs.get(f"w{w}-{k}", 0), f"{w}/{r}/{k}".encode())
                         for k in range(1 + (r % 3))]
                seq, new = s.push(uid, batch)
                for (doc_id, _, _), rev in zip(batch, new):
                    revs[doc_id] = rev
                results[w].append((seq, len(batch)))

        seen = {}
        follower_seqs = []

        def follow():
            s = stores[writers]
            since = 0
            barrier.wait()
            while True:
                finished = done.is_set()
                ch = s.changes(uid, since, 7, 1 << 20)
                for d in ch.docs:
                    follower_seqs.append(d.seq)
                    seen[d.id] = (d.rev, d.data)
                since = ch.seq
                if finished and not ch.more:
                    return

        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        reader = threading.Thread(target=follow)
        for t in threads + [reader]:
            t.start()
        for t in threads:
            t.join(120)
        done.set()
        reader.join(120)
        assert not reader.is_alive()

        # Every push got a distinct block of numbers; together they are 1..total.
        numbers = sorted(n for pushes in results for seq, count in pushes
                         for n in range(seq - count + 1, seq + 1))
        total = sum(1 + (r % 3) for r in range(rounds)) * writers
        assert numbers == list(range(1, total + 1))
        assert follower_seqs == sorted(follower_seqs)
        assert len(set(follower_seqs)) == len(follower_seqs)
        latest = {d.id: (d.rev, d.data) for d in stores[0].changes(uid, 0, 1000, 1 << 30).docs}
        assert seen == latest
        assert len(latest) == writers * 3
        for w in range(writers):
            for k in range(3):
                last_round = max(r for r in range(rounds) if r % 3 >= k)
                times = sum(1 for r in range(rounds) if r % 3 >= k)
                assert latest[f"w{w}-{k}"] == (times, f"{w}/{last_round}/{k}".encode())
    finally:
        for s in stores:
            s.close()


def test_postgres_notifies_other_processes(postgres_server, tmp_path):
    url = postgres_server.create_database()
    writer = open_storage(str(tmp_path), url)
    listener = open_storage(str(tmp_path), url)
    heard = []
    got = threading.Event()

    def callback(user_id):
        heard.append(user_id)
        if user_id is not None:
            got.set()

    stop = listener.listen(callback)
    try:
        assert listener._listeners[0].wait_ready(30)
        uid = make_user(writer)
        writer.push(uid, [("a", 0, b"x")])
        assert got.wait(10)
        assert heard[0] is None      # "wake everyone" once listening starts
        assert heard[1:] == [uid]
        # A conflicting push notifies nobody.
        got.clear()
        with pytest.raises(Conflict):
            writer.push(uid, [("a", 0, b"y")])
        writer.push(uid, [("b", 0, b"y")])
        assert got.wait(10)
        assert heard[1:] == [uid, uid]
    finally:
        stop()
        writer.close()
        listener.close()


def test_sqlite_has_nothing_to_listen_to(tmp_path):
    s = open_storage(str(tmp_path))
    try:
        assert s.listen(lambda user_id: None) is None
    finally:
        s.close()


# -- incoming mail ------------------------------------------------------------------


def test_incoming_key_names_only_claimed_accounts_with_a_key(storage):
    uid = make_user(storage)
    assert storage.incoming_key("alice@example.org") is None
    storage.set_incoming_key(uid, b"k1" * 608)
    storage.set_incoming_key(uid, b"k2" * 608)          # replaced, not added
    assert storage.incoming_key("alice@example.org") == (uid, b"k2" * 608)
    assert storage.incoming_key("nobody@example.org") is None
    storage.create_user("bob@example.org", h("code-b"), NOW + WEEK, NOW)
    assert storage.incoming_key("bob@example.org") is None
    with pytest.raises(NoSuchAccount):
        storage.set_incoming_key(uid + 1000, b"k")


def test_deliveries_are_stored_in_bounded_rows_and_read_back(storage):
    from leapmail.provider.storage import INCOMING_CHUNK

    a = make_user(storage)
    b = make_user(storage, "bob@example.org", "code-b")
    big = [os.urandom(INCOMING_CHUNK), os.urandom(INCOMING_CHUNK), b"tail"]
    storage.deliver([(a, "d1", iter(big)), (b, "d2", iter([b"small"]))], NOW)
    assert storage.incoming_count(a, NOW) == 1 and storage.incoming_count(b, NOW) == 1
    record = storage.incoming_record(a, "dev1", "d1", NOW)
    assert (record.id, record.size, record.received, record.attempts, record.chunks) == (
        "d1", 2 * INCOMING_CHUNK + 4, NOW, 0, 3)
    assert [storage.incoming_chunk(a, "d1", n) for n in range(3)] == big
    assert storage.incoming_chunk(a, "d1", 3) is None
    # Another account's delivery is not found under this one.
    assert storage.incoming_record(a, "dev1", "d2", NOW) is None
    assert storage.incoming_chunk(a, "d2", 0) is None
    with pytest.raises(ValueError):
        storage.deliver([(a, "d3", [b"x" * (INCOMING_CHUNK + 1)])], NOW)
    assert storage.incoming_record(a, "dev1", "d3", NOW) is None


def test_a_failing_delivery_stores_nothing_for_anyone(storage):
    a = make_user(storage)
    b = make_user(storage, "bob@example.org", "code-b")

    def broken():
        yield b"first row"
        raise OSError("the spool file went away")

    with pytest.raises(OSError):
        storage.deliver([(a, "ok", [b"fine"]), (b, "bad", broken())], NOW)
    assert storage.incoming_count(a, NOW) == 0 and storage.incoming_count(b, NOW) == 0
    assert storage.incoming_chunk(a, "ok", 0) is None


def test_claims_lease_fail_backs_off_and_delete(storage):
    uid = make_user(storage)
    storage.deliver([(uid, f"d{i}", [b"box %d" % i]) for i in range(3)], NOW)
    first = storage.claim_incoming(uid, "dev1", 2, NOW + 60, NOW)
    assert [r.id for r in first] == ["d0", "d1"]
    # Leased: not claimable (by anyone) until the lease ends.
    assert [r.id for r in storage.claim_incoming(uid, "dev2", 10, NOW + 60, NOW)] == ["d2"]
    assert storage.claim_incoming(uid, "dev1", 10, NOW + 60, NOW) == []
    assert storage.claim_incoming(uid, "dev3", 10, NOW + 60, NOW) == []
    assert storage.incoming_record(uid, "dev3", "d0", NOW) is None
    assert storage.incoming_record(uid, "dev1", "d0", NOW).id == "d0"
    assert storage.incoming_count(uid, NOW) == 0
    assert storage.incoming_count(uid, NOW + 60) == 3
    # A failure by a device that does not hold the lease changes nothing.
    assert not storage.fail_incoming(uid, "dev2", "d0", NOW + 10, "not mine")
    assert storage.fail_incoming(uid, "dev1", "d0", NOW + 10, "cannot open")
    assert storage.claim_incoming(uid, "dev3", 10, NOW + 60, NOW + 9) == []
    again = storage.claim_incoming(uid, "dev3", 10, NOW + 60, NOW + 10)
    assert [(r.id, r.attempts) for r in again] == [("d0", 1)]
    assert storage.delete_incoming(uid, ["d0", "d1", "d0", "nope"]) == 2
    assert storage.incoming_chunk(uid, "d0", 0) is None
    assert [r.id for r in storage.claim_incoming(uid, "dev3", 10, NOW + 200, NOW + 100)] == ["d2"]


def test_a_reclaim_takes_back_the_devices_own_leases_only(storage):
    uid = make_user(storage)
    storage.deliver([(uid, f"d{i}", [b"box %d" % i]) for i in range(3)], NOW)
    assert [r.id for r in storage.claim_incoming(uid, "dev1", 2, NOW + 300, NOW)] == [
        "d0", "d1"]
    assert [r.id for r in storage.claim_incoming(uid, "dev2", 1, NOW + 300, NOW)] == ["d2"]
    # dev1 restarted: its own leases come back at once; dev2's stays dev2's.
    assert storage.claim_incoming(uid, "dev1", 10, NOW + 300, NOW + 1) == []
    back = storage.claim_incoming(uid, "dev1", 10, NOW + 300, NOW + 1, reclaim=True)
    assert [r.id for r in back] == ["d0", "d1"]
    assert storage.incoming_record(uid, "dev2", "d0", NOW + 1) is None
    # Still due times first: a put-off delivery is not taken back early.
    assert storage.fail_incoming(uid, "dev1", "d0", NOW + 50, "cannot open")
    again = storage.claim_incoming(uid, "dev1", 10, NOW + 300, NOW + 2, reclaim=True)
    assert [r.id for r in again] == ["d1"]


def test_concurrent_claims_split_the_deliveries(storage):
    uid = make_user(storage)
    storage.deliver([(uid, f"d{i:03}", [b"x"]) for i in range(60)], NOW)
    results = {}

    def claim(device):
        got = []
        while True:
            batch = [r.id for r in storage.claim_incoming(uid, device, 3, NOW + 60, NOW)]
            if not batch:
                break
            got += batch
        results[device] = got
        storage.release()

    threads = [threading.Thread(target=claim, args=(f"dev{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [i for got in results.values() for i in got]
    assert sorted(everything) == [f"d{i:03}" for i in range(60)]


def test_has_domain_matches_whole_domains_only(storage):
    make_user(storage)
    storage.create_user("x_y@under_score.org", h("c"), NOW + WEEK, NOW)
    assert storage.has_domain("example.org")
    assert not storage.has_domain("ample.org")
    assert not storage.has_domain("example.or")
    assert storage.has_domain("under_score.org")
    assert not storage.has_domain("underXscore.org")
    assert not storage.has_domain("%")


def test_a_schema_1_database_gets_the_incoming_tables(tmp_path):
    import sqlite3

    s = open_storage(str(tmp_path))
    uid = make_user(s)
    s.close()
    conn = sqlite3.connect(str(tmp_path / "provider.db"))
    for table in ("incoming_keys", "incoming", "incoming_chunks"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    s = open_storage(str(tmp_path))
    try:
        s.set_incoming_key(uid, b"k" * 1216)
        assert s.incoming_key("alice@example.org") == (uid, b"k" * 1216)
    finally:
        s.close()
