"""The secrets bundle: every long-lived key of an account, sealed under the passphrase.

The passphrase never keys anything directly.  It derives (scrypt) a key that seals a
small bundle holding random keys; those keys encrypt the data.  Changing the passphrase
therefore re-seals only the bundle, and the database stays as it is.

File format (JSON, mode 0600)::

    {"format": "leapmail-secrets", "version": 1,
     "kdf": {"name": "scrypt", "version": 1, "n": ..., "r": ..., "p": ..., "salt": b64},
     "check": b64, "nonce": b64, "ciphertext": b64}

The scrypt output is 64 bytes: the first half is the AES-256-GCM key of the bundle, the
second half keys ``check`` (an HMAC of a fixed label).  ``check`` lets us tell a wrong
passphrase (check differs) from a damaged file (check matches, GCM tag fails), which GCM
alone cannot.  It gives a guesser nothing the GCM tag would not.  The header fields are
the GCM associated data, so they cannot be altered without detection.
"""

import hmac
import json
import os
import secrets
from base64 import b64decode, b64encode
from dataclasses import dataclass, field
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from leapmail.crypto.kdf import ScryptParams, derive
from leapmail.errors import LeapmailError

FORMAT = "leapmail-secrets"
VERSION = 1
_CHECK_LABEL = b"leapmail passphrase check v1"
#: Random bytes in a client password: 24 bytes (192 bits), 32 URL-safe characters.
CLIENT_PASSWORD_BYTES = 24


class BundleError(LeapmailError):
    """The secrets bundle cannot be opened."""


class WrongPassphrase(BundleError):
    def __init__(self, path=None):
        where = f" for {path}" if path else ""
        super().__init__(f"wrong passphrase{where}")


class BundleCorrupted(BundleError):
    pass


@dataclass
class SecretsBundle:
    """The keys of one account.

    ``storage_key`` keys the local SQLCipher database and derives the keys of the
    sync wire format (:mod:`leapmail.crypto.wire`).  ``id_key`` keys the HMACs that name
    content documents, so ids never reveal a bare content hash.  ``keypairs`` holds the
    key pairs later features add (incoming mail), by name, as base64 strings.
    ``client_password`` is what local mail clients give the IMAP and SMTP servers; it
    is ``None`` only in a bundle sealed by a release that predates it (see
    :meth:`leapmail.home.Home.unlock`, which adds one).
    """

    storage_key: bytes
    id_key: bytes
    keypairs: dict = field(default_factory=dict)
    client_password: str | None = None

    @classmethod
    def generate(cls):
        return cls(
            storage_key=os.urandom(32), id_key=os.urandom(32),
            client_password=new_client_password(),
        )

    def _to_plaintext(self):
        d = {
            "storage_key": b64encode(self.storage_key).decode("ascii"),
            "id_key": b64encode(self.id_key).decode("ascii"),
            "keypairs": self.keypairs,
        }
        if self.client_password is not None:
            d["client_password"] = self.client_password
        return json.dumps(d, sort_keys=True).encode("utf-8")

    @classmethod
    def _from_plaintext(cls, data):
        d = json.loads(data)
        bundle = cls(
            storage_key=b64decode(d["storage_key"], validate=True),
            id_key=b64decode(d["id_key"], validate=True),
            keypairs=dict(d.get("keypairs", {})),
            # Absent from bundles sealed before client passwords existed.
            client_password=d.get("client_password"),
        )
        if len(bundle.storage_key) != 32 or len(bundle.id_key) != 32:
            raise ValueError("key of wrong length")
        if bundle.client_password is not None and (
            not isinstance(bundle.client_password, str) or not bundle.client_password
        ):
            raise ValueError("client password of wrong type")
        return bundle

    def __repr__(self):
        # Never let a key reach a log line or a traceback.
        return f"<SecretsBundle keypairs={sorted(self.keypairs)}>"


def new_client_password():
    """A fresh password for local IMAP/SMTP clients: 192 bits from the OS's CSPRNG.

    URL-safe base64, so it survives copying into any client's password field.
    """
    return secrets.token_urlsafe(CLIENT_PASSWORD_BYTES)


def _aad(header):
    return json.dumps(
        {k: header[k] for k in ("format", "version", "kdf")}, sort_keys=True
    ).encode("utf-8")


def _split(derived):
    sealing_key, check_key = derived[:32], derived[32:]
    return sealing_key, hmac.new(check_key, _CHECK_LABEL, sha256).digest()


def seal(bundle, passphrase, params=None):
    """The sealed bundle as bytes (JSON)."""
    params = params or ScryptParams.fresh()
    sealing_key, check = _split(derive(passphrase, params, length=64))
    header = {"format": FORMAT, "version": VERSION, "kdf": params.to_dict()}
    nonce = os.urandom(12)
    ciphertext = AESGCM(sealing_key).encrypt(nonce, bundle._to_plaintext(), _aad(header))
    header.update(
        check=b64encode(check).decode("ascii"),
        nonce=b64encode(nonce).decode("ascii"),
        ciphertext=b64encode(ciphertext).decode("ascii"),
    )
    return (json.dumps(header, indent=1, sort_keys=True) + "\n").encode("utf-8")


def unseal(data, passphrase, path=None):
    """Open a sealed bundle.  Raises :class:`WrongPassphrase` or :class:`BundleCorrupted`."""
    where = path or "the secrets bundle"
    try:
        header = json.loads(data)
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise BundleCorrupted(f"{where} is not a leapmail secrets bundle")
        if header.get("version") != VERSION:
            raise BundleCorrupted(
                f"{where} has format version {header.get('version')!r}, which this release "
                "of leapmail does not understand; upgrade leapmail"
            )
        params = ScryptParams.from_dict(header["kdf"])
        stored_check = b64decode(header["check"], validate=True)
        nonce = b64decode(header["nonce"], validate=True)
        ciphertext = b64decode(header["ciphertext"], validate=True)
    except BundleError:
        raise
    except LeapmailError as e:
        raise BundleCorrupted(f"{where}: {e}") from None
    except (ValueError, KeyError, TypeError):
        raise BundleCorrupted(f"{where} is damaged (unreadable header)") from None

    sealing_key, check = _split(derive(passphrase, params, length=64))
    if not hmac.compare_digest(check, stored_check):
        raise WrongPassphrase(path)
    try:
        plaintext = AESGCM(sealing_key).decrypt(nonce, ciphertext, _aad(header))
        return SecretsBundle._from_plaintext(plaintext)
    except (InvalidTag, ValueError, KeyError, TypeError):
        raise BundleCorrupted(
            f"{where} is damaged: the passphrase is right but the sealed keys do not "
            "authenticate; restore it from a backup"
        ) from None
