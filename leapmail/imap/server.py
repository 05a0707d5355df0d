"""The IMAP server: Twisted's IMAP4Server, corrected and extended, on the mail core.

We keep Twisted's connection life (greeting, timeouts, STARTTLS, the cred portal and
its credentials classes, response writers) and replace what is wrong for a real mail
server:

- Commands are read whole (lines and literals, every buffer bounded) before they are
  parsed, and run strictly one after another: pipelining works, also after a command
  that waits on the store (twisted#9282).
- Every session on a mailbox hears about changes made elsewhere (EXISTS, EXPUNGE,
  FETCH FLAGS) when RFC 3501 7.4.1 allows it, and at once while in IDLE.
- Sequence sets are never expanded into lists of numbers: UID ranges are resolved by
  bisection on the session's UID list, and FETCH/SEARCH/STORE work in batches.
- LIST reports mailbox attributes (children, special use, \\Noselect).
"""

import base64
import binascii
import hmac
import ipaddress
from collections import deque

from twisted.cred import credentials, error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, interfaces, protocol, reactor
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.mail.interfaces import IAccountIMAP
from zope.interface import implementer

from leapmail import __version__
from leapmail.imap import encode, fetch as fetchlib
from leapmail.imap.adapters import IMAPAccount
from leapmail.imap.names import decode_mailbox, encode_mailbox
from leapmail.imap.parser import (
    MAX_SMALL_LITERAL,
    CommandReader,
    Cursor,
    ParseError,
    command_name,
    parse_date_time,
    split_tag,
)
from leapmail.imap.search import (
    BadCharset,
    ordered_ranges,
    parse_search,
    runs,
    uid_ranges_for_uids,
)
from leapmail.mail import flags as flaglib, names
from leapmail.mail.errors import (
    CannotDeleteInbox,
    InvalidMailboxName,
    MailboxExists,
    NoSuchMailbox,
)
from leapmail.mail.message import MAX_MESSAGE_SIZE, iter_range
from leapmail.mail.search import QueryError
from leapmail.mail.session import read_flags, read_meta

#: Largest message APPEND accepts (advertised as APPENDLIMIT).
APPENDLIMIT = MAX_MESSAGE_SIZE
#: Pipelined commands read ahead of the one running; beyond this many, or this many
#: literal bytes (LITERAL+ APPENDs need no "+" to keep coming), we stop reading.
MAX_QUEUED = 64
MAX_QUEUED_BYTES = 16 * 1024 * 1024
#: Consecutive bad commands before the connection is closed (as Dovecot does).
MAX_BAD_COMMANDS = 20
#: Messages per store read while answering FETCH (metadata and headers; contents go
#: by fetch.CONTENT_BATCH_BYTES).  Fewer, bigger reads: UID FETCH 1:* (FLAGS) of 10,000
#: messages took 91 ms in reads of 250, 66 in reads of 1,000, 54 in reads of 2,500.
FETCH_BATCH = 2000

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")


class _No(Exception):
    """Answer the command with a tagged NO (``code`` is an optional response code)."""

    def __init__(self, text, code=None):
        super().__init__(text)
        self.code = code


class _Bad(Exception):
    pass


# -- authentication ---------------------------------------------------------------------

@implementer(ICredentialsChecker)
class ClientPasswordChecker:
    """The account's one client password, compared in constant time."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, username, password):
        self._username = username.encode("utf-8")
        self._password = password.encode("utf-8")

    def requestAvatarId(self, creds):
        user = creds.username if isinstance(creds.username, bytes) else creds.username.encode()
        given = creds.password if isinstance(creds.password, bytes) else creds.password.encode()
        # Both comparisons always run, so timing tells nothing about which one failed.
        ok_user = hmac.compare_digest(user.lower(), self._username.lower())
        ok_pass = hmac.compare_digest(given, self._password)
        if ok_user and ok_pass:
            return defer.succeed(self._username)
        return defer.fail(cred_error.UnauthorizedLogin())


@implementer(IRealm)
class AccountRealm:
    def __init__(self, factory):
        self._factory = factory

    def requestAvatar(self, avatar_id, mind, *interfaces_):
        if IAccountIMAP not in interfaces_:
            raise NotImplementedError("only IMAP accounts here")
        return IAccountIMAP, IMAPAccount(self._factory.account), lambda: None


class Throttle:
    """Slows down repeated login failures: the answer to each failure after the first
    few waits longer, up to ``cap`` seconds.  A success resets it."""

    def __init__(self, free=3, cap=16.0):
        self.free = free
        self.cap = cap
        self.failures = 0

    def failed(self):
        self.failures += 1
        excess = self.failures - self.free
        return 0.0 if excess <= 0 else min(self.cap, 0.5 * 2 ** (excess - 1))

    def succeeded(self):
        self.failures = 0


# -- the protocol --------------------------------------------------------------------

@implementer(interfaces.IPushProducer)
class LeapIMAPServer(imap4.IMAP4Server):
    IDENT = b"leapmail ready."
    log = Logger()

    def __init__(self, factory, contextFactory=None):
        super().__init__(chal={b"PLAIN": imap4.PLAINCredentials},
                         contextFactory=contextFactory)
        self.factory = factory
        self.portal = factory.portal
        self.view = None
        # The \Recent count the client was last told (SELECT, EXISTS, expunges).
        self._recent_said = None
        self._uid_command = False
        self.condstore = False
        self.qresync = False
        self._queue = deque()
        self._queued_bytes = 0
        self._running = False
        self._continuation = None
        self._idle = False
        self._bad_count = 0
        self._write_paused = None
        self._closed = False
        self._reader = None

    # -- connection ---------------------------------------------------------------

    def connectionMade(self):
        self._reader = CommandReader(self._literal_limit, self._unit_read,
                                     self._literal_accepted, self._framing_rejected)
        self.transport.registerProducer(self, True)
        # Responses are written whole; Nagle would hold the last piece of each (an
        # IDLE push, a tagged OK) until the client acknowledged the previous one.
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        super().connectionMade()

    def connectionLost(self, reason):
        self._closed = True
        self._close_mailbox()
        if self._continuation is not None:
            d, self._continuation = self._continuation, None
            d.errback(ConnectionError("connection lost"))
        if self._write_paused is not None:
            d, self._write_paused = self._write_paused, None
            d.errback(ConnectionError("connection lost"))
        super().connectionLost(reason)

    def timeoutConnection(self):
        self._close_mailbox()
        self.state = "logout"
        self.sendLine(b"* BYE Autologout; connection idle too long")
        self._hang_up()

    def dataReceived(self, data):
        self.resetTimeout()
        self._reader.feed(data)

    def _write(self, data):
        if not self._closed:
            self.transport.write(data)

    def sendLine(self, line):
        self._write(line + b"\r\n")

    # IPushProducer: the transport tells us when its buffer is full.
    def pauseProducing(self):
        if self._write_paused is None:
            self._write_paused = defer.Deferred()

    def resumeProducing(self):
        if self._write_paused is not None:
            d, self._write_paused = self._write_paused, None
            d.callback(None)

    def stopProducing(self):
        self._closed = True

    async def _drain(self):
        """Wait while the client is slower than we are at writing."""
        self.resetTimeout()
        while self._write_paused is not None and not self._closed:
            await self._write_paused

    def capabilities(self):
        caps = {}
        if self.state == "unauth":
            if self.ctx is not None and self.canStartTLS and not self.startedTLS:
                caps[b"STARTTLS"] = None
            if self._login_disabled():
                caps[b"LOGINDISABLED"] = None
            else:
                caps[b"AUTH"] = [b"PLAIN"]
        for name in (b"SASL-IR", b"LITERAL+", b"ID", b"ENABLE", b"IDLE", b"NAMESPACE",
                     b"UIDPLUS", b"MOVE", b"UNSELECT", b"CHILDREN", b"SPECIAL-USE",
                     b"LIST-EXTENDED", b"LIST-STATUS", b"CONDSTORE", b"QRESYNC",
                     b"ESEARCH", b"STATUS=SIZE"):
            caps[name] = None
        caps[b"APPENDLIMIT"] = [str(self.factory.appendlimit).encode()]
        return caps

    def _login_disabled(self):
        """Passwords travel in clear only on loopback or inside TLS."""
        if self.startedTLS or interfaces.ISSLTransport(self.transport, None) is not None:
            return False
        return not self.factory.cleartext_allowed(getattr(self.transport.getPeer(), "host", ""))

    # -- reading commands ---------------------------------------------------------

    def _literal_limit(self, unit):
        if self._continuation is not None:
            return 0
        name = command_name(unit)
        if name == b"APPEND" and self.state in ("auth", "select"):
            return self.factory.appendlimit
        return MAX_SMALL_LITERAL

    def _literal_accepted(self, unit):
        self._write(b"+ OK\r\n")

    def _framing_rejected(self, unit, kind, size):
        tag, _ = split_tag(unit.first_line)
        tag = tag or b"*"
        if kind == "line":
            self._write(tag + b" BAD Command line too long\r\n")
        elif command_name(unit) == b"APPEND" and self.state in ("auth", "select"):
            self._write(tag + b" NO [TOOBIG] Message of %d bytes is over the limit of %d "
                        b"bytes\r\n" % (size, self.factory.appendlimit))
        else:
            self._write(tag + b" BAD Literal of %d bytes is too long\r\n" % size)
        self._count_bad()

    def _unit_read(self, unit):
        self._queue.append(unit)
        self._queued_bytes += sum(map(len, unit.literals))
        if len(self._queue) >= MAX_QUEUED or self._queued_bytes >= MAX_QUEUED_BYTES:
            self._reader.paused = True
            self.transport.pauseProducing()
        self._next()

    def _next(self):
        while self._queue:
            if self._continuation is not None:
                d, self._continuation = self._continuation, None
                unit = self._queue.popleft()
                self._queued_bytes -= sum(map(len, unit.literals))
                d.callback(unit)
                continue
            if self._running or self._closed:
                return
            unit = self._queue.popleft()
            self._queued_bytes -= sum(map(len, unit.literals))
            if (self._reader.paused and len(self._queue) < MAX_QUEUED // 2
                    and self._queued_bytes < MAX_QUEUED_BYTES):
                self._reader.paused = False
                self.transport.resumeProducing()
                reactor.callLater(0, self._reader.resume)
            self._running = True
            d = defer.ensureDeferred(self._run(unit))
            d.addErrback(self._crashed)
            d.addBoth(self._done)

    def _done(self, _):
        self._running = False
        self._next()

    def _crashed(self, failure):
        self.log.failure("IMAP command failed", failure)

    def _count_bad(self):
        self._bad_count += 1
        if self._bad_count >= MAX_BAD_COMMANDS:
            self._write(b"* BYE Too many invalid commands\r\n")
            self._hang_up()

    async def _next_line(self):
        """The client's next line, for a command that waits on one (IDLE, AUTHENTICATE)."""
        d = defer.Deferred()
        self._continuation = d
        self._next()
        unit = await d
        return unit.first_line

    # -- dispatch -----------------------------------------------------------------

    async def _run(self, unit):
        self.resetTimeout()
        tag, rest = split_tag(unit.first_line)
        if tag is None:
            self._write(b"* BAD Invalid tag\r\n")
            self._count_bad()
            return
        word, _, _ = rest.partition(b" ")
        name = word.upper().decode("ascii", "replace")
        uid = False
        start = len(tag) + 1 + len(word)
        if name == "UID":
            sub = rest[len(word) + 1:].partition(b" ")[0]
            name = sub.upper().decode("ascii", "replace")
            start += 1 + len(sub)
            uid = True
            if name not in ("FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE"):
                return self._bad(tag, "Unknown UID command")
        # News of flag changes told during a UID command carry UIDs (as Dovecot's do).
        self._uid_command = uid
        handler = getattr(self, "cmd_" + name.replace("-", "_"), None) if name.isalpha() else None
        if not rest or handler is None:
            return self._bad(tag, "Unknown command" if rest else "Missing command")
        states = getattr(handler, "states", ("select",))
        if self.state not in states:
            return self._bad(tag, _state_error(self.state, states))
        cursor = Cursor(unit, start)
        try:
            if getattr(handler, "takes_uid", False):
                result = handler(tag, cursor, uid)
            else:
                result = handler(tag, cursor)
            if hasattr(result, "__await__"):
                await result
            self._bad_count = 0
        except ParseError as e:
            self._bad(tag, f"{name}: {e}")
        except _Bad as e:
            self._bad(tag, str(e))
        except _No as e:
            self._finish(tag, "NO", str(e), code=e.code)
        except BadCharset:
            self._finish(tag, "NO", "Unsupported charset", code="BADCHARSET (US-ASCII UTF-8)")
        except QueryError as e:
            self._bad(tag, str(e))
        except NoSuchMailbox as e:
            self._finish(tag, "NO", str(e), code="NONEXISTENT")
        except MailboxExists as e:
            self._finish(tag, "NO", str(e), code="ALREADYEXISTS")
        except CannotDeleteInbox as e:
            self._finish(tag, "NO", str(e), code="CANNOT")
        except InvalidMailboxName as e:
            self._finish(tag, "NO", str(e), code="CANNOT")
        except ConnectionError:
            pass
        except Exception:
            self.log.failure("IMAP {command} failed", command=name)
            self._finish(tag, "NO", "Internal error; the command was not completed",
                         code="SERVERBUG")

    def _bad(self, tag, text):
        self._write(tag + b" BAD " + _text(text) + b"\r\n")
        self._count_bad()

    def _finish(self, tag, status, text, code=None, expunges=True):
        """Tell what happened elsewhere (where allowed), then the tagged response."""
        self._send_updates(expunges)
        line = tag + b" " + status.encode()
        if code:
            line += b" [" + code.encode("utf-8") + b"]"
        self._write(line + b" " + _text(text) + b"\r\n")

    # -- news from other sessions -------------------------------------------------

    def _send_updates(self, expunges=True, silenced=None):
        """Report what changed elsewhere; ``silenced`` maps UIDs to the MODSEQ of flag
        changes this session made with .SILENT, which are not echoed."""
        view = self.view
        if view is None or self._closed:
            return
        if view.deleted:
            self._close_mailbox()
            self.state = "auth"
            self._write(b"* BYE Mailbox was deleted elsewhere\r\n")
            self._hang_up()
            return
        updates = _coalesced(view.updates(expunges=expunges), silenced)
        if not updates:
            return
        out = []
        vanished = []
        for update in updates:
            if update.kind == "expunge":
                if self.qresync:
                    vanished.append(update.uid)
                else:
                    out.append(b"* %d EXPUNGE\r\n" % update.seq)
            elif update.kind == "exists":
                if vanished:
                    out.append(b"* VANISHED " + _compress(vanished) + b"\r\n")
                    vanished = []
                out.append(b"* %d EXISTS\r\n" % update.count)
                out.append(b"* %d RECENT\r\n" % len(view.recent))
                self._recent_said = len(view.recent)
            elif update.kind == "keywords":
                # New keywords in the mailbox: its FLAGS again (RFC 3501 7.2.6), as
                # Dovecot tells them, before the FETCH that uses them.
                flags = " ".join([*SYSTEM_FLAGS, *update.flags]).encode("utf-8")
                out.append(b"* FLAGS (" + flags + b")\r\n")
                if not view.readonly:
                    out.append(b"* OK [PERMANENTFLAGS (" + flags
                               + b" \\*)] Flags permitted.\r\n")
            elif update.kind == "flags":
                if vanished:
                    # Its sequence number counts the expunges before it: say them first.
                    out.append(b"* VANISHED " + _compress(vanished) + b"\r\n")
                    vanished = []
                # UID during a UID command; UID and MODSEQ once CONDSTORE is on
                # (RFC 7162 3.1: "both UID and mod-sequence data in all subsequent
                # untagged FETCH responses" of STOREs and other sessions' changes).
                # In Dovecot's order: UID, MODSEQ, FLAGS.
                line = b"* %d FETCH (" % update.seq
                if self.condstore or self._uid_command:
                    line += b"UID %d " % update.uid
                if self.condstore:
                    line += b"MODSEQ (%d) " % update.modseq
                out.append(line + b"FLAGS %s)\r\n" % fetchlib.flag_list(
                    update.flags, update.uid in view.recent))
        if vanished:
            out.append(b"* VANISHED " + _compress(vanished) + b"\r\n")
        if len(view.recent) != self._recent_said:
            # \Recent messages expunged: the mailbox's size changed, and with it the
            # count the client was last told (RFC 3501 7.3.2; Dovecot says it too).
            self._recent_said = len(view.recent)
            out.append(b"* %d RECENT\r\n" % self._recent_said)
        self._write(b"".join(out))

    def _close_mailbox(self):
        if self.view is not None:
            self.view.on_change = None
            self.view.close()
        self.view = None

    @staticmethod
    def _mailbox_argument(c):
        """`` SP mailbox``: a mailbox name argument, as text."""
        c.sp()
        return decode_mailbox(c.astring("a mailbox name"))

    def _require_writable(self):
        if self.view.readonly:
            raise _No("The mailbox is read-only", code="READ-ONLY")

    # -- any state ----------------------------------------------------------------

    def cmd_CAPABILITY(self, tag, c):
        c.end()
        self.sendUntaggedResponse(b"CAPABILITY " + b" ".join(self.listCapabilities()))
        self._finish(tag, "OK", "Capability completed")

    cmd_CAPABILITY.states = ("unauth", "auth", "select")

    def cmd_NOOP(self, tag, c):
        c.end()
        self._finish(tag, "OK", "NOOP completed")

    cmd_NOOP.states = ("unauth", "auth", "select")

    def cmd_LOGOUT(self, tag, c):
        c.end()
        self._close_mailbox()
        self.state = "logout"
        self._write(b"* BYE Logging out\r\n" + tag + b" OK Logout completed\r\n")
        self._hang_up()

    def shutdown(self):
        """The daemon is stopping: say so, then close (whatever command was running)."""
        if not self._closed:
            self._write(b"* BYE Server shutting down\r\n")
            self._close_mailbox()
            self.state = "logout"
            self._hang_up()

    def _hang_up(self):
        """Close after what is written; nothing the client sent after this runs."""
        self._reader.close()
        self._queue.clear()
        self._queued_bytes = 0
        self._closed = True
        self.transport.loseConnection()

    cmd_LOGOUT.states = ("unauth", "auth", "select")

    def cmd_ID(self, tag, c):
        c.sp()
        if c.peek() == b"(":
            values = c.paren_list(c.nstring)
            if len(values) % 2 or len(values) > 60:
                raise ParseError("ID takes up to 30 field and value pairs")
        else:
            c.nstring()
        c.end()
        self._write(b'* ID ("name" "leapmail" "version" ' + encode.quoted(__version__) + b")\r\n")
        self._finish(tag, "OK", "ID completed")

    cmd_ID.states = ("unauth", "auth", "select")

    # -- not authenticated --------------------------------------------------------

    def cmd_STARTTLS(self, tag, c):
        c.end()
        if self.startedTLS or interfaces.ISSLTransport(self.transport, None) is not None:
            raise _Bad("TLS is already active")
        if self.ctx is None or not self.canStartTLS:
            raise _No("TLS is not available")
        self._write(tag + b" OK Begin TLS negotiation now\r\n")
        # Nothing the client sent before the handshake may count as a command after it
        # (the STARTTLS command-injection attack).
        self._queue.clear()
        self._queued_bytes = 0
        self._reader.close()
        self._reader = CommandReader(self._literal_limit, self._unit_read,
                                     self._literal_accepted, self._framing_rejected)
        self.transport.startTLS(self.ctx)
        self.startedTLS = True

    cmd_STARTTLS.states = ("unauth",)

    async def cmd_LOGIN(self, tag, c):
        c.sp()
        user = c.astring("a user name")
        c.sp()
        password = c.astring("a password")
        c.end()
        if self._login_disabled():
            raise _No("Log in only after STARTTLS", code="PRIVACYREQUIRED")
        await self._authenticate(tag, user, password)

    cmd_LOGIN.states = ("unauth",)

    async def cmd_AUTHENTICATE(self, tag, c):
        c.sp()
        mechanism = c.atom("a mechanism").upper()
        initial = None
        if not c.at_end():
            c.sp()
            initial = c.atom("an initial response", extra=b"")
        c.end()
        if mechanism != b"PLAIN":
            raise _No("Unsupported authentication mechanism")
        if self._login_disabled():
            raise _No("Authenticate only after STARTTLS", code="PRIVACYREQUIRED")
        if initial is None:
            self._write(b"+ \r\n")
            initial = await self._next_line()
        if initial.strip() == b"*":
            raise _Bad("Authentication cancelled")
        try:
            decoded = b"" if initial == b"=" else base64.b64decode(initial, validate=True)
        except (binascii.Error, ValueError):
            raise _Bad("Invalid base64 in the authentication response") from None
        fields = decoded.split(b"\0")
        if len(fields) != 3:
            raise _Bad("Malformed PLAIN response")
        authzid, user, password = fields
        if authzid and authzid != user:
            await self._authenticate(tag, b"\0", b"")  # counts as a failure, same timing
            return
        await self._authenticate(tag, user, password)

    cmd_AUTHENTICATE.states = ("unauth",)

    async def _authenticate(self, tag, user, password):
        throttle = self.factory.throttle
        try:
            result = await self.portal.login(
                credentials.UsernamePassword(user, password), None, IAccountIMAP)
        except cred_error.UnauthorizedLogin:
            delay = throttle.failed()
            if delay:
                d = defer.Deferred()
                reactor.callLater(delay, d.callback, None)
                await d
            raise _No("Authentication failed", code="AUTHENTICATIONFAILED") from None
        throttle.succeeded()
        _iface, avatar, logout = result
        self.account = avatar
        self._onLogout = logout
        self.state = "auth"
        self.setTimeout(self.POSTAUTH_TIMEOUT)
        self._finish(tag, "OK", "Logged in",
                     code="CAPABILITY " + b" ".join(self.listCapabilities()).decode())

    # -- authenticated ------------------------------------------------------------

    def cmd_ENABLE(self, tag, c):
        enabled = []
        if c.at_end():
            raise ParseError("ENABLE needs a capability")
        while not c.at_end():
            c.sp()
            word = c.atom("a capability").upper()
            if word == b"CONDSTORE" and not self.condstore:
                # With a mailbox selected, the client learns its HIGHESTMODSEQ now
                # (RFC 7162 3.1; Dovecot says it too).
                self._enable_condstore()
                enabled.append(b"CONDSTORE")
            elif word == b"QRESYNC" and not self.qresync:
                self.qresync = True
                if not self.condstore:
                    self._enable_condstore(announce=False)
                enabled.append(b"QRESYNC")
        self._write(b"* ENABLED" + b"".join(b" " + e for e in enabled) + b"\r\n")
        self._finish(tag, "OK", "Enabled")

    cmd_ENABLE.states = ("auth", "select")

    def _enable_condstore(self, announce=True):
        if self.condstore:
            return
        self.condstore = True
        if announce and self.view is not None:
            self._write(b"* OK [HIGHESTMODSEQ %d] Highest\r\n" % max(1, self.view.highestmodseq))

    def cmd_NAMESPACE(self, tag, c):
        c.end()
        self._write(b'* NAMESPACE (("" "/")) NIL NIL\r\n')
        self._finish(tag, "OK", "Namespace completed")

    cmd_NAMESPACE.states = ("auth", "select")

    async def cmd_SELECT(self, tag, c, readonly=False):
        name = self._mailbox_argument(c)
        qresync = None
        condstore = False
        if not c.at_end():
            c.sp()
            c.expect(b"(")
            while True:
                word = c.atom("a select parameter").upper()
                if word == b"CONDSTORE":
                    condstore = True
                elif word == b"QRESYNC":
                    if not self.qresync:
                        raise ParseError("QRESYNC must be enabled first")
                    c.sp()
                    qresync = _qresync_params(c)
                else:
                    raise ParseError(f"unknown SELECT parameter {word.decode('ascii', 'replace')}")
                if c.skip(b")"):
                    break
                c.sp()
        c.end()
        had_mailbox = self.view is not None
        self._close_mailbox()
        self.state = "auth"
        if had_mailbox:
            self._write(b"* OK [CLOSED] Previous mailbox closed\r\n")
        if condstore:
            self._enable_condstore(announce=False)
        view = (await self.account.select(name, rw=not readonly)).view
        try:
            overview = await view.overview()
        except BaseException:
            view.close()  # not ours yet: nobody else would release it
            raise
        flags = list(SYSTEM_FLAGS) + overview["keywords"]
        out = [b"* FLAGS (" + " ".join(flags).encode("utf-8") + b")\r\n"]
        if readonly:
            out.append(b"* OK [PERMANENTFLAGS ()] Read-only mailbox.\r\n")
        else:
            out.append(b"* OK [PERMANENTFLAGS (" + " ".join(flags + ["\\*"]).encode("utf-8")
                       + b")] Flags permitted.\r\n")
        out.append(b"* %d EXISTS\r\n" % view.exists)
        out.append(b"* %d RECENT\r\n" % len(view.recent))
        self._recent_said = len(view.recent)
        if overview["first_unseen"] is not None:
            seq = view.seq_of(overview["first_unseen"])
            if seq is not None:
                out.append(b"* OK [UNSEEN %d] First unseen.\r\n" % seq)
        out.append(b"* OK [UIDVALIDITY %d] UIDs valid\r\n" % view.info.uidvalidity)
        out.append(b"* OK [UIDNEXT %d] Predicted next UID\r\n" % view.uidnext)
        # mod-sequence values are positive (RFC 7162 7): an untouched mailbox says 1.
        out.append(b"* OK [HIGHESTMODSEQ %d] Highest\r\n" % max(1, view.highestmodseq))
        self._write(b"".join(out))
        self.view = view
        self.state = "select"
        if qresync is not None and qresync[0] == view.info.uidvalidity:
            await self._qresync(view, *qresync[1:])
        self._finish(tag, "OK", "Select completed" if not readonly else "Examine completed",
                     code="READ-ONLY" if readonly else "READ-WRITE")

    cmd_SELECT.states = ("auth", "select")

    def cmd_EXAMINE(self, tag, c):
        return self.cmd_SELECT(tag, c, readonly=True)

    cmd_EXAMINE.states = ("auth", "select")

    async def _qresync(self, view, modseq, known, matches):
        """RFC 7162 3.2.5.2: VANISHED (EARLIER) and FETCH for what changed since."""
        ranges = None
        if known is not None:
            ranges = uid_ranges_for_uids(view, known)
        # The (sequence, UID) match data only lets a server shorten VANISHED; the full
        # answer is always correct (RFC 7162 3.2.5.2), so it is parsed and not used.
        del matches
        vanished = await view.vanished_since(modseq, ranges)
        if vanished:
            self._write(b"* VANISHED (EARLIER) " + _compress(vanished) + b"\r\n")
        uids = await view.search(("modseq", modseq + 1))
        uids = [u for u in uids if view.seq_of(u) is not None]
        await self._fetch_uids(view, uids, ["UID", "FLAGS", "MODSEQ"])

    def cmd_CREATE(self, tag, c):
        c.sp()
        raw = c.astring("a mailbox name")
        c.end()
        # RFC 3501 6.3.3: a trailing delimiter declares intent to create children.
        if raw.endswith(b"/") and len(raw) > 1:
            raw = raw[:-1]
        name = decode_mailbox(raw)
        if name.upper() == "INBOX":
            raise _No("INBOX always exists", code="ALREADYEXISTS")

        async def run():
            await self.account.create(name)
            self._finish(tag, "OK", "Create completed")
        return run()

    cmd_CREATE.states = ("auth", "select")

    async def cmd_DELETE(self, tag, c):
        name = self._mailbox_argument(c)
        c.end()
        if self.view is not None and names.normalize(name) == self.view.info.name:
            # Deleting the selected mailbox closes it here first (as Dovecot does).
            self._close_mailbox()
            self.state = "auth"
            self._write(b"* OK [CLOSED] Mailbox closed\r\n")
        await self.account.delete(name)
        self._finish(tag, "OK", "Delete completed")

    cmd_DELETE.states = ("auth", "select")

    async def cmd_RENAME(self, tag, c):
        old = self._mailbox_argument(c)
        new = self._mailbox_argument(c)
        c.end()
        await self.account.rename(old, new)
        self._finish(tag, "OK", "Rename completed")

    cmd_RENAME.states = ("auth", "select")

    async def cmd_SUBSCRIBE(self, tag, c):
        name = self._mailbox_argument(c)
        c.end()
        await self.account.subscribe(name)
        self._finish(tag, "OK", "Subscribe completed")

    cmd_SUBSCRIBE.states = ("auth", "select")

    async def cmd_UNSUBSCRIBE(self, tag, c):
        name = self._mailbox_argument(c)
        c.end()
        await self.account.unsubscribe(name)
        self._finish(tag, "OK", "Unsubscribe completed")

    cmd_UNSUBSCRIBE.states = ("auth", "select")

    async def cmd_LIST(self, tag, c, lsub=False):
        c.sp()
        selection = set()
        extended = False
        if not lsub and c.peek() == b"(":
            extended = True
            for word in c.paren_list(lambda: c.atom("a selection option").upper()):
                if word not in (b"SUBSCRIBED", b"REMOTE", b"RECURSIVEMATCH", b"SPECIAL-USE"):
                    raise ParseError(f"unknown LIST selection option {word.decode('ascii', 'replace')}")
                selection.add(word.decode())
            # RFC 5258 3.1: "MUST NOT occur as the only selection option (or only with
            # REMOTE)"; REMOTE selects nothing by itself.
            if "RECURSIVEMATCH" in selection and selection <= {"RECURSIVEMATCH", "REMOTE"}:
                raise ParseError("RECURSIVEMATCH needs another selection option")
            c.sp()
        reference = c.astring("a reference name")
        c.sp()
        if not lsub and c.peek() == b"(":
            extended = True
            patterns = c.paren_list(c.list_mailbox)
        else:
            patterns = [c.list_mailbox()]
        returns = set()
        status_items = None
        if not lsub and not c.at_end():
            c.sp()
            if c.atom("RETURN").upper() != b"RETURN":
                raise ParseError("expected RETURN")
            c.sp()
            extended = True
            c.expect(b"(")
            while not c.skip(b")"):
                word = c.atom("a return option").upper().decode("ascii", "replace")
                if word == "STATUS":
                    c.sp()
                    status_items = _status_items(c)
                elif word not in ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE"):
                    raise ParseError(f"unknown LIST return option {word}")
                returns.add(word)
                if c.peek() == b" ":
                    c.sp()
        c.end()
        command = b"LSUB" if lsub else b"LIST"
        if patterns == [b""] and not extended:
            self._write(b'* %s (\\Noselect) "/" ""\r\n' % command)
            self._finish(tag, "OK", f"{command.decode()} completed")
            return
        entries = await self.account.list_entries(
            [decode_mailbox(reference, pattern=True) + decode_mailbox(p, pattern=True)
             for p in patterns if p != b""],
            lsub=lsub, subscribed_only="SUBSCRIBED" in selection,
            recursive="RECURSIVEMATCH" in selection,
            special_use_only="SPECIAL-USE" in selection)
        show_subscribed = "SUBSCRIBED" in returns or "SUBSCRIBED" in selection
        out = []
        for entry in entries:
            attributes = list(entry.attributes)
            if show_subscribed and entry.subscribed and not lsub:
                attributes.append("\\Subscribed")
            line = (b"* " + command + b" (" + " ".join(attributes).encode() + b') "/" '
                    + encode.astring(encode_mailbox(entry.name)))
            if entry.childinfo and not lsub:
                line += b' ("CHILDINFO" ("SUBSCRIBED"))'
            out.append(line + b"\r\n")
            if status_items and entry.selectable:
                try:
                    out.append(await self._status_line(entry.name, status_items))
                except NoSuchMailbox:
                    pass
            if len(out) > 500:
                self._write(b"".join(out))
                out = []
                await self._drain()
        self._write(b"".join(out))
        self._finish(tag, "OK", f"{command.decode()} completed")

    cmd_LIST.states = ("auth", "select")

    def cmd_LSUB(self, tag, c):
        return self.cmd_LIST(tag, c, lsub=True)

    cmd_LSUB.states = ("auth", "select")

    async def cmd_STATUS(self, tag, c):
        name = self._mailbox_argument(c)
        c.sp()
        items = _status_items(c)
        c.end()
        if "HIGHESTMODSEQ" in items:
            self._enable_condstore()
        line = await self._status_line(name, items)
        self._write(line)
        self._finish(tag, "OK", "Status completed")

    cmd_STATUS.states = ("auth", "select")

    async def _status_line(self, name, items):
        status = await self.account.status(name)
        view = self.view
        if view is not None and not view.readonly and view.info.id == status["id"]:
            # The selected mailbox: the \Recent messages this session claimed count (as
            # Dovecot counts them), beside those no session has seen yet.  (EXAMINE
            # claims none: they are still among the latter.)
            status["recent"] += len(view.recent)
        status["appendlimit"] = self.factory.appendlimit
        status["highestmodseq"] = max(1, status["highestmodseq"])  # positive, as SELECT says
        values = b" ".join(b"%s %d" % (item.encode(), status[item.lower()]) for item in items)
        return (b"* STATUS " + encode.astring(encode_mailbox(status["name"])) + b" ("
                + values + b")\r\n")

    async def cmd_APPEND(self, tag, c):
        name = self._mailbox_argument(c)
        c.sp()
        flags = []
        date, zone = None, 0
        if c.peek() == b"(":
            flags = _checked_flags(c.flag_list())
            c.sp()
        if c.peek() == b'"':
            date, zone = parse_date_time(c.quoted())
            c.sp()
        if c.peek() != b"{":
            raise ParseError("expected the message as a literal")
        message = c.literal()
        c.end()
        if not message:
            raise _No("Empty message")
        try:
            uidvalidity, uid = await self.account.append(name, message, flags, date, zone)
        except NoSuchMailbox:
            raise _No("Mailbox does not exist", code="TRYCREATE") from None
        self._finish(tag, "OK", "Append completed", code=f"APPENDUID {uidvalidity} {uid}")

    cmd_APPEND.states = ("auth", "select")

    async def cmd_IDLE(self, tag, c):
        c.end()
        self._write(b"+ idling\r\n")
        view = self.view
        if view is not None:
            self._send_updates(True)
            view.on_change = lambda _view: reactor.callLater(0, self._idle_news)
        self._idle = True
        try:
            line = await self._next_line()
        finally:
            self._idle = False
            if view is not None:
                view.on_change = None
        if line.upper() != b"DONE":
            raise _Bad("Expected DONE")
        self._finish(tag, "OK", "Idle completed")

    cmd_IDLE.states = ("auth", "select")

    def _idle_news(self):
        if self._idle and not self._closed:
            self._send_updates(True)

    # -- selected -----------------------------------------------------------------

    def cmd_CHECK(self, tag, c):
        c.end()
        self._finish(tag, "OK", "Check completed")

    async def cmd_CLOSE(self, tag, c):
        c.end()
        view = self.view
        if not view.readonly:
            await view.expunge()
        self._close_mailbox()
        self.state = "auth"
        self._finish(tag, "OK", "Close completed")

    def cmd_UNSELECT(self, tag, c):
        c.end()
        self._close_mailbox()
        self.state = "auth"
        self._finish(tag, "OK", "Unselect completed")

    async def cmd_EXPUNGE(self, tag, c, uid=False):
        uids = None
        if uid:
            c.sp()
            uids = self._resolve(c.sequence_set(), True)
        c.end()
        self._require_writable()
        expunged = await self.view.expunge(uids)
        self._send_updates(True)
        code = None
        if self.qresync and expunged:
            # RFC 7162 3.2.10: with QRESYNC the client learns the new HIGHESTMODSEQ here.
            code = "HIGHESTMODSEQ %d" % max(1, self.view.highestmodseq)
        self._finish(tag, "OK", "Expunge completed", code=code)

    cmd_EXPUNGE.takes_uid = True

    def _resolve(self, ranges, uid):
        """The known UIDs a sequence set names, ascending, without expanding ranges."""
        view = self.view
        if uid:
            spans = uid_ranges_for_uids(view, ranges)
            if len(spans) == 1:
                return view.uids_in_range(*spans[0])  # 1:*, the usual: already in order
            out = set()
            for low, high in spans:
                out.update(view.uids_in_range(low, high))
            return sorted(out)
        spans = sorted(ordered_ranges(ranges, view.exists))
        if spans and (spans[0][0] < 1 or max(high for _, high in spans) > view.exists):
            raise _Bad("Invalid message sequence number")
        merged = []
        for low, high in spans:
            if merged and low <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], high)
            else:
                merged.append([low, high])
        uids = []
        for low, high in merged:
            uids.extend(view.uids[low - 1:high])
        return uids

    async def cmd_FETCH(self, tag, c, uid=False):
        c.sp()
        ranges = c.sequence_set()
        c.sp()
        items = fetchlib.parse_items(c)
        changedsince = None
        vanished = False
        if not c.at_end():
            c.sp()
            c.expect(b"(")
            while True:
                word = c.atom("a fetch modifier").upper()
                if word == b"CHANGEDSINCE":
                    c.sp()
                    changedsince = c.number("a mod-sequence value")
                elif word == b"VANISHED" and uid:
                    if not self.qresync:
                        raise ParseError("VANISHED needs QRESYNC to be enabled")
                    vanished = True
                else:
                    raise ParseError(f"unknown FETCH modifier {word.decode('ascii', 'replace')}")
                if c.skip(b")"):
                    break
                c.sp()
        c.end()
        if vanished and changedsince is None:
            raise ParseError("VANISHED needs CHANGEDSINCE")
        if changedsince is not None or "MODSEQ" in items:
            self._enable_condstore()
        view = self.view
        uids = self._resolve(ranges, uid)
        if uid:
            # UID first (Thunderbird relies on it), once.
            items = ["UID"] + [item for item in items if item != "UID"]
        if vanished:
            gone = await view.vanished_since(changedsince, uid_ranges_for_uids(view, ranges))
            if gone:
                self._write(b"* VANISHED (EARLIER) " + _compress(gone) + b"\r\n")
        if changedsince is not None:
            changed = set(await view.search(("modseq", changedsince + 1)))
            uids = [u for u in uids if u in changed]
            if "MODSEQ" not in items:
                items = items + ["MODSEQ"]
        await self._fetch_uids(view, uids, items)
        self._finish(tag, "OK", "Fetch completed", expunges=uid)

    cmd_FETCH.takes_uid = True

    async def _fetch_uids(self, view, uids, items):
        store = view.account.store
        mailbox_id = view.info.id
        condstore = self.condstore
        if condstore and "MODSEQ" in items and "UID" not in items:
            # RFC 7162 3.1: a FETCH of MODSEQ, CONDSTORE on, answers with UID too.
            items = ["UID"] + items
        items = fetchlib.response_order(items)
        newly_seen = set()
        if fetchlib.sets_seen(items) and not view.readonly:
            for start in range(0, len(uids), FETCH_BATCH):
                rows = await store.read(read_flags, mailbox_id, uids[start:start + FETCH_BATCH])
                unseen = [uid for uid, flags, _modseq in rows if "\\Seen" not in flags]
                if unseen:
                    changed, _ = await view.store_flags(unseen, "add", ["\\Seen"])
                    view.forget_flag_changes({u: m for u, (_f, m) in changed.items()})
                    newly_seen.update(changed)
        want_content = fetchlib.needs_content(items)
        with_header = fetchlib.header_only(items)
        with_cache = fetchlib.whole_only(items)
        uid_only = items == ["UID"]
        flags_only = fetchlib.flags_only(items)
        recent = set(view.recent)
        seq_of = view.seq_of

        # Metadata and headers: two batches in flight, so both reader threads work
        # while we write.  Message contents: one read at a time (two readers of bodies
        # contend for the GIL and were not faster than one), of up to CONTENT_BATCH
        # messages and CONTENT_BATCH_BYTES, written while the next is read.
        if with_header or not want_content:
            size, ahead = FETCH_BATCH, 2
        else:
            size, ahead = fetchlib.CONTENT_BATCH, 1

        def job(queries, batch, carried=None):
            if uid_only:
                # The session knows its UIDs, also of a message expunged elsewhere and
                # not told yet (RFC 3501 7.4.1 holds that news back during FETCH); Dovecot
                # answers it too.  Nothing to read.
                return [[b"".join(b"* %d FETCH (UID %d)\r\n" % (seq_of(uid), uid)
                                  for uid in batch)]], None
            if flags_only:
                rows = read_flags(queries, mailbox_id, batch)
                return [[fetchlib.render_flags(rows, seq_of, items, recent)]], None
            # The metadata of messages a contents batch had no room for is carried to
            # the next batch instead of read again: it is still true unless the store
            # was written to in between.
            generation = queries.generation() if ahead == 1 else None
            if carried is not None and carried[1] == generation:
                metas = carried[0]
            else:
                metas = read_meta(queries, mailbox_id, batch, with_header, with_cache)
            rest = None
            if ahead == 1:
                keep = fetchlib.within_budget(metas)
                if keep < len(metas):
                    rest = (metas[keep:], generation)
                    metas = metas[:keep]
            responses = fetchlib.render_batch(queries, metas, [seq_of(m.uid) for m in metas],
                                              items, recent, condstore, want_content,
                                              newly_seen, with_header)
            if not any(isinstance(piece, fetchlib.Stream)
                       for pieces in responses for piece in pieces):
                # Joined here, on the reader thread: the reactor only writes it.
                responses = [[b"".join(piece for pieces in responses for piece in pieces)]]
            return responses, rest

        position = 0
        pending = deque()
        carried = None

        def read_ahead():
            nonlocal position, carried
            if carried is not None:
                # Only with one read at a time: nothing was read past the carried rest.
                rest, carried = carried, None
                pending.append(store.read(job, [m.uid for m in rest[0]], rest))
                return
            while position < len(uids) and len(pending) < ahead:
                batch = uids[position:position + size]
                position += len(batch)
                pending.append(store.read(job, batch))

        read_ahead()
        while pending:
            responses, carried = await pending.popleft()
            read_ahead()
            # One write per batch: the transport's cost is per write, not per byte.
            out = []
            for pieces in responses:
                for piece in pieces:
                    if isinstance(piece, fetchlib.Stream):
                        self._write(b"".join(out))
                        out = []
                        async for chunk in iter_range(store, piece.content, piece.start,
                                                      piece.end):
                            self._write(fetchlib.wire_bytes(chunk))
                            await self._drain()
                    else:
                        out.append(piece)
            self._write(b"".join(out))
            await self._drain()

    async def cmd_STORE(self, tag, c, uid=False):
        c.sp()
        ranges = c.sequence_set()
        c.sp()
        unchanged_since = None
        if c.peek() == b"(":
            c.expect(b"(")
            word = c.atom("a store modifier").upper()
            if word != b"UNCHANGEDSINCE":
                raise ParseError(f"unknown STORE modifier {word.decode('ascii', 'replace')}")
            c.sp()
            unchanged_since = c.number("a mod-sequence value")
            c.expect(b")")
            c.sp()
        action = c.atom("+FLAGS, -FLAGS or FLAGS").upper()
        silent = action.endswith(b".SILENT")
        base = action[:-7] if silent else action
        modes = {b"FLAGS": "set", b"+FLAGS": "add", b"-FLAGS": "remove"}
        if base not in modes:
            raise ParseError("expected FLAGS, +FLAGS or -FLAGS")
        c.sp()
        if c.peek() == b"(":
            flags = c.flag_list()
        else:
            flags = [c.flag()]
            while not c.at_end():
                c.sp()
                flags.append(c.flag())
        c.end()
        flags = _checked_flags(flags)
        self._require_writable()
        if unchanged_since is not None:
            self._enable_condstore()
        view = self.view
        uids = self._resolve(ranges, uid)
        changed, refused = await view.store_flags(uids, modes[base], flags, unchanged_since)
        silenced = None
        if silent and unchanged_since is None:
            # Our own changes are not echoed; changes made elsewhere still are.  A
            # conditional STORE reports them even when silent (RFC 7162 3.1.3), as the
            # client needs the new MODSEQs.
            silenced = {u: m for u, (_f, m) in changed.items()}
        self._send_updates(expunges=uid, silenced=silenced)
        code = None
        if refused:
            if uid:
                code = "MODIFIED " + _compress(refused).decode()
            else:
                seqs = [view.seq_of(u) for u in refused if view.seq_of(u) is not None]
                code = "MODIFIED " + _compress(seqs).decode()
        self._finish(tag, "OK", "Conditional STORE failed" if refused else "Store completed",
                     code=code, expunges=uid)

    cmd_STORE.takes_uid = True

    async def cmd_SEARCH(self, tag, c, uid=False):
        c.sp()
        node, options, uses_modseq, _charset = parse_search(c, self.view)
        if uses_modseq:
            self._enable_condstore()
        view = self.view
        found = [u for u in await view.search(node) if view.seq_of(u) is not None]
        highest = None
        if uses_modseq and found:
            highest = await view.highest_modseq(_modseq_scope(found, options))
        numbers = found if uid else [view.seq_of(u) for u in found]
        if options is None:
            line = b"* SEARCH" + b"".join(b" %d" % n for n in numbers)
            if highest is not None:
                line += b" (MODSEQ %d)" % highest
        else:
            line = b'* ESEARCH (TAG ' + encode.quoted(tag) + b")"
            if uid:
                line += b" UID"
            if numbers:
                if "MIN" in options:
                    line += b" MIN %d" % numbers[0]
                if "MAX" in options:
                    line += b" MAX %d" % numbers[-1]
                if "ALL" in options:
                    line += b" ALL " + _compress(numbers)
            if "COUNT" in options:
                line += b" COUNT %d" % len(numbers)
            if highest is not None:
                line += b" MODSEQ %d" % highest
        self._write(line + b"\r\n")
        self._finish(tag, "OK", "Search completed", expunges=uid)

    cmd_SEARCH.takes_uid = True

    async def cmd_COPY(self, tag, c, uid=False, move=False):
        c.sp()
        ranges = c.sequence_set()
        target = self._mailbox_argument(c)
        c.end()
        if move:
            self._require_writable()
        view = self.view
        uids = self._resolve(ranges, uid)
        if not uids:
            self._finish(tag, "OK", "No messages", expunges=uid)
            return
        try:
            if move:
                uidvalidity, pairs = await view.move(uids, target)
            else:
                uidvalidity, pairs = await view.copy(uids, target)
        except NoSuchMailbox:
            raise _No("Mailbox does not exist", code="TRYCREATE") from None
        code = None
        if pairs:
            code = (f"COPYUID {uidvalidity} {_compress([s for s, _ in pairs]).decode()} "
                    f"{_compress([d for _, d in pairs]).decode()}")
        if move:
            if code:
                self._write(b"* OK [" + code.encode() + b"] Moved\r\n")
            self._finish(tag, "OK", "Move completed")
        else:
            self._finish(tag, "OK", "Copy completed", code=code, expunges=uid)

    cmd_COPY.takes_uid = True

    def cmd_MOVE(self, tag, c, uid=False):
        return self.cmd_COPY(tag, c, uid, move=True)

    cmd_MOVE.takes_uid = True


def _state_error(state, allowed):
    """Why a command is refused in ``state`` when it is valid in ``allowed`` states."""
    if state == "logout":
        return "Logging out"
    if state == "unauth":
        return "Log in first"
    if allowed == ("unauth",):
        return "Already logged in"
    return "No mailbox selected"

def _modseq_scope(found, options):
    """The messages whose highest MODSEQ a SEARCH answer reports (RFC 7162 3.1.5): with
    ESEARCH's MIN or MAX alone, the message returned; with both (and neither ALL nor
    COUNT), the two; otherwise every message found."""
    if options is None or "ALL" in options or "COUNT" in options:
        return found
    scope = []
    if "MIN" in options:
        scope.append(found[0])
    if "MAX" in options:
        scope.append(found[-1])
    return scope or found


_STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ",
                 "SIZE", "APPENDLIMIT")


def _text(text):
    """Response text as RFC 3501 9 allows it: 7-bit, no CR or LF, never empty."""
    data = text.encode("ascii", "backslashreplace").replace(b"\r", b" ").replace(b"\n", b" ")
    return data or b"-"


def _status_items(c):
    items = []
    for word in c.paren_list(lambda: c.atom("a status item").upper().decode("ascii", "replace")):
        if word not in _STATUS_ITEMS:
            raise ParseError(f"unknown status item {word}")
        if word not in items:
            items.append(word)
    if not items:
        raise ParseError("empty status item list")
    return items


def _checked_flags(flags):
    out = []
    for flag in flags:
        if flag.startswith("\\"):
            if flag.lower() == "\\recent":
                raise _Bad("\\Recent cannot be stored")
            if flag.lower() not in flaglib.SYSTEM:
                raise _Bad(f"Unknown system flag {flag}")
        out.append(flag)
    return out


def _qresync_params(c):
    """``(uidvalidity, modseq, known_uids or None, seq_match or None)``."""
    c.expect(b"(")
    uidvalidity = c.number("a UIDVALIDITY", nonzero=True)
    c.sp()
    modseq = c.number("a mod-sequence value")
    known = matches = None
    if c.peek() == b" ":
        c.sp()
        if c.peek() != b"(":
            known = c.sequence_set()
            if c.peek() == b" ":
                c.sp()
        if c.peek() == b"(":
            c.expect(b"(")
            seqs = c.sequence_set()
            c.sp()
            uids = c.sequence_set()
            c.expect(b")")
            matches = (seqs, uids)
    c.expect(b")")
    return uidvalidity, modseq, known, matches


def _coalesced(updates, silenced=None):
    """``updates`` with the flag changes of one message between two other pieces of
    news told once, as the message is now, in sequence order (as Dovecot tells them),
    after the mailbox's keywords if they grew meanwhile (told once too).
    A change this session made with .SILENT (``silenced``: UID -> its MODSEQ) is not
    echoed, unless another change to the message came with it."""
    out, run, keywords = [], {}, []

    def flush():
        # The mailbox's keywords as they are now, before the FETCHes that use them.
        out.extend(keywords[-1:])
        keywords.clear()
        for update, quiet in sorted(run.values(), key=lambda pair: pair[0].seq):
            if not quiet:
                out.append(update)
        run.clear()

    for update in updates:
        if update.kind == "keywords":
            keywords.append(update)
            continue
        if update.kind != "flags":
            flush()
            out.append(update)
            continue
        quiet = silenced is not None and silenced.get(update.uid) == update.modseq
        earlier = run.get(update.uid)
        run[update.uid] = (update, quiet and (earlier is None or earlier[1]))
    flush()
    return out


def _compress(numbers):
    """Numbers as a compact sequence set: 1:3,7,9:10."""
    return b",".join(b"%d" % low if low == high else b"%d:%d" % (low, high)
                     for low, high in runs(numbers))


def is_loopback(host):
    """Whether ``host`` (an IP address as text) is this machine's loopback."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    # A dual-stack socket shows an IPv4 peer as ::ffff:a.b.c.d.
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


class IMAPServerFactory(protocol.ServerFactory):
    """Serves one account's mail.  ``account`` may be set after construction (the
    daemon creates it once twistd has forked), but before listening starts."""

    noisy = False  # "Starting factory ..." says nothing the listening line does not

    def __init__(self, account, username, password, context_factory=None,
                 appendlimit=APPENDLIMIT, cleartext_allowed=None):
        self.account = account
        #: Whether a peer (its address) may send a password outside TLS.
        self.cleartext_allowed = cleartext_allowed or is_loopback
        self.context_factory = context_factory
        self.appendlimit = appendlimit
        self.portal = Portal(AccountRealm(self), [ClientPasswordChecker(username, password)])
        self.throttle = Throttle()

    def buildProtocol(self, addr):
        return LeapIMAPServer(self, self.context_factory)
