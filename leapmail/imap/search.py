"""IMAP SEARCH syntax (RFC 3501 6.4.4, RFC 7162 MODSEQ, RFC 4731 RETURN) into the mail
core's query tree.

What only the session knows — sequence numbers, "*", \\Recent — becomes UID ranges
here, against the numbering the client currently sees.
"""

from leapmail.imap.parser import ParseError
from leapmail.mail import flags as flaglib

CHARSETS = ("US-ASCII", "UTF-8")
RETURN_OPTIONS = ("MIN", "MAX", "ALL", "COUNT")


class BadCharset(Exception):
    pass


_FLAG_KEYS = {
    b"ANSWERED": (flaglib.ANSWERED, True), b"UNANSWERED": (flaglib.ANSWERED, False),
    b"DELETED": (flaglib.DELETED, True), b"UNDELETED": (flaglib.DELETED, False),
    b"DRAFT": (flaglib.DRAFT, True), b"UNDRAFT": (flaglib.DRAFT, False),
    b"FLAGGED": (flaglib.FLAGGED, True), b"UNFLAGGED": (flaglib.FLAGGED, False),
    b"SEEN": (flaglib.SEEN, True), b"UNSEEN": (flaglib.SEEN, False),
}
_HEADER_KEYS = {b"BCC": "bcc", b"CC": "cc", b"FROM": "from", b"SUBJECT": "subject",
                b"TO": "to"}
_DATE_KEYS = {
    b"BEFORE": ("internal", "before"), b"ON": ("internal", "on"),
    b"SINCE": ("internal", "since"), b"SENTBEFORE": ("sent", "before"),
    b"SENTON": ("sent", "on"), b"SENTSINCE": ("sent", "since"),
}


def ordered_ranges(ranges, star):
    """``(low, high)`` pairs with "*" (None) read as ``star`` and each pair in order
    (RFC 3501 9: "a range is equivalent to ``b:a``")."""
    out = []
    for low, high in ranges:
        low = star if low is None else low
        high = star if high is None else high
        out.append((low, high) if low <= high else (high, low))
    return out


def uid_ranges_for_seqs(view, ranges):
    """Sequence ranges (None for "*") as UID ranges; numbers past the end match nothing."""
    out = []
    for low, high in ordered_ranges(ranges, view.exists):
        high = min(high, view.exists)
        if 1 <= low <= high:
            out.append((view.uid_of(low), view.uid_of(high)))
    return out


def uid_ranges_for_uids(view, ranges):
    """UID ranges with "*" as the largest UID in use (RFC 3501 6.4.8)."""
    return ordered_ranges(ranges, view.uids[-1] if view.uids else 0)


def runs(numbers):
    """Distinct numbers as ascending ``(low, high)`` runs: {1, 2, 3, 7} -> (1, 3), (7, 7)."""
    out = []
    for n in sorted(set(numbers)):
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return [(low, high) for low, high in out]


class SearchParser:
    def __init__(self, cursor, view):
        self.cursor = cursor
        self.view = view
        self.charset = "US-ASCII"
        self.uses_modseq = False

    def program(self):
        """``[CHARSET x] key *(SP key)`` up to the end of the command."""
        c = self.cursor
        keys = []
        first = None if c.peek() == b"(" else c.atom("a search key", extra=b"*")
        if first is not None and first.upper() == b"CHARSET":
            c.sp()
            charset = c.astring("a charset").decode("ascii", "replace").upper()
            if charset not in CHARSETS:
                raise BadCharset(charset)
            self.charset = charset
            c.sp()
            first = None
        keys.append(self.key(first))
        while not c.at_end():
            c.sp()
            keys.append(self.key())
        return keys[0] if len(keys) == 1 else ("and", keys)

    def _text(self):
        value = self.cursor.astring("a search string")
        return value.decode("utf-8", "replace")

    def key(self, word=None):
        c = self.cursor
        if word is None:
            if c.skip(b"("):
                keys = [self.key()]
                while not c.skip(b")"):
                    c.sp()
                    keys.append(self.key())
                return keys[0] if len(keys) == 1 else ("and", keys)
            word = c.atom("a search key", extra=b"*")
        upper = word.upper()
        if upper[:1].isdigit() or upper[:1] == b"*":
            from leapmail.imap.parser import parse_sequence_set
            return ("uid", uid_ranges_for_seqs(self.view, parse_sequence_set(word)))
        if upper == b"ALL":
            return ("all",)
        if upper in _FLAG_KEYS:
            bit, present = _FLAG_KEYS[upper]
            return ("flag", bit, present)
        if upper in _HEADER_KEYS:
            c.sp()
            return ("header", _HEADER_KEYS[upper], self._text())
        if upper in _DATE_KEYS:
            c.sp()
            kind, op = _DATE_KEYS[upper]
            return (kind, op, c.date())
        if upper in (b"BODY", b"TEXT"):
            c.sp()
            return (upper.decode().lower(), self._text())
        if upper == b"HEADER":
            c.sp()
            name = c.astring("a header field name").decode("utf-8", "replace")
            c.sp()
            return ("header", name, self._text())
        if upper in (b"KEYWORD", b"UNKEYWORD"):
            c.sp()
            name = c.atom("a keyword").decode("ascii", "replace")
            return ("keyword", name, upper == b"KEYWORD")
        if upper in (b"LARGER", b"SMALLER"):
            c.sp()
            return (upper.decode().lower(), c.number("a size"))
        if upper == b"NOT":
            c.sp()
            return ("not", self.key())
        if upper == b"OR":
            c.sp()
            a = self.key()
            c.sp()
            return ("or", a, self.key())
        if upper == b"UID":
            c.sp()
            return ("uid", uid_ranges_for_uids(self.view, c.sequence_set()))
        if upper in (b"RECENT", b"NEW", b"OLD"):
            recent = ("uid", runs(self.view.recent))
            if upper == b"RECENT":
                return recent
            if upper == b"OLD":
                return ("not", recent)
            return ("and", [recent, ("flag", flaglib.SEEN, False)])
        if upper == b"MODSEQ":
            c.sp()
            if c.peek() == b'"':
                # entry-name entry-type-req: per-flag MODSEQs are not kept apart, so the
                # message's MODSEQ answers for every entry (RFC 7162 3.1.5 allows this).
                c.quoted()
                c.sp()
                kind = c.atom("an entry type").lower()
                if kind not in (b"priv", b"shared", b"all"):
                    raise ParseError("bad MODSEQ entry type")
                c.sp()
            self.uses_modseq = True
            return ("modseq", c.number("a mod-sequence value"))
        raise ParseError(f"unknown search key {word.decode('ascii', 'replace')}")


def parse_search(cursor, view):
    """``(node, return_options or None, uses_modseq)`` from ``[RETURN (..)] program``."""
    options = None
    if cursor.peek() not in (b"(", b"") and cursor.peek_word(b"RETURN"):
        cursor.atom()
        cursor.sp()
        options = []
        for option in cursor.paren_list(lambda: cursor.atom("a return option")):
            option = option.upper().decode("ascii", "replace")
            if option not in RETURN_OPTIONS:
                raise ParseError(f"unknown search return option {option}")
            options.append(option)
        if not options:
            options = ["ALL"]
        cursor.sp()
    parser = SearchParser(cursor, view)
    node = parser.program()
    return node, options, parser.uses_modseq, parser.charset
