"""The MIME structure of a raw message, as byte offsets into it.

Nothing here copies or changes the message: ``parse`` returns a tree of ``Entity``
objects that only point into the raw bytes, and everything else (the leaves that
become part documents, the skeleton that rebuilds the message, IMAP section ranges,
BODYSTRUCTURE in ``bodystructure.py``) is computed from that tree.

The structure rules are RFC 2045/2046 as Dovecot 2.3 reads them, because IMAP clients
compare what we say with what every other server says, and because real mail breaks
the RFCs in ways that only a widely deployed reader has settled:

* A boundary line is ``--boundary`` at the start of a line; the rest of the line is
  ignored (RFC 2046 5.1.1 says only the beginning has to match).  Every boundary of
  every open multipart is looked for, innermost first, the longest match winning, so a
  missing close delimiter of an inner part is healed by the outer boundary.
* The line end before a boundary line belongs to the boundary (RFC 2046), never to
  the body before it; a boundary on the very first line of a body takes nothing.
  A part starts after its boundary line's LF: a boundary line that runs into the end
  of the message starts no part.
* A header ends at its empty line, at the end of the message, or at a boundary line of
  an enclosing multipart (the part then has an empty body).  An empty line right
  before such a boundary line is that boundary's CRLF, not the end of the header.
* Only the first Content-Type field counts.  A multipart without a usable boundary, or
  whose header has no empty line, stays a multipart with no children.  Children of
  multipart/digest default to message/rfc822.  message/global is a leaf, as in Dovecot.
* Nesting stops at ``MAX_NESTING`` levels and the part count at ``MAX_PARTS`` (the root
  included), as in Dovecot: a container that would go deeper is a leaf, and past the
  part limit no boundary is recognised any more.  This also bounds everything that
  walks the tree or serialises BODYSTRUCTURE; ``parse`` itself never recurses.

Lines end in LF or CRLF; a lone CR is data.  Nothing raises, whatever the bytes.

One deliberate difference from Dovecot: when a boundary of a multipart further out
than the parent cuts a header short (a missing close delimiter; the header-only
message inside a message/rfc822 part), every part that boundary closes ends before
the line end preceding it, as RFC 2046 says.  Dovecot adds that line end to the cut
part's parent, so its BODY[n] of that parent is one line end longer and, for a
message/rfc822 parent, BODYSTRUCTURE size and lines count it too.
``parse(raw, dovecot_line_ends=True)`` does the same, for exact compatibility; the
store parses that way (:func:`leapmail.mail.message.prepare`), because IMAP clients
and their users compare what we serve with Dovecot.
"""

import base64
import binascii
import codecs
import re
from dataclasses import dataclass, field

__all__ = [
    "MAX_NESTING", "MAX_PARTS", "Entity", "decoded_text", "leaves", "param_value", "parse",
    "section_range", "skeleton", "text_lines", "walk",
]

MAX_NESTING = 100     # Dovecot's max_nested_mime_parts
MAX_PARTS = 10000     # Dovecot's max_total_mime_parts
# RFC 2046 allows 70 characters; Dovecot keeps 80 and matches lines against those.
_BOUNDARY_MAX = 80
_BOUNDARY_LINE_MAX = _BOUNDARY_MAX + 4

_CR, _LF, _SP, _TAB, _DASH = 13, 10, 32, 9, 45


@dataclass(eq=False, slots=True)
class Entity:
    """One MIME entity: offsets into the raw message and what its header says.

    ``header_end <= body_start``: the bytes between are the empty line that ends the
    header (none when the header ended at the end of the message or at a boundary).
    """

    start: int
    body_start: int
    end: int
    header_end: int
    # Lower-case "type/subtype": the Content-Type when it is usable and in force, else
    # the RFC 2045 default (text/plain; message/rfc822 under multipart/digest).
    # A syntactically broken Content-Type counts as text/plain (RFC 2045 5.2).
    content_type: str = "text/plain"
    # Content-Type parameters as [(lower-case name, value bytes)]: quoted strings
    # unquoted, RFC 2231 continuations joined; an RFC 2231 extended value keeps its
    # charset'language'%XX form under the name "name*" (what BODYSTRUCTURE shows).
    # ``param_value`` decodes them.
    params: list = field(default_factory=list)
    children: list = field(default_factory=list)
    # Parsed as a multipart: the body is preamble, boundaries, children, epilogue.
    # May have no children (no boundary, no empty line after the header, no part).
    multipart: bool = False
    # Parsed as message/rfc822: ``children`` is exactly [the embedded message].
    message: bool = False
    # Content-* fields are in force: inside a multipart always, else only with a
    # MIME-Version or a Content-Type field (Dovecot's lenient reading of RFC 2045 4).
    mime: bool = True
    boundary: bytes | None = None


def walk(root):
    """Every entity of the tree in document order, without recursion."""
    stack = [root]
    while stack:
        e = stack.pop()
        yield e
        if e.children:
            stack.extend(reversed(e.children))


def leaves(root):
    """The entities without children, in document order.

    Their bodies ``raw[body_start:end]`` are what become part documents.  Besides
    ordinary leaves this includes a multipart that ended up with no child (its body
    is then kept whole) and containers cut off by the nesting limit.
    """
    return [e for e in walk(root) if not e.children]


def skeleton(raw, root):
    """Segments rebuilding ``raw``: literal bytes, or ``i`` for the body of leaf ``i``.

    ``b"".join(seg if bytes else leaf_body(seg))`` is ``raw`` exactly: leaves tile the
    message in order and everything between them is kept as literal bytes.
    """
    raw = _as_bytes(raw)
    segments = []
    pos = 0
    for i, leaf in enumerate(leaves(root)):
        if leaf.body_start > pos:
            segments.append(raw[pos:leaf.body_start])
        segments.append(i)
        pos = max(pos, leaf.end)
    if pos < len(raw):
        segments.append(raw[pos:])
    return segments


def text_lines(raw, start, end):
    """Lines of ``raw[start:end]`` as BODYSTRUCTURE counts them: its LF characters.

    A last line without a line end does not count, and a body that ends right before
    a boundary has lost its last line end to the boundary (RFC 2046) - as in Dovecot.
    """
    return raw.count(b"\n", start, end)


def section_range(raw, root, path, part=None):
    """The byte range of IMAP section ``path`` + ``part`` (RFC 3501 6.4.5), or None.

    ``path`` is a tuple of part numbers; ``part`` is None, "HEADER", "TEXT" or "MIME".
    Numbering is Dovecot's: a part that is not a multipart is its own part 1 once
    (so "1" of a single-part message is its body, and "1.1" of a text part inside a
    multipart is that part again, but "1.1" of a single-part message does not exist);
    a number after a message/rfc822 part goes into the embedded message.
    HEADER and TEXT with a path need a message/rfc822 part; MIME needs a path.
    """
    part = part.upper() if isinstance(part, str) else part
    if part not in (None, "HEADER", "TEXT", "MIME"):
        return None
    path = tuple(path)
    if not path:
        if part is None:
            return (0, len(raw))
        if part == "HEADER":
            return (root.start, root.body_start)
        if part == "TEXT":
            return (root.body_start, root.end)
        return None
    e = _find_part(root, path)
    if e is None:
        return None
    if part is None:
        return (e.body_start, e.end)
    if part == "MIME":
        return (e.start, e.body_start)
    if not e.message or not e.children:
        return None
    inner = e.children[0]
    if part == "HEADER":
        return (inner.start, inner.body_start)
    return (inner.body_start, inner.end)


def _find_part(root, path):
    e = root
    may_repeat = True   # a non-multipart may stand for its own "1" once
    last = len(path) - 1
    for i, num in enumerate(path):
        if not isinstance(num, int) or num < 1:
            return None
        if e.multipart:
            if num > len(e.children):
                return None
            e = e.children[num - 1]
            may_repeat = True
        else:
            if num != 1 or not may_repeat:
                return None
            may_repeat = False
        if e.message and e.children and i < last:
            e = e.children[0]
            may_repeat = True
    return e


# --------------------------------------------------------------------------------------
# Parsing

def _as_bytes(raw):
    # memoryview has no find(), and a bytearray could change under the offsets.
    if isinstance(raw, memoryview):
        return raw.tobytes()
    if isinstance(raw, bytearray):
        return bytes(raw)
    return raw


def parse(raw, *, max_nesting=MAX_NESTING, max_parts=MAX_PARTS, dovecot_line_ends=False):
    """The entity tree of ``raw``.  Never raises; never recurses.

    ``max_nesting`` / ``max_parts`` default to Dovecot's limits; None lifts them.
    ``dovecot_line_ends``: place the line end before a boundary that cuts a header
    short the way Dovecot does (see the module docstring) instead of RFC 2046's way.
    """
    raw = _as_bytes(raw)
    try:
        return _Parser(raw, max_nesting, max_parts, dovecot_line_ends).run()
    except Exception:  # noqa: BLE001 - a parser bug must not make a message unreadable
        n = len(raw)
        return Entity(0, n, n, n) if n else Entity(0, 0, 0, 0)


class _Parser:
    def __init__(self, raw, max_nesting, max_parts, dovecot_line_ends=False):
        self.dovecot_line_ends = dovecot_line_ends
        self.raw = raw
        self.n = len(raw)
        self.max_nesting = max_nesting if max_nesting is not None else float("inf")
        self.max_parts = max_parts if max_parts is not None else float("inf")
        self.count = 1          # entities created, the root included (as Dovecot counts)
        self.bstack = []        # [boundary, multipart entity], innermost last
        self._regex = None
        self._regex_key = None

    # -- boundaries ---------------------------------------------------------------

    def boundary_at(self, pos):
        """(stack index, is close delimiter) if the line at ``pos`` is a boundary line."""
        raw, n = self.raw, self.n
        if (not self.bstack or self.count >= self.max_parts
                or raw[pos:pos + 2] != b"--"):
            return None
        d = pos + 2
        # Dovecot looks at no more than BOUNDARY_END_MAX_LEN bytes of a line; beyond
        # that length the outcome cannot depend on the rest of the line.
        window = _BOUNDARY_LINE_MAX + 2
        lf = raw.find(b"\n", d, d + window)
        trailing_dash = False
        if lf >= 0:
            size = lf - d
            if size > 0 and raw[lf - 1] == _CR:
                size -= 1
            if size > 2 and raw[d + size - 2:d + size] == b"--":
                trailing_dash = True
        else:
            size = min(n - d, _BOUNDARY_LINE_MAX)
        best = None
        best_len = -1
        for idx in range(len(self.bstack) - 1, -1, -1):
            b = self.bstack[idx][0]
            blen = len(b)
            if blen <= size and blen > best_len and raw.startswith(b, d):
                best, best_len = idx, blen
                # "--foo--" may be foo's close delimiter or the boundary "foo--".
                if blen == size or (trailing_dash and blen == size - 2):
                    break
        if best is None:
            return None
        return best, raw[d + best_len:d + best_len + 2] == b"--"

    def find_boundary(self, pos, first_line):
        """The next boundary line at or after ``pos``: (delimiter start, line start, hit).

        The delimiter starts at the line end before the boundary line, except on the
        first line of a body, which has none to give.
        """
        if not self.bstack or self.count >= self.max_parts:
            return None
        raw = self.raw
        if first_line:
            hit = self.boundary_at(pos)
            if hit is not None:
                return pos, pos, hit
        regex = self._candidates()
        i = pos
        while True:
            m = regex.search(raw, i)
            if m is None:
                return None
            j = m.start()
            hit = self.boundary_at(j + 1)
            if hit is not None:
                start = j - 1 if j > pos and raw[j - 1] == _CR else j
                return start, j + 1, hit
            i = j + 1

    def _candidates(self):
        # A regex finds candidate lines in C; boundary_at then decides exactly.
        key = tuple(b for b, _ in self.bstack)
        if key != self._regex_key:
            alts = sorted(set(key), key=len, reverse=True)
            # An empty boundary matches every "--" line; and past a few dozen open
            # boundaries compiling the alternation costs more than it saves.
            if any(not b for b in alts) or len(alts) > 32:
                pattern = b"\n--"
            else:
                pattern = b"\n--(?:" + b"|".join(re.escape(b) for b in alts) + b")"
            self._regex = re.compile(pattern)
            self._regex_key = key
        return self._regex

    # -- headers --------------------------------------------------------------------

    def scan_header(self, start):
        """Where the header at ``start`` ends, and what it says about the structure.

        Returns (header_end, body_start, hit, content_type_value, saw_ct, saw_mv);
        ``hit`` is (line start, boundary hit) when a boundary line ended the header.
        """
        raw, n = self.raw, self.n
        pos = start
        prev_nl = 0
        ct_parts = None
        collecting = False
        saw_ct = saw_mv = False
        check_boundaries = bool(self.bstack)
        while True:
            if pos >= n:
                return n, n, None, ct_parts, saw_ct, saw_mv
            c = raw[pos]
            if c == _LF:
                return pos, pos + 1, None, ct_parts, saw_ct, saw_mv
            if c == _CR and raw[pos + 1:pos + 2] == b"\n":
                return pos, pos + 2, None, ct_parts, saw_ct, saw_mv
            if check_boundaries and c == _DASH:
                hit = self.boundary_at(pos)
                if hit is not None:
                    # The line end before the boundary line belongs to the boundary.
                    end = pos - prev_nl
                    return end, end, (pos, hit), ct_parts, saw_ct, saw_mv
            lf = raw.find(b"\n", pos)
            if lf < 0:
                line_end = content_end = n
            else:
                line_end = lf + 1
                content_end = lf - 1 if lf > pos and raw[lf - 1] == _CR else lf
            if pos > start and (c == _SP or c == _TAB):
                if collecting:
                    ct_parts.append(raw[pos:content_end])
            else:
                collecting = False
                colon = raw.find(b":", pos, content_end)
                if colon >= 0:
                    name = _field_key(raw[pos:colon])
                    if name == b"content-type":
                        saw_ct = True
                        if ct_parts is None:
                            ct_parts = [raw[colon + 1:content_end]]
                            collecting = True
                    elif name == b"mime-version":
                        saw_mv = True
            prev_nl = line_end - content_end
            pos = line_end

    # -- the tree ---------------------------------------------------------------------

    def run(self):
        raw, n = self.raw, self.n
        root = Entity(0, 0, n, 0)
        path = [root]               # the open entities, root first
        in_multipart = False        # whether path[-1] is a child of a multipart
        parent_digest = False
        while True:
            ent = path[-1]
            header_end, body_start, hit, ct_parts, saw_ct, saw_mv = \
                self.scan_header(ent.start)
            eoh = hit is None and body_start > header_end
            mime = in_multipart or saw_ct or saw_mv
            ent.mime = mime
            kind = self.classify(ent, ct_parts if mime else None, parent_digest, eoh,
                                 len(path) - 1)
            # (index in path, length) of the line end a boundary took from this header
            cut = (len(path) - 1, hit[0] - header_end) if hit is not None else None
            if eoh:
                # An empty line right before an enclosing boundary is that boundary's
                # CRLF (RFC 2046), so the header ends before it and the body is empty.
                # The part's own boundary, just pushed, takes part in the match.
                h = self.boundary_at(body_start)
                if h is not None and self.bstack[h[0]][1] is not ent:
                    hit = (body_start, h)
                    cut = (len(path) - 1, hit[0] - header_end)
                    body_start = header_end
            ent.header_end, ent.body_start = header_end, body_start
            if kind == "message":
                ent.message = True
                child = Entity(body_start, body_start, body_start, body_start)
                ent.children.append(child)
                self.count += 1
                path.append(child)
                in_multipart, parent_digest = False, False
                if hit is None:
                    continue
                # The header ended at a boundary: the embedded message is empty.
                child.header_end = child.body_start = child.end = body_start
                child.content_type = "text/plain"
                child.mime = False
                found = (body_start, hit[0], hit[1])
            elif hit is not None:
                found = (body_start, hit[0], hit[1])
            else:
                found = self.find_boundary(body_start, True)
            # The body of path[-1] runs to ``found`` (or the end); each boundary either
            # opens the next child of its multipart or ends it and starts its epilogue.
            while True:
                if found is None:
                    for e in path:
                        e.end = n
                    return root
                delim_start, line_start, (idx, close) = found
                owner = self.bstack[idx][1]
                while path[-1] is not owner:
                    e = path.pop()
                    e.end = delim_start
                    if cut is not None and self.dovecot_line_ends and len(path) < cut[0]:
                        e.end += cut[1]     # Dovecot gives it to the cut part's parents
                cut = None
                if close:
                    del self.bstack[idx:]
                else:
                    del self.bstack[idx + 1:]
                lf = raw.find(b"\n", line_start)
                line_end = n if lf < 0 else lf + 1
                if not close and lf < 0:
                    # A part starts after the boundary line's LF; none, no part.
                    for e in path:
                        e.end = n
                    return root
                if not close:
                    child = Entity(line_end, line_end, line_end, line_end)
                    owner.children.append(child)
                    self.count += 1
                    path.append(child)
                    in_multipart = True
                    parent_digest = owner.content_type == "multipart/digest"
                    break
                found = self.find_boundary(line_end, True) if line_end < n else None

    def classify(self, ent, ct_parts, parent_digest, eoh, depth):
        """Set content type, params and container flags; return "message" to descend."""
        too_deep = depth + 1 >= self.max_nesting
        if ct_parts is None:
            if parent_digest:
                ent.content_type = "message/rfc822"
                if too_deep or self.count >= self.max_parts:
                    return None
                return "message"
            ent.content_type = "text/plain"
            return None
        value = b"\n".join(ct_parts)
        ret, ctype, pos = _parse_content_type(value)
        low = ctype.lower()
        if ret >= 0:
            params = _parse_params(value, pos)
            ent.params = [(k.lower().decode("latin-1"), v) for k, v in params]
            ent.content_type = low.decode("latin-1")
        else:
            params = []
            ent.content_type = "text/plain"
        if low == b"message/rfc822":
            if too_deep or self.count >= self.max_parts:
                return None
            return "message"
        if low[:10] == b"multipart/":
            boundary = None
            if b"\0" in value:
                params = _parse_params(value, pos, b"\0")
            for k, v in params:
                if k.lower() == b"boundary":
                    # Dovecot's boundary is a C string of at most 80 bytes
                    boundary = v.split(b"\0", 1)[0][:_BOUNDARY_MAX]
                    break
            if too_deep and eoh and boundary is not None:
                return None     # cut off: a leaf, like any other unknown type
            ent.multipart = True
            ent.boundary = boundary
            if eoh and boundary is not None:
                self.bstack.append([boundary, ent])
        return None


def _field_key(name):
    """A field name as Dovecot compares it: no trailing blanks, cut at NUL, lower case."""
    if b"\0" in name:
        name = name.split(b"\0", 1)[0]
    return name.rstrip(b" \t").lower()


# --------------------------------------------------------------------------------------
# RFC 822 / RFC 2045 / RFC 2231 lexing of structured field values, with Dovecot's
# tolerance of broken input (its rfc822-parser.c and rfc2231-parser.c), because the
# results end up in BODYSTRUCTURE where clients compare them byte for byte.

# 0: not atext; 1: atext; 2: letter, digit or 8-bit; 4: atext but a MIME tspecial.
_ATEXT = bytes(
    [0] * 32
    + [0, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 1, 0, 4]
    + [2] * 10 + [0, 0, 0, 4, 0, 4]
    + [0] + [2] * 26 + [0, 0, 0, 1, 1]
    + [1] + [2] * 26 + [1, 1, 1, 1, 0]
    + [2] * 128
)
_TOKEN = bytes(1 if (c & 3) or i == 0x2E else 0 for i, c in enumerate(_ATEXT))
_REPLACEMENT = "\ufffd".encode()


def _skip_comment(v, i, n):
    level = 1
    i += 1
    while i < n:
        c = v[i]
        if c == 0x28:
            level += 1
        elif c == 0x29:
            level -= 1
            if level == 0:
                i += 1
                return (1 if i < n else 0), i
        elif c == 0x5C:
            i += 1
            if i >= n:
                return -1, i
        i += 1
    return -1, i


def _skip_lwsp(v, i, n):
    while i < n:
        c = v[i]
        if c == _SP or c == _TAB or c == _CR or c == _LF:
            i += 1
        elif c == 0x28:
            r, i = _skip_comment(v, i, n)
            if r < 0:
                return -1, i
        else:
            break
    return (1 if i < n else 0), i


def _token(v, i, n, table=_TOKEN):
    s = i
    while i < n and table[v[i]]:
        i += 1
    tok = v[s:i]
    if i >= n:
        return 0, i, tok
    r, i = _skip_lwsp(v, i, n)
    return r, i, tok


def _atom(v, i, n):
    if i >= n or not _ATEXT[v[i]]:
        return -1, i, b""
    return _token(v, i, n, _ATEXT)


def _quoted_string(v, i, n, nul=_REPLACEMENT):
    out = bytearray()
    i += 1
    s = i
    while i < n:
        c = v[i]
        if c == 0x22:
            out += v[s:i]
            r, i = _skip_lwsp(v, i + 1, n)
            return r, i, bytes(out).replace(b"\0", nul)
        if c == _LF:
            # folding inside the string: the line end goes, the blank stays
            out += v[s:i - 1] if i > s and v[i - 1] == _CR else v[s:i]
            s = i + 1
        elif c == 0x5C:
            i += 1
            if i >= n:
                return -1, i, b""
            out += v[s:i - 1]
            s = i
        i += 1
    return -1, i, b""


def _parse_content_type(v):
    """(ret, b"type/subtype" or a broken remnant, position after it): ret < 0 if broken.

    Like Dovecot, a broken value keeps only a lone main type ("text") or nothing.
    """
    n = len(v)
    r, i = _skip_lwsp(v, 0, n)
    if r <= 0:
        return -1, b"", i
    r, i, main = _token(v, i, n)
    if r <= 0 or not main:
        return -1, main, i
    if v[i] != 0x2F:
        return -1, b"", i
    r, i = _skip_lwsp(v, i + 1, n)
    if r <= 0:
        return -1, b"", i
    r, i, sub = _token(v, i, n)
    if r < 0 or not sub or (r > 0 and v[i] != 0x3B):
        return -1, b"", i
    return r, main + b"/" + sub, i


def _content_param(v, i, n, nul):
    if i >= n:
        return 0, i, None, None
    if v[i] != 0x3B:
        return -1, i, None, None
    r, i = _skip_lwsp(v, i + 1, n)
    if r <= 0:
        return -1, i, None, None
    r, i, key = _token(v, i, n)
    if r <= 0 or v[i] != 0x3D:
        return -1, i, None, None
    r, i = _skip_lwsp(v, i + 1, n)
    value = b""
    if r > 0:
        if v[i] == 0x22:
            r, i, value = _quoted_string(v, i, n, nul)
        elif v[i] == 0x3D:
            # name==?utf-8?b?...?= : an encoded word someone forgot to quote
            s = i
            while i < n and v[i] not in b"; \t\r\n":
                i += 1
            value = v[s:i].split(b"\0", 1)[0]     # Dovecot's C string ends there
        else:
            r, i, value = _token(v, i, n)
    return (-1 if r < 0 else 1), i, key, value


def _parse_params(v, i=0, nul=_REPLACEMENT):
    """The ``; name=value`` list after ``v[i]`` as Dovecot's rfc2231_parse returns it.

    Broken parameters are skipped, RFC 2231 continuations merged (in name order, after
    the plain parameters), extended values left encoded under "name*"; incomplete
    continuations keep their "name*N" names.  A NUL in a quoted string becomes
    ``nul`` (U+FFFD for display; the structure parser keeps it and stops there).
    """
    n = len(v)
    plain = []
    split = []
    idx = 0     # Dovecot carries the index over to a later "name*" parameter
    while True:
        r, i, key, value = _content_param(v, i, n, nul)
        if r == 0:
            break
        if r < 0:
            if i >= n:
                break
            i += 1
            continue
        star = key.find(b"*")
        if star >= 0:
            q = star
            if q + 1 < len(key):
                q += 1
                idx = 0
                while q < len(key) and 0x30 <= key[q] <= 0x39:
                    idx = (idx * 10 + key[q] - 0x30) & 0xFFFFFFFF
                    q += 1
            extended = q < len(key) and key[q] == 0x2A
            if extended:
                q += 1
            if q == len(key):
                split.append((key[:star], value, idx, extended))
                continue
        plain.append((key, value))
    if not split:
        return plain
    split.sort(key=lambda p: (p[0], p[2]))
    i = 0
    while i < len(split):
        name = split[i][0].lower()
        j = i
        ok = True
        have_ext = False
        while j < len(split) and split[j][0].lower() == name:
            if split[j][2] != j - i:
                ok = False
            have_ext = have_ext or split[j][3]
            j += 1
        if not ok:
            for key, value, num, ext in split[i:j]:
                plain.append((b"%s*%d%s" % (key, num, b"*" if ext else b""), value))
        else:
            out = b"''" if have_ext and not split[i][3] else b""
            for key, value, num, ext in split[i:j]:
                out += value.replace(b"%", b"%25") if have_ext and not ext else value
            plain.append((split[i][0] + (b"*" if have_ext else b""), out))
        i = j
    return plain


def param_value(params, name):
    """The decoded value of parameter ``name`` from ``Entity.params``, as str, or None.

    RFC 2231 extended values (``name*``) win over plain ones and are percent-decoded
    in their charset; plain values are RFC 2047-decoded (many mailers encode file
    names that way).  Unknown charsets fall back as in ``decoded_text``.
    """
    name = name.lower()
    plain = extended = None
    for key, value in params:
        if key == name + "*" and extended is None:
            extended = value
        elif key == name and plain is None:
            plain = value
    if extended is not None:
        charset, _, rest = extended.partition(b"'")
        _lang, sep, encoded = rest.partition(b"'")
        if not sep:
            encoded, charset = extended, b"us-ascii"
        data = re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), encoded)
        return _decode(data, charset.decode("latin-1"))
    if plain is not None:
        return decode_header_value(plain)
    return None


# --------------------------------------------------------------------------------------
# Header fields as Dovecot's header parser delivers them (for bodystructure.py)

def header_fields(raw, start, end):
    """``(name, value)`` for each field of the header ``raw[start:end]``.

    ``name`` is as written without trailing blanks (the whole line if it has no
    colon); ``value`` starts after the colon and its leading blanks (one blank is kept
    when that is all there is), continuation lines are joined with LF and the CRs of
    line ends dropped - Dovecot's "full value" with SKIP_INITIAL_LWSP and DROP_CR.
    """
    fields = []
    name = None
    parts = None
    pos = start
    while pos < end:
        lf = raw.find(b"\n", pos, end)
        if lf < 0:
            line_end = content_end = end
        else:
            line_end = lf + 1
            content_end = lf - 1 if lf > pos and raw[lf - 1] == _CR else lf
        if content_end == pos and line_end > pos:
            break
        c = raw[pos]
        if name is not None and (c == _SP or c == _TAB):
            parts.append(raw[pos:content_end])
        else:
            if name is not None:
                fields.append((name, b"\n".join(parts)))
            colon = raw.find(b":", pos, content_end)
            if colon < 0:
                name, parts = raw[pos:content_end], [b""]
            else:
                name = raw[pos:colon].rstrip(b" \t")
                value = raw[colon + 1:content_end]
                stripped = value.lstrip(b" \t")
                if not stripped and value:
                    stripped = value[1:]
                parts = [stripped]
        pos = line_end
    if name is not None:
        fields.append((name, b"\n".join(parts)))
    return fields


# --------------------------------------------------------------------------------------
# Decoded text for the full-text index

_CHARSET_ALIASES = {
    "unknown-8bit": None, "x-unknown": None, "unknown": None, "8bit": None,
    "default": None, "x-user-defined": None,
    "iso-8859-8-i": "iso-8859-8", "iso-8859-6-i": "iso-8859-6",
    "ks_c_5601-1987": "cp949", "ks_c_5601": "cp949", "ksc5601": "cp949",
    "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "cp936": "gb18030",
    "windows-874": "cp874", "x-sjis": "shift_jis", "x-mac-roman": "mac_roman",
    "macintosh": "mac_roman",
    # Mislabelled 8-bit text is common; these fall back to UTF-8, else latin-1.
    "us-ascii": None, "ascii": None, "ansi_x3.4-1968": None,
    # ISO-8859-1 as iconv (and so Dovecot's SEARCH) reads it: 0x80-0x9F are the C1
    # controls, not windows-1252's punctuation.
    "iso-8859-1": "latin-1", "latin1": "latin-1",
}
# Python codecs that are not charsets, or that do more than map bytes to text.
_NOT_CHARSETS = {"idna", "punycode", "raw_unicode_escape", "unicode_escape",
                 "undefined", "mbcs", "oem", "rot_13", "charmap"}


def _codec(charset):
    if not charset:
        return None
    name = charset.strip().strip('"').lower()
    name = name.split("*", 1)[0]            # RFC 2231 language suffix
    if name in _CHARSET_ALIASES:
        return _CHARSET_ALIASES[name]
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError, TypeError):
        return None
    if (not getattr(info, "_is_text_encoding", True)
            or info.name.replace("-", "_") in _NOT_CHARSETS):
        return None
    return info.name




def _decode(data, charset):
    """Text of ``data`` in ``charset``.

    Unknown or missing charsets (US-ASCII included): UTF-8, bytes that are not valid
    UTF-8 replaced by U+FFFD, as Dovecot's SEARCH reads them.
    """
    codec = _codec(charset)
    if codec is not None:
        try:
            return data.decode(codec, "replace")
        except (LookupError, UnicodeError, TypeError, ValueError):
            pass    # a codec that is not quite a charset: fall back
    return data.decode("utf-8", "replace")


_ENCODED_WORD = re.compile(rb"=\?([^?\s]*)\?([BbQq])\?([^?\s]*)\?=")
_BLANKS = re.compile(rb"[ \t]+")


def _decode_word(charset, kind, text):
    try:
        if kind in b"Bb":
            text = re.sub(rb"[^A-Za-z0-9+/]", b"", text)
            text = text[:len(text) - len(text) % 4] if len(text) % 4 == 1 else text
            data = base64.b64decode(text + b"=" * (-len(text) % 4))
        else:
            data = binascii.a2b_qp(text.replace(b"_", b" "))
    except (binascii.Error, ValueError):
        return None
    return _decode(data, charset.decode("latin-1"))


def decode_header_value(value):
    """RFC 2047 decoding of an (unfolded or folded) header value, to str."""
    value = re.sub(rb"\r?\n(?=[ \t])", b"", value)
    out = []
    pos = 0
    last_was_word = False
    for m in _ENCODED_WORD.finditer(value):
        gap = value[pos:m.start()]
        decoded = _decode_word(m.group(1), m.group(2), m.group(3))
        if decoded is None:
            continue
        # Blanks between two encoded words are not text (RFC 2047 6.2).
        if not (last_was_word and not gap.strip(b" \t")):
            out.append(_decode(gap, None))
        out.append(decoded)
        pos = m.end()
        last_was_word = True
    out.append(_decode(value[pos:], None))
    return "".join(out)


def _decode_body(data, encoding):
    encoding = encoding.lower()
    try:
        if encoding == b"base64":
            data = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
            if len(data) % 4 == 1:
                data = data[:-1]
            return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
        if encoding == b"quoted-printable":
            return binascii.a2b_qp(data)
    except (binascii.Error, ValueError):
        pass    # undecodable: index the raw text rather than nothing
    return data


#: The transfer encodings Dovecot's message decoder knows; a body in any other one is
#: skipped by its SEARCH (no text), and so here.
KNOWN_ENCODINGS = frozenset({b"", b"7bit", b"8bit", b"binary", b"base64", b"quoted-printable"})


def _mime_info(raw, ent):
    """(transfer encoding, charset) of ``ent`` from its header, Dovecot's way: the last
    Content-Transfer-Encoding counts, as its first token, lower-cased (``b""``: none;
    ``b"?"``: one without a token, unknown)."""
    encoding = b""
    charset = None
    for name, value in header_fields(raw, ent.start, ent.header_end):
        if _field_key(name) == b"content-transfer-encoding":
            n = len(value)
            r, i = _skip_lwsp(value, 0, n)
            r, i, tok = _token(value, i, n)
            encoding = tok.lower() if r == 0 and tok else b"?"
    if not ent.mime:
        return encoding, charset
    for key, value in ent.params:
        if key == "charset":
            charset = value.decode("latin-1")
            break
    return encoding, charset


def search_text(raw, root):
    """``(headers, body)``: the text of a message as Dovecot's SEARCH reads it.

    ``headers`` is every header line of every entity — the message's, each MIME
    part's and each embedded message's — as ``Name: value`` with RFC 2047 words
    decoded (what SEARCH TEXT matches besides the body).  ``body`` is the decoded
    content of each text/* and message/* leaf, transfer encoding and charset undone
    (what SEARCH BODY matches); other leaves (images, archives) hold no text.
    Nothing raises: bad encodings and unknown charsets degrade to UTF-8 (with U+FFFD).
    """
    raw = _as_bytes(raw)
    headers, bodies = [], []
    for e in walk(root):
        try:
            content_type = e.content_type
            for name, value in header_fields(raw, e.start, e.header_end):
                headers.append(name.decode("latin-1") + ": " + decode_header_value(value))
                if _field_key(name) == b"content-type":
                    # Dovecot's search takes the last Content-Type as the part's type
                    # (its MIME parser, like ours, the first).
                    content_type = value.strip().split(b";", 1)[0].strip().decode(
                        "latin-1").lower()
            if not e.children and content_type.startswith(("text/", "message/")):
                encoding, charset = _mime_info(raw, e)
                if encoding not in KNOWN_ENCODINGS:
                    continue
                text = _decode(_decode_body(raw[e.body_start:e.end], encoding), charset)
                if text:
                    bodies.append(text)
        except Exception:  # noqa: BLE001, S112 - the index must not stop at one bad part
            continue
    # SQLite ends text at a NUL in places (the trigram tokenizer, functions given the
    # column): a NUL in a decoded body would hide everything after it from SEARCH.
    return ("\n".join(headers).replace("\0", "\ufffd"),
            "\n".join(bodies).replace("\0", "\ufffd"))


def decoded_text(raw, root, *, root_header=True):
    """Text for a full-text index: header values, then every text/* leaf, decoded.

    Yields, per entity in document order, the RFC 2047-decoded values of a message
    header (the root's and every embedded message's), the file names and descriptions
    of MIME parts, and the body of each text/* leaf with its transfer encoding and
    charset undone.  Nothing raises: bad encodings and unknown charsets degrade to
    UTF-8 text (with U+FFFD).
    """
    raw = _as_bytes(raw)
    # Without the root header this is the text of the *body*, what SEARCH BODY means:
    # embedded messages' headers are part of it.
    message_headers = {id(root)} if root_header else set()
    for e in walk(root):
        if e.message and e.children:
            message_headers.add(id(e.children[0]))
    for e in walk(root):
        try:
            fields = header_fields(raw, e.start, e.header_end)
            if id(e) in message_headers:
                for name, value in fields:
                    key = _field_key(name)
                    if key.startswith(b"content-") or key == b"mime-version":
                        continue    # structure, not text
                    text = decode_header_value(value).strip()
                    if text:
                        yield text
            elif e.mime and e is not root:
                for name, value in fields:
                    if _field_key(name) == b"content-description":
                        text = decode_header_value(value).strip()
                        if text:
                            yield text
            if e.mime and (root_header or e is not root):
                for key in ("name", "filename"):
                    text = param_value(e.params, key)
                    if text:
                        yield text
                for name, value in fields:
                    if _field_key(name) == b"content-disposition":
                        n = len(value)
                        _, i = _skip_lwsp(value, 0, n)
                        _, i, _ = _token(value, i, n)
                        text = param_value(
                            [(k.lower().decode("latin-1"), v)
                             for k, v in _parse_params(value, i)], "filename")
                        if text:
                            yield text
                        break
            if not e.children and e.content_type.startswith("text/"):
                encoding, charset = _mime_info(raw, e)
                body = _decode_body(raw[e.body_start:e.end], encoding)
                text = _decode(body, charset)
                if text:
                    yield text
        except Exception:  # noqa: BLE001, S112 - the index must not stop at one bad part
            continue
