"""The daemon's sync loop: push soon after local writes, pull as the feed announces.

Two loops share one :class:`~leapmail.sync.engine.Replicator`:

- the **puller** long-polls the provider's change feed, so a change made on another
  device (or mail delivered) arrives within about a second, and applies each batch
  (while more is waiting, as a bulk import: full-text indexing waits for it);
- the **pusher** wakes shortly after a local commit (debounced, so a burst of writes
  goes out in few requests) and pushes until nothing is left.

Either, on failure, waits with exponential backoff and full jitter, and tries again;
a token the provider no longer accepts is replaced by logging in again with the login
key.  Nothing here runs on the reactor for long: requests are asynchronous, crypto
runs on threads, store work on the store's threads.

The loop's state is written to ``sync-status.json`` in the account home (mode 0600,
no secrets), which ``leapmail status`` shows.
"""

import json
import os
import random
import time

from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger

from leapmail.fsutil import atomic_write
from leapmail.sync.engine import Replicator, SyncRefused, pending_count
from leapmail.sync.remote import ProviderClient, ProviderError, Unauthorized
from leapmail.sync.schema import get_state, set_state

#: Seconds a long poll waits for news (the provider allows 30).
LONG_POLL = 25
#: Seconds between a local write and the push that carries it.
PUSH_DELAY = 0.2
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 60.0
STATUS_NAME = "sync-status.json"


class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog, 2015)."""

    def __init__(self, first=BACKOFF_FIRST, cap=BACKOFF_MAX, rng=random.random):
        self.first, self.cap, self.rng, self.failures = first, cap, rng, 0

    def next(self):
        ceiling = min(self.cap, self.first * (2 ** self.failures))
        self.failures += 1
        return ceiling * (0.5 + self.rng() / 2)

    def reset(self):
        self.failures = 0


class SyncService(service.Service):
    log = Logger()

    def __init__(self, store_service, keys, address, provider_url, ca_pem, home_path,
                 login_key=None, on_catching_up=lambda more: None, reactor=None):
        self._store_service = store_service
        self._keys = keys
        self._address = address
        self._url = provider_url
        self._ca_pem = ca_pem
        self._login_key = login_key
        self._on_catching_up = on_catching_up
        self._status_path = os.path.join(home_path, STATUS_NAME)
        self._reactor = reactor
        self.client = None
        self.replicator = None
        self._loops = []
        self._push_timer = None
        self._push_running = None
        self._push_again = False
        self._push_backoff = Backoff()
        self._unwatch = None
        self._status = {"provider": provider_url, "state": "starting", "last_pull": None,
                        "last_push": None, "error": None, "error_since": None}
        self._status_timer = None
        self._sleepers = set()
        self._bulk_import = False
        self._token_waiters = None

    # -- life cycle --------------------------------------------------------------------

    def startService(self):
        service.Service.startService(self)
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        store = self._store_service.store
        self.client = ProviderClient(self._url, self._ca_pem, reactor=self._reactor)
        self.replicator = Replicator(store, self._keys, self.client)
        self._unwatch = store.watch(lambda _gen: self.push_soon())
        self._loops.append(defer.ensureDeferred(self._pull_loop()))
        self.push_soon(0)

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        if self._unwatch:
            self._unwatch()
        for timer in (self._push_timer, self._status_timer):
            if timer is not None and timer.active():
                timer.cancel()
        for sleeper in list(self._sleepers):
            sleeper.cancel()
        if self.replicator is not None:
            self.replicator.close()
        if self.client is not None:
            yield self.client.close()
        for d in self._loops + ([self._push_running] if self._push_running else []):
            try:
                yield d
            except Exception:
                pass
        yield self._write_status_now()

    # -- the loops ---------------------------------------------------------------------

    async def _pull_loop(self):
        backoff = Backoff()
        more = True
        try:
            while self.running:
                try:
                    await self._ensure_token()
                    more = await self.replicator.pull(wait=0 if more else LONG_POLL)
                    self._catching_up(more)
                    backoff.reset()
                    self._succeeded("last_pull")
                except defer.CancelledError:
                    return
                except Exception as e:
                    if not self.running:
                        return
                    await self._failed("pull", e, backoff)
                    more = True
        finally:
            self._catching_up(False)

    def _catching_up(self, more):
        """Tell ``on_catching_up`` when the feed starts and stops having more waiting
        (a new device catching up, or one back after long): the daemon makes that a
        bulk import for the mail core's full-text indexer, which then waits instead of
        taking turns with sync at the store's writer, where IMAP writes would wait
        behind both (see the Performance section of docs/sync.rst)."""
        if more == self._bulk_import:
            return
        self._bulk_import = more
        self._on_catching_up(more)

    def push_soon(self, delay=PUSH_DELAY):
        """Push after ``delay`` seconds, unless a push is already due sooner."""
        if not self.running:
            return
        if self._push_running is not None:
            self._push_again = True
            return
        if self._push_timer is not None and self._push_timer.active():
            return
        self._push_timer = self._reactor.callLater(delay, self._start_push)

    def _start_push(self):
        self._push_running = defer.ensureDeferred(self._push())

    async def _push(self):
        retry = None
        try:
            self._push_again = False
            await self._ensure_token()
            pushed = await self.replicator.push()
            self._push_backoff.reset()
            if pushed:
                self._succeeded("last_push")
        except Exception as e:
            if self.running:
                retry = self._push_backoff.next()
                self._record_error("push", e)
        finally:
            self._push_running = None
        if not self.running:
            return
        if retry is not None:
            self._push_timer = self._reactor.callLater(retry, self._start_push)
        elif self._push_again:
            self.push_soon()

    async def ensure_token(self):
        """Make sure the client has a device token (logging in again if need be);
        other services that call the provider through ``client`` use this too."""
        await self._ensure_token()

    async def forget_token(self):
        """The provider refused the token: the next call logs in again."""
        if self.client.token is not None:
            self.client.token = None
            await self.replicator.store.transact(lambda txn: set_state(txn, "token", None))

    def set_incoming_status(self, status):
        """The incoming-mail service's counts, shown by ``leapmail status``."""
        self._status["incoming"] = status
        self._write_status()

    async def device_token(self, refused=None):
        """The device token, for the relay's AUTH at the provider's submission port.

        ``refused``: the token the provider just refused; this logs in again (once,
        whoever asks: the pull loop may have done it already).
        """
        if refused is not None and self.client.token == refused:
            await self.forget_token()
        await self.ensure_token()
        return self.client.token

    async def _ensure_token(self):
        if self.client.token is not None:
            return
        # The pull loop, the pusher and the incoming service may all find no token at
        # once: one of them logs in, the others wait for it (one device, not three).
        if self._token_waiters is not None:
            d = defer.Deferred()
            self._token_waiters.append(d)
            await d
            return
        self._token_waiters = []
        try:
            self.client.token = await self.replicator.store.read(get_state, "token")
            if self.client.token is None:
                await self._login()
        except BaseException as e:
            waiters, self._token_waiters = self._token_waiters, None
            for d in waiters:
                d.errback(e)
            raise
        waiters, self._token_waiters = self._token_waiters, None
        for d in waiters:
            d.callback(None)

    async def _login(self):
        store = self.replicator.store
        # Homes set up before login keys were derived at start kept one in the store.
        login_key = self._login_key or await store.read(get_state, "login_key")
        device = await store.read(get_state, "device_name") or "leapmail"
        if not login_key:
            raise Unauthorized("this device has no login key; run leapmail init again")
        token, device_id, _ = await self.client.login(self._address, bytes(login_key), device)
        await store.transact(lambda txn: (set_state(txn, "token", token),
                                          set_state(txn, "device_id", device_id)))
        self.client.token = token
        self.log.info("logged in to the provider again (new device token)")

    async def _failed(self, what, error, backoff):
        if isinstance(error, Unauthorized):
            # An expired or revoked token: forget it; the next round logs in again.
            await self.forget_token()
        self._record_error(what, error)
        await self._sleep(backoff.next())

    def _sleep(self, seconds):
        d = defer.Deferred()
        timer = self._reactor.callLater(seconds, d.callback, None)
        self._sleepers.add(d)

        def done(result):
            self._sleepers.discard(d)
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(done)
        return d

    # -- status ------------------------------------------------------------------------

    def _record_error(self, what, error):
        if isinstance(error, (ProviderError, SyncRefused)):
            text = str(error)
        else:
            text = f"{type(error).__name__}: {error}"
            self.log.failure("sync {what} failed unexpectedly", what=what)
        if self._status["error"] != f"{what}: {text}":
            self.log.warn("sync {what} failed: {error}", what=what, error=text)
            self._status["error_since"] = _now()
        self._status.update(state="retrying", error=f"{what}: {text}")
        self._write_status()

    def _succeeded(self, field):
        if self._status["error"]:
            self.log.info("sync works again")
        self._status.update({field: _now(), "state": "ok", "error": None, "error_since": None})
        self._write_status()

    def _write_status(self):
        # At most about once a second: an initial sync applies many batches.
        if self._status_timer is None or not self._status_timer.active():
            self._status_timer = self._reactor.callLater(1.0, self._write_status_now)

    def _write_status_now(self):
        store = self._store_service.store
        status = dict(self._status)
        if store is None or store._closed:
            return self._dump(status)

        def read(q):
            return pending_count(q), get_state(q, "pull_seq", 0)

        d = store.read(read)

        def write(result):
            status["pending"], status["pull_seq"] = result
            return self._dump(status)

        d.addCallback(write)
        d.addErrback(lambda f: self._dump(status))
        return d

    def _dump(self, status):
        status["written"] = _now()
        data = (json.dumps(status, indent=1, sort_keys=True) + "\n").encode()
        # atomic_write fsyncs: on a thread, so the reactor never waits for the disk.
        d = threads.deferToThread(atomic_write, self._status_path, data)
        d.addErrback(lambda f: self.log.warn("cannot write {path}: {error}",
                                             path=self._status_path, error=f.value))
        return d


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
