"""What a device remembers about its exchange with the provider (in the encrypted store).

``sync_docs`` has one row per document the provider holds (or is about to hold):

- ``remote_rev``: the highest revision of it this device has seen at the provider.  A
  revision below it is a replay and is refused; the same one is this device's own
  push echoed back by the change feed.
- ``synced_gen``: the store generation at which the local document was last equal to
  that remote revision.  A document whose generation is higher has local changes to
  push.

``sync_state`` holds the positions (``pull_seq``: the provider's change sequence
number seen; ``push_gen``: the store generation up to which every change has been
considered for pushing) and the device's credentials with the provider.  They live
in the store, which is encrypted at rest, and never in a plain file.
"""

from leapmail.store import SchemaComponent

_V1 = """
CREATE TABLE sync_docs (
    wire_id    TEXT PRIMARY KEY,
    doc_id     TEXT NOT NULL,
    kind       TEXT NOT NULL,
    remote_rev INTEGER NOT NULL,
    synced_gen INTEGER NOT NULL
);
CREATE INDEX sync_docs_by_doc ON sync_docs (doc_id);
CREATE TABLE sync_state (
    key   TEXT PRIMARY KEY,
    value
);
"""

SYNC = SchemaComponent(name="sync", migrations=(_V1,))


def get_state(queries, key, default=None):
    row = queries.execute("SELECT value FROM sync_state WHERE key = ?", (key,)).fetchone()
    return default if row is None else row[0]


def set_state(txn, key, value):
    if value is None:
        txn.execute("DELETE FROM sync_state WHERE key = ?", (key,))
        return
    txn.execute(
        "INSERT INTO sync_state (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def all_state(queries):
    return dict(queries.execute("SELECT key, value FROM sync_state").fetchall())
