"""The daemon's incoming-mail loop (docs/incoming.rst, "The daemon's side").

Woken when the change feed says mail is waiting (``ProviderClient.on_incoming``), at
start, and when a put-off delivery comes due, it claims deliveries with a lease,
downloads each sealed box to a temporary file (sealed bytes only), opens it on a
thread, appends it to INBOX with ``source = b"incoming\\0" + id`` and deletes it at the
provider.  The source makes the import happen once, ever: a lease that ran out while
the work went on, or two devices both importing, still give one message (the two
imports meet as one flags document when they sync).

A delivery that will not open or parse is reported with ``incoming/fail`` and retried
after an exponential backoff; after ``attempts`` failures a notice takes its place in
INBOX (a message from the daemon saying what arrived when and why it could not be
opened; same source, so it too appears once) and the delivery is deleted.  A failure
to reach the provider is no fault of the delivery: the loop backs off and the lease
runs out.  Failures are counted in the sync status file, which ``leapmail status``
shows.
"""

import email.utils
import tempfile
import time
from email.message import EmailMessage

from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger

from leapmail.crypto.sealed import SealedError
from leapmail.errors import LeapmailError
from leapmail.sync.remote import ProviderError
from leapmail.sync.service import Backoff

#: Deliveries one claim leases.
BATCH = 20
#: Seconds a claim leases them for; a daemon that dies mid-way leaves them to be
#: claimed again (by itself or another device) after this.
LEASE = 300
#: First delay after a delivery fails to open; doubled each time, up to RETRY_MAX.
RETRY_FIRST = 60
RETRY_MAX = 6 * 3600
#: Failed attempts after which a notice replaces the delivery in INBOX.
ATTEMPTS = 5
#: The largest sealed box fetched: the provider's largest message and sealing overhead.
MAX_SEALED = 64 * 1024 * 1024


def incoming_source(delivery_id):
    return b"incoming\0" + delivery_id.encode("ascii")


def _read_and_open(keypair, sink):
    sink.seek(0)
    return keypair.open(sink.read())


def notice(address, item, error, attempts):
    """The message that stands in INBOX for a delivery that could not be opened."""
    received = email.utils.formatdate(item["received"])
    msg = EmailMessage()
    msg["From"] = f"leapmail on this device <{address}>"
    msg["To"] = address
    msg["Date"] = email.utils.formatdate()
    msg["Subject"] = "A message could not be opened"
    msg["Message-ID"] = email.utils.make_msgid("incoming-notice")
    msg.set_content(
        f"Your provider accepted a message for you on {received}, but this device\n"
        f"could not open it after {attempts} attempts, so it has been removed from\n"
        f"the provider's incoming queue.\n\n"
        f"Reason: {error}\n\n"
        f"Size (sealed): {item['size']} bytes\n"
        f"Delivery id: {item['id']}\n\n"
        f"This usually means the message was sealed to a key this account no longer\n"
        f"has, or was damaged at the provider. Ask the sender to send it again.\n")
    return bytes(msg)


class IncomingService(service.Service):
    log = Logger()

    def __init__(self, store_service, sync_service, keypair, address, lease=LEASE,
                 retry_first=RETRY_FIRST, attempts=ATTEMPTS, reactor=None):
        self._store_service = store_service
        self._sync = sync_service
        self._keypair = keypair
        self._address = address
        self.lease = lease
        self.retry_first = retry_first
        self.attempts = attempts
        self._reactor = reactor
        self._running = None
        self._again = False
        self._registered = False
        self._reclaimed = False
        self._timers = set()
        self._backoff = Backoff()
        self.imported = 0
        self.notices = 0
        self.failing = {}           # delivery id -> (attempts, error)

    def startService(self):
        service.Service.startService(self)
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        self._sync.client.on_incoming = lambda count: self.wake()
        self.wake()

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        for timer in list(self._timers):
            if timer.active():
                timer.cancel()
        self._timers.clear()
        if self._running is not None:
            try:
                yield self._running
            except Exception:
                pass

    def wake(self):
        """Look for mail now (or right after the look in progress)."""
        if not self.running:
            return
        if self._running is not None:
            self._again = True
            return
        self._running = defer.ensureDeferred(self._run())
        self._running.addBoth(self._ran)

    def _ran(self, result):
        self._running = None
        if self._again and self.running:
            self._again = False
            self.wake()
        return None

    def _later(self, seconds):
        def fire():
            self._timers.discard(timer)
            self.wake()

        timer = self._reactor.callLater(seconds, fire)
        self._timers.add(timer)

    async def _run(self):
        client = self._sync.client
        try:
            await self._sync.ensure_token()
            if not self._registered:
                await client.put_incoming_key(self._keypair.public_bytes())
                self._registered = True
            while self.running:
                self._again = False
                # The first claim after start takes back what this device had
                # claimed when it stopped (a crash mid-import), lease or not.
                items = await client.claim_incoming(BATCH, self.lease,
                                                    reclaim=not self._reclaimed)
                self._reclaimed = True
                for item in items:
                    if not self.running:
                        return
                    await self._one(client, item)
                if not items:
                    break
            self._backoff.reset()
        except defer.CancelledError:
            return
        except Exception as e:
            if not self.running:
                return
            if isinstance(e, ProviderError):
                self.log.warn("incoming mail: {error}", error=str(e))
                if getattr(e, "status", None) == 401:
                    await self._sync.forget_token()
            else:
                self.log.failure("incoming mail failed unexpectedly")
            self._later(self._backoff.next())
        finally:
            self._report()

    async def _one(self, client, item):
        delivery_id = item["id"]
        source = incoming_source(delivery_id)
        account = self._store_service.account
        with tempfile.TemporaryFile(prefix="leapmail-incoming-") as sink:
            try:
                await client.get_incoming(delivery_id, sink, MAX_SEALED)
            except ProviderError as e:
                if e.status == 404:
                    return          # another device took it over and finished it
                raise
            try:
                raw = await threads.deferToThread(_read_and_open, self._keypair, sink)
                await account.append("INBOX", raw, internal_date=item["received"],
                                     source=source)
                del raw
            except (SealedError, LeapmailError, ValueError, UnicodeError) as e:
                await self._failed(client, item, source, e)
                return
        await client.delete_incoming([delivery_id])
        self.failing.pop(delivery_id, None)
        self.imported += 1

    async def _failed(self, client, item, source, error):
        if not self.running:
            return      # the store closing under us is no fault of the delivery
        delivery_id = item["id"]
        attempts = item["attempts"] + 1
        text = str(error) or type(error).__name__
        if attempts >= self.attempts:
            self.log.warn("incoming mail {id} could not be opened after {n} attempts "
                          "({error}); a notice takes its place in INBOX",
                          id=delivery_id, n=attempts, error=text)
            raw = notice(self._address, item, text, attempts)
            await self._store_service.account.append("INBOX", raw, source=source)
            await client.delete_incoming([delivery_id])
            self.failing.pop(delivery_id, None)
            self.notices += 1
            return
        retry = min(RETRY_MAX, self.retry_first * 2 ** (attempts - 1))
        self.log.warn("incoming mail {id} could not be opened (attempt {n} of {max}): "
                      "{error}; trying again in {retry} s", id=delivery_id, n=attempts,
                      max=self.attempts, error=text, retry=retry)
        await client.fail_incoming(delivery_id, retry, text)
        self.failing[delivery_id] = (attempts, text)
        self._later(retry + 0.1)

    def _report(self):
        last = None
        if self.failing:
            attempts, error = list(self.failing.values())[-1]
            last = f"attempt {attempts} of {self.attempts}: {error}"
        self._sync.set_incoming_status({
            "imported": self.imported, "notices": self.notices,
            "failing": len(self.failing), "last_failure": last,
            "as_of": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
