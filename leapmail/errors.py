"""The root of leapmail's own exceptions.

Every error a user can cause or meet (wrong passphrase, damaged file, locked database)
is a :class:`LeapmailError` whose ``str()`` is a complete sentence fit to print as it is:
the CLI and the daemon show it without a traceback.
"""


class LeapmailError(Exception):
    """An error with a message meant for the user."""


def run_command(program, action):
    """Run ``action()`` for a command-line tool; return its exit status.

    A :class:`LeapmailError` (or an OS error, such as a directory that cannot be
    written) is one line on stderr and status 1; Ctrl-C is status 130.
    """
    import sys

    try:
        action()
    except LeapmailError as e:
        print(f"{program}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{program}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return 130
    return 0
