"""The ``leapmail`` command.

Every failure a user can cause ends in one line on stderr and a non-zero exit status,
never a traceback.
"""

import argparse
import sys

from leapmail.errors import LeapmailError, run_command
from leapmail.home import Home, default_home
from leapmail.passphrase import NEW_ENV, read_passphrase


def _init(args):
    home = Home(args.home)
    if args.provider is None:
        if args.enroll or args.provider_ca:
            raise LeapmailError("--enroll and --provider-ca need --provider URL")
        passphrase = read_passphrase("New passphrase: ", confirm=True)
        home.create(passphrase, args.address)
        print(f"created the account {args.address} in {home.path}")
        return
    from leapmail import enrollment

    ca_pem = enrollment.read_ca(args.provider_ca)
    if args.enroll:
        passphrase = read_passphrase("New passphrase: ", confirm=True)
        _run(lambda reactor: enrollment.enroll(
            home, passphrase, args.address, args.provider, ca_pem, args.enroll, reactor))
        print(f"created the account {args.address} in {home.path} and enrolled it "
              f"at {args.provider}")
    else:
        passphrase = read_passphrase("Passphrase: ")
        _run(lambda reactor: enrollment.join(
            home, passphrase, args.address, args.provider, ca_pem, reactor))
        print(f"joined the account {args.address} from {args.provider} in {home.path}; "
              "the daemon fetches its mail")


def _run(make):
    """Run the coroutine ``make(reactor)`` on the reactor; return or raise its result."""
    from twisted.internet import defer, reactor
    from twisted.python.failure import Failure

    outcome = []

    def start():
        d = defer.ensureDeferred(make(reactor))
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    if not outcome:
        raise KeyboardInterrupt
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def _status(args):
    import json
    import os

    from leapmail.store.database import lock_holder
    from leapmail.sync.service import STATUS_NAME

    home = Home(args.home)
    address = home.address()
    provider = home.provider()
    print(f"account:   {address}")
    if provider is None:
        print("provider:  none (this account is local to this machine)")
        return
    print(f"provider:  {provider[0]}")
    holder = lock_holder(home.store_path)
    if holder is None:
        print("daemon:    not running (sync waits for it)")
    else:
        print(f"daemon:    running{f' (pid {holder})' if holder else ''}")
    _outbox_status(home)
    path = os.path.join(home.path, STATUS_NAME)
    try:
        with open(path, "rb") as f:
            status = json.load(f)
    except FileNotFoundError:
        print("sync:      never ran (start the daemon)")
        return
    except ValueError:
        raise LeapmailError(f"{path} is damaged; the daemon rewrites it when it runs") from None
    print(f"sync:      {status.get('state')} (as of {status.get('written')})")
    print(f"last pull: {status.get('last_pull') or 'never'}")
    print(f"last push: {status.get('last_push') or 'never'}")
    print(f"pending:   {status.get('pending', '?')} local changes to push")
    if status.get("error"):
        print(f"error:     {status['error']} (since {status.get('error_since')})")
    incoming = status.get("incoming")
    if isinstance(incoming, dict):
        print(f"incoming:  {incoming.get('imported', 0)} imported, "
              f"{incoming.get('failing', 0)} failing to open (retried with backoff), "
              f"{incoming.get('notices', 0)} replaced by a notice in INBOX")
        if incoming.get("last_failure"):
            print(f"           last failure: {incoming['last_failure']}")


def _outbox_status(home):
    """The relay's last word on the outbox (written by leapmail.smtp.relay)."""
    import json
    import os
    import time

    from leapmail.smtp.relay import STATUS_NAME

    try:
        with open(os.path.join(home.path, STATUS_NAME), "rb") as f:
            status = json.load(f)
    except (FileNotFoundError, ValueError):
        print("outbox:    nothing relayed yet")
        return
    line = f"outbox:    {status.get('queued', '?')} queued (as of {status.get('written')})"
    if status.get("oldest"):
        oldest = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(status["oldest"]))
        line += f", oldest from {oldest}"
    print(line)
    error = status.get("relay_error") or status.get("last_error")
    if error:
        print(f"relay:     {error}")


def _passwd(args):
    home = Home(args.home)
    old = read_passphrase("Current passphrase: ")
    new = read_passphrase("New passphrase: ", env=NEW_ENV, confirm=True)
    if home.provider() is None:
        home.change_passphrase(old, new)
        print(f"passphrase changed for {home.path}")
        return
    from leapmail import enrollment

    home.unlock(old)  # a wrong passphrase is told before anything goes to the provider
    _run(lambda reactor: enrollment.change_passphrase(home, old, new, reactor))
    print(f"passphrase changed for {home.path} and at its provider; restart the daemon "
          "so that it logs in with the new one")


def _check(args):
    home = Home(args.home)
    bundle = home.unlock(read_passphrase())
    # Look without touching: no migration, no sweep, before the file is known sound.
    database = home.open_database(bundle, upgrade=False)
    try:
        problems = database.verify()
    finally:
        database.close()
    if problems:
        for problem in problems[:20]:
            print(f"{database.path}: {problem}", file=sys.stderr)
        raise LeapmailError(
            f"{database.path} is damaged ({len(problems)} problems); restore it from a backup"
        )
    print(f"{database.path}: ok")


def _credentials(args):
    home = Home(args.home)
    bundle = home.unlock(read_passphrase())
    address = home.address()
    # The one place a secret is printed: the user asked for it, to type into a client.
    print(f"username: {address}")
    print(f"password: {bundle.client_password}")


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    # Accepted before or after the command: 'leapmail --home D init' and 'leapmail init --home D'.
    common.add_argument("--home", default=argparse.SUPPRESS,
                        help="account directory (default: $LEAPMAIL_HOME, else "
                        "$XDG_DATA_HOME/leapmail, else ~/.local/share/leapmail)")
    parser = argparse.ArgumentParser(
        prog="leapmail", parents=[common],
        description="Local IMAP/SMTP over an end-to-end encrypted store. The passphrase "
        "is read from $LEAPMAIL_PASSPHRASE, else asked for on the terminal.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("init", parents=[common], help="create an account")
    p.add_argument("--address", required=True, help="the account's mail address")
    p.add_argument("--provider", metavar="URL",
                   help="the provider to sync with (https://HOST:PORT); without --enroll, "
                   "join an account that exists there")
    p.add_argument("--provider-ca", metavar="FILE",
                   help="the provider's certificate (PEM) to trust, e.g. its self-signed one")
    p.add_argument("--enroll", metavar="CODE",
                   help="claim a new account at the provider with its enrollment code")
    p.set_defaults(run=_init)
    p = commands.add_parser("status", parents=[common],
                            help="show the account's sync state")
    p.set_defaults(run=_status)
    p = commands.add_parser("passwd", parents=[common],
                            help=f"change the passphrase (new one from ${NEW_ENV} or a prompt)")
    p.set_defaults(run=_passwd)
    p = commands.add_parser("check", parents=[common],
                            help="verify every page of the store (reads the whole file)")
    p.set_defaults(run=_check)
    p = commands.add_parser("credentials", parents=[common],
                            help="print the username and password for local IMAP/SMTP clients")
    p.set_defaults(run=_credentials)
    from leapmail.transfer.commands import add_commands

    add_commands(commands, common)  # import, export, fetch
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "home"):
        args.home = default_home()
    return run_command("leapmail", lambda: args.run(args))

if __name__ == "__main__":
    sys.exit(main())
