"""Command framing and argument grammar, byte by byte."""

import datetime

import pytest

from leapmail.imap import parser
from leapmail.imap.parser import CommandReader, Cursor, ParseError, Unit


class Recorder:
    def __init__(self, limit=1000):
        self.units, self.continues, self.rejects = [], [], []
        self.reader = CommandReader(lambda unit: limit, self.units.append,
                                    self.continues.append,
                                    lambda unit, kind, size: self.rejects.append(
                                        (unit.first_line, kind, size)))


def feed_bytewise(rec, data):
    for i in range(len(data)):
        rec.reader.feed(data[i:i + 1])


def test_units_are_whole_however_the_bytes_arrive():
    data = (b"a NOOP\r\nb LOGIN {3}\r\nbob {5+}\r\nsecre\r\nc APPEND X {0}\r\n\r\n"
            b"d NOOP\n")
    for feed in (lambda r: r.reader.feed(data), lambda r: feed_bytewise(r, data)):
        rec = Recorder()
        feed(rec)
        assert [(u.texts, u.literals) for u in rec.units] == [
            ([b"a NOOP"], []),
            ([b"b LOGIN {3}", b" {5+}", b""], [b"bob", b"secre"]),
            ([b"c APPEND X {0}", b""], [b""]),
            ([b"d NOOP"], []),
        ]
        # "+" is owed for the synchronizing literals only ({3} and {0}).
        assert [u.first_line for u in rec.continues] == [b"b LOGIN {3}", b"c APPEND X {0}"]
        assert rec.rejects == []


def test_literal_bytes_are_taken_as_they_are():
    rec = Recorder()
    rec.reader.feed(b"a X {7}\r\n\r\n{2}\n\x00 rest\r\n")
    (unit,) = rec.units
    assert unit.literals == [b"\r\n{2}\n\x00"] and unit.texts == [b"a X {7}", b" rest"]


def test_overlong_line_is_rejected_once_and_reading_goes_on():
    rec = Recorder()
    rec.reader.feed(b"t1 NOOP " + b"x" * (parser.MAX_LINE + 10))
    rec.reader.feed(b"y" * 1000 + b"\r\nt2 NOOP\r\n")
    assert [(line[:8], kind) for line, kind, _ in rec.rejects] == [(b"t1 NOOP ", "line")]
    assert [u.first_line for u in rec.units] == [b"t2 NOOP"]


def test_too_big_synchronizing_literal_ends_the_command():
    rec = Recorder(limit=10)
    rec.reader.feed(b"a APPEND X {11}\r\nb NOOP\r\n")
    assert rec.rejects == [(b"a APPEND X {11}", "literal", 11)]
    assert rec.continues == []
    assert [u.first_line for u in rec.units] == [b"b NOOP"]


def test_too_big_nonsynchronizing_literal_is_swallowed_with_its_command():
    rec = Recorder(limit=10)
    rec.reader.feed(b"a APPEND X {11+}\r\n01234567890 {3+}\r\nabc\r\nb NOOP\r\n")
    assert rec.rejects == [(b"a APPEND X {11+}", "literal", 11)]
    assert [u.first_line for u in rec.units] == [b"b NOOP"]


def test_closed_reader_hands_out_nothing_more():
    rec = Recorder()

    def on_unit(unit):
        rec.units.append(unit)
        rec.reader.close()

    rec.reader._on_unit = on_unit
    rec.reader.feed(b"a STARTTLS\r\nb LOGIN x y\r\n")
    rec.reader.feed(b"c NOOP\r\n")
    assert [u.first_line for u in rec.units] == [b"a STARTTLS"]


def cursor(*texts, literals=()):
    unit = Unit()
    unit.texts = list(texts)
    unit.literals = list(literals)
    return Cursor(unit)


def test_strings():
    c = cursor(b'"a \\"q\\" \\\\ b" atom NIL {3}', b"", literals=[b"lit"])
    assert c.astring() == b'a "q" \\ b'
    c.sp()
    assert c.astring() == b"atom"
    c.sp()
    assert c.nstring() is None
    c.sp()
    assert c.string() == b"lit"
    c.end()


@pytest.mark.parametrize("text", [b'"bad \\x escape"', b'"unterminated', b"", b"(paren"])
def test_bad_strings(text):
    with pytest.raises(ParseError):
        cursor(text).astring()


@pytest.mark.parametrize("text, expected", [
    (b"1", [(1, 1)]), (b"1:*", [(1, None)]), (b"*:3,5", [(None, 3), (5, 5)]),
    (b"4294967295", [(4294967295, 4294967295)]),
])
def test_sequence_sets(text, expected):
    assert parser.parse_sequence_set(text) == expected


@pytest.mark.parametrize("text", [b"0", b"1:", b":1", b"1,,2", b"a", b"01", b"4294967296",
                                  b"1:2:3", b""])
def test_bad_sequence_sets(text):
    with pytest.raises(ParseError):
        parser.parse_sequence_set(text)


def test_dates():
    assert parser.parse_date(b"1-Feb-1994") == datetime.date(1994, 2, 1)
    assert parser.parse_date(b"01-feb-1994") == datetime.date(1994, 2, 1)
    for bad in (b"31-Feb-1994", b"1-Foo-1994", b"1-Feb-94", b"1 Feb 1994"):
        with pytest.raises(ParseError):
            parser.parse_date(bad)
    assert parser.parse_date_time(b" 1-Feb-1994 21:52:25 -0800") == (760168345, -480)
    assert parser.parse_date_time(b"17-Jul-1996 02:44:25 +0000") == (837571465, 0)
    for bad in (b"17-Jul-1996 02:44:25 +0060", b"17-Jul-1996 25:44:25 +0000",
                b"17-Jul-1996 02:44:25", b"1-Feb-1994 21:52:25 -0800"):
        with pytest.raises(ParseError):
            parser.parse_date_time(bad)
