"""Incoming mail on the daemon's side: claim sealed deliveries at the provider, open
them with the account's key pair, import them into INBOX (docs/incoming.rst)."""
