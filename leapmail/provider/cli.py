"""The ``leapmail-provider`` command: the provider's administration.

::

    leapmail-provider --home DIR [--database URL] adduser ADDRESS

``adduser`` creates an account waiting to be claimed and prints its one-time
enrollment code as the last line of its output: the user gives it to
``leapmail init``, which enrolls the first device.  The code is good for 7 days and
only its hash is stored.

Every failure ends in one line on stderr and a non-zero exit status.
"""

import argparse
import os
import sys
import time

from leapmail.errors import LeapmailError, run_command

HOME_ENV = "LEAPMAIL_PROVIDER_HOME"


def _adduser(args):
    from leapmail.provider.api import (
        CODE_LIFETIME, ApiError, code_hash, new_enrollment_code, normalize_address,
    )
    from leapmail.provider.service import prepare_home
    from leapmail.provider.storage import open_storage

    try:
        address = normalize_address(args.address)
    except ApiError as e:
        raise LeapmailError(f"{args.address!r}: {e.message.split(': ', 1)[-1]}") from None
    home = prepare_home(args.home)
    storage = open_storage(home, args.database)
    try:
        code = new_enrollment_code()
        now = int(time.time())
        storage.create_user(address, code_hash(code), now + CODE_LIFETIME, now)
    finally:
        storage.close()
    days = CODE_LIFETIME // 86400
    print(f"created the account {address}; it waits for its first device.")
    print(f"Give the user this one-time enrollment code (good for {days} days):")
    print(code)


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    # Accepted before or after the command, like leapmail's own.
    common.add_argument("--home", default=argparse.SUPPRESS,
                        help=f"the provider's directory (default: ${HOME_ENV})")
    common.add_argument("--database", default=argparse.SUPPRESS,
                        help="postgresql://USER:PASSWORD@HOST[:PORT]/DB "
                        "(default: SQLite in HOME/provider.db)")
    parser = argparse.ArgumentParser(
        prog="leapmail-provider", parents=[common],
        description="Administer a leapmail provider (serve it with "
        "'twistd leapmail-provider').",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("adduser", parents=[common],
                            help="create an account and print its enrollment code")
    p.add_argument("address", help="the account's mail address")
    p.set_defaults(run=_adduser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "home"):
        args.home = os.environ.get(HOME_ENV)
        if not args.home:
            parser.error(f"--home DIR is required (or ${HOME_ENV})")
    if not hasattr(args, "database"):
        args.database = None
    return run_command("leapmail-provider", lambda: args.run(args))

if __name__ == "__main__":
    sys.exit(main())
