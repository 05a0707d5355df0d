"""A small ESMTP client written as coroutines, for relaying to a submission port or a
smarthost: several messages per connection, per-recipient results, STARTTLS, AUTH
PLAIN, and message bytes taken from an async source a piece at a time.

Twisted's ``ESMTPClient`` reads a message from a file-like object on the reactor; a
queued message here sits in the encrypted store and comes out in chunks on store
threads, and writing it to a plaintext temporary file just to send it is not an option.
"""

import base64

from twisted.internet import defer, interfaces, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from zope.interface import implementer

#: Longest reply line taken from a server.
MAX_REPLY_LINE = 4096
#: Lines of one reply taken.
MAX_REPLY_LINES = 100
#: Seconds to wait for any one reply (RFC 5321 4.5.3.2 suggests 5 to 10 minutes; a
#: submission server on the provider answers in well under this).
REPLY_TIMEOUT = 300


class SMTPClientError(Exception):
    """The conversation failed: ``code`` is the server's reply code, or 0 when the
    connection failed or broke (always worth retrying)."""

    def __init__(self, code, text):
        super().__init__(f"{code} {text}" if code else text)
        self.code, self.text = code, text

    @property
    def permanent(self):
        return 500 <= self.code < 600


class _ReplyReader(protocol.Protocol):
    def __init__(self, reactor, reply_timeout):
        self._reactor = reactor
        self._reply_timeout = reply_timeout
        self._buffer = bytearray()
        self._lines = []
        self._replies = []
        self._waiting = None
        self._lost = None

    def connectionLost(self, reason=None):
        self._lost = SMTPClientError(0, f"connection lost: {reason.getErrorMessage()}"
                                     if reason is not None else "connection lost")
        self._wake()

    def dataReceived(self, data):
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    self._lost = SMTPClientError(0, "the server sent an overlong line")
                    self.transport.abortConnection()
                    self._wake()
                return
            line = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[:end + 1]
            self._lines.append(line)
            if len(self._lines) > MAX_REPLY_LINES:
                self._lost = SMTPClientError(0, "the server sent an overlong reply")
                self.transport.abortConnection()
                self._wake()
                return
            if line[3:4] != b"-":
                try:
                    code = int(line[:3])
                except ValueError:
                    code = 0
                text = "\n".join(line[4:].decode("utf-8", "replace") for line in self._lines)
                self._lines = []
                self._replies.append((code, text))
                self._wake()

    def _wake(self):
        if self._waiting is not None and (self._replies or self._lost):
            d, self._waiting = self._waiting, None
            d.callback(None)

    async def reply(self):
        while not self._replies:
            if self._lost is not None:
                raise self._lost
            self._waiting = defer.Deferred()
            # A server that stops answering must not hold the relay (or the daemon's
            # shutdown) forever.
            timer = self._reactor.callLater(self._reply_timeout, self._timed_out)
            try:
                await self._waiting
            finally:
                if timer.active():
                    timer.cancel()
        return self._replies.pop(0)

    def _timed_out(self):
        self._lost = SMTPClientError(0, f"no answer in {self._reply_timeout} seconds")
        self.transport.abortConnection()
        self._wake()


@implementer(interfaces.IPushProducer)
class _Flow:
    """Told by the transport when its send buffer is full: the message is written no
    faster than the peer reads it, so a 50 MB message is never all in memory."""

    def __init__(self):
        self._paused = None

    def pauseProducing(self):
        if self._paused is None:
            self._paused = defer.Deferred()

    def resumeProducing(self):
        d, self._paused = self._paused, None
        if d is not None:
            d.callback(None)

    stopProducing = resumeProducing

    async def ready(self):
        if self._paused is not None:
            await self._paused


class SMTPConnection:
    """One connection.  ``await SMTPConnection.open(...)`` then :meth:`send`, then
    :meth:`close`."""

    def __init__(self, reader):
        self._reader = reader
        self.extensions = {}

    @classmethod
    async def open(cls, reactor, host, port, helo, tls=None, require_tls=False,
                   username=None, password=None, timeout=30, reply_timeout=REPLY_TIMEOUT):
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
        try:
            reader = await connectProtocol(endpoint, _ReplyReader(reactor, reply_timeout))
        except Exception as e:
            raise SMTPClientError(0, f"cannot connect to {host}:{port}: {e}") from None
        self = cls(reader)
        # Commands and message pieces are small writes whose answers we wait for:
        # Nagle's algorithm would hold each behind a delayed ACK.
        reader.transport.setTcpNoDelay(True)
        try:
            await self._expect(220)
            await self._ehlo(helo)
            if tls is not None and "STARTTLS" in self.extensions:
                await self._command(b"STARTTLS", 220)
                reader.transport.startTLS(tls)
                await self._ehlo(helo)
            elif require_tls:
                raise SMTPClientError(0, f"{host}:{port} does not offer STARTTLS")
            if username is not None:
                plain = base64.b64encode(b"\0" + username.encode() + b"\0" + password.encode())
                await self._command(b"AUTH PLAIN " + plain, 235)
        except BaseException:
            reader.transport.abortConnection()
            raise
        return self

    async def _ehlo(self, helo):
        code, text = await self._command(b"EHLO " + helo.encode("ascii"), 250)
        self.extensions = {}
        for line in text.split("\n")[1:]:
            name, _, value = line.partition(" ")
            self.extensions[name.upper()] = value

    async def _expect(self, *codes):
        code, text = await self._reader.reply()
        if code not in codes:
            raise SMTPClientError(code, text)
        return code, text

    async def _command(self, line, *codes):
        self._reader.transport.write(line + b"\r\n")
        return await self._expect(*codes)

    async def send(self, sender, recipients, pieces, all_or_nothing=False):
        """Send one message; ``pieces`` is an async iterable of its bytes (CRLF line
        ends).  Returns ``(accepted, refused)``: the recipients the server took, and
        ``[(recipient, code, text)]`` it refused.  Raises :class:`SMTPClientError`
        when the message as a whole was refused (every recipient is then refused
        with that code) or the connection failed.

        ``all_or_nothing``: send nothing unless every recipient is accepted (then
        ``accepted`` is empty and ``refused`` names the ones refused)."""
        write = self._reader.transport.write
        mail = b"MAIL FROM:<" + sender.encode() + b">\r\n"
        rcpts = [b"RCPT TO:<" + r.encode() + b">\r\n" for r in recipients]
        accepted, refused = [], []
        if "PIPELINING" in self.extensions:
            # RFC 2920: the envelope in one write, the replies read in order after.
            write(mail + b"".join(rcpts))
            code, text = await self._reader.reply()
            replies = [await self._reader.reply() for _ in rcpts]
            if code != 250:
                raise SMTPClientError(code, text)
        else:
            write(mail)
            await self._expect(250)
            replies = []
            for line in rcpts:
                write(line)
                replies.append(await self._reader.reply())
        for rcpt, (code, text) in zip(recipients, replies):
            if code in (250, 251):
                accepted.append(rcpt)
            else:
                refused.append((rcpt, code, text))
        if not accepted or (refused and all_or_nothing):
            await self._command(b"RSET", 250)
            return [], refused
        await self._command(b"DATA", 354)
        last = b"\n"
        flow = _Flow()
        transport = self._reader.transport
        transport.registerProducer(flow, True)
        try:
            async for piece in pieces:
                if not piece:
                    continue
                # Dot-stuffing (RFC 5321 4.5.2), also across piece boundaries.
                stuffed = piece.replace(b"\n.", b"\n..")
                if last == b"\n" and piece[:1] == b".":
                    stuffed = b"." + stuffed
                write(stuffed)
                last = piece[-1:]
                await flow.ready()
        finally:
            transport.unregisterProducer()
        write(b".\r\n" if last == b"\n" else b"\r\n.\r\n")
        await self._expect(250)
        return accepted, refused

    def abort(self):
        """Cut the connection now (at shutdown): what is under way fails as a
        connection failure, to be retried."""
        self._reader.transport.abortConnection()

    async def reset(self):
        await self._command(b"RSET", 250)

    async def close(self):
        try:
            self._reader.transport.write(b"QUIT\r\n")
            await self._reader.reply()
        except Exception:
            pass
        finally:
            self._reader.transport.loseConnection()
