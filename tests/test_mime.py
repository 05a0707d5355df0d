"""MIME structure: offsets, skeleton, IMAP sections, BODYSTRUCTURE, decoded text.

Expected values are exact bytes, worked out by hand from RFC 2045/2046/3501 and
checked against Dovecot 2.3 (``test_differential_against_dovecot`` re-checks the
whole corpus when Dovecot's imap binary is there).
"""

import re
import statistics
import sys
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mail_corpus import (
    big_message,
    corpus,
    deep_mixed,
    deep_multipart,
    deep_rfc822,
    generated,
    tricky,
)

from leapmail.mail import mime
from leapmail.mail.bodystructure import bodystructure
from leapmail.mail.mime import (
    MAX_NESTING,
    decoded_text,
    leaves,
    param_value,
    parse,
    section_range,
    skeleton,
    text_lines,
    walk,
)

CORPUS = corpus()
TRICKY = dict(tricky())


def strict_parse(raw):
    """parse() without its safety net, so that a bug shows up as an exception."""
    return mime._Parser(raw, MAX_NESTING, mime.MAX_PARTS).run()


def rebuild(raw, root):
    lv = leaves(root)
    return b"".join(s if isinstance(s, bytes) else raw[lv[s].body_start:lv[s].end]
                    for s in skeleton(raw, root))


def all_paths(root, limit=None):
    """Every section path that names an entity, in IMAP numbering."""
    out = []
    stack = [(root, ())]
    while stack and (limit is None or len(out) < limit):
        e, prefix = stack.pop()
        if e.message and e.children:
            inner = e.children[0]
            if inner.multipart:
                stack.append((inner, prefix))
            else:
                out.append(prefix + (1,))
        elif e.multipart:
            for i, c in reversed(list(enumerate(e.children))):
                out.append(prefix + (i + 1,))
                stack.append((c, prefix + (i + 1,)))
    return out if limit is None else out[:limit]


def check_tree(raw, root):
    """The invariants every parse must keep, whatever the input."""
    n = len(raw)
    assert (root.start, root.end) == (0, n)
    for e in walk(root):
        assert e.start <= e.header_end <= e.body_start <= e.end <= n
        pos = e.body_start
        for c in e.children:
            assert pos <= c.start and c.end <= e.end
            pos = c.end
        if e.message:
            (inner,) = e.children
            assert (inner.start, inner.end) == (e.body_start, e.end)
        if e.children:
            assert e.multipart or e.message
    segments = skeleton(raw, root)
    ints = [s for s in segments if isinstance(s, int)]
    assert ints == list(range(len(leaves(root))))
    assert rebuild(raw, root) == raw
    for path in all_paths(root, limit=50) + [(1,), (1, 1), (2,), (9, 9)]:
        for part in (None, "MIME", "HEADER", "TEXT"):
            rng = section_range(raw, root, path, part)
            assert rng is None or 0 <= rng[0] <= rng[1] <= n
    for part in (None, "HEADER", "TEXT"):
        start, end = section_range(raw, root, (), part)
        assert 0 <= start <= end <= n


def sec(raw, path, part=None):
    root = parse(raw)
    rng = section_range(raw, root, path, part)
    return None if rng is None else raw[rng[0]:rng[1]]


# ----------------------------------------------------------------------------------------
# The corpus

def test_corpus_is_big_and_varied():
    assert len(generated()) >= 200
    names = [name for name, _ in CORPUS]
    assert len(names) == len(set(names))
    kinds = set()
    for _, raw in generated():
        for e in walk(parse(raw)):
            kinds.add(e.content_type)
    for kind in ("multipart/mixed", "multipart/alternative", "multipart/related",
                 "multipart/digest", "message/rfc822", "text/plain", "text/html"):
        assert kind in kinds
    assert any(b"\r\n" not in raw for _, raw in generated())    # bare LF messages


@pytest.mark.parametrize("name", [name for name, _ in CORPUS])
def test_corpus_message_round_trips(name):
    raw = dict(CORPUS)[name]
    root = strict_parse(raw)
    check_tree(raw, root)
    bodystructure(raw, root)
    bodystructure(raw, root, extension=False)
    for text in decoded_text(raw, root):
        assert isinstance(text, str)


def test_generated_corpus_is_reproducible():
    assert generated(5) == generated(5)


# ----------------------------------------------------------------------------------------
# Structure and sections, by hand

SIMPLE = (b"Content-Type: multipart/mixed; boundary=x\r\n\r\npre\r\n--x\r\n\r\nhello\r\n--x\r\n"
          b"Content-Type: TEXT/Plain\r\n\r\nx\r\n\r\n--x--\r\nepi\r\n")


def test_offsets_of_a_simple_multipart():
    root = parse(SIMPLE)
    assert (root.start, root.header_end, root.body_start, root.end) == (0, 43, 45, 114)
    assert root.multipart and root.boundary == b"x"
    assert root.params == [("boundary", b"x")]
    one, two = root.children
    # part 1: empty header, its CRLF ends it; the CRLF before "--x" is the boundary's
    assert (one.start, one.header_end, one.body_start, one.end) == (55, 55, 57, 62)
    assert SIMPLE[one.body_start:one.end] == b"hello"
    assert SIMPLE[two.start:two.body_start] == b"Content-Type: TEXT/Plain\r\n\r\n"
    assert SIMPLE[two.body_start:two.end] == b"x\r\n"
    assert two.content_type == "text/plain"
    assert skeleton(SIMPLE, root) == [
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\npre\r\n--x\r\n\r\n", 0,
        b"\r\n--x\r\nContent-Type: TEXT/Plain\r\n\r\n", 1, b"\r\n--x--\r\nepi\r\n"]


@pytest.mark.parametrize("path, part, expected", [
    ((), None, SIMPLE),
    ((), "HEADER", b"Content-Type: multipart/mixed; boundary=x\r\n\r\n"),
    ((), "TEXT", SIMPLE[45:]),
    ((), "MIME", None),
    ((1,), None, b"hello"),
    ((1,), "MIME", b"\r\n"),
    ((2,), None, b"x\r\n"),
    ((2,), "MIME", b"Content-Type: TEXT/Plain\r\n\r\n"),
    ((1, 1), None, b"hello"),            # a leaf is its own part 1, once
    ((1, 1, 1), None, None),
    ((3,), None, None),
    ((1,), "HEADER", None),              # HEADER/TEXT need message/rfc822
    ((1,), "TEXT", None),
    ((0,), None, None),
])
def test_sections_of_a_simple_multipart(path, part, expected):
    assert sec(SIMPLE, path, part) == expected


SINGLE = b"Subject: s\r\nContent-Type: text/plain\r\n\r\nbody\r\n"
TOP822 = b"Content-Type: message/rfc822\r\n\r\nSubject: in\r\n\r\ninner\r\n"
MP822MP = (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
           b"Content-Type: message/rfc822\r\n\r\nSubject: e\r\n"
           b"Content-Type: multipart/alternative; boundary=y\r\n\r\n--y\r\n\r\nY1\r\n"
           b"--y\r\n\r\nY2\r\n--y--\r\n--x\r\nContent-Type: text/plain\r\n\r\nlast\r\n--x--\r\n")


@pytest.mark.parametrize("raw, path, part, expected", [
    # single part: "1" is the body, its MIME header is the message header
    (SINGLE, (1,), None, b"body\r\n"),
    (SINGLE, (1,), "MIME", b"Subject: s\r\nContent-Type: text/plain\r\n\r\n"),
    (SINGLE, (1, 1), None, None),
    (SINGLE, (2,), None, None),
    # a message that is a message/rfc822
    (TOP822, (1,), None, b"Subject: in\r\n\r\ninner\r\n"),
    (TOP822, (1,), "HEADER", b"Subject: in\r\n\r\n"),
    (TOP822, (1,), "TEXT", b"inner\r\n"),
    (TOP822, (1, 1), None, b"inner\r\n"),
    (TOP822, (1, 1), "MIME", b"Subject: in\r\n\r\n"),
    (TOP822, (1, 1, 1), None, None),
    # multipart > message/rfc822 > multipart
    (MP822MP, (1,), None, (b"Subject: e\r\nContent-Type: multipart/alternative; boundary=y"
                           b"\r\n\r\n--y\r\n\r\nY1\r\n--y\r\n\r\nY2\r\n--y--\r\n")),
    (MP822MP, (1,), "MIME", b"Content-Type: message/rfc822\r\n\r\n"),
    (MP822MP, (1,), "HEADER",
     b"Subject: e\r\nContent-Type: multipart/alternative; boundary=y\r\n\r\n"),
    (MP822MP, (1,), "TEXT", b"--y\r\n\r\nY1\r\n--y\r\n\r\nY2\r\n--y--\r\n"),
    (MP822MP, (1, 1), None, b"Y1"),
    (MP822MP, (1, 1, 1), None, b"Y1"),
    (MP822MP, (1, 2), None, b"Y2"),
    (MP822MP, (1, 2), "MIME", b"\r\n"),
    (MP822MP, (1, 3), None, None),
    (MP822MP, (2,), None, b"last"),
    (MP822MP, (2,), "MIME", b"Content-Type: text/plain\r\n\r\n"),
])
def test_sections_through_messages(raw, path, part, expected):
    assert sec(raw, path, part) == expected


@pytest.mark.parametrize("name, path, part, expected", [
    ("header-only-no-newline", (), "HEADER", b"Subject: no body\r\nFrom: a@example.org"),
    ("header-only-no-newline", (), "TEXT", b""),
    ("header-only-final-newline", (), "HEADER", b"Subject: no body\r\nFrom: a@example.org\r\n"),
    ("header-only-blank-line", (), "TEXT", b""),
    ("starts-with-blank-line", (), "HEADER", b"\r\n"),
    ("starts-with-blank-line", (1,), None, b"This message has no header at all.\r\n"),
    ("no-header-no-blank", (), "HEADER",
     b"just some text without a header\r\nsecond line\r\n"),
    ("empty", (), None, b""),
    ("empty", (1,), None, b""),
    # a header cut short by a boundary: the line end before it is the boundary's
    ("part-header-ends-at-boundary", (1,), "MIME", b"Content-Type: text/plain"),
    ("part-header-ends-at-boundary", (1,), None, b""),
    ("part-blank-line-then-boundary", (1,), "MIME", b"Content-Type: text/plain\r\n"),
    ("part-empty-between-boundaries", (1,), "MIME", b""),
    ("part-empty-between-boundaries", (2,), None, b"B"),
    ("rfc822-header-only-in-multipart", (1,), None, b"Subject: a\r\nFrom: b"),
    ("rfc822-header-only-in-multipart", (1,), "HEADER", b"Subject: a\r\nFrom: b"),
    ("rfc822-header-only-in-multipart", (1,), "TEXT", b""),
    ("rfc822-empty", (1,), "MIME", b"Content-Type: message/rfc822\r\n"),
    ("rfc822-empty", (1,), None, b""),
    ("no-closing-boundary", (2,), None, b"P2\r\n"),
    ("no-closing-inner-boundary", (1, 2), None, b"I2"),
    ("no-closing-inner-boundary", (2,), None, b"O2"),
    ("boundary-prefix-inner-longer", (1, 1), None, b"I1"),
    ("boundary-prefix-inner-longer", (2,), None, b"O2"),
    ("boundary-prefix-outer-longer", (1,), None, b"--ab\r\n\r\nI1"),
    ("boundary-prefix-trailing-dashes", (1, 1), None, b"X"),
    ("boundary-same-nested", (1, 1), None, b"I"),
    ("boundary-same-nested", (2,), None, b"O"),
    ("boundary-line-junk", (2,), None, b"P2"),
    ("boundary-empty", (2,), None, b"P2"),
    ("boundary-case", (1,), None, b"P1\r\n--b\r\nnot"),
    ("boundary-too-long", (2,), None, b"P2"),
    ("boundary-at-eof-no-newline", (1,), None, b"P1"),
    ("open-boundary-at-eof-no-newline", (2,), None, None),     # no LF: no new part
    ("open-boundary-at-eof-newline", (2,), "MIME", b""),       # an empty part
    ("missing-boundary-parameter", (1,), None, None),
    ("wrong-boundaries", (1,), None, None),
    ("empty-multipart", (1,), None, None),
    ("preamble-epilogue", (1,), None, b"P1"),
    ("bare-lf", (1,), None, b"P1"),
    ("bare-lf", (2,), None, b"P2\n"),
    ("bare-lf", (2,), "MIME", b"Content-Type: text/plain\n\n"),
    ("mixed-crlf-lf", (1,), None, b"P1\r\n"),
    ("digest-defaults", (1,), None, b"Subject: a\r\n\r\nA"),
    ("digest-defaults", (1, 1), None, b"A"),
    ("digest-defaults", (3,), "MIME", b""),
    ("duplicate-content-type", (1,), None, b"--x\r\n\r\nx\r\n--x--\r\n"),
    ("whitespace-before-colon", (1,), None, b"Z"),
    ("folded-content-type", (1,), None, b"<b>X</b>"),
    ("message-global", (1, 1), None, None),
])
def test_sections_of_tricky_messages(name, path, part, expected):
    assert sec(TRICKY[name], path, part) == expected


def test_content_types_and_defaults():
    def types(name):
        return [e.content_type for e in walk(parse(TRICKY[name]))]
    assert types("digest-defaults") == ["multipart/digest", "message/rfc822", "text/plain",
                                        "text/plain", "message/rfc822", "text/plain"]
    assert types("uppercase-types") == ["multipart/mixed", "text/html", "image/png"]
    assert types("type-without-subtype") == ["text/plain"]       # malformed
    assert types("quoted-type") == ["text/plain"]
    assert types("type-junk-after") == ["text/plain"]
    assert types("duplicate-content-type") == ["text/html"]      # the first one wins
    assert types("message-global") == ["message/global"]         # a leaf, as in Dovecot
    root = parse(TRICKY["uppercase-types"])
    assert root.children[0].params == [("charset", b"UTF-8")]
    assert root.children[1].params == [("name", b"A.PNG")]
    assert parse(TRICKY["missing-boundary-parameter"]).multipart
    assert parse(TRICKY["missing-boundary-parameter"]).children == []


def test_dovecot_line_ends():
    # RFC 2046: the CRLF before "--x--" is the boundary's, so the message/rfc822 part
    # ends where its header-only message does; Dovecot counts it into the part.
    raw = TRICKY["rfc822-header-only-in-multipart"]
    rfc = parse(raw).children[0]
    dove = parse(raw, dovecot_line_ends=True).children[0]
    assert raw[rfc.body_start:rfc.end] == b"Subject: a\r\nFrom: b"
    assert raw[dove.body_start:dove.end] == b"Subject: a\r\nFrom: b\r\n"
    assert dove.children[0].end == rfc.children[0].end == rfc.end
    bs = bodystructure(raw, parse(raw, dovecot_line_ends=True))["parts"][0]
    assert (bs["size"], bs["lines"]) == (21, 2)
    # the two readings differ only there: by one line end, in the cut part's parents
    for name, raw in CORPUS:
        a = list(walk(parse(raw)))
        b = list(walk(parse(raw, dovecot_line_ends=True)))
        assert [(e.start, e.header_end, e.body_start) for e in a] == [
            (e.start, e.header_end, e.body_start) for e in b], name
        for x, y in zip(a, b):
            assert y.end == x.end or (y.end > x.end and raw[x.end:y.end] in (b"\r\n", b"\n")
                                      and x.children), name
        assert rebuild(raw, parse(raw, dovecot_line_ends=True)) == raw


def test_whole_header_counts_only_with_mime():
    root = parse(TRICKY["no-mime-version-cte"])
    assert not root.mime
    assert parse(TRICKY["mime-version-no-type"]).mime


def test_params_rfc2231_and_param_value():
    root = parse(TRICKY["rfc2231-params"])
    assert root.params == [("name*", b"UTF-8''%E2%82%AC%20rates.txt")]
    assert param_value(root.params, "name") == "€ rates.txt"
    root = parse(TRICKY["rfc2231-missing-index"])
    # Dovecot carries the last index over to "name*": an incomplete continuation
    assert root.params == [("a*0", b"x"), ("a*2", b"z"), ("name*2*", b"utf-8''q")]
    params = parse(b'Content-Type: text/plain; name="=?UTF-8?B?w6TDtsO8LnR4dA==?="\r\n\r\n'
                   ).params
    assert param_value(params, "NAME") == "äöü.txt"
    assert param_value(params, "missing") is None
    params = parse(b"Content-Type: text/plain; name*=iso-8859-1'de'Gr%FC%DFe.txt\r\n\r\n"
                   ).params
    assert param_value(params, "name") == "Grüße.txt"
    params = parse(b"Content-Type: text/plain; name*=x-bogus''%FF%FE\r\n\r\n").params
    # An unknown charset reads as UTF-8, what is not valid UTF-8 as U+FFFD (as Dovecot).
    assert param_value(params, "name") == "\ufffd\ufffd"


def test_text_lines():
    assert text_lines(b"a\nb\r\nc", 0, 6) == 2
    assert text_lines(b"abc", 0, 3) == 0
    assert text_lines(b"\n\n\n", 1, 3) == 2


# ----------------------------------------------------------------------------------------
# BODYSTRUCTURE

def leaf(type_, subtype, size, lines=None, params=(), encoding=b"7bit", **ext):
    d = {"type": type_, "subtype": subtype, "params": list(params) or None, "id": None,
         "description": None, "encoding": encoding, "size": size}
    if lines is not None:
        d["lines"] = lines
    d.update(md5=None, disposition=None, language=None, location=None)
    d.update(ext)
    return d


ASCII = (b"charset", b"us-ascii")


def test_bodystructure_simple_multipart():
    assert bodystructure(SIMPLE, parse(SIMPLE)) == {
        "type": b"multipart", "subtype": b"mixed",
        "parts": [leaf(b"text", b"plain", 5, 0, [ASCII]),
                  leaf(b"TEXT", b"Plain", 3, 1, [ASCII])],
        "params": [(b"boundary", b"x")], "disposition": None, "language": None,
        "location": None}


def test_body_without_extension_data():
    assert bodystructure(SIMPLE, parse(SIMPLE), extension=False) == {
        "type": b"multipart", "subtype": b"mixed",
        "parts": [{"type": b"text", "subtype": b"plain", "params": [ASCII], "id": None,
                   "description": None, "encoding": b"7bit", "size": 5, "lines": 0},
                  {"type": b"TEXT", "subtype": b"Plain", "params": [ASCII], "id": None,
                   "description": None, "encoding": b"7bit", "size": 3, "lines": 1}]}


def test_bodystructure_extension_fields():
    raw = TRICKY["content-extension-fields"]
    assert bodystructure(raw, parse(raw)) == leaf(
        b"text", b"plain", 6, 1, [ASCII], id=b"<x@y>  ", description=b"foo  bar",
        md5=b"Q2hlY2sgSW50ZWdyaXR5IQ==",
        disposition=(b"attachment", [(b"filename", b"a b.txt")]),
        language=[b"en-US", b"fr"], location=b"http://x/ y")


@pytest.mark.parametrize("name, expected", [
    ("type-without-subtype", leaf(b"text", b"", 6, 1, [ASCII])),
    ("type-image-without-subtype", leaf(b"image", b"", 6)),
    ("type-junk-after", leaf(b"", b"", 6)),
    ("quoted-type", leaf(b"", b"", 6)),
    ("type-empty", leaf(b"", b"", 6)),
    ("type-multipart-without-subtype", leaf(b"application", b"octet-stream", 6)),
    ("type-with-comments", leaf(b"text", b"plain", 6, 1, [(b"charset", b"utf-8")])),
    ("no-mime-version-cte", leaf(b"text", b"plain", 6, 1, [ASCII])),
    ("mime-version-no-type", leaf(b"text", b"plain", 6, 1, [ASCII],
                                  encoding=b"quoted-printable")),
    ("plain-7bit-uppercase", leaf(b"TEXT", b"PLAIN", 6, 1, [(b"CHARSET", b"US-ASCII")],
                                  encoding=b"7BIT")),
    ("message-global", leaf(b"message", b"global", 20)),
    ("param-without-value", leaf(b"text", b"plain", 3, 1, [ASCII])),
    ("param-encoded-word-unquoted",
     leaf(b"text", b"plain", 3, 1, [(b"name", b"=?utf-8?b?Zm9v?="), (b"x", b"y"), ASCII])),
    ("disposition-override", leaf(b"text", b"plain", 1, 0, [ASCII],
                                  disposition=(b"attachment", [(b"filename", b"a")]))),
    ("rfc2231-params", leaf(b"application", b"octet-stream", 6,
                            params=[(b"name*", b"UTF-8''%E2%82%AC%20rates.txt")],
                            disposition=(b"attachment",
                                         [(b"filename*", b"utf-8'en'%E2%82%AC%20rates.txt")]))),
    ("nul-bytes", leaf(b"text", b"plain", 16, 1, [(b"name", b"a\xef\xbf\xbdb"), ASCII],
                       id=b"<x\xef\xbf\xbdy>")),
    ("nul-in-header-name", leaf(b"text", b"html", 8, 0, [ASCII])),
    ("8bit-junk-in-headers", leaf(b"text", b"pl\xe4in", 8, 1, [(b"name", b"\xe4b"), ASCII])),
])
def test_bodystructure_of_odd_single_parts(name, expected):
    raw = TRICKY[name]
    assert bodystructure(raw, parse(raw)) == expected


def test_bodystructure_canonical_plain_text():
    raw = TRICKY["plain-7bit-uppercase"]
    assert bodystructure(raw, parse(raw), canonical_plain=True) == leaf(
        b"text", b"plain", 6, 1, [ASCII])
    # only for a whole message that is plain 7-bit us-ascii text and nothing more
    for raw in (b"Content-Type: TEXT/PLAIN; CHARSET=UTF-8\r\n\r\nx",
                b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII; FORMAT=flowed\r\n\r\nx",
                b"Content-Type: TEXT/PLAIN\r\nContent-Transfer-Encoding: 8BIT\r\n\r\nx",
                b"Content-Type: TEXT/PLAIN\r\nContent-ID: <a@b>\r\n\r\nx",
                b"Content-Type: TEXT\r\n\r\nx"):
        assert bodystructure(raw, parse(raw), canonical_plain=True)["type"] == b"TEXT"


def test_bodystructure_empty_and_boundaryless_multiparts():
    empty = leaf(b"text", b"plain", 0, 0, [ASCII])
    for name, params in [("empty-multipart", [(b"boundary", b"x")]),
                         ("missing-boundary-parameter", [(b"charset", b"us-ascii")]),
                         ("multipart-header-no-blank-line", [(b"boundary", b"b")])]:
        raw = TRICKY[name]
        assert bodystructure(raw, parse(raw)) == {
            "type": b"multipart", "subtype": b"mixed", "parts": [empty], "params": params,
            "disposition": None, "language": None, "location": None}, name


def test_bodystructure_message_rfc822():
    from leapmail.mail.envelope import envelope
    raw = TRICKY["rfc822-top-level"]
    root = parse(raw)
    inner = root.children[0]
    assert raw[inner.start:inner.body_start] == (
        b"Subject: in\r\nContent-Type: multipart/mixed; boundary=q\r\n\r\n")
    bs = bodystructure(raw, root)
    assert bs["type"] == b"message" and bs["subtype"] == b"rfc822"
    assert bs["size"] == len(raw) - 32 and bs["lines"] == raw.count(b"\n") - 2
    assert bs["envelope"] == envelope(raw[inner.start:inner.body_start])
    assert bs["body"]["subtype"] == b"mixed"
    assert [p["size"] for p in bs["body"]["parts"]] == [1, 1]
    raw = TRICKY["rfc822-empty"]
    inner = bodystructure(raw, parse(raw))["parts"][0]
    assert inner == {**leaf(b"message", b"rfc822", 0), "lines": 0,
                     "envelope": envelope(b""), "body": leaf(b"text", b"plain", 0, 0, [ASCII])}


def test_bodystructure_digest_and_case():
    raw = TRICKY["digest-defaults"]
    bs = bodystructure(raw, parse(raw))
    assert [(p["type"], p["subtype"]) for p in bs["parts"]] == [
        (b"message", b"rfc822"), (b"text", b"plain"), (b"message", b"rfc822")]
    raw = TRICKY["uppercase-types"]
    bs = bodystructure(raw, parse(raw))
    assert bs["subtype"] == b"MIXED" and bs["params"] == [(b"BOUNDARY", b"UP")]
    assert bs["parts"][0]["encoding"] == b"BASE64"
    assert bs["parts"][1]["params"] == [(b"NAME", b"A.PNG")]


def test_bodystructure_counts_stored_bytes_with_bare_lf():
    raw = TRICKY["bare-lf"]
    parts = bodystructure(raw, parse(raw))["parts"]
    assert [(p["size"], p["lines"]) for p in parts] == [(2, 0), (3, 1)]


# ----------------------------------------------------------------------------------------
# Deep nesting and limits

def depth_of(root):
    d = 0
    e = root
    while e.children:
        e = e.children[0]
        d += 1
    return d


@pytest.mark.parametrize("make", [deep_multipart, deep_rfc822, deep_mixed])
def test_thousand_deep_nesting(make):
    raw = make(1000)
    root = strict_parse(raw)
    check_tree(raw, root)
    # Dovecot's limit: containers open down to depth 98, so the tree is 99 deep
    assert depth_of(root) == MAX_NESTING - 1
    deepest = root
    while deepest.children:
        deepest = deepest.children[0]
    bs = bodystructure(raw, root)
    for _ in range(MAX_NESTING - 1):
        bs = bs["parts"][0] if "parts" in bs else bs["body"]
    assert (bs["type"], bs["subtype"]) == (b"application", b"octet-stream")


@pytest.mark.parametrize("make, depth", [(deep_multipart, 1001), (deep_rfc822, 1000)])
def test_unlimited_nesting_needs_no_recursion(make, depth):
    raw = make(1000)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(200)
    try:
        root = mime._Parser(raw, None, None).run()
        segments = skeleton(raw, root)
        bs = bodystructure(raw, root)
        texts = list(decoded_text(raw, root))
        path = (1,) * depth
        rng = section_range(raw, root, path, None)
    finally:
        sys.setrecursionlimit(old)
    assert depth_of(root) == depth
    assert rebuild(raw, root) == raw and segments
    assert bs["type"] in (b"multipart", b"message")
    assert rng is not None and texts


def test_part_limit():
    raw = TRICKY["ten-thousand-parts"]
    root = parse(raw)
    # 10,000 entities in all, the root counted; then boundaries are no longer seen
    assert len(root.children) == mime.MAX_PARTS - 1
    last = root.children[-1]
    assert raw[last.body_start:last.end].startswith(b"9998\r\n--b\r\n")
    assert raw[last.body_start:last.end].endswith(b"--b--\r\nepi\r\n")
    assert len(parse(raw, max_parts=None).children) == 10005


# ----------------------------------------------------------------------------------------
# Decoded text

def test_decoded_text():
    raw = (b"Subject: =?ISO-8859-1?Q?Gr=FC=DFe?= =?UTF-8?B?w6Q=?=\r\n"
           b"From: =?UTF-8?Q?J=C3=BCrgen?= <j@example.org>\r\n"
           b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\nK=F6ln=\r\n ist sch=F6n\r\n"
           b"--b\r\nContent-Type: text/html; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nPGI+4pyTPC9iPg==\r\n"
           b"--b\r\nContent-Type: text/plain; charset=x-unknown\r\n\r\ncaf\xc3\xa9 \xff\r\n"
           b"--b\r\nContent-Type: application/pdf\r\n"
           b"Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf\r\n\r\n"
           b"%PDF\r\n--b--\r\n")
    texts = list(decoded_text(raw, parse(raw)))
    assert texts == ["Grüßeä", "Jürgen <j@example.org>", "Köln ist schön",
                     "<b>✓</b>", "café \ufffd", "résumé.pdf"]


def test_decoded_text_survives_junk():
    raw = (b"Subject: =?bogus?Q?x?= =?utf-8?B?###?= =?base64?B?aGk=?=\r\n"
           b"Content-Type: text/plain; charset=rot13\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n!!aGVsbG8gd29ybGQ*=x\r\n")
    texts = list(decoded_text(raw, parse(raw)))
    assert texts[-1].startswith("hello world")
    for name in ("bad-base64", "bad-quoted-printable", "unknown-charset",
                 "codec-not-a-charset", "8bit-junk-in-headers", "nul-bytes"):
        raw = TRICKY[name]
        assert all(isinstance(t, str) for t in decoded_text(raw, parse(raw)))


# ----------------------------------------------------------------------------------------
# Any bytes at all

FRAGMENTS = [
    b"\r\n", b"\n", b"\r", b"--", b"--b", b"--b--", b"--bc", b"--bc--", b"--c", b"--",
    b"Content-Type: multipart/mixed; boundary=b", b'Content-Type: multipart/mixed; boundary="bc"',
    b"Content-Type: multipart/digest; boundary=c", b"Content-Type: message/rfc822",
    b"Content-Type: text/plain; charset=utf-8", b"Content-Type: text", b"content-type:",
    b"MIME-Version: 1.0", b"Content-Transfer-Encoding: base64", b"Subject: s", b" folded",
    b"\tfolded", b":", b"no colon", b"\x00", b"\xff", b"=?utf-8?q?x?=", b"aGVsbG8=", b"=\r\n",
    b'; name*0*=utf-8\'\'%E2; name*1="x"', b"(comment", b'"', b"\\",
]
MIME_LIKE = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=6)),
                     max_size=80).map(b"".join)
PATHS = st.lists(st.integers(min_value=0, max_value=4), max_size=5).map(tuple)
PARTS = st.sampled_from([None, "HEADER", "TEXT", "MIME"])


def check_any(raw, path, part):
    root = strict_parse(raw)
    check_tree(raw, root)
    rng = section_range(raw, root, path, part)
    assert rng is None or 0 <= rng[0] <= rng[1] <= len(raw)
    bodystructure(raw, root)
    list(decoded_text(raw, root))
    assert rebuild(raw, parse(raw, max_nesting=3, max_parts=5)) == raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), PATHS, PARTS)
def test_any_bytes(raw, path, part):
    check_any(raw, path, part)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MIME_LIKE, PATHS, PARTS)
def test_any_mime_like_bytes(raw, path, part):
    check_any(raw, path, part)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map(b"".join))
def test_memoryview_and_bytearray_inputs(raw):
    root = parse(raw)
    assert skeleton(memoryview(raw), parse(memoryview(raw))) == skeleton(raw, root)
    assert skeleton(bytearray(raw), parse(bytearray(raw))) == skeleton(raw, root)


# ----------------------------------------------------------------------------------------
# Size and speed

TEN_KB = (b"From: a@example.org\r\nTo: b@example.org\r\nSubject: ten kilobytes\r\n"
          b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n"
          b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n"
          b"--outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n"
          b"--inner\r\nContent-Type: text/plain; charset=utf-8\r\n"
          b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
          + b"Some text of the message, long enough to wrap at some point.\r\n" * 55
          + b"\r\n--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
          + b"<p>Some text of the message, long enough to wrap at some point.</p>\r\n" * 55
          + b"\r\n--inner--\r\n\r\n--outer\r\nContent-Type: image/png; name=\"a.png\"\r\n"
          b"Content-Transfer-Encoding: base64\r\n"
          b"Content-Disposition: attachment; filename=\"a.png\"\r\n\r\n"
          + b"iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA\r\n" * 30
          + b"\r\n--outer--\r\n")


def test_ten_kilobytes_parse_well_under_a_millisecond():
    assert 9000 < len(TEN_KB) < 12000
    parse(TEN_KB)
    times = []
    for _ in range(300):
        t = time.perf_counter()
        parse(TEN_KB)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    print(f"\n10 KB parse: median {median * 1e6:.0f} µs, best {min(times) * 1e6:.0f} µs")
    assert median < 0.001


def test_fifty_megabyte_attachment():
    raw = big_message()
    assert len(raw) > 50 * 1000 * 1000
    tracemalloc.start()
    try:
        t = time.perf_counter()
        root = parse(raw)
        segments = skeleton(raw, root)
        bs = bodystructure(raw, root)
        elapsed = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\n50 MB: parse+skeleton+bodystructure {elapsed:.3f} s, "
          f"peak extra memory {peak / 1024:.0f} KiB")
    attachment = leaves(root)[1]
    assert attachment.end - attachment.body_start > 50 * 1000 * 1000
    assert sum(len(s) for s in segments if isinstance(s, bytes)) < 1000
    assert bs["parts"][1]["size"] == attachment.end - attachment.body_start
    assert elapsed < 5
    assert peak < 2 * 1024 * 1024      # nothing of the size of the message is copied


# ----------------------------------------------------------------------------------------
# Differential test against Dovecot

def _fuzz_messages(seed, count):
    """Messages glued from MIME fragments that collide: prefix and reused boundaries,
    headers cut by boundaries, digests, message/rfc822 at every depth."""
    import random
    r = random.Random(seed)
    names = [b"a", b"ab", b"abc", b"b", b"a--", b""]
    out = []
    for i in range(count):
        pieces = []
        for _ in range(r.randrange(1, 30)):
            eol = r.choice([b"\r\n", b"\r\n", b"\n"])
            k = r.randrange(12)
            if k == 0:
                pieces.append(b'Content-Type: multipart/mixed; boundary="%s"' % r.choice(names))
            elif k == 1:
                pieces.append(b"Content-Type: message/rfc822")
            elif k == 2:
                pieces.append(b"Content-Type: multipart/digest; boundary=" + r.choice(names[:-1]))
            elif k in (3, 4):
                pieces.append(b"--" + r.choice(names) + r.choice([b"", b"--", b"  ", b"x"]))
            elif k == 5:
                pieces.append(b"")
            elif k == 6:
                pieces.append(b"Subject: s")
            elif k == 7:
                pieces.append(b"text line")
            elif k == 8:
                pieces.append(b"Content-Type: " + r.choice(
                    [b"text", b"TEXT/HTML", b"image/png; name=x", b"message/RFC822"]))
            elif k == 9:
                pieces.append(b" folded")
            elif k == 10:
                pieces.append(b"MIME-Version: 1.0")
            else:
                pieces.append(b"Content-Disposition: attachment; filename=f")
            pieces.append(eol)
        if r.random() < 0.2:
            pieces.pop()
        out.append((f"fuzz{i}", b"".join(pieces)))
    return out


def _as_dovecot(bs, e, raw):
    """Our BODYSTRUCTURE in the shape of Dovecot's parsed reply, with its sizes:
    bare LF counts as CRLF there, because Dovecot serves CRLF."""
    def params(p):
        return None if p is None else [x for kv in p for x in kv]

    def disp(d):
        return None if d is None else [d[0], params(d[1])]
    if "parts" in bs:
        kids = e.children if e is not None else []
        out = [_as_dovecot(p, kids[i] if i < len(kids) else None, raw)
               for i, p in enumerate(bs["parts"])]
        return out + [bs["subtype"], params(bs["params"]), disp(bs["disposition"]),
                      bs["language"], bs["location"]]
    size, lines = bs["size"], bs.get("lines")
    if e is not None:
        body = raw[e.body_start:e.end]
        size = len(body) + body.count(b"\n") - body.count(b"\r\n")
    out = [bs["type"], bs["subtype"], params(bs["params"]), bs["id"], bs["description"],
           bs["encoding"], size]
    if "body" in bs:
        out += ["ENVELOPE", _as_dovecot(bs["body"], e.children[0], raw)]
    if lines is not None:
        out.append(lines)
    return out + [bs["md5"], disp(bs["disposition"]), bs["language"], bs["location"]]


def _strip_envelopes(v):
    if isinstance(v, list):
        if len(v) > 8 and v[:2] == [b"message", b"rfc822"] and isinstance(v[7], list):
            v = v[:7] + ["ENVELOPE"] + v[8:]
        return [_strip_envelopes(x) for x in v]
    return bytes(v) if isinstance(v, bytes) else v


def _served(data):
    # Dovecot serves CRLF line ends and NUL as 0x80.
    return re.sub(rb"\r*\n", b"\r\n", data).replace(b"\0", b"\x80")


def test_differential_against_dovecot():
    import dovecot

    dovecot.require_dovecot()
    messages = CORPUS + _fuzz_messages(7, 300)
    box, conn = dovecot.open_mailbox([m for _, m in messages])
    problems = []
    try:
        for seq, (name, raw) in enumerate(messages, 1):
            root = parse(raw, dovecot_line_ends=True)
            sections = [((), "HEADER"), ((), "TEXT")]
            for path in all_paths(root, limit=30) + [(1,), (1, 1), (2,)]:
                sections += [(path, part) for part in (None, "MIME", "HEADER", "TEXT")]
            names = [".".join([str(n) for n in p] + ([part] if part else []))
                     for p, part in sections]
            items = "(BODYSTRUCTURE " + " ".join(f"BODY.PEEK[{s}]" for s in names) + ")"
            got = dovecot.fetch_items(dovecot.fetch(conn, str(seq), items)[seq])
            mine = _as_dovecot(bodystructure(raw, root), root, raw)
            theirs = _strip_envelopes(got[b"BODYSTRUCTURE"])
            if mine != theirs:
                problems.append((name, "BODYSTRUCTURE", mine, theirs))
            for (path, part), s in zip(sections, names):
                rng = section_range(raw, root, path, part)
                expected = b"" if rng is None else _served(raw[rng[0]:rng[1]])
                actual = _served(bytes(got.get(f"BODY[{s}]".encode(), b"")))
                if expected != actual:
                    problems.append((name, s, expected[:300], actual[:300]))
    finally:
        box.close()
    print(f"\ncompared {len(messages)} messages with {dovecot.dovecot_version()}")
    assert problems == []
