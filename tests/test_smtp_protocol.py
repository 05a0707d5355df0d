"""The ESMTP server's parser and ordering, bytes in and replies out (h11 style): what
the real-process tests in test_smtp.py cannot pin down, such as a message arriving one
byte at a time or a backend that answers late while the client pipelines."""

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.testing import StringTransport

from leapmail.smtp.protocol import Backend, Reply, SMTPServer

AUTH = b"AUTH PLAIN AHVzZXJAZXhhbXBsZS5vcmcAc2VjcmV0\r\n"  # user@example.org / secret


class Recording(Backend):
    """Takes everything; ``hold`` makes RCPT wait until the test releases it."""

    def __init__(self):
        self.messages = []
        self.held = []
        self.hold = False
        self.aborted = 0

    def authenticate(self, username, password):
        return username if (username, password) == ("user@example.org", "secret") else None

    def check_recipient(self, identity, address):
        if address.startswith("refuse"):
            raise Reply(550, "5.1.1", "no such user")
        if self.hold:
            d = defer.Deferred()
            self.held.append(d)
            return d
        return None

    def receiver(self, identity, sender, recipients, peer):
        backend = self

        class Receiver:
            data = bytearray()

            def write(self, piece):
                self.data += piece

            def finish(self):
                backend.messages.append((sender, recipients, bytes(self.data)))
                return defer.succeed("queued")

            def abort(self):
                backend.aborted += 1

        return Receiver()


def server(backend, **kw):
    proto = SMTPServer(backend, "test.example", **kw)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def replies(transport):
    out = transport.value().split(b"\r\n")
    transport.clear()
    return [line for line in out if line]


MESSAGE = b"Subject: dots\r\n\r\nline\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n"


def stuffed(message):
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 4096])
def test_a_message_in_pieces_of_any_size_is_taken_byte_exact(step):
    backend = Recording()
    proto, transport = server(backend)
    wire = (b"EHLO me\r\n" + AUTH + b"MAIL FROM:<user@example.org>\r\n"
            b"RCPT TO:<a@b.example>\r\nDATA\r\n" + stuffed(MESSAGE) + b".\r\nQUIT\r\n")
    for i in range(0, len(wire), step):
        proto.dataReceived(wire[i:i + step])
    assert backend.messages == [("user@example.org", ["a@b.example"], MESSAGE)]
    assert replies(transport)[-2:] == [b"250 2.0.0 queued", b"221 2.0.0 bye"]


def test_pipelined_commands_are_answered_in_order_while_the_backend_thinks():
    backend = Recording()
    backend.hold = True
    proto, transport = server(backend)
    proto.dataReceived(b"EHLO me\r\n" + AUTH)
    transport.clear()
    proto.dataReceived(b"MAIL FROM:<user@example.org>\r\nRCPT TO:<a@b.example>\r\n"
                       b"RCPT TO:<refuse@b.example>\r\nDATA\r\n" + stuffed(MESSAGE)
                       + b".\r\nNOOP\r\n")
    # MAIL answered; the first RCPT is being decided, and nothing after it is read.
    assert replies(transport) == [b"250 2.1.0 sender OK"]
    assert transport.producerState == "paused"
    backend.held.pop().callback(None)
    assert replies(transport) == [
        b"250 2.1.5 recipient OK",
        b"550 5.1.1 no such user",
        b"354 send the message, end with <CRLF>.<CRLF>",
        b"250 2.0.0 queued",
        b"250 2.0.0 OK",
    ]
    assert transport.producerState == "producing"
    assert backend.messages == [("user@example.org", ["a@b.example"], MESSAGE)]


def test_a_connection_lost_in_data_aborts_the_message():
    backend = Recording()
    proto, transport = server(backend)
    proto.dataReceived(b"EHLO me\r\n" + AUTH + b"MAIL FROM:<user@example.org>\r\n"
                       b"RCPT TO:<a@b.example>\r\nDATA\r\nSubject: x\r\n\r\nhalf a mess")
    proto.connectionLost(None)
    assert backend.messages == []
    assert backend.aborted == 1


def test_an_empty_line_after_the_header_ends_it_even_across_pieces():
    backend = Recording()
    proto, transport = server(backend)
    proto.dataReceived(b"EHLO me\r\n" + AUTH + b"MAIL FROM:<user@example.org>\r\n"
                       b"RCPT TO:<a@b.example>\r\nDATA\r\nSubject: x\r\n")
    # The blank line ends the header: 8-bit bytes after it are body, and fine.
    proto.dataReceived(b"\r\ncaf\xc3\xa9\r\n.\r\n")
    assert replies(transport)[-1] == b"250 2.0.0 queued"
    assert backend.messages[0][2] == b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n"


@pytest_twisted.ensureDeferred
async def test_the_client_gives_up_on_a_server_that_never_answers():
    from twisted.internet import protocol, reactor

    from leapmail.smtp.client import SMTPClientError, SMTPConnection

    silent = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol),
                               interface="127.0.0.1")
    try:
        with pytest.raises(SMTPClientError) as e:
            await SMTPConnection.open(reactor, "127.0.0.1", silent.getHost().port, "me",
                                      reply_timeout=0.5)
        assert (e.value.code, e.value.text) == (0, "no answer in 0.5 seconds")
    finally:
        await silent.stopListening()
