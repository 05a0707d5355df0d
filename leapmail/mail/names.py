"""Mailbox names: one hierarchy delimiter, INBOX case-insensitive, full Unicode."""

import unicodedata

from leapmail.mail.errors import InvalidMailboxName

DELIMITER = "/"
INBOX = "INBOX"

#: Special-use mailboxes (RFC 6154) every account starts with.
SPECIAL_USE = {
    "Sent": "\\Sent",
    "Drafts": "\\Drafts",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}


def normalize(name):
    """The canonical form of a mailbox name, or :class:`InvalidMailboxName`.

    NFC, so that the same name typed on two systems is one mailbox; "inbox" in any
    case (and as the first level of a path) is INBOX, as RFC 3501 requires.
    """
    if not isinstance(name, str):
        raise InvalidMailboxName(repr(name), "not text")
    name = unicodedata.normalize("NFC", name)
    if not name:
        raise InvalidMailboxName(name, "empty name")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InvalidMailboxName(name, "control characters are not allowed")
    if "*" in name or "%" in name:
        raise InvalidMailboxName(name, "'*' and '%' are reserved for LIST patterns")
    parts = name.split(DELIMITER)
    if any(part == "" for part in parts):
        raise InvalidMailboxName(name, f"empty level (leading, trailing or double '{DELIMITER}')")
    if parts[0].upper() == INBOX:
        parts[0] = INBOX
    return DELIMITER.join(parts)


def parents(name):
    """Every proper ancestor of a name, outermost first: "a/b/c" → ["a", "a/b"]."""
    parts = name.split(DELIMITER)
    return [DELIMITER.join(parts[:i]) for i in range(1, len(parts))]


def is_inferior(name, ancestor):
    return name.startswith(ancestor + DELIMITER)
