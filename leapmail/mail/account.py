"""An account's mail: mailboxes, and messages in them, over the encrypted store.

Every method returns a Deferred (or is a coroutine to be wrapped in one).  Decisions
that must be atomic (does the name exist? which UID comes next?) are made inside one
store job on the writer thread, never by reading first and writing later.
"""

import hmac
import os
import time
from dataclasses import dataclass
from hashlib import sha256

from twisted.internet import defer, threads
from twisted.logger import Logger

from leapmail.mail import bodycache, codec, flags as flaglib, names
from leapmail.mail.clock import CLOCK
from leapmail.mail.errors import (
    CannotDeleteInbox,
    InvalidMailboxName,
    MailboxExists,
    NoSuchMailbox,
)
from leapmail.mail.events import (
    ContentAdded,
    Expunged,
    FlagsChanged,
    KeywordsDefined,
    MailboxChanged,
    MessageAdded,
)
from leapmail.mail.schema import (
    FLAGS_KIND,
    MAILBOX_KIND,
    SUBSCRIPTION_KIND,
)
from leapmail.mail.session import MailboxView
from leapmail.mail.textindex import TextIndexer
from leapmail.store.errors import StoreClosed


@dataclass(frozen=True)
class MailboxInfo:
    id: str
    name: str
    role: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int


_MAILBOX_COLUMNS = "doc_id, name, role, uidvalidity, uidnext, highestmodseq"


def _find(queries, name):
    row = queries.execute(
        f"SELECT {_MAILBOX_COLUMNS} FROM mailboxes WHERE name = ?", (name,)
    ).fetchone()
    return MailboxInfo(*row) if row else None


def _require(queries, name):
    info = _find(queries, name)
    if info is None:
        raise NoSuchMailbox(name)
    return info


def _new_id(prefix):
    return f"{prefix}-{os.urandom(16).hex()}"


def _put_mailbox(txn, keyed, name, role=None):
    """Create a mailbox document.

    Its id is keyed by the name, so that two devices creating the same name while
    apart make one mailbox when they meet, not two fighting over the name; a name
    whose id is taken by a mailbox renamed since gets a random id.
    """
    doc_id = "mbx-" + keyed("mailbox", name.encode("utf-8"))
    existing = txn.get(doc_id, include_deleted=True)
    if existing is not None and not existing.deleted:
        doc_id = _new_id("mbx")
    txn.put(doc_id, MAILBOX_KIND, codec.dumps({"name": name, "role": role}), expected_rev=0)
    return doc_id


class Account:
    """The mail of one account.  ``id_key`` keys the HMACs that name content documents."""

    log = Logger()

    def __init__(self, store, id_key):
        self.store = store
        self._id_key = id_key
        self._closed = False
        self._cache_filling = None
        self._views = {}
        self._recent_floor = {}
        self._unsubscribe = store.subscribe(self._on_events)
        self.text_indexer = TextIndexer(store)
        self.text_indexer.kick(added=0)  # resume what a previous run left queued

    def close(self):
        self._closed = True
        self._unsubscribe()
        self.text_indexer.close()
        for views in self._views.values():
            for view in list(views):
                view.closed = True
        self._views.clear()

    def keyed_id(self, label, data):
        return keyed_id(self._id_key, label, data)

    # -- mailboxes -------------------------------------------------------------------

    async def setup(self):
        """Create INBOX and the special-use mailboxes if missing (idempotent); check
        the read cache and start copying into it what it lacks."""
        await self.store.transact(setup_mailboxes, self.keyed_id)
        outcome = await self.store.transact(bodycache.check)
        if outcome is not None:
            self.log.info("message cache {outcome}", outcome=outcome)
        if self._cache_filling is None:
            self._cache_filling = defer.ensureDeferred(self._fill_cache())
            self._cache_filling.addErrback(
                lambda f: self.log.failure("could not fill the message cache", f))

    async def _fill_cache(self):
        # One batch at a time: other writes queue between them, not behind all of them.
        try:
            while not self._closed and await self.store.transact(bodycache.fill):
                pass
        except StoreClosed:
            pass

    async def mailboxes(self):
        rows = await self.store.read(
            lambda q: q.execute(f"SELECT {_MAILBOX_COLUMNS} FROM mailboxes ORDER BY name").fetchall()
        )
        return [MailboxInfo(*row) for row in rows]

    async def mailbox(self, name):
        name = names.normalize(name)
        return await self.store.read(_require, name)

    async def create_mailbox(self, name, role=None):
        name = names.normalize(name)

        def job(txn):
            if _find(txn, name) is not None:
                raise MailboxExists(name)
            for parent in names.parents(name):
                if _find(txn, parent) is None:
                    _put_mailbox(txn, self.keyed_id, parent)
            _put_mailbox(txn, self.keyed_id, name, role)
            return _find(txn, name)

        return await self.store.transact(job)

    async def delete_mailbox(self, name):
        """Delete a mailbox and its messages; mailboxes below it stay."""
        name = names.normalize(name)
        if name == names.INBOX:
            raise CannotDeleteInbox()

        def job(txn):
            info = _require(txn, name)
            flag_docs = [r[0] for r in txn.execute(
                "SELECT flags_doc FROM messages WHERE mailbox = ?", (info.id,)
            )]
            for doc_id in flag_docs:
                _expunge_one(txn, doc_id)
            txn.execute("DELETE FROM expunged WHERE mailbox = ?", (info.id,))
            txn.delete(info.id)

        await self.store.transact(job)

    async def rename_mailbox(self, old, new):
        old, new = names.normalize(old), names.normalize(new)
        if new == names.INBOX or names.is_inferior(new, old) or old == new:
            raise InvalidMailboxName(new, f"cannot rename {old!r} to {new!r}")

        def job(txn):
            if _find(txn, new) is not None:
                raise MailboxExists(new)
            source = _find(txn, old)
            if old == names.INBOX:
                # RFC 3501 6.3.5: renaming INBOX moves its messages to a new mailbox
                # and leaves INBOX, and the mailboxes below it, where they are.
                for parent in names.parents(new):
                    if _find(txn, parent) is None:
                        _put_mailbox(txn, self.keyed_id, parent)
                target = _put_mailbox(txn, self.keyed_id, new)
                for (doc_id,) in txn.execute(
                    "SELECT flags_doc FROM messages WHERE mailbox = ? ORDER BY uid", (source.id,)
                ).fetchall():
                    _expunge_one(txn, doc_id, moved_to=_copy_one(txn, doc_id, target))
                return
            inferiors = txn.execute(
                "SELECT doc_id, name, role FROM mailboxes WHERE substr(name, 1, ?) = ?",
                (len(old) + 1, old + names.DELIMITER),
            ).fetchall()
            if source is None and not inferiors:
                raise NoSuchMailbox(old)
            for parent in names.parents(new):
                if _find(txn, parent) is None:
                    _put_mailbox(txn, self.keyed_id, parent)
            moves = ([(source.id, source.name, source.role)] if source else []) + inferiors
            stamp = CLOCK.now()
            for doc_id, name, role in moves:
                doc = txn.get(doc_id)
                value = codec.loads(doc.content)
                value["name"] = new + name[len(old):]
                value["hlc"] = dict(value.get("hlc", {}), name=stamp)
                txn.put(doc_id, MAILBOX_KIND, codec.dumps(value), expected_rev=doc.rev)
            for (sub,) in txn.execute("SELECT name FROM subscriptions").fetchall():
                if sub == old or names.is_inferior(sub, old):
                    self._unsubscribe_name(txn, sub)
                    self._subscribe(txn, new + sub[len(old):])

        await self.store.transact(job)

    # -- subscriptions ---------------------------------------------------------------

    def _subscribe(self, txn, name):
        _subscribe(txn, self.keyed_id, name)

    def _unsubscribe_name(self, txn, name):
        txn.delete(self.keyed_id("subscription", name.encode("utf-8")))

    async def subscribe(self, name):
        name = names.normalize(name)
        await self.store.transact(self._subscribe, name)

    async def unsubscribe(self, name):
        name = names.normalize(name)
        await self.store.transact(self._unsubscribe_name, name)

    async def subscriptions(self):
        rows = await self.store.read(
            lambda q: q.execute("SELECT name FROM subscriptions ORDER BY name").fetchall()
        )
        return [name for (name,) in rows]

    # -- messages --------------------------------------------------------------------

    async def append(self, mailbox, raw, flags=(), internal_date=None, tz_minutes=0,
                     source=None):
        """Import ``raw`` into ``mailbox``; returns ``(uidvalidity, uid)``.

        ``internal_date`` is a Unix time; ``tz_minutes`` the zone it was given in, kept
        so that date searches and INTERNALDATE use the day as the client wrote it.

        ``source`` (bytes) names where the message came from (a provider delivery, a
        legacy server's UIDVALIDITY and UID, a file): an import with a source already
        imported once adds nothing and returns ``(uidvalidity, None)``, even when the
        message was expunged or moved since, and even when another device imported it
        (the flags document id is derived from the source, so two devices' imports meet
        as one document when they sync).
        """
        from leapmail.mail.message import prepare, store_prepared

        name = names.normalize(mailbox)
        prepared = await threads.deferToThread(prepare, raw, self.keyed_id)
        date = int(time.time()) if internal_date is None else int(internal_date)
        return await store_prepared(
            self.store, [prepared],
            lambda txn: self._append_job(txn, name, prepared, flaglib.normalize(flags), date,
                                         tz_minutes, source),
        )

    async def append_many(self, mailbox, messages):
        """Import ``(raw, flags, internal_date)`` triples, or ``(raw, flags,
        internal_date, source)`` quadruples, or ``(raw, flags, internal_date, source,
        tz_minutes)`` (see ``append``), in one transaction (bulk import).

        Returns ``(uidvalidity, [uid, ...])``, ``None`` for a source imported before.
        All or nothing.
        """
        name = names.normalize(mailbox)
        self.text_indexer.bulk_imports += 1
        try:
            return await self._append_many(name, messages)
        finally:
            self.text_indexer.bulk_imports -= 1

    async def _append_many(self, name, messages):
        from leapmail.mail.message import prepare, store_prepared

        prepared = await threads.deferToThread(
            lambda: [prepare(m[0], self.keyed_id) for m in messages]
        )
        now = int(time.time())
        entries = [
            (p, flaglib.normalize(m[1]), now if m[2] is None else int(m[2]),
             m[3] if len(m) > 3 else None, m[4] if len(m) > 4 else 0)
            for p, m in zip(prepared, messages)
        ]

        def job(txn):
            results = [self._append_job(txn, name, p, f, d, tz, s)
                       for p, f, d, s, tz in entries]
            return (results[0][0] if results else None), [uid for _, uid in results]

        return await store_prepared(self.store, prepared, job)

    async def imported(self, sources):
        """The subset of ``sources`` (bytes) imported before (see ``append``), so that
        a resumed import skips them without reading or preparing them again."""
        ids = {"flg-" + self.keyed_id("import", bytes(s)): s for s in sources}
        found = await self.store.read(
            lambda q: q.get_many(list(ids), include_deleted=True))
        return {ids[doc_id] for doc_id in found}

    def _append_job(self, txn, name, prepared, flags, date, tz_minutes, source=None):
        from leapmail.mail.message import write_content

        info = _require(txn, name)
        if source is None:
            doc_id = _new_id("flg")
        else:
            doc_id = "flg-" + self.keyed_id("import", bytes(source))
            if txn.get(doc_id, include_deleted=True) is not None:
                return info.uidvalidity, None
        write_content(txn, prepared)
        txn.put(doc_id, FLAGS_KIND, codec.dumps({
            "mailbox": info.id, "message": prepared.id, "flags": flags, "date": date,
            "tz": tz_minutes,
        }), expected_rev=0)
        (uid,) = txn.execute("SELECT uid FROM messages WHERE flags_doc = ?", (doc_id,)).fetchone()
        return info.uidvalidity, uid

    async def status(self, name):
        name = names.normalize(name)
        # The in-memory floors belong to the reactor thread: the query gets a copy.
        floors = dict(self._recent_floor)

        def query(q):
            info = _require(q, name)
            messages, unseen, deleted = q.execute(
                "SELECT count(*), coalesce(sum((sysflags & ?) = 0), 0), "
                "coalesce(sum((sysflags & ?) != 0), 0) FROM messages WHERE mailbox = ?",
                (flaglib.SEEN, flaglib.DELETED, info.id),
            ).fetchone()
            recent = q.execute(
                "SELECT count(*) FROM messages WHERE mailbox = ? AND uid >= ?",
                (info.id, floors.get(info.id) or _stored_floor(q, info.id)),
            ).fetchone()[0]
            size = q.execute(
                "SELECT coalesce(sum(size), 0) FROM messages WHERE mailbox = ?", (info.id,)
            ).fetchone()[0]
            return {
                "messages": messages, "recent": recent, "unseen": unseen,
                "deleted": deleted, "size": size, "uidnext": info.uidnext,
                "uidvalidity": info.uidvalidity, "highestmodseq": info.highestmodseq,
                "id": info.id,
            }

        return await self.store.read(query)

    # -- sessions --------------------------------------------------------------------

    async def select(self, name, readonly=False):
        """A per-session view of a mailbox, with its own sequence numbers."""
        name = names.normalize(name)
        info = await self.store.read(_require, name)
        view = MailboxView(self, info, readonly)
        # Listen before reading, so no change can fall between snapshot and events;
        # the view drops events its snapshot already contains (by MODSEQ).
        self._views.setdefault(info.id, []).append(view)
        try:
            snapshot = await self.store.read(_snapshot, info.id)
        except BaseException:
            self._views[info.id].remove(view)
            raise
        if snapshot is None:
            self._views[info.id].remove(view)
            raise NoSuchMailbox(name)
        view._load(*snapshot)
        if readonly:
            # EXAMINE sees what is \Recent without taking it from the next SELECT.
            floor = self._recent_floor.get(info.id, snapshot[0].get("recent_floor", 1))
            view.recent = {uid for uid in view._uids if uid >= floor}
        else:
            view.recent = self._claim_recent(info.id, info.uidvalidity, snapshot[0], view._uids)
        return view

    def _release(self, view):
        views = self._views.get(view.info.id)
        if views and view in views:
            views.remove(view)

    def _claim_recent(self, mailbox, uidvalidity, snapshot_info, uids):
        """The UIDs that are \\Recent for the claiming session: exactly one session each.

        The floor lives in memory (the reactor thread makes claims atomic) and is
        written back in the background so that it survives a restart.
        """
        floor = self._recent_floor.get(mailbox, snapshot_info.get("recent_floor", 1))
        recent = {uid for uid in uids if uid >= floor}
        new_floor = max([floor] + [uid + 1 for uid in recent])
        if new_floor != floor:
            self._set_floor(mailbox, uidvalidity, new_floor)
        else:
            self._recent_floor[mailbox] = floor
        return recent

    def _set_floor(self, mailbox, uidvalidity, floor):
        self._recent_floor[mailbox] = floor
        # A mailbox deleted and created again under its name keeps its document id but
        # starts over with a new UIDVALIDITY and UID 1: a late write for the old one
        # must not raise the new one's floor.
        self.store.transact(
            lambda txn: txn.execute(
                "UPDATE mailboxes SET recent_floor = max(recent_floor, ?) "
                "WHERE doc_id = ? AND uidvalidity = ?",
                (floor, mailbox, uidvalidity),
            )
        ).addErrback(lambda f: None)

    def _on_events(self, events):
        for event in events:
            if isinstance(event, ContentAdded):
                self.text_indexer.kick()
                continue
            if isinstance(event, MailboxChanged):
                if event.name is None:
                    # Deleted: the id comes back if the name is created again (it is
                    # keyed by the name), as a new mailbox whose messages from UID 1
                    # on are \Recent, not below an old incarnation's floor.
                    self._recent_floor.pop(event.mailbox, None)
                views = self._views.get(event.mailbox, [])
                for view in list(views):
                    view._notify(event)
                continue
            if not isinstance(event, (MessageAdded, FlagsChanged, Expunged, KeywordsDefined)):
                continue
            views = self._views.get(event.mailbox)
            if not views:
                continue
            recent_to = None
            if isinstance(event, MessageAdded):
                floor = self._recent_floor.get(event.mailbox)
                writable = [v for v in views if not v.readonly]
                if floor is not None and event.uid >= floor and writable:
                    recent_to = writable[0]
                    self._set_floor(event.mailbox, recent_to.info.uidvalidity, event.uid + 1)
            for view in list(views):
                view._notify(event, recent=view is recent_to)

    # -- used by views ---------------------------------------------------------------

    async def change_flags(self, mailbox_id, uids, mode, given, unchanged_since=None):
        """Apply a flag change; returns ``{uid: (flags, modseq)}`` of what changed and
        the UIDs refused by ``unchanged_since`` (CONDSTORE)."""
        given = flaglib.normalize(given)

        def job(txn, part):
            stamp = CLOCK.now()
            changed, refused = {}, []
            for batch in _chunks(part, 500):
                marks = ",".join("?" * len(batch))
                rows = txn.execute(
                    f"SELECT flags_doc, uid, modseq FROM messages "
                    f"WHERE mailbox = ? AND uid IN ({marks})",
                    (mailbox_id, *batch),
                ).fetchall()
                for doc_id, uid, modseq in rows:
                    if unchanged_since is not None and modseq > unchanged_since:
                        refused.append(uid)
                        continue
                    doc = txn.get(doc_id)
                    data = codec.loads(doc.content)
                    new_flags = flaglib.apply(data["flags"], mode, given)
                    if new_flags == data["flags"]:
                        continue
                    before = {f.lower() for f in data["flags"]}
                    after = {f.lower() for f in new_flags}
                    # Each flag added or removed is stamped, so that a device merging
                    # this with its own change keeps the later one per flag.
                    stamps = data.setdefault("hlc", {})
                    for key in before ^ after:
                        stamps[key] = stamp
                    data["flags"] = new_flags
                    txn.put(doc_id, FLAGS_KIND, codec.dumps(data), expected_rev=doc.rev)
                    (new_modseq,) = txn.execute(
                        "SELECT modseq FROM messages WHERE flags_doc = ?", (doc_id,)
                    ).fetchone()
                    changed[uid] = (tuple(new_flags), new_modseq)
            return changed, refused

        # One transaction per WRITE_BATCH messages: STORE 1:* on 100,000 messages must
        # not hold the writer (and every other session's writes) for seconds.  A flag
        # change is per message anyway (RFC 3501 does not make STORE atomic).
        changed, refused = {}, []
        for part in _chunks(sorted(uids), WRITE_BATCH):
            done, no = await self.store.transact(job, part)
            changed.update(done)
            refused += no
        return changed, sorted(refused)

    async def expunge(self, mailbox_id, uids=None):
        """Remove the \\Deleted messages (of ``uids`` if given); returns expunged UIDs."""

        def job(txn, after):
            rows = txn.execute(
                "SELECT flags_doc, uid FROM messages WHERE mailbox = ? AND (sysflags & ?) != 0 "
                "AND uid > ? ORDER BY uid LIMIT ?",
                (mailbox_id, flaglib.DELETED, after, WRITE_BATCH),
            ).fetchall()
            wanted = None if uids is None else set(uids)
            done = []
            for doc_id, uid in rows:
                if wanted is None or uid in wanted:
                    _expunge_one(txn, doc_id)
                    done.append(uid)
            return done, (rows[-1][1] if len(rows) == WRITE_BATCH else None)

        # In batches, like change_flags: each message's expunge stands on its own.
        expunged, after = [], 0
        while after is not None:
            done, after = await self.store.transact(job, after)
            expunged += done
        return expunged

    async def copy(self, mailbox_id, uids, target_name, move=False):
        """Copy (or move) messages; returns ``(target uidvalidity, [(src_uid, dst_uid)])``.

        Content is shared: only a new flags document per message is written.
        """
        target_name = names.normalize(target_name)

        def job(txn):
            target = _require(txn, target_name)
            pairs = []
            for batch in _chunks(sorted(uids), 500):
                marks = ",".join("?" * len(batch))
                rows = txn.execute(
                    f"SELECT flags_doc, uid FROM messages WHERE mailbox = ? AND uid IN ({marks}) "
                    "ORDER BY uid",
                    (mailbox_id, *batch),
                ).fetchall()
                for doc_id, uid in rows:
                    new_doc = _copy_one(txn, doc_id, target.id)
                    (new_uid,) = txn.execute(
                        "SELECT uid FROM messages WHERE flags_doc = ?", (new_doc,)
                    ).fetchone()
                    pairs.append((uid, new_uid))
                    if move:
                        _expunge_one(txn, doc_id, moved_to=new_doc)
            return target.uidvalidity, pairs

        return await self.store.transact(job)


def keyed_id(id_key, label, data):
    """A document id for content: HMAC-SHA-256 under ``id_key``, 128 bits, hex.

    Keyed, so that the provider cannot confirm that a user holds a known file.
    """
    mac = hmac.new(id_key, label.encode("ascii") + b"\0", sha256)
    mac.update(data)
    return mac.hexdigest()[:32]


def _subscribe(txn, keyed, name):
    doc_id = keyed("subscription", name.encode("utf-8"))
    if txn.get(doc_id) is None:
        txn.put(doc_id, SUBSCRIPTION_KIND, codec.dumps({"name": name}))


def setup_mailboxes(txn, keyed):
    """A store job: INBOX and the special-use mailboxes (subscribed), where missing."""
    wanted = [(names.INBOX, None)] + list(names.SPECIAL_USE.items())
    for name, role in wanted:
        if _find(txn, name) is None:
            _put_mailbox(txn, keyed, name, role)
            if role:
                _subscribe(txn, keyed, name)


#: Messages changed per transaction by flag changes and expunges.
WRITE_BATCH = 2000


def _chunks(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _copy_one(txn, flags_doc, target_mailbox):
    data = codec.loads(txn.get(flags_doc).content)
    data["mailbox"] = target_mailbox
    new_doc = _new_id("flg")
    txn.put(new_doc, FLAGS_KIND, codec.dumps(data), expected_rev=0)
    return new_doc


def _expunge_one(txn, flags_doc, moved_to=None):
    """Tombstone a flags document, and the content nothing references any more.

    A move names the copy it made in the tombstone, so that a flag change another
    device made meanwhile can follow the message (:mod:`leapmail.mail.merge`).
    """
    row = txn.execute("SELECT content FROM messages WHERE flags_doc = ?", (flags_doc,)).fetchone()
    txn.delete(flags_doc, note=codec.dumps({"moved_to": moved_to}) if moved_to else None)
    if row is not None:
        collect_content(txn, row[0])


def collect_content(txn, content_id):
    """Delete a content document and its parts once no message refers to them."""
    if txn.execute("SELECT 1 FROM messages WHERE content = ? LIMIT 1", (content_id,)).fetchone():
        return
    parts = [p for (p,) in txn.execute(
        "SELECT part FROM content_parts WHERE content = ?", (content_id,)
    )]
    txn.delete(content_id)
    for part in parts:
        if txn.execute("SELECT 1 FROM content_parts WHERE part = ? LIMIT 1", (part,)).fetchone():
            continue
        from leapmail.mail.message import delete_part

        delete_part(txn, part)


def _stored_floor(queries, mailbox_id):
    return queries.execute(
        "SELECT recent_floor FROM mailboxes WHERE doc_id = ?", (mailbox_id,)
    ).fetchone()[0]


def _snapshot(queries, mailbox_id):
    info = queries.execute(
        "SELECT highestmodseq, recent_floor, uidnext FROM mailboxes WHERE doc_id = ?",
        (mailbox_id,),
    ).fetchone()
    if info is None:
        return None
    uids = [uid for (uid,) in queries.execute(
        "SELECT uid FROM messages WHERE mailbox = ? ORDER BY uid", (mailbox_id,)
    )]
    return ({"highestmodseq": info[0], "recent_floor": info[1], "uidnext": info[2]}, uids)
