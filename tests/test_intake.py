"""The provider's intake (leapmail.provider.intake): the one path into an incoming
queue, over real storage (SQLite and PostgreSQL) and the reactor's thread pool."""

import os

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from leapmail.crypto.sealed import IncomingKeyPair
from leapmail.provider.intake import Intake, IntakeError
from leapmail.provider.storage import open_storage
from test_provider_storage import NOW, make_user

MARKER = b"PLAINTEXT-MARKER-7f3a9c"
TRACE = b"Received: from client.example (127.0.0.1)\r\n\tby mx.test; Sun, 1 Nov 2026 00:00:00 +0000\r\n"


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path), None
    server = request.getfixturevalue("postgres_server")
    return str(tmp_path), server.create_database()


@pytest.fixture
def storage(backend):
    s = open_storage(*backend)
    yield s
    s.close()


@pytest.fixture(scope="module")
def keys():
    return IncomingKeyPair.generate(), IncomingKeyPair.generate()


def run(fn, *args):
    return threads.deferToThread(fn, *args)


def setup_users(storage, keys):
    alice = make_user(storage)
    bob = make_user(storage, "bob@example.org", "code-b")
    make_user(storage, "nokey@example.org", "code-c")
    storage.set_incoming_key(alice, keys[0].public_bytes())
    storage.set_incoming_key(bob, keys[1].public_bytes())
    return alice, bob


def read_delivery(storage, user_id):
    [record] = storage.claim_incoming(user_id, "dev", 10, NOW + 60, NOW + 1)
    return record, b"".join(storage.incoming_chunk(user_id, record.id, n)
                            for n in range(record.chunks))


@pytest_twisted.ensureDeferred
async def test_accepts_only_accounts_with_an_incoming_key(storage, keys):
    setup_users(storage, keys)
    intake = Intake(storage, run, 1000, "mx.test", reactor)
    assert await intake.accepts("alice@example.org")
    assert await intake.accepts("Bob@Example.ORG")
    assert not await intake.accepts("nokey@example.org")
    assert not await intake.accepts("nobody@example.org")
    assert not await intake.accepts("not an address")
    assert not await intake.accepts(b"\xff@example.org")
    with pytest.raises(IntakeError) as e:
        intake.receiver(["nobody@example.org"], TRACE)
    assert e.value.code == 451


@pytest_twisted.ensureDeferred
async def test_a_message_for_two_accounts_is_sealed_to_each(storage, keys, backend):
    alice, bob = setup_users(storage, keys)
    woken = []
    intake = Intake(storage, run, 10 * 1024 * 1024, "mx.test", reactor, wake=woken.append)
    for address in ("alice@example.org", "bob@example.org"):
        assert await intake.accepts(address)
    message = (b"Subject: " + MARKER + b"\r\n\r\n"
               + b"".join(b"line %d " % i + MARKER + b"\r\n" for i in range(40000)))
    receiver = intake.receiver(["alice@example.org", "BOB@example.org", "bob@example.org"],
                               TRACE)
    for start in range(0, len(message), 77):
        receiver.write(message[start:start + 77])
    assert receiver.size == len(message)
    assert storage.incoming_count(alice, NOW + 1) == 0
    await receiver.finish()
    assert sorted(woken) == sorted([alice, bob])
    for user_id, key in ((alice, keys[0]), (bob, keys[1])):
        record, box = read_delivery(storage, user_id)
        assert record.size == len(box) and record.chunks == 2
        assert MARKER not in box
        assert key.open(box) == TRACE + message
    home, database = backend
    if database is None:
        storage.close()
        for name in os.listdir(home):
            if name.startswith("provider.db"):
                with open(os.path.join(home, name), "rb") as f:
                    assert MARKER not in f.read(), name


@pytest_twisted.ensureDeferred
async def test_oversized_and_aborted_messages_store_nothing(storage, keys):
    alice, _ = setup_users(storage, keys)
    intake = Intake(storage, run, 1000, "mx.test", reactor)
    assert await intake.accepts("alice@example.org")
    receiver = intake.receiver(["alice@example.org"], TRACE)
    receiver.write(b"x" * 1001)
    with pytest.raises(IntakeError) as e:
        await receiver.finish()
    assert e.value.code == 552 and e.value.text.startswith("5.3.4 ")
    receiver = intake.receiver(["alice@example.org"], TRACE)
    receiver.write(b"Subject: hi\r\n\r\nhello\r\n")
    receiver.abort()
    with pytest.raises(IntakeError):
        receiver.write(b"more")
    assert storage.incoming_count(alice, NOW + 1) == 0


@pytest_twisted.ensureDeferred
async def test_a_storage_failure_is_a_temporary_smtp_error(storage, keys):
    alice, _ = setup_users(storage, keys)
    intake = Intake(storage, run, 1000, "mx.test", reactor)
    assert await intake.accepts("alice@example.org")
    receiver = intake.receiver(["alice@example.org"], TRACE)
    receiver.write(b"Subject: hi\r\n\r\nhello\r\n")
    storage.close()
    with pytest.raises(IntakeError) as e:
        await receiver.finish()
    assert e.value.code == 451 and e.value.text.startswith("4.3.0 ")
