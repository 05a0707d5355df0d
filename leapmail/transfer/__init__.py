"""Moving mail in and out: mbox, Maildir and .eml files, and legacy IMAP accounts."""
