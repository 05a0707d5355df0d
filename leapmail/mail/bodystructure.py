"""IMAP BODY / BODYSTRUCTURE data (RFC 3501 7.4.2) as Python structures.

Computed from the ``mime.parse`` tree; serialising it to IMAP syntax is the IMAP
layer's business.  Every choice RFC 3501 leaves open is made the way Dovecot 2.3
makes it, because clients cache and compare BODYSTRUCTURE across servers:

* type, subtype, parameter names and values, encoding and disposition are given as
  written (not case-folded); message/rfc822 parts are always b"message" b"rfc822".
* A text part without a charset parameter gets ("charset", "us-ascii") appended;
  a part without Content-Type is text/plain.  The encoding defaults to b"7bit".
* Content-* fields count only in a MIME context: inside a multipart, or with a
  MIME-Version or Content-Type field in the (embedded) message's header.
* The first Content-Type / ID / MD5 / Description / Location field wins; the first
  *valid* Content-Transfer-Encoding and the first non-empty Content-Language win; a
  Content-Disposition without parameters is replaced by a later one.
* A broken Content-Type gives b"" b"" (or the lone main type, as in b"text" b""),
  without parameters.  A multipart or message/rfc822 that could not be parsed as one
  (nesting limit) is described as b"application" b"octet-stream".
* A multipart without children gets one empty text/plain part, as IMAP requires one.
* RFC 2231 continuations are joined but extended values stay encoded ("name*").
* ID, MD5, Description and Location lose their line ends (a blank is put between
  words they would otherwise glue together); NULs become U+FFFD.

Sizes are octet counts of what BODY[section] returns, i.e. of the stored bytes.
Dovecot counts a bare LF as CRLF because it converts line ends when it serves a
message; we serve the exact bytes (DESIGN.md), so a size counts what we send.  Lines
are the LF count of the body, which is what Dovecot reports.  (The other deliberate
difference, one line end in rare broken structures, is described in ``mime``.)
"""

from leapmail.mail.mime import (
    _REPLACEMENT,
    _as_bytes,
    _atom,
    _field_key,
    _parse_content_type,
    _parse_params,
    _skip_lwsp,
    _token,
    header_fields,
    walk,
)

__all__ = ["bodystructure"]

_DEFAULT_CHARSET = (b"charset", b"us-ascii")


def _empty_part(extension):
    part = {"type": b"text", "subtype": b"plain", "params": [_DEFAULT_CHARSET],
            "id": None, "description": None, "encoding": b"7bit", "size": 0,
            "lines": 0}
    if extension:
        part.update(md5=None, disposition=None, language=None, location=None)
    return part


def _nstring(value):
    """An ID/MD5/Description/Location value as Dovecot writes it."""
    value = value.replace(b"\0", _REPLACEMENT)
    if b"\r" not in value and b"\n" not in value:
        return value
    out = bytearray()
    n = len(value)
    for i in range(n):
        c = value[i]
        if c != 13 and c != 10:
            out.append(c)
        elif i + 1 < n and value[i + 1] not in b" \t\r\n":
            out.append(32)
    return bytes(out)


class _Fields:
    """The Content-* data of one entity, gathered the way Dovecot gathers it."""

    __slots__ = ("csubtype", "ctype", "description", "disp_params", "disposition",
                 "encoding", "id", "language", "location", "md5", "params")

    def __init__(self, raw, ent):
        self.ctype = self.csubtype = None
        self.params = []
        self.encoding = self.id = self.md5 = self.description = None
        self.location = self.disposition = self.language = None
        self.disp_params = []
        if not ent.mime:
            return
        seen_type = False
        for name, value in header_fields(raw, ent.start, ent.header_end):
            key = _field_key(name)
            if not key.startswith(b"content-"):
                continue
            key = key[8:]
            if key == b"type":
                if not seen_type:
                    seen_type = True
                    self._content_type(value)
            elif key == b"transfer-encoding":
                if self.encoding is None:
                    n = len(value)
                    _, i = _skip_lwsp(value, 0, n)
                    r, i, tok = _token(value, i, n)
                    if r == 0 and tok:
                        self.encoding = tok
            elif key == b"id":
                if self.id is None:
                    self.id = _nstring(value)
            elif key == b"md5":
                if self.md5 is None:
                    self.md5 = _nstring(value)
            elif key == b"description":
                if self.description is None:
                    self.description = _nstring(value)
            elif key == b"location":
                if self.location is None:
                    self.location = _nstring(value)
            elif key == b"language":
                if self.language is None:
                    self._language(value)
            elif key == b"disposition" and not self.disp_params:
                self._disposition(value)

    def _content_type(self, value):
        ret, ctype, pos = _parse_content_type(value)
        main, slash, sub = ctype.partition(b"/")
        self.ctype = main
        self.csubtype = sub if slash else None
        if ret >= 0:
            self.params = _parse_params(value, pos)

    def _language(self, value):
        n = len(value)
        _, i = _skip_lwsp(value, 0, n)
        langs = []
        while True:
            r, i, atom = _atom(value, i, n)
            if r < 0:
                break
            langs.append(atom)
            if i >= n or value[i] != 0x2C:
                break
            _, i = _skip_lwsp(value, i + 1, n)
        if langs:
            self.language = langs

    def _disposition(self, value):
        n = len(value)
        _, i = _skip_lwsp(value, 0, n)
        r, i, tok = _token(value, i, n)
        if r < 0:
            return
        self.disposition = tok
        params = _parse_params(value, i)
        if params:
            self.disp_params = params

    def plain_7bit(self):
        if self.ctype is not None and (
                self.ctype.lower() != b"text" or self.csubtype is None
                or self.csubtype.lower() != b"plain"):
            return False
        if len(self.params) > 1 or (self.params and (
                self.params[0][0].lower() != b"charset"
                or self.params[0][1].lower() != b"us-ascii")):
            return False
        if self.encoding is not None and self.encoding.lower() != b"7bit":
            return False
        return (self.id is None and self.description is None and self.md5 is None
                and self.disposition is None and self.language is None
                and self.location is None)

    def extension(self, part):
        part["disposition"] = (None if self.disposition is None else
                               (self.disposition, self.disp_params or None))
        part["language"] = self.language
        part["location"] = self.location


def _plain_7bit(raw, ent, extension):
    part = _empty_part(extension)
    part["size"] = ent.end - ent.body_start
    part["lines"] = raw.count(b"\n", ent.body_start, ent.end)
    return part


def _truncated(fields, parent):
    # A container the parser did not open (nesting or part limit): Dovecot calls it
    # application/octet-stream rather than promise a structure that is not there.
    if fields.ctype is not None:
        main = fields.ctype.lower()
        if main == b"multipart":
            return True
        return (main == b"message" and fields.csubtype is not None
                and fields.csubtype.lower() == b"rfc822")
    return (parent is not None and parent.multipart
            and parent.content_type == "multipart/digest")


def _envelope(raw, ent):
    try:
        from leapmail.mail.envelope import envelope
    except ImportError:
        return None
    try:
        return envelope(raw[ent.start:ent.body_start])
    except Exception:  # noqa: BLE001 - one bad header must not cost the BODYSTRUCTURE
        return None


def bodystructure(raw, root, extension=True, *, canonical_plain=False):
    """BODYSTRUCTURE (``extension=True``) or BODY data of the message ``raw``.

    Non-multipart parts are dicts with type, subtype, params (list of (name, value)
    bytes pairs, or None), id, description, encoding, size, and lines for text/*
    and message/rfc822; message/rfc822 parts also have envelope and body.  With
    extension data: md5, disposition ((type, params or None) or None), language
    (list or None), location.  Multiparts: type b"multipart", subtype, parts, and
    with extension data params, disposition, language, location.

    ``canonical_plain``: describe a message that is nothing but one 7-bit us-ascii
    text/plain part in canonical lower case, as Dovecot does for mail it parsed
    while saving it (APPEND, LDA, LMTP); mail it first reads from a Maildir is
    described as written, which is the default here.
    """
    raw = _as_bytes(raw)
    order = []
    parents = {id(root): None}
    for e in walk(root):
        order.append(e)
        for c in e.children:
            parents[id(c)] = e
    done = {}
    # Reversed pre-order visits children before their parents: no recursion needed.
    for e in reversed(order):
        fields = _Fields(raw, e)
        if e.multipart:
            parts = [done.pop(id(c)) for c in e.children] or [_empty_part(extension)]
            d = {"type": b"multipart", "subtype": fields.csubtype or b"", "parts": parts}
            if extension:
                d["params"] = fields.params or None
                fields.extension(d)
            done[id(e)] = d
            continue
        if canonical_plain and e is root and not e.children and fields.plain_7bit():
            done[id(e)] = _plain_7bit(raw, e, extension)
            continue
        if e.message:
            ctype, subtype, text = b"message", b"rfc822", False
        elif _truncated(fields, parents[id(e)]):
            ctype, subtype, text = b"application", b"octet-stream", False
        elif fields.ctype is None:
            ctype, subtype, text = b"text", b"plain", True
        else:
            ctype, subtype = fields.ctype, fields.csubtype or b""
            text = ctype.lower() == b"text"
        params = list(fields.params)
        if text and not any(k.lower() == b"charset" for k, _ in params):
            params.append(_DEFAULT_CHARSET)
        d = {"type": ctype, "subtype": subtype, "params": params or None,
             "id": fields.id, "description": fields.description,
             "encoding": fields.encoding if fields.encoding is not None else b"7bit",
             "size": e.end - e.body_start}
        if text:
            d["lines"] = raw.count(b"\n", e.body_start, e.end)
        elif e.message:
            inner = e.children[0]
            d["envelope"] = _envelope(raw, inner)
            d["body"] = done.pop(id(inner))
            d["lines"] = raw.count(b"\n", e.body_start, e.end)
        if extension:
            d["md5"] = fields.md5
            fields.extension(d)
        done[id(e)] = d
    return done[id(root)]
