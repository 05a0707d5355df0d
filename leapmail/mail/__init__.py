"""The protocol-agnostic mail core: messages, mailboxes, UIDs, flags, search, events."""
