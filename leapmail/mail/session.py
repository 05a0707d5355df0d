"""A session's view of a selected mailbox: its own sequence numbers and pending news.

Sequence numbers are a per-session illusion (RFC 3501 2.3.1.2): they may change only
when the session is told.  A view therefore applies committed changes only when its
protocol layer asks for them, at moments the protocol allows, and hands back what to
tell the client.  Until then it keeps answering with the numbering the client knows.
"""

import bisect
from dataclasses import dataclass
from typing import NamedTuple

from leapmail.mail.events import (
    Expunged,
    FlagsChanged,
    KeywordsDefined,
    MailboxChanged,
    MessageAdded,
)
from leapmail.mail.schema import keyword_registry, listed_keywords


class MessageMeta(NamedTuple):
    """One message's metadata (a named tuple: FETCH builds 100,000 of these)."""

    uid: int
    flags: tuple
    internal_date: int
    size: int
    modseq: int
    content: str
    tz: int = 0  # minutes east of UTC the internal date was given in
    header: bytes = None  # the top-level header block, when asked for and indexed
    cache_pos: int = None  # where the read cache has a copy of the message, if it has
    cache_len: int = None


@dataclass(frozen=True)
class Update:
    """Something to tell the session: ``kind`` is "expunge", "exists" or "flags"."""

    kind: str
    seq: int = 0
    uid: int = 0
    flags: tuple = ()
    modseq: int = 0
    count: int = 0


class MailboxView:
    def __init__(self, account, info, readonly):
        self.account = account
        self.info = info
        self.readonly = readonly
        self.recent = set()
        self.deleted = False
        self.closed = False
        self.on_change = None  # called (with the view) when news arrives: IDLE wakes up
        self._uids = []
        self._pending = []
        self._early = []
        self._loaded = False
        self.highestmodseq = 0
        self.uidnext = 1

    # -- what the session knows ------------------------------------------------------

    @property
    def exists(self):
        return len(self._uids)

    @property
    def uids(self):
        return self._uids

    def uid_of(self, seq):
        return self._uids[seq - 1]

    def seq_of(self, uid):
        """The sequence number of ``uid`` as the session knows it, or ``None``."""
        i = bisect.bisect_left(self._uids, uid)
        if i < len(self._uids) and self._uids[i] == uid:
            return i + 1
        return None

    def uids_in_range(self, low, high):
        """Known UIDs ``low <= uid <= high``, ascending, without expanding the range."""
        lo = bisect.bisect_left(self._uids, low)
        hi = bisect.bisect_right(self._uids, high)
        return self._uids[lo:hi]

    # -- news ------------------------------------------------------------------------

    def _load(self, snapshot, uids):
        self._uids = uids
        self.highestmodseq = snapshot["highestmodseq"]
        self.uidnext = snapshot["uidnext"]
        self._loaded = True
        early, self._early = self._early, []
        for event, recent in early:
            if not hasattr(event, "modseq") or event.modseq > self.highestmodseq:
                self._pending.append((event, recent))

    def _notify(self, event, recent=False):
        if isinstance(event, MailboxChanged):
            if event.name is None:
                self.deleted = True
            else:
                self.info = type(self.info)(**{**self.info.__dict__, "name": event.name})
        elif self._loaded:
            self._pending.append((event, recent))
        else:
            self._early.append((event, recent))
        if self.on_change is not None:
            self.on_change(self)

    @property
    def has_news(self):
        return bool(self._pending)

    def updates(self, expunges=True):
        """Apply pending changes and return what to tell the client, in order.

        With ``expunges=False`` (while a command that uses sequence numbers runs, RFC
        3501 7.4.1) expunges stay pending and numbering stays valid: new messages and
        flag changes are still reported.
        """
        out = []
        kept = []
        added = False
        for event, recent in self._pending:
            if isinstance(event, Expunged):
                if not expunges:
                    kept.append((event, recent))
                    continue
                seq = self.seq_of(event.uid)
                if seq is not None:
                    del self._uids[seq - 1]
                    self.recent.discard(event.uid)
                    out.append(Update("expunge", seq=seq, uid=event.uid, modseq=event.modseq))
            elif isinstance(event, MessageAdded):
                if not self._uids or event.uid > self._uids[-1]:
                    self._uids.append(event.uid)
                    if recent:
                        self.recent.add(event.uid)
                    added = True
                self.uidnext = max(self.uidnext, event.uid + 1)
            elif isinstance(event, KeywordsDefined):
                out.append(Update("keywords", flags=event.keywords))
            elif isinstance(event, FlagsChanged):
                seq = self.seq_of(event.uid)
                if seq is not None:
                    out.append(Update("flags", seq=seq, uid=event.uid, flags=event.flags,
                                      modseq=event.modseq))
            self.highestmodseq = max(self.highestmodseq, getattr(event, "modseq", 0))
        self._pending = kept
        if added:
            out.append(Update("exists", count=len(self._uids)))
        return out

    # -- work on the mailbox ---------------------------------------------------------

    async def meta(self, uids):
        """Per-message metadata for known ``uids`` (ascending), one query per 500."""
        return await self.account.store.read(read_meta, self.info.id, uids)

    async def highest_modseq(self, uids):
        """The highest MODSEQ among ``uids`` (what SEARCH MODSEQ reports), in SQL."""
        return await self.account.store.read(_highest_modseq, self.info.id, uids)

    def forget_flag_changes(self, changed):
        """Drop pending flag news this session has already told its client about.

        ``changed`` maps UID to the MODSEQ the client was told; a later change made
        elsewhere (higher MODSEQ) is still reported.
        """
        self._pending = [
            (event, recent) for event, recent in self._pending
            if not (isinstance(event, FlagsChanged) and event.uid in changed
                    and event.modseq <= changed[event.uid])
        ]

    async def overview(self):
        """What SELECT reports beyond counts: the first unseen UID and keywords in use."""
        return await self.account.store.read(_overview, self.info.id)

    async def vanished_since(self, modseq, ranges=None):
        """UIDs expunged with a MODSEQ above ``modseq`` (within UID ``ranges``)."""
        return await self.account.store.read(_vanished, self.info.id, modseq, ranges)

    async def search(self, query):
        """UIDs matching a :mod:`leapmail.mail.search` query, ascending."""
        from leapmail.mail.search import search

        return await self.account.store.read(search, self.info.id, query)

    def store_flags(self, uids, mode, flags, unchanged_since=None):
        return self.account.change_flags(self.info.id, uids, mode, flags, unchanged_since)

    def expunge(self, uids=None):
        return self.account.expunge(self.info.id, uids)

    def copy(self, uids, target):
        return self.account.copy(self.info.id, uids, target)

    def move(self, uids, target):
        return self.account.copy(self.info.id, uids, target, move=True)

    def close(self):
        self.closed = True
        self.account._release(self)


def _system_names():
    from leapmail.mail.flags import join_flags

    return [tuple(join_flags(bits, "")) for bits in range(32)]


_SYSTEM = _system_names()


def read_meta(queries, mailbox, uids, with_header=False, with_cache=False):
    """:class:`MessageMeta` for ``uids`` of a mailbox, ascending: a store read job.

    ``with_header``: with the indexed header blocks; ``with_cache``: with where the
    read cache has copies (:mod:`leapmail.mail.bodycache`)."""
    columns = ("m.uid, m.sysflags, m.keywords, m.internal_date, m.size, m.modseq, m.content, "
               "m.tz")
    source = "messages m"
    if with_header:
        columns += ", c.header"
        source += " LEFT JOIN contents c ON c.rowid = m.content_row"
    elif with_cache:
        columns += ", NULL"
    if with_cache:
        columns += ", b.pos, b.len"
        source += " LEFT JOIN body_cache b ON b.content_row = m.content_row"
    result = _rows(queries, mailbox, uids, columns, source)
    flags = _flag_lister(queries, mailbox)
    return [MessageMeta(row[0], flags(row[1], row[2]), *row[3:]) for row in result]


def read_flags(queries, mailbox, uids):
    """``(uid, flags, modseq)`` for ``uids`` of a mailbox, ascending: what a FETCH of
    FLAGS needs and no more (a store read job; a fifth of :func:`read_meta`'s cost)."""
    flags = _flag_lister(queries, mailbox)
    return [(uid, flags(bits, words), modseq) for uid, bits, words, modseq in _rows(
        queries, mailbox, uids, "m.uid, m.sysflags, m.keywords, m.modseq", "messages m")]


def _flag_lister(queries, mailbox):
    """``flags(sysflags, keywords) -> tuple``: a message's flags as FETCH lists them
    (keywords in the mailbox's order and spelling; its list read at first need)."""
    registry = None

    def flags(bits, words):
        nonlocal registry
        if not words:
            return _SYSTEM[bits & 31]
        if registry is None:
            registry = keyword_registry(queries, mailbox)
        return _SYSTEM[bits & 31] + tuple(
            listed_keywords(registry, [w for w in words.split(" ") if w]))

    return flags


def _rows(queries, mailbox, uids, columns, source):
    """Rows of ``columns`` (the first one ``m.uid``) for ``uids`` (ascending) of a
    mailbox, in UID order."""
    result = []
    if uids and uids[-1] - uids[0] < 2 * len(uids):
        # Dense (the usual 1:*): one range scan of the (mailbox, uid) index beats a
        # long IN list; the few UIDs in the range the session does not know are dropped.
        wanted = set(uids)
        result = [row for row in queries.execute(
            f"SELECT {columns} FROM {source} WHERE m.mailbox = ? AND m.uid BETWEEN ? AND ? "
            "ORDER BY m.uid", (mailbox, uids[0], uids[-1])) if row[0] in wanted]
        uids = ()
    for start in range(0, len(uids), 500):
        batch = uids[start:start + 500]
        marks = ",".join("?" * len(batch))
        result += queries.execute(
            f"SELECT {columns} FROM {source} WHERE m.mailbox = ? AND m.uid IN ({marks}) "
            "ORDER BY m.uid",
            (mailbox, *batch),
        ).fetchall()
    return result


def _highest_modseq(queries, mailbox, uids):
    highest = 0
    for start in range(0, len(uids), 500):
        batch = uids[start:start + 500]
        marks = ",".join("?" * len(batch))
        (value,) = queries.execute(
            f"SELECT max(modseq) FROM messages WHERE mailbox = ? AND uid IN ({marks})",
            (mailbox, *batch)).fetchone()
        highest = max(highest, value or 0)
    return highest


def _overview(queries, mailbox):
    from leapmail.mail.flags import SEEN

    # The literal 1 (SEEN) lets SQLite use the partial index messages_unseen.
    assert SEEN == 1
    row = queries.execute(
        "SELECT min(uid) FROM messages WHERE mailbox = ? AND (sysflags & 1) = 0", (mailbox,)
    ).fetchone()
    # Every keyword the mailbox has known, in use or not, as Dovecot lists them.
    keywords = [name for _position, name in sorted(keyword_registry(queries, mailbox).values())]
    return {"first_unseen": row[0], "keywords": keywords}


def _vanished(queries, mailbox, modseq, ranges):
    uids = [uid for (uid,) in queries.execute(
        "SELECT uid FROM expunged WHERE mailbox = ? AND modseq > ? ORDER BY uid",
        (mailbox, modseq),
    )]
    if ranges is not None:
        uids = [uid for uid in uids if any(low <= uid <= high for low, high in ranges)]
    return uids
