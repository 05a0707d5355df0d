"""Mailbox names on the wire: modified UTF-7 (RFC 3501 5.1.3) and LIST patterns."""

import re

import twisted.mail.imap4  # noqa: F401  (registers the "imap4-utf-7" codec)

from leapmail.mail.errors import InvalidMailboxName
from leapmail.mail.names import DELIMITER, INBOX


def decode_mailbox(raw, pattern=False):
    """A client's mailbox name (or LIST pattern) as text; strict modified UTF-7.

    A name that decodes but does not re-encode to the same bytes (unterminated "&",
    an unneeded shift, bad padding) is refused, so that one mailbox has one spelling.
    """
    shown = raw.decode("ascii", "backslashreplace")
    if not raw.isascii():
        raise InvalidMailboxName(shown, "mailbox names must be in modified UTF-7")
    try:
        name = raw.decode("imap4-utf-7")
    except (UnicodeDecodeError, ValueError):
        raise InvalidMailboxName(shown, "invalid modified UTF-7") from None
    if name.encode("imap4-utf-7") != raw:
        raise InvalidMailboxName(shown, "invalid modified UTF-7")
    return name


def encode_mailbox(name):
    return name.encode("imap4-utf-7")


def list_matcher(pattern):
    """A predicate for names matching a LIST pattern ("*" any, "%" any but "/")."""
    if pattern[:5].upper() == INBOX and (len(pattern) == 5 or pattern[5] in DELIMITER + "*%"):
        pattern = INBOX + pattern[5:]
    regex = "".join(
        ".*" if ch == "*" else f"[^{re.escape(DELIMITER)}]*" if ch == "%" else re.escape(ch)
        for ch in pattern
    )
    compiled = re.compile(regex, re.DOTALL)
    return lambda name: compiled.fullmatch(name) is not None
