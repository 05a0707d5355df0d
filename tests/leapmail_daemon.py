"""The leapmail daemon as a real process on a loopback port, for IMAP tests and benchmarks.

:class:`LeapmailDaemon` creates the account (``leapmail init``) if the home is new,
asks ``leapmail credentials`` for the IMAP login, and runs
``twistd -n --pidfile= leapmail --home DIR --imap-port 0``: the kernel picks the port,
so parallel runs never collide, and the daemon's log line
``IMAP listening on 127.0.0.1:PORT`` says which one it got.  Its output goes to
``daemon.log`` beside the home.

The daemon runs in its own session so that :meth:`LeapmailDaemon.stop` can end
whatever it might start; ``pid`` is the serving process (twistd -n does not fork),
for reading its memory (:func:`dovecot_server.vm_hwm`).
"""

import imaplib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The project's virtualenv, where 'make' installs the commands; else the running one's.
BIN = (os.path.join(ROOT, ".venv", "bin") if os.path.isdir(os.path.join(ROOT, ".venv", "bin"))
       else os.path.dirname(sys.executable))
LISTENING = re.compile(rb"IMAP listening on ([0-9.]+):([0-9]+)")
SMTP_LISTENING = re.compile(rb"SMTP listening on ([0-9.]+):([0-9]+)")


class DaemonError(Exception):
    """The daemon or one of the leapmail commands failed; the message has its output."""


class TwistdProcess:
    """A ``twistd -n`` service in its own session, its output in ``log_path``.

    :meth:`run` waits for the line matching ``listening`` (a regex with the host and
    port as groups) and sets ``host`` and ``port`` from it.
    """

    listening = LISTENING
    #: More ports to learn before run() returns: ``{attribute: regex}``, the port
    #: (group 2) of each line goes into the attribute.
    also_listening = {}

    def __init__(self, log_path):
        self.log_path = log_path
        self.host = None
        self.port = None
        self.process = None
        self._lines = None
        self._reader = None

    @property
    def pid(self):
        return None if self.process is None else self.process.pid

    def _env(self):
        return dict(os.environ)

    def run(self, argv, timeout=120):
        self._lines = queue.Queue()
        self.process = subprocess.Popen(argv, env=self._env(), cwd=ROOT,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        try:
            self._wait_listening(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise

    def _pump(self):
        # Drains the pipe for the process's whole life (a full pipe would block it) and
        # hands the lines to run(), which waits on the queue with a deadline.
        with open(self.log_path, "ab") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                self._lines.put(line)
        self._lines.put(None)

    def _wait_listening(self, deadline):
        missing = dict(self.also_listening)
        found = False
        while not found or missing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DaemonError(f"no 'listening' line in time:\n{self.log_text()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.process.wait()
                raise DaemonError(f"{os.path.basename(self.log_path)}: the process exited "
                                  f"({self.process.returncode}) before listening:\n"
                                  f"{self.log_text()}")
            match = self.listening.search(line)
            if match:
                self.host = match.group(1).decode()
                self.port = int(match.group(2))
                found = True
            for name, pattern in list(missing.items()):
                match = pattern.search(line)
                if match:
                    setattr(self, name, int(match.group(2)))
                    del missing[name]

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def kill(self):
        """SIGKILL, as a crash: nothing gets to clean up."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.stop()

    def stop(self, timeout=60):
        if self.process is None:
            return
        sid = self.process.pid
        if self.process.poll() is None:
            # SIGTERM: twistd stops its services, so stores are closed cleanly.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            os.killpg(sid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._reader is not None:
            self._reader.join(timeout)
            self._reader = None
        self.process.stdout.close()
        self.process = None


class LeapmailDaemon(TwistdProcess):
    also_listening = {"smtp_port": SMTP_LISTENING}

    def __init__(self, home, passphrase="leapmail-bench", address="bench@localhost",
                 extra_args=(), init_args=()):
        self.home = os.path.abspath(home)
        super().__init__(self.home.rstrip("/") + "-daemon.log")
        self.passphrase = passphrase
        self.address = address
        self.extra_args = list(extra_args)
        self.init_args = list(init_args)
        self.user = None
        self.password = None
        self.smtp_port = None

    def _env(self):
        env = dict(os.environ)
        env["LEAPMAIL_PASSPHRASE"] = self.passphrase
        return env

    def _leapmail(self, *args, timeout=120):
        result = subprocess.run([os.path.join(BIN, "leapmail"), *args], env=self._env(),
                                stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        if result.returncode != 0:
            raise DaemonError(f"leapmail {' '.join(args)} failed ({result.returncode}):\n"
                              f"{result.stdout.decode()}{result.stderr.decode()}")
        return result.stdout.decode()

    def init(self):
        """Create the account unless the home already holds one."""
        if not os.path.exists(os.path.join(self.home, "secrets.json")):
            self._leapmail("init", "--home", self.home, "--address", self.address,
                           *self.init_args)

    def _read_credentials(self):
        out = self._leapmail("--home", self.home, "credentials")
        found = dict(re.findall(r"^(username|password):\s*(\S+)\s*$", out, re.M))
        if set(found) != {"username", "password"}:
            raise DaemonError(f"no username/password in 'leapmail credentials' output:\n{out}")
        self.user, self.password = found["username"], found["password"]

    def start(self, timeout=120):
        self.init()
        self._read_credentials()
        self.run([os.path.join(BIN, "twistd"), "-n", "--pidfile=", "leapmail",
                  "--home", self.home, "--imap-port", "0", "--smtp-port", "0",
                  *self.extra_args], timeout)
        return self

    def imap(self):
        """A logged-in imaplib client of the daemon."""
        client = imaplib.IMAP4(self.host, self.port)
        # imaplib sends a literal and its closing CRLF in two writes; with Nagle's
        # algorithm the second waits for a delayed ACK, 40 ms an APPEND.
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.login(self.user, self.password)
        return client

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
