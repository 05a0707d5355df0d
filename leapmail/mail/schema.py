"""The mail core's tables in the store, and the indexers that keep them in step.

Documents are what sync replicates; these tables are this device's indexed view of
them, written by indexers in the same transaction as the documents.  Everything that
is local to a device lives only here: UIDs, UIDVALIDITY, MODSEQ and the \\Recent
floor.  Because indexers run for every write — a local command or a document pulled
by sync — UIDs are assigned and events emitted the same way for both.
"""

import datetime
import re
import time

from leapmail.mail import codec
from leapmail.mail.events import (
    ContentAdded,
    Expunged,
    FlagsChanged,
    KeywordsDefined,
    MailboxChanged,
    MessageAdded,
)
from leapmail.mail.flags import join_flags, split_flags
from leapmail.store import SchemaComponent

MAILBOX_KIND = "mailbox"
MESSAGE_KIND = "message"
PART_KIND = "part"
FLAGS_KIND = "flags"
SUBSCRIPTION_KIND = "subscription"

_V1 = """
CREATE TABLE mail_state (
    key   TEXT PRIMARY KEY,
    value
);

-- One row per mailbox document.  uidvalidity comes from a device-wide counter, so a
-- mailbox deleted and re-created under the same name never reuses one (RFC 3501
-- 2.3.1.1); uidnext and highestmodseq only grow.
CREATE TABLE mailboxes (
    doc_id        TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    role          TEXT,
    uidvalidity   INTEGER NOT NULL UNIQUE,
    uidnext       INTEGER NOT NULL,
    highestmodseq INTEGER NOT NULL,
    recent_floor  INTEGER NOT NULL
);

-- One row per flags document: a message as it is in one mailbox.
CREATE TABLE messages (
    flags_doc     TEXT PRIMARY KEY,
    mailbox       TEXT NOT NULL,
    uid           INTEGER NOT NULL,
    content       TEXT NOT NULL,
    content_row   INTEGER,           -- contents.rowid: integer joins for search
    modseq        INTEGER NOT NULL,
    internal_date INTEGER NOT NULL,
    internal_day  INTEGER NOT NULL,  -- proleptic ordinal of the date in its own zone
    size          INTEGER NOT NULL,
    sysflags      INTEGER NOT NULL,
    keywords      TEXT NOT NULL,
    UNIQUE (mailbox, uid)
);
CREATE INDEX messages_by_modseq ON messages (mailbox, modseq);
CREATE INDEX messages_by_content ON messages (content);
CREATE INDEX messages_by_content_row ON messages (content_row);

-- Expunged UIDs with the MODSEQ of their expunge, for QRESYNC's VANISHED.
CREATE TABLE expunged (
    mailbox TEXT NOT NULL,
    uid     INTEGER NOT NULL,
    modseq  INTEGER NOT NULL,
    PRIMARY KEY (mailbox, uid)
);

-- One row per message content document, and which part documents it uses.
CREATE TABLE contents (
    doc_id    TEXT NOT NULL UNIQUE,
    size      INTEGER NOT NULL,
    sent_date INTEGER,
    sent_day  INTEGER               -- ordinal of the Date: header's day, in its own zone
);
CREATE TABLE content_parts (
    content TEXT NOT NULL,
    part    TEXT NOT NULL,
    PRIMARY KEY (content, part)
);
CREATE INDEX content_parts_by_part ON content_parts (part);

-- Search: decoded, case-folded values of the top-level header fields, and a trigram
-- full-text index (case-insensitive substrings, as RFC 3501 SEARCH wants) of the
-- decoded header and body text; both keyed by contents.rowid.
CREATE TABLE header_fields (
    content INTEGER NOT NULL,
    name    TEXT NOT NULL,
    value   TEXT NOT NULL
);
CREATE INDEX header_fields_by_content ON header_fields (content, name);
CREATE VIRTUAL TABLE text_index USING fts5 (headers, body, tokenize = 'trigram');
-- Contents whose text is not in text_index yet: indexing runs in batches after
-- import, and a search for text first finishes it (leapmail.mail.textindex).
CREATE TABLE text_pending (
    content_row INTEGER PRIMARY KEY
);

CREATE TABLE subscriptions (
    name TEXT PRIMARY KEY
);
"""


# Version 2: the top-level header block of each content, so that the header fetch of
# a big mailbox (what every client does first) reads a few hundred bytes a message
# instead of decoding the whole content document.  NULL for contents indexed before.
# Also the zone an internal date was given in (minutes east of UTC), so that
# INTERNALDATE shows the time as the client gave it.
# And the full-text index is rebuilt: its text now follows Dovecot's SEARCH (every
# header of every part for TEXT; only text/* and message/* bodies for BODY).
_V2 = """
ALTER TABLE contents ADD COLUMN header BLOB;
ALTER TABLE messages ADD COLUMN tz INTEGER NOT NULL DEFAULT 0;
DELETE FROM text_index;
INSERT OR IGNORE INTO text_pending (content_row) SELECT rowid FROM contents;
-- FTS5 merges index segments as they pile up; merging at 8 per level instead of 4
-- makes each insert some 12% cheaper (measured on the benchmark mail) while keeping
-- the segment count, and so search cost, bounded.
INSERT INTO text_index (text_index, rank) VALUES ('automerge', 8);
-- SELECT reports the first unseen message and the keywords in use: without these it
-- read every row of a 100,000-message mailbox twice.
CREATE INDEX messages_unseen ON messages (mailbox, uid) WHERE (sysflags & 1) = 0;
CREATE INDEX messages_keywords ON messages (mailbox, keywords) WHERE keywords != '';
"""


# Version 3, for sync: flags documents whose mailbox this device does not have (yet:
# documents can arrive in any order from several devices).  They are indexed when
# their mailbox arrives.
_V3 = """
CREATE TABLE orphan_flags (
    flags_doc TEXT PRIMARY KEY,
    mailbox   TEXT NOT NULL
);
CREATE INDEX orphan_flags_by_mailbox ON orphan_flags (mailbox);
"""


# Version 5: where the store's read cache holds a copy of each message's bytes
# (leapmail.mail.bodycache).  Contents from now on are copied as they are indexed;
# those already here, up to body_cache_fill_end, by bodycache.fill in the background.
_V5 = """
CREATE TABLE body_cache (
    content_row INTEGER PRIMARY KEY,   -- contents.rowid
    pos         INTEGER NOT NULL,      -- where the record starts in the cache file
    len         INTEGER NOT NULL       -- and its length
);
INSERT OR REPLACE INTO mail_state (key, value)
    SELECT 'body_cache_fill_end', coalesce(max(rowid), 0) FROM contents;
"""


# Version 6: each mailbox's keywords in the order they first appeared there, with the
# spelling they first had: how FLAGS lists them, as Dovecot does (its per-mailbox
# keyword list).  Never shrinks while the mailbox lives, as Dovecot's does not.
_V6 = """
CREATE TABLE mailbox_keywords (
    mailbox  TEXT NOT NULL,
    folded   TEXT NOT NULL,      -- lower case: keywords compare case-insensitively
    name     TEXT NOT NULL,      -- the spelling first seen in this mailbox
    position INTEGER NOT NULL,   -- the order of first appearance, the listing order
    PRIMARY KEY (mailbox, folded)
);
"""


def _v6_mailbox_keywords(conn):
    conn.execute(_V6)
    known = {}
    for mailbox, words in conn.execute(
            "SELECT mailbox, keywords FROM messages WHERE keywords != '' ORDER BY mailbox, uid"
    ).fetchall():
        registry = known.setdefault(mailbox, {})
        for word in words.split(" "):
            if word and word.lower() not in registry:
                registry[word.lower()] = word
                conn.execute("INSERT INTO mailbox_keywords (mailbox, folded, name, position) "
                             "VALUES (?, ?, ?, ?)", (mailbox, word.lower(), word, len(registry)))


def keyword_registry(queries, mailbox):
    """``{folded: (position, name)}``: the keywords ``mailbox`` has known."""
    return {folded: (position, name) for folded, name, position in queries.execute(
        "SELECT folded, name, position FROM mailbox_keywords WHERE mailbox = ?", (mailbox,))}


def listed_keywords(registry, keywords):
    """``keywords`` (an iterable of words) as FLAGS lists them: in the mailbox's order,
    spelled as the mailbox first had them."""
    found = []
    for word in keywords:
        entry = registry.get(word.lower())
        found.append(entry if entry is not None else (len(registry) + len(found), word))
    return [name for _position, name in sorted(found)]


def _register_keywords(txn, mailbox, keywords):
    """Add to the mailbox's keywords the ones new to it; returns the registry and
    whether it grew (then the mailbox's FLAGS are told again)."""
    registry = keyword_registry(txn, mailbox)
    grew = False
    for word in keywords:
        folded = word.lower()
        if folded not in registry:
            registry[folded] = (len(registry) + 1, word)
            txn.execute("INSERT INTO mailbox_keywords (mailbox, folded, name, position) "
                        "VALUES (?, ?, ?, ?)", (mailbox, folded, word, len(registry)))
            grew = True
    if grew:
        txn.emit(KeywordsDefined(mailbox, tuple(
            name for _position, name in sorted(registry.values()))))
    return registry


def local_day(timestamp, tz_minutes):
    """The calendar day of ``timestamp`` in its own zone, as a proleptic ordinal.

    RFC 3501 compares dates "disregarding time and timezone": the day as written.
    """
    zone = datetime.timezone(datetime.timedelta(minutes=tz_minutes))
    try:
        return datetime.datetime.fromtimestamp(timestamp, zone).date().toordinal()
    except (OverflowError, OSError, ValueError):
        return 0


def _state(txn, key, default):
    row = txn.execute("SELECT value FROM mail_state WHERE key = ?", (key,)).fetchone()
    return default if row is None else row[0]


def _set_state(txn, key, value):
    txn.execute(
        "INSERT INTO mail_state (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def _next_uidvalidity(txn):
    # Seeded from the clock so that a device re-created from scratch (same mailbox
    # names, empty tables) still hands out values clients have not seen; then +1.
    current = _state(txn, "last_uidvalidity", 0)
    value = max(current + 1, int(time.time()) & 0xFFFFFFFF)
    if value > 0xFFFFFFFF:
        value = 1
    _set_state(txn, "last_uidvalidity", value)
    return value


def index_mailbox(txn, old, new):
    if new.deleted:
        txn.execute("DELETE FROM mailboxes WHERE doc_id = ?", (new.id,))
        txn.execute("DELETE FROM mailbox_keywords WHERE mailbox = ?", (new.id,))
        txn.emit(MailboxChanged(new.id, None))
        return
    data = codec.loads(new.content)
    name = _free_name(txn, new.id, data["name"])
    known = txn.execute("SELECT 1 FROM mailboxes WHERE doc_id = ?", (new.id,)).fetchone()
    if not known:
        txn.execute(
            "INSERT INTO mailboxes (doc_id, name, role, uidvalidity, uidnext, highestmodseq, "
            "recent_floor) VALUES (?, ?, ?, ?, 1, 0, 1)",
            (new.id, name, data.get("role"), _next_uidvalidity(txn)),
        )
    else:
        txn.execute(
            "UPDATE mailboxes SET name = ?, role = ? WHERE doc_id = ?",
            (name, data.get("role"), new.id),
        )
    txn.emit(MailboxChanged(new.id, name))
    if not known:
        waiting = txn.execute(
            "SELECT flags_doc FROM orphan_flags WHERE mailbox = ?", (new.id,)).fetchall()
        for (flags_doc,) in waiting:
            txn.execute("DELETE FROM orphan_flags WHERE flags_doc = ?", (flags_doc,))
            doc = txn.get(flags_doc)
            if doc is not None:
                index_flags(txn, None, doc)


def _free_name(txn, doc_id, name):
    """The name a mailbox document is listed under here.

    Two mailboxes can claim one name when devices rename or create apart.  The one
    with the smaller id keeps it, whatever the order they arrived in, so every device
    shows the same; the other is listed with a suffix from its id until renamed.
    """
    row = txn.execute("SELECT doc_id FROM mailboxes WHERE name = ?", (name,)).fetchone()
    if row is None or row[0] == doc_id:
        return name
    other = row[0]
    if other < doc_id:
        return f"{name}-{doc_id[-6:]}"
    displaced = f"{name}-{other[-6:]}"
    txn.execute("UPDATE mailboxes SET name = ? WHERE doc_id = ?", (displaced, other))
    txn.emit(MailboxChanged(other, displaced))
    return name


# UPDATE ... RETURNING costs some 200 µs a statement here once the transaction is
# large (measured: 10,000 flag changes took 11 s with it, 0.7 s without), so counters
# are bumped with a plain UPDATE and read back.
def _bump_modseq(txn, mailbox):
    txn.execute(
        "UPDATE mailboxes SET highestmodseq = highestmodseq + 1 WHERE doc_id = ?", (mailbox,))
    row = txn.execute(
        "SELECT highestmodseq FROM mailboxes WHERE doc_id = ?", (mailbox,)).fetchone()
    return row[0] if row else None


def index_flags(txn, old, new):
    if new.deleted:
        txn.execute("DELETE FROM orphan_flags WHERE flags_doc = ?", (new.id,))
        row = txn.execute(
            "SELECT mailbox, uid FROM messages WHERE flags_doc = ?", (new.id,)).fetchone()
        if row is not None:
            mailbox, uid = row
            txn.execute("DELETE FROM messages WHERE flags_doc = ?", (new.id,))
            modseq = _bump_modseq(txn, mailbox)
            if modseq is not None:
                txn.execute(
                    "INSERT OR REPLACE INTO expunged (mailbox, uid, modseq) VALUES (?, ?, ?)",
                    (mailbox, uid, modseq),
                )
                txn.emit(Expunged(mailbox, uid, modseq))
        return
    data = codec.loads(new.content)
    sysflags, keywords = split_flags(data["flags"])
    existing = txn.execute(
        "SELECT mailbox, uid, sysflags, keywords FROM messages WHERE flags_doc = ?", (new.id,)
    ).fetchone()
    if existing is None:
        mailbox = data["mailbox"]
        txn.execute(
            "UPDATE mailboxes SET uidnext = uidnext + 1, highestmodseq = highestmodseq + 1 "
            "WHERE doc_id = ?", (mailbox,))
        row = txn.execute(
            "SELECT uidnext - 1, highestmodseq FROM mailboxes WHERE doc_id = ?", (mailbox,)
        ).fetchone()
        if row is None:
            txn.execute(
                "INSERT OR REPLACE INTO orphan_flags (flags_doc, mailbox) VALUES (?, ?)",
                (new.id, mailbox))
            return
        uid, modseq = row
        content = txn.execute(
            "SELECT size, rowid FROM contents WHERE doc_id = ?", (data["message"],)
        ).fetchone() or (0, None)
        txn.execute(
            "INSERT INTO messages (flags_doc, mailbox, uid, content, content_row, modseq, "
            "internal_date, internal_day, size, sysflags, keywords, tz) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (new.id, mailbox, uid, data["message"], content[1], modseq, data["date"],
             local_day(data["date"], data.get("tz", 0)), content[0], sysflags,
             " ".join(keywords), data.get("tz", 0)),
        )
        if keywords:
            _register_keywords(txn, mailbox, keywords)
        txn.emit(MessageAdded(mailbox, uid, modseq))
        return
    mailbox, uid, old_sysflags, old_keywords = existing
    if (sysflags, " ".join(keywords)) == (old_sysflags, old_keywords):
        return
    modseq = _bump_modseq(txn, mailbox)
    txn.execute(
        "UPDATE messages SET sysflags = ?, keywords = ?, modseq = ? WHERE flags_doc = ?",
        (sysflags, " ".join(keywords), modseq, new.id),
    )
    if keywords:
        keywords = listed_keywords(_register_keywords(txn, mailbox, keywords), keywords)
    txn.emit(FlagsChanged(mailbox, uid, tuple(join_flags(sysflags, keywords)), modseq))


def index_message(txn, old, new):
    from leapmail.mail import bodycache

    if new.deleted:
        row = txn.execute("SELECT rowid FROM contents WHERE doc_id = ?", (new.id,)).fetchone()
        if row is not None:
            txn.execute("DELETE FROM contents WHERE rowid = ?", row)
            txn.execute("DELETE FROM header_fields WHERE content = ?", row)
            txn.execute("DELETE FROM text_index WHERE rowid = ?", row)
            txn.execute("DELETE FROM text_pending WHERE content_row = ?", row)
            bodycache.forget_content(txn, row[0])
        txn.execute("DELETE FROM content_parts WHERE content = ?", (new.id,))
        return
    if old is not None:
        return  # content documents are immutable
    data = codec.loads(new.content)
    rowid = txn.execute(
        "INSERT INTO contents (doc_id, size, sent_date, sent_day) VALUES (?, ?, ?, ?)",
        (new.id, data["size"], data.get("sent_date"), data.get("sent_day")),
    ).lastrowid
    # Messages whose flags document arrived first (possible with sync) learn their
    # content now.
    txn.execute(
        "UPDATE messages SET content_row = ?, size = ? WHERE content = ? AND content_row IS NULL",
        (rowid, data["size"], new.id),
    )
    content = _index_header(txn, new.id, rowid, data)
    txn.execute("INSERT INTO text_pending (content_row) VALUES (?)", (rowid,))
    txn.emit(ContentAdded(new.id))
    txn.conn.executemany(
        "INSERT OR IGNORE INTO content_parts (content, part) VALUES (?, ?)",
        [(new.id, part) for part in set(data["parts"])],
    )
    bodycache.cache_content(txn, rowid, content)


def _index_header(txn, doc_id, rowid, data):
    """Decoded header fields for SEARCH HEADER/FROM/SUBJECT..., written with the message.

    Only the header is read back (it lies in the skeleton, no part is touched).  The
    full text is indexed later, in batches (:mod:`leapmail.mail.textindex`).
    """
    from leapmail.mail.message import Content, read_range

    content = Content(doc_id, data)
    root = content.tree
    header = read_range(txn, content, root.start, root.body_start)
    txn.conn.executemany(
        "INSERT INTO header_fields (content, name, value) VALUES (?, ?, ?)",
        header_rows(rowid, header, root.header_end - root.start),
    )
    txn.execute("UPDATE contents SET header = ? WHERE rowid = ?", (header, rowid))
    return content


#: Fields whose value is an address list.  SEARCH FROM, TO, CC and BCC look for their
#: string "in the envelope structure's" field (RFC 3501 6.4.4), so these get a second
#: row: the addresses as the envelope has them, without the comments and odd spacing
#: the header may put between the parts of an address.
ADDRESS_FIELDS = frozenset({"from", "sender", "reply-to", "to", "cc", "bcc"})


def header_rows(rowid, header, header_end):
    """The ``header_fields`` rows of one content: ``(rowid, name, value)``."""
    from leapmail.mail import mime

    rows = []
    for name, value in mime.header_fields(header, 0, header_end):
        name = name.decode("latin-1").lower()
        decoded = mime.decode_header_value(value).casefold()
        rows.append((rowid, name, decoded))
        if name in ADDRESS_FIELDS:
            addresses = _other_address_text(value, decoded)
            if addresses is not None:
                rows.append((rowid, name, addresses))
    return rows


# An address list whose text already is what the envelope makes of it: plain
# ``local@domain`` items, each bare or as ``Display Name <local@domain>``.  Anything
# else (a comment, a quoted part, a fold, blanks around "@", a group, a missing
# domain or mailbox, a broken bracket) is parsed, so that the search sees the
# envelope's version of it, MISSING_MAILBOX/MISSING_DOMAIN/SYNTAX_ERROR included, as
# Dovecot's does; parsing every clean one too would only cost time.
_ATOMS = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_PLAIN_ADDRESS = _ATOMS + rb"@" + _ATOMS
_CLEAN_ITEM = (rb"[ \t]*(?:" + _PLAIN_ADDRESS + rb"|(?:[^<>,@\"()\\;:\r\n]*?[ \t]*)?<"
               + _PLAIN_ADDRESS + rb">)[ \t]*")
_CLEAN_ADDRESSES = re.compile(_CLEAN_ITEM + rb"(?:," + _CLEAN_ITEM + rb")*")


def _other_address_text(value, decoded):
    """:func:`addresses_text` of ``value`` where it says more than ``decoded`` does."""
    if _CLEAN_ADDRESSES.fullmatch(value):
        return None
    addresses = addresses_text(value)
    return addresses if addresses is not None and addresses != decoded else None


def addresses_text(value):
    """An address-list value as the envelope sees it, case-folded for search:
    ``name <mailbox@host>, ...`` (names decoded), groups as ``group: ...;``."""
    from leapmail.mail import mime
    from leapmail.mail.envelope import parse_addresses

    parsed = parse_addresses(value)
    if not parsed:
        return None

    def text(part):
        return "" if part is None else mime.decode_header_value(part)

    out = []
    separator = ""
    for name, _route, mailbox, host in parsed:
        if mailbox is None and host is None:                # end of a group
            out.append(";")
            separator = ", "
            continue
        out.append(separator)
        if host is None:                                    # start of a group
            out.append(text(mailbox) + ":")
            separator = " "
            continue
        address = text(mailbox) + "@" + text(host)
        out.append(f"{text(name)} <{address}>" if name else address)
        separator = ", "
    return "".join(out).casefold()


def _v4_address_rows(conn):
    """Version 4: the envelope-address rows for contents indexed before them.

    Contents from before version 2 have no stored header block; their SEARCH FROM
    keeps matching the header text only.
    """
    from leapmail.mail import mime

    cursor = conn.execute("SELECT rowid, header FROM contents WHERE header IS NOT NULL")
    while True:
        batch = cursor.fetchmany(500)
        if not batch:
            break
        rows = []
        for rowid, header in batch:
            for name, value in mime.header_fields(bytes(header), 0, len(header)):
                name = name.decode("latin-1").lower()
                if name not in ADDRESS_FIELDS:
                    continue
                addresses = _other_address_text(
                    value, mime.decode_header_value(value).casefold())
                if addresses is not None:
                    rows.append((rowid, name, addresses))
        conn.executemany(
            "INSERT INTO header_fields (content, name, value) VALUES (?, ?, ?)", rows)


def index_subscription(txn, old, new):
    if new.deleted:
        if old is not None:
            txn.execute("DELETE FROM subscriptions WHERE name = ?", (codec.loads(old.content)["name"],))
        return
    txn.execute(
        "INSERT OR IGNORE INTO subscriptions (name) VALUES (?)", (codec.loads(new.content)["name"],)
    )


def contains_folded(haystack, needle):
    """SQL ``contains_folded(text, needle)``: a Unicode case-insensitive substring test,
    for needles the trigram index cannot serve (fewer than three characters)."""
    if haystack is None or needle is None:
        return 0
    return int(needle.lower() in haystack.lower())


def content_in_use(txn, doc_id):
    """A message content some message here refers to (see ``SchemaComponent.keepers``)."""
    return txn.execute("SELECT 1 FROM messages WHERE content = ? LIMIT 1",
                       (doc_id,)).fetchone() is not None


def part_in_use(txn, doc_id):
    """A part some content here is made of (rows exist while the content does)."""
    return txn.execute("SELECT 1 FROM content_parts WHERE part = ? LIMIT 1",
                       (doc_id,)).fetchone() is not None


def blob_in_use(txn, blob_id):
    """The blob of a part in use (a part's blob is named after it: ``blob-<part>``)."""
    return blob_id.startswith("blob-") and part_in_use(txn, blob_id[len("blob-"):])


from leapmail.mail.merge import MERGERS  # noqa: E402  (merge needs the kinds above)
from leapmail.store.documents import BLOB_KIND  # noqa: E402

MAIL = SchemaComponent(
    name="mail",
    migrations=(_V1, _V2, _V3, _v4_address_rows, _V5, _v6_mailbox_keywords),
    indexers={
        MAILBOX_KIND: index_mailbox,
        FLAGS_KIND: index_flags,
        MESSAGE_KIND: index_message,
        SUBSCRIPTION_KIND: index_subscription,
    },
    functions={"contains_folded": (2, contains_folded)},
    mergers=MERGERS,
    # Two devices apart: one expunges a message's last copy (and so its content)
    # while the other copies it. The content must outlive the expunge.
    keepers={MESSAGE_KIND: content_in_use, PART_KIND: part_in_use, BLOB_KIND: blob_in_use},
)
