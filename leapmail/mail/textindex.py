"""Full-text indexing in batches, after import.

Putting a message's text into the trigram index costs more than everything else an
import does (about 0.7 ms for 10 KB of text), so import only queues the content
(``text_pending``) and this indexer works through the queue in jobs of
:data:`BATCH` messages, each short enough not to hold up other writers for long.
Work left over from a previous run resumes when the account opens.  A search that
involves text first finishes the queue (as Dovecot indexes at search time), so its
answer is always complete.
"""

from twisted.internet import defer
from twisted.logger import Logger

from leapmail.mail import mime
from leapmail.mail.message import load_content, read_range
from leapmail.store import StoreClosed

BATCH = 100
#: Indexing starts once imports have paused this long, so that a bulk import gets
#: the writer to itself; a text search does not wait for it (it flushes).
IDLE_DELAY = 0.5
#: Messages up to this size are read whole for indexing.  Bigger ones are read
#: without their non-text leaves (big attachments); text leaves over this size are
#: left out too, so one job never holds more than about this much.
TEXT_INDEX_MAX = 16 * 1024 * 1024


def message_text(queries, content):
    """``(header text, body text)`` of a stored message, decoded, for the index."""
    if content.size <= TEXT_INDEX_MAX:
        raw = read_range(queries, content, 0, content.size)
    else:
        raw = _without_attachments(queries, content)
    root = mime.parse(raw)
    headers = "\n".join(
        f"{name.decode('latin-1')}: {mime.decode_header_value(value)}"
        for name, value in mime.header_fields(raw, root.start, root.header_end)
    )
    body = "\n".join(mime.decoded_text(raw, root, root_header=False))
    return headers, body


def _without_attachments(queries, content):
    """The message with every non-text (or huge) leaf body left empty.

    Boundaries and headers all live in the skeleton, so the result parses into the
    same structure; only bodies that hold no indexable text are missing.
    """
    leaves = mime.leaves(content.tree)
    out = []
    for offset, length, piece in content.segments():
        if isinstance(piece, bytes):
            out.append(piece)
            continue
        leaf = leaves[content.leaf_at(offset)]
        if leaf.content_type.startswith("text/") and length <= TEXT_INDEX_MAX:
            out.append(read_range(queries, content, offset, offset + length))
    return b"".join(out)


def index_pending(txn, limit=BATCH, upto=None):
    """Index up to ``limit`` queued contents (those ``<= upto`` if given); returns
    how many were done."""
    sql = "SELECT p.content_row, c.doc_id FROM text_pending p JOIN contents c ON c.rowid = p.content_row"
    params = ()
    if upto is not None:
        sql += " WHERE p.content_row <= ?"
        params = (upto,)
    rows = txn.execute(sql + " ORDER BY p.content_row LIMIT ?", (*params, limit)).fetchall()
    entries = []
    for rowid, doc_id in rows:
        content = load_content(txn, doc_id)
        if content is not None:
            entries.append((rowid, *message_text(txn, content)))
    txn.conn.executemany(
        "INSERT INTO text_index (rowid, headers, body) VALUES (?, ?, ?)", entries
    )
    txn.conn.executemany(
        "DELETE FROM text_pending WHERE content_row = ?", [(rowid,) for rowid, _ in rows]
    )
    return len(rows)


def _last_pending(queries):
    return queries.execute("SELECT max(content_row) FROM text_pending").fetchone()[0]


class TextIndexer:
    """Works through ``text_pending`` in the background, one batch per store job."""

    log = Logger()

    def __init__(self, store, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.store = store
        self._reactor = reactor
        self._running = None
        self._timer = None
        self.closed = False

    def kick(self):
        """Make sure queued work gets done once imports pause; cheap to call often."""
        if self.closed:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(IDLE_DELAY)
        else:
            self._timer = self._reactor.callLater(IDLE_DELAY, self._start)

    def _start(self):
        if self._running is None and not self.closed:
            self._running = defer.ensureDeferred(self._run())
            self._running.addErrback(self._failed)
            self._running.addBoth(self._stopped)

    async def _run(self):
        while not self.closed:
            if await self.store.transact(index_pending) < BATCH:
                return

    def _failed(self, failure):
        if failure.check(StoreClosed):
            return  # shutting down: the queue is persistent and resumes next time
        self.log.failure("full-text indexing failed; it will resume later", failure)

    def _stopped(self, _):
        self._running = None

    async def flush(self):
        """Index everything queued before this call (what a text search must see)."""
        upto = await self.store.read(_last_pending)
        while upto is not None and await self.store.transact(index_pending, BATCH, upto):
            pass

    def close(self):
        self.closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
