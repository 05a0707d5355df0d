"""Import mail files into an account, and export mailboxes back into files.

Both run on the reactor over an open :class:`~leapmail.mail.account.Account`; reading
and writing files happens on threads, in batches, so that the store's writer always
has the next batch ready.

Import is idempotent: every message gets an import source made of the target
mailbox, the SHA-256 of its bytes and how many identical messages came before it in
the same input; the account imports a source once ever.  An interrupted import is
resumed by running it again: what is in is skipped without being stored again.

Export writes files under a temporary name and renames them into place, so a file
that exists is complete.  Maildir and ``.eml`` exports skip the messages whose file
exists already (names are stable: UIDVALIDITY and UID), so they resume; an mbox is
written whole and replaces the previous file.
"""

import os

from twisted.internet import threads

from leapmail.errors import LeapmailError
from leapmail.mail import names
from leapmail.mail.errors import MailboxExists, NoSuchMailbox
from leapmail.mail.message import (
    MAX_MESSAGE_SIZE,
    iter_range,
    load_contents,
    load_parts,
    read_range,
)
from leapmail.transfer import formats

#: Messages per store transaction, and bytes: big enough to amortise a commit,
#: small enough that an interruption loses little and memory stays bounded.
BATCH_MESSAGES = 500
BATCH_BYTES = 16 * 1024 * 1024
#: Messages bigger than this are streamed to the file in pieces on export.
STREAM_ABOVE = 4 * 1024 * 1024


class TransferError(LeapmailError):
    pass


def target_mailbox(root, folder):
    """The mailbox for a sub-folder path of an import whose top goes into ``root``.

    Below INBOX the folders are top-level mailboxes, as on an IMAP server whose
    Maildir root is INBOX; below any other root they are that root's children.
    """
    if not folder:
        return names.normalize(root)
    if names.normalize(root) == names.INBOX:
        return names.normalize(names.DELIMITER.join(folder))
    return names.normalize(root + names.DELIMITER + names.DELIMITER.join(folder))


async def ensure_mailbox(account, name):
    try:
        await account.mailbox(name)
    except NoSuchMailbox:
        try:
            await account.create_mailbox(name)
        except MailboxExists:
            pass


def _take(items, count, size, consumed):
    """The next batch, and how much input reading it took (``consumed`` is the
    counter the reader advances: only the reading thread touches it)."""
    before = consumed[0]
    batch, total = [], 0
    for item in items:
        batch.append(item)
        if isinstance(item, formats.Message):
            total += len(item.raw)
        if len(batch) >= count or total >= size:
            break
    return batch, consumed[0] - before


def _reader(path, fmt, max_size, consumed):
    if fmt in ("mbox",) + formats.MBOX_FORMATS:
        if os.path.isdir(path):
            raise TransferError(f"{path} is a directory, not an mbox file")
        return formats.read_mbox(path, fmt, max_size, consumed)
    if not os.path.isdir(path):
        raise TransferError(f"{path} is not a directory, so it is no {fmt}")
    if fmt == "maildir":
        return formats.read_maildir(path, max_size, consumed)
    return formats.read_eml(path, max_size, consumed)


async def import_path(account, path, fmt, mailbox, progress, max_size=MAX_MESSAGE_SIZE):
    """Import ``path`` (``fmt`` as in :data:`formats.FORMATS`, or None to detect) into
    ``mailbox`` and, for folder trees, mailboxes below it.  Returns the problem count."""
    if not os.path.exists(path):
        raise TransferError(f"{path} does not exist")
    fmt = fmt or formats.detect(path)
    names.normalize(mailbox)
    if fmt in ("mbox",) + formats.MBOX_FORMATS:
        progress.set_total(total_bytes=os.path.getsize(path))
    else:
        progress.set_total(total=await threads.deferToThread(formats.count_files, path, fmt))
    consumed = [0]

    def count(n):
        consumed[0] += n

    items = _reader(path, fmt, max_size, count)
    known = set()
    # The text index is built when the daemon next opens the account, not between
    # batches here: the writer stays free for the import.
    account.text_indexer.bulk_imports += 1
    try:
        await _import_batches(account, items, mailbox, progress, consumed, known)
    finally:
        account.text_indexer.bulk_imports -= 1
    return progress.problems


async def _import_batches(account, items, mailbox, progress, consumed, known):
    ahead = []

    def take():
        ahead[:] = [threads.deferToThread(_take, items, BATCH_MESSAGES, BATCH_BYTES, consumed)]
        return ahead[0]

    try:
        await _store_batches(account, mailbox, progress, known, take)
    except BaseException:
        if ahead:
            # The read ahead may fail too: its error is this one's consequence.
            ahead[0].addErrback(lambda _: None)
        raise


async def _store_batches(account, mailbox, progress, known, take):
    upcoming = take()
    while True:
        try:
            batch, read = await upcoming
        except formats.FormatError as e:
            raise TransferError(str(e)) from None
        if not batch:
            break
        # Read the next batch while this one is prepared and written.
        upcoming = take()
        by_mailbox = {}
        for item in batch:
            if isinstance(item, formats.Problem):
                progress.problem(f"{item.where}: {item.reason}; skipped")
                continue
            name = target_mailbox(mailbox, item.folder)
            source = b"file\0" + name.encode("utf-8") + b"\0" + item.key
            by_mailbox.setdefault(name, []).append((item, source))
        for name, entries in by_mailbox.items():
            if name not in known:
                await ensure_mailbox(account, name)
                known.add(name)
            there = await account.imported([source for _, source in entries])
            new = [(m.raw, m.flags, m.date, source) for m, source in entries
                   if source not in there]
            if new:
                await account.append_many(name, new)
            progress.advance(messages=len(new), nbytes=sum(len(m[0]) for m in new),
                             skipped=len(entries) - len(new), consumed=read, label=name)
            read = 0
        if read:
            progress.advance(consumed=read)


# -- export ----------------------------------------------------------------------------

def _read_batch(queries, metas):
    contents = load_contents(queries, [m.content for m in metas])
    parts = load_parts(queries, contents.values(), STREAM_ABOVE)
    return [read_range(queries, contents[m.content], 0, m.size, parts) for m in metas]


async def _messages(account, view, uids):
    """``(meta, pieces)`` per message of ``uids``: pieces an async iterator of bytes."""
    store = account.store
    for start in range(0, len(uids), 200):
        metas = await view.meta(uids[start:start + 200])
        small = [m for m in metas if m.size <= STREAM_ABOVE]
        raws = dict(zip((m.uid for m in small), await store.read(_read_batch, small)))
        for meta in metas:
            if meta.uid in raws:
                yield meta, _once(raws.pop(meta.uid))
            else:
                content = await store.read(
                    lambda q, c=meta.content: load_contents(q, [c])[c])
                yield meta, iter_range(store, content, 0, meta.size)


async def _once(data):
    yield data


async def _collect(pieces):
    return b"".join([piece async for piece in pieces])


def _write_atomic(path, data, date=None):
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.part")
    with open(tmp, "wb") as f:
        f.write(data)
    if date is not None:
        os.utime(tmp, (date, date))
    os.replace(tmp, path)


def _mailbox_path(root, name, suffix=""):
    parts = name.split(names.DELIMITER)
    if any(p in (".", "..") or os.sep in p for p in parts):
        raise TransferError(f"the mailbox name {name!r} cannot be a file name")
    return os.path.join(root, *parts[:-1], parts[-1] + suffix)


async def export_mailboxes(account, fmt, mailboxes, path, progress):
    """Export ``mailboxes`` (names; None for all) to ``path``.  With one mailbox named,
    ``path`` is that mailbox's file or folder; else a tree of them."""
    fmt = fmt or ("maildir" if os.path.isdir(os.path.join(path, "cur")) else
                  "mbox" if mailboxes and len(mailboxes) == 1 and not os.path.isdir(path)
                  else "eml")
    if fmt == "mbox":
        fmt = "mboxrd"
    if mailboxes is None:
        chosen = [info.name for info in await account.mailboxes()]
        single = False
    else:
        chosen = [names.normalize(m) for m in mailboxes]
        single = len(chosen) == 1
    infos = {}
    for name in chosen:
        try:
            infos[name] = await account.status(name)
        except NoSuchMailbox:
            raise TransferError(f"there is no mailbox {name!r}") from None
    progress.set_total(total=sum(s["messages"] for s in infos.values()),
                       total_bytes=sum(s["size"] for s in infos.values()))
    if fmt not in formats.MBOX_FORMATS or not single:
        os.makedirs(path, mode=0o700, exist_ok=True)
    for name in chosen:
        view = await account.select(name, readonly=True)
        try:
            if fmt in formats.MBOX_FORMATS:
                target = path if single else _mailbox_path(path, name, ".mbox")
                await _export_mbox(account, view, target, fmt, progress)
            elif fmt == "maildir":
                folder = () if single or name == names.INBOX else tuple(
                    name.split(names.DELIMITER))
                try:
                    directory = formats.maildir_dir(path, folder)
                except ValueError as e:
                    progress.problem(f"{name}: {e}; not exported")
                    continue
                await _export_files(account, view, directory, progress, maildir=True)
            else:
                directory = path if single else _mailbox_path(path, name)
                await _export_files(account, view, directory, progress, maildir=False)
        finally:
            view.close()
    return progress.problems


async def _export_mbox(account, view, target, fmt, progress):
    os.makedirs(os.path.dirname(os.path.abspath(target)), mode=0o700, exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(target)),
                       f".{os.path.basename(target)}.part")
    out = await threads.deferToThread(open, tmp, "wb")
    try:
        pending, pending_size, count, size = [], 0, 0, 0
        async for meta, pieces in _messages(account, view, list(view.uids)):
            # mbox quoting works on lines: a message is quoted whole (at most the
            # 64 MiB a message may be).
            raw = await _collect(pieces)
            if fmt == "mboxo" and formats.mboxo_ambiguous(raw):
                progress.note(f"warning: {view.info.name} UID {meta.uid}: a line starts "
                              "with '>From ', which mboxo reads back as 'From ' (mboxrd "
                              "would not)")
            pending.append(formats.mbox_entry(raw, meta.internal_date, fmt))
            pending_size += len(pending[-1])
            count, size = count + 1, size + len(raw)
            if pending_size >= BATCH_BYTES or count >= BATCH_MESSAGES:
                await threads.deferToThread(out.writelines, pending)
                progress.advance(messages=count, nbytes=size, label=view.info.name)
                pending, pending_size, count, size = [], 0, 0, 0
        await threads.deferToThread(out.writelines, pending)
        if count:
            progress.advance(messages=count, nbytes=size, label=view.info.name)
        await threads.deferToThread(lambda: (out.flush(), os.fsync(out.fileno())))
        out.close()
        os.replace(tmp, target)
    except BaseException:
        out.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _existing(directory, maildir):
    found = set()
    for sub in (("cur", "new") if maildir else ("",)):
        try:
            for name in os.listdir(os.path.join(directory, sub)):
                found.add(name.split(":2,")[0] if maildir else name)
        except FileNotFoundError:
            pass
    return found


async def _export_files(account, view, directory, progress, maildir):
    if maildir:
        await threads.deferToThread(formats.make_maildir, directory)
    else:
        await threads.deferToThread(os.makedirs, directory, 0o700, True)
    there = await threads.deferToThread(_existing, directory, maildir)
    uidvalidity = view.info.uidvalidity

    def stem(uid):
        return f"{uid}.U{uidvalidity}.leapmail" if maildir else f"{uid}.eml"

    todo = [uid for uid in view.uids if stem(uid) not in there]
    if len(todo) < len(view.uids):
        progress.advance(skipped=len(view.uids) - len(todo), label=view.info.name)
    batch, count, size = [], 0, 0

    def write(batch):
        for file_path, data, date in batch:
            _write_atomic(file_path, data, date)

    async for meta, pieces in _messages(account, view, todo):
        data = await _collect(pieces)
        if maildir:
            name = formats.maildir_name(stem(meta.uid), meta.flags)
            file_path = os.path.join(directory, "cur", name)
        else:
            file_path = os.path.join(directory, stem(meta.uid))
        batch.append((file_path, data, meta.internal_date))
        count, size = count + 1, size + len(data)
        if size >= BATCH_BYTES or count >= BATCH_MESSAGES:
            await threads.deferToThread(write, batch)
            progress.advance(messages=count, nbytes=size, label=view.info.name)
            batch, count, size = [], 0, 0
    if batch:
        await threads.deferToThread(write, batch)
        progress.advance(messages=count, nbytes=size, label=view.info.name)
