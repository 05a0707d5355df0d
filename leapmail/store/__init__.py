"""The encrypted document store (SQLCipher): documents, revisions, change log, blobs."""

from leapmail.store.blobs import CHUNK_SIZE, BlobInfo, BlobReader, BlobWriter
from leapmail.store.database import Database
from leapmail.store.documents import Document, Queries, Transaction
from leapmail.store.errors import (
    BlobExists,
    BlobMissing,
    KindMismatch,
    NotAStore,
    RevisionConflict,
    StoreClosed,
    StoreCorrupted,
    StoreError,
    StoreIOError,
    StoreLocked,
    StoreMissing,
    StoreTooNew,
    StoreUnreadable,
)
from leapmail.store.schema import SchemaComponent
from leapmail.store.store import Store

__all__ = [
    "CHUNK_SIZE",
    "BlobInfo",
    "BlobExists",
    "BlobMissing",
    "BlobReader",
    "BlobWriter",
    "Database",
    "Document",
    "KindMismatch",
    "NotAStore",
    "Queries",
    "RevisionConflict",
    "SchemaComponent",
    "Store",
    "StoreClosed",
    "StoreCorrupted",
    "StoreError",
    "StoreIOError",
    "StoreLocked",
    "StoreMissing",
    "StoreTooNew",
    "StoreUnreadable",
    "Transaction",
]
