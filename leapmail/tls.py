"""The daemon's TLS certificate, for STARTTLS on the local IMAP (and later SMTP) ports.

The daemon listens on the loopback interface, where no public certificate authority can
vouch for it, so it makes its own: a self-signed certificate for ``localhost`` and
``127.0.0.1``, created on first start and kept in the account's home, so that a mail
client that was told once to trust it keeps trusting it.

Files (mode 0600, like everything in the home)::

    tls-cert.pem    the certificate (PEM)
    tls-key.pem     its private key (PEM, PKCS#8, unencrypted)

A user who prefers a certificate of their own puts it in these two files instead; the
daemon uses whatever pair it finds, as long as the key matches the certificate.
"""

import datetime
import fcntl
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from leapmail.errors import LeapmailError
from leapmail.fsutil import atomic_write

CERT_NAME = "tls-cert.pem"
KEY_NAME = "tls-key.pem"
#: How long a generated certificate is valid.  Long, because replacing it makes every
#: mail client ask its user to trust the new one.
VALIDITY = datetime.timedelta(days=3650)


class TLSError(LeapmailError):
    pass


def certificate_paths(home_path):
    return os.path.join(home_path, CERT_NAME), os.path.join(home_path, KEY_NAME)


def ensure_certificate(home_path):
    """Return ``(cert_pem_path, key_pem_path)``, creating a self-signed pair if missing.

    An existing pair is reused as it is. If either file is missing, a new pair replaces
    both. A pair that is present but unreadable, or whose key does not match the
    certificate, is refused with :class:`TLSError` rather than replaced: it may be the
    user's own.
    """
    cert_path, key_path = certificate_paths(home_path)
    # The daemon holds the store's lock when it gets here, but other tools may not:
    # two processes generating at once must not leave a key from one beside the
    # certificate of the other.
    fd = os.open(home_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.exists(cert_path) and os.path.exists(key_path):
            _load_pair(cert_path, key_path)
        else:
            key_pem, cert_pem = generate_self_signed()
            # Key first: a crash between the two writes leaves no certificate, and the
            # next start makes a fresh pair instead of pairing an old cert with a new key.
            atomic_write(key_path, key_pem, mode=0o600)
            atomic_write(cert_path, cert_pem, mode=0o600)
    finally:
        os.close(fd)
    return cert_path, key_path


def generate_self_signed(now=None):
    """A new EC P-256 key and a self-signed certificate for it, both as PEM bytes."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "leapmail (self-signed)"),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A day of slack for a client whose clock is a little behind ours.
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + VALIDITY)
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]),
            critical=False,
        )
        # Not a CA: Thunderbird (NSS) refuses a CA certificate used as a server's own,
        # while a plain self-signed one can be accepted with an exception.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_agreement=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _load_pair(cert_path, key_path):
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise TLSError(f"cannot read the TLS certificate: {e}") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise TLSError(f"{cert_path} is not a PEM certificate; {_REMEDY}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TLSError(f"{key_path} is not an unencrypted PEM private key; {_REMEDY}") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (cert.public_key().public_bytes(serialization.Encoding.DER, spki)
            != key.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise TLSError(f"{key_path} is not the key of {cert_path}; {_REMEDY}")
    return cert, key


_REMEDY = "remove both files to have a new self-signed certificate made at the next start"


def context_factory(home_path):
    """Server-side TLS options for ``startTLS``, from the home's certificate.

    Creates the certificate first if there is none. Returns a
    :class:`twisted.internet.ssl.CertificateOptions` (TLS 1.2 or later).
    """
    from OpenSSL import SSL
    from twisted.internet import ssl

    cert_path, key_path = ensure_certificate(home_path)
    cert, key = _load_pair(cert_path, key_path)
    try:
        # cryptography's objects, which pyOpenSSL takes as they are (its own X509 and
        # PKey wrappers are deprecated).
        options = ssl.CertificateOptions(privateKey=key, certificate=cert)
        # Build the OpenSSL context now, so that a pair OpenSSL refuses is reported at
        # start-up rather than at the first STARTTLS.
        options.getContext()
    except SSL.Error as e:
        raise TLSError(f"OpenSSL cannot use {cert_path} with {key_path}: {e}; {_REMEDY}") from None
    return options
