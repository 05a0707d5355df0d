"""The daemon's plumbing: its options, its TLS certificate, its listeners."""

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import protocol, threads
from twisted.protocols.basic import LineReceiver

from leapmail.tls import context_factory, ensure_certificate

# -- the certificate -----------------------------------------------------------------


def mode(path):
    return os.stat(path).st_mode & 0o777


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_certificate_is_self_signed_for_localhost(tmp_path):
    cert_path, key_path = ensure_certificate(str(tmp_path))
    assert (cert_path, key_path) == (str(tmp_path / "tls-cert.pem"), str(tmp_path / "tls-key.pem"))
    cert = x509.load_pem_x509_certificate(read(cert_path))
    assert cert.issuer == cert.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime >= datetime.timedelta(days=3650)
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def test_certificate_files_are_private_whatever_the_umask(tmp_path):
    """Made in a separate process with umask 0: the modes come from os.open, not umask."""
    script = (
        "import os, sys; os.umask(0); from leapmail.tls import ensure_certificate;"
        "ensure_certificate(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    assert mode(tmp_path / "tls-key.pem") == 0o600
    assert mode(tmp_path / "tls-cert.pem") == 0o600
    assert sorted(os.listdir(tmp_path)) == ["tls-cert.pem", "tls-key.pem"]


def test_certificate_is_reused_and_remade_only_when_missing(tmp_path):
    script = "import sys; from leapmail.tls import ensure_certificate; ensure_certificate(sys.argv[1])"
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    first = read(tmp_path / "tls-cert.pem"), read(tmp_path / "tls-key.pem")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    assert (read(tmp_path / "tls-cert.pem"), read(tmp_path / "tls-key.pem")) == first
    # A key without its certificate (a crash between the two writes): a fresh pair.
    os.unlink(tmp_path / "tls-cert.pem")
    ensure_certificate(str(tmp_path))
    assert read(tmp_path / "tls-key.pem") != first[1]
    assert mode(tmp_path / "tls-key.pem") == 0o600


def test_a_mismatched_pair_is_refused_not_replaced(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ensure_certificate(str(a))
    ensure_certificate(str(b))
    os.replace(b / "tls-key.pem", a / "tls-key.pem")
    before = read(a / "tls-cert.pem"), read(a / "tls-key.pem")
    from leapmail.tls import TLSError

    with pytest.raises(TLSError) as err:
        ensure_certificate(str(a))
    assert str(err.value) == (
        f"{a}/tls-key.pem is not the key of {a}/tls-cert.pem; remove both files to have "
        "a new self-signed certificate made at the next start"
    )
    assert (read(a / "tls-cert.pem"), read(a / "tls-key.pem")) == before


class _StartTLSLines(LineReceiver):
    """A minimal STARTTLS protocol: 'STARTTLS' upgrades, anything else is echoed."""

    def lineReceived(self, line):
        if line == b"STARTTLS":
            self.sendLine(b"OK begin TLS")
            self.transport.startTLS(self.factory.tls)
        else:
            self.sendLine(b"echo " + line)


def _client_starttls(port, cafile, server_hostname):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(b"STARTTLS\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += raw.recv(1)  # a byte at a time: nothing of the handshake is consumed
        assert reply == b"OK begin TLS\r\n"
        context = ssl.create_default_context(cafile=cafile)
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.sendall(b"ping\r\n")
            answer = b""
            while not answer.endswith(b"\r\n"):
                answer += tls.recv(100)
            return answer, tls.version(), tls.getpeercert(binary_form=True)


@pytest_twisted.ensureDeferred
async def test_context_factory_serves_starttls(tmp_path):
    from twisted.internet import reactor

    factory = protocol.ServerFactory.forProtocol(_StartTLSLines)
    factory.tls = context_factory(str(tmp_path))
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        cafile = str(tmp_path / "tls-cert.pem")
        expected = ssl.PEM_cert_to_DER_cert(read(cafile).decode())
        for name in ("localhost", "127.0.0.1"):
            # Full verification, hostname included, against the certificate as the CA.
            answer, version, peer = await threads.deferToThread(
                _client_starttls, listening.getHost().port, cafile, name)
            assert answer == b"echo ping\r\n"
            assert version in ("TLSv1.2", "TLSv1.3")
            assert peer == expected
    finally:
        await listening.stopListening()
