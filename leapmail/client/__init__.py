"""An IMAP client on Twisted's IMAP4Client, with IDLE (RFC 2177) and UIDPLUS results."""
