"""The root of leapmail's own exceptions.

Every error a user can cause or meet (wrong passphrase, damaged file, locked database)
is a :class:`LeapmailError` whose ``str()`` is a complete sentence fit to print as it is:
the CLI and the daemon show it without a traceback.
"""


class LeapmailError(Exception):
    """An error with a message meant for the user."""
