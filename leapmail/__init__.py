"""leapmail: a local IMAP/SMTP daemon over an end-to-end encrypted document store."""

__version__ = "0.1.0"
