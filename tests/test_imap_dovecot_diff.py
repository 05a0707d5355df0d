"""Differential: the same messages APPENDed to leapmail and to Dovecot, the same FETCH,
byte-identical responses (structure items and sections, for the whole mail corpus)."""

import imaplib

import pytest_twisted

from dovecot import require_dovecot
from dovecot_server import DovecotServer
from imap_support import in_thread
from mail_corpus import corpus

# Some corpus messages have lines of several megabytes.
imaplib._MAXLINE = 100_000_000

ITEMS = (b"(UID RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY BODY.PEEK[HEADER] BODY.PEEK[TEXT] "
         b"BODY.PEEK[1] BODY.PEEK[1.MIME] BODY.PEEK[2] BODY.PEEK[1.1] BODY.PEEK[2.HEADER] "
         b"BODY.PEEK[3.TEXT] BODY.PEEK[HEADER.FIELDS (FROM SUBJECT CONTENT-TYPE)] "
         b"BODY.PEEK[HEADER.FIELDS.NOT (RECEIVED)] BODY.PEEK[]<10.50>)")


# Search keys over the corpus; strings are sent as literals, so UTF-8 is allowed.
SEARCHES = [
    ("SUBJECT", "hello"), ("SUBJECT", "Grüße"), ("FROM", "alice"), ("FROM", "example.org"),
    ("TO", "dave"), ("CC", "carol"), ("BODY", "Köln"), ("BODY", "plain"),
    ("TEXT", "attachment"), ("TEXT", "report.pdf"), ("HEADER Content-Type", "multipart"),
    ("HEADER X-Mailer", ""), ("BODY", "smart quotes"), ("SUBJECT", ""), ("BODY", "日本語"),
    ("TEXT", "Привет"), ("BODY", "ünïcödé"), ("TEXT", "e"), ("BODY", "x"),
    ("HEADER Message-ID", "example.org"), ("TEXT", "boundary"), ("BODY", "--"),
    ("SUBJECT", "Re:"), ("TEXT", "a very long"), ("BODY", "€"), ("TEXT", "œuvre"),
    ("BODY", "charset"), ("TEXT", "Content-Transfer-Encoding"), ("BODY", "From:"),
    ("TEXT", "filename"), ("BODY", "%"), ("TEXT", "quoted-printable"), ("BODY", "=C3"),
    ("SENTBEFORE 15-Jan-2024", None), ("SENTON 12-Jan-2024", None),
    ("SENTSINCE 1-Jan-2024", None), ("LARGER 5000", None), ("SMALLER 300", None),
    ("NOT FROM", "alice"), ("OR SUBJECT test FROM", "dave"),
]


def search(conn, key, needle):
    """``(status, [uids])`` of ``UID SEARCH CHARSET UTF-8 key [needle]``."""
    tag = conn._new_tag()
    command = tag + b" UID SEARCH CHARSET UTF-8 " + key.encode()
    if needle is not None:
        data = needle.encode()
        command += b" {%d+}\r\n" % len(data) + data
    conn.send(command + b"\r\n")
    found = []
    while True:
        line = conn.readline()
        if line.startswith(b"* SEARCH"):
            found = [int(n) for n in line.split()[2:]]
        if line.startswith(tag + b" "):
            return line.split()[1], found


def searches(conn):
    return {(key, needle): search(conn, key, needle) for key, needle in SEARCHES}


def responses(conn, count, items=ITEMS):
    """Each message's FETCH response as one bytes value, literals inline."""
    out = []
    for first in range(1, count + 1, 50):
        last = min(count, first + 49)
        typ, data = conn.uid("FETCH", f"{first}:{last}", items.decode())
        assert typ == "OK", data
        current = b""
        for piece in data:
            if isinstance(piece, tuple):
                current += piece[0] + piece[1]
            else:
                current += piece
                out.append(current)
                current = b""
    return out


def append_all(conn, messages):
    kept = []
    for raw in messages:
        typ, data = conn.append("INBOX", None, None, raw)
        if typ == "OK":
            kept.append(raw)
    return kept


async def on_both(imap_server, tmp_path, script):
    """``script(imaplib connection)`` run on a fresh Dovecot, then on leapmail:
    ``(theirs, ours)``."""
    with DovecotServer(str(tmp_path / "dovecot")) as dovecot:
        def run_dovecot():
            conn = imaplib.IMAP4(dovecot.host, dovecot.port)
            conn.login(dovecot.user, dovecot.password)
            return script(conn)

        theirs = await in_thread(run_dovecot)
    return theirs, await in_thread(lambda: script(imap_server.imaplib()))


@pytest_twisted.ensureDeferred
async def test_fetch_matches_dovecot_for_the_corpus(imap_server, tmp_path):
    require_dovecot()
    messages = [raw for _, raw in corpus()]
    # A Dovecot daemon with its on-disk indexes, as deployed: with in-memory indexes
    # it describes a saved plain 7-bit message as written instead of canonically.
    with DovecotServer(str(tmp_path / "dovecot")) as dovecot:
        def run_dovecot():
            conn = imaplib.IMAP4(dovecot.host, dovecot.port)
            conn.login(dovecot.user, dovecot.password)
            kept = append_all(conn, messages)
            conn.select("INBOX")
            got = responses(conn, len(kept)), searches(conn)
            conn.logout()
            return kept, got

        def run_leapmail():
            conn = imap_server.imaplib()
            kept = append_all(conn, messages)
            conn.select("INBOX")
            got = responses(conn, len(kept)), searches(conn)
            conn.logout()
            return kept, got

        theirs_kept, (theirs, their_searches) = await in_thread(run_dovecot)
        ours_kept, (ours, our_searches) = await in_thread(run_leapmail)
    assert ours_kept == theirs_kept
    assert len(ours) == len(theirs) == len(ours_kept)
    different = [(i + 1, o, t) for i, (o, t) in enumerate(zip(ours, theirs)) if o != t]
    assert not different, f"{len(different)} of {len(ours)} differ:\n" + "\n".join(
        _where(*d) for d in different[:8])
    assert all(status == b"OK" for status, _ in their_searches.values())
    mismatched = {q: (sorted(set(our_searches[q][1]) - set(t)), sorted(set(t) - set(our_searches[q][1])))
                  for q, (_, t) in their_searches.items() if our_searches[q] != their_searches[q]}
    assert not mismatched, "SEARCH differs (ours only, Dovecot only):\n" + "\n".join(
        f"{q}: {d}" for q, d in mismatched.items())


def _where(number, ours, theirs):
    at = next(i for i, (a, b) in enumerate(zip(ours + b"\0", theirs + b"\0")) if a != b)
    return (f"message {number} at byte {at}:\n  ours:    {ours[max(0, at - 120):at + 80]!r}"
            f"\n  dovecot: {theirs[max(0, at - 120):at + 80]!r}")


# Odd shapes where SEARCH once differed from Dovecot's: transfer encodings its decoder
# does not know (the body is not searched), ISO-8859-1 read strictly (0x80-0x9F are
# not windows-1252), 8-bit text without a usable charset (UTF-8, invalid bytes as
# U+FFFD), and address fields as the envelope has them (MISSING_MAILBOX,
# MISSING_DOMAIN, SYNTAX_ERROR filled in).
ODD_MESSAGES = [
    b"Subject: a\r\nContent-Transfer-Encoding: bogus\r\n\r\nHello world\r\n",
    b"Subject: b\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nHello world\r\n",
    b"Subject: c\r\nContent-Transfer-Encoding: base64\r\nContent-Transfer-Encoding: 8bit"
    b"\r\n\r\nHello world\r\n",
    b"Subject: d\r\nContent-Transfer-Encoding:\r\n\r\nHello world\r\n",
    b"Subject: e\r\nContent-Transfer-Encoding: 7BIT (comment)\r\n\r\nHello world\r\n",
    b"Subject: f\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"SGVsbG8gd29ybGQ=\r\n",
    b"Subject: g\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\nprice \x80 10 \x93q\x94"
    b"\r\n",
    b"Subject: h\r\nContent-Type: text/plain\r\n\r\nGr\xfc\xdfe \xc4\r\n",
    b"Subject: i\r\nContent-Type: text/plain; charset\r\n\r\nGr\xfc\xdfe \xc4\r\n",
    b"Subject: j\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nGr\xfc\xdfe \xc4\r\n",
    b"Subject: k\r\nContent-Type: text/plain; charset=bogus\r\n\r\nGr\xfc\xdfe \xc4\r\n",
    b"Subject: l\r\nContent-Type: text/plain\r\n\r\nmixed \xc3\xa4 and more\r\n",
    b"Subject: m\r\nBcc: broken <a@b\r\n\r\nx\r\n",
    b"Subject: n\r\nBcc: @\r\n\r\nx\r\n",
    b"Subject: o\r\nFrom: <>\r\n\r\nx\r\n",
    b"Subject: p\r\nFrom: nodomain\r\nTo: group:;\r\n\r\nx\r\n",
    b"Subject: q\r\nFrom: Alice <alice@example.org>\r\nTo: a@b.c, Bob X <b@c.d>\r\n\r\nx\r\n",
    # A NUL in the decoded text must not hide what follows it.
    b"Subject: r\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nYWIAY2Tk6WZn\r\n",
]
ODD_SEARCHES = [
    ("BODY", "hello"), ("BODY", "€"), ("BODY", "\u0080"), ("BODY", "“q”"),
    ("BODY", "price"), ("BODY", "grüße"), ("BODY", "ä"), ("BODY", "gr"),
    ("BODY", "mixed ä"), ("TEXT", "world"), ("BCC", "x"), ("BCC", "syntax"),
    ("BCC", "missing_domain"), ("BCC", "a"), ("FROM", "@"), ("FROM", "MISSING_MAILBOX"),
    ("FROM", "nodomain"), ("TO", "group"), ("FROM", "alice <alice@"), ("TO", "bob x"),
    ("TO", "<b@c.d>"), ("BODY", "cdä"), ("BODY", "é"), ("TEXT", "cdäé"),
]


@pytest_twisted.ensureDeferred
async def test_search_matches_dovecot_on_odd_encodings_and_addresses(imap_server, tmp_path):
    require_dovecot()

    def run(conn):
        for raw in ODD_MESSAGES:
            typ, data = conn.append("INBOX", None, None, raw)
            assert typ == "OK", data
        conn.select("INBOX")
        found = {(key, needle): search(conn, key, needle) for key, needle in ODD_SEARCHES}
        conn.logout()
        return found

    theirs, ours = await on_both(imap_server, tmp_path, run)
    assert all(status == b"OK" for status, _ in theirs.values())
    assert ours == theirs


ODD_ITEMS = (b"(UID RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY BODY.PEEK[HEADER] BODY.PEEK[TEXT] "
             b"BODY.PEEK[1] BODY.PEEK[1.MIME] BODY.PEEK[2] BODY.PEEK[1.1] BODY.PEEK[2.HEADER] "
             b"BODY.PEEK[2.TEXT] BODY.PEEK[1.2] BODY.PEEK[2.1.MIME] BODY.PEEK[1.TEXT] "
             b"BODY.PEEK[1.HEADER] BODY.PEEK[3] BODY.PEEK[HEADER.FIELDS (FROM SUBJECT "
             b"CONTENT-TYPE)] BODY.PEEK[HEADER.FIELDS.NOT (TO)] BODY.PEEK[]<3.40>)")
GENERATED_SEARCHES = [
    ("FROM", "alice"), ("FROM", "example.org"), ("FROM", "Jörg"), ("FROM", "Doe"),
    ("TO", "john@example.com"), ("TO", "group"), ("CC", "nodomain"), ("BCC", "x"),
    ("SUBJECT", "café"), ("SUBJECT", "Grüße"), ("SUBJECT", "folded subject"),
    ("BODY", "hello"), ("BODY", "ä"), ("BODY", "qp text"), ("BODY", "soft break"),
    ("TEXT", "attachment"), ("TEXT", "f.txt"), ("TEXT", "ä.txt"), ("TEXT", "€"),
    ("HEADER Content-Type", "multipart"), ("HEADER X-Custom", ""), ("TEXT", "nul"),
    ("BODY", "From start"), ("SENTON 12-Feb-2024", None), ("SENTSINCE 31-Dec-2024", None),
    ("LARGER 1000", None), ("FROM", "@"), ("TO", "route"), ("FROM", "Mary"),
    ("FROM", "raw8"), ("TEXT", "Jörg"), ("CC", "a@b.c"), ("BODY", "=C3"),
    ("TEXT", "epilogue"), ("TEXT", "preamble"), ("BODY", "tab\there"),
]


@pytest_twisted.ensureDeferred
async def test_generated_odd_mail_matches_dovecot(imap_server, tmp_path):
    from odd_mail import odd_messages

    require_dovecot()
    messages = odd_messages(3, 300)

    def run(conn):
        kept = append_all(conn, messages)
        conn.select("INBOX")
        out = responses(conn, len(kept), ODD_ITEMS)
        found = {(key, needle): search(conn, key, needle) for key, needle in GENERATED_SEARCHES}
        conn.logout()
        return kept, out, found

    theirs, ours = await on_both(imap_server, tmp_path, run)
    assert ours[0] == theirs[0]
    different = [(i + 1, o, t) for i, (o, t) in enumerate(zip(ours[1], theirs[1])) if o != t]
    assert not different, f"{len(different)} of {len(ours[1])} differ:\n" + "\n".join(
        _where(*d) for d in different[:8])
    assert all(status == b"OK" for status, _ in theirs[2].values())
    assert ours[2] == theirs[2]


# Item orders and \Seen: FETCH answers the short fixed items first, then the others in
# the order asked; a FETCH that sets \Seen reports FLAGS after the short ones.
ORDERED_FETCHES = [
    b"FETCH 1 (BODY.PEEK[] ENVELOPE)", b"FETCH 1 (BODY.PEEK[1] BODYSTRUCTURE RFC822.SIZE)",
    b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (Subject)] UID FLAGS)", b"FETCH 1 (RFC822.HEADER FLAGS)",
    b"FETCH 1 (BODY.PEEK[TEXT] RFC822.SIZE BODY.PEEK[HEADER] FLAGS)", b"FETCH 1 (FLAGS UID)",
    b"FETCH 1 (BODY.PEEK[]<0.5> BODY)", b"FETCH 2 (BODY[HEADER.FIELDS (Subject)] RFC822.SIZE)",
    b"FETCH 3 (BODY[TEXT] ENVELOPE)", b"FETCH 4 (RFC822.TEXT UID)", b"FETCH 5 (ENVELOPE BODY[1])",
    b"FETCH 6 (RFC822.SIZE RFC822)", b"UID FETCH 7 (BODY[1] FLAGS UID)", b"FETCH 1:7 FLAGS",
    b"UID FETCH 7 (RFC822.HEADER)", b"FETCH 2:3 (FLAGS RFC822.SIZE)",
]


@pytest_twisted.ensureDeferred
async def test_fetch_item_order_and_implicit_flags_match_dovecot(imap_server, tmp_path):
    require_dovecot()
    messages = [b"Subject: m%d\r\nContent-Type: text/plain\r\n\r\nbody %d\r\n" % (i, i)
                for i in range(7)]

    def script(conn):
        append_all(conn, messages)
        conn.select("INBOX")
        out = []
        for command in ORDERED_FETCHES:
            tag = conn._new_tag()
            conn.send(tag + b" " + command + b"\r\n")
            lines = []
            while True:
                line = conn.readline()
                if line.startswith(tag + b" "):
                    break
                lines.append(line)
            out.append((command, b"".join(lines)))
        conn.logout()
        return out

    theirs, ours = await on_both(imap_server, tmp_path, script)
    assert [o for o in ours if o not in theirs] == []
    assert ours == theirs


# Keywords: listed in the order the mailbox first saw them, spelled as it first saw
# them, never forgotten while it lives; FLAGS told again when one is new.
KEYWORD_COMMANDS = [
    b"STORE 1 +FLAGS (Zeta)", b"STORE 1 +FLAGS (Alpha)", b"STORE 2 +FLAGS (alpha mid zeta)",
    b"STORE 3 FLAGS (Mid Beta \\Seen)", b"FETCH 1:3 FLAGS", b"STORE 1:3 -FLAGS (zeta alpha mid)",
    b"STORE 1 +FLAGS (ALPHA \\Flagged)", b"SELECT INBOX", b"FETCH 1:3 FLAGS",
    b"UID STORE 2 FLAGS (BETA $Fresh)", b"EXAMINE INBOX", b"FETCH 2 FLAGS",
]


def _comparable(line):
    """A response line without what legitimately differs: human text after a response
    code, UIDVALIDITY (each server picks its own), and the HIGHESTMODSEQ leapmail
    reports at every SELECT (RFC 7162 3.1.2.1)."""
    if line.startswith(b"* OK [HIGHESTMODSEQ "):
        return None
    if line.startswith(b"* OK [UIDVALIDITY "):
        return b"* OK [UIDVALIDITY]"
    if line.startswith((b"* OK [", b"OK", b"NO", b"BAD")):
        return line[:line.index(b"]") + 1] if b"[" in line else line.split(b" ")[0]
    return line


@pytest_twisted.ensureDeferred
async def test_keyword_order_spelling_and_flags_news_match_dovecot(imap_server, tmp_path):
    require_dovecot()
    messages = [b"Subject: k%d\r\n\r\nbody\r\n" % i for i in range(3)]

    def script(conn):
        append_all(conn, messages)
        conn.select("INBOX")
        out = []
        for command in KEYWORD_COMMANDS:
            tag = conn._new_tag()
            conn.send(tag + b" " + command + b"\r\n")
            while True:
                line = conn.readline().rstrip(b"\r\n")
                tagged = line.startswith(tag + b" ")
                kept = _comparable(line[len(tag) + 1:] if tagged else line)
                if kept is not None:
                    out.append(kept)
                if tagged:
                    break
        conn.logout()
        return out

    theirs, ours = await on_both(imap_server, tmp_path, script)
    assert b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft Zeta Alpha mid Beta)" in ours
    assert ours == theirs
