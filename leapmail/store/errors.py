"""What can go wrong with a store, each with a message naming the file and what to do."""

from leapmail.errors import LeapmailError


class StoreError(LeapmailError):
    """A store problem; ``path`` names the database file."""

    def __init__(self, path, message):
        self.path = path
        super().__init__(message)


class StoreMissing(StoreError):
    def __init__(self, path):
        super().__init__(path, f"{path} does not exist; create the account with 'leapmail init'")


class NotAStore(StoreError):
    def __init__(self, path, why):
        super().__init__(
            path,
            f"{path} is not a leapmail store ({why}); it was left untouched. Point --home at "
            "the right directory, or move the file away to create a new account.",
        )


class StoreUnreadable(StoreError):
    """The file cannot be decrypted with this account's key: damaged, or someone else's."""

    def __init__(self, path):
        super().__init__(
            path,
            f"{path} cannot be decrypted with this account's key: it is damaged, belongs "
            "to another account, or is not a leapmail store at all. It was left untouched; "
            "check --home, or restore the file from a backup.",
        )


class StoreCorrupted(StoreError):
    def __init__(self, path, detail):
        super().__init__(
            path,
            f"{path} is damaged ({detail}). It was left untouched; restore it from a backup.",
        )


class StoreTooNew(StoreError):
    def __init__(self, path, component, found, known):
        super().__init__(
            path,
            f"{path} was written by a newer leapmail ({component} schema version {found}; "
            f"this release knows up to {known}). Upgrade leapmail to open it.",
        )


class StoreLocked(StoreError):
    def __init__(self, path, holder):
        who = f" (pid {holder})" if holder else ""
        super().__init__(
            path,
            f"{path} is in use by another running leapmail{who}. Stop that process first; "
            "only one daemon may open an account at a time.",
        )


class StoreIOError(StoreError):
    def __init__(self, path, detail):
        super().__init__(path, f"cannot write {path}: {detail}")


class StoreClosed(StoreError):
    def __init__(self, path):
        super().__init__(path, f"{path} has been closed")


class RevisionConflict(StoreError):
    """A write was based on a revision that is no longer current."""

    def __init__(self, path, doc_id, expected, actual):
        self.doc_id, self.expected, self.actual = doc_id, expected, actual
        super().__init__(
            path, f"document {doc_id} is at revision {actual}, not {expected} as expected"
        )


class KindMismatch(StoreError):
    def __init__(self, path, doc_id, stored, given):
        super().__init__(
            path, f"document {doc_id} is of kind {stored!r}; it cannot be rewritten as {given!r}"
        )


class BlobMissing(StoreError):
    def __init__(self, path, blob_id):
        self.blob_id = blob_id
        super().__init__(path, f"blob {blob_id} does not exist in {path}")


class BlobExists(StoreError):
    def __init__(self, path, blob_id):
        self.blob_id = blob_id
        super().__init__(path, f"blob {blob_id} already exists (or is being written) in {path}")
