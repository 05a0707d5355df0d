"""Messages as documents: split at import, reassembled byte-exact on demand.

A message becomes one *content* document (its MIME skeleton: every byte that is not
a leaf body, plus ENVELOPE, BODYSTRUCTURE and the entity tree, all computed once
here) and one *part* document per distinct leaf body.  Part ids are keyed hashes of
the body bytes, so identical attachments are stored once however many messages carry
them.  Bodies larger than :data:`PART_INLINE_MAX` live in chunked blobs.

A message of at most :data:`RAW_INLINE_MAX` bytes is not split: its content document
holds the raw bytes themselves and it has no part documents, so reading it is one
lookup (format 2).  ENVELOPE, BODYSTRUCTURE and the tree are kept as one embedded
CBOR item, decoded only when asked for: ``BODY[]`` never pays for them.  Documents
of format 1 (always split, everything decoded at once) are still read.
"""

import bisect
import email.utils
from dataclasses import dataclass

from leapmail.mail import codec, mime
from leapmail.mail.bodystructure import bodystructure
from leapmail.mail.envelope import envelope
from leapmail.mail.headers import first_value, split_fields
from leapmail.mail.schema import MESSAGE_KIND, PART_KIND
from leapmail.store import BlobExists, blobs

PART_INLINE_MAX = 256 * 1024
#: Largest message the account takes in, by any way in (IMAP APPEND, file import, fetch).
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
#: Messages up to this size are stored whole in their content document.
RAW_INLINE_MAX = 16 * 1024
FORMAT = 2


@dataclass
class Prepared:
    """A parsed message, ready to be written in one transaction."""

    id: str
    document: bytes
    parts: list  # [(part_id, memoryview of the body)], distinct ids, in first-use order
    size: int


def prepare(raw, keyed_id):
    """Parse once and compute everything later reads need.  CPU only: run off-reactor."""
    raw = bytes(raw)
    # Dovecot's placement of a line end before a boundary that cuts a header short
    # (see leapmail.mail.mime): what IMAP clients are compared against.
    root = mime.parse(raw, dovecot_line_ends=True)
    header_block = raw[root.start:root.body_start]
    date = first_value(split_fields(header_block), "date")
    described = codec.dumps({
        "tree": encode_tree(root),
        "envelope": envelope(header_block),
        # As Dovecot reports mail it stored itself (APPEND, delivery): the default
        # text/plain part in canonical spelling.
        "bodystructure": bodystructure(raw, root, canonical_plain=True),
    })
    document = {"format": FORMAT, "size": len(raw), "described": described, **_sent(date)}
    parts = []
    if len(raw) <= RAW_INLINE_MAX:
        document.update(raw=raw, parts=[])
    else:
        view = memoryview(raw)
        leaves = mime.leaves(root)
        part_ids, seen = [], set()
        for leaf in leaves:
            body = view[leaf.body_start:leaf.end]
            part_id = keyed_id("part", body)
            part_ids.append(part_id)
            if part_id not in seen:
                seen.add(part_id)
                parts.append((part_id, body))
        document.update(skeleton=mime.skeleton(raw, root), parts=part_ids,
                        part_sizes=[leaf.end - leaf.body_start for leaf in leaves])
    return Prepared(keyed_id("message", raw), codec.dumps(document), parts, len(raw))


def _sent(value):
    """The Date: header as a timestamp and as the day it names in its own zone."""
    if not value:
        return {"sent_date": None, "sent_day": None}
    try:
        when = email.utils.parsedate_to_datetime(value.decode("latin-1"))
        return {"sent_date": int(when.timestamp()), "sent_day": when.date().toordinal()}
    except (TypeError, ValueError, OverflowError, IndexError):
        return {"sent_date": None, "sent_day": None}


def encode_tree(root):
    """The entity tree as a flat pre-order list, so depth never meets a recursion limit.

    Each node: ``[start, header_end, body_start, end, content_type, parent_index,
    kind]`` where ``kind`` has bit 1 for a multipart, 2 for message/rfc822 and 4 when
    its Content-* fields are in force: what section numbering needs.
    """
    nodes, stack = [], [(root, -1)]
    while stack:
        entity, parent = stack.pop()
        index = len(nodes)
        kind = (1 if entity.multipart else 0) | (2 if entity.message else 0) | (
            4 if entity.mime else 0)
        nodes.append([entity.start, entity.header_end, entity.body_start, entity.end,
                      entity.content_type, parent, kind])
        for child in reversed(entity.children):
            stack.append((child, index))
    return nodes


def decode_tree(nodes):
    entities = []
    for start, header_end, body_start, end, content_type, parent, kind in nodes:
        entity = mime.Entity(start=start, body_start=body_start, end=end, header_end=header_end,
                             content_type=content_type, params=[], children=[],
                             multipart=bool(kind & 1), message=bool(kind & 2),
                             mime=bool(kind & 4))
        entities.append(entity)
        if parent >= 0:
            entities[parent].children.append(entity)
    return entities[0]


def write_content(txn, prepared):
    """Write the content and part documents unless they exist (content is immutable)."""
    if txn.get(prepared.id) is not None:
        return
    for part_id, body in prepared.parts:
        if txn.get(part_id) is not None:
            continue
        if len(body) > PART_INLINE_MAX:
            value = {"size": len(body), "blob": _blob_id(part_id)}
        else:
            value = {"size": len(body), "data": bytes(body)}
        txn.put(part_id, PART_KIND, codec.dumps(value))
    txn.put(prepared.id, MESSAGE_KIND, prepared.document)


def _blob_id(part_id):
    return f"blob-{part_id}"


async def store_prepared(store, prepared, job):
    """Write big bodies as blobs first (in their own small transactions), then ``job``.

    ``prepared`` is a list of :class:`Prepared` messages that ``job`` writes.
    """
    for part_id, body in [part for p in prepared for part in p.parts]:
        if len(body) <= PART_INLINE_MAX:
            continue
        if await store.get(part_id) is not None:
            continue
        try:
            await store.write_blob(
                (body[i:i + blobs.CHUNK_SIZE] for i in range(0, len(body), blobs.CHUNK_SIZE)),
                blob_id=_blob_id(part_id),
            )
        except BlobExists:
            pass  # the same body, stored by another import: share it
    return await store.transact(job)


def delete_part(txn, part_id):
    doc = txn.get(part_id)
    if doc is None:
        return
    value = codec.loads(doc.content)
    if "blob" in value:
        blobs.delete_blob(txn, value["blob"])
    txn.delete(part_id)


class Content:
    """A content document, decoded: what FETCH needs without touching the parts.

    ``raw`` is the whole message when the document holds it (format 2, small
    messages), else None.
    """

    __slots__ = ("id", "size", "sent_date", "raw", "_value", "_tree", "_offsets",
                 "_pieces", "_leaf_starts")

    def __init__(self, doc_id, value):
        self.id = doc_id
        self.size = value["size"]
        self.sent_date = value.get("sent_date")
        self.raw = value.get("raw")
        self._value = value
        self._tree = None
        self._offsets = None
        self._leaf_starts = None

    def _described(self, name):
        value = self._value
        if name not in value:
            # Format 2: decoded at the first use (BODY[] never needs it).
            value.update(codec.loads(value.pop("described")))
        return value[name]

    @property
    def envelope(self):
        return self._described("envelope")

    @property
    def bodystructure(self):
        return self._described("bodystructure")

    @property
    def part_ids(self):
        """The ids of the part documents this message needs (none when it is whole)."""
        return () if self.raw is not None else self._value["parts"]

    @property
    def tree(self):
        if self._tree is None:
            self._tree = decode_tree(self._described("tree"))
        return self._tree

    def segments(self, start=0):
        """``(offset, length, literal_bytes_or_part_id)`` from the one holding ``start``.

        Offsets are computed once per content; a range read finds its first segment by
        bisection, so reading a small section of a 10,000-part message stays cheap.
        """
        if self.raw is not None:
            yield (0, self.size, self.raw)
            return
        if self._offsets is None:
            offsets, pieces, offset = [], [], 0
            for segment in self._value["skeleton"]:
                if isinstance(segment, bytes):
                    length, piece = len(segment), segment
                else:
                    length = self._value["part_sizes"][segment]
                    piece = self._value["parts"][segment]
                offsets.append(offset)
                pieces.append((length, piece))
                offset += length
            self._offsets, self._pieces = offsets, pieces
        i = max(bisect.bisect_right(self._offsets, start) - 1, 0)
        for j in range(i, len(self._offsets)):
            yield (self._offsets[j], *self._pieces[j])

    def leaf_at(self, offset):
        """The index (in ``mime.leaves`` order) of the leaf whose body starts at ``offset``."""
        if self._leaf_starts is None and self.raw is not None:
            self._leaf_starts = {leaf.body_start: i
                                 for i, leaf in enumerate(mime.leaves(self.tree))}
        if self._leaf_starts is None:
            self._leaf_starts = {}
            position = 0
            for segment in self._value["skeleton"]:
                if isinstance(segment, bytes):
                    position += len(segment)
                else:
                    self._leaf_starts[position] = segment
                    position += self._value["part_sizes"][segment]
        return self._leaf_starts[offset]

    def section_range(self, path=(), part=None):
        """``(start, end)`` of an IMAP-style section, or ``None`` if there is no such part."""
        if not path and part is None:
            return 0, self.size  # the whole message: no need to decode the tree
        # section_range only measures the raw message for the whole-message case.
        return mime.section_range(_Sized(self.size), self.tree, tuple(path), part)


class _Sized:
    def __init__(self, size):
        self._size = size

    def __len__(self):
        return self._size


def load_content(queries, content_id):
    doc = queries.get(content_id)
    if doc is None or doc.kind != MESSAGE_KIND:
        return None
    return Content(content_id, codec.loads(doc.content))


def load_contents(queries, content_ids):
    """:class:`Content` s by id (one query per 500): the batched :func:`load_content`."""
    loads = codec.loads
    return {doc_id: Content(doc_id, loads(data))
            for doc_id, data in queries.contents_of(set(content_ids), MESSAGE_KIND).items()}


def _whole(content, parts):
    """The whole message from skeleton and preloaded inline parts (BODY[], the most
    common read) without the offset bookkeeping; None if a part is not at hand."""
    if content.raw is not None:
        return content.raw
    value = content._value
    ids = value["parts"]
    out = []
    for segment in value["skeleton"]:
        if isinstance(segment, bytes):
            out.append(segment)
            continue
        part = parts.get(ids[segment])
        if part is None or "data" not in part:
            return None
        out.append(part["data"])
    return b"".join(out)


#: Largest piece :func:`iter_range` reads at once.
STREAM_CHUNK = blobs.CHUNK_SIZE


async def iter_range(store, content, start, end, chunk=STREAM_CHUNK):
    """Bytes ``[start, end)`` of a stored message as an async iterator of pieces.

    Each piece is one short read job of at most ``chunk`` bytes, so a 50 MB attachment
    goes out without ever being in memory whole, and other work interleaves.
    """
    pos = start
    while pos < end:
        stop = min(end, pos + chunk)
        yield await store.read(read_range, content, pos, stop)
        pos = stop


def load_parts(queries, contents, max_size):
    """Decoded part documents of the given contents, for :func:`read_range` to use:
    one query for many messages instead of one per part.  Contents bigger than
    ``max_size`` are left out (their parts are read, or streamed, on demand)."""
    wanted = set()
    for content in contents:
        if content.size <= max_size:
            wanted.update(content.part_ids)
    return {doc_id: codec.loads(data)
            for doc_id, data in queries.contents_of(wanted, PART_KIND).items()}


def read_range(queries, content, start, end, parts=None):
    """Bytes ``[start, end)`` of the original message, from skeleton and parts
    (``parts``: decoded part documents already at hand, by id)."""
    if content.raw is not None:
        return content.raw[start:end]
    if start == 0 and end == content.size and parts is not None:
        whole = _whole(content, parts)
        if whole is not None:
            return whole
    out = []
    for offset, length, piece in content.segments(start):
        if offset + length <= start:
            continue
        if offset >= end:
            break
        lo, hi = max(start - offset, 0), min(end - offset, length)
        if isinstance(piece, bytes):
            out.append(piece[lo:hi])
            continue
        value = parts.get(piece) if parts is not None else None
        if value is None:
            value = codec.loads(queries.get(piece).content)
        if "data" in value:
            out.append(value["data"][lo:hi])
        else:
            out.append(blobs.read_range(queries, value["blob"], lo, hi - lo))
    return b"".join(out)
