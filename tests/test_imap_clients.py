"""The IMAP server as real clients see it: imaplib, imapclient and the exact wire.

Every advertised capability is exercised end to end over a real loopback socket,
with the exact bytes checked wherever the protocol fixes them (human-readable text
after a status or response code is free, so it is cut off before comparing).  All
client code runs off the reactor thread (``in_thread``): the server runs on it.
"""

import base64
import datetime
import imaplib
import re

import imapclient
from imapclient.imapclient import DRAFT, FLAGGED, JUNK, SEEN, SENT, TRASH
import pytest_twisted

from dovecot import fetch_items, parse_response
from imap_support import PASSWORD, USER, RawClient, in_thread
from mail_corpus import corpus

from leapmail import __version__

CRLF = b"\r\n"

CAPABILITIES = (b"IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+ ID ENABLE IDLE NAMESPACE UIDPLUS "
                b"MOVE UNSELECT CHILDREN SPECIAL-USE LIST-EXTENDED LIST-STATUS CONDSTORE "
                b"QRESYNC ESEARCH STATUS=SIZE APPENDLIMIT=67108864")
APPENDLIMIT = 67108864
SYSTEM_FLAGS = b"\\Answered \\Flagged \\Deleted \\Seen \\Draft"


# -- the wire -----------------------------------------------------------------------------

def status_of(line):
    """A status response without its human-readable text: ``b"t1 OK [CODE x]"``.

    Other responses are returned unchanged (without the CRLF).
    """
    line = line.rstrip(b"\r\n")
    parts = line.split(b" ", 2)
    if parts[0] == b"*" and len(parts) >= 2 and parts[1].isdigit():
        return line  # "* 3 EXISTS" and the like have no text
    head = b" ".join(parts[:2])
    rest = parts[2] if len(parts) > 2 else b""
    if parts[1] not in (b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"):
        return line
    if rest.startswith(b"["):
        depth = 0
        for i, ch in enumerate(rest):
            if ch == ord("["):
                depth += 1
            elif ch == ord("]"):
                depth -= 1
                if depth == 0:
                    return head + b" " + rest[:i + 1]
    return head


class Wire:
    """A raw connection with automatic tags.

    ``run(text)`` returns ``(tagged, untagged)``: the tagged status (see
    :func:`status_of`) and the untagged responses, each without its CRLF and with
    literals inline.  Untagged status responses (``* OK [...] text``) lose their
    text too, so that the whole answer can be compared exactly.
    """

    def __init__(self, server, login=True, timeout=20):
        self.raw = RawClient(server.host, server.port, login=login, timeout=timeout)
        self.n = 0

    def next_tag(self):
        self.n += 1
        return b"w%d" % self.n

    def send(self, data):
        self.raw.send(data)

    def read_response(self):
        """One response (tagged, untagged or continuation), literals inline, no CRLF."""
        current = b""
        while True:
            line = self.raw.line()
            current += line
            stripped = line.rstrip(b"\r\n")
            if stripped.endswith(b"}") and b"{" in stripped:
                count = stripped[stripped.rindex(b"{") + 1:-1]
                if count.isdigit():
                    size = int(count)
                    data = self.raw.read(size)
                    assert len(data) == size, "connection closed inside a literal"
                    current += data
                    continue
            return current[:-2] if current.endswith(CRLF) else current

    def collect(self, tag):
        untagged = []
        while True:
            response = self.read_response()
            if response.startswith(tag + b" "):
                return status_of(response)[len(tag) + 1:], untagged
            if response.startswith(b"* ") and b" FETCH (" in response[:24]:
                response = canonical_flags(response)
            untagged.append(status_of(response) if response.startswith(b"* ") else response)

    def run(self, text, tag=None):
        tag = tag or self.next_tag()
        self.send(tag + b" " + text + CRLF)
        return self.collect(tag)

    def ok(self, text):
        status, untagged = self.run(text)
        assert status.startswith(b"OK"), (text, status, untagged)
        return untagged

    def append(self, mailbox, message, flags=None, date=None, plus=True):
        """APPEND with a literal ({n+} or, with ``plus=False``, a synchronizing one)."""
        tag = self.next_tag()
        head = tag + b" APPEND " + mailbox
        if flags is not None:
            head += b" (" + flags + b")"
        if date is not None:
            head += b' "' + date + b'"'
        if plus:
            self.send(head + b" {%d+}\r\n" % len(message) + message + CRLF)
        else:
            self.send(head + b" {%d}\r\n" % len(message))
            cont = self.raw.line()
            assert cont.startswith(b"+"), cont
            self.send(message + CRLF)
        return self.collect(tag)

    def close(self):
        self.raw.close()


SYSTEM_ORDER = [b"\\Answered", b"\\Flagged", b"\\Deleted", b"\\Seen", b"\\Draft"]
_FLAGS = re.compile(rb"FLAGS \(([^)]*)\)")


def canonical_flags(response):
    """A FETCH response with its FLAGS list in one order (flag lists are sets): system
    flags in RFC 3501 order, keywords sorted, \\Recent last."""
    def order(match):
        flags = match.group(1).split()
        system = [f for f in SYSTEM_ORDER if f in flags]
        keywords = sorted(f for f in flags if not f.startswith(b"\\"))
        recent = [f for f in flags if f == b"\\Recent"]
        others = [f for f in flags if f.startswith(b"\\") and f not in system + recent]
        return b"FLAGS (" + b" ".join(system + others + keywords + recent) + b")"
    return _FLAGS.sub(order, response)


def lines(*parts):
    return CRLF.join(parts) + CRLF


def fetch_map(untagged):
    """``{seq: {ITEM: value}}`` of the FETCH responses among ``untagged``."""
    out = {}
    for response in untagged:
        parts = response.split(b" ", 3)
        if len(parts) == 4 and parts[0] == b"*" and parts[2] == b"FETCH":
            out.setdefault(int(parts[1]), {}).update(fetch_items(parts[3]))
    return out


def code_value(untagged, name):
    """The argument of response code ``name`` among untagged OK responses."""
    for response in untagged:
        if response.startswith(b"* OK [" + name + b" "):
            return response[len(b"* OK [" + name + b" "):-1]
    raise AssertionError(f"no {name!r} in {untagged!r}")


# -- test messages --------------------------------------------------------------------------

M1 = lines(
    b"Date: Mon, 04 Mar 2024 10:00:00 +0000",
    b"From: Alice Example <alice@example.org>",
    b"To: Bob <bob@example.net>",
    b"Subject: Alpha report",
    b"Message-ID: <m1@example.org>",
    b"",
    b"The quick brown fox",
    b"jumps over the lazy dog.")
M2 = lines(
    b"Date: Sun, 10 Mar 2024 12:30:00 +0100",
    b"From: carol@example.com",
    b"To: bob@example.net",
    b"Cc: Dave <dave@example.com>",
    b"Subject: Beta invoice",
    b"MIME-Version: 1.0",
    b'Content-Type: multipart/mixed; boundary="XYZ"',
    b"",
    b"--XYZ",
    b"Content-Type: text/plain; charset=utf-8",
    b"Content-Transfer-Encoding: quoted-printable",
    b"",
    b"Invoice attached, total 42 euros.",
    b"--XYZ",
    b'Content-Type: application/pdf; name="invoice.pdf"',
    b"Content-Transfer-Encoding: base64",
    b'Content-Disposition: attachment; filename="invoice.pdf"',
    b"",
    b"JVBERi0xLjQKJcfsj6IK",
    b"--XYZ--")
M3 = lines(
    b"Date: Wed, 20 Mar 2024 08:15:00 -0500",
    b"From: Erin <erin@example.org>",
    b"To: alice@example.org",
    b"Subject: Gamma newsletter",
    b"X-Priority: 1",
    b"",
    *[b"Line %04d of a long newsletter with many words." % i for i in range(80)])
M4 = lines(
    b"Date: Mon, 01 Apr 2024 09:00:00 +0200",
    b"From: =?utf-8?q?Fran=C3=A7ois?= <francois@example.fr>",
    b"To: bob@example.net",
    b"Bcc: secret@example.org",
    b"Subject: =?utf-8?q?Caf=C3=A9_meeting?=",
    b"Content-Type: text/plain; charset=utf-8",
    b"Content-Transfer-Encoding: 8bit",
    b"",
    "Rendez-vous au café à midi.".encode())

#: (message, flags, internal date) as appended by :func:`load_four`.
FOUR = [
    (M1, b"\\Seen", b"04-Mar-2024 10:00:00 +0000"),
    (M2, b"\\Flagged $Work", b"10-Mar-2024 11:30:00 +0000"),
    (M3, b"\\Answered \\Seen", b"20-Mar-2024 13:15:00 +0000"),
    (M4, b"\\Draft", b"01-Apr-2024 07:00:00 +0000"),
]


def load_four(w, mailbox=b"INBOX"):
    """APPEND the four test messages; return the UIDVALIDITY."""
    uidvalidity = None
    for i, (message, flags, date) in enumerate(FOUR, 1):
        status, untagged = w.append(mailbox, message, flags, date)
        assert untagged == []
        assert status.startswith(b"OK [APPENDUID "), status
        validity, uid = status[len(b"OK [APPENDUID "):-1].split()
        assert int(uid) == i
        uidvalidity = uidvalidity or validity
        assert validity == uidvalidity
    return int(uidvalidity)


def plain(user=USER, password=PASSWORD, authzid=""):
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


def as_instant(internaldate):
    """An INTERNALDATE string as an aware datetime (the same instant compares equal)."""
    return datetime.datetime.strptime(internaldate.decode().strip(), "%d-%b-%Y %H:%M:%S %z")


# -- greeting, capabilities, authentication ------------------------------------------

@pytest_twisted.ensureDeferred
async def test_greeting_and_capability_exact(imap_server):
    def body():
        w = Wire(imap_server, login=False)
        assert w.raw.greeting.startswith(b"* OK [CAPABILITY " + CAPABILITIES + b"] ")
        assert w.run(b"CAPABILITY") == (b"OK", [b"* CAPABILITY " + CAPABILITIES])
        # Nothing but the authentication commands before login.
        assert w.run(b"SELECT INBOX")[0].startswith(b"BAD")
        assert w.run(b"ENABLE CONDSTORE")[0].startswith(b"BAD")
        status, untagged = w.run(b"LOGIN " + USER.encode() + b' "' + PASSWORD.encode() + b'"')
        assert untagged == []
        after = CAPABILITIES.replace(b" AUTH=PLAIN", b"")
        assert status == b"OK [CAPABILITY " + after + b"]"
        assert w.run(b"CAPABILITY") == (b"OK", [b"* CAPABILITY " + after])
        # LOGIN again once logged in is a state error.
        assert w.run(b"LOGIN a b")[0].startswith(b"BAD")
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_authenticate_plain_with_continuation(imap_server):
    def body():
        w = Wire(imap_server, login=False)
        tag = w.next_tag()
        w.send(tag + b" AUTHENTICATE PLAIN\r\n")
        # RFC 3501 6.2.2: an empty challenge is "+ " and nothing else.
        assert w.raw.line() == b"+ \r\n"
        w.send(plain() + CRLF)
        status, untagged = w.collect(tag)
        assert untagged == []
        assert status.startswith(b"OK [CAPABILITY IMAP4rev1 ")
        assert w.run(b"SELECT INBOX")[0] == b"OK [READ-WRITE]"
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_authenticate_plain_sasl_ir_and_failures(imap_server):
    def body():
        w = Wire(imap_server, login=False)
        # Wrong password, as an initial response (SASL-IR): no continuation at all.
        assert w.run(b"AUTHENTICATE PLAIN " + plain(password="wrong")) == (
            b"NO [AUTHENTICATIONFAILED]", [])
        assert w.run(b"SELECT INBOX")[0].startswith(b"BAD")
        # Cancelled by the client: RFC 3501 6.2.2 says BAD.
        tag = w.next_tag()
        w.send(tag + b" AUTHENTICATE PLAIN\r\n")
        assert w.raw.line() == b"+ \r\n"
        w.send(b"*\r\n")
        assert w.collect(tag)[0].startswith(b"BAD")
        # Not base64: BAD.
        assert w.run(b"AUTHENTICATE PLAIN !!!notbase64")[0].startswith(b"BAD")
        # Unknown mechanism: NO.
        assert w.run(b"AUTHENTICATE CRAM-MD5")[0].startswith(b"NO")
        # Right password with an authorization identity that is the user itself.
        status, untagged = w.run(b"AUTHENTICATE PLAIN " + plain(authzid=USER))
        assert untagged == []
        assert status.startswith(b"OK [CAPABILITY IMAP4rev1 ")
        assert w.run(b"AUTHENTICATE PLAIN " + plain())[0].startswith(b"BAD")  # state
        w.close()

        w = Wire(imap_server, login=False)
        assert w.run(b"LOGIN " + USER.encode() + b" wrong") == (b"NO [AUTHENTICATIONFAILED]", [])
        assert w.run(b"LOGIN nobody@example.org " + b'"' + PASSWORD.encode() + b'"') == (
            b"NO [AUTHENTICATIONFAILED]", [])
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_imaplib_login_and_authenticate(imap_server):
    def body():
        conn = imaplib.IMAP4(imap_server.host, imap_server.port)
        assert set(CAPABILITIES.decode().upper().split()) <= set(conn.capabilities)
        try:
            conn.login(USER, "wrong")
        except imaplib.IMAP4.error as e:
            assert "[AUTHENTICATIONFAILED]" in str(e)
        else:
            raise AssertionError("a wrong password logged in")
        typ, data = conn.authenticate("PLAIN", lambda _challenge: f"\0{USER}\0{PASSWORD}".encode())
        assert typ == "OK"
        assert data[0].startswith(b"[CAPABILITY IMAP4rev1 ")
        assert conn.state == "AUTH"
        conn.logout()

        conn = imaplib.IMAP4(imap_server.host, imap_server.port)
        typ, data = conn.login(USER, PASSWORD)
        assert typ == "OK"
        assert conn.select("INBOX") == ("OK", [b"0"])
        conn.logout()

    await in_thread(body)


# -- NAMESPACE, ID, ENABLE, LOGOUT ------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_namespace_id_enable_logout(imap_server):
    def body():
        w = Wire(imap_server)
        assert w.run(b"NAMESPACE") == (b"OK", [b'* NAMESPACE (("" "/")) NIL NIL'])
        server_id = b'* ID ("name" "leapmail" "version" "' + __version__.encode() + b'")'
        assert w.run(b"ID NIL") == (b"OK", [server_id])
        assert w.run(b'ID ("name" "test-suite" "version" "1.0")') == (b"OK", [server_id])
        assert w.run(b'ID ("name")')[0].startswith(b"BAD")  # odd number of strings
        # ENABLE: RFC 5161 - unknown capabilities are ignored, ENABLED lists what is new.
        assert w.run(b"ENABLE X-UNKNOWN") == (b"OK", [b"* ENABLED"])
        assert w.run(b"ENABLE CONDSTORE X-UNKNOWN") == (b"OK", [b"* ENABLED CONDSTORE"])
        # Enabling it again: listing it again or not are both fine (Dovecot lists it).
        assert w.run(b"ENABLE CONDSTORE") in ((b"OK", [b"* ENABLED"]),
                                              (b"OK", [b"* ENABLED CONDSTORE"]))
        # LOGOUT: BYE, the tagged OK, then the server closes the connection.
        assert w.run(b"LOGOUT") == (b"OK", [b"* BYE"])
        try:
            extra = w.raw.line()
        except (EOFError, ConnectionError):
            extra = b""
        assert extra == b""
        w.close()

    await in_thread(body)


# -- LIST, LSUB, LIST-EXTENDED, mailbox management ----------------------------------------

START_LIST = [
    b'* LIST (\\HasNoChildren) "/" INBOX',
    b'* LIST (\\HasNoChildren \\Archive) "/" Archive',
    b'* LIST (\\HasNoChildren \\Drafts) "/" Drafts',
    b'* LIST (\\HasNoChildren \\Junk) "/" Junk',
    b'* LIST (\\HasNoChildren \\Sent) "/" Sent',
    b'* LIST (\\HasNoChildren \\Trash) "/" Trash',
]


@pytest_twisted.ensureDeferred
async def test_list_plain_and_special_use(imap_server):
    def body():
        w = Wire(imap_server)
        assert w.run(b'LIST "" *') == (b"OK", START_LIST)
        assert w.run(b'LIST "" %') == (b"OK", START_LIST)
        # The hierarchy delimiter query (RFC 3501 6.3.8).
        assert w.run(b'LIST "" ""') == (b"OK", [b'* LIST (\\Noselect) "/" ""'])
        # INBOX is case-insensitive.
        assert w.run(b'LIST "" inbox') == (b"OK", [START_LIST[0]])
        # RFC 6154: the SPECIAL-USE selection option lists only special-use mailboxes.
        assert w.run(b'LIST (SPECIAL-USE) "" *') == (b"OK", START_LIST[1:])
        # RETURN (SPECIAL-USE) keeps all mailboxes.
        assert w.run(b'LIST "" * RETURN (SPECIAL-USE)') == (b"OK", START_LIST)
        # Several patterns at once (RFC 5258).
        assert w.run(b'LIST "" (INBOX "Dr*" "J%")') == (
            b"OK", [START_LIST[0], START_LIST[2], START_LIST[3]])
        # A reference name is prepended to the pattern.
        w.ok(b"CREATE Work/Projects")
        assert w.run(b'LIST Work/ %') == (
            b"OK", [b'* LIST (\\HasNoChildren) "/" Work/Projects'])
        assert w.run(b'LIST "" nothing*') == (b"OK", [])
        assert w.run(b"LIST (BOGUS) \"\" *")[0].startswith(b"BAD")
        assert w.run(b"LIST \"\" * RETURN (BOGUS)")[0].startswith(b"BAD")
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_list_children_subscribed_and_status(imap_server):
    def body():
        w = Wire(imap_server)
        w.ok(b"CREATE Parent/Child")
        w.ok(b"CREATE Parent/Other")
        status, _ = w.append(b"Parent/Child", M1, b"\\Seen")
        assert status.startswith(b"OK [APPENDUID ")
        w.append(b"Parent/Child", M2)
        w.append(b"INBOX", M3)
        assert w.run(b'LIST "" %') == (b"OK", [
            START_LIST[0], START_LIST[1], START_LIST[2], START_LIST[3],
            b'* LIST (\\HasChildren) "/" Parent',
            START_LIST[4], START_LIST[5]])
        assert w.run(b'LIST "" Parent/%') == (b"OK", [
            b'* LIST (\\HasNoChildren) "/" Parent/Child',
            b'* LIST (\\HasNoChildren) "/" Parent/Other'])
        # RETURN (CHILDREN SUBSCRIBED SPECIAL-USE STATUS (...)): each LIST line is
        # followed by the STATUS of that mailbox (RFC 5819).
        w.ok(b"SUBSCRIBE Parent/Child")
        w.ok(b"UNSUBSCRIBE Junk")
        assert w.run(b'LIST "" * RETURN (CHILDREN SUBSCRIBED SPECIAL-USE '
                     b'STATUS (MESSAGES UNSEEN))') == (b"OK", [
            b'* LIST (\\HasNoChildren) "/" INBOX',
            b"* STATUS INBOX (MESSAGES 1 UNSEEN 1)",
            b'* LIST (\\HasNoChildren \\Archive \\Subscribed) "/" Archive',
            b"* STATUS Archive (MESSAGES 0 UNSEEN 0)",
            b'* LIST (\\HasNoChildren \\Drafts \\Subscribed) "/" Drafts',
            b"* STATUS Drafts (MESSAGES 0 UNSEEN 0)",
            b'* LIST (\\HasNoChildren \\Junk) "/" Junk',
            b"* STATUS Junk (MESSAGES 0 UNSEEN 0)",
            b'* LIST (\\HasChildren) "/" Parent',
            b"* STATUS Parent (MESSAGES 0 UNSEEN 0)",
            b'* LIST (\\HasNoChildren \\Subscribed) "/" Parent/Child',
            b"* STATUS Parent/Child (MESSAGES 2 UNSEEN 1)",
            b'* LIST (\\HasNoChildren) "/" Parent/Other',
            b"* STATUS Parent/Other (MESSAGES 0 UNSEEN 0)",
            b'* LIST (\\HasNoChildren \\Sent \\Subscribed) "/" Sent',
            b"* STATUS Sent (MESSAGES 0 UNSEEN 0)",
            b'* LIST (\\HasNoChildren \\Trash \\Subscribed) "/" Trash',
            b"* STATUS Trash (MESSAGES 0 UNSEEN 0)",
        ])
        # RECURSIVEMATCH: Parent is not subscribed but a child is (RFC 5258 example 5).
        assert w.run(b'LIST (SUBSCRIBED RECURSIVEMATCH) "" %') == (b"OK", [
            b'* LIST (\\HasNoChildren \\Archive \\Subscribed) "/" Archive',
            b'* LIST (\\HasNoChildren \\Drafts \\Subscribed) "/" Drafts',
            b'* LIST (\\HasChildren) "/" Parent ("CHILDINFO" ("SUBSCRIBED"))',
            b'* LIST (\\HasNoChildren \\Sent \\Subscribed) "/" Sent',
            b'* LIST (\\HasNoChildren \\Trash \\Subscribed) "/" Trash',
        ])
        assert w.run(b'LIST (RECURSIVEMATCH) "" %')[0].startswith(b"BAD")
        # "or only with REMOTE" (RFC 5258 3.1); imaptest's listext script.
        assert w.run(b'LIST (RECURSIVEMATCH REMOTE) "" %')[0].startswith(b"BAD")
        assert w.run(b'LIST (REMOTE RECURSIVEMATCH SUBSCRIBED) "" Parent')[0] == b"OK"
        # A subscribed child that a pattern lists itself makes the parent's CHILDINFO
        # redundant (RFC 5258 3.3 2.B, 3.5: "SHOULD suppress"), so Parent, which
        # satisfies no criterion itself, is not listed at all.
        assert w.run(b'LIST (SUBSCRIBED RECURSIVEMATCH) "" (Parent Parent/Child)') == (
            b"OK", [b'* LIST (\\HasNoChildren \\Subscribed) "/" Parent/Child'])
        assert w.run(b'LIST (SUBSCRIBED RECURSIVEMATCH) "" *Child') == (
            b"OK", [b'* LIST (\\HasNoChildren \\Subscribed) "/" Parent/Child'])
        assert w.run(b'LIST (SUBSCRIBED RECURSIVEMATCH) "" (Parent Trash)') == (b"OK", [
            b'* LIST (\\HasChildren) "/" Parent ("CHILDINFO" ("SUBSCRIBED"))',
            b'* LIST (\\HasNoChildren \\Trash \\Subscribed) "/" Trash'])
        # LSUB: Parent shows as \Noselect for "%" (RFC 3501 6.3.9), not for "*".
        assert w.run(b'LSUB "" %') == (b"OK", [
            b'* LSUB () "/" Archive', b'* LSUB () "/" Drafts',
            b'* LSUB (\\Noselect) "/" Parent',
            b'* LSUB () "/" Sent', b'* LSUB () "/" Trash'])
        assert w.run(b'LSUB "" Parent/*') == (b"OK", [b'* LSUB () "/" Parent/Child'])
        # With "*" the child matches itself and the unsubscribed parent is not listed.
        assert w.run(b'LSUB "" *') == (b"OK", [
            b'* LSUB () "/" Archive', b'* LSUB () "/" Drafts',
            b'* LSUB () "/" Parent/Child',
            b'* LSUB () "/" Sent', b'* LSUB () "/" Trash'])
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_list_subscribed_selection_lists_only_subscribed_names(imap_server):
    """RFC 5258 3: LIST (SUBSCRIBED) "MUST include exactly those mailbox names that
    match the canonical list pattern and are subscribed to", with accurate attributes."""
    def body():
        w = Wire(imap_server)
        w.ok(b"CREATE Parent/Child")
        w.ok(b"SUBSCRIBE Parent/Child")
        w.ok(b"UNSUBSCRIBE Junk")
        expected = [
            b'* LIST (\\HasNoChildren \\Archive \\Subscribed) "/" Archive',
            b'* LIST (\\HasNoChildren \\Drafts \\Subscribed) "/" Drafts',
            b'* LIST (\\HasNoChildren \\Subscribed) "/" Parent/Child',
            b'* LIST (\\HasNoChildren \\Sent \\Subscribed) "/" Sent',
            b'* LIST (\\HasNoChildren \\Trash \\Subscribed) "/" Trash',
        ]
        assert w.run(b'LIST (SUBSCRIBED) "" *') == (b"OK", expected)
        assert w.run(b'LIST (SUBSCRIBED) "" * RETURN (CHILDREN)') == (b"OK", expected)
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_create_delete_rename_subscribe(imap_server):
    def body():
        w = Wire(imap_server)
        assert w.run(b"CREATE Projects") == (b"OK", [])
        assert w.run(b"CREATE Projects")[0] == b"NO [ALREADYEXISTS]"
        assert w.run(b"CREATE INBOX")[0] == b"NO [ALREADYEXISTS]"
        assert w.run(b"CREATE inbox")[0] == b"NO [ALREADYEXISTS]"
        # A trailing delimiter is allowed and not part of the name (RFC 3501 6.3.3).
        assert w.run(b"CREATE Notes/") == (b"OK", [])
        assert w.run(b'LIST "" Notes*') == (b"OK", [b'* LIST (\\HasNoChildren) "/" Notes'])
        # Superior names are created too.
        assert w.run(b"CREATE Projects/2024/Q1") == (b"OK", [])
        assert w.run(b'LIST "" Projects*') == (b"OK", [
            b'* LIST (\\HasChildren) "/" Projects',
            b'* LIST (\\HasChildren) "/" Projects/2024',
            b'* LIST (\\HasNoChildren) "/" Projects/2024/Q1'])
        w.append(b"Projects/2024/Q1", M1)
        # RENAME moves the inferior names along (RFC 3501 6.3.5).
        assert w.run(b"RENAME Projects/2024 Projects/Old") == (b"OK", [])
        assert w.run(b'LIST "" Projects*') == (b"OK", [
            b'* LIST (\\HasChildren) "/" Projects',
            b'* LIST (\\HasChildren) "/" Projects/Old',
            b'* LIST (\\HasNoChildren) "/" Projects/Old/Q1'])
        assert w.run(b"STATUS Projects/Old/Q1 (MESSAGES)") == (
            b"OK", [b"* STATUS Projects/Old/Q1 (MESSAGES 1)"])
        assert w.run(b"RENAME Nope Other")[0] == b"NO [NONEXISTENT]"
        assert w.run(b"RENAME Notes Projects")[0] == b"NO [ALREADYEXISTS]"
        # RENAME INBOX moves its messages to the new name; INBOX stays, empty.
        w.append(b"INBOX", M2)
        assert w.run(b"RENAME INBOX Saved") == (b"OK", [])
        assert w.run(b"STATUS INBOX (MESSAGES)") == (b"OK", [b"* STATUS INBOX (MESSAGES 0)"])
        assert w.run(b"STATUS Saved (MESSAGES)") == (b"OK", [b"* STATUS Saved (MESSAGES 1)"])
        # DELETE.
        assert w.run(b"DELETE Notes") == (b"OK", [])
        assert w.run(b'LIST "" Notes') == (b"OK", [])
        assert w.run(b"DELETE Notes")[0] == b"NO [NONEXISTENT]"
        assert w.run(b"DELETE INBOX")[0].startswith(b"NO")
        # A mailbox with inferiors loses its messages and becomes \Noselect (6.3.4).
        w.append(b"Projects", M3)
        assert w.run(b"DELETE Projects") == (b"OK", [])
        assert w.run(b'LIST "" Projects') == (
            b"OK", [b'* LIST (\\Noselect \\HasChildren) "/" Projects'])
        assert w.run(b"SELECT Projects")[0].startswith(b"NO")
        # SUBSCRIBE / UNSUBSCRIBE, seen by LSUB.
        assert w.run(b"SUBSCRIBE Saved") == (b"OK", [])
        assert w.run(b'LSUB "" Saved') == (b"OK", [b'* LSUB () "/" Saved'])
        assert w.run(b"UNSUBSCRIBE Saved") == (b"OK", [])
        assert w.run(b'LSUB "" Saved') == (b"OK", [])
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_non_ascii_mailbox_names_in_modified_utf7(imap_server):
    def body():
        w = Wire(imap_server)
        assert w.run(b"CREATE &ANw-ber/Stra&AN8-e") == (b"OK", [])
        assert w.run(b'LIST "" &ANw-ber*') == (b"OK", [
            b'* LIST (\\HasChildren) "/" &ANw-ber',
            b'* LIST (\\HasNoChildren) "/" &ANw-ber/Stra&AN8-e'])
        status, untagged = w.run(b"SELECT &ANw-ber/Stra&AN8-e")
        assert status == b"OK [READ-WRITE]"
        assert b"* 0 EXISTS" in untagged
        status, _ = w.append(b'"&ANw-ber/Stra&AN8-e"', M1)
        assert status.startswith(b"OK [APPENDUID ")
        assert w.run(b"STATUS &ANw-ber/Stra&AN8-e (MESSAGES)") == (
            b"OK", [b"* STATUS &ANw-ber/Stra&AN8-e (MESSAGES 1)"])
        # Not modified UTF-7: 8-bit bytes, an unterminated shift, a needless shift.
        assert w.run(b"CREATE \"\xc3\x9cber\"")[0].startswith((b"NO", b"BAD"))
        assert w.run(b"CREATE &ANw")[0].startswith((b"NO", b"BAD"))
        assert w.run(b"CREATE &AGE-")[0].startswith((b"NO", b"BAD"))
        w.close()

        # imapclient encodes and decodes folder names itself.
        client = imapclient.IMAPClient(imap_server.host, port=imap_server.port, ssl=False,
                                       timeout=20)
        client.login(USER, PASSWORD)
        client.create_folder("Köln")
        names = [name for _flags, _delim, name in client.list_folders()]
        assert "Über/Straße" in names and "Über" in names and "Köln" in names
        info = client.select_folder("Über/Straße")
        assert info[b"EXISTS"] == 1
        client.rename_folder("Köln", "Zürich/Köln")
        names = [name for _flags, _delim, name in client.list_folders("", "Z*")]
        assert names == ["Zürich", "Zürich/Köln"]
        client.logout()

    await in_thread(body)


# -- STATUS, APPEND --------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_status_and_append(imap_server):
    def body():
        w = Wire(imap_server)
        _, untagged = w.run(b"EXAMINE INBOX")
        uidvalidity = int(code_value(untagged, b"UIDVALIDITY"))
        w.ok(b"UNSELECT")
        assert w.run(b"STATUS INBOX (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN APPENDLIMIT)") == (
            b"OK", [b"* STATUS INBOX (MESSAGES 0 RECENT 0 UIDNEXT 1 UIDVALIDITY %d UNSEEN 0 "
                    b"APPENDLIMIT %d)" % (uidvalidity, APPENDLIMIT)])
        # Flags and an internal date; APPENDUID (RFC 4315) with the mailbox's UIDVALIDITY.
        assert w.append(b"INBOX", M1, b"\\Seen \\Flagged $Important",
                        b"05-Mar-2024 10:11:12 +0100") == (
            b"OK [APPENDUID %d 1]" % uidvalidity, [])
        # A synchronizing literal: the server asks for it with "+".
        assert w.append(b"INBOX", M2, plus=False) == (b"OK [APPENDUID %d 2]" % uidvalidity, [])
        # LITERAL+ with a date but no flags.
        assert w.append(b"INBOX", M3, date=b" 7-Jan-2023 23:59:59 -0800") == (
            b"OK [APPENDUID %d 3]" % uidvalidity, [])
        # A missing mailbox: NO [TRYCREATE] (RFC 3501 6.3.11); nothing stored anywhere.
        assert w.append(b"Missing", M1) == (b"NO [TRYCREATE]", [])
        assert w.append(b"Missing", M1, plus=False) == (b"NO [TRYCREATE]", [])
        # Bad arguments.
        assert w.append(b"INBOX", M1, b"\\Recent")[0].startswith(b"BAD")
        assert w.append(b"INBOX", M1, date=b"31-Feb-2024 00:00:00 +0000")[0].startswith(b"BAD")
        assert w.append(b"INBOX", M1, date=b"2024-03-05T10:11:12Z")[0].startswith(b"BAD")
        assert w.run(b"STATUS INBOX (MESSAGES RECENT UIDNEXT UNSEEN)") == (
            b"OK", [b"* STATUS INBOX (MESSAGES 3 RECENT 3 UIDNEXT 4 UNSEEN 2)"])
        assert w.run(b"STATUS Missing (MESSAGES)")[0].startswith(b"NO")
        assert w.run(b"STATUS INBOX (BOGUS)")[0].startswith(b"BAD")
        assert w.run(b"STATUS INBOX ()")[0].startswith(b"BAD")
        assert w.run(b"STATUS Archive (APPENDLIMIT)") == (
            b"OK", [b"* STATUS Archive (APPENDLIMIT %d)" % APPENDLIMIT])

        _, untagged = w.run(b"SELECT INBOX")
        assert b"* 3 EXISTS" in untagged
        _, untagged = w.run(b"FETCH 1:3 (FLAGS INTERNALDATE RFC822.SIZE)")
        got = fetch_map(untagged)
        assert sorted(got[1][b"FLAGS"]) == sorted([b"\\Seen", b"\\Flagged", b"$Important",
                                                    b"\\Recent"])
        assert got[2][b"FLAGS"] == [b"\\Recent"]
        assert as_instant(got[1][b"INTERNALDATE"]) == as_instant(b"05-Mar-2024 10:11:12 +0100")
        assert as_instant(got[3][b"INTERNALDATE"]) == as_instant(b"07-Jan-2023 23:59:59 -0800")
        assert [got[i][b"RFC822.SIZE"] for i in (1, 2, 3)] == [len(M1), len(M2), len(M3)]
        # Without a date, the internal date is the time of the APPEND.
        now = datetime.datetime.now(datetime.timezone.utc)
        assert abs((as_instant(got[2][b"INTERNALDATE"]) - now).total_seconds()) < 120
        w.close()

    await in_thread(body)


# -- SELECT and EXAMINE ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_select_and_examine_exact(imap_server):
    def body():
        w = Wire(imap_server)
        uidvalidity = load_four(w)
        status, untagged = w.run(b"SELECT INBOX")
        assert status == b"OK [READ-WRITE]"
        modseq = code_value(untagged, b"HIGHESTMODSEQ")
        assert modseq.isdigit() and int(modseq) >= 1
        assert untagged == [
            b"* FLAGS (" + SYSTEM_FLAGS + b" $Work)",
            b"* OK [PERMANENTFLAGS (" + SYSTEM_FLAGS + b" $Work \\*)]",
            b"* 4 EXISTS",
            b"* 4 RECENT",
            b"* OK [UNSEEN 2]",
            b"* OK [UIDVALIDITY %d]" % uidvalidity,
            b"* OK [UIDNEXT 5]",
            b"* OK [HIGHESTMODSEQ " + modseq + b"]",
        ]
        # EXAMINE: read-only, no permanent flags; the previous mailbox is CLOSED
        # (RFC 7162 3.2.11, required with QRESYNC advertised).
        status, untagged = w.run(b"EXAMINE INBOX")
        assert status == b"OK [READ-ONLY]"
        assert untagged == [
            b"* OK [CLOSED]",
            b"* FLAGS (" + SYSTEM_FLAGS + b" $Work)",
            b"* OK [PERMANENTFLAGS ()]",
            b"* 4 EXISTS",
            b"* 0 RECENT",
            b"* OK [UNSEEN 2]",
            b"* OK [UIDVALIDITY %d]" % uidvalidity,
            b"* OK [UIDNEXT 5]",
            b"* OK [HIGHESTMODSEQ " + modseq + b"]",
        ]
        # Read-only: STORE, EXPUNGE and MOVE are refused; FETCH BODY[] sets no \Seen.
        assert w.run(b"STORE 1 +FLAGS (\\Deleted)")[0].startswith(b"NO")
        assert w.run(b"EXPUNGE")[0].startswith(b"NO")
        assert w.run(b"MOVE 1 Archive")[0].startswith(b"NO")
        _, untagged = w.run(b"FETCH 2 BODY[]")
        assert fetch_map(untagged)[2][b"BODY[]"] == M2
        assert w.run(b"FETCH 2 FLAGS") == (b"OK", [b"* 2 FETCH (FLAGS (\\Flagged $Work))"])
        # An empty mailbox: no UNSEEN code.
        status, untagged = w.run(b"SELECT Archive")
        assert status == b"OK [READ-WRITE]"
        assert untagged[0] == b"* OK [CLOSED]"
        assert b"* 0 EXISTS" in untagged and b"* 0 RECENT" in untagged
        assert not any(u.startswith(b"* OK [UNSEEN") for u in untagged)
        assert w.run(b"SELECT Nope")[0].startswith(b"NO")
        # A failed SELECT leaves no mailbox selected (RFC 3501 6.3.1).
        assert w.run(b"FETCH 1 FLAGS")[0].startswith(b"BAD")
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_examine_shows_recent(imap_server):
    """RFC 3501 6.3.2: EXAMINE "returns the same output" as SELECT and "MUST NOT cause
    messages to lose the \\Recent flag"; 2.3.2: "if the session is read-only,
    subsequent sessions will also see \\Recent set" - so a read-only session sees it
    too (Dovecot: EXAMINE of a mailbox with new mail says "* 2 RECENT")."""
    def body():
        w = Wire(imap_server)
        w.append(b"Archive", M1)
        w.append(b"Archive", M2)
        _, untagged = w.run(b"EXAMINE Archive")
        assert b"* 2 RECENT" in untagged
        assert w.run(b"FETCH 1:2 FLAGS") == (b"OK", [
            b"* 1 FETCH (FLAGS (\\Recent))", b"* 2 FETCH (FLAGS (\\Recent))"])
        # EXAMINE claimed nothing: a SELECT elsewhere still gets them as recent, and
        # after that nobody else does.
        other = Wire(imap_server)
        _, untagged = other.run(b"SELECT Archive")
        assert b"* 2 RECENT" in untagged
        assert other.run(b"FETCH 1:2 FLAGS") == (b"OK", [
            b"* 1 FETCH (FLAGS (\\Recent))", b"* 2 FETCH (FLAGS (\\Recent))"])
        # STATUS of the selected mailbox counts the session's own \Recent messages, as
        # Dovecot does.
        assert other.run(b"STATUS Archive (MESSAGES RECENT)") == (b"OK", [
            b"* STATUS Archive (MESSAGES 2 RECENT 2)"])
        third = Wire(imap_server)
        _, untagged = third.run(b"EXAMINE Archive")
        assert b"* 0 RECENT" in untagged
        assert third.run(b"STATUS Archive (RECENT)") == (
            b"OK", [b"* STATUS Archive (RECENT 0)"])
        for c in (w, other, third):
            c.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_recreated_mailbox_messages_are_recent(imap_server):
    """A mailbox deleted and created again under the same name is a new mailbox (new
    UIDVALIDITY, UIDs from 1): its new messages are \\Recent to the first SELECT, not
    hidden below the floor the old one had reached (imaptest's scripts re-create
    their mailbox for every script and caught this)."""
    def body():
        w = Wire(imap_server)
        assert w.run(b"CREATE Box") == (b"OK", [])
        w.append(b"Box", M1)
        w.append(b"Box", M2)
        _, untagged = w.run(b"SELECT Box")
        assert b"* 2 RECENT" in untagged
        assert w.run(b"CLOSE") == (b"OK", [])
        assert w.run(b"DELETE Box") == (b"OK", [])
        assert w.run(b"CREATE Box") == (b"OK", [])
        w.append(b"Box", M2)
        w.append(b"Box", M1)
        assert w.run(b"STATUS Box (MESSAGES RECENT UIDNEXT)") == (
            b"OK", [b"* STATUS Box (MESSAGES 2 RECENT 2 UIDNEXT 3)"])
        _, untagged = w.run(b"SELECT Box")
        assert b"* 2 EXISTS" in untagged and b"* 2 RECENT" in untagged
        assert w.run(b"FETCH 1:2 FLAGS") == (b"OK", [
            b"* 1 FETCH (FLAGS (\\Recent))", b"* 2 FETCH (FLAGS (\\Recent))"])
        assert w.run(b"SEARCH RECENT") == (b"OK", [b"* SEARCH 1 2"])
        # Claimed by this session: another SELECT sees them, but not as recent.
        other = Wire(imap_server)
        _, untagged = other.run(b"SELECT Box")
        assert b"* 0 RECENT" in untagged
        assert other.run(b"SEARCH NEW") == (b"OK", [b"* SEARCH"])
        for c in (w, other):
            c.close()

    await in_thread(body)


# -- FETCH ----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_fetch_items_exact(imap_server):
    def body():
        w = Wire(imap_server)
        load_four(w)
        w.ok(b"SELECT INBOX")
        assert w.run(b"FETCH 1:4 (RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY)") == (b"OK", [
            b'* 1 FETCH (RFC822.SIZE 209 ENVELOPE ("Mon, 04 Mar 2024 10:00:00 +0000" '
            b'"Alpha report" (("Alice Example" NIL "alice" "example.org")) (("Alice Example" '
            b'NIL "alice" "example.org")) (("Alice Example" NIL "alice" "example.org")) '
            b'(("Bob" NIL "bob" "example.net")) NIL NIL NIL "<m1@example.org>") BODYSTRUCTURE '
            b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 47 2 NIL NIL NIL NIL) '
            b'BODY ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 47 2))',
            b'* 2 FETCH (RFC822.SIZE 518 ENVELOPE ("Sun, 10 Mar 2024 12:30:00 +0100" '
            b'"Beta invoice" ((NIL NIL "carol" "example.com")) ((NIL NIL "carol" '
            b'"example.com")) ((NIL NIL "carol" "example.com")) ((NIL NIL "bob" '
            b'"example.net")) (("Dave" NIL "dave" "example.com")) NIL NIL NIL) BODYSTRUCTURE '
            b'(("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 33 0 NIL NIL NIL '
            b'NIL)("application" "pdf" ("name" "invoice.pdf") NIL NIL "base64" 20 NIL '
            b'("attachment" ("filename" "invoice.pdf")) NIL NIL) "mixed" ("boundary" "XYZ") '
            b'NIL NIL NIL) BODY (("text" "plain" ("charset" "utf-8") NIL NIL '
            b'"quoted-printable" 33 0)("application" "pdf" ("name" "invoice.pdf") NIL NIL '
            b'"base64" 20) "mixed"))',
            b'* 3 FETCH (RFC822.SIZE 4057 ENVELOPE ("Wed, 20 Mar 2024 08:15:00 -0500" '
            b'"Gamma newsletter" (("Erin" NIL "erin" "example.org")) (("Erin" NIL "erin" '
            b'"example.org")) (("Erin" NIL "erin" "example.org")) ((NIL NIL "alice" '
            b'"example.org")) NIL NIL NIL NIL) BODYSTRUCTURE ("text" "plain" ("charset" '
            b'"us-ascii") NIL NIL "7bit" 3920 80 NIL NIL NIL NIL) BODY ("text" "plain" '
            b'("charset" "us-ascii") NIL NIL "7bit" 3920 80))',
            b'* 4 FETCH (RFC822.SIZE 287 ENVELOPE ("Mon, 01 Apr 2024 09:00:00 +0200" '
            b'"=?utf-8?q?Caf=C3=A9_meeting?=" (("=?utf-8?q?Fran=C3=A7ois?=" NIL "francois" '
            b'"example.fr")) (("=?utf-8?q?Fran=C3=A7ois?=" NIL "francois" "example.fr")) '
            b'(("=?utf-8?q?Fran=C3=A7ois?=" NIL "francois" "example.fr")) ((NIL NIL "bob" '
            b'"example.net")) NIL ((NIL NIL "secret" "example.org")) NIL NIL) BODYSTRUCTURE '
            b'("text" "plain" ("charset" "utf-8") NIL NIL "8bit" 31 1 NIL NIL NIL NIL) BODY '
            b'("text" "plain" ("charset" "utf-8") NIL NIL "8bit" 31 1))',
        ])
        assert w.run(b"FETCH 2 (BODY.PEEK[1] BODY.PEEK[2] BODY.PEEK[1.MIME] "
                     b"BODY.PEEK[HEADER.FIELDS (Subject To)] BODY.PEEK[HEADER.FIELDS.NOT "
                     b"(Subject To Date From Cc MIME-Version)] BODY.PEEK[TEXT]<0.10> "
                     b"BODY.PEEK[]<10.5> BODY.PEEK[]<100000.5>)") == (b"OK", [
            b"* 2 FETCH (BODY[1] {33}\r\nInvoice attached, total 42 euros. "
            b"BODY[2] {20}\r\nJVBERi0xLjQKJcfsj6IK "
            b"BODY[1.MIME] {88}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n "
            b"BODY[HEADER.FIELDS (SUBJECT TO)] {46}\r\nTo: bob@example.net\r\n"
            b"Subject: Beta invoice\r\n\r\n "
            b"BODY[HEADER.FIELDS.NOT (SUBJECT TO DATE FROM CC MIME-VERSION)] {49}\r\n"
            b'Content-Type: multipart/mixed; boundary="XYZ"\r\n\r\n '
            b"BODY[TEXT]<0> {10}\r\n--XYZ\r\nCon "
            b"BODY[]<10> {5}\r\n 10 M "
            b"BODY[]<100000> {0}\r\n)"])
        header = M1[:M1.index(b"\r\n\r\n") + 4]
        text = M1[len(header):]
        assert w.run(b"FETCH 1 (BODY.PEEK[HEADER] BODY.PEEK[TEXT] BODY.PEEK[1] RFC822.HEADER "
                     b"BODY.PEEK[]<0.10>)") == (b"OK", [
            b"* 1 FETCH (BODY[HEADER] {%d}\r\n%s BODY[TEXT] {%d}\r\n%s BODY[1] {%d}\r\n%s "
            b"RFC822.HEADER {%d}\r\n%s BODY[]<0> {10}\r\nDate: Mon,)" % (
                len(header), header, len(text), text, len(text), text, len(header), header)])
        # FLAGS and INTERNALDATE, and the macros.
        _, untagged = w.run(b"FETCH 1:4 (FLAGS INTERNALDATE)")
        got = fetch_map(untagged)
        for i, (_m, flags, date) in enumerate(FOUR, 1):
            assert sorted(got[i][b"FLAGS"]) == sorted(flags.split() + [b"\\Recent"])
            assert as_instant(got[i][b"INTERNALDATE"]) == as_instant(date)
        _, untagged = w.run(b"FETCH 3 FAST")
        assert set(fetch_map(untagged)[3]) == {b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"}
        _, untagged = w.run(b"FETCH 3 ALL")
        assert set(fetch_map(untagged)[3]) == {b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE",
                                                b"ENVELOPE"}
        _, untagged = w.run(b"FETCH 3 FULL")
        assert set(fetch_map(untagged)[3]) == {b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE",
                                                b"ENVELOPE", b"BODY"}
        # UID FETCH always includes UID; "*" and reversed ranges; UIDs past the end
        # are simply not there.
        assert w.run(b"UID FETCH 4:* (RFC822.SIZE)") == (
            b"OK", [b"* 4 FETCH (UID 4 RFC822.SIZE 287)"])
        assert w.run(b"UID FETCH 9:* (FLAGS)") == (b"OK", [b"* 4 FETCH (UID 4 FLAGS (\\Draft "
                                                             b"\\Recent))"])
        assert w.run(b"UID FETCH 9:7 (FLAGS)") == (b"OK", [])
        assert w.run(b"UID FETCH 10:20 (FLAGS)") == (b"OK", [])
        _, untagged = w.run(b"FETCH 3,1 (RFC822.SIZE)")
        assert sorted(fetch_map(untagged)) == [1, 3]
        # Errors.
        assert w.run(b"FETCH 5 FLAGS")[0].startswith(b"BAD")
        assert w.run(b"FETCH 1 (FLAGS")[0].startswith(b"BAD")
        assert w.run(b"FETCH 1 BOGUS")[0].startswith(b"BAD")
        assert w.run(b"FETCH 1 BODY[4]")[0] in (b"OK", b"NO")
        assert w.run(b"FETCH 1 BODY[HEADER.FIELDS ()]")[0].startswith(b"BAD")
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_seen_set_by_body_not_by_peek(imap_server):
    def body():
        w = Wire(imap_server)
        for m in (M1, M2, M3):
            w.append(b"INBOX", m)
        w.ok(b"SELECT INBOX")
        # BODY.PEEK[] and RFC822.HEADER leave \Seen alone.
        w.ok(b"FETCH 1 (BODY.PEEK[] BODY.PEEK[TEXT] RFC822.HEADER RFC822.SIZE)")
        assert w.run(b"FETCH 1:3 FLAGS") == (b"OK", [
            b"* 1 FETCH (FLAGS (\\Recent))",
            b"* 2 FETCH (FLAGS (\\Recent))",
            b"* 3 FETCH (FLAGS (\\Recent))"])
        # BODY[] sets \Seen, and the response carries the new FLAGS (RFC 3501 6.4.5).
        status, untagged = w.run(b"FETCH 1 BODY[]")
        assert status == b"OK"
        assert len(untagged) == 1
        got = fetch_map(untagged)[1]
        assert got[b"BODY[]"] == M1
        assert sorted(got[b"FLAGS"]) == [b"\\Recent", b"\\Seen"]
        # BODY[TEXT] and RFC822 set it too; RFC822.TEXT as well.
        _, untagged = w.run(b"FETCH 2 BODY[1]")
        assert sorted(fetch_map(untagged)[2][b"FLAGS"]) == [b"\\Recent", b"\\Seen"]
        _, untagged = w.run(b"FETCH 3 RFC822")
        got = fetch_map(untagged)[3]
        assert got[b"RFC822"] == M3
        assert sorted(got[b"FLAGS"]) == [b"\\Recent", b"\\Seen"]
        # Fetching again: already \Seen, no extra FLAGS item.
        assert w.run(b"FETCH 1 BODY[]<0.4>") == (b"OK", [
            b"* 1 FETCH (BODY[]<0> {4}\r\nDate)"])
        _, untagged = w.run(b"SEARCH UNSEEN")
        assert untagged == [b"* SEARCH"]
        w.close()

    await in_thread(body)


# -- STORE --------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_store_flags_exact(imap_server):
    def body():
        w = Wire(imap_server)
        for m in (M1, M2, M3):
            w.append(b"INBOX", m)
        w.ok(b"SELECT INBOX")
        # A keyword new to the mailbox: its FLAGS first (RFC 3501 7.2.6, as Dovecot).
        assert w.run(b"STORE 1:2 +FLAGS (\\Flagged $Later)") == (b"OK", [
            b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Later)",
            b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Later \\*)]",
            b"* 1 FETCH (FLAGS (\\Flagged $Later \\Recent))",
            b"* 2 FETCH (FLAGS (\\Flagged $Later \\Recent))"])
        assert w.run(b"STORE 2 -FLAGS (\\Flagged)") == (b"OK", [
            b"* 2 FETCH (FLAGS ($Later \\Recent))"])
        assert w.run(b"STORE 3 FLAGS (\\Answered \\Seen)") == (b"OK", [
            b"* 3 FETCH (FLAGS (\\Answered \\Seen \\Recent))"])
        # A flag without parentheses and several of them (RFC 3501 flag-list or 1*flag).
        assert w.run(b"STORE 3 +FLAGS \\Draft $X") == (b"OK", [
            b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Later $X)",
            b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Later $X \\*)]",
            b"* 3 FETCH (FLAGS (\\Answered \\Seen \\Draft $X \\Recent))"])
        # .SILENT: no untagged FETCH for our own change.
        assert w.run(b"STORE 1:3 +FLAGS.SILENT (\\Deleted)") == (b"OK", [])
        assert w.run(b"STORE 1 FLAGS.SILENT ()") == (b"OK", [])
        assert w.run(b"STORE 2 -FLAGS.SILENT ($Later \\Deleted)") == (b"OK", [])
        assert w.run(b"FETCH 1:3 FLAGS") == (b"OK", [
            b"* 1 FETCH (FLAGS (\\Recent))",
            b"* 2 FETCH (FLAGS (\\Recent))",
            b"* 3 FETCH (FLAGS (\\Answered \\Deleted \\Seen \\Draft $X \\Recent))"])
        # UID STORE answers with UID in each FETCH; STORE does not (as Dovecot).
        assert w.run(b"UID STORE 2 +FLAGS (\\Seen)") == (b"OK", [
            b"* 2 FETCH (UID 2 FLAGS (\\Seen \\Recent))"])
        # Keywords in use are part of FLAGS and PERMANENTFLAGS at the next SELECT.
        _, untagged = w.run(b"SELECT INBOX")
        assert untagged[1].startswith(b"* FLAGS (" + SYSTEM_FLAGS + b" ")
        assert b"$X" in untagged[1][:-1].split()
        assert b"$X" in untagged[2].split(b"(")[1].split()
        # Errors: \Recent cannot be stored, unknown system flags, bad syntax, bad numbers.
        assert w.run(b"STORE 1 +FLAGS (\\Recent)")[0].startswith(b"BAD")
        assert w.run(b"STORE 1 +FLAGS (\\Bogus)")[0].startswith(b"BAD")
        assert w.run(b"STORE 1 FLAGZ (\\Seen)")[0].startswith(b"BAD")
        assert w.run(b"STORE 4 +FLAGS (\\Seen)")[0].startswith(b"BAD")
        assert w.run(b"UID STORE 40 +FLAGS (\\Seen)") == (b"OK", [])
        w.close()

    await in_thread(body)


# -- SEARCH and ESEARCH ----------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_search_keys(imap_server):
    def body():
        w = Wire(imap_server)
        load_four(w)
        w.append(b"INBOX", lines(b"Subject: small", b"", b"x"), b"\\Deleted",
                 b"15-Mar-2024 00:00:00 +0000")
        w.ok(b"SELECT INBOX")
        # Expunge nothing but make UIDs differ from sequence numbers: UID 6 = M1 again.
        w.append(b"INBOX", M1, b"$Copy", b"02-Apr-2024 00:00:00 +0000")
        w.ok(b"STORE 5 -FLAGS (\\Deleted)")
        w.ok(b"STORE 1 +FLAGS (\\Deleted)")
        w.ok(b"EXPUNGE")
        # Now: seq 1..5 = UIDs 2, 3, 4, 5, 6.

        def search(criteria, uid=False):
            status, untagged = w.run((b"UID SEARCH " if uid else b"SEARCH ") + criteria)
            assert status == b"OK", (criteria, status)
            assert len(untagged) == 1 and untagged[0].startswith(b"* SEARCH"), untagged
            return [int(n) for n in untagged[0].split()[2:]]

        cases = {
            b"ALL": [1, 2, 3, 4, 5],
            b"FLAGGED": [1],
            b"UNFLAGGED": [2, 3, 4, 5],
            b"SEEN": [2],
            b"UNSEEN": [1, 3, 4, 5],
            b"ANSWERED": [2],
            b"UNANSWERED": [1, 3, 4, 5],
            b"DRAFT": [3],
            b"UNDRAFT": [1, 2, 4, 5],
            b"DELETED": [],
            b"UNDELETED": [1, 2, 3, 4, 5],
            b"KEYWORD $Work": [1],
            b"KEYWORD $work": [1],  # keywords compare case-insensitively (Dovecot agrees)
            b"UNKEYWORD $Work": [2, 3, 4, 5],
            b"KEYWORD $Copy": [5],
            b"KEYWORD $Nothing": [],
            b"FROM carol": [1],
            b"FROM example.org": [2, 5],
            b'FROM "Erin"': [2],
            b"TO bob": [1, 3, 5],
            b"CC dave": [1],
            b"BCC secret": [3],
            b"SUBJECT invoice": [1],
            b"SUBJECT INVOICE": [1],
            b'SUBJECT "Alpha report"': [5],
            b"HEADER X-Priority 1": [2],
            b'HEADER X-Priority ""': [2],
            b'HEADER Message-ID "<m1@"': [5],
            b"HEADER X-Missing x": [],
            b"BODY lazy": [5],
            b"BODY newsletter": [2],
            b"BODY Subject": [],
            b"TEXT Subject": [1, 2, 3, 4, 5],
            b"TEXT lazy": [5],
            b"TEXT bob@example.net": [1, 3, 5],
            b"LARGER 300": [1, 2],
            b"LARGER 4056": [2],
            b"LARGER 4057": [],
            b"SMALLER 210": [4, 5],
            b"SMALLER 30": [4],
            # Internal dates (the date only, RFC 3501 6.4.4).
            b"BEFORE 10-Mar-2024": [],
            b"BEFORE 11-Mar-2024": [1],
            b"ON 20-Mar-2024": [2],
            b"SINCE 20-Mar-2024": [2, 3, 5],
            b"SINCE 1-Apr-2024": [3, 5],
            # Date: header dates, in their own zone.
            # Message 4 has no Date: it counts as sent in 1970, as in Dovecot.
            b"SENTBEFORE 5-Mar-2024": [4, 5],
            b"SENTON 10-Mar-2024": [1],
            b"SENTSINCE 20-Mar-2024": [2, 3],
            # Sequence sets, UID sets.
            b"1:2": [1, 2],
            b"2,4:*": [2, 4, 5],
            b"*": [5],
            b"UID 2": [1],
            b"UID 1:3": [1, 2],
            b"UID 6:*": [5],
            b"UID 100:*": [5],  # "*" is the largest UID: 100:* means 6:100
            # Combinations.
            b"FLAGGED SEEN": [],
            b"OR FLAGGED SEEN": [1, 2],
            b"OR OR FLAGGED SEEN DRAFT": [1, 2, 3],
            b"NOT SEEN": [1, 3, 4, 5],
            b"NOT NOT SEEN": [2],
            b"NOT (OR FROM carol DRAFT)": [2, 4, 5],
            b"NOT (FROM carol FLAGGED)": [2, 3, 4, 5],
            b"NOT (TO bob CC dave)": [2, 3, 4, 5],
            b"OR (SUBJECT alpha) (1)": [1, 5],
            b"OR FLAGGED (SUBJECT alpha SEEN)": [1],
            # Every message arrived while this session had INBOX selected.
            b"RECENT": [1, 2, 3, 4, 5],
            b"NEW": [1, 3, 4, 5],
            b"OLD": [],
            b"UNSEEN SINCE 1-Mar-2024 NOT KEYWORD $Copy": [1, 3, 4],
            b"CHARSET US-ASCII SUBJECT report": [5],
        }
        for criteria, expected in cases.items():
            assert search(criteria) == expected, criteria
        uids = [2, 3, 4, 5, 6]
        for criteria, expected in cases.items():
            assert search(criteria, uid=True) == [uids[i - 1] for i in expected], criteria
        # UTF-8 search strings as literals, in decoded headers and bodies.
        cafe = "Café".encode()
        assert search(b"CHARSET UTF-8 SUBJECT {%d+}\r\n%s" % (len(cafe), cafe)) == [3]
        assert search(b"CHARSET UTF-8 BODY {%d+}\r\n%s" % (len(cafe), cafe)) == [3]
        assert search(b"CHARSET UTF-8 FROM {%d+}\r\n%s" % (len("Franç".encode()),
                                                             "Franç".encode())) == [3]
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_esearch_return_options(imap_server):
    def body():
        w = Wire(imap_server)
        for m in (M1, M2, M3, M1, M2, M3, M1):
            w.append(b"INBOX", m)
        w.ok(b"SELECT INBOX")
        w.ok(b"STORE 2 +FLAGS (\\Deleted)")
        w.ok(b"EXPUNGE")
        # seq 1..6 = UIDs 1, 3, 4, 5, 6, 7; M1 is at UIDs 1, 4, 7 = seqs 1, 3, 6.
        tag = w.next_tag()
        assert w.run(b"SEARCH RETURN (MIN MAX COUNT ALL) SUBJECT alpha", tag=tag) == (b"OK", [
            b'* ESEARCH (TAG "' + tag + b'") MIN 1 MAX 6 ALL 1,3,6 COUNT 3'])
        tag = w.next_tag()
        assert w.run(b"UID SEARCH RETURN (MIN MAX COUNT ALL) SUBJECT alpha", tag=tag) == (
            b"OK", [b'* ESEARCH (TAG "' + tag + b'") UID MIN 1 MAX 7 ALL 1,4,7 COUNT 3'])
        tag = w.next_tag()
        assert w.run(b"UID SEARCH RETURN (ALL) ALL", tag=tag) == (
            b"OK", [b'* ESEARCH (TAG "' + tag + b'") UID ALL 1,3:7'])
        tag = w.next_tag()
        assert w.run(b"SEARCH RETURN (COUNT) ALL", tag=tag) == (
            b"OK", [b'* ESEARCH (TAG "' + tag + b'") COUNT 6'])
        # RETURN () means ALL (RFC 4731 3.1).
        tag = w.next_tag()
        assert w.run(b"SEARCH RETURN () 2:4", tag=tag) == (
            b"OK", [b'* ESEARCH (TAG "' + tag + b'") ALL 2:4'])
        # Nothing found: MIN, MAX and ALL are left out, COUNT is 0.
        tag = w.next_tag()
        assert w.run(b"SEARCH RETURN (MIN MAX COUNT ALL) SUBJECT nothing", tag=tag) == (
            b"OK", [b'* ESEARCH (TAG "' + tag + b'") COUNT 0'])
        tag = w.next_tag()
        assert w.run(b"SEARCH RETURN (MIN) SUBJECT nothing", tag=tag) == (
            b"OK", [b'* ESEARCH (TAG "' + tag + b'")'])
        assert w.run(b"SEARCH RETURN (BOGUS) ALL")[0].startswith(b"BAD")
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_search_parenthesized_first_key(imap_server):
    """RFC 3501 9: ``search = "SEARCH" [SP "CHARSET" SP astring] 1*(SP search-key)`` and
    ``search-key =/ "(" search-key *(SP search-key) ")"``: a parenthesized list may be the
    first key, as it may be any other."""
    def body():
        w = Wire(imap_server)
        load_four(w)
        w.ok(b"SELECT INBOX")
        assert w.run(b"SEARCH (TO bob)") == (b"OK", [b"* SEARCH 1 2 4"])
        assert w.run(b"SEARCH (TO bob) (NOT CC dave)") == (b"OK", [b"* SEARCH 1 4"])
        assert w.run(b"UID SEARCH (OR FLAGGED DRAFT) UNSEEN") == (b"OK", [b"* SEARCH 2 4"])
        tag = w.next_tag()
        assert w.run(b"SEARCH RETURN (COUNT) (SEEN)", tag=tag) == (
            b"OK", [b'* ESEARCH (TAG "' + tag + b'") COUNT 2'])
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_search_address_keys_see_the_envelope(imap_server):
    """RFC 3501 6.4.4: FROM, TO, CC and BCC match "the envelope structure's" field, so an
    address written with comments between its parts is found by the address itself
    (imaptest's search-addresses script caught this; Dovecot finds it too)."""
    def body():
        w = Wire(imap_server)
        assert w.run(b"CREATE Addr") == (b"OK", [])
        w.append(b"Addr", b"From: Ann <ann@example.org>\r\nTo: bob@example.org\r\n\r\n1\r\n")
        w.append(b"Addr", b"From: <ann (the boss)@ (at home) example.org>\r\n"
                          b"Cc: bob@example.org (Bob B)\r\n\r\n2\r\n")
        w.append(b"Addr", b"From: ann@example.net\r\nBcc: team: bob@example.org, "
                          b"=?utf-8?q?Cl=C3=A9o?= <cleo@example.org>;\r\n\r\n3\r\n")
        w.ok(b"SELECT Addr")
        assert w.run(b"SEARCH FROM ann@example.org") == (b"OK", [b"* SEARCH 1 2"])
        assert w.run(b"SEARCH FROM \"the boss\"") == (b"OK", [b"* SEARCH 2"])
        assert w.run(b"SEARCH FROM \"n@example.\"") == (b"OK", [b"* SEARCH 1 2 3"])
        assert w.run(b"SEARCH CC \"bob b <bob@example.org>\"") == (b"OK", [b"* SEARCH 2"])
        assert w.run(b"SEARCH BCC \"team: bob@example.org, cl\"") == (
            b"OK", [b"* SEARCH 3"])
        assert w.run(b"SEARCH CHARSET UTF-8 BCC {12+}\r\ncl\xc3\xa9o <cleo@") == (
            b"OK", [b"* SEARCH 3"])
        assert w.run(b"SEARCH NOT FROM ann@example.org") == (b"OK", [b"* SEARCH 3"])
        assert w.run(b"SEARCH HEADER FROM \"\"") == (b"OK", [b"* SEARCH 1 2 3"])
        w.close()

    await in_thread(body)


# -- COPY, MOVE, EXPUNGE, CLOSE, UNSELECT ----------------------------------------------

def apply_expunges(uids, untagged):
    """The UID list after the ``* n EXPUNGE`` responses among ``untagged``."""
    uids = list(uids)
    for response in untagged:
        parts = response.split()
        if len(parts) == 3 and parts[2] == b"EXPUNGE":
            n = int(parts[1])
            assert 1 <= n <= len(uids), (n, uids)
            del uids[n - 1]
    return uids


@pytest_twisted.ensureDeferred
async def test_copy_and_move(imap_server):
    def body():
        w = Wire(imap_server)
        for m in (M1, M2, M3, M4):
            w.append(b"INBOX", m)
        w.ok(b"CREATE Dest")
        _, untagged = w.run(b"EXAMINE Dest")
        dest_validity = int(code_value(untagged, b"UIDVALIDITY"))
        w.ok(b"SELECT INBOX")
        w.ok(b"STORE 2 +FLAGS (\\Flagged $Kw)")
        # COPY with COPYUID (RFC 4315): source UIDs, then the new UIDs in the same order.
        assert w.run(b"COPY 2:3 Dest") == (b"OK [COPYUID %d 2:3 1:2]" % dest_validity, [])
        assert w.run(b"UID COPY 4,1 Dest") == (b"OK [COPYUID %d 1,4 3:4]" % dest_validity, [])
        assert w.run(b"COPY 1 Missing") == (b"NO [TRYCREATE]", [])
        assert w.run(b"UID COPY 99 Dest") == (b"OK", [])
        # The copies keep their flags and internal date; the source is unchanged.
        _, untagged = w.run(b"FETCH 1:4 (FLAGS INTERNALDATE)")
        source = fetch_map(untagged)
        assert w.run(b"STATUS Dest (MESSAGES UIDNEXT)") == (
            b"OK", [b"* STATUS Dest (MESSAGES 4 UIDNEXT 5)"])
        # MOVE (RFC 6851): COPYUID in an untagged OK, then EXPUNGEs, then the tagged OK.
        status, untagged = w.run(b"MOVE 2:3 Archive")
        assert status == b"OK"
        assert untagged[0].startswith(b"* OK [COPYUID ")
        copyuid = untagged[0][len(b"* OK [COPYUID "):-1].split()
        assert copyuid[1:] == [b"2:3", b"1:2"]
        assert apply_expunges([1, 2, 3, 4], untagged[1:-1]) == [1, 4]
        assert all(u.endswith(b" EXPUNGE") for u in untagged[1:-1]) and len(untagged) == 4
        # Two of the four \Recent messages went: the count changed (RFC 3501 7.3.2).
        assert untagged[-1] == b"* 2 RECENT"
        # UID MOVE of the last one.
        status, untagged = w.run(b"UID MOVE 4 Archive")
        assert status == b"OK"
        assert untagged == [b"* OK [COPYUID " + copyuid[0] + b" 4 3]", b"* 2 EXPUNGE",
                            b"* 1 RECENT"]
        assert w.run(b"UID MOVE 4 Archive") == (b"OK", [])
        assert w.run(b"MOVE 1 Missing") == (b"NO [TRYCREATE]", [])
        assert w.run(b"FETCH 1:* UID") == (b"OK", [b"* 1 FETCH (UID 1)"])
        # The moved messages are in Archive with their flags.
        w.ok(b"EXAMINE Archive")
        _, untagged = w.run(b"FETCH 1:3 (FLAGS INTERNALDATE BODY.PEEK[])")
        moved = fetch_map(untagged)
        assert [moved[i][b"BODY[]"] for i in (1, 2, 3)] == [M2, M3, M4]
        # (\Recent in a mailbox only EXAMINEd is checked in test_examine_shows_recent.)
        assert sorted(set(moved[1][b"FLAGS"]) - {b"\\Recent"}) == [b"$Kw", b"\\Flagged"]
        assert moved[1][b"INTERNALDATE"] == source[2][b"INTERNALDATE"]
        w.ok(b"EXAMINE Dest")
        _, untagged = w.run(b"FETCH 1:4 (FLAGS BODY.PEEK[])")
        copied = fetch_map(untagged)
        assert [copied[i][b"BODY[]"] for i in (1, 2, 3, 4)] == [M2, M3, M1, M4]
        assert sorted(set(copied[1][b"FLAGS"]) - {b"\\Recent"}) == [b"$Kw", b"\\Flagged"]
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_expunge_and_uid_expunge(imap_server):
    def body():
        w = Wire(imap_server)
        for _ in range(6):
            w.append(b"INBOX", M1)
        w.ok(b"SELECT INBOX")
        w.ok(b"STORE 2,4:5 +FLAGS.SILENT (\\Deleted)")
        status, untagged = w.run(b"EXPUNGE")
        assert status == b"OK"
        assert len(untagged) == 4 and untagged[-1] == b"* 3 RECENT"
        assert apply_expunges([1, 2, 3, 4, 5, 6], untagged[:-1]) == [1, 3, 6]
        assert w.run(b"FETCH 1:* UID") == (b"OK", [
            b"* 1 FETCH (UID 1)", b"* 2 FETCH (UID 3)", b"* 3 FETCH (UID 6)"])
        # UID EXPUNGE (RFC 4315) removes only the named \Deleted messages.
        w.ok(b"STORE 1:3 +FLAGS.SILENT (\\Deleted)")
        assert w.run(b"UID EXPUNGE 3:5") == (b"OK", [b"* 2 EXPUNGE", b"* 2 RECENT"])
        assert w.run(b"UID EXPUNGE 2") == (b"OK", [])
        assert w.run(b"FETCH 1:* (UID FLAGS)") == (b"OK", [
            b"* 1 FETCH (UID 1 FLAGS (\\Deleted \\Recent))",
            b"* 2 FETCH (UID 6 FLAGS (\\Deleted \\Recent))"])
        assert w.run(b"EXPUNGE") == (b"OK", [b"* 1 EXPUNGE", b"* 1 EXPUNGE", b"* 0 RECENT"])
        assert w.run(b"EXPUNGE") == (b"OK", [])
        assert w.run(b"UID EXPUNGE")[0].startswith(b"BAD")
        _, untagged = w.run(b"STATUS INBOX (MESSAGES UIDNEXT)")
        assert untagged == [b"* STATUS INBOX (MESSAGES 0 UIDNEXT 7)"]
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_close_expunges_unselect_does_not(imap_server):
    def body():
        w = Wire(imap_server)
        for _ in range(3):
            w.append(b"INBOX", M1)
        w.ok(b"SELECT INBOX")
        w.ok(b"STORE 1 +FLAGS.SILENT (\\Deleted)")
        # UNSELECT (RFC 3691): back to authenticated state, nothing expunged.
        assert w.run(b"UNSELECT") == (b"OK", [])
        assert w.run(b"FETCH 1 FLAGS")[0].startswith(b"BAD")
        assert w.run(b"STATUS INBOX (MESSAGES)") == (b"OK", [b"* STATUS INBOX (MESSAGES 3)"])
        # EXAMINE then CLOSE: read-only, so nothing is expunged either.
        w.ok(b"EXAMINE INBOX")
        assert w.run(b"CLOSE") == (b"OK", [])
        assert w.run(b"STATUS INBOX (MESSAGES)") == (b"OK", [b"* STATUS INBOX (MESSAGES 3)"])
        # CLOSE expunges silently: no untagged EXPUNGE (RFC 3501 6.4.2).
        w.ok(b"SELECT INBOX")
        w.ok(b"STORE 3 +FLAGS.SILENT (\\Deleted)")
        assert w.run(b"CLOSE") == (b"OK", [])
        assert w.run(b"FETCH 1 FLAGS")[0].startswith(b"BAD")
        assert w.run(b"STATUS INBOX (MESSAGES)") == (b"OK", [b"* STATUS INBOX (MESSAGES 1)"])
        assert w.run(b"CLOSE")[0].startswith(b"BAD")
        assert w.run(b"UNSELECT")[0].startswith(b"BAD")
        w.close()

    await in_thread(body)


# -- IDLE ---------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_idle_basics(imap_server):
    def body():
        w = Wire(imap_server)
        w.append(b"INBOX", M1)
        w.ok(b"SELECT INBOX")
        tag = w.next_tag()
        w.send(tag + b" IDLE\r\n")
        assert w.raw.line().startswith(b"+ ")
        other = Wire(imap_server)
        other.append(b"INBOX", M2)
        assert w.read_response() == b"* 2 EXISTS"
        assert w.read_response() == b"* 2 RECENT"
        w.send(b"DONE\r\n")
        assert w.collect(tag) == (b"OK", [])
        # Something other than DONE ends IDLE with BAD.
        tag = w.next_tag()
        w.send(tag + b" IDLE\r\n")
        assert w.raw.line().startswith(b"+ ")
        w.send(b"NOT-DONE\r\n")
        assert w.collect(tag)[0].startswith(b"BAD")
        # IDLE in the authenticated state is allowed too.
        w.ok(b"UNSELECT")
        tag = w.next_tag()
        w.send(tag + b" IDLE\r\n")
        assert w.raw.line().startswith(b"+ ")
        w.send(b"DONE\r\n")
        assert w.collect(tag) == (b"OK", [])
        other.close()
        w.close()

        # imapclient's IDLE: idle_check returns as soon as news arrives (the timeout is
        # only a deadline).
        client = imapclient.IMAPClient(imap_server.host, port=imap_server.port, ssl=False,
                                       timeout=20)
        client.login(USER, PASSWORD)
        client.select_folder("INBOX")
        client.idle()
        other = Wire(imap_server)
        other.append(b"INBOX", M3)
        news = client.idle_check(timeout=20)
        assert (3, b"EXISTS") in news
        text, responses = client.idle_done()
        client.logout()
        other.close()

    await in_thread(body)


# -- whole workflows with the client libraries --------------------------------------------

@pytest_twisted.ensureDeferred
async def test_imaplib_workflow(imap_server):
    def body():
        conn = imaplib.IMAP4(imap_server.host, imap_server.port)
        conn.login(USER, PASSWORD)
        assert conn.namespace() == ("OK", [b'(("" "/")) NIL NIL'])
        typ, data = conn._simple_command("ID", '("name" "imaplib")')
        assert typ == "OK"
        assert conn._untagged_response(typ, data, "ID")[1] == [
            b'("name" "leapmail" "version" "' + __version__.encode() + b'")']
        typ, data = conn.list()
        assert typ == "OK" and b'(\\HasNoChildren \\Sent) "/" Sent' in data
        assert conn.create("Work/Reports")[0] == "OK"
        assert conn.subscribe("Work/Reports")[0] == "OK"
        assert conn.lsub('""', "Work/*") == ("OK", [b'() "/" Work/Reports'])
        assert conn.rename("Work/Reports", "Work/Old")[0] == "OK"
        assert conn.list('""', "Work/*") == ("OK", [b'(\\HasNoChildren) "/" Work/Old'])
        assert conn.delete("Work/Old")[0] == "OK"
        assert conn.list('""', "Work/*") == ("OK", [None])
        # APPEND (imaplib sends a synchronizing literal).
        when = imaplib.Time2Internaldate(
            datetime.datetime(2024, 3, 5, 10, 11, 12, tzinfo=datetime.timezone.utc))
        typ, data = conn.append("INBOX", "(\\Seen $Tag)", when, M1)
        assert typ == "OK" and data[0].startswith(b"[APPENDUID ")
        uidvalidity = int(data[0].split()[1])
        assert data[0].startswith(b"[APPENDUID %d 1]" % uidvalidity)
        for m in (M2, M3, M4):
            assert conn.append("INBOX", None, None, m)[0] == "OK"
        typ, data = conn.append("Missing", None, None, M1)
        assert typ == "NO" and data[0].startswith(b"[TRYCREATE]")
        typ, data = conn.status("INBOX", "(MESSAGES UIDNEXT UNSEEN APPENDLIMIT)")
        assert data == [b"INBOX (MESSAGES 4 UIDNEXT 5 UNSEEN 3 APPENDLIMIT %d)" % APPENDLIMIT]
        # SELECT and its responses.
        assert conn.select("INBOX") == ("OK", [b"4"])
        assert conn.response("UIDVALIDITY") == ("UIDVALIDITY", [b"%d" % uidvalidity])
        assert conn.response("UIDNEXT") == ("UIDNEXT", [b"5"])
        assert conn.response("UNSEEN") == ("UNSEEN", [b"2"])
        # FETCH.
        typ, data = conn.fetch("1", "(FLAGS INTERNALDATE RFC822.SIZE)")
        assert imaplib.ParseFlags(data[0]) == (b"\\Seen", b"\\Recent", b"$Tag")
        assert imaplib.Internaldate2tuple(data[0])[:6] == (2024, 3, 5, 10, 11, 12) or (
            as_instant(data[0].split(b'"')[1]) == as_instant(b"05-Mar-2024 10:11:12 +0000"))
        assert b"RFC822.SIZE %d" % len(M1) in data[0]
        typ, data = conn.fetch("2", "(BODY.PEEK[])")
        assert data[0][1] == M2
        typ, data = conn.uid("FETCH", "3", "(BODY.PEEK[HEADER.FIELDS (Subject)])")
        assert data[0][1] == b"Subject: Gamma newsletter\r\n\r\n"
        typ, data = conn.fetch("2", "(BODY[1])")
        assert data[0][1] == b"Invoice attached, total 42 euros."
        typ, data = conn.fetch("2", "(FLAGS)")
        assert imaplib.ParseFlags(data[0]) == (b"\\Seen", b"\\Recent")
        # STORE.
        typ, data = conn.store("3:4", "+FLAGS", "(\\Flagged)")
        assert [imaplib.ParseFlags(d) for d in data] == [(b"\\Flagged", b"\\Recent")] * 2
        typ, data = conn.store("3", "-FLAGS.SILENT", "(\\Flagged)")
        assert (typ, data) == ("OK", [None])
        # SEARCH.
        assert conn.search(None, "FLAGGED") == ("OK", [b"4"])
        assert conn.search(None, "OR", "SEEN", "FROM", "erin") == ("OK", [b"1 2 3"])
        assert conn.uid("SEARCH", "TEXT", "lazy") == ("OK", [b"1"])
        assert conn.search("UTF-8", "SUBJECT", "meeting") == ("OK", [b"4"])
        # COPY, MOVE (UIDPLUS codes are in the tagged response's data).
        typ, data = conn.copy("1:2", "Archive")
        assert typ == "OK" and data[0].startswith(b"[COPYUID ")
        typ, data = conn.uid("MOVE", "4", "Trash")
        assert typ == "OK"
        assert conn.response("EXPUNGE")[1] == [b"4"]
        assert conn.status("Trash", "(MESSAGES)")[1] == [b"Trash (MESSAGES 1)"]
        # EXPUNGE.
        conn.store("1", "+FLAGS.SILENT", "(\\Deleted)")
        assert conn.expunge() == ("OK", [b"1"])
        # ENABLE, UNSELECT, CLOSE.
        assert conn.unselect()[0] == "OK"
        assert conn.enable("CONDSTORE")[0] == "OK"  # imaplib allows it only unselected
        conn.select("INBOX")
        conn.store("1", "+FLAGS.SILENT", "(\\Deleted)")
        assert conn.close()[0] == "OK"
        assert conn.status("INBOX", "(MESSAGES)")[1] == [b"INBOX (MESSAGES 1)"]
        assert conn.logout()[0] == "BYE"

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_imapclient_workflow(imap_server):
    def body():
        client = imapclient.IMAPClient(imap_server.host, port=imap_server.port, ssl=False,
                                       timeout=20)
        assert client.plain_login(USER, PASSWORD).startswith(b"[CAPABILITY ")
        caps = client.capabilities()
        for cap in (b"IMAP4REV1", b"SASL-IR", b"LITERAL+", b"ID", b"ENABLE", b"IDLE",
                    b"NAMESPACE", b"UIDPLUS", b"MOVE", b"UNSELECT", b"CHILDREN", b"SPECIAL-USE",
                    b"LIST-EXTENDED", b"LIST-STATUS", b"CONDSTORE", b"QRESYNC", b"ESEARCH",
                    b"APPENDLIMIT=67108864"):
            assert cap in caps, cap
        ns = client.namespace()
        assert ns.personal == (("", "/"),) and ns.other is None and ns.shared is None
        assert client.id_({"name": "imapclient"}) == ((b"name", b"leapmail", b"version",
                                                         __version__.encode()),)
        assert client.find_special_folder(SENT) == "Sent"
        assert client.find_special_folder(TRASH) == "Trash"
        assert client.find_special_folder(JUNK) == "Junk"
        folders = client.list_folders()
        assert ((b"\\HasNoChildren", b"\\Drafts"), b"/", "Drafts") in folders
        assert client.folder_exists("Archive") and not client.folder_exists("Nope")
        client.create_folder("Lists/Python")
        assert client.list_folders("", "Lists") == [((b"\\HasChildren",), b"/", "Lists")]
        client.subscribe_folder("Lists/Python")
        assert client.list_sub_folders("", "Lists*") == [((), b"/", "Lists/Python")]
        client.unsubscribe_folder("Lists/Python")
        assert client.list_sub_folders("", "Lists*") == []
        client.rename_folder("Lists/Python", "Lists/Py")
        client.delete_folder("Lists/Py")
        assert client.list_folders("Lists/") == []
        # APPEND with flags and a date; APPENDUID in the answer.
        when = datetime.datetime(2024, 3, 5, 10, 11, 12, tzinfo=datetime.timezone.utc)
        answer = client.append("INBOX", M1, flags=(SEEN, b"$Tag"), msg_time=when)
        assert answer.startswith(b"[APPENDUID ")
        for m in (M2, M3, M4):
            client.append("INBOX", m)
        status = client.folder_status("INBOX", [b"MESSAGES", b"UNSEEN", b"UIDNEXT",
                                                b"APPENDLIMIT"])
        assert status == {b"MESSAGES": 4, b"UNSEEN": 3, b"UIDNEXT": 5,
                          b"APPENDLIMIT": APPENDLIMIT}
        info = client.select_folder("INBOX")
        assert info[b"EXISTS"] == 4 and info[b"RECENT"] == 4 and info[b"UIDNEXT"] == 5
        assert info[b"READ-WRITE"] is True
        assert info[b"HIGHESTMODSEQ"] >= 1
        assert set(info[b"PERMANENTFLAGS"]) >= {b"\\Seen", b"$Tag", b"\\*"}
        # FETCH (imapclient uses UIDs).
        data = client.fetch([1, 2], ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE",
                                     "BODYSTRUCTURE", "BODY.PEEK[]"])
        assert data[1][b"FLAGS"] == (b"\\Seen", b"\\Recent", b"$Tag")
        assert data[1][b"RFC822.SIZE"] == len(M1) and data[1][b"BODY[]"] == M1
        assert data[1][b"INTERNALDATE"].replace(tzinfo=None) == when.astimezone().replace(
            tzinfo=None) or data[1][b"INTERNALDATE"] == when
        envelope = data[1][b"ENVELOPE"]
        assert envelope.subject == b"Alpha report"
        assert envelope.from_[0].mailbox == b"alice" and envelope.from_[0].host == b"example.org"
        assert envelope.message_id == b"<m1@example.org>"
        assert data[2][b"BODYSTRUCTURE"].is_multipart
        assert data[2][b"BODY[]"] == M2
        assert client.get_flags([2]) == {2: (b"\\Recent",)}
        data = client.fetch([3], ["BODY[TEXT]<0.9>"])
        assert data[3][b"BODY[TEXT]<0>"] == b"Line 0000"
        assert client.get_flags([3]) == {3: (b"\\Seen", b"\\Recent")}
        # STORE.
        assert client.add_flags([2, 4], [FLAGGED]) == {
            2: (b"\\Flagged", b"\\Recent"), 4: (b"\\Flagged", b"\\Recent")}
        assert client.remove_flags([4], [FLAGGED]) == {4: (b"\\Recent",)}
        assert client.set_flags([1], [b"$Only"]) == {1: (b"\\Recent", b"$Only")}
        assert client.add_flags([4], [DRAFT], silent=True) is None
        assert client.get_flags([4]) == {4: (b"\\Draft", b"\\Recent")}
        # SEARCH.
        assert client.search(["FLAGGED"]) == [2]
        assert client.search(["OR", "FROM", "alice", "DRAFT"]) == [1, 4]
        assert client.search(["SINCE", datetime.date(2024, 3, 6)]) == [2, 3, 4]
        assert client.search(["SUBJECT", "Café"], charset="UTF-8") == [4]
        assert client.search(["NOT", "SEEN"]) == [1, 2, 4]
        # COPY / MOVE (imapclient sends UID COPY / UID MOVE).
        client.copy([1, 2], "Archive")
        assert client.folder_status("Archive", [b"MESSAGES"]) == {b"MESSAGES": 2}
        client.move([3], "Trash")
        assert client.search(["ALL"]) == [1, 2, 4]
        # EXPUNGE and UID EXPUNGE.
        client.delete_messages([1, 2])
        client.expunge([2])  # UID EXPUNGE
        assert client.search(["ALL"]) == [1, 4]
        client.expunge()
        assert client.search(["ALL"]) == [4]
        assert client.folder_status("Archive", [b"MESSAGES"]) == {b"MESSAGES": 2}
        # ENABLE, UNSELECT, CLOSE.
        client.unselect_folder()
        assert client.enable("CONDSTORE") == [b"CONDSTORE"]
        client.select_folder("INBOX")
        client.delete_messages([4])
        client.close_folder()
        assert client.folder_status("INBOX", [b"MESSAGES"]) == {b"MESSAGES": 0}
        client.logout()

    await in_thread(body)


# -- the whole corpus, byte for byte ------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_corpus_body_byte_exact(imap_server):
    # All but the one empty message, which is refused as Dovecot refuses it ("Can't
    # save a zero byte message"): see test_empty_message_is_refused.
    messages = [raw for _name, raw in corpus() if raw]
    assert len(messages) == len(corpus()) - 1

    def body():
        w = Wire(imap_server, timeout=120)
        # Pipelined LITERAL+ APPENDs, then every answer.
        tags = []
        for raw in messages:
            tag = w.next_tag()
            tags.append(tag)
            w.send(tag + b" APPEND INBOX {%d+}\r\n" % len(raw) + raw + CRLF)
        for i, tag in enumerate(tags, 1):
            status, untagged = w.collect(tag)
            assert status.startswith(b"OK [APPENDUID ") and status.endswith(b" %d]" % i), (
                i, status)
        w.ok(b"EXAMINE INBOX")
        status, untagged = w.run(b"UID FETCH 1:* (BODY.PEEK[] RFC822.SIZE)")
        assert status == b"OK"
        assert len(untagged) == len(messages)
        got = fetch_map(untagged)
        with_nul = 0
        for seq, raw in enumerate(messages, 1):
            assert got[seq][b"UID"] == seq
            # Byte-exact, except that a literal cannot carry NUL (RFC 3501 9: CHAR8 is
            # %x01-ff): it is sent as 0x80, as Dovecot does; the size is unchanged.
            with_nul += b"\0" in raw
            assert got[seq][b"BODY[]"] == raw.replace(b"\0", b"\x80"), seq
            assert got[seq][b"RFC822.SIZE"] == len(raw), seq
        assert with_nul > 0  # the corpus does exercise it
        w.close()

    await in_thread(body)


@pytest_twisted.ensureDeferred
async def test_empty_message_is_refused(imap_server):
    def body():
        w = Wire(imap_server)
        status, untagged = w.append(b"INBOX", b"")
        assert status.startswith(b"NO") and untagged == []
        assert w.run(b"STATUS INBOX (MESSAGES)") == (b"OK", [b"* STATUS INBOX (MESSAGES 0)"])
        w.close()

    await in_thread(body)


def test_parse_helpers():
    assert status_of(b"a1 OK [APPENDUID 1 2] Append completed") == b"a1 OK [APPENDUID 1 2]"
    assert status_of(b"* OK [PERMANENTFLAGS (\\Seen \\*)] Flags permitted") == (
        b"* OK [PERMANENTFLAGS (\\Seen \\*)]")
    assert status_of(b"a2 NO Mailbox does not exist") == b"a2 NO"
    assert status_of(b"* 3 EXISTS") == b"* 3 EXISTS"
    assert parse_response(b"(UID 1)") == [[b"UID", 1]]
    assert apply_expunges([1, 2, 3], [b"* 2 EXPUNGE", b"* 2 EXPUNGE"]) == [1]
