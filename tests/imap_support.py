"""An in-process IMAP server on a real loopback socket, and raw-protocol clients."""

import imaplib
import socket

import pytest_twisted
from twisted.internet import reactor, threads

from leapmail.imap.server import IMAPServerFactory

USER = "alice@example.org"
PASSWORD = "correct horse battery staple 0123456789"


class Server:
    def __init__(self, account, port, factory):
        self.account = account
        self.port = port
        self.factory = factory
        self.host = "127.0.0.1"

    def imaplib(self, login=True):
        conn = imaplib.IMAP4(self.host, self.port)
        if login:
            conn.login(USER, PASSWORD)
        return conn

    def raw(self, login=True):
        return RawClient(self.host, self.port, login)


@pytest_twisted.async_yield_fixture
async def imap_server(account):
    factory = IMAPServerFactory(account, USER, PASSWORD)
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield Server(account, listening.getHost().port, factory)
    await listening.stopListening()


def in_thread(fn, *args, **kwargs):
    """Run blocking client code off the reactor thread (the server runs on it)."""
    return threads.deferToThread(fn, *args, **kwargs)


class RawClient:
    """Exact bytes in, exact lines out: for checking the wire, not the meaning."""

    def __init__(self, host, port, login=True, timeout=20):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.greeting = self.line()
        if login:
            self.send(b"L0 LOGIN " + USER.encode() + b' "' + PASSWORD.encode() + b'"\r\n')
            self.until(b"L0 ")

    def send(self, data):
        self.sock.sendall(data)

    def line(self):
        data = self.file.readline(1 << 20)
        if not data:
            raise EOFError("server closed the connection")
        return data

    def read(self, n):
        return self.file.read(n)

    def until(self, prefix):
        """Lines up to and including the first one starting with ``prefix``."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(prefix):
                return lines

    def command(self, tag, text):
        self.send(tag + b" " + text + b"\r\n")
        return self.until(tag + b" ")

    def response(self, tag, text):
        """All bytes of a command's answer, literals included, as one bytes value."""
        self.send(tag + b" " + text + b"\r\n")
        out = bytearray()
        while True:
            line = self.line()
            out += line
            stripped = line.rstrip(b"\r\n")
            if stripped.endswith(b"}") and b"{" in stripped:
                size = int(stripped[stripped.rindex(b"{") + 1:-1])
                out += self.read(size)
                continue
            if line.startswith(tag + b" "):
                return bytes(out)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
