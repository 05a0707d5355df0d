"""Reading IMAP commands: framing (lines and literals, bounded) and the argument grammar.

Twisted's IMAP4Server parses arguments lazily while dispatching, which is where its
pipelining defect (twisted#9282) and several grammar gaps live.  We read a whole
command first — its lines and its literals — and only then parse it, strictly, with a
cursor over the pieces (RFC 3501 section 9, RFC 7888 for ``{n+}``).
"""

import datetime
import re

#: Longest command line we accept, literals excluded (Dovecot's default is 64 KiB too).
MAX_LINE = 64 * 1024
#: Largest literal outside APPEND (search strings, mailbox names, passwords...).
MAX_SMALL_LITERAL = 1024 * 1024
#: Most literals one command may carry.
MAX_LITERALS = 1000

_LITERAL_AT_END = re.compile(rb"(~?)\{(\d{1,20})(\+?)\}$")
_TAG = re.compile(rb"[\x21-\x7e]+")
# atom-char: any CHAR (7-bit) except atom-specials "(" ")" "{" SP CTL "%" "*" DQUOTE "\" "]"
_ATOM_EXCLUDED = set(b'(){ %*"\\]') | set(range(0x00, 0x20)) | set(range(0x7F, 0x100))
_TAG_EXCLUDED = _ATOM_EXCLUDED | {ord("+")}


class ParseError(Exception):
    """The command is malformed: answered with a tagged BAD giving ``str(self)``."""


class Unit:
    """One client line together with the literals it announced (and their lines)."""

    __slots__ = ("texts", "literals")

    def __init__(self):
        self.texts = [b""]
        self.literals = []

    @property
    def first_line(self):
        return self.texts[0]


class CommandReader:
    """Splits the client's byte stream into :class:`Unit` s, bounding every buffer.

    ``limit_for(unit)`` gives the largest literal the command being read may carry;
    ``on_unit(unit)`` receives each complete unit; ``on_continue(unit)`` is called
    when a synchronizing literal is accepted (the server must send "+").  Framing
    errors go to ``on_reject(unit, kind, size)``: ``kind`` is "line" for an overlong
    line, "literal" for a literal over the limit.  After a rejected synchronizing
    literal the client abandons the command; a rejected non-synchronizing one (and its
    command's remaining lines) is read and thrown away without being stored.
    """

    def __init__(self, limit_for, on_unit, on_continue, on_reject):
        self._limit_for = limit_for
        self._on_unit = on_unit
        self._on_continue = on_continue
        self._on_reject = on_reject
        self._buffer = bytearray()
        self._unit = Unit()
        self._line_length = 0
        self._literal_left = 0   # bytes of literal still to come
        self._literal = None     # bytearray being filled, or None when discarding
        self._discarding = False  # swallowing the rest of a rejected command
        self._overlong = False
        self._closed = False
        self.paused = False

    def feed(self, data):
        if self._closed:
            return
        self._buffer += data
        self._drain()

    def resume(self):
        if not self._closed:
            self.paused = False
            self._drain()

    def close(self):
        """Forget everything read and not yet handed out, now and for good — also the
        rest of the data being drained while ``on_unit`` runs (STARTTLS needs that)."""
        self._closed = True
        self.paused = True
        self._buffer.clear()

    def _drain(self):
        while self._buffer and not self.paused:
            if self._literal_left:
                take = min(self._literal_left, len(self._buffer))
                if self._literal is not None:
                    self._literal += self._buffer[:take]
                del self._buffer[:take]
                self._literal_left -= take
                if not self._literal_left:
                    if self._literal is not None:
                        self._unit.literals.append(bytes(self._literal))
                        self._unit.texts.append(b"")
                    self._literal = None
                continue
            end = self._buffer.find(b"\n")
            if end < 0:
                if self._line_length + len(self._buffer) > MAX_LINE:
                    self._keep_head(self._buffer)
                    self._overlong = True
                    self._line_length += len(self._buffer)
                    self._buffer.clear()
                return
            line = bytes(self._buffer[:end])
            del self._buffer[:end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            self._line(line)

    def _keep_head(self, data):
        # Only the start of an overlong line is kept: enough to name its tag.
        if not self._overlong:
            self._unit.texts[-1] = (self._unit.texts[-1] + bytes(data))[:200]

    def _line(self, line):
        unit = self._unit
        if self._overlong or self._line_length + len(line) > MAX_LINE:
            self._keep_head(line)
            self._overlong = False
            self._line_length = 0
            self._unit = Unit()
            if not self._discarding:
                self._on_reject(unit, "line", 0)
            self._discarding = False
            return
        match = _LITERAL_AT_END.search(line)
        if match is None:
            self._line_length = 0
            self._unit = Unit()
            if self._discarding:
                self._discarding = False
            else:
                unit.texts[-1] += line
                self._on_unit(unit)
            return
        size = int(match.group(2))
        synchronizing = not match.group(3)
        self._line_length += len(line)
        if self._discarding:
            self._literal_left, self._literal = size, None
            return
        unit.texts[-1] += line
        if size > self._limit_for(unit) or len(unit.literals) >= MAX_LITERALS:
            if synchronizing:
                # The client waits for "+", which it will not get: the command ends here.
                self._unit = Unit()
                self._line_length = 0
            else:
                self._discarding = True
                self._literal_left, self._literal = size, None
            self._on_reject(unit, "literal", size)
            return
        self._literal_left = size
        self._literal = bytearray()
        if synchronizing:
            self._on_continue(unit)
        if size == 0:
            self._unit.literals.append(b"")
            self._unit.texts.append(b"")
            self._literal = None


def split_tag(line):
    """``(tag, rest)`` of a command line; ``tag`` is None if there is no valid one."""
    tag, _, rest = line.partition(b" ")
    if not tag or any(c in _TAG_EXCLUDED for c in tag):
        return None, line
    return tag, rest


def command_name(unit):
    """The upper-cased command (with "UID " kept as a prefix) of a unit, or b""."""
    _, rest = split_tag(unit.first_line)
    words = rest.split(b" ", 2)
    name = words[0].upper()
    if name == b"UID" and len(words) > 1:
        return b"UID " + words[1].upper()
    return name


# -- the argument cursor --------------------------------------------------------------

class Cursor:
    """Reads arguments from a unit's text, stepping into its literals where announced."""

    def __init__(self, unit, start=0):
        self._texts = unit.texts
        self._literals = unit.literals
        self._i = 0
        self._pos = start
        # Where each text's trailing "{n}" marker starts: the literal replaces it.
        self._marker = []
        for i, text in enumerate(self._texts):
            match = _LITERAL_AT_END.search(text) if i < len(self._literals) else None
            self._marker.append(match.start() if match else len(text))

    # -- low level

    def _text(self):
        return self._texts[self._i]

    def peek(self):
        """The next character (a one-byte bytes), b"{" before a literal, b"" at the end."""
        if self._pos < self._marker[self._i]:
            return self._text()[self._pos:self._pos + 1]
        if self._i < len(self._literals):
            return b"{"
        return b""

    def at_end(self):
        return self.peek() == b""

    def end(self):
        if not self.at_end():
            raise ParseError("unexpected text after the command's arguments")

    def sp(self):
        if self.peek() != b" ":
            raise ParseError("expected a space")
        self._pos += 1

    def skip(self, char):
        """Consume ``char`` if it is next; returns whether it was."""
        if self.peek() == char and char != b"{":
            self._pos += 1
            return True
        return False

    def expect(self, char, what=None):
        if not self.skip(char):
            raise ParseError(what or f"expected {char.decode()!r}")

    def take_until(self, excluded):
        """The run of bytes up to one in ``excluded`` (or a literal, or the end)."""
        text = self._text()
        start = self._pos
        stop = self._marker[self._i]
        pos = start
        while pos < stop and text[pos] not in excluded:
            pos += 1
        self._pos = pos
        return text[start:pos]

    # -- tokens

    def peek_word(self, word):
        """Whether ``word`` and a space come next (case-insensitively)."""
        text = self._text()
        return text[self._pos:self._pos + len(word) + 1].upper() == word + b" "

    def atom(self, what="an atom", extra=b""):
        excluded = _ATOM_EXCLUDED - set(extra)
        value = self.take_until(excluded)
        if not value:
            raise ParseError(f"expected {what}")
        return value

    def literal(self):
        if self._pos < self._marker[self._i] or self._i >= len(self._literals):
            raise ParseError("expected a literal")
        value = self._literals[self._i]
        self._i += 1
        self._pos = 0
        return value

    def quoted(self):
        text = self._text()
        self.expect(b'"')
        out = bytearray()
        stop = self._marker[self._i]
        pos = self._pos
        while True:
            if pos >= len(text) or (pos >= stop and self._i < len(self._literals)):
                raise ParseError("unterminated quoted string")
            c = text[pos]
            if c == 0x22:
                self._pos = pos + 1
                return bytes(out)
            if c == 0x5C:
                pos += 1
                if pos >= len(text) or text[pos] not in (0x22, 0x5C):
                    raise ParseError("bad escape in quoted string")
                c = text[pos]
            elif c in (0x0D, 0x0A, 0x00):
                raise ParseError("bad character in quoted string")
            out.append(c)
            pos += 1

    def string(self, what="a string"):
        c = self.peek()
        if c == b'"':
            return self.quoted()
        if c == b"{":
            return self.literal()
        raise ParseError(f"expected {what}")

    def astring(self, what="a string"):
        c = self.peek()
        if c in (b'"', b"{"):
            return self.string(what)
        # ASTRING-CHAR = ATOM-CHAR / resp-specials ("]")
        return self.atom(what, extra=b"]")

    def nstring(self):
        if self.peek() in (b'"', b"{"):
            return self.string()
        word = self.atom("a string or NIL")
        if word.upper() != b"NIL":
            raise ParseError("expected a string or NIL")
        return None

    def number(self, what="a number", nonzero=False):
        digits = self.take_until(set(range(256)) - set(b"0123456789"))
        if not digits or len(digits) > 20:
            raise ParseError(f"expected {what}")
        value = int(digits)
        if nonzero and value == 0:
            raise ParseError(f"{what} must not be zero")
        return value

    def paren_list(self, item):
        """``( item *(SP item) )``; an empty list is allowed."""
        self.expect(b"(")
        values = []
        if self.skip(b")"):
            return values
        while True:
            values.append(item())
            if self.skip(b")"):
                return values
            self.sp()

    def astring_or_list(self):
        """A list of astrings or a single one: for the LIST patterns of RFC 5258."""
        if self.peek() == b"(":
            return self.paren_list(self.list_mailbox)
        return [self.list_mailbox()]

    def list_mailbox(self):
        """list-mailbox = 1*list-char / string (list-char adds "%" "*" "]")."""
        if self.peek() in (b'"', b"{"):
            return self.string("a mailbox pattern")
        value = self.take_until(_ATOM_EXCLUDED - set(b"%*]"))
        if not value:
            raise ParseError("expected a mailbox pattern")
        return value

    def flag_list(self):
        return self.paren_list(self.flag)

    def flag(self):
        if self.skip(b"\\"):
            return "\\" + self.atom("a flag").decode("ascii", "replace")
        return self.atom("a flag").decode("ascii", "replace")

    def sequence_set(self):
        return parse_sequence_set(self.atom("a sequence set", extra=b"*"))

    def date(self):
        """date = date-text / DQUOTE date-text DQUOTE."""
        if self.peek() == b'"':
            text = self.quoted()
        else:
            text = self.atom("a date")
        return parse_date(text)


# -- values ---------------------------------------------------------------------------

def parse_sequence_set(text):
    """``[(low, high), ...]`` with ``None`` for "*"; ``low <= high`` is not implied."""
    ranges = []
    for piece in text.split(b","):
        ends = piece.split(b":")
        if len(ends) > 2 or not piece:
            raise ParseError("invalid sequence set")
        values = []
        for end in ends:
            if end == b"*":
                values.append(None)
            elif end.isdigit() and not end.startswith(b"0") and len(end) <= 10:
                value = int(end)
                if value > 0xFFFFFFFF:
                    raise ParseError("invalid sequence set")
                values.append(value)
            else:
                raise ParseError("invalid sequence set")
        ranges.append((values[0], values[-1]))
    return ranges


_MONTHS = {m: i for i, m in enumerate(
    [b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct", b"nov",
     b"dec"], 1)}
_DATE = re.compile(rb"^(\d{1,2})-([A-Za-z]{3})-(\d{4})$")
_DATE_TIME = re.compile(
    rb"^([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$")


def parse_date(text):
    match = _DATE.match(text)
    month = _MONTHS.get(match.group(2).lower()) if match else None
    if month is None:
        raise ParseError("invalid date")
    try:
        return datetime.date(int(match.group(3)), month, int(match.group(1)))
    except ValueError:
        raise ParseError("invalid date") from None


def parse_date_time(text):
    """APPEND's date-time: ``(unix_time, zone_minutes)``."""
    match = _DATE_TIME.match(text)
    month = _MONTHS.get(match.group(2).lower()) if match else None
    if month is None:
        raise ParseError("invalid date-time")
    day, _, year, hour, minute, second, sign, zh, zm = match.groups()
    try:
        local = datetime.datetime(int(year), month, int(day), int(hour), int(minute),
                                  int(second))
    except ValueError:
        raise ParseError("invalid date-time") from None
    zone = int(zh) * 60 + int(zm)
    if int(zm) >= 60 or zone >= 24 * 60:
        raise ParseError("invalid date-time zone")
    zone = -zone if sign == b"-" else zone
    epoch = (local - datetime.datetime(1970, 1, 1)).total_seconds() - zone * 60
    return int(epoch), zone
