"""A real Dovecot daemon on a loopback TCP port, as the peer for IMAP benchmarks.

:mod:`dovecot` (the pipe-driven ``imap`` binary) is enough to compare bytes, but a
benchmark of a network server must go through the same path a mail client does: a
TCP connection, ``imap-login``, LOGIN against the auth process, then one ``imap``
process per connection.  :class:`DovecotServer` runs the whole daemon (``dovecot -F``)
with a throw-away config under a directory of the caller's: its own ``base_dir``,
a log file, no TLS, one static user and password, a Maildir per user, Dovecot's
defaults for everything that affects speed (fsync, indexes, IDLE notification).

The master runs in its own session, and every process it starts stays in it; that
is how :meth:`DovecotServer.stop` finds and ends all of them, strays included, and
how :func:`dovecot_peak_rss` finds the ``imap`` processes serving the connections.

Dovecot refuses to touch mail as root.  When we are root the mail processes run as
``nobody`` and the login processes as Dovecot's own ``dovenull``/``dovecot`` users (the
Debian package creates them).  The Maildir must then be reachable by ``nobody``: if the
given directory is not (pytest's tmp dirs are 0700 root), the mail goes into a
directory of its own under the system temp dir, removed by :meth:`stop`.
"""

import errno
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from dovecot import DovecotUnavailable, ensure_dovecot

DOVECOT_BINARY = "/usr/sbin/dovecot"


def _free_port(host):
    # The port is free now, not necessarily when Dovecot binds it; start() retries
    # on EADDRINUSE, which closes that window in practice.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _user_names():
    """(mail user, login user, internal user) as (name, uid, gid) triples."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        ours = (me.pw_name, me.pw_uid, me.pw_gid)
        return ours, ours, ours

    def lookup(name, fallback):
        try:
            pw = pwd.getpwnam(name)
            return pw.pw_name, pw.pw_uid, pw.pw_gid
        except KeyError:
            return fallback

    nobody = lookup("nobody", ("nobody", 65534, 65534))
    return nobody, lookup("dovenull", nobody), lookup("dovecot", nobody)


def _reachable_by_others(path):
    """Whether a user other than the owner can traverse to ``path``."""
    path = os.path.abspath(path)
    while True:
        try:
            if not os.stat(path).st_mode & 0o001:
                return False
        except FileNotFoundError:
            pass    # created later, by us, with the mode we choose
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def _reachable_temp_parent():
    for candidate in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):
        if _reachable_by_others(candidate) and os.access(candidate, os.W_OK):
            return candidate
    raise DovecotUnavailable("no temp directory that user nobody can reach")


def _proc_stat(pid):
    """(comm, session id) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm is in parentheses and may itself hold spaces or parentheses.
    close = data.rindex(b")")
    comm = data[data.index(b"(") + 1:close].decode("utf-8", "replace")
    fields = data[close + 2:].split()
    return comm, int(fields[3])     # state ppid pgrp session ...


def session_pids(sid):
    """``[(pid, comm)]`` of the processes in session ``sid``."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _proc_stat(int(name))
            if stat is not None and stat[1] == sid:
                pids.append((int(name), stat[0]))
    return pids


def _status_bytes(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def vm_hwm(pid):
    """Peak resident set size (``VmHWM``) of a process, in bytes; None if it is gone."""
    return _status_bytes(pid, "VmHWM")


def vm_rss(pid):
    """Resident set size now (``VmRSS``), in bytes; None if the process is gone."""
    return _status_bytes(pid, "VmRSS")


def reset_peak(pid):
    """Start ``VmHWM`` again from the current RSS (Linux >= 4.0, ``clear_refs``).

    A daemon's start-up can have a peak of its own (leapmail's scrypt unlock takes
    64 MiB for an instant) that says nothing about what serving mail costs.
    """
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


class DovecotServer:
    """A Dovecot daemon serving one static user over plaintext IMAP on loopback.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.  ``host``,
    ``port``, ``user`` and ``password`` are what a client needs; ``port`` is known
    after :meth:`start`.  ``directory`` holds the config (``dovecot.conf``), the log
    (``dovecot.log``), the runtime directory and, where reachable, the Maildir.
    """

    host = "127.0.0.1"

    def __init__(self, directory, user="bench", password="bench-secret"):
        self.directory = os.path.abspath(directory)
        self.user = user
        self.password = password
        self.port = None
        self.config = os.path.join(self.directory, "dovecot.conf")
        self.log = os.path.join(self.directory, "dovecot.log")
        self.base_dir = os.path.join(self.directory, "run")
        self.process = None
        self._mail_root = None
        self._own_mail_root = False
        self._output = None

    # -- set-up ----------------------------------------------------------------------

    def _config_text(self, mail, login, internal):
        lines = [
            f"base_dir = {self.base_dir}",
            f"state_dir = {os.path.join(self.directory, 'state')}",
            f"log_path = {self.log}",
            f"info_log_path = {self.log}",
            "protocols = imap",
            # listen applies to every inet listener; imap-login's is the only one left.
            f"listen = {self.host}",
            "ssl = no",
            "disable_plaintext_auth = no",
            "auth_mechanisms = plain login",
            # Statistics are a process of their own, fed by every imap process.
            "stats_writer_socket_path =",
            f"default_login_user = {login[0]}",
            f"default_internal_user = {internal[0]}",
            f"default_internal_group = {grp.getgrgid(internal[2]).gr_name}",
            "first_valid_uid = 1",
            "first_valid_gid = 1",
            "mail_location = maildir:~/Maildir",
            "passdb {",
            "  driver = static",
            f"  args = password={self.password}",
            "}",
            "userdb {",
            "  driver = static",
            f"  args = uid={mail[1]} gid={mail[2]} home={self._mail_root}/%u",
            "}",
            "service imap-login {",
            "  inet_listener imap {",
            f"    port = {self.port}",
            "  }",
            "  inet_listener imaps {",
            "    port = 0",
            "  }",
            "}",
        ]
        if os.geteuid() != 0:
            # chroot needs root; without these the master refuses to start.
            lines += ["service imap-login {", "  chroot =", "}",
                      "service anvil {", "  chroot =", "}"]
        return "\n".join(lines) + "\n"

    def _prepare(self):
        os.makedirs(self.directory, exist_ok=True)
        mail, login, internal = _user_names()
        if self._mail_root is None:
            if os.geteuid() != 0 or _reachable_by_others(self.directory):
                self._mail_root = os.path.join(self.directory, "mail")
                os.makedirs(self._mail_root, exist_ok=True)
                self._own_mail_root = False
            else:
                self._mail_root = tempfile.mkdtemp(prefix="leapmail-dovecot-server-",
                                                   dir=_reachable_temp_parent())
                self._own_mail_root = True
            if os.geteuid() == 0:
                os.chmod(self._mail_root, 0o755)
                os.chown(self._mail_root, mail[1], mail[2])
        with open(self.config, "w") as f:
            f.write(self._config_text(mail, login, internal))

    # -- life cycle ------------------------------------------------------------------

    def start(self, timeout=30):
        ensure_dovecot()
        if not os.access(DOVECOT_BINARY, os.X_OK):
            raise DovecotUnavailable(f"{DOVECOT_BINARY} missing (package dovecot-core)")
        last_error = None
        for _ in range(5):
            self.port = _free_port(self.host)
            self._prepare()
            open(self.log, "ab").close()
            log_size = os.path.getsize(self.log)
            self._output = open(os.path.join(self.directory, "master-output.log"), "ab")
            # Its own session: the handle on every process the master forks.
            self.process = subprocess.Popen(
                [DOVECOT_BINARY, "-F", "-c", self.config], stdin=subprocess.DEVNULL,
                stdout=self._output, stderr=subprocess.STDOUT, start_new_session=True,
                close_fds=True)
            try:
                self._wait_for_port(time.monotonic() + timeout)
                return self
            except _PortInUse as e:
                last_error = e
                self._kill_all()
                with open(self.log, "ab") as f:
                    f.truncate(log_size)
            except BaseException:
                self.stop()
                raise
        self.stop()
        raise RuntimeError(f"Dovecot could not bind a free port: {last_error}")

    def _wait_for_port(self, deadline):
        while True:
            if self.process.poll() is not None:
                text = self.log_text() + self._output_text()
                if "Address already in use" in text:
                    raise _PortInUse(text)
                raise RuntimeError(f"dovecot exited with {self.process.returncode}:\n{text}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError as e:
                if e.errno not in (errno.ECONNREFUSED, errno.ETIMEDOUT, None):
                    raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"dovecot did not listen on {self.host}:{self.port} in "
                                   f"time:\n{self.log_text()}{self._output_text()}")
            # Polling for the listener; the master offers no readiness notification.
            time.sleep(0.02)

    @property
    def maildir(self):
        """The user's Maildir (its home is the static userdb's ``home``)."""
        return os.path.join(self._mail_root, self.user, "Maildir")

    def deliver(self, messages, folder=None):
        """Write ``(raw, flags, internal_date)`` triples straight into the Maildir.

        Much faster than APPEND for filling a big mailbox.  Dovecot reads the files at
        the next SELECT; UIDs follow the order given.  Only the system flags that
        Maildir file names carry (\\Seen, \\Flagged, \\Answered, \\Deleted, \\Draft)
        are kept.  ``folder`` is a Maildir++ folder ("Archive.2019": mailbox
        Archive/2019 in Dovecot's "." hierarchy), default INBOX.  Call :meth:`start`
        (or only the set-up it does) first.
        """
        letters = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S",
                   "\\Deleted": "T"}
        mail = _user_names()[0]
        home = os.path.dirname(self.maildir)
        maildir = self.maildir if folder is None else os.path.join(self.maildir, "." + folder)
        for path in (home, self.maildir, maildir, *(os.path.join(maildir, d)
                                                    for d in ("cur", "new", "tmp"))):
            os.makedirs(path, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(path, mail[1], mail[2])
        count = 0
        for raw, flags, date in messages:
            count += 1
            info = "".join(sorted(letters[f] for f in flags if f in letters))
            # One time stamp and a growing M field: Dovecot orders new files by both,
            # so UIDs follow delivery order.
            virtual = len(raw) + raw.count(b"\n") - raw.count(b"\r\n")    # CRLF size
            name = (f"1700000000.M{count}P{os.getpid()}.bench,S={len(raw)},W={virtual}"
                    f":2,{info}")
            tmp = os.path.join(maildir, "tmp", name)
            with open(tmp, "wb") as f:
                f.write(raw)
            os.utime(tmp, (date, date))     # the Maildir INTERNALDATE
            if os.geteuid() == 0:
                os.chown(tmp, mail[1], mail[2])
            os.rename(tmp, os.path.join(maildir, "cur", name))
        return count

    def pids(self):
        """``[(pid, comm)]`` of the master and every process it started."""
        if self.process is None:
            return []
        return session_pids(self.process.pid)

    def imap_pids(self):
        """The ``imap`` processes: one per logged-in connection."""
        return [pid for pid, comm in self.pids() if comm == "imap"]

    def _kill_all(self, timeout=20):
        if self.process is None:
            return
        sid = self.process.pid
        if self.process.poll() is None:
            # Every process at once, not the master alone: it would wait for its
            # children.  Login processes keep no state and one caught between a
            # connection and the auth handshake ignores SIGTERM (the master would wait
            # seconds for it), so they get SIGKILL.
            for pid, comm in session_pids(sid):
                try:
                    os.kill(pid, signal.SIGKILL if comm.endswith("-login") else signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        deadline = time.monotonic() + timeout
        while True:
            left = session_pids(sid)
            if not left:
                break
            for pid, _comm in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Dovecot processes left after stop: {left}")
            # Orphans are reaped by init, not by us: poll until they are gone.
            time.sleep(0.01)
        self.process = None
        if self._output is not None:
            self._output.close()
            self._output = None

    def stop(self):
        """Stop the daemon and everything it started; remove a temp Maildir of ours."""
        self._kill_all()
        if self._own_mail_root and self._mail_root:
            shutil.rmtree(self._mail_root, ignore_errors=True)
            self._mail_root = None
            self._own_mail_root = False

    def log_text(self):
        try:
            with open(self.log, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _output_text(self):
        try:
            with open(os.path.join(self.directory, "master-output.log"), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class _PortInUse(Exception):
    pass


def dovecot_peak_rss(server, combine=sum):
    """Peak RSS in bytes of the ``imap`` processes serving ``server``'s connections now.

    Dovecot serves each connection with its own process and drops it at LOGOUT, so
    call this while the connections are still open.  ``combine`` is ``sum`` (what the
    connections cost together, comparable with a single-process server) or ``max``.
    """
    sizes = [s for s in map(vm_hwm, server.imap_pids()) if s is not None]
    return combine(sizes) if sizes else 0


def dovecot_rss(server, combine=sum):
    """Like :func:`dovecot_peak_rss`, for the RSS now (``VmRSS``)."""
    sizes = [s for s in map(vm_rss, server.imap_pids()) if s is not None]
    return combine(sizes) if sizes else 0
