"""Key derivation, the secrets bundle, and the sync wire format (:mod:`.wire`)."""

from leapmail.crypto.bundle import (
    BundleCorrupted,
    BundleError,
    SecretsBundle,
    WrongPassphrase,
    new_client_password,
    seal,
    unseal,
)
from leapmail.crypto.kdf import ScryptParams, UnsupportedKDF

__all__ = [
    "BundleCorrupted",
    "BundleError",
    "ScryptParams",
    "SecretsBundle",
    "UnsupportedKDF",
    "WrongPassphrase",
    "new_client_password",
    "seal",
    "unseal",
]
