"""The one way mail enters an account's incoming queue: the MX and submission use it.

:meth:`Intake.accepts` says whether an address can receive (a claimed account that has
registered its incoming key); :meth:`Intake.receiver` takes one message for one or more
such recipients.  The receiver seals what it is given as it arrives, with one
:class:`~leapmail.crypto.sealed.Sealer` per recipient, and spools only the sealed bytes
(in memory up to :data:`SPOOL_IN_MEMORY`, then in an anonymous temporary file): no
plaintext is ever written at the provider.  :meth:`IntakeReceiver.finish` stores every
recipient's box in one transaction, in rows of at most
:data:`~leapmail.provider.storage.INCOMING_CHUNK` bytes, and only then wakes their
change feeds; whoever answers the client (250) does so after it returns.

Every database call runs on the thread pool (or the runner) given; the sealing runs
where :meth:`IntakeReceiver.write` is called, a 64 KiB AES-GCM chunk at a time.
"""

import secrets
import tempfile
from collections import OrderedDict

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from leapmail.crypto.sealed import Sealer
from leapmail.errors import LeapmailError
from leapmail.provider.storage import INCOMING_CHUNK, Unavailable

#: Sealed bytes a receiver keeps in memory per recipient before spooling to disk.
SPOOL_IN_MEMORY = 1024 * 1024
#: Addresses whose key :meth:`Intake.accepts` remembers for :meth:`Intake.receiver`.
KEY_CACHE = 10_000

log = Logger()


class IntakeError(LeapmailError):
    """The message was not stored; ``code`` and ``text`` are the SMTP reply to give
    (``text`` starts with the enhanced status code)."""

    def __init__(self, code, text):
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


def normalize(address):
    """An address as accounts are keyed (see leapmail.provider.api.normalize_address),
    or ``None`` if it cannot be one."""
    if isinstance(address, bytes):
        try:
            address = address.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if (not address or len(address) > 254 or address.count("@") != 1
            or address.startswith("@") or address.endswith("@")
            or any(c.isspace() or not c.isprintable() for c in address)):
        return None
    return address.lower()


class Intake:
    """Accepts mail for the provider's accounts (see the module doc).

    ``threadpool_or_runner``: a started :class:`~twisted.python.threadpool.ThreadPool`,
    or a function ``run(fn, *args) -> Deferred`` that runs ``fn`` off the reactor.
    ``wake(user_id)``, if set, is called on the reactor after a delivery commits (the
    provider points it at the API's long-poll waiters; on PostgreSQL other processes
    hear of it through NOTIFY).
    """

    def __init__(self, storage, threadpool_or_runner, max_size, hostname, reactor=None,
                 wake=None, clock=None):
        if reactor is None:
            from twisted.internet import reactor
        import time

        self.storage = storage
        self.reactor = reactor
        self.max_size = int(max_size)
        self.hostname = hostname
        self.wake = wake
        self.clock = clock or time.time
        if callable(getattr(threadpool_or_runner, "callInThread", None)):
            pool = threadpool_or_runner
            self._run = lambda fn, *args: deferToThreadPool(reactor, pool, fn, *args)
        else:
            self._run = threadpool_or_runner
        self._keys = OrderedDict()

    async def accepts(self, address):
        """Whether ``address`` is an account that can receive mail here."""
        address = normalize(address)
        if address is None:
            return False
        found = await self._run(self.storage.incoming_key, address)
        if found is None:
            self._keys.pop(address, None)
            return False
        self._keys[address] = found
        self._keys.move_to_end(address)
        while len(self._keys) > KEY_CACHE:
            self._keys.popitem(last=False)
        return True

    def receiver(self, recipients, trace):
        """An :class:`IntakeReceiver` for one message to ``recipients`` (addresses that
        :meth:`accepts` said yes to), starting with ``trace`` (the Received: lines)."""
        targets = {}
        for address in recipients:
            key = self._keys.get(normalize(address) or "")
            if key is None:
                raise IntakeError(451, "4.3.0 recipient not verified; try again")
            targets[key[0]] = key[1]      # one copy per account, however it was named
        if not targets:
            raise IntakeError(554, "5.5.1 no valid recipients")
        return IntakeReceiver(self, targets, trace)


class _Box:
    """One recipient's sealed copy, spooled as it is sealed."""

    def __init__(self, user_id, public_key):
        self.user_id = user_id
        self.id = secrets.token_hex(16)
        self.sealer = Sealer(public_key)
        self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
        self.spool.write(self.sealer.head)

    def chunks(self):
        """The sealed bytes in storage rows (read on the storage's thread)."""
        self.spool.seek(0)
        while True:
            data = self.spool.read(INCOMING_CHUNK)
            if not data:
                return
            yield data


class IntakeReceiver:
    """One message on its way in: :meth:`write` it, then :meth:`finish` or :meth:`abort`."""

    def __init__(self, intake, targets, trace):
        self._intake = intake
        self._boxes = [_Box(user_id, key) for user_id, key in targets.items()]
        self.size = 0
        self._done = False
        self._write_sealed(trace)

    def _write_sealed(self, data):
        for box in self._boxes:
            sealed = box.sealer.update(data)
            if sealed:
                box.spool.write(sealed)

    def write(self, data):
        """Take the next piece of the message (as received: CRLF line ends, dot
        unstuffed)."""
        if self._done:
            raise IntakeError(451, "4.3.0 this message is finished already")
        self.size += len(data)
        self._write_sealed(data)

    async def finish(self):
        """Store the message for every recipient, durably, or raise :class:`IntakeError`."""
        if self._done:
            raise IntakeError(451, "4.3.0 this message is finished already")
        self._done = True
        intake = self._intake
        try:
            if self.size > intake.max_size:
                raise IntakeError(552, f"5.3.4 message exceeds the size limit of "
                                       f"{intake.max_size} bytes")
            for box in self._boxes:
                box.spool.write(box.sealer.finish())
            deliveries = [(box.user_id, box.id, box.chunks()) for box in self._boxes]
            try:
                await intake._run(intake.storage.deliver, deliveries, int(intake.clock()))
            except Unavailable:
                raise IntakeError(451, "4.3.0 the mail store is unavailable; try again "
                                       "later") from None
            except Exception:
                log.failure("storing an incoming message failed")
                raise IntakeError(451, "4.3.0 the message could not be stored; try again "
                                       "later") from None
        finally:
            self._close()
        if intake.wake is not None:
            for box in self._boxes:
                intake.wake(box.user_id)

    def abort(self):
        """Forget the message: nothing is stored."""
        self._done = True
        self._close()

    def _close(self):
        for box in self._boxes:
            box.spool.close()
