"""Errors of the mail core: each a sentence a protocol layer can pass on as it is."""

from leapmail.errors import LeapmailError


class MailError(LeapmailError):
    pass


class InvalidMailboxName(MailError):
    def __init__(self, name, why):
        self.name = name
        super().__init__(f"invalid mailbox name {name!r}: {why}")


class NoSuchMailbox(MailError):
    def __init__(self, name):
        self.name = name
        super().__init__(f"mailbox {name!r} does not exist")


class MailboxExists(MailError):
    def __init__(self, name):
        self.name = name
        super().__init__(f"mailbox {name!r} already exists")


class CannotDeleteInbox(MailError):
    def __init__(self):
        super().__init__("INBOX cannot be deleted")
