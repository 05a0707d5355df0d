"""Sealed boxes for incoming mail: the provider seals, only the user's devices open.

HPKE (RFC 9180) with the hybrid KEM ML-KEM-768 + X25519, HKDF-SHA256 and AES-256-GCM,
so that mail at rest at the provider stays safe against a future quantum adversary
while X25519 keeps today's guarantees if ML-KEM falls.  HPKE seals a fresh random
content key; the message itself is sealed in chunks with that key (the STREAM
construction: a nonce counter and a last-chunk flag in every nonce), so the provider
seals a big message as it arrives and a device opens it a chunk at a time, neither
holding it whole, and a truncated, reordered or spliced box fails to open::

    "LMSB" 0x01 | u16 length | HPKE(enc || sealed content key) |
    chunks: u32 length | AES-256-GCM(content key, nonce = counter(11) || last(1),
                                    chunk, aad = header digest)

The key pair: ML-KEM-768 from its 64-byte seed and X25519 from its 32 raw bytes; the
private half lives in the secrets bundle, the public half (the ML-KEM encapsulation key
and the X25519 public key) is registered with the provider.
"""

import hashlib
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from leapmail.errors import LeapmailError

MAGIC = b"LMSB\x01"
CHUNK = 64 * 1024
_SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_INFO = b"leapmail incoming v1"
_MLKEM_PUBLIC = 1184
_X25519 = 32


class SealedError(LeapmailError):
    """A sealed box that does not open: not for this key, damaged or cut short."""


class IncomingKeyPair:
    """The key pair incoming mail is sealed to."""

    def __init__(self, mlkem_seed, x25519_private):
        self._mlkem = mlkem.MLKEM768PrivateKey.from_seed_bytes(mlkem_seed)
        self._x25519 = x25519.X25519PrivateKey.from_private_bytes(x25519_private)
        self._seed, self._x_raw = bytes(mlkem_seed), bytes(x25519_private)
        self._private = hpke.MLKEM768X25519PrivateKey(self._mlkem, self._x25519)

    @classmethod
    def generate(cls):
        return cls(os.urandom(64), os.urandom(32))

    def private_bytes(self):
        """96 bytes to keep in the secrets bundle."""
        return self._seed + self._x_raw

    @classmethod
    def from_private_bytes(cls, data):
        if len(data) != 96:
            raise SealedError("an incoming-mail private key is 96 bytes")
        return cls(data[:64], data[64:])

    def public_bytes(self):
        """What the provider seals to: the ML-KEM-768 key (1,184 bytes), then X25519's (32)."""
        return (self._mlkem.public_key().public_bytes_raw()
                + self._x25519.public_key().public_bytes_raw())

    def __repr__(self):
        return "<IncomingKeyPair>"

    def open(self, sealed):
        """The plaintext of a sealed box (bytes)."""
        return b"".join(self.open_chunks(sealed))

    def open_chunks(self, sealed):
        """Yield the plaintext a chunk at a time; raises :class:`SealedError` on any fault
        (after yielding only chunks that authenticated, so stop using them then)."""
        data = memoryview(sealed)
        if bytes(data[:5]) != MAGIC or len(data) < 7:
            raise SealedError("not a leapmail sealed box")
        (size,) = struct.unpack(">H", data[5:7])
        header = bytes(data[7:7 + size])
        if len(header) != size:
            raise SealedError("sealed box cut short in its header")
        try:
            key = _SUITE.decrypt(header, self._private, info=_INFO)
        except (InvalidTag, ValueError):
            raise SealedError("sealed box is not for this key, or damaged") from None
        aead, aad = AESGCM(key), hashlib.sha256(header).digest()
        pos, counter, last = 7 + size, 0, False
        while not last:
            if pos + 4 > len(data):
                raise SealedError("sealed box cut short")
            (length,) = struct.unpack(">I", data[pos:pos + 4])
            chunk = bytes(data[pos + 4:pos + 4 + length])
            if len(chunk) != length:
                raise SealedError("sealed box cut short")
            pos += 4 + length
            last = pos == len(data)
            try:
                yield aead.decrypt(_nonce(counter, last), chunk, aad)
            except InvalidTag:
                raise SealedError("sealed box damaged, reordered or cut short") from None
            counter += 1


def _nonce(counter, last):
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class Sealer:
    """Seals one message to a public key, chunk by chunk as it arrives."""

    def __init__(self, public_bytes):
        if len(public_bytes) != _MLKEM_PUBLIC + _X25519:
            raise SealedError("an incoming-mail public key is 1,216 bytes")
        public = hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(public_bytes[:_MLKEM_PUBLIC]),
            x25519.X25519PublicKey.from_public_bytes(public_bytes[_MLKEM_PUBLIC:]))
        key = AESGCM.generate_key(bit_length=256)
        header = _SUITE.encrypt(key, public, info=_INFO)
        self._aead, self._aad = AESGCM(key), hashlib.sha256(header).digest()
        self._counter = 0
        # A bytearray, not bytes: SMTP hands the message over a line at a time, and
        # bytes += would copy the whole pending chunk for every line.
        self._pending = bytearray()
        self.head = MAGIC + struct.pack(">H", len(header)) + header

    def _seal(self, data, last):
        sealed = self._aead.encrypt(_nonce(self._counter, last), data, self._aad)
        self._counter += 1
        return struct.pack(">I", len(sealed)) + sealed

    def update(self, data):
        """Sealed bytes for what is complete so far (the last chunk waits for finish)."""
        self._pending += data
        if len(self._pending) <= CHUNK:
            return b""
        view = memoryview(self._pending)
        out, start = [], 0
        # Strictly more than a chunk must be pending: the last chunk is sealed by finish.
        while len(self._pending) - start > CHUNK:
            out.append(self._seal(view[start:start + CHUNK], False))
            start += CHUNK
        view.release()
        del self._pending[:start]
        return b"".join(out)

    def finish(self):
        data, self._pending = bytes(self._pending), bytearray()
        return self._seal(data, True)


def seal(public_bytes, plaintext):
    """A whole message sealed at once (the streaming form is :class:`Sealer`)."""
    sealer = Sealer(public_bytes)
    return sealer.head + sealer.update(plaintext) + sealer.finish()
