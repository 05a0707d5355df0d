"""A real Dovecot for differential tests, with no daemon, no port and no root.

Dovecot's ``imap`` binary runs *standalone* when started from a shell: it reads the
config file given with ``-c``, logs in the user named by ``$USER`` without any
authentication and speaks IMAP on stdin/stdout, starting with ``* PREAUTH``.  Every
connection made here is such a process, fed by ``imaplib`` over a pipe, on a Maildir
in a throw-away directory with a throw-away config file (no system config, no
network, in-memory indexes).

Messages are delivered byte-exactly by writing files straight into ``Maildir/cur``
with names that make Dovecot assign UIDs in delivery order.

Dovecot refuses to touch mail as root.  When the tests run as root (as CI does),
the mail processes drop to ``nobody`` (``mail_uid``), so the Maildir lives in its own
directory under the system temp dir (pytest's tmp dirs are 0700 root) and is handed
to that user.

Use the ``dovecot`` fixture (a factory: ``conn = dovecot(messages)``) or, for a
module-scoped mailbox, :class:`DovecotMaildir` directly.  :func:`command` sends one
command and returns the raw untagged responses with literals inline, and
:func:`parse_response` turns IMAP syntax into Python values, so that tests can
compare exact bytes instead of ``imaplib``'s split-up results.
"""

import imaplib
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile

import pytest

IMAP_BINARY = "/usr/lib/dovecot/imap"
DEBIAN_PACKAGE = "dovecot-imapd"
HERE = os.path.dirname(os.path.abspath(__file__))
ENSURE_DEBS = os.path.join(os.path.dirname(HERE), "tools", "ensure-debian-packages")


class DovecotUnavailable(Exception):
    """Dovecot's imap binary is not installed and could not be installed."""


_checked = None


def ensure_dovecot():
    """Make sure Dovecot's imap binary exists, installing the Debian package if needed.

    Returns the binary's path or raises :class:`DovecotUnavailable`.
    """
    global _checked
    if _checked is not None:
        if isinstance(_checked, Exception):
            raise _checked
        return _checked
    if not os.access(IMAP_BINARY, os.X_OK):
        try:
            subprocess.run([ENSURE_DEBS, DEBIAN_PACKAGE], check=True,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=900)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            _checked = DovecotUnavailable(
                f"{IMAP_BINARY} missing and installing {DEBIAN_PACKAGE} failed: {e} "
                f"{detail.decode('utf-8', 'replace')}")
            raise _checked from e
        if not os.access(IMAP_BINARY, os.X_OK):
            _checked = DovecotUnavailable(f"{IMAP_BINARY} missing after installing")
            raise _checked
    _checked = IMAP_BINARY
    return _checked


def require_dovecot():
    """:func:`ensure_dovecot` for tests: a missing Dovecot fails the test, never skips it
    (``make test`` installs it)."""
    try:
        return ensure_dovecot()
    except DovecotUnavailable as e:
        pytest.fail(str(e))


def dovecot_version():
    """The version string of the installed Dovecot, e.g. ``2.3.19.1 (9b53102964)``."""
    exe = shutil.which("dovecot") or "/usr/sbin/dovecot"
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, timeout=30)
        return out.stdout.decode().strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _mail_user():
    """(uid, gid) the mail processes run as: ourselves, or ``nobody`` when root."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


def _temp_parent(user):
    """A temp directory the mail user can reach: every ancestor searchable by others
    when the mail processes run as ``nobody``."""
    if user is None:
        return None
    for candidate in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):
        path = os.path.abspath(candidate)
        parts = [path]
        while os.path.dirname(parts[-1]) != parts[-1]:
            parts.append(os.path.dirname(parts[-1]))
        try:
            if all(os.stat(p).st_mode & 0o001 for p in parts) and os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    raise DovecotUnavailable("no temp directory that user nobody can reach")


def _virtual_size(data):
    """Size with every bare LF counted as CRLF: Maildir's ``W=`` field."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


class _DovecotStream(imaplib.IMAP4_stream):
    """IMAP4_stream that runs an argument vector with a clean environment and
    sends the process's stderr (Dovecot's log) to a file."""

    def __init__(self, argv, env, log_path):
        self._argv = argv
        self._env = env
        self._log_path = log_path
        super().__init__(" ".join(shlex.quote(a) for a in argv))

    def open(self, host=None, port=None, timeout=None):
        self.host = None
        self.port = None
        self.sock = None
        self.file = None
        with open(self._log_path, "ab") as log:
            self.process = subprocess.Popen(
                self._argv, bufsize=imaplib.DEFAULT_BUFFER_SIZE, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, env=self._env, close_fds=True)
        self.writefile = self.process.stdin
        self.readfile = self.process.stdout

    def shutdown(self):
        try:
            self.writefile.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.readfile.close()


class DovecotMaildir:
    """One throw-away Maildir with a Dovecot config around it.

    ``deliver(messages)`` writes messages (bytes, exactly as given) into the INBOX;
    ``connect()`` starts a preauthenticated imap process and returns an ``imaplib``
    connection with INBOX selected.  ``close()`` ends every connection and removes
    the directory.
    """

    def __init__(self):
        self.binary = ensure_dovecot()
        self.user = _mail_user()
        self.root = tempfile.mkdtemp(prefix="leapmail-dovecot-", dir=_temp_parent(self.user))
        self.maildir = os.path.join(self.root, "Maildir")
        self.config = os.path.join(self.root, "dovecot.conf")
        self.log = os.path.join(self.root, "dovecot.log")
        self._count = 0
        self._connections = []
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(self.maildir, sub))
        run = os.path.join(self.root, "run")
        os.makedirs(run)
        lines = [
            f"base_dir = {run}",
            f"state_dir = {run}",
            "ssl = no",
            "protocols = imap",
            "listen =",
            "stats_writer_socket_path =",
            "first_valid_uid = 1",
            "first_valid_gid = 1",
            "mail_fsync = never",
            f"mail_location = maildir:{self.maildir}:INDEX=MEMORY",
        ]
        if self.user is not None:
            lines += [f"mail_uid = {self.user[0]}", f"mail_gid = {self.user[1]}"]
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        open(self.log, "wb").close()
        self._hand_over()

    def _hand_over(self):
        if self.user is None:
            return
        uid, gid = self.user
        for dirpath, _dirnames, filenames in os.walk(self.root):
            os.chown(dirpath, uid, gid)
            for name in filenames:
                os.chown(os.path.join(dirpath, name), uid, gid)

    def deliver(self, messages):
        """Write each message (bytes) into Maildir/cur; UIDs follow list order."""
        stamp = 1700000000
        names = []
        for data in messages:
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError("messages must be bytes")
            self._count += 1
            # Dovecot sorts new files by the time stamp and then the M (microsecond)
            # field numerically, so one stamp and a growing M keeps delivery order.
            name = (f"{stamp}.M{self._count}P{os.getpid()}.leapmail,"
                    f"S={len(data)},W={_virtual_size(data)}:2,")
            tmp = os.path.join(self.maildir, "tmp", name)
            with open(tmp, "wb") as f:
                f.write(data)
            os.rename(tmp, os.path.join(self.maildir, "cur", name))
            names.append(name)
        self._hand_over()
        return names

    def connect(self, select="INBOX"):
        """A new preauthenticated connection, with ``select`` selected (None: none)."""
        env = {"USER": "leapmail", "HOME": self.root, "PATH": os.environ.get("PATH", "")}
        conn = _DovecotStream([self.binary, "-c", self.config], env, self.log)
        self._connections.append(conn)
        if conn.state != "AUTH":
            raise AssertionError(f"Dovecot did not preauthenticate: {conn.welcome!r}\n"
                                 f"{self.log_text()}")
        if select is not None:
            typ, data = conn.select(select)
            if typ != "OK":
                raise AssertionError(f"SELECT failed: {data!r}\n{self.log_text()}")
        return conn

    def log_text(self):
        with open(self.log, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def close(self):
        for conn in self._connections:
            try:
                if conn.state != "LOGOUT":
                    conn.logout()
            except Exception:
                try:
                    conn.shutdown()
                except Exception:
                    pass
        self._connections = []
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_mailbox(messages):
    """Deliver ``messages`` into a fresh Maildir; return ``(maildir, connection)``.

    The connection has INBOX selected.  Call ``maildir.close()`` when done.
    """
    box = DovecotMaildir()
    try:
        box.deliver(messages)
        return box, box.connect()
    except BaseException:
        box.close()
        raise


@pytest.fixture
def dovecot():
    """Factory fixture: ``conn = dovecot(messages)`` gives a connection selected on an
    INBOX holding exactly ``messages`` (sequence number i+1 is messages[i])."""
    require_dovecot()
    boxes = []

    def factory(messages):
        box, conn = open_mailbox(messages)
        boxes.append(box)
        return conn

    yield factory
    for box in boxes:
        box.close()


# --- raw protocol access ---------------------------------------------------------

def command(conn, text, timeout=None):
    """Send one command; return ``(tagged_status_line, [untagged responses])``.

    Each untagged response is its raw bytes, literals inline (``{n}\\r\\n`` kept),
    without the final CRLF.  ``text`` is bytes or str without tag or CRLF.
    """
    if isinstance(text, str):
        text = text.encode()
    tag = conn._new_tag()
    conn.send(tag + b" " + text + b"\r\n")
    responses = []
    current = b""
    while True:
        line = conn.readline()
        if not line:
            raise EOFError("Dovecot closed the connection")
        current += line
        stripped = line.rstrip(b"\r\n")
        if stripped.endswith(b"}"):
            brace = stripped.rfind(b"{")
            count = stripped[brace + 1:-1].rstrip(b"+")
            if brace >= 0 and count.isdigit():
                size = int(count)
                chunks = []
                while size > 0:
                    chunk = conn.read(size)
                    if not chunk:
                        raise EOFError("Dovecot closed the connection in a literal")
                    chunks.append(chunk)
                    size -= len(chunk)
                current += b"".join(chunks)
                continue
        if current.endswith(b"\r\n"):
            current = current[:-2]
        if current.startswith(tag + b" "):
            return current, responses
        responses.append(current)
        current = b""


def fetch(conn, sequence_set, items):
    """``FETCH``: a dict of sequence number -> raw response bytes after ``N FETCH ``.

    Raises if the command fails.
    """
    status, responses = command(conn, f"FETCH {sequence_set} {items}")
    if b" OK " not in status[:16]:
        raise AssertionError(f"FETCH failed: {status!r}")
    result = {}
    for resp in responses:
        parts = resp.split(b" ", 3)
        if len(parts) == 4 and parts[0] == b"*" and parts[2] == b"FETCH":
            result[int(parts[1])] = parts[3]
    return result


class Atom(bytes):
    """An IMAP atom (as opposed to a string) in :func:`parse_response` output."""

    def __repr__(self):
        return f"Atom({bytes(self)!r})"


def parse_response(data):
    """Parse IMAP data (one value or a space-separated sequence) into Python values.

    Lists become Python lists, NIL becomes None, numbers int, quoted strings and
    literals bytes, other atoms :class:`Atom`.  Returns a list of the top-level
    values.  Raises ValueError on malformed input.
    """
    values, pos = _parse_seq(data, 0, top=True)
    if pos != len(data):
        raise ValueError(f"trailing data at {pos}: {data[pos:pos + 40]!r}")
    return values


def _parse_seq(data, pos, top=False):
    out = []
    n = len(data)
    while pos < n:
        c = data[pos:pos + 1]
        if c == b" ":
            pos += 1
            continue
        if c == b")":
            if top:
                raise ValueError(f"unbalanced ) at {pos}")
            return out, pos + 1
        if c == b"(":
            value, pos = _parse_seq(data, pos + 1)
            out.append(value)
        elif c == b'"':
            pos += 1
            buf = bytearray()
            while True:
                if pos >= n:
                    raise ValueError("unterminated quoted string")
                ch = data[pos]
                if ch == 0x5C:
                    buf.append(data[pos + 1])
                    pos += 2
                elif ch == 0x22:
                    pos += 1
                    break
                else:
                    buf.append(ch)
                    pos += 1
            out.append(bytes(buf))
        elif c == b"{":
            end = data.index(b"}", pos)
            size = int(data[pos + 1:end].rstrip(b"+"))
            if data[end + 1:end + 3] != b"\r\n":
                raise ValueError(f"literal without CRLF at {pos}")
            start = end + 3
            out.append(data[start:start + size])
            pos = start + size
        else:
            end = pos
            depth = 0
            while end < n:
                ch = data[end:end + 1]
                if ch == b"[":
                    depth += 1
                elif ch == b"]":
                    depth -= 1
                elif depth == 0 and ch in (b" ", b"(", b")"):
                    break
                end += 1
            word = data[pos:end]
            pos = end
            if word.upper() == b"NIL":
                out.append(None)
            elif word.isdigit():
                out.append(int(word))
            else:
                out.append(Atom(word))
    if not top:
        raise ValueError("unterminated list")
    return out, pos


def fetch_items(raw):
    """The ``(name value ...)`` of one FETCH response as a dict name -> parsed value."""
    (items,) = parse_response(raw)
    return {bytes(items[i]).upper(): items[i + 1] for i in range(0, len(items), 2)}
