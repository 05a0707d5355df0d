"""RFC 5322 header blocks, parsed without ever changing a byte.

A header block is kept as the exact bytes it arrived as; these functions only find
things in it.  Real mail breaks every rule, so nothing here raises on bad input: bare
LF line ends, lines without a colon, 8-bit bytes and NULs are all carried through.
"""

from dataclasses import dataclass


def split_lines(data, start=0, end=None):
    """Offsets ``(line_start, content_end, line_end)`` of each line in ``data[start:end]``.

    ``content_end`` excludes the line end (LF or CRLF); ``line_end`` includes it.  A
    last line without a line end has ``content_end == line_end``.
    """
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        nl = data.find(b"\n", pos, end)
        if nl < 0:
            yield pos, end, end
            return
        content_end = nl - 1 if nl > pos and data[nl - 1] == 0x0D else nl
        yield pos, content_end, nl + 1
        pos = nl + 1


def find_body(data, start=0, end=None):
    """Where the header block starting at ``start`` ends: ``(header_end, body_start)``.

    ``header_end`` is one past the last header line's line end; ``body_start`` is one
    past the empty line that separates header and body (so ``data[start:body_start]``
    is what IMAP calls the HEADER section, blank line included).  Without an empty
    line the whole entity is header and the body is empty.
    """
    end = len(data) if end is None else end
    for line_start, content_end, line_end in split_lines(data, start, end):
        if content_end == line_start and line_end > line_start:
            return line_start, line_end
    return end, end


_WSP = b" \t"


@dataclass(frozen=True)
class Field:
    """One header field: its name as written and its exact raw bytes (folds included)."""

    name: bytes
    raw: bytes

    @property
    def key(self):
        """The name for comparisons: lower case, as text."""
        return self.name.decode("latin-1").lower()

    def value(self):
        """The unfolded value: line ends of folds removed, outer whitespace stripped.

        Bytes stay bytes: decoding (RFC 2047, charsets) is the caller's business.
        """
        colon = self.raw.find(b":")
        body = self.raw[colon + 1:] if colon >= 0 else self.raw
        return body.replace(b"\r\n", b"").replace(b"\n", b"").replace(b"\r", b"").strip(_WSP)


def split_fields(block):
    """The fields of a header block, in order.

    A line starting with space or tab continues the field before it.  A line without
    a colon becomes a field of its own with an empty name, so that nothing is lost
    and filters can still pass it through.  The empty line ending the block, if
    present, belongs to no field.
    """
    fields = []
    current_start = None
    current_name = b""
    for line_start, content_end, line_end in split_lines(block):
        if content_end == line_start:
            break  # the empty line: end of the header
        first = block[line_start]
        if first in _WSP and current_start is not None:
            continue  # folded continuation of the current field
        if current_start is not None:
            fields.append(Field(current_name, block[current_start:line_start]))
        current_start = line_start
        colon = block.find(b":", line_start, content_end)
        current_name = block[line_start:colon].rstrip(_WSP) if colon >= 0 else b""
    else:
        line_start = len(block)
    if current_start is not None:
        fields.append(Field(current_name, block[current_start:line_start]))
    return fields


def first_value(fields, key):
    """The unfolded value of the first field named ``key`` (lower case), or ``None``."""
    for field in fields:
        if field.key == key:
            return field.value()
    return None


def filter_fields(block, keys, keep):
    """The header block with only (``keep=True``) or without the fields named in ``keys``.

    This is what IMAP's HEADER.FIELDS and HEADER.FIELDS.NOT return: the matching
    fields' exact bytes in their original order, followed by an empty line.  As in
    Dovecot, HEADER.FIELDS always ends with CRLF, while HEADER.FIELDS.NOT ends with
    the block's own empty line — none if the message had none.  Nameless junk lines
    count as not matching any name.
    """
    wanted = {k.lower() for k in keys}
    fields = split_fields(block)
    # A name is compared up to a NUL in it, as Dovecot compares C strings.
    kept = [f for f in fields
            if (f.name.split(b"\0", 1)[0].decode("latin-1").lower() in wanted
                and f.name != b"") == keep]
    if keep:
        # Dovecot writes a kept field whose name holds a NUL as the name up to the
        # NUL, then the raw rest from the colon on.
        return b"".join(f.raw if b"\0" not in f.name
                        else f.name.split(b"\0", 1)[0] + f.raw[f.raw.index(b":"):]
                        for f in kept) + b"\r\n"
    kept = [f.raw for f in kept]
    return b"".join(kept) + block[sum(len(f.raw) for f in fields):]
