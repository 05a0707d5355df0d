"""The relay: hands what the outbox holds to the provider's submission port.

Due entries go out over one connection per batch (STARTTLS with the provider's pinned
certificate, AUTH with the account address and the device token).  Per recipient:

- accepted: it leaves the entry;
- refused for good (5xx): it moves to the entry's failures;
- refused for now (4xx), or the connection failed: it stays, and the entry waits
  ``due`` (exponential backoff with full jitter, from its stored attempt count, so a
  restart neither forgets nor resets it).

Once no recipient is left, failures become one RFC 3464 bounce in INBOX, the message
goes into Sent if asked, and the entry is removed.  Bounce and Sent copy are
appended with a source named after the entry, so a crash between them and the
removal never makes two of either.

A start of the daemon retries everything at once: the provider may have been down
while the daemon was, and a restart is how a user says "try now".
"""

import json
import os
import random
import time

from twisted.internet import defer, threads
from twisted.logger import Logger

from leapmail.fsutil import atomic_write
from leapmail.mail.names import INBOX
from leapmail.smtp.bounce import delivery_status_notification, header_of
from leapmail.smtp.client import SMTPClientError, SMTPConnection

STATUS_NAME = "outbox-status.json"
#: Entries relayed over one connection.
BATCH = 50
RETRY_FIRST = 2.0
RETRY_MAX = 600.0
#: Seconds between a message being queued and the relay run that sends it.
QUEUED_DELAY = 0.05
SENT = "Sent"


def retry_delay(attempts, rng=random.random):
    """Full jitter: anywhere up to an exponentially growing ceiling."""
    return min(RETRY_MAX, RETRY_FIRST * 2 ** min(attempts, 20)) * max(rng(), 0.05)


class Relay:
    log = Logger()

    def __init__(self, outbox, account, address, host, port, tls, credentials, home_path,
                 save_sent=False, reactor=None, helo="localhost"):
        self.outbox = outbox
        self.account = account
        self.address = address
        self.host, self.port = host, port
        self.tls = tls
        self.credentials = credentials
        self.save_sent = save_sent
        self.helo = helo
        self._status_path = os.path.join(home_path, STATUS_NAME)
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._timer = None
        self._running = None
        self._again = False
        self._stopped = False
        self._conn = None
        self.last_error = None

    def start(self):
        d = self.outbox.sweep()
        d.addCallback(lambda _: self.outbox.retry_all_now(time.time()))
        d.addCallback(lambda _: self.kick())
        d.addErrback(lambda f: self.log.failure("outbox sweep failed", f))

    @defer.inlineCallbacks
    def stop(self):
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._conn is not None:
            # A big message on a slow link must not hold the daemon's shutdown: the
            # batch's outcomes are still recorded (as failures to retry).
            self._conn.abort()
        if self._running is not None:
            try:
                yield self._running
            except Exception:
                pass

    def queued(self):
        """A message was just queued: relay soon, together with any that a client
        sending several in a row queues meanwhile (one connection, one commit)."""
        if self._stopped:
            return
        if self._running is not None:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() - self._reactor.seconds() <= QUEUED_DELAY:
                return
            self._timer.cancel()
        self._timer = self._reactor.callLater(QUEUED_DELAY, self.kick)

    def kick(self):
        """Relay what is due now (the daemon started, or a timer says so)."""
        if self._stopped:
            return
        if self._running is not None:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._running = defer.ensureDeferred(self._run())
        self._running.addErrback(lambda f: self.log.failure("relay failed", f))
        self._running.addBoth(self._ran)

    def _ran(self, _):
        self._running = None
        if self._stopped:
            return
        if self._again:
            self._again = False
            self.kick()
            return
        d = self.outbox.next_due()

        def schedule(due):
            if due is None or self._stopped or self._running is not None:
                return
            delay = max(0.0, due - time.time())
            self._timer = self._reactor.callLater(delay, self.kick)

        d.addCallback(schedule)
        d.addErrback(lambda f: self.log.failure("relay scheduling failed", f))

    async def _run(self):
        while not self._stopped:
            entries = await self.outbox.due(time.time(), BATCH)
            if not entries:
                break
            await self.relay_batch(entries)
            if len(entries) < BATCH or self.last_error:
                break
        await self.write_status()

    async def _connect(self):
        token = await self.credentials.device_token()
        try:
            return await SMTPConnection.open(
                self._reactor, self.host, self.port, self.helo, tls=self.tls,
                require_tls=True, username=self.address, password=token)
        except SMTPClientError as e:
            if e.code != 535:
                raise
        # The provider no longer takes the token: log in again, the way sync does.
        token = await self.credentials.device_token(refused=token)
        return await SMTPConnection.open(
            self._reactor, self.host, self.port, self.helo, tls=self.tls,
            require_tls=True, username=self.address, password=token)

    async def relay_batch(self, entries):
        outcomes = []
        try:
            await self._send_batch(entries, outcomes)
        finally:
            # One commit for the batch's outcomes: a crash before it sends the batch
            # again (at least once, never lost), and the common case costs one fsync
            # per batch, not one per message.
            await self._settle(outcomes)

    async def _send_batch(self, entries, outcomes):
        try:
            conn = self._conn = await self._connect()
        except Exception as e:
            error = _describe(e)
            for entry in entries:
                if getattr(e, "permanent", False) and e.code != 535:
                    outcomes.append((entry, [], [(r, e.code, e.text)
                                                 for r in entry.recipients], error))
                else:
                    outcomes.append((entry, [], [], error))
            self._failed(error)
            return
        try:
            broken = None
            for entry in entries:
                if broken is not None:
                    outcomes.append((entry, [], [], broken))
                    continue
                try:
                    accepted, refused = await conn.send(entry.sender, list(entry.recipients),
                                                        self._pieces(entry))
                except SMTPClientError as e:
                    if e.permanent:
                        outcomes.append((entry, [], [(r, e.code, e.text)
                                                     for r in entry.recipients], _describe(e)))
                    else:
                        outcomes.append((entry, [], [], _describe(e)))
                        if e.code == 0:
                            broken = _describe(e)
                            continue
                    try:
                        await conn.reset()
                    except SMTPClientError as e2:
                        broken = _describe(e2)
                    continue
                final = [r for r in refused if 500 <= r[1] < 600]
                temporary = [r for r in refused if not 500 <= r[1] < 600]
                error = "; ".join(f"{r}: {c} {t}" for r, c, t in temporary) or None
                outcomes.append((entry, accepted, final, error))
            if broken:
                self._failed(broken)
            else:
                self.last_error = None
        finally:
            self._conn = None
            await conn.close()

    async def _pieces(self, entry):
        for seq in range(entry.chunks):
            yield await self.outbox.chunk(entry.id, seq)

    async def _settle(self, outcomes):
        if not outcomes:
            return
        now = time.time()
        for entry, delivered, _, _ in outcomes:
            if delivered and self.save_sent:
                # Before the outcome is recorded: a crash in between repeats the
                # append, which its source makes a no-op, rather than losing it.
                raw = await self.outbox.read_all(entry)
                await self.account.append(SENT, raw, flags=("\\Seen",),
                                          source=b"sent\0" + entry.id.encode())
        updated = await self.outbox.record_attempts(
            [(entry.id, delivered, failed, error, now + retry_delay(entry.attempts))
             for entry, delivered, failed, error in outcomes])
        for entry in updated:
            if entry is None or entry.recipients:
                continue
            if entry.failed:
                first = await self.outbox.chunk(entry.id, 0) if entry.chunks else b""
                report = delivery_status_notification(
                    entry.sender, entry.failed, header_of(first or b""), self.host,
                    arrival=entry.accepted)
                await self.account.append(INBOX, report,
                                          source=b"bounce\0" + entry.id.encode())
                self.log.warn("{id} bounced: {count} recipient(s) refused", id=entry.id,
                              count=len(entry.failed))
            await self.outbox.remove(entry.id)

    def _failed(self, error):
        if error != self.last_error:
            self.log.warn("relay to {host}:{port} failed: {error}", host=self.host,
                          port=self.port, error=error)
        self.last_error = error

    async def write_status(self):
        summary = await self.outbox.summary()
        summary["relay_error"] = self.last_error
        summary["written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data = (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode()
        await threads.deferToThread(atomic_write, self._status_path, data)


def _describe(error):
    if isinstance(error, SMTPClientError):
        return str(error)
    return f"{type(error).__name__}: {error}"
