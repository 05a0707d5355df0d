"""The daemon's plumbing: its options, its TLS certificate, its listeners."""

import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import protocol, threads
from twisted.protocols.basic import LineReceiver
from twisted.python import usage

from leapmail.service import Options
from leapmail.tls import context_factory, ensure_certificate

BIN = os.path.dirname(sys.executable)
PASS = "a passphrase for tests"


def env(passphrase=PASS):
    e = {k: v for k, v in os.environ.items() if not k.startswith("LEAPMAIL_")}
    e["LEAPMAIL_PASSPHRASE"] = passphrase
    return e


@pytest.fixture
def home(tmp_path):
    path = str(tmp_path / "acct")
    subprocess.run(
        [os.path.join(BIN, "leapmail"), "init", "--home", path, "--address", "me@example.org"],
        check=True, capture_output=True, env=env(), stdin=subprocess.DEVNULL, timeout=120,
    )
    return path


def twistd(*args):
    return subprocess.Popen(
        [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "--logfile=-", "leapmail", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env(),
    )


def wait_for(daemon, text):
    """Read the daemon's log (stdout) until a line containing ``text``; return that line."""
    for line in daemon.stdout:
        if text in line:
            return line.decode()
    daemon.wait(timeout=60)
    pytest.fail(f"daemon exited ({daemon.returncode}) before logging {text!r}: "
                f"{daemon.stderr.read().decode()}")


def stop(daemon):
    daemon.send_signal(signal.SIGTERM)
    out, err = daemon.communicate(timeout=60)
    assert daemon.returncode == -signal.SIGTERM, (out, err)
    assert b"Traceback" not in out + err
    return out


# -- options -------------------------------------------------------------------------


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


def test_defaults_listen_on_loopback_only():
    options = parse("--home", "/x")
    assert options["listen"] == "127.0.0.1"
    assert options["imap-port"] == 1984
    assert options["smtp-port"] == 2013


def test_ports_and_address_are_taken_as_given():
    options = parse("--home", "/x", "--imap-port", "0", "--smtp-port", "65535", "--listen", "::1")
    assert (options["imap-port"], options["smtp-port"], options["listen"]) == (0, 65535, "::1")
    assert parse("--listen", "0:0::0:1")["listen"] == "::1"


@pytest.mark.parametrize("value", ["-1", "65536", "99999999", "abc", "", " 1984", "+1984",
                                   "1_984", "19.84", "\u0661\u0669\u0668\u0664"])
@pytest.mark.parametrize("name", ["imap-port", "smtp-port"])
def test_bad_ports_are_usage_errors(name, value):
    with pytest.raises(usage.UsageError) as err:
        parse(f"--{name}", value)
    assert str(err.value) == f"--{name} must be a port number from 0 to 65535, not {value!r}"


@pytest.mark.parametrize("value", ["localhost", "", "127.0.0.256", "1.2.3.4:5"])
def test_bad_listen_addresses_are_usage_errors(value):
    with pytest.raises(usage.UsageError) as err:
        parse("--listen", value)
    assert str(err.value) == (
        f"--listen must be an IP address such as 127.0.0.1 or ::1, not {value!r}"
    )


def test_twistd_reports_a_bad_port_and_exits_1(home):
    result = subprocess.run(
        [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "leapmail", "--home", home,
         "--imap-port", "70000"],
        capture_output=True, env=env(), stdin=subprocess.DEVNULL, timeout=60,
    )
    assert result.returncode == 1
    assert b"Traceback" not in result.stdout + result.stderr
    # twistd's way with usage errors: the plugin's usage, then the error as the last line.
    assert result.stdout.decode().splitlines()[-1].endswith(
        ": --imap-port must be a port number from 0 to 65535, not '70000'"
    )
    assert b"--smtp-port" in result.stdout


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


# -- the daemon ------------------------------------------------------------------------


def test_daemon_makes_its_certificate_once(home):
    daemon = twistd("--home", home, "--imap-port", "0", "--smtp-port", "0")
    try:
        wait_for(daemon, b"IMAP listening on ")
    finally:
        stop(daemon)
    cert, key = os.path.join(home, "tls-cert.pem"), os.path.join(home, "tls-key.pem")
    assert mode(cert) == mode(key) == 0o600
    first = read(cert), read(key)
    daemon = twistd("--home", home, "--imap-port", "0", "--smtp-port", "0")
    try:
        wait_for(daemon, b"IMAP listening on ")
    finally:
        stop(daemon)
    assert (read(cert), read(key)) == first


def test_daemon_refuses_a_damaged_certificate_in_one_line(home):
    ensure_certificate(home)
    with open(os.path.join(home, "tls-cert.pem"), "wb") as f:
        f.write(b"not a certificate\n")
    daemon = twistd("--home", home, "--imap-port", "0", "--smtp-port", "0")
    out, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 1
    assert b"Traceback" not in out + err
    assert err.decode() == (
        f"leapmail: {home}/tls-cert.pem is not a PEM certificate; remove both files to have "
        "a new self-signed certificate made at the next start\n"
    )


def listening_port(daemon):
    line = wait_for(daemon, b"IMAP listening on ")
    address = line.split("IMAP listening on ", 1)[1].strip()
    host, port = address.rsplit(":", 1)
    return host, int(port)


def credentials(home):
    result = subprocess.run(
        [os.path.join(BIN, "leapmail"), "--home", home, "credentials"],
        check=True, capture_output=True, env=env(), stdin=subprocess.DEVNULL, timeout=120,
    )
    lines = result.stdout.decode().splitlines()
    return lines[0].removeprefix("username: "), lines[1].removeprefix("password: ")


def test_daemon_logs_the_port_it_got_on_loopback(home):
    daemon = twistd("--home", home, "--imap-port", "0", "--smtp-port", "0")
    try:
        host, port = listening_port(daemon)
        assert host == "127.0.0.1"
        assert 0 < port < 65536
        with socket.create_connection((host, port), timeout=30) as s:
            assert s.recv(4096).startswith(b"* OK")
    finally:
        stop(daemon)


def test_a_port_in_use_is_one_line_and_exit_1(home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = twistd("--home", home, "--imap-port", str(port), "--smtp-port", "0")
        out, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 1
    assert err.decode() == f"leapmail: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert b"Traceback" not in out + err
    # The store was not left locked: the account opens at once.
    check = subprocess.run([os.path.join(BIN, "leapmail"), "--home", home, "check"],
                           capture_output=True, env=env(), stdin=subprocess.DEVNULL, timeout=120)
    assert check.returncode == 0, check.stderr


def test_imap_login_with_the_credentials_over_starttls(home):
    import imaplib

    username, password = credentials(home)
    daemon = twistd("--home", home, "--imap-port", "0", "--smtp-port", "0")
    try:
        host, port = listening_port(daemon)
        context = ssl.create_default_context(cafile=os.path.join(home, "tls-cert.pem"))
        client = imaplib.IMAP4(host, port)
        try:
            client.starttls(ssl_context=context)
            assert client.login(username, password)[0] == "OK"
        finally:
            client.logout()
        client = imaplib.IMAP4(host, port)
        try:
            with pytest.raises(imaplib.IMAP4.error):
                client.login(username, password + "x")
        finally:
            client.shutdown()
    finally:
        stop(daemon)


def test_stopping_closes_open_connections_first(home):
    daemon = twistd("--home", home, "--imap-port", "0", "--smtp-port", "0")
    try:
        host, port = listening_port(daemon)
        idle = socket.create_connection((host, port), timeout=30)
        assert idle.recv(4096).startswith(b"* OK")
    finally:
        out = stop(daemon)
    with idle:
        # The server says BYE (RFC 3501 7.1.5), then hangs up.
        rest = b""
        while True:
            data = idle.recv(4096)
            if not data:
                break
            rest += data
        assert rest == b"* BYE Server shutting down\r\n"
    assert b"Server Shut Down." in out
    assert not os.path.exists(os.path.join(home, "store.db-wal"))
