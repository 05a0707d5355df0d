"""The sync wire format: how one document travels to the provider and back.

Every key here derives (HKDF-SHA256) from the bundle's storage key, so every device of
an account has them and the provider has none::

    storage_key ─► id key      names documents on the wire (HMAC of kind and local id)
                ├► header key  seals the small header (kind, local id, tombstone?)
                └► doc key ─►  per document: HKDF(doc key, info = wire id) seals the body

A sealed document is::

    version (1 byte, 1) | header nonce (12) | sealed header (HEADER_SIZE + 16)
                        | body nonce (12)   | sealed body (padded + 16)

The header's associated data is the wire id and the revision; the body's is the wire
id, the revision, the kind, the local id and the tombstone bit.  So the provider can
neither move a document to another id, nor serve it as another revision, nor change
what kind it is: each fails authentication.  An old revision replayed in place of a
newer one authenticates, but the receiver refuses any revision lower than one it has
seen (:mod:`leapmail.sync`).  The wire id is checked against the header's kind and
local id, so a sealed document can only ever stand for the one document it names.

Bodies are padded with ISO/IEC 7816-4 padding (0x80 then zeros) to a Padmé length
(at most 12% larger, leaking O(log log n) bits of the size), at least 256 bytes; the
header to a fixed size.  The provider learns a coarse size and nothing else: ids are
keyed hashes, so no mailbox name, content hash, flag or subject shows.
"""

import hmac
import json
import os
import struct
from base64 import urlsafe_b64encode
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from leapmail.crypto.kdf import subkey
from leapmail.errors import LeapmailError

VERSION = 1
#: Sealed header plaintext size: kind, local id and flags fit with room to spare.
HEADER_SIZE = 192
MIN_BODY = 256
_NONCE = 12
_TAG = 16


class WireError(LeapmailError):
    """A sealed document that does not open: tampered, misplaced, or not ours."""


_hkdf = subkey


def padme(length):
    """The Padmé padded length of ``length`` bytes (Nikitin et al., PETS 2019)."""
    if length < 2:
        return length
    e = length.bit_length() - 1
    s = e.bit_length()
    last_bits = e - s
    mask = (1 << last_bits) - 1
    return (length + mask) & ~mask


def _pad(data):
    target = max(MIN_BODY, padme(len(data) + 1))
    return data + b"\x80" + bytes(target - len(data) - 1)


def _unpad(data):
    end = data.rfind(b"\x80")
    if end < 0 or data[end + 1:].count(0) != len(data) - end - 1:
        raise WireError("bad padding")
    return data[:end]


class WireKeys:
    """The sync keys of one account; seals and opens documents."""

    def __init__(self, storage_key):
        if len(storage_key) != 32:
            raise ValueError("storage key must be 32 bytes")
        self._id_key = _hkdf(storage_key, b"leapmail sync id v1")
        self._header = AESGCM(_hkdf(storage_key, b"leapmail sync header v1"))
        self._doc_key = _hkdf(storage_key, b"leapmail sync document v1")

    def __repr__(self):
        return "<WireKeys>"

    def wire_id(self, kind, doc_id):
        """The opaque id the provider knows a document by: 32 URL-safe characters."""
        mac = hmac.new(self._id_key, kind.encode("utf-8") + b"\0" + doc_id.encode("utf-8"),
                       sha256).digest()
        return urlsafe_b64encode(mac[:24]).decode("ascii")

    def _body_cipher(self, wire_id):
        return AESGCM(_hkdf(self._doc_key, b"doc " + wire_id.encode("ascii")))

    def seal(self, kind, doc_id, rev, content, deleted=False):
        """The sealed bytes of revision ``rev`` of a document (``content`` may be None)."""
        wire_id = self.wire_id(kind, doc_id)
        header = json.dumps([kind, doc_id, bool(deleted), content is not None],
                            separators=(",", ":")).encode("utf-8")
        header = struct.pack(">H", len(header)) + header
        if len(header) > HEADER_SIZE:
            raise ValueError(f"document id too long for the wire: {doc_id!r}")
        header += bytes(HEADER_SIZE - len(header))
        h_nonce, b_nonce = os.urandom(_NONCE), os.urandom(_NONCE)
        sealed_header = self._header.encrypt(h_nonce, header, _header_aad(wire_id, rev))
        body = self._body_cipher(wire_id).encrypt(
            b_nonce, _pad(content or b""), _body_aad(wire_id, rev, kind, doc_id, deleted))
        return b"".join((bytes([VERSION]), h_nonce, sealed_header, b_nonce, body))

    def open(self, wire_id, rev, data):
        """``(kind, doc_id, deleted, content)`` from sealed bytes, or :class:`WireError`."""
        data = bytes(data)
        head = 1 + _NONCE + HEADER_SIZE + _TAG
        if len(data) < head + _NONCE + _TAG or data[0] != VERSION:
            raise WireError(f"document {wire_id}: not a sealed document of this version")
        h_nonce, sealed_header = data[1:1 + _NONCE], data[1 + _NONCE:head]
        try:
            header = self._header.decrypt(h_nonce, sealed_header, _header_aad(wire_id, rev))
            (size,) = struct.unpack(">H", header[:2])
            kind, doc_id, deleted, has_content = json.loads(header[2:2 + size])
        except InvalidTag:
            raise WireError(
                f"document {wire_id} revision {rev}: header does not authenticate "
                "(tampered, moved or replayed under another revision)") from None
        except (ValueError, TypeError):
            raise WireError(f"document {wire_id}: malformed header") from None
        if not (isinstance(kind, str) and isinstance(doc_id, str)) or not hmac.compare_digest(
                self.wire_id(kind, doc_id), wire_id):
            raise WireError(f"document {wire_id}: stored under an id that is not its own")
        b_nonce, body = data[head:head + _NONCE], data[head + _NONCE:]
        try:
            plain = self._body_cipher(wire_id).decrypt(
                b_nonce, body, _body_aad(wire_id, rev, kind, doc_id, deleted))
        except InvalidTag:
            raise WireError(f"document {wire_id} revision {rev}: body does not authenticate"
                            ) from None
        content = _unpad(plain)
        return kind, doc_id, bool(deleted), (content if has_content else None)


def _header_aad(wire_id, rev):
    return b"leapmail header v1\0" + wire_id.encode("ascii") + struct.pack(">Q", rev)


def _body_aad(wire_id, rev, kind, doc_id, deleted):
    return b"\0".join((
        b"leapmail body v1", wire_id.encode("ascii"), struct.pack(">Q", rev),
        kind.encode("utf-8"), doc_id.encode("utf-8"), b"1" if deleted else b"0",
    ))
