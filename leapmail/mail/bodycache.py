"""Whole messages in the store's read cache, for ``FETCH BODY[]``.

The most common read of message contents is the whole message (``BODY[]``,
``RFC822``: every client that downloads mail).  Out of the documents it costs a
b-tree walk and SQLCipher's page crypto for each 4 KiB of it, plus decoding the
content document; out of the store's cache file (:mod:`leapmail.store.cachefile`) it
is one ``pread`` and one AES-GCM call, and the reads of a batch reach the disk
together.  So each message up to :data:`MAX_SIZE` gets a copy there when its content
document is indexed (appended, imported, or pulled by sync), and ``body_cache`` says
where.

The cache is never the truth: a copy that is missing or does not authenticate is
read from the documents instead.  At start (:func:`check`), rows are dropped that a
replaced or cut-short file no longer backs, and the file is compacted once the
copies of deleted messages outweigh the live ones; :func:`fill` then copies what has
no copy yet (messages from before the cache, or whose parts arrived late).
"""

from leapmail.mail import codec
from leapmail.mail.message import Content, load_contents, read_range
from leapmail.mail.schema import PART_KIND, _set_state, _state
from leapmail.store.cachefile import HEADER_SIZE

#: Messages up to this size get a copy: most mail (text, HTML, small attachments)
#: without doubling the space big attachments take.
MAX_SIZE = 64 * 1024
#: Compaction waits until dead copies take at least this much room…
COMPACT_MIN_GARBAGE = 32 * 1024 * 1024
#: Contents :func:`fill` copies in one write job, and rows it looks at.
FILL_BATCH = 200
FILL_WINDOW = 5000


def _name(content_id):
    return b"message " + content_id.encode("utf-8")


def cache_content(txn, rowid, content):
    """Copy message ``content`` (a :class:`~leapmail.mail.message.Content` being
    indexed as ``contents.rowid``) into the cache, if it is small enough and whole
    here; True if it was."""
    cache = txn.cache
    if cache is None or content.size > MAX_SIZE:
        return False
    raw = content.raw
    if raw is None:
        parts = {}
        for doc_id, data in txn.contents_of(set(content.part_ids), PART_KIND).items():
            value = codec.loads(data)
            if "data" not in value:
                return False  # a part in blob chunks: not small after all
            parts[doc_id] = value
        if len(parts) < len(set(content.part_ids)):
            return False  # parts still to come (sync): fill() copies it later
        raw = read_range(txn, content, 0, content.size, parts)
    position, length = cache.append(raw, _name(content.id))
    txn.execute("INSERT OR REPLACE INTO body_cache (content_row, pos, len) VALUES (?, ?, ?)",
                (rowid, position, length))
    return True


def forget_content(txn, rowid):
    """The content at ``contents.rowid`` is gone: so is its copy (its bytes stay in the
    file until compaction)."""
    txn.execute("DELETE FROM body_cache WHERE content_row = ?", (rowid,))


def load_whole(queries, metas):
    """``{content id: Content}`` of the whole messages the cache has for ``metas``
    (:class:`~leapmail.mail.session.MessageMeta` read ``with_cache``); what it lacks
    is left out, for :func:`~leapmail.mail.message.load_contents`.  The contents it
    returns know their bytes only: fit for whole-message sections, not for parts."""
    cache = queries.cache
    spans = [m for m in metas if m.cache_pos is not None]
    if cache is None or not spans:
        return {}
    cache.prefetch([(m.cache_pos, m.cache_len) for m in spans])
    found = {}
    for meta in spans:
        raw = cache.read(meta.cache_pos, meta.cache_len, _name(meta.content))
        if raw is not None and len(raw) == meta.size:
            found[meta.content] = Content(meta.content, {"size": meta.size, "raw": raw})
    return found


def check(txn):
    """At start: drop the rows the file does not back; compact if worth it.  Returns
    what happened, for the log: ``None``, ``"reset"``, ``"cut"`` or ``"compacted"``."""
    cache = txn.cache
    if cache is None:
        return None
    outcome = None
    known = _state(txn, "body_cache_file", None)
    if known is None:
        # First check: the rows there are (written since version 5) are this file's.
        _set_state(txn, "body_cache_file", cache.id)
    elif known != cache.id:
        # A new file: the old one was deleted or damaged.
        txn.execute("DELETE FROM body_cache")
        _set_state(txn, "body_cache_file", cache.id)
        _refill(txn)
        outcome = "reset"
    elif txn.execute("DELETE FROM body_cache WHERE pos + len > ?", (cache.size,)).rowcount:
        outcome = "cut"  # a crash lost the file's tail: fill() copies those again
        _refill(txn)
    (live,) = txn.execute("SELECT coalesce(sum(len), 0) FROM body_cache").fetchone()
    garbage = cache.size - HEADER_SIZE - live
    if garbage > max(COMPACT_MIN_GARBAGE, live):
        rows = txn.execute("SELECT content_row, pos, len FROM body_cache ORDER BY pos").fetchall()
        positions = cache.rewrite([(pos, length) for _row, pos, length in rows])
        txn.conn.executemany("UPDATE body_cache SET pos = ? WHERE content_row = ?",
                             [(new, row[0]) for new, row in zip(positions, rows)])
        _set_state(txn, "body_cache_file", cache.id)
        outcome = "compacted"
    return outcome


def _refill(txn):
    """Have :func:`fill` go over every content there is now."""
    (last,) = txn.execute("SELECT coalesce(max(rowid), 0) FROM contents").fetchone()
    _set_state(txn, "body_cache_filled", 0)
    _set_state(txn, "body_cache_fill_end", last)


def fill(txn, limit=FILL_BATCH, window=FILL_WINDOW):
    """Copy up to ``limit`` contents that have no copy yet; False once none is left.

    Contents indexed since the cache existed were copied then; what may lack a copy
    is up to ``body_cache_fill_end`` (the last content when the cache began, or was
    lost).  Goes through those in rowid order from where the last call stopped, looking
    at no more than ``window`` rows a call: each call is a short job for the writer,
    whatever the table holds.
    """
    if txn.cache is None:
        return False
    after = _state(txn, "body_cache_filled", 0)
    last = _state(txn, "body_cache_fill_end", 0)
    if after >= last:
        return False
    rows = txn.execute(
        "SELECT c.rowid, c.doc_id FROM contents c LEFT JOIN body_cache b "
        "ON b.content_row = c.rowid WHERE c.rowid > ? AND c.rowid <= ? AND c.size <= ? "
        "AND b.content_row IS NULL ORDER BY c.rowid LIMIT ?",
        (after, min(after + window, last), MAX_SIZE, limit)).fetchall()
    contents = load_contents(txn, [doc_id for _rowid, doc_id in rows])
    for rowid, doc_id in rows:
        if doc_id in contents:
            cache_content(txn, rowid, contents[doc_id])
    _set_state(txn, "body_cache_filled", rows[-1][0] if len(rows) == limit
               else min(after + window, last))
    return True

