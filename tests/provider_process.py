"""The provider as a real process (``twistd -n leapmail-provider``) on a loopback port.

``adduser`` runs ``leapmail-provider adduser`` and returns the enrollment code (the
last line of its output).  ``database`` is a PostgreSQL URL, or ``None`` for the
default SQLite file in the home.  The port stays the same across restarts, so the
devices configured with its URL find it again.
"""

import os
import re
import subprocess

from leapmail_daemon import BIN, ROOT, DaemonError, TwistdProcess

PROVIDER_LISTENING = re.compile(rb"Provider listening on ([0-9.]+):([0-9]+)")
SUBMISSION_LISTENING = re.compile(rb"submission listening on ([0-9.]+):([0-9]+)")
#: Logged before the line above when the provider runs an MX (``--mx-port``).
MX_LISTENING = re.compile(r"MX listening on [0-9.]+:([0-9]+)")


class ProviderProcess(TwistdProcess):
    listening = PROVIDER_LISTENING

    def __init__(self, home, database=None, extra_args=(), submission=False):
        self.home = os.path.abspath(home)
        super().__init__(self.home.rstrip("/") + "-provider.log")
        self.database = database
        self.extra_args = list(extra_args)
        self._port_arg = "0"
        #: ``submission=True`` serves SMTP submission too, on ``submission_port``.
        self.submission = submission
        self.submission_port = None
        if submission:
            self.also_listening = {"submission_port": SUBMISSION_LISTENING}
        self.mx_port = None

    def _db_args(self):
        return ["--database", self.database] if self.database else []

    def adduser(self, address):
        result = subprocess.run(
            [os.path.join(BIN, "leapmail-provider"), "--home", self.home, *self._db_args(),
             "adduser", address],
            cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
        if result.returncode != 0:
            raise DaemonError(f"adduser failed: {result.stderr.decode()}")
        return result.stdout.decode().strip().splitlines()[-1]

    def start(self, timeout=120):
        self.run([os.path.join(BIN, "twistd"), "-n", "--pidfile=", "leapmail-provider",
                  "--home", self.home, "--port", self._port_arg, *self._db_args(),
                  *self._submission_args(), *self.extra_args], timeout)
        self._port_arg = str(self.port)
        found = MX_LISTENING.findall(self.log_text())
        self.mx_port = int(found[-1]) if found and "--mx-port" in self.extra_args else None
        return self

    def _submission_args(self):
        if not self.submission:
            return []
        return ["--submission-port", str(self.submission_port or 0)]

    @property
    def url(self):
        return f"https://{self.host}:{self.port}"

    @property
    def ca_path(self):
        return os.path.join(self.home, "tls-cert.pem")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
