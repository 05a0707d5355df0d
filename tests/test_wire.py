"""The sync wire format: what the provider sees, and what it cannot get away with."""

import os
import re

import pytest

from leapmail.crypto.wire import MIN_BODY, WireError, WireKeys, padme

KEY = bytes(range(32))


def test_round_trip_live_and_tombstone():
    keys = WireKeys(KEY)
    wid = keys.wire_id("flags", "flg-1")
    assert keys.open(wid, 7, keys.seal("flags", "flg-1", 7, b"\x00\x80data")) == (
        "flags", "flg-1", False, b"\x00\x80data")
    assert keys.open(wid, 8, keys.seal("flags", "flg-1", 8, None, deleted=True)) == (
        "flags", "flg-1", True, None)
    assert keys.open(wid, 9, keys.seal("flags", "flg-1", 9, b"", deleted=True)) == (
        "flags", "flg-1", True, b"")


def test_ids_are_opaque_stable_and_per_account():
    keys = WireKeys(KEY)
    wid = keys.wire_id("mailbox", "mbx-INBOX")
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", wid)
    assert "INBOX" not in wid and "mailbox" not in wid
    assert wid == WireKeys(KEY).wire_id("mailbox", "mbx-INBOX")
    assert wid != keys.wire_id("flags", "mbx-INBOX")
    assert wid != WireKeys(os.urandom(32)).wire_id("mailbox", "mbx-INBOX")


def test_no_plaintext_on_the_wire():
    keys = WireKeys(KEY)
    sealed = keys.seal("mailbox", "mbx-Secret", 1, b"name: PLAINTEXT-MARKER")
    for marker in (b"PLAINTEXT-MARKER", b"mailbox", b"mbx-Secret", b"Secret"):
        assert marker not in sealed


@pytest.mark.parametrize("size", [0, 1, 200, 255, 256, 1000, 70_000, 300_000])
def test_sizes_are_padded_to_buckets(size):
    keys = WireKeys(KEY)
    sealed = keys.seal("part", "p", 1, b"x" * size)
    overhead = 1 + 12 + 192 + 16 + 12 + 16
    body = len(sealed) - overhead
    assert body == max(MIN_BODY, padme(size + 1))
    assert body <= max(MIN_BODY, (size + 1) * 1.12 + 1)
    # Sizes in one bucket are indistinguishable.
    assert len(keys.seal("part", "p", 1, b"y" * (body - 1))) == len(sealed)


def test_another_revision_does_not_open():
    keys = WireKeys(KEY)
    sealed = keys.seal("flags", "flg-1", 3, b"v3")
    with pytest.raises(WireError, match="revision 4: header does not authenticate"):
        keys.open(keys.wire_id("flags", "flg-1"), 4, sealed)


def test_a_document_moved_to_another_id_does_not_open():
    keys = WireKeys(KEY)
    sealed = keys.seal("flags", "flg-1", 1, b"x")
    with pytest.raises(WireError):
        keys.open(keys.wire_id("flags", "flg-2"), 1, sealed)


def test_swapped_bodies_do_not_open():
    keys = WireKeys(KEY)
    a = keys.seal("flags", "flg-1", 1, b"a" * 10)
    b = keys.seal("flags", "flg-2", 1, b"b" * 10)
    # Header of a, body of b: the header authenticates, the body must not.
    head = 1 + 12 + 192 + 16
    with pytest.raises(WireError, match="body does not authenticate"):
        keys.open(keys.wire_id("flags", "flg-1"), 1, a[:head] + b[head:])


def test_every_flipped_byte_is_caught():
    keys = WireKeys(KEY)
    sealed = bytearray(keys.seal("message", "m1", 2, b"hello world"))
    wid = keys.wire_id("message", "m1")
    for i in range(0, len(sealed), 7):
        tampered = bytearray(sealed)
        tampered[i] ^= 0x01
        with pytest.raises(WireError):
            keys.open(wid, 2, bytes(tampered))


def test_truncated_and_junk_data_are_refused():
    keys = WireKeys(KEY)
    wid = keys.wire_id("message", "m1")
    sealed = keys.seal("message", "m1", 1, b"hello")
    for data in (b"", b"\x01", sealed[:-1], sealed[:100], b"\x02" + sealed[1:], os.urandom(600)):
        with pytest.raises(WireError):
            keys.open(wid, 1, data)


def test_another_accounts_key_does_not_open():
    sealed = WireKeys(KEY).seal("message", "m1", 1, b"hello")
    other = WireKeys(os.urandom(32))
    with pytest.raises(WireError):
        other.open(WireKeys(KEY).wire_id("message", "m1"), 1, sealed)


def test_keys_do_not_show_in_repr():
    assert repr(WireKeys(KEY)) == "<WireKeys>"
