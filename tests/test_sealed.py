"""Sealed boxes for incoming mail (HPKE, ML-KEM-768 + X25519, chunked AES-256-GCM)."""

import os

import pytest

from leapmail.crypto.sealed import CHUNK, IncomingKeyPair, Sealer, SealedError, seal


@pytest.fixture(scope="module")
def keys():
    return IncomingKeyPair.generate()


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17])
def test_round_trip(keys, size):
    message = os.urandom(size)
    box = seal(keys.public_bytes(), message)
    assert keys.open(box) == message
    assert message[:64] not in box[7:] or size < 16


def test_streaming_sealer_matches_and_bounds_chunks(keys):
    message = os.urandom(5 * CHUNK + 3)
    sealer = Sealer(keys.public_bytes())
    parts = [sealer.head]
    for i in range(0, len(message), 1000):
        part = sealer.update(message[i:i + 1000])
        assert len(part) <= 2 * (CHUNK + 20)
        parts.append(part)
    parts.append(sealer.finish())
    box = b"".join(parts)
    assert keys.open(box) == message
    assert [len(c) for c in keys.open_chunks(box)] == [CHUNK] * 5 + [3]


def test_keys_survive_the_bundle(keys):
    again = IncomingKeyPair.from_private_bytes(keys.private_bytes())
    assert again.public_bytes() == keys.public_bytes()
    assert len(keys.public_bytes()) == 1216 and len(keys.private_bytes()) == 96
    assert again.open(seal(keys.public_bytes(), b"hi")) == b"hi"
    assert repr(keys) == "<IncomingKeyPair>"


def test_another_key_cannot_open(keys):
    box = seal(keys.public_bytes(), b"for keys only")
    with pytest.raises(SealedError, match="not for this key"):
        IncomingKeyPair.generate().open(box)


def test_truncation_reordering_and_tampering_fail(keys):
    message = os.urandom(3 * CHUNK + 5)
    box = seal(keys.public_bytes(), message)
    head = 7 + int.from_bytes(box[5:7], "big")
    chunk = 4 + CHUNK + 16
    cases = {
        "cut at a chunk boundary": box[:head + 2 * chunk],
        "cut mid-chunk": box[:-3],
        "two chunks swapped": box[:head] + box[head + chunk:head + 2 * chunk]
        + box[head:head + chunk] + box[head + 2 * chunk:],
        "a chunk dropped": box[:head] + box[head + chunk:],
        "a flipped bit": box[:head + 100] + bytes([box[head + 100] ^ 1]) + box[head + 101:],
        "a flipped header bit": box[:20] + bytes([box[20] ^ 1]) + box[21:],
        "not a box": b"hello world",
    }
    for name, damaged in cases.items():
        with pytest.raises(SealedError):
            keys.open(damaged)
            pytest.fail(f"{name}: opened")


def test_bad_keys_are_refused():
    with pytest.raises(SealedError):
        IncomingKeyPair.from_private_bytes(b"x" * 95)
    with pytest.raises(SealedError):
        Sealer(b"x" * 100)


def test_sealer_fed_line_by_line(keys):
    # SMTP hands the message over a line at a time: many small updates must seal the
    # same chunks as one big one (and cost linear time: see Sealer.update).
    line = b"x" * 76 + b"\r\n"
    message = line * (3 * CHUNK // len(line) + 7)
    sealer = Sealer(keys.public_bytes())
    parts = [sealer.head] + [sealer.update(line) for _ in range(len(message) // len(line))]
    parts.append(sealer.finish())
    box = b"".join(parts)
    assert keys.open(box) == message
    assert [len(c) for c in keys.open_chunks(box)] == [CHUNK] * 3 + [len(message) - 3 * CHUNK]
