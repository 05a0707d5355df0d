"""The IMAP4rev1 server: protocol, commands, and the serialization of mail data."""
