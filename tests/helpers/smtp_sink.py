"""A smarthost for tests: Twisted's own ESMTP server, keeping what it receives.

    python smtp_sink.py DIR

Prints ``sink listening on 127.0.0.1:PORT``.  Every accepted message is written, once
per recipient, to ``DIR/<n>-<recipient>.eml`` (atomically: a reader never sees half a
file), exactly as received after the end-of-data dot (CRLF line ends).  A recipient
whose local part starts with ``reject`` is refused with ``550 5.1.1``; one starting
with ``later`` with ``451 4.3.0``.
"""

import itertools
import os
import sys

from twisted.internet import defer, reactor
from twisted.mail import smtp
from zope.interface import implementer

OUT = sys.argv[1]
COUNTER = itertools.count(1)


@implementer(smtp.IMessage)
class Message:
    def __init__(self, recipient):
        self.recipient = recipient
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line)

    def eomReceived(self):
        name = f"{next(COUNTER):04d}-{self.recipient}.eml"
        tmp = os.path.join(OUT, "." + name)
        with open(tmp, "wb") as f:
            f.write(b"".join(line + b"\r\n" for line in self.lines))
        os.rename(tmp, os.path.join(OUT, name))
        return defer.succeed(None)

    def connectionLost(self):
        self.lines = []


@implementer(smtp.IMessageDelivery)
class Delivery:
    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        local = user.dest.local.decode()
        if local.startswith("reject"):
            raise smtp.SMTPBadRcpt(user, code=550, resp="5.1.1 no such user at the sink")
        if local.startswith("later"):
            raise smtp.SMTPBadRcpt(user, code=451, resp="4.3.0 try again later")
        recipient = str(user.dest)
        return lambda: Message(recipient)


class Factory(smtp.SMTPFactory):
    def buildProtocol(self, addr):
        p = smtp.ESMTP()
        p.delivery = Delivery()
        p.factory = self
        p.host = b"sink.test"
        return p


port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
print(f"sink listening on 127.0.0.1:{port.getHost().port}", flush=True)
reactor.run()
