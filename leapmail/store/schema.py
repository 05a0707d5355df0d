"""Versioned schema migrations, per component.

Each layer that keeps tables in the store (the store core here, the mail core later)
is a :class:`SchemaComponent` with an append-only list of migrations: ``migrations[i]``
takes that component from version ``i`` to ``i + 1``.  Versions live in the ``meta``
table (``schema.<component>``).  Every step runs in its own transaction together with
its version bump, so a crash mid-upgrade leaves a consistent, resumable file.  A file
whose version is higher than the code knows is refused, never "upgraded" downwards.

A component may also register *indexers*: callables ``(txn, old, new)`` run inside the
writing transaction whenever a document of a given kind is written or deleted, so that
typed, indexed tables stay exactly in step with the documents sync replicates.
"""

from dataclasses import dataclass, field

import sqlcipher3

from leapmail.store.database import check_not_newer


@dataclass(frozen=True)
class SchemaComponent:
    name: str
    migrations: tuple
    indexers: dict = field(default_factory=dict)
    #: SQL functions every connection gets: ``{name: (number_of_arguments, callable)}``.
    functions: dict = field(default_factory=dict)
    #: How sync merges a document of a kind changed both here and elsewhere:
    #: ``{kind: merger(txn, local, remote) -> Document}`` (see leapmail.sync).
    mergers: dict = field(default_factory=dict)
    #: Which documents another device deleted are to be kept here because something
    #: here still uses them: ``{kind: in_use(txn, doc_id) -> bool}`` (see leapmail.sync).
    keepers: dict = field(default_factory=dict)

    @property
    def version(self):
        return len(self.migrations)

    def bootstrap(self, conn):
        """Bring a brand-new file to this component's current version (within a txn)."""
        for step in self.migrations:
            _apply(conn, step)
        _set_version(conn, self.name, self.version)


def _apply(conn, step):
    if callable(step):
        step(conn)
    else:
        # executescript() would commit the enclosing transaction; split it ourselves.
        statement = ""
        for line in step.splitlines(keepends=True):
            statement += line
            if sqlcipher3.complete_statement(statement):
                conn.execute(statement)
                statement = ""
        if statement.strip():
            raise ValueError(f"incomplete SQL statement in migration: {statement!r}")


def _set_version(conn, name, version):
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (f"schema.{name}", version),
    )


_CORE_V1 = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value
);
INSERT INTO meta (key, value) VALUES ('generation', 0);

-- Every document, live or tombstone.  gen is the generation of its latest write:
-- "what changed since G" is an index range scan, which is what sync replicates.
CREATE TABLE documents (
    id      TEXT NOT NULL UNIQUE,
    kind    TEXT NOT NULL,
    rev     INTEGER NOT NULL,
    gen     INTEGER NOT NULL UNIQUE,
    deleted INTEGER NOT NULL DEFAULT 0,
    content BLOB
);

-- Large byte strings in fixed-size chunks (the last may be shorter), so both writing
-- and reading hold one chunk at a time.  A blob becomes visible when its 'blob'
-- document is written; chunks of a blob still being written are listed in
-- pending_blobs and swept on open if the writer never finished.
CREATE TABLE blob_chunks (
    blob_id TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    data    BLOB NOT NULL,
    PRIMARY KEY (blob_id, seq)
);
CREATE TABLE pending_blobs (
    blob_id TEXT PRIMARY KEY
);
"""

CORE = SchemaComponent(name="store", migrations=(_CORE_V1,))


def stored_versions(conn):
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if not has_meta:
        return {}
    return {
        key[len("schema."):]: int(value)
        for key, value in conn.execute("SELECT key, value FROM meta WHERE key LIKE 'schema.%'")
    }


def check_versions(db, conn):
    """Refuse a file without our schema, or with a component newer than this code."""
    stored = stored_versions(conn)
    if "store" not in stored:
        from leapmail.store.errors import NotAStore

        raise NotAStore(db.path, "it has no leapmail schema")
    check_not_newer(db.path, stored, db.components)


def upgrade(db, conn):
    """Apply pending migrations, one transaction per step; sweep unfinished blobs."""
    stored = stored_versions(conn)
    for component in db.components:
        current = stored.get(component.name, 0)
        for version in range(current, component.version):
            conn.execute("BEGIN IMMEDIATE")
            try:
                _apply(conn, component.migrations[version])
                _set_version(conn, component.name, version + 1)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
    # Only when there are some: an empty DELETE still rewrites the table's root page,
    # and a plain open must not write.
    if conn.execute("SELECT 1 FROM pending_blobs LIMIT 1").fetchone():
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "DELETE FROM blob_chunks WHERE blob_id IN (SELECT blob_id FROM pending_blobs)"
        )
        conn.execute("DELETE FROM pending_blobs")
        conn.execute("COMMIT")
