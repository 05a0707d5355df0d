"""An authenticated ESMTP server (RFC 5321) for mail submission, policy left to a backend.

Both the daemon's local SMTP and the provider's submission port speak it; what differs
(who may log in, which senders and recipients are allowed, where a message goes) is the
:class:`Backend` each passes in.  Not Twisted's ``twisted.mail.smtp.ESMTP``: that one
answers pipelined commands while an earlier one is still being decided (a 250 for
DATA may come after the reply to the next MAIL), reads DATA line by line through
``LineReceiver`` (a copy of the rest of the buffer per line, quadratic in the read
size), and hands each recipient its own copy of the message.

Here one command is handled at a time, in order: while a backend call is under way the
connection stops reading (so a pipelining client's backlog is bounded by one socket
read), and the message streams to the backend in pieces as it arrives.  Every buffer
a client controls is bounded: command lines (:data:`MAX_COMMAND`), the header block
(:data:`MAX_HEADER`), the message (``max_size``, the SIZE extension) and the number of
recipients.
"""

import base64
import binascii
import re

from twisted.internet import defer, interfaces, protocol
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.python.failure import Failure
from zope.interface import implementer

#: Longest command line taken (RFC 5321 allows 512; AUTH's initial response is longer).
MAX_COMMAND = 4096
#: A header block larger than this is refused (it is checked for 8-bit bytes whole).
MAX_HEADER = 1024 * 1024
#: Bytes handed to the backend at once.
PIECE = 256 * 1024
#: Bad commands tolerated in one connection before it is closed.
MAX_ERRORS = 10
#: Failed AUTH attempts tolerated in one connection before it is closed.
MAX_AUTH_FAILURES = 3

_ADDRESS = re.compile(rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})")
_MAIL = re.compile(rb"FROM:\s*<([^<>]*)>((?:\s+\S+)*)\s*", re.I)
_RCPT = re.compile(rb"TO:\s*<([^<>]*)>((?:\s+\S+)*)\s*", re.I)


class Reply(Exception):
    """An SMTP reply to send instead of success: ``Reply(550, "5.7.1", "why")``."""

    def __init__(self, code, status, text):
        super().__init__(f"{code} {status} {text}")
        self.code, self.status, self.text = code, status, text


def valid_address(address):
    """``address`` (bytes) is a plain ``local@domain`` (no quoting, no source route)."""
    return _ADDRESS.fullmatch(address) is not None and b".." not in address \
        and not address.startswith(b".") and len(address) <= 254


class Backend:
    """What a server's policy supplies.  Every method may return a Deferred or be
    a coroutine; raising :class:`Reply` refuses with that reply."""

    def authenticate(self, username, password):
        """The identity (the address it may send as) or ``None`` if refused."""
        raise NotImplementedError

    def check_sender(self, identity, address):
        """Refuse an envelope sender this identity may not use."""

    def check_recipient(self, identity, address):
        """Refuse a recipient."""

    def receiver(self, identity, sender, recipients, peer):
        """An object with ``write(bytes)`` (may return a Deferred to pace the client),
        ``finish()`` (a Deferred firing once the message is safe, with the text of the
        250) and ``abort()``."""
        raise NotImplementedError


@implementer(interfaces.IPushProducer)
class SMTPServer(protocol.Protocol, policies.TimeoutMixin):
    log = Logger()
    timeout = 300

    def __init__(self, backend, hostname, tls=None, require_tls=False,
                 max_size=50 * 1024 * 1024, max_recipients=100):
        self.backend = backend
        self.hostname = hostname.encode("ascii") if isinstance(hostname, str) else hostname
        self.tls = tls
        self.require_tls = require_tls
        self.max_size = max_size
        self.max_recipients = max_recipients
        self._buffer = bytearray()
        self._busy = False
        self._paused = False
        self._mode = "command"
        self._secure = False
        self._helo = None
        self._identity = None
        self._errors = 0
        self._auth_failures = 0
        self._auth_step = None
        self._reset_transaction()

    # -- connection ------------------------------------------------------------------

    def connectionMade(self):
        # Replies to pipelined commands go out one by one as each is decided: with
        # Nagle's algorithm each would wait for the ACK of the one before (a delayed
        # ACK, 40 ms).
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self.setTimeout(self.timeout)
        self._reply(220, None, self.hostname.decode() + " ESMTP ready")

    def connectionLost(self, reason=None):
        self.setTimeout(None)
        self._abort_message()

    def timeoutConnection(self):
        self._reply(421, "4.4.2", "idle too long; closing the connection")
        self.transport.loseConnection()

    # The transport's producer is paused while a backend call is under way, so the
    # read buffer stays bounded; these are for registering this protocol as one.
    def pauseProducing(self):
        self.transport.pauseProducing()

    def resumeProducing(self):
        self.transport.resumeProducing()

    def stopProducing(self):
        self.transport.loseConnection()

    def _reply(self, code, status, text):
        if self.transport is None or self.transport.disconnecting:
            return
        lines = text.split("\n") if text else [""]
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            prefix = f"{code}{sep}" + (f"{status} " if status else "")
            out.append((prefix + line).encode("utf-8", "replace") + b"\r\n")
        self.transport.write(b"".join(out))

    def _close(self, code, status, text):
        self._reply(code, status, text)
        self._buffer = bytearray()
        self.transport.loseConnection()

    # -- input -----------------------------------------------------------------------

    def dataReceived(self, data):
        self.resetTimeout()
        self._buffer += data
        self._process()

    def _process(self):
        buf = self._buffer
        pos = 0
        try:
            # A new buffer (STARTTLS threw the old one away) ends this pass.
            while (pos < len(buf) and not self._busy and self._buffer is buf
                   and not self.transport.disconnecting):
                if self._mode == "data":
                    moved = self._data(buf, pos)
                    if moved is None:
                        break  # an incomplete line that starts with a dot
                    pos = moved
                    continue
                end = buf.find(b"\n", pos)
                if end < 0:
                    if len(buf) - pos > MAX_COMMAND:
                        self._close(500, "5.5.2", "line too long")
                        return
                    break
                line = bytes(buf[pos:end]).rstrip(b"\r")
                pos = end + 1
                if len(line) > MAX_COMMAND:
                    self._close(500, "5.5.2", "line too long")
                    return
                self._line(line)
        finally:
            if self._buffer is buf:
                del buf[:pos]
        if self._busy and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _wait_for(self, d, done):
        """Run ``done(result)`` when ``d`` fires; meanwhile read nothing more."""
        self._busy = True
        inline = True

        def finished(result):
            self._busy = False
            if isinstance(result, Failure):
                result = result.value
            if self.transport is None or self.transport.disconnecting:
                return None
            try:
                done(result)
            except Exception:
                self.log.failure("SMTP command failed")
                self._reply(451, "4.3.0", "local error; try again later")
            # Fired at once: the loop in _process that called us goes on by itself.
            if not inline and not self._busy:
                if self._paused:
                    self._paused = False
                    self.transport.resumeProducing()
                self._process()
            return None

        d.addBoth(finished)
        inline = False

    def _call(self, fn, *args, done):
        self._wait_for(defer.ensureDeferred(_call_async(fn, *args)), done)

    def _ask(self, fn, *args, accepted):
        """:meth:`_call` for a backend check: a :class:`Reply` it raises or returns is
        the answer to the client, an error goes on up; else ``accepted(result)``."""
        def done(result):
            if isinstance(result, Reply):
                self._reply(result.code, result.status, result.text)
            elif isinstance(result, Exception):
                raise result
            else:
                accepted(result)

        self._call(fn, *args, done=done)

    def _line(self, line):
        if self._auth_step is not None:
            step, self._auth_step = self._auth_step, None
            step(line)
            return
        verb, _, rest = line.partition(b" ")
        handler = getattr(self, "do_" + verb.upper().decode("ascii", "replace"), None)
        if handler is None:
            self._error(500, "5.5.1", "command not recognized")
            return
        handler(rest.strip())

    def _error(self, code, status, text):
        self._errors += 1
        if self._errors > MAX_ERRORS:
            self._close(421, "4.7.0", "too many errors; closing the connection")
        else:
            self._reply(code, status, text)

    # -- session commands -------------------------------------------------------------

    def _extensions(self):
        ext = ["PIPELINING", f"SIZE {self.max_size}", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self.tls is not None and not self._secure:
            ext.append("STARTTLS")
        if self._identity is None and (self._secure or not self.require_tls):
            ext.append("AUTH PLAIN LOGIN")
        return ext

    def do_EHLO(self, rest):
        if not rest:
            self._error(501, "5.5.4", "EHLO needs a domain or address literal")
            return
        self._helo = rest[:255]
        self._reset_transaction()
        self._reply(250, None, "\n".join([self.hostname.decode()] + self._extensions()))

    def do_HELO(self, rest):
        if not rest:
            self._error(501, "5.5.4", "HELO needs a domain")
            return
        self._helo = rest[:255]
        self._reset_transaction()
        self._reply(250, None, self.hostname.decode())

    def do_NOOP(self, rest):
        self._reply(250, "2.0.0", "OK")

    def do_RSET(self, rest):
        self._reset_transaction()
        self._reply(250, "2.0.0", "OK")

    def do_QUIT(self, rest):
        self._close(221, "2.0.0", "bye")

    def do_VRFY(self, rest):
        self._reply(252, "2.5.2", "cannot verify; send and see")

    def do_STARTTLS(self, rest):
        if self.tls is None or self._secure:
            self._error(503, "5.5.1", "STARTTLS not available now")
            return
        # Anything pipelined after STARTTLS came in the clear: it must not count as
        # said inside TLS (CVE-2011-0411, the plaintext command injection).
        self._buffer = bytearray()
        self._reply(220, "2.0.0", "ready to start TLS")
        self.transport.startTLS(self.tls)
        self._secure = True
        self._helo = None
        self._identity = None
        self._reset_transaction()

    # -- AUTH (RFC 4954) ---------------------------------------------------------------

    def do_AUTH(self, rest):
        if self._identity is not None:
            self._error(503, "5.5.1", "already authenticated")
            return
        if self.require_tls and not self._secure:
            self._error(538, "5.7.11", "encryption required: use STARTTLS before AUTH")
            return
        if self._mail_from is not None:
            self._error(503, "5.5.1", "AUTH not allowed during a mail transaction")
            return
        mechanism, _, initial = rest.partition(b" ")
        mechanism = mechanism.upper()
        if mechanism == b"PLAIN":
            if initial:
                self._auth_plain(initial.strip())
            else:
                self._auth_step = self._auth_plain
                self._reply(334, None, "")
        elif mechanism == b"LOGIN":
            if initial:
                self._auth_login_user(initial.strip())
            else:
                self._auth_step = self._auth_login_user
                self._reply(334, None, "VXNlcm5hbWU6")
        else:
            self._error(504, "5.5.4", "unsupported mechanism; use PLAIN or LOGIN")

    def _decode(self, line):
        if line == b"*":
            self._reply(501, "5.0.0", "authentication cancelled")
            return None
        try:
            return base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._error(501, "5.5.2", "cannot decode the response (base64 expected)")
            return None

    def _auth_plain(self, line):
        data = self._decode(line)
        if data is None:
            return
        parts = data.split(b"\0")
        if len(parts) != 3:
            self._error(501, "5.5.2", "malformed PLAIN response")
            return
        authzid, user, password = parts
        if authzid and authzid != user:
            self._auth_failed()
            return
        self._check_login(user, password)

    def _auth_login_user(self, line):
        user = self._decode(line)
        if user is None:
            return
        self._auth_step = lambda line: self._auth_login_password(user, line)
        self._reply(334, None, "UGFzc3dvcmQ6")

    def _auth_login_password(self, user, line):
        password = self._decode(line)
        if password is not None:
            self._check_login(user, password)

    def _check_login(self, user, password):
        try:
            user = user.decode("utf-8")
            password = password.decode("utf-8")
        except UnicodeDecodeError:
            self._auth_failed()
            return

        def done(result):
            if isinstance(result, Exception) or result is None:
                if isinstance(result, Exception) and not isinstance(result, Reply):
                    self.log.error("SMTP authentication failed: {error}", error=result)
                self._auth_failed()
            else:
                self._identity = result
                self._reply(235, "2.7.0", "authenticated")

        self._call(self.backend.authenticate, user, password, done=done)

    def _auth_failed(self):
        self._auth_failures += 1
        if self._auth_failures >= MAX_AUTH_FAILURES:
            self._close(421, "4.7.0", "too many failed logins; closing the connection")
        else:
            self._reply(535, "5.7.8", "authentication credentials invalid")

    # -- the mail transaction -----------------------------------------------------------

    def _reset_transaction(self):
        self._mail_from = None
        self._recipients = []
        self._abort_message()

    def _abort_message(self):
        receiver = getattr(self, "_receiver", None)
        self._receiver = None
        if receiver is not None:
            try:
                receiver.abort()
            except Exception:
                self.log.failure("could not abort a message")

    def do_MAIL(self, rest):
        if self._helo is None:
            self._error(503, "5.5.1", "say EHLO first")
            return
        if self._identity is None:
            self._error(530, "5.7.0", "authentication required")
            return
        if self._mail_from is not None:
            self._error(503, "5.5.1", "nested MAIL command")
            return
        match = _MAIL.fullmatch(rest)
        if match is None:
            self._error(501, "5.5.4", "syntax: MAIL FROM:<address> [SIZE=n]")
            return
        address, params = match.group(1), match.group(2).split()
        if not valid_address(address):
            self._error(553, "5.1.7", "the sender address is not a valid address")
            return
        for param in params:
            key, _, value = param.partition(b"=")
            key = key.upper()
            if key == b"SIZE":
                if not value.isdigit():
                    self._error(501, "5.5.4", "SIZE needs a number")
                    return
                if int(value) > self.max_size:
                    self._reply(552, "5.3.4",
                                f"message too big: the limit is {self.max_size} bytes")
                    return
            elif key == b"BODY" and value.upper() in (b"7BIT", b"8BITMIME"):
                pass
            elif key == b"AUTH":
                pass  # RFC 4954 5: a server may ignore it
            else:
                self._error(555, "5.5.4", f"unsupported parameter {key.decode('ascii', 'replace')}")
                return
        sender = address.decode("ascii")

        def accepted(_result):
            self._mail_from = sender
            self._reply(250, "2.1.0", "sender OK")

        self._ask(self.backend.check_sender, self._identity, sender, accepted=accepted)

    def do_RCPT(self, rest):
        if self._mail_from is None:
            self._error(503, "5.5.1", "need MAIL before RCPT")
            return
        match = _RCPT.fullmatch(rest)
        if match is None:
            self._error(501, "5.5.4", "syntax: RCPT TO:<address>")
            return
        address = match.group(1)
        if not valid_address(address):
            self._error(501, "5.1.3", "the recipient address is not a valid address")
            return
        if len(self._recipients) >= self.max_recipients:
            self._reply(452, "4.5.3", f"too many recipients: at most {self.max_recipients}"
                        " per message")
            return
        recipient = address.decode("ascii")

        def accepted(_result):
            if recipient.lower() not in (r.lower() for r in self._recipients):
                self._recipients.append(recipient)
            self._reply(250, "2.1.5", "recipient OK")

        self._ask(self.backend.check_recipient, self._identity, recipient, accepted=accepted)

    def do_DATA(self, rest):
        if self._mail_from is None or not self._recipients:
            self._error(503, "5.5.1", "need MAIL and RCPT before DATA")
            return
        peer = self.transport.getPeer()
        try:
            self._receiver = self.backend.receiver(
                self._identity, self._mail_from, list(self._recipients),
                (self._helo, getattr(peer, "host", str(peer)), self._secure))
        except Reply as e:
            self._reply(e.code, e.status, e.text)
            return
        self._mode = "data"
        self._line_start = True
        self._size = 0
        self._header = bytearray()
        self._in_header = True
        self._data_error = None
        self._piece = bytearray()
        self._reply(354, None, "send the message, end with <CRLF>.<CRLF>")

    def _data(self, buf, pos):
        """Take message bytes from ``buf[pos:]``; returns the new position, or
        ``None`` to wait for more."""
        n = len(buf)
        if self._line_start and buf[pos:pos + 1] == b".":
            end = buf.find(b"\n", pos)
            if end < 0:
                if n - pos > MAX_COMMAND:
                    # A long line starting with a dot: unstuff it and go on.
                    self._take(buf[pos + 1:n])
                    self._line_start = False
                    return n
                return None
            if buf[pos:end].rstrip(b"\r") == b".":
                self._end_of_data()
                return end + 1
            self._take(buf[pos + 1:end + 1])
            return end + 1
        cut = buf.find(b"\n.", pos)
        if cut >= 0:
            self._take(buf[pos:cut + 1])
            self._line_start = True
            return cut + 1
        self._take(buf[pos:n])
        self._line_start = buf[n - 1:n] == b"\n"
        return n

    def _take(self, data):
        if not data or self._data_error is not None:
            return
        self._size += len(data)
        if self._size > self.max_size:
            self._data_error = Reply(552, "5.3.4",
                                     f"message too big: the limit is {self.max_size} bytes")
            self._abort_message()
            return
        if self._in_header:
            self._header += data
            end = _header_end(self._header)
            if end is None and len(self._header) > MAX_HEADER:
                self._data_error = Reply(552, "5.3.4", "the message header is too big")
                self._abort_message()
                return
            if end is not None:
                self._in_header = False
                if not bytes(self._header[:end]).isascii():
                    self._data_error = Reply(
                        554, "5.6.0", "the header has 8-bit bytes: non-ASCII header text "
                        "must be encoded (RFC 2047)")
                    self._abort_message()
                    return
                self._header = None
        self._piece += data
        if len(self._piece) >= PIECE:
            self._flush()

    def _flush(self):
        piece, self._piece = bytes(self._piece), bytearray()
        try:
            result = self._receiver.write(piece)
        except Exception as e:
            self._fail_data(e)
            return
        if isinstance(result, defer.Deferred) and not result.called:
            self._wait_for(result, lambda r: self._fail_data(r) if isinstance(
                r, Exception) else None)
        elif isinstance(result, defer.Deferred):
            result.addErrback(lambda f: self._fail_data(f.value))

    def _fail_data(self, error):
        if isinstance(error, Failure):
            error = error.value
        if self._data_error is None:
            if not isinstance(error, Reply):
                self.log.error("could not store a message: {error}", error=error)
                error = Reply(451, "4.3.0", "could not store the message; try again later")
            self._data_error = error
            self._abort_message()

    def _end_of_data(self):
        self._mode = "command"
        if self._in_header and self._data_error is None and self._header is not None:
            if not bytes(self._header).isascii():
                self._data_error = Reply(554, "5.6.0", "the header has 8-bit bytes: "
                                         "non-ASCII header text must be encoded (RFC 2047)")
                self._abort_message()
        if self._data_error is not None:
            error, self._data_error = self._data_error, None
            self._reset_transaction()
            self._reply(error.code, error.status, error.text)
            return
        receiver = self._receiver
        if self._piece:
            # Not paced: finish() waits for every write before it.
            piece, self._piece = bytes(self._piece), bytearray()
            try:
                written = receiver.write(piece)
            except Exception as e:
                self._fail_data(e)
            else:
                if isinstance(written, defer.Deferred):
                    written.addErrback(self._fail_data)

        async def finish():
            if self._data_error is not None:
                raise self._data_error
            return await receiver.finish()

        def done(result):
            self._receiver = None  # finished or aborted by itself: nothing to abort
            error, self._data_error = self._data_error, None
            self._mail_from, self._recipients = None, []
            if isinstance(result, Exception):
                result = error or result
                if not isinstance(result, Reply):
                    self.log.error("could not take a message: {error}", error=result)
                    result = Reply(451, "4.3.0", "could not take the message; try again later")
                try:
                    receiver.abort()
                except Exception:
                    pass
                self._reply(result.code, result.status, result.text)
            else:
                self._reply(250, "2.0.0", result or "OK")

        self._wait_for(defer.ensureDeferred(finish()), done)


def _header_end(header):
    """Where the header block ends in ``header`` (the offset of its blank line), or
    ``None`` if it has not ended yet."""
    if header[:2] == b"\r\n" or header[:1] == b"\n":
        return 0
    ends = [i for i in (header.find(b"\n\r\n"), header.find(b"\n\n")) if i >= 0]
    return min(ends) + 1 if ends else None


async def _call_async(fn, *args):
    try:
        result = fn(*args)
        if isinstance(result, defer.Deferred) or hasattr(result, "__await__"):
            result = await result
        return result
    except Reply as e:
        return e
    except Exception as e:
        return e
