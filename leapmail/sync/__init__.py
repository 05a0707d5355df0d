"""Replication of the store with the provider: protocol client, merge, loop."""
