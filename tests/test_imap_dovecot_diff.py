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


def responses(conn, count):
    """Each message's FETCH response as one bytes value, literals inline."""
    out = []
    for first in range(1, count + 1, 50):
        last = min(count, first + 49)
        typ, data = conn.uid("FETCH", f"{first}:{last}", ITEMS.decode())
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
            got = responses(conn, len(kept))
            conn.logout()
            return kept, got

        def run_leapmail():
            conn = imap_server.imaplib()
            kept = append_all(conn, messages)
            conn.select("INBOX")
            got = responses(conn, len(kept))
            conn.logout()
            return kept, got

        theirs_kept, theirs = await in_thread(run_dovecot)
        ours_kept, ours = await in_thread(run_leapmail)
    assert ours_kept == theirs_kept
    assert len(ours) == len(theirs) == len(ours_kept)
    different = [(i + 1, o, t) for i, (o, t) in enumerate(zip(ours, theirs)) if o != t]
    assert not different, f"{len(different)} of {len(ours)} differ:\n" + "\n".join(
        _where(*d) for d in different[:8])


def _where(number, ours, theirs):
    at = next(i for i, (a, b) in enumerate(zip(ours + b"\0", theirs + b"\0")) if a != b)
    return (f"message {number} at byte {at}:\n  ours:    {ours[max(0, at - 120):at + 80]!r}"
            f"\n  dovecot: {theirs[max(0, at - 120):at + 80]!r}")
