"""Copy mail from a legacy IMAP account into the store, and keep following it.

For each chosen mailbox the fetcher EXAMINEs it (read-only: the legacy account's
flags and ``\\Recent`` stay as they are), lists UID, FLAGS, INTERNALDATE and
RFC822.SIZE of its messages (a range of UIDs at a time), asks the account which of
them it imported before, and downloads the rest with ``BODY.PEEK[]`` in batches
bounded by count and bytes, each batch one transaction.  The import source of a
message is the server, user, mailbox, UIDVALIDITY and UID: re-running never
duplicates a message, and an interrupted run resumes where it stopped.

``follow`` then keeps an IDLE connection per followed mailbox (through
:class:`~leapmail.client.session.MailboxWatcher`: renewal, reconnection with backoff)
and fetches what each ``EXISTS`` announces over a second connection; after every
(re)connection it catches up on what arrived while it was away.
"""

import datetime
import random

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail.imap4 import Command, IMAP4Exception

from leapmail.client.protocol import MailboxListener
from leapmail.client.session import MailboxWatcher
from leapmail.errors import LeapmailError
from leapmail.mail import names
from leapmail.mail.message import MAX_MESSAGE_SIZE
from leapmail.transfer.files import ensure_mailbox

#: Messages and bytes per download (one UID FETCH, one store transaction).
BATCH_MESSAGES = 200
BATCH_BYTES = 8 * 1024 * 1024
#: UIDs listed per UID FETCH of metadata.
LIST_UIDS = 1000


class FetchError(LeapmailError):
    pass


def parse_internaldate(text):
    """``(unix time, zone in minutes)`` of an IMAP INTERNALDATE, or ``(None, 0)``."""
    try:
        when = datetime.datetime.strptime(text.strip(), "%d-%b-%Y %H:%M:%S %z")
    except ValueError:
        return None, 0
    return int(when.timestamp()), int(when.utcoffset().total_seconds() // 60)


def local_name(name, delimiter):
    """The store's name for a server's mailbox: its hierarchy delimiter becomes "/".

    A "/" inside a level (possible where the delimiter is another character) would
    split it in two here: it becomes "-".
    """
    if delimiter and delimiter != names.DELIMITER:
        name = name.replace(names.DELIMITER, "-").replace(delimiter, names.DELIMITER)
    return names.normalize(name)


def _fetch_items(lines):
    """``{uid: {item: value}}`` from the untagged FETCH responses of a UID FETCH."""
    found = {}
    for line in lines:
        if len(line) != 3 or not isinstance(line[1], bytes) or line[1].upper() != b"FETCH":
            continue
        items = line[2]
        values = {}
        i = 0
        while i + 1 < len(items):
            key = items[i].upper() if isinstance(items[i], bytes) else items[i]
            if key in (b"BODY", b"BODY.PEEK") and isinstance(items[i + 1], list):
                values[b"BODY[]"] = items[i + 2] if i + 2 < len(items) else None
                i += 3
                continue
            values[key] = items[i + 1]
            i += 2
        uid = values.get(b"UID")
        if uid is not None:
            found.setdefault(int(uid), {}).update(values)
    return found


class Fetcher:
    """Fetches from the server ``connect()`` (an async callable giving a logged-in
    client) into ``account``; ``origin`` (e.g. ``user@host``) goes into the sources."""

    log = Logger()

    def __init__(self, reactor, account, connect, origin, progress, mailboxes=None,
                 max_size=MAX_MESSAGE_SIZE):
        self.reactor = reactor
        self.account = account
        self.connect = connect
        self.origin = origin.encode("utf-8")
        self.progress = progress
        self.wanted = mailboxes
        self.max_size = max_size
        self.delimiters = {}
        self.high_water = {}  # server mailbox -> (uidvalidity, highest UID imported)
        self.oversize = set()
        self.chosen = []

    # -- one pass ----------------------------------------------------------------------

    async def mailboxes(self, client):
        """``[(server name, delimiter, selectable)]`` of the chosen mailboxes."""
        listed = await client.list("", "*")
        found = {}
        for flags, delimiter, name in listed:
            lowered = {f.lower() for f in flags}
            found[name] = (name, delimiter,
                           not ({"\\noselect", "\\nonexistent"} & lowered))
        if self.wanted is None:
            chosen = sorted(found.values(), key=lambda m: (m[0].upper() != "INBOX", m[0]))
        else:
            chosen = []
            for name in self.wanted:
                key = next((k for k in found if k == name or
                            (k.upper() == "INBOX" and name.upper() == "INBOX")), None)
                if key is None:
                    raise FetchError(f"the server has no mailbox {name!r}")
                chosen.append(found[key])
        for name, delimiter, _ in chosen:
            self.delimiters[name] = delimiter
        self.chosen = [name for name, _, selectable in chosen if selectable]
        return chosen

    def to_follow(self):
        """The server's names of the mailboxes ``--follow`` watches: those named, or
        INBOX (after :meth:`run_once`, which learns the server's spelling)."""
        if self.wanted is not None:
            return self.chosen
        return [name for name in self.chosen if name.upper() == "INBOX"]

    async def run_once(self):
        """Copy every chosen mailbox; returns the number of problems."""
        client = await self.connect()
        # Twisted would hold any literal whole in memory: one over the size limit ends
        # the connection instead.
        client.max_literal = self.max_size
        # The text index is built when the daemon next opens the account.
        self.account.text_indexer.bulk_imports += 1
        try:
            chosen = await self.mailboxes(client)
            for name, delimiter, selectable in chosen:
                local = local_name(name, delimiter)
                await ensure_mailbox(self.account, local)
                if not selectable:
                    continue
                try:
                    await self.sync_mailbox(client, name)
                except IMAP4Exception as e:
                    self.progress.problem(f"{name}: the server refused it ({_reason(e)}); "
                                          "skipped")
        except LeapmailError:
            raise
        except Exception as e:
            refused = getattr(client, "literal_refused", None)
            why = (f"the server sent {refused} bytes at once, over the size limit of "
                   f"{self.max_size}" if refused else _reason(e))
            raise FetchError(f"fetching failed: {why}; what was fetched is kept, "
                             "and running the command again resumes") from None
        finally:
            self.account.text_indexer.bulk_imports -= 1
            await _logout(client)
        return self.progress.problems

    async def sync_mailbox(self, client, name):
        """Import what ``name`` holds that the account has not imported yet."""
        local = local_name(name, self.delimiters.get(name))
        info = await client.examine(name)
        uidvalidity = info.get("UIDVALIDITY")
        if uidvalidity is None:
            raise FetchError(f"the server gave no UIDVALIDITY for {name!r}")
        if not info.get("EXISTS"):
            self.high_water.setdefault(name, (uidvalidity, 0))
            return
        seen_validity, low = self.high_water.get(name, (uidvalidity, 0))
        if seen_validity != uidvalidity:
            low = 0
        uidnext = info.get("UIDNEXT")
        prefix = (b"imap\0" + self.origin + b"\0" + name.encode("utf-8") + b"\0"
                  + str(uidvalidity).encode("ascii") + b"\0")
        start = low + 1
        while True:
            # The listing goes by UID ranges: a 100,000-message mailbox's metadata,
            # parsed, would otherwise be in memory all at once.
            last = uidnext is None or start + LIST_UIDS >= uidnext
            span = b"%d:*" % start if last else b"%d:%d" % (start, start + LIST_UIDS - 1)
            lines, _ = await client.sendCommand(Command(
                b"UID FETCH", span + b" (UID FLAGS INTERNALDATE RFC822.SIZE)",
                wantResponse=(b"FETCH",)))
            # "n:*" names the last message even when its UID is below n.
            listing = sorted((uid, values) for uid, values in _fetch_items(lines).items()
                             if uid >= start)
            del lines
            if listing:
                await self._copy(client, name, local, uidvalidity, prefix, listing)
                self.high_water[name] = (uidvalidity, listing[-1][0])
            if last:
                return
            start += LIST_UIDS

    async def _copy(self, client, name, local, uidvalidity, prefix, listing):
        """Download and store the messages of ``listing`` not imported before."""
        sources = {uid: prefix + str(uid).encode("ascii") for uid, _ in listing}
        there = await self.account.imported(sources.values())
        todo = []
        for uid, values in listing:
            if sources[uid] in there:
                continue
            size = int(values.get(b"RFC822.SIZE") or 0)
            if size > self.max_size:
                if (name, uidvalidity, uid) not in self.oversize:
                    self.oversize.add((name, uidvalidity, uid))
                    self.progress.problem(f"{name} UID {uid}: {size} bytes, over the size "
                                          f"limit of {self.max_size} bytes; skipped")
                continue
            flags = [f.decode("utf-8", "replace") if isinstance(f, bytes) else f
                     for f in values.get(b"FLAGS") or []]
            date, tz = parse_internaldate(_text(values.get(b"INTERNALDATE")))
            todo.append((uid, size, flags, date, tz))
        self.progress.set_total(
            total=(self.progress.total or 0) + len(todo),
            total_bytes=sum(t[1] for t in todo) + self.progress.bytes)

        def download(batch):
            uidset = ",".join(str(t[0]) for t in batch).encode("ascii")
            return client.sendCommand(Command(
                b"UID FETCH", uidset + b" (UID BODY.PEEK[])", wantResponse=(b"FETCH",)))

        batches = list(_batches(todo))
        upcoming = download(batches[0]) if batches else None
        for i, batch in enumerate(batches):
            lines, _ = await upcoming
            # The next batch downloads while this one is prepared and written: two
            # batches in memory at most.
            upcoming = download(batches[i + 1]) if i + 1 < len(batches) else None
            bodies = _fetch_items(lines)
            del lines
            messages = []
            for uid, _size, flags, date, tz in batch:
                raw = bodies.get(uid, {}).get(b"BODY[]")
                if raw is None:
                    # Expunged on the server between listing and download.
                    continue
                if len(raw) > self.max_size:
                    self.progress.problem(f"{name} UID {uid}: over the size limit; skipped")
                    continue
                messages.append((raw, flags, date, sources[uid], tz))
            del bodies
            if messages:
                try:
                    await self.account.append_many(local, messages)
                except BaseException:
                    if upcoming is not None:
                        upcoming.addErrback(lambda _: None)
                    raise
            self.progress.advance(messages=len(messages),
                                  nbytes=sum(len(m[0]) for m in messages), label=local)

    # -- following ---------------------------------------------------------------------

    async def follow(self, names_to_follow, stopped, backoff_cap=30.0):
        """Follow ``names_to_follow`` with IDLE until ``stopped`` (a Deferred) fires."""
        self._dirty = set(names_to_follow)
        self._wake = None
        watchers = []
        for name in names_to_follow:
            watcher = _Watcher(self.reactor, self.connect, name, _News(self, name), self)
            watchers.append(watcher)
            watcher.start()
        worker = defer.ensureDeferred(self._work(backoff_cap))
        try:
            await stopped
        finally:
            self._running = False
            self._kick()
            for watcher in watchers:
                await watcher.stop()
            try:
                await worker
            except Exception:
                pass

    def mark(self, name):
        self._dirty.add(name)
        self._kick()

    def _kick(self):
        if self._wake is not None and not self._wake.called:
            self._wake.callback(None)

    async def _work(self, backoff_cap):
        self._running = True
        client = None
        failures = 0
        while self._running:
            if not self._dirty:
                self._wake = defer.Deferred()
                await self._wake
                continue
            try:
                if client is None:
                    client = await self.connect()
                    client.max_literal = self.max_size
                while self._dirty and self._running:
                    name = min(self._dirty)
                    self._dirty.discard(name)
                    before = self.progress.messages
                    try:
                        await self.sync_mailbox(client, name)
                    except BaseException:
                        self._dirty.add(name)
                        raise
                    if self.progress.messages > before:
                        self.progress.note(f"{name}: {self.progress.messages - before} "
                                           "new messages imported")
                failures = 0
            except Exception as e:
                if not self._running:
                    break
                failures += 1
                delay = min(backoff_cap, 0.5 * 2 ** (failures - 1)) * (0.5 + random.random() / 2)
                self.progress.note(f"fetching failed ({_reason(e)}); again in {delay:.1f} s")
                if client is not None:
                    client.transport.loseConnection()
                    client = None
                d = defer.Deferred()
                self._wake = d
                timer = self.reactor.callLater(delay, lambda: d.called or d.callback(None))
                await d
                if timer.active():
                    timer.cancel()
        if client is not None:
            await _logout(client)


class _News(MailboxListener):
    def __init__(self, fetcher, name):
        self.fetcher = fetcher
        self.name = name

    def exists(self, count):
        self.fetcher.mark(self.name)


class _Watcher(MailboxWatcher):
    """A watcher that, each time it is idling again, has the fetcher catch up: mail
    may have arrived while it was connecting."""

    def __init__(self, reactor, connect, name, listener, fetcher):
        super().__init__(reactor, connect, name, listener, readonly=True)
        self.fetcher = fetcher
        self._said = False

    def _announce_ready(self):
        super()._announce_ready()
        if not self._said:
            self._said = True
            self.fetcher.progress.note(f"following {self.mailbox}")
        self.fetcher.mark(self.mailbox)


def _batches(todo):
    batch, size = [], 0
    for entry in todo:
        if batch and (len(batch) >= BATCH_MESSAGES or size + entry[1] > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += entry[1]
    if batch:
        yield batch


def _text(value):
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return value or ""


def _reason(error):
    if isinstance(error, IMAP4Exception):
        value = error.args[0] if error.args else error
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return getattr(error, "getErrorMessage", lambda: str(error))() or type(error).__name__


async def _logout(client):
    try:
        if client.transport is not None and client.transport.connected:
            await client.logout()
    except Exception:
        pass
    finally:
        if client.transport is not None:
            client.transport.loseConnection()

