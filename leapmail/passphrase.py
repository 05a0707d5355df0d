"""Where a passphrase comes from: the environment for scripts, else the terminal."""

import getpass
import os
import sys

from leapmail.errors import LeapmailError

ENV = "LEAPMAIL_PASSPHRASE"
NEW_ENV = "LEAPMAIL_NEW_PASSPHRASE"


class NoPassphrase(LeapmailError):
    pass


def read_passphrase(prompt="Passphrase: ", env=ENV, confirm=False):
    value = os.environ.get(env)
    if value is not None:
        if not value:
            raise NoPassphrase(f"{env} is set but empty")
        return value
    if not sys.stdin.isatty():
        raise NoPassphrase(f"no passphrase: set {env} or run from a terminal")
    value = getpass.getpass(prompt)
    if not value:
        raise NoPassphrase("the passphrase must not be empty")
    if confirm and getpass.getpass("Repeat it: ") != value:
        raise NoPassphrase("the two passphrases differ")
    return value
