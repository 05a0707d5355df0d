"""FETCH: the attribute grammar (RFC 3501 6.4.5, RFC 7162) and the response items.

Responses are built per batch of messages in one store read (a reader thread), so a
``UID FETCH 1:*`` over 100,000 messages is a few hundred short jobs, never one huge
one; a batch of message contents also stops at :data:`CONTENT_BATCH_BYTES`.  Sections
larger than :data:`STREAM_THRESHOLD` are not read there: the server streams them
afterwards, piece by piece, with back-pressure.
"""

import datetime
from dataclasses import dataclass

from leapmail.imap import encode
from leapmail.imap.parser import ParseError
from leapmail.mail.bodycache import load_whole
from leapmail.mail.headers import filter_fields
from leapmail.mail.message import load_contents, load_parts, read_range

#: Sections up to this size are read with the batch; bigger ones are streamed.
STREAM_THRESHOLD = 256 * 1024
#: A FETCH of message contents reads up to this many messages at once…
CONTENT_BATCH = 300
#: …and stops early once their sizes add up to more than this.  Fewer, bigger reads
#: were faster (bench_body_fetch.py, bodies from the read cache: 256 KiB 191 MB/s,
#: 512 KiB 206, 1 MiB 219, 2 MiB 225) and this bounds what one read holds.
CONTENT_BATCH_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Section:
    """``BODY[...]``: a MIME part path and what of it, with an optional partial."""

    name: bytes          # what the response calls it, e.g. b"BODY[1.HEADER]"
    path: tuple = ()
    part: str = None     # None, "HEADER", "TEXT", "MIME", "HEADER.FIELDS", "HEADER.FIELDS.NOT"
    fields: tuple = ()
    partial: tuple = None  # (start, length)
    peek: bool = False


SIMPLE = {"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY",
          "BODYSTRUCTURE", "MODSEQ"}
MACROS = {
    "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
    "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
    "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
}
_HEADER_NAME_EXCLUDED = set(b"(){ %*\"\\]:") | set(range(0x21)) | {0x7F}


def parse_items(cursor):
    """The fetch attributes: a list of names (str) and :class:`Section` s."""
    if cursor.peek() == b"(":
        items = cursor.paren_list(lambda: _item(cursor, _word(cursor)))
        if not items:
            raise ParseError("empty fetch attribute list")
        return items
    word = _word(cursor)
    if word in MACROS:
        return list(MACROS[word])
    return [_item(cursor, word)]


def _word(cursor):
    word = cursor.take_until(set(b"[ ()<") | set(range(0x20)))
    if not word:
        raise ParseError("expected a fetch attribute")
    return word.upper().decode("ascii", "replace")


def _item(cursor, word):
    if word in ("BODY", "BODY.PEEK", "BINARY", "BINARY.PEEK") and cursor.peek() == b"[":
        if word.startswith("BINARY"):
            raise ParseError("BINARY is not supported")
        return _section(cursor, peek=word == "BODY.PEEK")
    if word in SIMPLE:
        if cursor.peek() == b"[":
            raise ParseError(f"{word} takes no section")
        return word
    if word == "RFC822":
        return Section(b"RFC822")
    if word == "RFC822.HEADER":
        return Section(b"RFC822.HEADER", part="HEADER", peek=True)
    if word == "RFC822.TEXT":
        return Section(b"RFC822.TEXT", part="TEXT")
    raise ParseError(f"unknown fetch attribute {word}")


def _section(cursor, peek):
    cursor.expect(b"[")
    path, part, fields = [], None, ()
    spec = cursor.take_until(set(b"] (") | set(range(0x20))).upper()
    if spec:
        pieces = spec.split(b".")
        i = 0
        while i < len(pieces) and pieces[i].isdigit():
            if pieces[i].startswith(b"0") or len(pieces[i]) > 9:
                raise ParseError("invalid section part number")
            path.append(int(pieces[i]))
            i += 1
        rest = b".".join(pieces[i:]).decode("ascii", "replace")
        if rest:
            if rest not in ("HEADER", "TEXT", "MIME", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
                raise ParseError(f"invalid section {spec.decode('ascii', 'replace')}")
            if rest == "MIME" and not path:
                raise ParseError("MIME needs a part number")
            part = rest
    if part in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        cursor.sp()
        names = cursor.paren_list(lambda: cursor.astring("a header field name"))
        if not names:
            raise ParseError("empty header field list")
        for name in names:
            if not name or any(c in _HEADER_NAME_EXCLUDED for c in name):
                raise ParseError("invalid header field name")
        fields = tuple(name.upper().decode("ascii") for name in names)
    cursor.expect(b"]", "expected ']' after the section")
    partial = None
    if cursor.skip(b"<"):
        start = cursor.number("a partial start")
        cursor.expect(b".", "expected '.' in the partial range")
        length = cursor.number("a partial length", nonzero=True)
        cursor.expect(b">")
        partial = (start, length)
    text = b".".join(str(n).encode() for n in path)
    if part:
        text = (text + b"." if text else b"") + part.encode()
        if fields:
            text += b" (" + b" ".join(fields[i].encode() for i in range(len(fields))) + b")"
    return Section(b"BODY[" + text + b"]", tuple(path), part, fields, partial, peek)


def sets_seen(items):
    return any(isinstance(item, Section) and not item.peek for item in items)


def needs_content(items):
    return any(isinstance(item, Section) or item in ("ENVELOPE", "BODY", "BODYSTRUCTURE")
               for item in items)


def header_only(items):
    """Whether the top-level header block answers every content item (the usual
    header fetch), so that the indexed copy can be used instead of the content."""
    return needs_content(items) and all(
        (isinstance(item, Section) and not item.path
         and item.part in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT"))
        or (not isinstance(item, Section) and item not in ("ENVELOPE", "BODY", "BODYSTRUCTURE"))
        for item in items)


def whole_only(items):
    """Whether the whole message answers every content item (``BODY[]``, ``RFC822``,
    partials of them), so that the read cache's copy can be used instead of the
    content document."""
    return needs_content(items) and all(
        (isinstance(item, Section) and not item.path and item.part is None)
        or (not isinstance(item, Section) and item not in ("ENVELOPE", "BODY", "BODYSTRUCTURE"))
        for item in items)


# -- rendering --------------------------------------------------------------------------

_MONTH_NAMES = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                "Nov", "Dec"]


def internal_date(timestamp, tz_minutes=0):
    zone = datetime.timezone(datetime.timedelta(minutes=tz_minutes))
    when = datetime.datetime.fromtimestamp(timestamp, zone)
    sign = "-" if tz_minutes < 0 else "+"
    offset = abs(tz_minutes)
    return (f'"{when.day:2d}-{_MONTH_NAMES[when.month - 1]}-{when.year:04d} '
            f'{when.hour:02d}:{when.minute:02d}:{when.second:02d} '
            f'{sign}{offset // 60:02d}{offset % 60:02d}"').encode()


def flag_list(flags, recent):
    """``(flags)``: system flags, then ``\\Recent`` if it is, then keywords (Dovecot's
    order)."""
    words = list(flags)
    if recent:
        at = 0
        while at < len(words) and words[at].startswith("\\"):
            at += 1
        words.insert(at, "\\Recent")
    return b"(" + " ".join(words).encode("utf-8") + b")"


class Stream:
    """A section too big to read with the batch: streamed by the server."""

    __slots__ = ("content", "start", "end")

    def __init__(self, content, start, end):
        self.content, self.start, self.end = content, start, end


def section_bytes_range(content, section, queries):
    """``(start, end)`` in the stored message, or bytes (HEADER.FIELDS), or None."""
    part = section.part
    if isinstance(content, bytes):  # the top-level header block, from the index
        if part == "HEADER":
            return content
        return filter_fields(content, section.fields, part == "HEADER.FIELDS")
    if part in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        where = content.section_range(section.path, "HEADER")
        if where is None:
            return None
        block = read_range(queries, content, *where)
        return filter_fields(block, section.fields, part == "HEADER.FIELDS")
    return content.section_range(section.path, part)


#: Items answered from a message's metadata alone: name -> (meta, recent) -> bytes.
_METADATA = {
    "FLAGS": lambda meta, recent: b"FLAGS " + flag_list(meta.flags, recent),
    "INTERNALDATE": lambda meta, recent: (b"INTERNALDATE "
                                          + internal_date(meta.internal_date, meta.tz)),
    "RFC822.SIZE": lambda meta, recent: b"RFC822.SIZE %d" % meta.size,
    "MODSEQ": lambda meta, recent: b"MODSEQ (%d)" % meta.modseq,
}


def render_message(queries, meta, content, seq, items, recent, parts=None):
    """One ``* seq FETCH (...)`` response as a list of bytes and :class:`Stream` pieces.

    The items in the order given (see :func:`response_order`); UID only when asked,
    as RFC 3501 and Dovecot have it.  ``content`` may be None when no item needs it.
    """
    out = [b"* %d FETCH (" % seq]
    for i, item in enumerate(items):
        if i:
            out.append(b" ")
        if item == "UID":
            out.append(b"UID %d" % meta.uid)
            continue
        metadata = _METADATA.get(item)
        if metadata is not None:
            out.append(metadata(meta, recent))
        elif item == "ENVELOPE":
            out.append(b"ENVELOPE " + encode.encode_envelope(content.envelope))
        elif item == "BODY":
            out.append(b"BODY " + encode.encode_bodystructure(content.bodystructure, False))
        elif item == "BODYSTRUCTURE":
            out.append(b"BODYSTRUCTURE "
                       + encode.encode_bodystructure(content.bodystructure, True))
        else:
            out.extend(_render_section(queries, content, item, parts))
    out.append(b")\r\n")
    return out


def _render_section(queries, content, section, preloaded=None):
    name = section.name
    where = section_bytes_range(content, section, queries) if content is not None else None
    if where is None:
        data = b""
        start, end = 0, 0
    elif isinstance(where, bytes):
        data = where
        start, end = 0, len(where)
    else:
        data = None
        start, end = where
    if section.partial is not None:
        offset, length = section.partial
        name += b"<%d>" % offset
        start, end = min(start + offset, end), min(start + offset + length, end)
        if data is not None:
            data = data[offset:offset + length]
    if data is not None:
        return [name + b" {%d}\r\n" % len(data), wire_bytes(data)]
    if end - start > STREAM_THRESHOLD:
        return [name + b" {%d}\r\n" % (end - start), Stream(content, start, end)]
    return [name + b" {%d}\r\n" % (end - start),
            wire_bytes(read_range(queries, content, start, end, preloaded))]


def wire_bytes(data):
    """Message bytes as a literal may carry them: RFC 3501 9 allows no NUL in a
    literal (CHAR8 is %x01-ff), so NUL goes out as 0x80, as Dovecot sends it.  The
    length does not change; BINARY would be the way to get NULs through."""
    return data.replace(b"\0", b"\x80") if b"\0" in data else data


def within_budget(metas, budget=None):
    """How many of ``metas`` (at least one) a read of their contents takes on: as many
    as fit in ``budget`` bytes, a message over :data:`STREAM_THRESHOLD` counting as
    that much (the rest of it is streamed).  Bounds what one read holds in memory."""
    budget = CONTENT_BATCH_BYTES if budget is None else budget
    total = 0
    for i, meta in enumerate(metas):
        total += min(meta.size, STREAM_THRESHOLD)
        if total > budget and i:
            return i
    return len(metas)


def render_batch(queries, metas, seqs, items, recent, condstore, want_content,
                 flags_changed=(), with_header=False):
    """Responses for a batch, in a reader thread: ``[[piece, ...], ...]``.

    Messages in ``flags_changed`` (\\Seen set by this FETCH) also report FLAGS, and
    with ``condstore`` (CONDSTORE on) UID and MODSEQ: see :func:`_with_flags`.
    ``with_header``: the items are
    :func:`header_only` and ``metas`` carry the indexed header blocks.
    """
    responses = []
    if want_content and with_header:
        # Headers come from the index; contents indexed before it kept them are loaded.
        contents = {m.content: m.header for m in metas if m.header is not None}
        missing = [m.content for m in metas if m.header is None]
        contents.update(load_contents(queries, missing) if missing else {})
    elif want_content:
        # Whole messages from the read cache where it has them (metas read with_cache).
        contents = load_whole(queries, metas) if whole_only(items) else {}
        missing = [m.content for m in metas if m.content not in contents]
        if missing:
            contents.update(load_contents(queries, missing))
    else:
        contents = {}
    parts = None
    if any(isinstance(item, Section) and item.part not in ("HEADER", "HEADER.FIELDS",
                                                           "HEADER.FIELDS.NOT")
           for item in items):
        parts = load_parts(queries, [c for c in contents.values() if not isinstance(c, bytes)],
                           STREAM_THRESHOLD)
    with_flags = _with_flags(items, condstore)
    for meta, seq in zip(metas, seqs):
        content = contents.get(meta.content)
        responses.append(render_message(
            queries, meta, content, seq, with_flags if meta.uid in flags_changed else items,
            meta.uid in recent, parts=parts))
    return responses


#: Items a FETCH can answer from :func:`~leapmail.mail.session.read_flags` alone.
FLAG_ITEMS = frozenset({"UID", "FLAGS", "MODSEQ"})


def flags_only(items):
    """Whether ``items`` ask for FLAGS and nothing beyond UID and MODSEQ (what clients
    ask at every resync): answered by :func:`render_flags`."""
    return "FLAGS" in items and FLAG_ITEMS.issuperset(items)


def render_flags(rows, seq_of, items, recent):
    """The responses to a :func:`flags_only` FETCH for ``(uid, flags, modseq)`` rows,
    as one string: the bytes :func:`render_message` would give, at a fraction of the
    cost."""
    out = []
    for uid, flags, modseq in rows:
        parts = []
        for item in items:
            if item == "UID":
                parts.append(b"UID %d" % uid)
            elif item == "FLAGS":
                parts.append(b"FLAGS " + flag_list(flags, uid in recent))
            else:
                parts.append(b"MODSEQ (%d)" % modseq)
        out.append(b"* %d FETCH (%s)\r\n" % (seq_of(uid), b" ".join(parts)))
    return b"".join(out)


#: Items Dovecot answers before the others, whatever their place in the request.
_SHORT = frozenset({"UID", "FLAGS", "MODSEQ", "RFC822.SIZE", "INTERNALDATE"})


def response_order(items):
    """The items in the order a response gives them: Dovecot's, which is the request's
    except that the short fixed-size items (:data:`_SHORT`) come first."""
    return ([item for item in items if item in _SHORT]
            + [item for item in items if item not in _SHORT])


def _with_flags(items, condstore):
    """The items (in :func:`response_order`) of a message whose \\Seen this FETCH set:
    FLAGS too (RFC 3501 6.4.5), after the other short items, where Dovecot puts it;
    with CONDSTORE on, UID and MODSEQ as well (RFC 7162 3.1)."""
    split = sum(1 for item in items if item in _SHORT)
    short, rest = list(items[:split]), list(items[split:])
    if condstore and "UID" not in short:
        short.insert(0, "UID")
    if "FLAGS" not in short:
        short.append("FLAGS")
    if condstore and "MODSEQ" not in short:
        short.append("MODSEQ")
    return short + rest
