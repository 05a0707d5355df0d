"""Real sync clients against the IMAP server: Debian's mbsync (isync 1.4) and offlineimap3.

Each client runs as a subprocess with a throw-away config in tmp_path and keeps a local
Maildir in two-way sync with a fresh server.  The scenario is the same for both:

1. seed both sides (messages, flags, a new nested non-ASCII folder and a new nested
   ASCII one on each side), sync;
2. change both sides (new messages, flags set and cleared, deletions), sync;
3. sync with no change at all.

After every sync both sides must hold exactly the same folders and, per folder, the
same messages (exact bytes, up to what the client is documented to change, see
``strip_tuid`` and the ``expect_*`` methods of :class:`Mail`) with the same flags; the
no-change sync must change nothing on either side.

The server runs on the reactor thread, so every blocking client call (imaplib, the
client subprocesses, even reading the Maildir, for uniformity) goes through
``in_thread``.
"""

import base64
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

import imap_support
import pytest
import pytest_twisted
from imap_support import PASSWORD, USER, in_thread

# The fixture, by its name (an assignment, so that the test functions' parameters of
# that name do not count as redefining an import).
imap_server = imap_support.imap_server

CLIENT_TIMEOUT = 120
# Folders every fresh account has (leapmail.mail.account.Account.setup).
STANDARD = ["INBOX", "Archive", "Drafts", "Junk", "Sent", "Trash"]
# "Projekte/Überblick" and "Reisen/Café" as they are on the wire: modified UTF-7,
# RFC 3501 5.1.3.
PROJEKTE_UEBERBLICK = "Projekte/&ANw-berblick"
REISEN_CAFE = "Reisen/Caf&AOk-"


def require_tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make debs` "
                    "(tools/ensure-debian-packages isync offlineimap3)")
    return path


# -- modified UTF-7 (RFC 3501 5.1.3) ----------------------------------------------------

def mutf7_encode(name):
    out, run = [], []

    def flush():
        if run:
            data = "".join(run).encode("utf-16-be")
            out.append("&" + base64.b64encode(data).decode().rstrip("=").replace("/", ",")
                       + "-")
            run.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    flush()
    return "".join(out)


def mutf7_decode(name):
    def one(m):
        if m.group(1) == "":
            return "&"
        b64 = m.group(1).replace(",", "/")
        return base64.b64decode(b64 + "=" * (-len(b64) % 4)).decode("utf-16-be")

    return re.sub(r"&([^-]*)-", one, name)


def test_mutf7_codec():
    assert mutf7_encode("Projekte/Überblick") == PROJEKTE_UEBERBLICK
    assert mutf7_encode("Reisen/Café") == REISEN_CAFE
    assert mutf7_encode("A&B") == "A&-B"
    for name in ("Projekte/Überblick", "Reisen/Café", "A&B", "日本語/x"):
        assert mutf7_decode(mutf7_encode(name)) == name


# -- messages and the expected state --------------------------------------------------

MAILDIR_FLAGS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S",
                 "\\Deleted": "T"}


def to_crlf(raw):
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def to_lf(raw):
    return raw.replace(b"\r\n", b"\n")


def message(n, subject, body="", crlf=False):
    """A small RFC 5322 message; LF line ends unless ``crlf``.  The Message-ID finds it."""
    text = (f"From: Bob <bob@example.org>\n"
            f"To: Alice <{USER}>\n"
            f"Subject: {subject}\n"
            f"Date: Mon, 1 Jan 2024 12:{n:02d}:00 +0000\n"
            f"Message-ID: <m{n}@example.org>\n"
            f"MIME-Version: 1.0\n"
            f"Content-Type: text/plain; charset=utf-8\n"
            f"Content-Transfer-Encoding: 8bit\n"
            f"\n"
            f"{body or subject}\n"
            f"Zeile zwei, mit Umlauten: äöü ß.\n")
    raw = text.encode("utf-8")
    return to_crlf(raw) if crlf else raw


def message_id(raw):
    m = re.search(rb"^Message-ID: (<[^>]+>)\r?$", raw, re.MULTILINE | re.IGNORECASE)
    return m.group(1).decode() if m else None


@dataclass
class Mail:
    """One message of the expected state: where it was written first, its bytes there,
    and its flags as Maildir letters (S, F, ...)."""

    origin: str     # "server" (APPENDed over IMAP) or "maildir" (a file written locally)
    raw: bytes
    flags: set = field(default_factory=set)

    # IMAP messages are CRLF (RFC 5322 on the wire); both clients write LF into the
    # Maildir and turn LF into CRLF when they upload (mbsync: sync.c copy_msg_convert(),
    # by the stores' CRLF capability; offlineimap: folder/IMAP.py getmessage() "all
    # CRLFs will be transformed to '\n'" and the '8bit-RFC' policy with linesep '\r\n'
    # for APPEND).  The side a message was written on keeps its bytes untouched.
    def expect_on_server(self):
        return self.raw if self.origin == "server" else to_crlf(self.raw)

    def expect_in_maildir(self):
        return self.raw if self.origin == "maildir" else to_lf(self.raw)


# mbsync inserts "X-TUID: <12 characters>" as the last header line of every message it
# propagates (in either direction) to find it again if the store gives no UID back
# (sync.c copy_msg_convert(); isync ChangeLog "tolerate case changes in X-TUID header
# name", "add CR after TUID during LF => CRLF conversion").  That one header line is
# all we take out before comparing bytes; offlineimap adds nothing when the server has
# UIDPLUS (folder/IMAP.py savemessage()), so its comparisons strip nothing.
TUID_LINE = re.compile(rb"^X-TUID: [A-Za-z0-9+/]{12}\r?\n", re.MULTILINE | re.IGNORECASE)


def strip_tuid(raw):
    end = re.search(rb"\n\r?\n", raw)
    header_end = end.start() + 1 if end else len(raw)
    header, rest = raw[:header_end], raw[header_end:]
    return TUID_LINE.sub(b"", header, count=1) + rest


# -- the server side, read over imaplib -----------------------------------------------

LIST_LINE = re.compile(rb'^\((?P<attrs>[^)]*)\) (?:"(?P<delim>[^"]*)"|NIL) (?P<name>.+)$')


def _unquote(name):
    if name.startswith(b'"') and name.endswith(b'"'):
        name = re.sub(rb"\\(.)", rb"\1", name[1:-1])
    return name.decode("ascii")


def _quote(name):
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _fetch_items(data):
    """imaplib's FETCH data as (meta bytes, literal) per message: the parts before and
    after the literal are joined, so FLAGS are found on either side of BODY[]."""
    items = []
    for part in data:
        if part is None:
            continue
        if isinstance(part, tuple):
            items.append([part[0], part[1]])
        elif items:
            items[-1][0] += b" " + part
    return items


@dataclass
class ServerMessage:
    uid: int
    modseq: int
    flags: frozenset    # Maildir letters; anything else kept as the IMAP flag itself
    body: bytes


def server_snapshot(server):
    """{wire folder name: (uidvalidity, uidnext, highestmodseq, [ServerMessage ...])}."""
    conn = server.imaplib()
    try:
        typ, data = conn.list('""', '"*"')
        assert typ == "OK", data
        names = []
        for line in data:
            m = LIST_LINE.match(line)
            assert m, f"unparsed LIST response {line!r}"
            attrs = m.group("attrs").lower().split()
            if b"\\noselect" in attrs or b"\\nonexistent" in attrs:
                continue
            names.append(_unquote(m.group("name")))
        snapshot = {}
        for name in names:
            typ, data = conn.select(_quote(name), readonly=True)
            assert typ == "OK", (name, data)
            status = tuple(int(conn.untagged_responses[key][-1])
                           for key in ("UIDVALIDITY", "UIDNEXT", "HIGHESTMODSEQ"))
            typ, data = conn.uid("FETCH", "1:*", "(UID FLAGS MODSEQ BODY.PEEK[])")
            assert typ == "OK", (name, data)
            messages = []
            for meta, body in _fetch_items(data):
                uid = int(re.search(rb"\bUID (\d+)", meta).group(1))
                modseq = int(re.search(rb"\bMODSEQ \((\d+)\)", meta).group(1))
                flags = re.search(rb"\bFLAGS \(([^)]*)\)", meta).group(1).decode().split()
                letters = frozenset(MAILDIR_FLAGS.get(f, f) for f in flags
                                    if f != "\\Recent")
                messages.append(ServerMessage(uid, modseq, letters, body))
            snapshot[name] = status + (sorted(messages, key=lambda m: m.uid),)
            conn.close()
        return snapshot
    finally:
        conn.logout()


def server_append(server, folder, raw, flags=()):
    conn = server.imaplib()
    try:
        typ, data = conn.append(_quote(folder), "(" + " ".join(flags) + ")", None, raw)
        assert typ == "OK", data
    finally:
        conn.logout()


def server_create(server, folder):
    conn = server.imaplib()
    try:
        typ, data = conn.create(_quote(folder))
        assert typ == "OK", data
    finally:
        conn.logout()


def _uid_of(conn, folder, msgid):
    typ, data = conn.select(_quote(folder))
    assert typ == "OK", (folder, data)
    typ, data = conn.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    assert typ == "OK", data
    uids = [int(re.search(rb"\bUID (\d+)", meta).group(1))
            for meta, body in _fetch_items(data) if msgid.encode() in body]
    assert len(uids) == 1, f"{msgid} in {folder}: UIDs {uids}"
    return uids[0]


def server_store(server, folder, msgid, command, flags):
    conn = server.imaplib()
    try:
        uid = _uid_of(conn, folder, msgid)
        typ, data = conn.uid("STORE", str(uid), command, flags)
        assert typ == "OK", data
    finally:
        conn.logout()


def server_delete_message(server, folder, msgid):
    conn = server.imaplib()
    try:
        uid = _uid_of(conn, folder, msgid)
        typ, data = conn.uid("STORE", str(uid), "+FLAGS.SILENT", "(\\Deleted)")
        assert typ == "OK", data
        typ, data = conn.expunge()
        assert typ == "OK", data
    finally:
        conn.logout()


# -- the Maildir side -----------------------------------------------------------------

@dataclass
class MaildirMessage:
    path: str
    flags: frozenset
    body: bytes
    mtime_ns: int


def maildir_info_flags(filename):
    return frozenset(filename.rpartition(":2,")[2]) if ":2," in filename else frozenset()


def is_maildir(path):
    return all(os.path.isdir(os.path.join(path, sub)) for sub in ("cur", "new", "tmp"))


def maildir_folders(root, inbox=None):
    """{folder name: directory}: every Maildir under ``root`` by its relative path with
    "/" (the Verbatim layout of mbsync, offlineimap's with sep = /), INBOX apart if
    it is kept elsewhere."""
    folders = {}
    for dirpath, dirnames, _files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("cur", "new", "tmp"))
        if dirpath != root and is_maildir(dirpath):
            folders[os.path.relpath(dirpath, root).replace(os.sep, "/")] = dirpath
    if inbox is not None:
        assert "INBOX" not in folders
        folders["INBOX"] = inbox
    return folders


def maildir_snapshot(folders):
    """{folder: [MaildirMessage ...]} sorted by file path; dot files are client state."""
    snapshot = {}
    for name, path in folders.items():
        messages = []
        for sub in ("new", "cur"):
            for filename in sorted(os.listdir(os.path.join(path, sub))):
                if filename.startswith("."):
                    continue
                full = os.path.join(path, sub, filename)
                with open(full, "rb") as f:
                    body = f.read()
                messages.append(MaildirMessage(full, maildir_info_flags(filename), body,
                                               os.stat(full).st_mtime_ns))
        snapshot[name] = messages
    return snapshot


_counter = [0]


def maildir_deliver(path, raw, flags=""):
    """Write a message the way an MUA does: into new/ if it has no flags, else into cur/
    with a ":2,FLAGS" info; the unique name follows the Maildir spec (time.Pn.host)."""
    os.makedirs(path, exist_ok=True)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    _counter[0] += 1
    unique = f"1700000000.P{os.getpid()}Q{_counter[0]}.testhost"
    if flags:
        name = os.path.join(path, "cur", unique + ":2," + "".join(sorted(flags)))
    else:
        name = os.path.join(path, "new", unique)
    with open(os.path.join(path, "tmp", unique), "wb") as f:
        f.write(raw)
    os.rename(os.path.join(path, "tmp", unique), name)


def maildir_find(folder_path, msgid):
    found = []
    for sub in ("new", "cur"):
        for filename in os.listdir(os.path.join(folder_path, sub)):
            full = os.path.join(folder_path, sub, filename)
            with open(full, "rb") as f:
                if message_id(f.read()) == msgid:
                    found.append(full)
    assert len(found) == 1, f"{msgid} in {folder_path}: {found}"
    return found[0]


def maildir_set_flags(folder_path, msgid, letters):
    """What an MUA does to change flags: rename into cur/ with the new ":2," info."""
    old = maildir_find(folder_path, msgid)
    base = os.path.basename(old).partition(":2,")[0]
    new = os.path.join(folder_path, "cur", base + ":2," + "".join(sorted(letters)))
    os.rename(old, new)


def maildir_remove(folder_path, msgid):
    os.remove(maildir_find(folder_path, msgid))


# -- comparing ------------------------------------------------------------------------

class Model:
    """The expected state: {folder as the server names it (wire form): [Mail ...]}, and
    how each folder is named in the Maildir."""

    def __init__(self, local_name):
        self.folders = {}
        self.local_name = local_name

    def add(self, folder, mail):
        self.folders.setdefault(folder, []).append(mail)
        return mail

    def find(self, folder, msgid):
        [mail] = [m for m in self.folders[folder] if message_id(m.raw) == msgid]
        return mail

    def remove(self, folder, msgid):
        self.folders[folder].remove(self.find(folder, msgid))


def compare(model, server_snap, maildir_snap, strip, log):
    """Both sides against the model: folder sets, then per folder (bytes, flags)."""
    local_names = {model.local_name(f): f for f in model.folders}
    assert sorted(server_snap) == sorted(model.folders), log
    assert sorted(maildir_snap) == sorted(local_names), log
    for folder, mails in sorted(model.folders.items()):
        want_server = sorted((m.expect_on_server(), "".join(sorted(m.flags))) for m in mails)
        got_server = sorted((strip(m.body), "".join(sorted(m.flags)))
                            for m in server_snap[folder][3])
        assert got_server == want_server, f"server folder {folder}\n{log}"
        want_local = sorted((m.expect_in_maildir(), "".join(sorted(m.flags))) for m in mails)
        got_local = sorted((strip(m.body), "".join(sorted(m.flags)))
                           for m in maildir_snap[model.local_name(folder)])
        assert got_local == want_local, f"maildir folder {folder}\n{log}"


def stable_view(maildir_snap):
    """What a no-change sync must leave alone in the Maildir: every file's path, bytes
    and modification time."""
    return {name: [(m.path, m.body, m.mtime_ns) for m in msgs]
            for name, msgs in maildir_snap.items()}


def run_client(argv, cwd):
    result = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=CLIENT_TIMEOUT,
                            stdin=subprocess.DEVNULL, check=False)
    return result.returncode, result.stdout.decode("utf-8", "replace"), \
        result.stderr.decode("utf-8", "replace")


def client_log(argv, rc, out, err, limit=150000):
    return (f"$ {' '.join(argv)}\nexit code {rc}\n--- stdout ---\n{out[-limit:]}\n"
            f"--- stderr ---\n{err[-limit:]}")


# -- mbsync ---------------------------------------------------------------------------

MBSYNC_CONFIG = """\
IMAPAccount leapmail
Host {host}
Port {port}
User {user}
Pass "{password}"
SSLType None
AuthMechs LOGIN

IMAPStore far
Account leapmail

MaildirStore near
Path {path}/
Inbox {inbox}
SubFolders Verbatim

Channel leapmail
Far :far:
Near :near:
Patterns *
Create Both
Expunge Both
SyncState *
"""


class Mbsync:
    # mbsync inserts one X-TUID header line into every message it propagates.
    strip = staticmethod(strip_tuid)

    def __init__(self, server, directory):
        self.binary = require_tool("mbsync")
        self.directory = directory
        self.root = str(directory / "Mail")
        self.inbox = str(directory / "Inbox")
        os.makedirs(self.root)
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(self.inbox, sub))
        self.config = str(directory / "mbsyncrc")
        with open(self.config, "w") as f:
            f.write(MBSYNC_CONFIG.format(host=server.host, port=server.port, user=USER,
                                         password=PASSWORD, path=self.root,
                                         inbox=self.inbox))

    # mbsync 1.4 does not translate mailbox names: a Maildir folder is named by the
    # server's modified UTF-7 name, and a local folder's name is sent as it is (see
    # test_mbsync_utf8_maildir_name_refused_like_dovecot).
    @staticmethod
    def local_name(folder):
        return folder

    def local(self, folder):
        return self.inbox if folder == "INBOX" else os.path.join(self.root, folder)

    def folders(self):
        return maildir_folders(self.root, inbox=self.inbox)

    def sync(self):
        # -Dn: the IMAP protocol exchange (passwords masked), for failure messages and
        # for checking what a no-change sync sends.
        argv = [self.binary, "-c", self.config, "-a", "-Dn"]
        rc, out, err = run_client(argv, str(self.directory))
        log = client_log(argv, rc, out, err)
        assert rc == 0, log
        return out + err, log

    @staticmethod
    def check_quiet(output, log, model):
        """A sync that found nothing to do: it listed, selected and read UIDs and flags,
        one UID FETCH per non-empty folder, nothing else (no APPEND, STORE, EXPUNGE,
        CREATE, no message fetched)."""
        commands = [m.group(1)
                    for m in re.finditer(r"^>>> \d+ (.*?)\r?$", output, re.MULTILINE)]
        verbs = sorted({c.split(" ")[0] for c in commands})
        assert verbs == ["CLOSE", "LIST", "LOGIN", "LOGOUT", "NAMESPACE", "SELECT",
                         "UID"], log
        fetches = [c for c in commands if c.startswith("UID ")]
        assert all(re.fullmatch(r"UID FETCH \d+:\d+ \(UID FLAGS\)", c) for c in fetches), log
        assert len([c for c in commands if c.startswith("SELECT ")]) == len(model.folders), log
        assert len(fetches) == len([f for f, mails in model.folders.items() if mails]), log


# -- offlineimap ----------------------------------------------------------------------

OFFLINEIMAP_CONFIG = """\
[general]
accounts = leapmail
metadata = {metadata}
ui = basic

[Account leapmail]
localrepository = local
remoterepository = remote
# Maildir folder names in UTF-8, translated from and to modified UTF-7 on the server.
utf8foldernames = yes

[Repository local]
type = Maildir
localfolders = {root}
sep = /

[Repository remote]
type = IMAP
remotehost = {host}
remoteport = {port}
ssl = no
starttls = no
remoteuser = {user}
remotepass = {password}
"""

# What offlineimap's basic UI says when it changes something (ui/UIBase.py).
OFFLINEIMAP_ACTIONS = re.compile(r"^\s*(Copy message|Deleting|Adding flag|Creating folder|"
                                 r"Adding label|Deleting label)", re.MULTILINE)


class Offlineimap:
    # offlineimap adds no header when the server has UIDPLUS (folder/IMAP.py
    # savemessage()): nothing to strip.
    strip = staticmethod(lambda raw: raw)

    def __init__(self, server, directory):
        self.binary = require_tool("offlineimap")
        self.directory = directory
        self.root = str(directory / "Maildir")
        os.makedirs(self.root)
        self.config = str(directory / "offlineimaprc")
        with open(self.config, "w") as f:
            f.write(OFFLINEIMAP_CONFIG.format(
                metadata=directory / "offlineimap-metadata", root=self.root,
                host=server.host, port=server.port, user=USER, password=PASSWORD))

    @staticmethod
    def local_name(folder):
        return mutf7_decode(folder)

    def local(self, folder):
        return os.path.join(self.root, mutf7_decode(folder))

    def folders(self):
        return maildir_folders(self.root)

    def sync(self):
        # -o: one run; -d imap: the IMAP protocol exchange, for failure messages.
        argv = [self.binary, "-c", self.config, "-o", "-u", "basic", "-d", "imap"]
        rc, out, err = run_client(argv, str(self.directory))
        log = client_log(argv, rc, out, err)
        assert rc == 0, log
        assert "ERROR" not in out + err, log
        return out + err, log

    @staticmethod
    def check_quiet(output, log, model):
        assert OFFLINEIMAP_ACTIONS.findall(output) == [], log


# -- the scenario ---------------------------------------------------------------------

async def sync_and_compare(server, client, model):
    output, log = await in_thread(client.sync)
    server_snap = await in_thread(server_snapshot, server)
    maildir_snap = await in_thread(maildir_snapshot, client.folders())
    compare(model, server_snap, maildir_snap, client.strip, log)
    return output, log, server_snap, maildir_snap


async def two_way_scenario(server, client):
    model = Model(local_name=client.local_name)
    for name in STANDARD:
        model.folders[name] = []

    # 1. Seed.  On the server, CREATE of a nested name creates the parent as well
    #    (RFC 3501 6.3.3 SHOULD), so Projekte and Kunden are mailboxes too; on the
    #    Maildir side Reisen and Listen are Maildirs of their own likewise, so that
    #    both sides start symmetric.
    for folder in (PROJEKTE_UEBERBLICK, "Kunden/2024"):
        await in_thread(server_create, server, folder)
        model.folders[folder.split("/")[0]] = []
        model.folders[folder] = []
    seeds_server = [
        ("INBOX", message(1, "Server eins"), ()),
        ("INBOX", message(2, "Server zwei"), ("\\Seen",)),
        ("Archive", message(3, "Archiviert"), ("\\Seen", "\\Flagged")),
        (PROJEKTE_UEBERBLICK, message(4, "Überblick eins"), ("\\Seen",)),
        (PROJEKTE_UEBERBLICK, message(5, "Überblick zwei"), ()),
        ("Kunden/2024", message(8, "Kunde"), ("\\Seen",)),
    ]
    for folder, raw, flags in seeds_server:
        raw = to_crlf(raw)
        await in_thread(server_append, server, folder, raw, flags)
        model.add(folder, Mail("server", raw, {MAILDIR_FLAGS[f] for f in flags}))
    seeds_local = [
        ("INBOX", message(11, "Lokal eins"), ""),
        ("Sent", message(12, "Gesendet"), "S"),
        ("Reisen", message(13, "Reisen allgemein"), "S"),
        (REISEN_CAFE, message(14, "Café eins"), "FS"),
        (REISEN_CAFE, message(15, "Café zwei, CRLF", crlf=True), ""),
        ("Listen", message(18, "Listen allgemein"), "S"),
        ("Listen/debian", message(19, "debian-devel"), ""),
    ]
    for folder, raw, flags in seeds_local:
        await in_thread(maildir_deliver, client.local(folder), raw, flags)
        model.add(folder, Mail("maildir", raw, set(flags)))
    await sync_and_compare(server, client, model)

    # 2. Change both sides: new messages, flags set and cleared, deletions, each on
    #    messages that came from either side.
    inbox_new = to_crlf(message(6, "Server neu"))
    await in_thread(server_append, server, "INBOX", inbox_new, ())
    model.add("INBOX", Mail("server", inbox_new, set()))
    ueberblick_new = to_crlf(message(7, "Überblick neu"))
    await in_thread(server_append, server, PROJEKTE_UEBERBLICK, ueberblick_new, ("\\Seen",))
    model.add(PROJEKTE_UEBERBLICK, Mail("server", ueberblick_new, {"S"}))
    await in_thread(server_store, server, "INBOX", "<m2@example.org>", "+FLAGS",
                    "(\\Flagged)")
    model.find("INBOX", "<m2@example.org>").flags.add("F")
    await in_thread(server_store, server, "INBOX", "<m11@example.org>", "+FLAGS",
                    "(\\Seen)")
    model.find("INBOX", "<m11@example.org>").flags.add("S")
    await in_thread(server_store, server, "Listen/debian", "<m19@example.org>", "+FLAGS",
                    "(\\Flagged)")
    model.find("Listen/debian", "<m19@example.org>").flags.add("F")
    await in_thread(server_delete_message, server, PROJEKTE_UEBERBLICK, "<m4@example.org>")
    model.remove(PROJEKTE_UEBERBLICK, "<m4@example.org>")
    await in_thread(server_delete_message, server, "Sent", "<m12@example.org>")
    model.remove("Sent", "<m12@example.org>")

    local_new = message(16, "Lokal neu")
    await in_thread(maildir_deliver, client.local("INBOX"), local_new, "")
    model.add("INBOX", Mail("maildir", local_new, set()))
    cafe_new = message(17, "Café neu")
    await in_thread(maildir_deliver, client.local(REISEN_CAFE), cafe_new, "S")
    model.add(REISEN_CAFE, Mail("maildir", cafe_new, {"S"}))
    await in_thread(maildir_set_flags, client.local(PROJEKTE_UEBERBLICK),
                    "<m5@example.org>", "F")
    model.find(PROJEKTE_UEBERBLICK, "<m5@example.org>").flags.add("F")
    await in_thread(maildir_set_flags, client.local(REISEN_CAFE), "<m14@example.org>", "S")
    model.find(REISEN_CAFE, "<m14@example.org>").flags.discard("F")
    await in_thread(maildir_set_flags, client.local("Kunden/2024"), "<m8@example.org>", "FS")
    model.find("Kunden/2024", "<m8@example.org>").flags.add("F")
    await in_thread(maildir_remove, client.local("Archive"), "<m3@example.org>")
    model.remove("Archive", "<m3@example.org>")
    await in_thread(maildir_remove, client.local("Reisen"), "<m13@example.org>")
    model.remove("Reisen", "<m13@example.org>")

    _, _, server_before, maildir_before = await sync_and_compare(server, client, model)

    # 3. Nothing changed: both sides stay exactly as they were, down to UIDs, MODSEQs,
    #    UIDNEXT, HIGHESTMODSEQ, file names and mtimes, and the client did nothing.
    output, log, server_after, maildir_after = await sync_and_compare(server, client, model)
    assert server_after == server_before, log
    assert stable_view(maildir_after) == stable_view(maildir_before), log
    client.check_quiet(output, log, model)


@pytest_twisted.ensureDeferred
async def test_mbsync_two_way(imap_server, tmp_path):
    # The local-side non-ASCII folder is named the way mbsync 1.4 names such folders
    # itself (modified UTF-7); a UTF-8 name cannot work with it, see the next test.
    await two_way_scenario(imap_server, Mbsync(imap_server, tmp_path))


@pytest_twisted.ensureDeferred
async def test_offlineimap_two_way(imap_server, tmp_path):
    await two_way_scenario(imap_server, Offlineimap(imap_server, tmp_path))


@pytest_twisted.ensureDeferred
async def test_mbsync_utf8_maildir_name_refused_like_dovecot(imap_server, tmp_path):
    """mbsync 1.4 sends a local folder's name as it is: "Reisen/Café" goes out as
    8-bit UTF-8 in a quoted string, which RFC 3501 does not allow (quoted strings are
    7-bit CHARs, 9; mailbox names are modified UTF-7, 5.1.3).  The server refuses it,
    as Dovecot does: a limit of the client, not of the server.  The refusal must itself
    be 7-bit text (RFC 3501 9: text = 1*TEXT-CHAR, CHAR = %x01-7F)."""
    from dovecot import require_dovecot
    from dovecot_server import DovecotServer

    require_dovecot()

    def sync_utf8_folder(host, port, user, password, directory):
        client = Mbsync(imap_server, directory)
        with open(client.config, "w") as f:
            f.write(MBSYNC_CONFIG.format(host=host, port=port, user=user,
                                         password=password, path=client.root,
                                         inbox=client.inbox))
        maildir_deliver(os.path.join(client.root, "Reisen", "Café"),
                        message(21, "Café, UTF-8"), "S")
        argv = [client.binary, "-c", client.config, "-a", "-Dn"]
        rc, out, err = run_client(argv, str(directory))
        return rc, out, client_log(argv, rc, out, err)

    def against_dovecot():
        with DovecotServer(tmp_path / "dovecot") as dovecot:
            return sync_utf8_folder(dovecot.host, dovecot.port, dovecot.user,
                                    dovecot.password, tmp_path / "with-dovecot")

    rc, out, log = await in_thread(against_dovecot)
    assert rc == 1, log
    # Dovecot's separator is "." here (its default Maildir++ layout).
    assert re.search(r'^>>> (\d+) CREATE "Reisen\.Café"\r?\n\1 NO Mailbox name is not '
                     r'valid mUTF-7', out, re.MULTILINE), log

    rc, out, log = await in_thread(sync_utf8_folder, imap_server.host, imap_server.port,
                                   USER, PASSWORD, tmp_path / "with-leapmail")
    assert rc == 1, log
    assert re.search(r'^>>> (\d+) CREATE "Reisen/Café"\r?\n\1 NO ', out, re.MULTILINE), log

    def raw_create():
        client = imap_server.raw()
        try:
            return client.command(b"C1", b'CREATE "Reisen/Caf\xc3\xa9"')
        finally:
            client.close()

    [answer] = await in_thread(raw_create)
    assert answer.startswith(b"C1 NO "), answer
    assert answer.isascii(), f"8-bit bytes in the response text: {answer!r}"
