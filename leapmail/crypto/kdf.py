"""Passphrase → key derivation.

Parameters travel with whatever they protect (the secrets bundle records them), so a
later release can raise the cost for new bundles and still open old ones.  A parameter
set is identified by ``version``; an unknown version is refused rather than guessed.
"""

import os
import unicodedata
from base64 import b64decode, b64encode
from dataclasses import dataclass

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from leapmail.errors import LeapmailError

#: Current parameter set.  n=2**16, r=8 costs 64 MiB and about 0.2 s on a 2-core
#: desktop-class machine in 2026: cheap enough at daemon start, expensive for a guesser.
SCRYPT_VERSION = 1
SCRYPT_DEFAULTS = {"n": 2**16, "r": 8, "p": 1}

# Refuse absurd parameters from a tampered or corrupt file instead of allocating them.
_MAX_N = 2**22
_MAX_R = 32
_MAX_P = 16


class UnsupportedKDF(LeapmailError):
    """The stored KDF parameters are not ones this release can use."""


@dataclass(frozen=True)
class ScryptParams:
    salt: bytes
    n: int = SCRYPT_DEFAULTS["n"]
    r: int = SCRYPT_DEFAULTS["r"]
    p: int = SCRYPT_DEFAULTS["p"]
    version: int = SCRYPT_VERSION

    @classmethod
    def fresh(cls, **overrides):
        return cls(salt=os.urandom(16), **overrides)

    def to_dict(self):
        return {
            "name": "scrypt",
            "version": self.version,
            "n": self.n,
            "r": self.r,
            "p": self.p,
            "salt": b64encode(self.salt).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, d):
        try:
            if d["name"] != "scrypt" or d["version"] != SCRYPT_VERSION:
                raise UnsupportedKDF(
                    f"key derivation {d.get('name')!r} version {d.get('version')!r} is not "
                    "supported by this release of leapmail; upgrade leapmail"
                )
            n, r, p = int(d["n"]), int(d["r"]), int(d["p"])
            salt = b64decode(d["salt"], validate=True)
        except (KeyError, TypeError, ValueError) as e:
            raise UnsupportedKDF(f"malformed key derivation parameters ({e})") from None
        if not (2 <= n <= _MAX_N and n & (n - 1) == 0 and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
            raise UnsupportedKDF(f"key derivation parameters out of range (n={n}, r={r}, p={p})")
        if len(salt) < 16:
            raise UnsupportedKDF("key derivation salt too short")
        return cls(salt=salt, n=n, r=r, p=p)


def normalize_passphrase(passphrase):
    """Bytes for a passphrase: NFC, so the same words typed on another OS give the same key."""
    if isinstance(passphrase, bytes):
        passphrase = passphrase.decode("utf-8")
    return unicodedata.normalize("NFC", passphrase).encode("utf-8")


def derive(passphrase, params, length=32):
    return Scrypt(salt=params.salt, length=length, n=params.n, r=params.r, p=params.p).derive(
        normalize_passphrase(passphrase)
    )


def subkey(key, label, length=32):
    """A key for one purpose, ``label`` (bytes), derived from ``key`` (HKDF-SHA256): keys
    of different labels are independent, and none reveals ``key``."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label).derive(key)


def derive_login_key(passphrase, params):
    """The key a device logs in to its provider with.

    scrypt under its own salt (not the bundle's), then HKDF with its own label: the
    provider, which sees this key at every login and stores its SHA-256, learns nothing
    that opens the secrets bundle.
    """
    return subkey(derive(passphrase, params), b"leapmail provider login v1")
