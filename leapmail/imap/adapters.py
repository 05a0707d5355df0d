"""The mail core behind Twisted's IMAP interfaces.

:class:`IMAPAccount` implements ``IAccountIMAP`` and ``INamespacePresenter``;
:class:`IMAPMailbox` implements ``IMailboxIMAP``, ``ISearchableIMAPMailbox``,
``IMessageIMAPCopier``, ``IMailboxIMAPInfo`` and ``ICloseableMailboxIMAP``;
:class:`IMAPMessage` implements ``IMessageIMAP``.  Every method that needs the store
returns a Deferred, as Twisted's server allows.  Our server uses the account adapter
for mailbox operations and the mailbox adapter as the holder of the session's view;
for message data it goes to the mail core in batches (see :mod:`leapmail.imap.fetch`),
which Twisted's one-message-at-a-time ``IMessageIMAP`` cannot do fast.
"""

import io
from dataclasses import dataclass

from twisted.internet import defer
from twisted.mail import interfaces as imapi
from zope.interface import implementer

from leapmail.imap.names import list_matcher
from leapmail.imap.search import uid_ranges_for_seqs, uid_ranges_for_uids
from leapmail.mail import names
from leapmail.mail.errors import MailError
from leapmail.mail.headers import split_fields
from leapmail.mail.message import load_content, read_range
from leapmail.mail.session import read_meta

_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")


def _deferred(coroutine_function):
    def wrapper(*args, **kwargs):
        return defer.ensureDeferred(coroutine_function(*args, **kwargs))
    wrapper.__name__ = coroutine_function.__name__
    wrapper.__doc__ = coroutine_function.__doc__
    return wrapper


@dataclass
class ListEntry:
    name: str
    attributes: list
    subscribed: bool
    selectable: bool
    childinfo: bool = False


@implementer(imapi.IAccountIMAP, imapi.INamespacePresenter)
class IMAPAccount:
    def __init__(self, account):
        self.account = account

    # -- IAccountIMAP -------------------------------------------------------------

    @_deferred
    async def addMailbox(self, name, mbox=None):
        if mbox is not None:
            raise NotImplementedError("mailboxes are made by the mail core")
        await self.account.create_mailbox(name)
        return True

    @_deferred
    async def create(self, pathspec):
        await self.account.create_mailbox(pathspec)
        return True

    @_deferred
    async def select(self, name, rw=True):
        view = await self.account.select(name, readonly=not rw)
        return IMAPMailbox(view)

    @_deferred
    async def delete(self, name):
        await self.account.delete_mailbox(name)
        return True

    @_deferred
    async def rename(self, oldname, newname):
        await self.account.rename_mailbox(oldname, newname)
        return True

    @_deferred
    async def isSubscribed(self, name):
        return names.normalize(name) in await self.account.subscriptions()

    @_deferred
    async def subscribe(self, name):
        await self.account.subscribe(name)
        return True

    @_deferred
    async def unsubscribe(self, name):
        await self.account.unsubscribe(name)
        return True

    @_deferred
    async def listMailboxes(self, ref, wildcard):
        entries = await self.list_entries([ref + wildcard])
        return [(e.name, MailboxInfo(e.attributes)) for e in entries]

    # -- INamespacePresenter ------------------------------------------------------

    def getPersonalNamespaces(self):
        return [["", names.DELIMITER]]

    def getSharedNamespaces(self):
        return None

    def getUserNamespaces(self):
        return None

    # -- beyond Twisted's interface: what LIST-EXTENDED, STATUS and APPEND need ------

    def status(self, name):
        async def run():
            status = await self.account.status(name)
            status["name"] = names.normalize(name)
            return status
        return defer.ensureDeferred(run())

    def append(self, name, raw, flags, date, tz_minutes):
        return defer.ensureDeferred(self.account.append(name, raw, flags, date, tz_minutes))

    @_deferred
    async def list_entries(self, patterns, lsub=False, subscribed_only=False,
                           recursive=False, special_use_only=False):
        """The LIST (or LSUB) answer for ``patterns``, with each name's attributes."""
        boxes = {info.name: info for info in await self.account.mailboxes()}
        subscribed = set(await self.account.subscriptions())
        has_children = set()
        for name in boxes:
            has_children.update(names.parents(name))
        matchers = [list_matcher(p) for p in patterns]

        def matches(name):
            return any(m(name) for m in matchers)

        by_subscription = lsub or subscribed_only
        candidates = subscribed if by_subscription else set(boxes)
        found = {}
        for name in candidates:
            if matches(name):
                found[name] = False
        # Levels of hierarchy that a pattern matches but that exist only as the parent
        # of something (RFC 3501 6.3.8/6.3.9), and, for RECURSIVEMATCH, parents of
        # subscribed mailboxes that no pattern matches (RFC 5258 3.3 2.B: a child that
        # is listed itself makes its parent's CHILDINFO redundant, 3.5).
        for name in candidates:
            for parent in names.parents(name):
                if parent in found or not matches(parent):
                    continue
                if recursive:
                    if not matches(name):
                        found[parent] = True
                elif by_subscription:
                    # Only the levels "%" stops at: with "*" the child matches itself.
                    if not matches(name):
                        found[parent] = None
                elif parent not in boxes:
                    found[parent] = None
        if recursive:
            for name in list(found):
                if any(names.is_inferior(s, name) and not matches(s) for s in subscribed):
                    found[name] = True if found[name] is not None else True
        entries = []
        for name in sorted(found, key=lambda n: (n != names.INBOX, n)):
            marker = found[name]
            info = boxes.get(name)
            attributes = []
            if info is None:
                if subscribed_only and name in subscribed:
                    attributes.append("\\NonExistent")
                else:
                    attributes.append("\\Noselect")
            elif marker is None and by_subscription:
                attributes.append("\\Noselect")
            if not lsub:
                attributes.append("\\HasChildren" if name in has_children else "\\HasNoChildren")
                if info is not None and info.role:
                    attributes.append(info.role)
            if special_use_only and not (info is not None and info.role):
                continue
            if recursive and marker is True and name not in subscribed:
                entries.append(ListEntry(name, attributes, False, info is not None, True))
                continue
            entries.append(ListEntry(name, attributes, name in subscribed,
                                     info is not None and marker is not None,
                                     childinfo=bool(recursive and marker is True)))
        return entries


@implementer(imapi.IMailboxIMAPInfo)
class MailboxInfo:
    def __init__(self, attributes):
        self._attributes = attributes

    def getFlags(self):
        return list(self._attributes)

    def getHierarchicalDelimiter(self):
        return names.DELIMITER


@implementer(imapi.IMailboxIMAP, imapi.ISearchableIMAPMailbox, imapi.IMessageIMAPCopier,
             imapi.IMailboxIMAPInfo, imapi.ICloseableMailboxIMAP)
class IMAPMailbox:
    """A selected mailbox: one session's :class:`~leapmail.mail.session.MailboxView`."""

    def __init__(self, view):
        self.view = view
        self._listeners = []

    # IMailboxIMAPInfo
    def getFlags(self):
        return list(_FLAGS)

    def getHierarchicalDelimiter(self):
        return names.DELIMITER

    # IMailboxIMAP
    def getUIDValidity(self):
        return self.view.info.uidvalidity

    def getUIDNext(self):
        return self.view.uidnext

    def getUID(self, message):
        return self.view.uid_of(message)

    def getMessageCount(self):
        return self.view.exists

    def getRecentCount(self):
        return len(self.view.recent)

    @_deferred
    async def getUnseenCount(self):
        return (await self.view.account.status(self.view.info.name))["unseen"]

    def isWriteable(self):
        return not self.view.readonly

    @_deferred
    async def destroy(self):
        await self.view.account.delete_mailbox(self.view.info.name)

    @_deferred
    async def requestStatus(self, names_):
        status = await self.view.account.status(self.view.info.name)
        return {name: status[name.lower()] for name in names_ if name.lower() in status}

    def addListener(self, listener):
        self._listeners.append(listener)

    def removeListener(self, listener):
        self._listeners.remove(listener)

    @_deferred
    async def addMessage(self, message, flags=(), date=None):
        raw = message.read() if hasattr(message, "read") else bytes(message)
        _, uid = await self.view.account.append(self.view.info.name, raw, list(flags))
        return uid

    @_deferred
    async def expunge(self):
        before = list(self.view.uids)
        expunged = await self.view.expunge()
        return [before.index(uid) + 1 for uid in expunged if uid in before]

    def _uids(self, messages, uid):
        """The known UIDs a Twisted ``MessageSet`` names (None is its "*")."""
        ranges = messages.ranges
        if uid:
            spans = uid_ranges_for_uids(self.view, ranges)
        else:
            spans = uid_ranges_for_seqs(self.view, ranges)
        out = set()
        for low, high in spans:
            out.update(self.view.uids_in_range(low, high))
        return sorted(out)

    @_deferred
    async def fetch(self, messages, uid):
        """``[(seq, IMAPMessage)]``: whole messages, loaded; for Twisted-API callers."""
        uids = self._uids(messages, uid)
        store = self.view.account.store
        mailbox = self.view.info.id

        def job(queries):
            out = []
            for meta in read_meta(queries, mailbox, uids):
                content = load_content(queries, meta.content)
                out.append((meta, read_range(queries, content, 0, content.size)))
            return out

        return [(self.view.seq_of(meta.uid), IMAPMessage(meta, raw))
                for meta, raw in await store.read(job)]

    @_deferred
    async def store(self, messages, flags, mode, uid):
        uids = self._uids(messages, uid)
        change = {1: "add", -1: "remove", 0: "set"}[mode]
        changed, _ = await self.view.store_flags(uids, change, list(flags))
        return {(u if uid else self.view.seq_of(u)): list(f) for u, (f, _m) in changed.items()}

    # ISearchableMailbox: ``query`` is a mail-core query tree (leapmail.mail.search).
    @_deferred
    async def search(self, query, uid):
        found = await self.view.search(query)
        return found if uid else [self.view.seq_of(u) for u in found if self.view.seq_of(u)]

    # IMessageCopier
    @_deferred
    async def copy(self, message):
        raw = message.getBodyFile().read() if hasattr(message, "getBodyFile") else message
        _, uid = await self.view.account.append(self.view.info.name, raw,
                                                list(getattr(message, "getFlags", list)()))
        return uid

    # ICloseableMailboxIMAP
    def close(self):
        self.view.close()
        return defer.succeed(None)


@implementer(imapi.IMessageIMAP)
class IMAPMessage:
    """A whole message in memory, with its metadata."""

    def __init__(self, meta, raw):
        self.meta = meta
        self.raw = raw

    def getUID(self):
        return self.meta.uid

    def getFlags(self):
        return list(self.meta.flags)

    def getInternalDate(self):
        from email.utils import formatdate
        return formatdate(self.meta.internal_date)

    def _split(self):
        end = self.raw.find(b"\r\n\r\n")
        if end < 0:
            end = self.raw.find(b"\n\n")
            return (self.raw, b"") if end < 0 else (self.raw[:end + 1], self.raw[end + 2:])
        return self.raw[:end + 2], self.raw[end + 4:]

    def getHeaders(self, negate, *names_):
        wanted = {n.lower() for n in names_}
        out = {}
        for field in split_fields(self._split()[0]):
            key = field.key
            if not names_ or ((key in wanted) != negate):
                out[field.name.decode("latin-1")] = field.value().decode("latin-1").strip()
        return out

    def getBodyFile(self):
        return io.BytesIO(self._split()[1])

    def getSize(self):
        return self.meta.size

    def isMultipart(self):
        return False

    def getSubPart(self, part):
        raise IndexError(part)


__all__ = ["IMAPAccount", "IMAPMailbox", "IMAPMessage", "MailboxInfo", "ListEntry",
           "MailError"]
