"""``leapmail import``, ``leapmail export`` and ``leapmail fetch``.

Exit status: 0 when everything was copied; 1 when something was not (a problem with
one message, reported on stderr: what could be copied is in, and a re-run resumes) or
when the command could not run at all (wrong passphrase, the daemon holds the store,
unreachable server, wrong password); 130 when interrupted.
"""

import getpass
import os
import sys
from urllib.parse import unquote, urlsplit

from leapmail.errors import LeapmailError
from leapmail.transfer import formats

PASSWORD_ENV = "LEAPMAIL_FETCH_PASSWORD"


class Incomplete(LeapmailError):
    pass


def add_commands(commands, common):
    p = commands.add_parser("import", parents=[common],
                            help="import an mbox file, a Maildir or a folder of .eml files")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--format", choices=formats.FORMATS,
                   help="the input's format (default: a directory with cur/ or new/ is a "
                   "Maildir, another directory a folder of .eml files, a file an mboxrd)")
    p.add_argument("--mailbox", default="INBOX",
                   help="where the messages go (default INBOX); sub-folders become "
                   "mailboxes below it (below INBOX: top-level mailboxes)")
    p.set_defaults(run=run_import)
    p = commands.add_parser("export", parents=[common],
                            help="export mailboxes to mbox, Maildir or .eml files")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--format", choices=formats.FORMATS,
                   help="the output's format (mbox means mboxrd; default: eml, or mbox "
                   "for one --mailbox)")
    p.add_argument("--mailbox", action="append", dest="mailboxes", metavar="NAME",
                   help="a mailbox to export (repeatable; default: all, as a tree)")
    p.set_defaults(run=run_export)
    p = commands.add_parser("fetch", parents=[common],
                            help="copy mail from another IMAP account (and --follow it)")
    p.add_argument("url", metavar="URL",
                   help="imap://USER@HOST[:PORT]/[MAILBOX,...] (STARTTLS) or imaps://... "
                   "(TLS); no mailboxes means all of them")
    p.add_argument("--follow", action="store_true",
                   help="then stay connected and import new mail as it arrives (IDLE) "
                   "in the named mailboxes, or INBOX")
    p.add_argument("--password-file", metavar="FILE",
                   help=f"read the password from FILE (default: ${PASSWORD_ENV}, else a "
                   "prompt)")
    p.add_argument("--ca", metavar="FILE",
                   help="trust this CA certificate (PEM) for the server, e.g. its own "
                   "self-signed one")
    p.add_argument("--insecure", action="store_true",
                   help="imap:// without STARTTLS: password and mail in clear (for a "
                   "server on this machine)")
    p.set_defaults(run=run_fetch)


def _open(args):
    """Unlock the account: ``(home, bundle)``; a daemon holding the store is refused."""
    from leapmail.home import Home
    from leapmail.passphrase import read_passphrase
    from leapmail.store.database import lock_holder

    home = Home(args.home)
    # Before the passphrase: no use typing it for a store that cannot be opened.
    holder = lock_holder(home.store_path)
    if holder is not None:
        who = f" (pid {holder})" if holder else ""
        raise LeapmailError(f"the daemon{who} has the store open; stop it first "
                            f"({args.command} needs the store to itself)")
    return home, home.unlock(read_passphrase())


def _with_account(args, work, stopped=None):
    """Run ``await work(reactor, account)`` on the reactor with the account open.

    SIGINT and SIGTERM fire ``stopped`` if given (the work ends itself, cleanly),
    else stop the reactor: the batches committed so far stay, and the command ends
    as interrupted.
    """
    import signal

    from leapmail.cli import _run
    from leapmail.mail.account import Account
    from leapmail.store import StoreLocked

    home, bundle = _open(args)

    async def main(reactor):
        def on_signal(signum, frame):
            if stopped is not None:
                reactor.callFromThread(lambda: stopped.called or stopped.callback(None))
            else:
                reactor.callFromThread(reactor.stop)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            store = home.open_store(bundle, reactor=reactor)
        except StoreLocked as e:
            raise LeapmailError(f"the daemon has the store open; stop it first ({e})"
                                ) from None
        account = Account(store, bundle.id_key)
        try:
            await account.setup()
            return await work(reactor, account)
        finally:
            account.close()
            await store.close()

    return _run(main)


def _progress(what):
    from leapmail.transfer.progress import Progress

    return Progress(what)


def _finish(progress, problems, what):
    progress.close()
    print(progress.summary())
    if problems:
        raise Incomplete(f"{problems} problem{'' if problems == 1 else 's'} (see above); "
                         f"everything else was {what}")


def run_import(args):
    from leapmail.transfer.files import import_path

    path = os.path.abspath(args.path)
    if not os.path.exists(path):
        raise LeapmailError(f"{args.path} does not exist")
    progress = _progress("import")
    problems = _with_account(args, lambda reactor, account: import_path(
        account, path, args.format, args.mailbox, progress))
    _finish(progress, problems, "imported")


def run_export(args):
    from leapmail.transfer.files import export_mailboxes

    progress = _progress("export")
    problems = _with_account(args, lambda reactor, account: export_mailboxes(
        account, args.format, args.mailboxes, os.path.abspath(args.path), progress))
    _finish(progress, problems, "exported")


def _show_warnings(progress):
    """Show leapmail's own warnings (a watcher reconnecting, and why) on stderr."""
    from twisted.logger import LogLevel, formatEvent, globalLogBeginner

    def observer(event):
        if (event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical)
                and event.get("log_namespace", "").startswith("leapmail.")):
            progress.note(formatEvent(event))

    globalLogBeginner.beginLoggingTo([observer], discardBuffer=True,
                                     redirectStandardIO=False)


def parse_url(url):
    """``(security, host, port, user, [mailbox] or None)`` of an imap(s):// URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("imap", "imaps"):
        raise LeapmailError(f"{url!r}: the URL must start with imap:// or imaps://")
    try:
        port = parts.port
    except ValueError:
        raise LeapmailError(f"{url!r}: the port is not a number") from None
    if not parts.hostname or not parts.username:
        raise LeapmailError(f"{url!r}: the URL needs a user and a host "
                            "(imap://USER@HOST/)")
    port = port or (993 if parts.scheme == "imaps" else 143)
    path = unquote(parts.path.lstrip("/"))
    boxes = [b for b in path.split(",") if b] or None
    return parts.scheme, parts.hostname, port, unquote(parts.username), boxes


def _password(args):
    if args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                value = f.readline().rstrip("\r\n")
        except OSError as e:
            raise LeapmailError(f"cannot read {args.password_file}: {e.strerror}") from None
        if not value:
            raise LeapmailError(f"{args.password_file} holds no password")
        return value
    value = os.environ.get(PASSWORD_ENV)
    if value is not None:
        if not value:
            raise LeapmailError(f"{PASSWORD_ENV} is set but empty")
        return value
    if not sys.stdin.isatty():
        raise LeapmailError(f"no password: set {PASSWORD_ENV}, use --password-file, or "
                            "run from a terminal")
    return getpass.getpass("Password of the other account: ")


def run_fetch(args):
    from functools import partial

    from twisted.internet import defer

    from leapmail.client.session import open_session
    from leapmail.transfer.fetch import Fetcher

    scheme, host, port, user, boxes = parse_url(args.url)
    if scheme == "imaps":
        if args.insecure:
            raise LeapmailError("--insecure is for imap:// only (imaps:// is always TLS)")
        security = "tls"
    else:
        security = "none" if args.insecure else "starttls"
    ca_pem = None
    if args.ca:
        try:
            with open(args.ca, "rb") as f:
                ca_pem = f.read()
        except OSError as e:
            raise LeapmailError(f"cannot read {args.ca}: {e.strerror}") from None
    password = _password(args)
    progress = _progress("fetch")
    stopped = defer.Deferred() if args.follow else None

    async def work(reactor, account):
        connect = partial(open_session, reactor, host, port, user, password, security,
                          ca_pem)
        fetcher = Fetcher(reactor, account, connect, f"{user}@{host}", progress, boxes)
        problems = await fetcher.run_once()
        if not args.follow:
            return problems
        progress.note(f"copied; following new mail ({progress.summary()})")
        _show_warnings(progress)
        # Until Ctrl-C or SIGTERM: then the connections close and the store with them.
        await fetcher.follow(fetcher.to_follow(), stopped)
        return problems

    problems = _with_account(args, work, stopped)
    _finish(progress, problems, "fetched")
