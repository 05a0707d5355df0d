"""The provider's MX: an ESMTP server (RFC 5321) for the provider's accounts.

It accepts mail for accounts that can receive (:meth:`Intake.accepts
<leapmail.provider.intake.Intake.accepts>`), seals it as it arrives through the
:class:`~leapmail.provider.intake.Intake`, and answers 250 only once every recipient's
sealed copy is committed.  Replies, all with enhanced status codes (RFC 3463):

- ``550 5.1.1`` for an address of one of our domains without an account (or one that
  has not registered an incoming key yet), ``550 5.7.1`` for anyone else's domain (no
  relaying);
- ``552 5.3.4`` for a message over the size limit: at ``MAIL FROM ... SIZE=`` when the
  client declares it (RFC 1870), else at the end of DATA, having stored nothing;
- ``452 4.5.3`` past :data:`MAX_RECIPIENTS` recipients of one message;
- ``451 4.3.0`` when the message could not be stored (try again later).

The message is taken byte for byte (8BITMIME is advertised: 8-bit bytes in headers
and body are kept as they came); the provider adds one ``Received:`` header in front.
A connection that drops before the final ``.`` stores nothing.

Pipelining (RFC 2920): commands are answered strictly in order.  While a command
waits for the database (RCPT's lookup, the final commit), the connection stops reading
and the lines already read wait in a queue, which one read of the socket bounds.
Every line is bounded (:data:`MAX_LINE`), and a client making too many errors is
disconnected.
"""

import email.utils
import secrets
from collections import deque

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.mail import smtp

from leapmail.provider.intake import IntakeError, normalize

#: Recipients of one message (RFC 5321 4.5.3.1.8 asks for at least 100).
MAX_RECIPIENTS = 100
#: The longest line, CRLF excluded: RFC 5321's is 998 for text; real mail sometimes
#: exceeds it, so some slack, but bounded.
MAX_LINE = 64 * 1024
#: Errors one connection may make before it is dropped.
MAX_ERRORS = 20
#: Seconds of silence before the connection is dropped (RFC 5321 4.5.3.2.7: 5 minutes).
IDLE_TIMEOUT = 300


class MXProtocol(smtp.ESMTP):
    log = Logger()
    noisy = False
    timeout = IDLE_TIMEOUT
    MAX_LENGTH = MAX_LINE

    def __init__(self, factory):
        super().__init__(contextFactory=factory.tls)
        self.factory = factory
        self.host = factory.intake.hostname.encode("idna")
        self._queue = deque()
        self._busy = False
        self._receiver = None
        self._data_error = None
        self._errors = 0
        self._closing = False
        self._cut_after_starttls = False

    # -- ordering: one command at a time -------------------------------------------

    def dataReceived(self, data):
        self._cut_after_starttls = False
        super().dataReceived(data)

    def lineReceived(self, line):
        if self._cut_after_starttls:
            return
        if self._busy or self._queue:
            self._queue.append(line)
            return
        self._handle(line)

    def _handle(self, line):
        if self._closing:
            return
        self.resetTimeout()
        getattr(self, "state_" + self.mode)(line)

    def _wait(self, d):
        """Hold further lines until ``d`` (the current command's work) is done."""
        self._busy = True
        self.transport.pauseProducing()
        d.addErrback(self._unexpected)
        d.addBoth(self._resume)

    def _unexpected(self, failure):
        self.log.failure("MX command failed", failure)
        self._reply(451, "4.3.0 local error; try again later")

    def _resume(self, _):
        self._busy = False
        while self._queue and not self._busy and not self._closing:
            self._handle(self._queue.popleft())
        if not self._busy and not self._closing and self.transport is not None:
            self.transport.resumeProducing()

    def _reply(self, code, text):
        if code >= 400:
            self._errors += 1
            if self._errors > MAX_ERRORS:
                self.sendCode(421, b"4.7.0 too many errors; closing the connection")
                self._close()
                return
        self.sendCode(code, text.encode("ascii", "replace"))

    def _close(self):
        self._closing = True
        self._queue.clear()
        self.transport.loseConnection()

    # -- commands --------------------------------------------------------------------

    def extensions(self):
        ext = super().extensions()
        ext.pop(b"AUTH", None)
        ext[b"SIZE"] = [b"%d" % self.factory.intake.max_size]
        ext[b"8BITMIME"] = None
        ext[b"PIPELINING"] = None
        ext[b"ENHANCEDSTATUSCODES"] = None
        return ext

    def greeting(self):
        return self.host + b" ESMTP leapmail"

    def lookupMethod(self, command):
        try:
            command.decode("ascii")
        except UnicodeDecodeError:
            return None
        return super().lookupMethod(command)

    def ext_STARTTLS(self, rest):
        # Whatever was pipelined after STARTTLS came in the clear and must not count as
        # said inside TLS (CVE-2011-0411); and after the handshake the session starts
        # over, EHLO and transaction forgotten (RFC 3207 4.2).
        self._queue.clear()
        self._buffer = b""  # a partial line sent in the clear
        self._cut_after_starttls = True  # the rest of this read, in dataReceived's loop
        tls_before = self.startedTLS
        super().ext_STARTTLS(rest)
        if self.startedTLS and not tls_before:
            self._helo = (None, self._helo[1] if self._helo else None)
            self._from, self._to = None, []

    def do_UNKNOWN(self, rest):
        self._reply(500, "5.5.1 command not recognized")

    def sendSyntaxError(self):
        self._reply(500, "5.5.2 syntax error")

    def do_RSET(self, rest):
        self._from, self._to = None, []
        self._reply(250, "2.0.0 reset")

    def do_NOOP(self, rest):
        self._reply(250, "2.0.0 OK")

    def do_VRFY(self, rest):
        self._reply(252, "2.5.0 cannot verify; send the message and see")

    def do_MAIL(self, rest):
        if not self._helo or self._helo[0] is None:  # Twisted's (None, peer) before HELO
            self._reply(503, "5.5.1 say EHLO first")
            return
        if self._from is not None:
            self._reply(503, "5.5.1 sender already given")
            return
        match = self.mail_re.match(rest)
        if not match:
            self._reply(501, "5.5.4 syntax: MAIL FROM:<address> [SIZE=n] [BODY=8BITMIME]")
            return
        try:
            sender = smtp.Address(match.group("path"), self.host)
        except smtp.AddressError:
            self._reply(553, "5.1.7 malformed sender address")
            return
        for option in (match.group("opts") or b"").split():
            name, _, value = option.partition(b"=")
            name = name.upper()
            if name == b"SIZE":
                if not value.isdigit() or len(value) > 20:
                    self._reply(501, "5.5.4 SIZE takes a number of bytes")
                    return
                if int(value) > self.factory.intake.max_size:
                    self._reply(552, f"5.3.4 message exceeds the size limit of "
                                     f"{self.factory.intake.max_size} bytes")
                    return
            elif name == b"BODY":
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    self._reply(501, "5.5.4 BODY is 7BIT or 8BITMIME")
                    return
            else:
                self._reply(555, "5.5.4 unsupported MAIL parameter")
                return
        self._from, self._to = sender, []
        self._reply(250, "2.1.0 sender OK")

    def do_RCPT(self, rest):
        if self._from is None:
            self._reply(503, "5.5.1 MAIL first")
            return
        match = self.rcpt_re.match(rest)
        if not match or match.group("opts"):
            self._reply(501, "5.5.4 syntax: RCPT TO:<address>")
            return
        path = match.group("path")
        try:
            # Address would complete a bare local part with this host's name.
            address = str(smtp.Address(path, None)) if b"@" in path else None
        except (smtp.AddressError, UnicodeError, ValueError):
            address = None
        if address is None or normalize(address) is None:
            self._reply(553, "5.1.3 malformed recipient address")
            return
        if len(self._to) >= MAX_RECIPIENTS:
            self._reply(452, f"4.5.3 at most {MAX_RECIPIENTS} recipients per message")
            return
        self._wait(defer.ensureDeferred(self._recipient(address)))

    async def _recipient(self, address):
        intake = self.factory.intake
        if await intake.accepts(address):
            self._to.append(address)
            self._reply(250, "2.1.5 recipient OK")
        elif await self.factory.serves(address.rsplit("@", 1)[1]):
            self._reply(550, "5.1.1 no such user here")
        else:
            self._reply(550, "5.7.1 relaying denied: not a domain of this provider")

    def do_DATA(self, rest):
        if self._from is None or not self._to:
            self._reply(503, "5.5.1 MAIL and RCPT first")
            return
        try:
            self._receiver = self.factory.intake.receiver(self._to, self._trace())
        except IntakeError as e:
            self._reply(e.code, e.text)
            return
        self._from, self._to = None, []
        self._data_error = None
        self.mode = smtp.DATA
        self.sendCode(354, b"send the message, end with <CRLF>.<CRLF>")

    def _trace(self):
        helo, peer = self._helo
        helo = _printable(helo or b"unknown")
        peer = peer.decode("ascii", "replace") if isinstance(peer, bytes) else str(peer)
        via = "ESMTPS" if self.startedTLS else "ESMTP"
        recipient = f"\r\n\tfor <{self._to[0]}>" if len(self._to) == 1 else ""
        return (f"Received: from {helo} ([{peer}])\r\n\tby {self.factory.intake.hostname} "
                f"(leapmail) with {via} id {secrets.token_hex(8)}{recipient};\r\n\t"
                f"{email.utils.formatdate()}\r\n").encode("ascii", "replace")

    def dataLineReceived(self, line):
        if line[:1] == b".":
            if line == b".":
                self._end_of_data()
                return
            line = line[1:]
        if self._data_error is not None:
            return
        receiver = self._receiver
        receiver.write(line + b"\r\n")
        if receiver.size > self.factory.intake.max_size:
            receiver.abort()
            self._data_error = (552, f"5.3.4 message exceeds the size limit of "
                                     f"{self.factory.intake.max_size} bytes")

    state_DATA = dataLineReceived

    def _end_of_data(self):
        self.mode = smtp.COMMAND
        receiver, self._receiver = self._receiver, None
        if self._data_error is not None:
            self._reply(*self._data_error)
            return
        self._wait(defer.ensureDeferred(self._finish(receiver)))

    async def _finish(self, receiver):
        try:
            await receiver.finish()
        except IntakeError as e:
            self._reply(e.code, e.text)
        else:
            self._reply(250, "2.0.0 message accepted for delivery")

    def lineLengthExceeded(self, line):
        if self._receiver is not None:
            self._receiver.abort()
            self._receiver = None
        self.sendCode(500, b"5.5.6 line longer than %d bytes; closing" % MAX_LINE)
        self._close()

    def connectionLost(self, reason):
        # Cut off before the final ".": nothing of the message is kept.
        if self._receiver is not None:
            self._receiver.abort()
            self._receiver = None
        self._queue.clear()
        self.mode = smtp.COMMAND
        super().connectionLost(reason)


def _printable(value):
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    text = "".join(c if c.isprintable() and c.isascii() and c not in "()" else "?"
                   for c in text)
    return text[:100]


class MXFactory(protocol.ServerFactory):
    """Builds :class:`MXProtocol`; ``tls``: server TLS options for STARTTLS, or None."""

    noisy = False

    def __init__(self, intake, tls=None):
        self.intake = intake
        self.tls = tls
        self._domains = set()

    def buildProtocol(self, addr):
        p = MXProtocol(self)
        p.factory = self
        return p

    async def serves(self, domain):
        """Whether ``domain`` has accounts here (told 5.1.1, not 5.7.1, for unknown users)."""
        domain = domain.lower()
        if domain in self._domains:
            return True
        if await self.intake._run(self.intake.storage.has_domain, domain):
            if len(self._domains) < 10_000:
                self._domains.add(domain)
            return True
        return False
