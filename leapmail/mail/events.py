"""What the mail core tells listeners: committed changes, whoever made them."""

from dataclasses import dataclass


@dataclass(frozen=True)
class MessageAdded:
    mailbox: str
    uid: int
    modseq: int


@dataclass(frozen=True)
class FlagsChanged:
    mailbox: str
    uid: int
    flags: tuple
    modseq: int


@dataclass(frozen=True)
class Expunged:
    mailbox: str
    uid: int
    modseq: int


@dataclass(frozen=True)
class ContentAdded:
    """A message content document arrived (its text still to be indexed)."""

    content: str


@dataclass(frozen=True)
class MailboxChanged:
    """A mailbox was created, renamed (``name`` is the new one) or deleted (``None``)."""

    mailbox: str
    name: str


@dataclass(frozen=True)
class KeywordsDefined:
    """A mailbox's keywords grew: ``keywords`` are all of them, in listing order."""

    mailbox: str
    keywords: tuple
