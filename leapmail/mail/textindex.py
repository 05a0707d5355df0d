"""Full-text indexing in batches, after import.

Putting a message's text into the trigram index costs more than everything else an
import does (about 0.7 ms for 10 KB of text), so import only queues the content
(``text_pending``) and this indexer works through the queue in batches of
:data:`BATCH` messages: the text is extracted in a read job and only stored by the
writer, so imports go on meanwhile.  It starts when imports pause, or — for a
steady stream of single APPENDs, which never pauses — after every :data:`BATCH` new
contents; bulk imports (``Account.append_many``) are left to finish first.
Work left over from a previous run resumes when the account opens.  A text search
does not wait for the queue: it scans what is still queued (see
:func:`leapmail.mail.search.scan_unindexed`), so its answer is complete at once.
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
    return mime.search_text(raw, mime.parse(raw, dovecot_line_ends=True))


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


def extract_pending(queries, limit=BATCH, upto=None):
    """Text of up to ``limit`` queued contents (those ``<= upto`` if given), as
    ``[(content_row, headers, body)]``: a read job, so that the costly part —
    parsing and decoding — runs beside the writer instead of holding it."""
    sql = ("SELECT p.content_row, c.doc_id FROM text_pending p "
           "JOIN contents c ON c.rowid = p.content_row")
    params = ()
    if upto is not None:
        sql += " WHERE p.content_row <= ?"
        params = (upto,)
    rows = queries.execute(sql + " ORDER BY p.content_row LIMIT ?", (*params, limit)).fetchall()
    entries = []
    for rowid, doc_id in rows:
        content = load_content(queries, doc_id)
        entries.append((rowid, *message_text(queries, content)) if content is not None
                       else (rowid, "", ""))
    return entries


def store_extracted(txn, entries):
    """Put extracted text in the index, for what is still queued (a content may have
    been deleted, or indexed by a flush, since it was read); returns how many."""
    if not entries:
        return 0
    marks = ",".join("?" * len(entries))
    queued = {row for (row,) in txn.execute(
        f"SELECT content_row FROM text_pending WHERE content_row IN ({marks})",
        [rowid for rowid, _, _ in entries])}
    fresh = [entry for entry in entries if entry[0] in queued]
    txn.conn.executemany(
        "INSERT INTO text_index (rowid, headers, body) VALUES (?, ?, ?)", fresh)
    txn.conn.executemany(
        "DELETE FROM text_pending WHERE content_row = ?", [(entry[0],) for entry in fresh])
    return len(entries)


async def index_batch(store, limit=BATCH, upto=None):
    """Index one batch; returns how many queued contents it looked at."""
    entries = await store.read(extract_pending, limit, upto)
    return await store.transact(store_extracted, entries)


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
        self._kicks = 0
        #: Bulk imports under way (``Account.append_many``): they get the writer and
        #: the CPU to themselves, and indexing waits for them to pause.
        self.bulk_imports = 0
        self.closed = False

    def kick(self, added=1):
        """Make sure queued work gets done once imports pause; cheap to call often.

        ``added``: how many contents were queued (0 to resume a previous run's queue).
        """
        if self.closed:
            return
        self._kicks += added
        if self._kicks >= BATCH and not self.bulk_imports:
            # A steady stream of imports never pauses: index as it comes rather than
            # leaving it all to the first text search.
            self._start()
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(IDLE_DELAY)
        else:
            self._timer = self._reactor.callLater(IDLE_DELAY, self._start)

    @property
    def active(self):
        """Whether a run through the queue is under way."""
        return self._running is not None

    def _start(self):
        if self._running is None and not self.closed:
            self._running = defer.ensureDeferred(self._run())
            self._running.addErrback(self._failed)
            self._running.addBoth(self._stopped)

    async def _run(self):
        while not self.closed:
            self._kicks = 0
            if await index_batch(self.store) < BATCH:
                return

    def _failed(self, failure):
        if failure.check(StoreClosed):
            return  # shutting down: the queue is persistent and resumes next time
        self.log.failure("full-text indexing failed; it will resume later", failure)

    def _stopped(self, _):
        self._running = None
        if self._kicks and not self.closed:
            self.kick()

    async def flush(self):
        """Index everything queued before this call (what a text search must see)."""
        upto = await self.store.read(_last_pending)
        while upto is not None and await index_batch(self.store, BATCH, upto):
            pass

    def close(self):
        self.closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
