"""Twisted's ``IMAP4Client`` with IDLE, EXPUNGE news and UIDPLUS results.

Twisted's client queues untagged responses that arrive during a command and hands
them over only when the command completes; for IDLE, which completes when the client
says DONE, that would mean never.  Here, untagged responses that arrive while IDLE is
running are delivered at once.  Twisted also drops ``EXPUNGE`` news ("unhandled
unsolicited response"); here every piece of mailbox news goes to a listener:

- ``exists(count)``, ``recent(count)``: ``* n EXISTS`` / ``* n RECENT``;
- ``expunged(seq)``: ``* n EXPUNGE``;
- ``flags_changed(seq, flags, uid)``: ``* n FETCH (... FLAGS (...) ...)``
  (``uid`` is ``None`` unless the server sent it).
"""

import re

from twisted.internet import defer
from twisted.mail import imap4
from twisted.mail.imap4 import Command, IMAP4Client, IMAP4Exception
from twisted.python.failure import Failure

_UIDPLUS = re.compile(rb"\[(APPENDUID|COPYUID) ([0-9]+) ([0-9:,]+)(?: ([0-9:,]+))?\]")


class MailboxListener:
    """What an application hears; override what it needs."""

    def exists(self, count):
        pass

    def recent(self, count):
        pass

    def expunged(self, seq):
        pass

    def flags_changed(self, seq, flags, uid):
        pass


class IdleClient(IMAP4Client):
    """An ``IMAP4Client`` that can IDLE and reports all mailbox news to ``listener``."""

    #: Largest literal taken from the server (None: any).  Twisted keeps a literal
    #: whole (in memory once read), so a bigger one ends the connection instead.
    max_literal = None
    #: The size of the literal refused for being over ``max_literal``, if one was.
    literal_refused = None

    def __init__(self, contextFactory=None):
        super().__init__(contextFactory)
        self.listener = MailboxListener()
        self._idle = None  # (tag, Deferred of the continuation) while IDLE runs
        self.greeted = defer.Deferred()
        self.lost = defer.Deferred()

    def serverGreeting(self, caps):
        if not self.greeted.called:
            self.greeted.callback(caps)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if not self.greeted.called:
            self.greeted.errback(reason)
        if not self.lost.called:
            # The reason as a plain value: losing the connection is news, not an error
            # someone must consume (a Failure nobody handles is logged as unhandled).
            self.lost.callback(reason.value)

    def _setupForLiteral(self, rest, octets):
        if self.max_literal is not None and octets > self.max_literal:
            self.literal_refused = octets
            self.transport.abortConnection()
            return
        super()._setupForLiteral(rest, octets)

    # -- news --------------------------------------------------------------------------

    def _extraInfo(self, lines):
        for response in lines:
            self._news(response)

    def _news(self, response):
        if len(response) >= 2 and isinstance(response[1], bytes):
            what = response[1].upper()
            try:
                number = int(response[0])
            except (TypeError, ValueError):
                return
            if what == b"EXISTS":
                self.listener.exists(number)
            elif what == b"RECENT":
                self.listener.recent(number)
            elif what == b"EXPUNGE":
                self.listener.expunged(number)
            elif what == b"FETCH" and len(response) >= 3 and isinstance(response[2], list):
                items = response[2]
                values = dict(zip(items[0::2], items[1::2]))
                flags = values.get(b"FLAGS")
                if isinstance(flags, list):
                    uid = values.get(b"UID")
                    self.listener.flags_changed(
                        number, [f.decode("utf-8", "replace") for f in flags],
                        int(uid) if uid is not None else None)

    def _defaultHandler(self, tag, rest):
        if (self._idle is not None and tag in (b"*", b"+")
                and self.tags.get(self.waiting) is self._idle[0]):
            if tag == b"+":
                if not self._idle[1].called:
                    self._idle[1].callback(None)
            else:
                self._news(imap4.parseNestedParens(rest))
            return
        super()._defaultHandler(tag, rest)

    def noop(self):
        """NOOP, its news delivered to the listener (Twisted only returns it)."""
        d = self.sendCommand(Command(b"NOOP"))

        def deliver(result):
            lines, _ = result
            self._extraInfo(lines)
            return lines

        return d.addCallback(deliver)

    # -- IDLE --------------------------------------------------------------------------

    @property
    def idling(self):
        return self._idle is not None

    def idle(self):
        """Start IDLE; fires once the server accepted it (its ``+`` continuation).

        News then reaches the listener as it comes, until :meth:`done`.  If another
        command is running, IDLE goes out after it.
        """
        if self._idle is not None:
            return defer.fail(IMAP4Exception("already idling"))
        accepted = defer.Deferred()
        command = Command(b"IDLE", continuation=lambda _: None)
        self._idle = (command, accepted)
        finished = self.sendCommand(command)
        self._idle_end = None

        def ended(result):
            self._idle = None
            if not accepted.called:
                if isinstance(result, Failure):
                    accepted.errback(result)
                else:
                    accepted.errback(IMAP4Exception("IDLE ended before it began"))
            elif self._idle_end is not None:
                self._idle_end.callback(None) if not isinstance(result, Failure) \
                    else self._idle_end.errback(result)
            # Else the connection went while idling: connectionLost tells the owner.

        finished.addBoth(ended)
        return accepted

    def done(self):
        """End IDLE: send DONE; fires when the server has completed the IDLE command."""
        if self._idle is None:
            return defer.succeed(None)
        if self._idle_end is None:
            self._idle_end = defer.Deferred()
            self.sendLine(b"DONE")
        return self._idle_end

    # -- UIDPLUS -----------------------------------------------------------------------

    def append_uid(self, mailbox, message, flags=(), date=None):
        """APPEND; fires with ``(uidvalidity, uid)`` from APPENDUID, or ``None``."""
        d = self.append(mailbox, message, flags, date)
        return d.addCallback(lambda result: _uidplus(result, b"APPENDUID"))

    def copy_uids(self, messages, mailbox, uid=True):
        """COPY; fires with ``(uidvalidity, source uid set, new uid set)`` from
        COPYUID (sets as the server wrote them), or ``None``."""
        d = self.copy(messages, mailbox, uid)
        return d.addCallback(lambda result: _uidplus(result, b"COPYUID"))


def _uidplus(result, code):
    _, tagline = result
    match = _UIDPLUS.search(tagline)
    if not match or match.group(1) != code:
        return None
    if code == b"APPENDUID":
        return int(match.group(2)), int(match.group(3))
    return int(match.group(2)), match.group(3).decode(), (match.group(4) or b"").decode()
