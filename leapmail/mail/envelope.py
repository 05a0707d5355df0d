"""The RFC 3501 ENVELOPE of a message, computed from its raw header block.

``envelope(header_block)`` returns the ten envelope members as Python values::

    (date, subject, from, sender, reply_to, to, cc, bcc, in_reply_to, message_id)

Strings are bytes (unfolded, never RFC 2047-decoded) or ``None``.  Address lists are
lists of ``(name, adl, mailbox, host)`` tuples of bytes-or-None, or ``None`` when the
field is absent or holds no address.  RFC 3501 group syntax is kept: a group starts
with ``(None, None, b"group name", None)`` and ends with ``(None, None, None, None)``.

The values are exactly those Dovecot (2.3) returns, since clients are compared with
it byte for byte.  What that means, field by field:

* Date, Message-ID, In-Reply-To: the field's value as written, line breaks of folds
  removed, whitespace after the colon skipped, trailing whitespace kept; ``b""`` for
  a present but empty field.  A bare CR becomes a space before a word and vanishes
  elsewhere, like a line break.
* Subject and display names are written "for humans": runs of spaces, tabs, CRs
  and LFs become one space; leading and trailing whitespace is removed.
* A header field that appears more than once: the last one wins for the string
  members; the addresses of every occurrence are concatenated for the address
  members.
* Sender and Reply-To default to From when absent or empty (RFC 3501).
* Syntax errors never make a field disappear.  The parts that could not be found
  are filled in with ``MISSING_MAILBOX``, ``MISSING_DOMAIN``, ``SYNTAX_ERROR``
  (angle address that does not parse) and ``INVALID_ROUTE``, as Dovecot does.
* A NUL reads as U+FFFD in the string members and in quoted strings, comments and
  domain literals of addresses; elsewhere in an address it ends an atom.

The address parser follows RFC 5322 with its obsolete syntax (route addresses
``<@a,@b:x@y>``, phrases with dots, CFWS almost anywhere) and keeps going on
garbage: unterminated quotes, comments and angle brackets, missing local parts or
domains, empty list items, 8-bit bytes.  Nothing here raises on any input.
"""

from .headers import split_fields

__all__ = ["envelope", "parse_addresses", "for_humans", "for_humans_marked", "header_value",
           "ENVELOPE_FIELDS"]

ENVELOPE_FIELDS = ("date", "subject", "from", "sender", "reply-to", "to", "cc", "bcc",
                   "in-reply-to", "message-id")

_STRING_FIELDS = ("date", "subject", "in-reply-to", "message-id")
_ADDRESS_FIELDS = {"from": 2, "sender": 3, "reply-to": 4, "to": 5, "cc": 6, "bcc": 7}

NUL_REPLACEMENT = "\ufffd".encode("utf-8")

# RFC 5322 atext, plus every 8-bit byte (UTF-8 and legacy charsets in the wild).
_ATEXT = bytearray(256)
for _c in b"!#$%&'*+-/=?^_`{|}~0123456789":
    _ATEXT[_c] = 1
for _c in range(ord("A"), ord("Z") + 1):
    _ATEXT[_c] = 1
    _ATEXT[_c + 32] = 1
for _c in range(0x80, 0x100):
    _ATEXT[_c] = 1
_ATEXT = bytes(_ATEXT)

_LWSP = (0x20, 0x09, 0x0D, 0x0A)
_DQUOTE, _BACKSLASH, _DOT, _AT = 0x22, 0x5C, 0x2E, 0x40
_LPAREN, _RPAREN, _LT, _GT = 0x28, 0x29, 0x3C, 0x3E
_COMMA, _COLON, _SEMICOLON = 0x2C, 0x3A, 0x3B
_LBRACKET, _RBRACKET = 0x5B, 0x5D
_CR, _LF, _NUL = 0x0D, 0x0A, 0x00
_SHARED = (_NUL, _LF, _BACKSLASH)


# Dovecot reads header lines (with CRLF line ends) through a buffer of this size; a
# line that does not fit is cut at its last space or tab within the buffer, and
# only the first piece gets the whitespace after the colon skipped.
HEADER_BUFFER_SIZE = 8192


def header_value(raw):
    """The value of one raw header field as Dovecot's parsers see it.

    The final line end is cut; the line ends of folds stay as a bare LF (a
    backslash before one does not escape the whitespace after it), except before
    a continuation line of a single space or tab, which Dovecot joins to the line
    before.  Spaces and tabs after the colon are skipped, but only one of them when
    the first line holds nothing else.  Everything else stays: trailing whitespace,
    bare CRs, NULs, 8-bit bytes.
    """
    colon = raw.find(b":")
    if colon < 0:
        return b""
    lines = []
    pos, end = colon + 1, len(raw)
    while pos < end:
        nl = raw.find(b"\n", pos)
        if nl < 0:
            lines.append(raw[pos:])
            break
        lines.append(raw[pos:nl - 1] if nl > pos and raw[nl - 1] == _CR else raw[pos:nl])
        pos = nl + 1
    if not lines:
        return b""
    first = lines[0]
    # the part of the first line that Dovecot skips whitespace in
    piece = first
    content_end = colon + 1 + len(first)
    if content_end + 2 >= HEADER_BUFFER_SIZE:  # with its CRLF, the line fills the buffer
        window = raw[:min(content_end, HEADER_BUFFER_SIZE)]
        cut = max(window.rfind(b" "), window.rfind(b"\t"))
        if cut > colon:
            piece = first[:cut - colon - 1]
    if piece.strip(b" \t"):
        out = [first.lstrip(b" \t")]
    else:
        out = [piece[1:] + first[len(piece):]]  # only whitespace: skip just one
    for line in lines[1:]:
        if len(line) != 1:
            out.append(b"\n")
        out.append(line)
    return b"".join(out)


def without_newlines(value):
    """Dovecot's one-line form of Date, Message-ID and In-Reply-To: each bare CR or
    LF is dropped, or becomes a space when a word follows it directly."""
    if value is None or (b"\r" not in value and b"\n" not in value):
        return value
    out = bytearray()
    last = len(value) - 1
    for i, byte in enumerate(value):
        if byte != _CR and byte != _LF:
            out.append(byte)
        elif i < last and value[i + 1] not in b" \t\r\n":
            out.append(0x20)
    return bytes(out)


def for_humans(value):
    """Dovecot's display form of a subject or a display name.

    Runs of spaces, tabs, CRs and LFs become one space, leading and trailing ones
    go, a NUL becomes byte 0x80.
    """
    if value is None:
        return None
    out = bytearray()
    last_lwsp = True
    whitespace_prefix = True
    for byte in value:
        if byte == _NUL:
            out.append(0x80)
            last_lwsp = False
        elif byte in _LWSP:
            if not last_lwsp:
                out.append(0x20)
            last_lwsp = True
        else:
            out.append(byte)
            last_lwsp = False
        if not last_lwsp:
            whitespace_prefix = False
    if last_lwsp and value and not whitespace_prefix:
        del out[-1]
    return bytes(out)


def for_humans_marked(value):
    """:func:`for_humans`, remembering whether it changed anything.

    Dovecot sends such a value as a literal (and an unchanged one as a quoted
    string unless it needs escapes), so a changed value is kept as a one-element
    list ``[normalized]`` for the IMAP encoder to tell; unchanged values stay bytes.
    """
    if value is None:
        return None
    normalized = for_humans(value)
    return normalized if normalized == value else [normalized]


def envelope(header_block):
    """The ENVELOPE of the message whose header block is ``header_block`` (bytes)."""
    try:
        return _envelope(bytes(header_block))
    except Exception:  # pragma: no cover - a last resort; the parser never raises
        return (None,) * 10


def _envelope(block):
    strings = dict.fromkeys(_STRING_FIELDS)
    addresses = {i: None for i in _ADDRESS_FIELDS.values()}
    for field in split_fields(block):
        name = field.name
        if b"\x00" in name:
            name = name[:name.index(b"\x00")]  # Dovecot compares names as C strings
        if not name:
            continue
        key = name.decode("latin-1").lower()
        if key in _STRING_FIELDS:
            # the last occurrence wins
            strings[key] = header_value(field.raw).replace(b"\x00", NUL_REPLACEMENT)
            if key != "subject":
                strings[key] = without_newlines(strings[key])
        elif key in _ADDRESS_FIELDS:
            # every occurrence adds its addresses
            parsed = parse_addresses(header_value(field.raw))
            if parsed:
                index = _ADDRESS_FIELDS[key]
                if addresses[index] is None:
                    addresses[index] = parsed
                else:
                    addresses[index].extend(parsed)
    from_ = addresses[2]
    sender = addresses[3] if addresses[3] is not None else _copy(from_)
    reply_to = addresses[4] if addresses[4] is not None else _copy(from_)
    return (strings["date"], for_humans_marked(strings["subject"]), from_, sender, reply_to,
            addresses[5], addresses[6], addresses[7], strings["in-reply-to"],
            strings["message-id"])


def _copy(addresses):
    return None if addresses is None else list(addresses)


def parse_addresses(value):
    """Parse an RFC 5322 address list into ENVELOPE address tuples.

    Returns a list of ``(name, adl, mailbox, host)`` (group markers included), or
    ``None`` when the value holds nothing but whitespace and comments.
    """
    try:
        result = _AddressParser(bytes(value)).parse()
    except Exception:  # pragma: no cover - defensive: never raise on mail
        return None
    if not result:
        return None
    return [(for_humans_marked(name), route, mailbox, domain)
            for name, route, mailbox, domain in result]


class _AddressParser:
    """RFC 5322 address-list parser that never gives up.

    The methods return what the grammar steps of Dovecot's rfc822-parser return, so
    that the recovery from broken input is the same: a negative number for a syntax
    error, 0 at the end of the input, 1 when more input follows.  ``pos`` is the
    cursor into ``data``.
    """

    def __init__(self, data):
        self.data = data
        self.end = len(data)
        self.pos = 0
        self.last_comment = bytearray()
        self.buf = bytearray()
        self.addresses = []
        self._reset()

    # -- the address being built -----------------------------------------------

    def _reset(self):
        self.name = self.route = self.mailbox = self.domain = None
        self.invalid = False

    def _add(self):
        self.addresses.append((self.name, self.route, self.mailbox, self.domain))
        self._reset()

    def _add_fixed(self):
        if self.mailbox is None:
            self.mailbox = b"MISSING_MAILBOX"
        if not self.domain:
            self.domain = b"MISSING_DOMAIN"
        self._add()

    def _at(self, byte):
        return self.pos < self.end and self.data[self.pos] == byte

    # -- lexical level ------------------------------------------------------------

    def _shared(self, out, c, start):
        """NUL, a line end or a backslash, which comments and quoted strings treat alike
        (as Dovecot's rfc822-parser does).  Moves the text before ``self.pos`` into
        ``out`` as needed and returns where pending text now starts, or -1 when a
        backslash ends the input."""
        data = self.data
        if c == _NUL:
            out += data[start:self.pos]
            out += NUL_REPLACEMENT
            return self.pos + 1
        if c == _LF:
            stop = self.pos
            if stop > start and data[stop - 1] == _CR:
                stop -= 1
            out += data[start:stop]
            return self.pos + 1
        self.pos += 1  # a backslash
        if self.pos >= self.end:
            return -1
        if data[self.pos] in (_CR, _LF, _NUL):
            self.pos -= 1  # no quoted pair: the backslash is text
            return start
        out += data[start:self.pos - 1]
        return self.pos

    def skip_comment(self):
        data, end = self.data, self.end
        out = self.last_comment
        del out[:]
        self.pos += 1
        start = self.pos
        level = 1
        while self.pos < end:
            c = data[self.pos]
            if c in _SHARED:
                start = self._shared(out, c, start)
                if start < 0:
                    return -1
            elif c == _LPAREN:
                level += 1
            elif c == _RPAREN:
                level -= 1
                if level == 0:
                    out += data[start:self.pos]
                    self.pos += 1
                    return 1 if self.pos < end else 0
            self.pos += 1
        return -1

    def skip_lwsp(self):
        data, end = self.data, self.end
        while self.pos < end:
            c = data[self.pos]
            if c in _LWSP:
                self.pos += 1
                continue
            if c != _LPAREN:
                break
            if self.skip_comment() < 0:
                return -1
        return 1 if self.pos < end else 0

    def parse_atom(self, out):
        data, end = self.data, self.end
        if self.pos >= end or not _ATEXT[data[self.pos]]:
            return -1
        start = self.pos
        self.pos += 1
        while self.pos < end and _ATEXT[data[self.pos]]:
            self.pos += 1
        out += data[start:self.pos]
        if self.pos < end:
            return self.skip_lwsp()
        return 0

    def parse_dot_atom(self, out):
        """Strict dot-atom (domains), allowing CFWS around the dots as RFC 822 did."""
        data, end = self.data, self.end
        if self.pos >= end or not _ATEXT[data[self.pos]]:
            return -1
        start = self.pos
        self.pos += 1
        while self.pos < end:
            if _ATEXT[data[self.pos]]:
                self.pos += 1
                continue
            if start == self.pos:
                return -1
            out += data[start:self.pos]
            ret = self.skip_lwsp()
            if ret <= 0:
                return ret
            if data[self.pos] != _DOT:
                return 1
            self.pos += 1
            out.append(_DOT)
            if self.skip_lwsp() <= 0:
                return -1
            start = self.pos
        out += data[start:self.pos]
        return 0

    def parse_quoted_string(self, out):
        data, end = self.data, self.end
        self.pos += 1
        start = self.pos
        while self.pos < end:
            c = data[self.pos]
            if c in _SHARED:
                start = self._shared(out, c, start)
                if start < 0:
                    return -1
            elif c == _DQUOTE:
                out += data[start:self.pos]
                self.pos += 1
                return self.skip_lwsp()
            self.pos += 1
        return -1

    def parse_atom_or_dot(self, out):
        data, end = self.data, self.end
        start = self.pos
        while self.pos < end and (_ATEXT[data[self.pos]] or data[self.pos] == _DOT):
            self.pos += 1
        out += data[start:self.pos]
        if self.pos < end:
            return self.skip_lwsp()
        return 0

    def parse_phrase(self, out):
        """phrase / obs-phrase: words joined by one space, dots allowed after the first."""
        data = self.data
        if self.pos >= self.end:
            return 0
        if data[self.pos] == _DOT:
            return -1
        while True:
            if data[self.pos] == _DQUOTE:
                ret = self.parse_quoted_string(out)
            else:
                ret = self.parse_atom_or_dot(out)
            if ret <= 0:
                return ret
            c = data[self.pos]
            if not _ATEXT[c] and c != _DQUOTE and c != _DOT:
                break
            out.append(0x20)
        return self.skip_lwsp()

    def parse_domain_literal(self, out):
        data, end = self.data, self.end
        start = self.pos
        self.pos += 1
        while self.pos < end:
            c = data[self.pos]
            if c == _NUL:
                out += data[start:self.pos]
                out += NUL_REPLACEMENT
                start = self.pos + 1
            elif c == _LBRACKET:
                return -1
            elif c == _RBRACKET:
                out += data[start:self.pos + 1]
                self.pos += 1
                return self.skip_lwsp()
            elif c == _LF:
                stop = self.pos
                if stop > start and data[stop - 1] == _CR:
                    stop -= 1
                out += data[start:stop]
                start = self.pos + 1
            elif c == _BACKSLASH:
                self.pos += 1
                if self.pos >= end:
                    return -1
                if data[self.pos] in (_CR, _LF, _NUL):
                    out += data[start:self.pos]
                    start = self.pos
                    self.pos -= 1
            self.pos += 1
        return -1

    def parse_rfc822_domain(self, out):
        self.pos += 1  # the '@'
        if self.skip_lwsp() <= 0:
            return -1
        if self.data[self.pos] == _LBRACKET:
            return self.parse_domain_literal(out)
        return self.parse_dot_atom(out)

    # -- address level ------------------------------------------------------------

    def parse_nonstrict_dot_atom(self, out):
        """Local part: dot-atom that also takes leading, trailing and double dots."""
        data, end = self.data, self.end
        ret = -1
        while True:
            while data[self.pos] == _DOT:
                out.append(_DOT)
                self.pos += 1
                if self.pos == end:
                    return 0
                ret = 1
            if data[self.pos] == _AT:
                break
            ret = self.parse_atom(out)
            if not (ret > 0 and data[self.pos] == _DOT):
                break
        return ret

    def parse_local_part(self):
        del self.buf[:]
        if self.data[self.pos] == _DQUOTE:
            ret = self.parse_quoted_string(self.buf)
        else:
            ret = self.parse_nonstrict_dot_atom(self.buf)
        if ret < 0:
            return -1
        self.mailbox = bytes(self.buf)
        return ret

    def parse_domain(self):
        del self.buf[:]
        ret = self.parse_rfc822_domain(self.buf)
        if ret < 0:
            return -1
        self.domain = bytes(self.buf)
        return ret

    def parse_domain_list(self):
        """obs-domain-list: ``@a,@b`` (the route of a source-routed address)."""
        buf = self.buf
        del buf[:]
        while True:
            if self.pos >= self.end:
                return 0
            if self.data[self.pos] != _AT:
                break
            if buf:
                buf.append(_COMMA)
            buf.append(_AT)
            ret = self.parse_rfc822_domain(buf)
            if ret <= 0:
                return ret
            while self.skip_lwsp() > 0 and self.data[self.pos] == _COMMA:
                self.pos += 1
        self.route = bytes(buf)
        return 1

    def parse_angle_addr(self):
        self.pos += 1  # the '<'
        if self.skip_lwsp() <= 0:
            return -1
        if self.data[self.pos] == _AT:
            if self.parse_domain_list() > 0 and self.data[self.pos] == _COLON:
                self.pos += 1
            else:
                self.route = b"INVALID_ROUTE"
                if self.pos >= self.end:
                    return -1
            if self.skip_lwsp() <= 0:
                return -1
        if self.data[self.pos] != _GT:
            if self.parse_local_part() <= 0:
                return -1
            if self.data[self.pos] == _AT:
                if self.parse_domain() <= 0:
                    return -1
        if self.data[self.pos] != _GT:
            return -1
        self.pos += 1
        return self.skip_lwsp()

    def parse_name_addr(self):
        del self.buf[:]
        if self.parse_phrase(self.buf) <= 0 or self.data[self.pos] != _LT:
            return -1
        self.name = bytes(self.buf) or None
        if self.parse_angle_addr() < 0:
            self.domain = b"SYNTAX_ERROR"
        return 1 if self.pos < self.end else 0

    def parse_addr_spec(self):
        del self.last_comment[:]
        quoted = self.data[self.pos] == _DQUOTE
        ret = self.parse_local_part()
        if ret <= 0:
            self.invalid = True
        ret2 = -2
        if ret != 0 and self._at(_AT):
            ret2 = self.parse_domain()
            if ret2 <= 0:
                ret = ret2
        if self.last_comment:
            self.name = bytes(self.last_comment)
        elif ret2 == -2:
            # "user" alone is a mailbox without domain, but "user more words"
            # is a display name without any address.
            self.buf.append(0x20)
            length = len(self.buf)
            self.parse_phrase(self.buf)
            if len(self.buf) != length:
                self.mailbox = None
                self.name = bytes(self.buf)
            elif not quoted:
                self.domain = b""
            self.invalid = True
            ret = -1
        return ret

    def parse_mailbox(self):
        start = self.pos
        ret = self.parse_name_addr()
        if ret < 0:
            self.pos = start
            ret = self.parse_addr_spec()
            if (self.invalid and self.name is None and self.mailbox is not None
                    and self.domain is None):
                self.name, self.mailbox = self.mailbox, None
        self._add_fixed()
        return ret

    def parse_group(self):
        del self.buf[:]
        if self.parse_phrase(self.buf) <= 0 or self.data[self.pos] != _COLON:
            return -1
        self.pos += 1
        ret = self.skip_lwsp()
        self.mailbox = bytes(self.buf)
        self._add()
        if ret > 0 and self.data[self.pos] != _SEMICOLON:
            while True:
                self.parse_mailbox()
                if not self._at(_COMMA):
                    break
                self.pos += 1
                if self.skip_lwsp() <= 0:
                    ret = -1
                    break
        if ret >= 0:
            if not self._at(_SEMICOLON):
                ret = -1
            else:
                self.pos += 1
                ret = self.skip_lwsp()
        self._add()
        return 0 if ret == 0 else 1

    def parse_address(self):
        start = self.pos
        ret = self.parse_group()
        if ret < 0:
            self.pos = start
            ret = self.parse_mailbox()
        return ret

    def parse(self):
        if self.skip_lwsp() <= 0:
            return []
        while True:
            if self.parse_address() == 0:
                break
            if not self._at(_COMMA):
                break
            self.pos += 1
            ret = self.skip_lwsp()
            if ret <= 0:
                if ret < 0:
                    self._add_fixed()  # ends with garbage
                break
        return self.addresses
