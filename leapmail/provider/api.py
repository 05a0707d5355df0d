"""The provider's HTTP API (``docs/sync.rst``, "Provider HTTP API") on ``twisted.web``.

:class:`ProviderAPI` holds what the endpoints share: the storage, the thread pool its
blocking calls run in, the provider secret, the token lifetime, the failed-login
throttle and the long-poll waiters.  :meth:`ProviderAPI.site` is the ``twisted.web``
site to listen with.

Request bodies: the channel (:class:`_Channel`) refuses a body whose
``Content-Length`` is over :data:`MAX_BODY` as soon as the headers are in, before a
byte of it is read, and a chunked body the moment it goes over; either way the answer
is ``413 too_large`` and the connection closes after the rest of the body has been
read and dropped (for a while at most), so that the client gets to read the answer.
Nothing ever buffers more than :data:`MAX_BODY` of one request.

JSON parsing, base64 and every database call happen in the thread pool, never on the
reactor: a 32 MiB push must not stall the long polls of everyone else.

Secrets: tokens are 256-bit random strings handed out once; only their SHA-256 is
stored, and a presented token is hashed and looked up by hash (then the hashes are
compared with :func:`hmac.compare_digest`).  Login keys are checked by comparing
SHA-256(login key) with the stored verifier in constant time; enrollment codes are
compared as hashes in constant time by the storage.  Failures are logged with the
endpoint's path only (never a query string, a body, a token or an address).
"""

import base64
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import time
from collections import OrderedDict

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web import http, resource, server

from leapmail.fsutil import fsync_dir
from leapmail.provider.storage import (
    CodeExpired, CodeUsed, Conflict, EnrollmentRefused, LoginChanged, NoSuchAccount, Unavailable,
)

MiB = 1024 * 1024

# -- the limits of docs/sync.rst ----------------------------------------------------
MAX_BODY = 32 * MiB
MAX_DOC_BYTES = 8 * MiB
MAX_DOCS = 1000
MAX_CHANGES = 1000
CHANGES_BYTES = 8 * MiB
MAX_WAIT = 30
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

# -- limits of our own, on what the contract leaves open ---------------------------
MAX_ADDRESS = 254
MAX_DEVICE_NAME = 100
MAX_CODE = 200
MAX_KDF_JSON = 4096
MAX_BUNDLE = 1 * MiB
MAX_LOGIN_KEY = 1024
VERIFIER_BYTES = 32
#: A document batch of a streamed ``docs/get`` answer holds about this much data.
GET_BATCH_BYTES = 8 * MiB
#: Incoming mail (docs/incoming.rst): most deliveries one claim leases, the longest
#: lease, the longest back-off a device may ask for, the longest error text kept.
MAX_CLAIM = 100
MAX_LEASE = 3600
MAX_RETRY_AFTER = 7 * 86400
MAX_ERROR_TEXT = 200
INCOMING_KEY_BYTES = 1216

#: Default lifetime of a device token: 30 days.
TOKEN_LIFETIME = 30 * 86400
#: How long an enrollment code from ``adduser`` stays good: 7 days.
CODE_LIFETIME = 7 * 86400

#: Throttle of failed logins and enrollments, per address: after the n-th failure in a
#: row the address is refused (429) for min(BASE * 2**(n-1), CAP) seconds.
THROTTLE_BASE = 1.0
THROTTLE_CAP = 300.0
#: An address with no failure for this long starts afresh.
THROTTLE_FORGET = 3600.0
THROTTLE_ENTRIES = 100_000

#: After refusing a body: keep reading (and dropping) it for at most this long, and
#: stop if the client goes quiet for LINGER_IDLE, so that it reads our 413.
LINGER_MAX = 30.0
LINGER_IDLE = 5.0

SECRET_NAME = "provider-secret"
#: The scrypt parameters made up for an address without an account: the ones
#: leapmail's client uses for new accounts (leapmail.crypto.kdf), salt from the secret.
FAKE_KDF = {"name": "scrypt", "version": 1, "n": 2**16, "r": 8, "p": 1}
FAKE_SALT_BYTES = 16

_REASONS = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    409: "conflict", 413: "too_large", 429: "slow_down", 503: "unavailable",
}


class ApiError(Exception):
    """An answer other than success: status, error code, message (and extra fields)."""

    def __init__(self, status, message, code=None, headers=None, **extra):
        super().__init__(message)
        self.status = status
        self.code = code or _REASONS[status]
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def body(self):
        return _dumps({"error": self.code, "message": self.message, **self.extra})


def _dumps(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def sha256(data):
    return hashlib.sha256(data).digest()


_TOKEN = re.compile(rb"[A-Za-z0-9_-]{16,256}")


def device_of_token(storage, token):
    """The :class:`DeviceRecord` of a device token (bytes), or ``None`` if it is
    malformed or unknown; whether it has expired is the caller's to check.  Blocks.

    Shared by the sync API's bearer tokens and submission's AUTH.
    """
    if _TOKEN.fullmatch(token) is None:
        return None
    return storage.device_by_token_hash(sha256(token))


# -- the provider secret ------------------------------------------------------------


def load_secret(home):
    """The provider's 32-byte secret from ``HOME/provider-secret``, made on first use.

    Created 0600, atomically and only once even if two processes race (the second
    reads the first one's): two front ends on one home must agree on it.
    """
    path = os.path.join(home, SECRET_NAME)
    try:
        with open(path, "rb") as f:
            secret = f.read()
    except FileNotFoundError:
        tmp = f"{path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)          # fails if another process got there first
                fsync_dir(home)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
        with open(path, "rb") as f:
            secret = f.read()
    if len(secret) != 32:
        from leapmail.errors import LeapmailError

        raise LeapmailError(f"{path} is damaged (not 32 bytes); remove it to have a new "
                            "one made (devices that are not enrolled yet then see new "
                            "made-up login parameters)")
    return secret


# -- validation ---------------------------------------------------------------------


def bad(message):
    return ApiError(400, message)


def normalize_address(value):
    """A mail address as accounts are keyed: lower case, checked for shape."""
    if not isinstance(value, str) or not value:
        raise bad("address: a mail address is required")
    if len(value) > MAX_ADDRESS:
        raise bad(f"address: longer than {MAX_ADDRESS} characters")
    if (value.count("@") != 1 or value.startswith("@") or value.endswith("@")
            or any(c.isspace() or not c.isprintable() for c in value)):
        raise bad("address: not a mail address")
    return value.lower()


def normalize_code(value):
    """Enrollment codes are typed by people: case, spaces and dashes do not matter."""
    if not isinstance(value, str) or not value or len(value) > MAX_CODE:
        raise bad("code: an enrollment code is required")
    return re.sub(r"[\s-]", "", value).lower()


def new_enrollment_code():
    """25 base32 characters (125 bits) in groups of five, easy to read and type."""
    raw = base64.b32encode(secrets.token_bytes(16)).decode("ascii").lower()[:25]
    return "-".join(raw[i:i + 5] for i in range(0, 25, 5))


def code_hash(code):
    return sha256(normalize_code(code).encode("ascii", "replace"))


def _device_name(value):
    if (not isinstance(value, str) or not 1 <= len(value) <= MAX_DEVICE_NAME
            or not value.isprintable()):
        raise bad(f"device: a name of 1 to {MAX_DEVICE_NAME} printable characters is required")
    return value


def _field(body, name, kind, what):
    value = body.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad(f"{name}: {what} is required")
    return value


def _decode_b64(value, name, max_bytes, status_if_large=400):
    if not isinstance(value, str):
        raise bad(f"{name}: a base64 string is required")
    if len(value) > 4 * math.ceil(max_bytes / 3):
        raise ApiError(status_if_large, f"{name}: more than {max_bytes} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except ValueError:
        raise bad(f"{name}: not valid base64") from None
    if len(data) > max_bytes:
        raise ApiError(status_if_large, f"{name}: more than {max_bytes} bytes")
    return data


def _doc_id(value, where):
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise bad(f"{where}: a document id is 1 to 64 characters of A-Z a-z 0-9 _ -")
    return value


def _read_json(content):
    """The request body as a JSON object (called in a thread)."""
    content.seek(0)
    raw = content.read()
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise bad("the body must be a JSON object")
    return value


def _query(request, name, default, parse, what):
    values = request.args.get(name.encode("ascii"))
    if values is None:
        return default
    if len(values) != 1:
        raise bad(f"{name}: given more than once")
    try:
        return parse(values[0].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad(f"{name}: {what}") from None


def _nonneg_int(text):
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise ValueError(text)
    return int(text)


def _seconds(text):
    if not re.fullmatch(r"[0-9]{1,6}(\.[0-9]{1,6})?", text):
        raise ValueError(text)
    return float(text)


# -- throttling ---------------------------------------------------------------------


class Throttle:
    """Failed logins and enrollments per address: each failure in a row doubles the
    time the address is refused, up to a cap.  One attempt at a time per address,
    so that parallel guesses do not slip in before the first failure counts."""

    def __init__(self, clock, base=THROTTLE_BASE, cap=THROTTLE_CAP, forget=THROTTLE_FORGET,
                 max_entries=THROTTLE_ENTRIES):
        self._clock = clock
        self._base, self._cap, self._forget = base, cap, forget
        self._max_entries = max_entries
        self._failures = OrderedDict()      # key -> (count, refused until, last failure)
        self._busy = set()

    def begin(self, key):
        """Seconds to wait (then the attempt must not go ahead), or 0 to go ahead."""
        now = self._clock()
        entry = self._failures.get(key)
        if entry is not None and now - entry[2] > self._forget:
            del self._failures[key]
            entry = None
        if entry is not None and now < entry[1]:
            return entry[1] - now
        if key in self._busy:
            return self._base
        self._busy.add(key)
        return 0

    def end(self, key, success):
        self._busy.discard(key)
        if success:
            self._failures.pop(key, None)
            return
        now = self._clock()
        count = self._failures.pop(key, (0, 0, 0))[0] + 1
        delay = min(self._base * 2 ** min(count - 1, 62), self._cap)
        self._failures[key] = (count, now + delay, now)
        while len(self._failures) > self._max_entries:
            self._failures.popitem(last=False)

    def abandon(self, key):
        """The attempt ended without an answer (an error of ours): no verdict."""
        self._busy.discard(key)


# -- long-poll waiters --------------------------------------------------------------


class Waiters:
    """Deferreds of long polls, by account, fired when the account changes."""

    def __init__(self):
        self._by_user = {}

    def register(self, user_id):
        waiting = self._by_user.setdefault(user_id, set())

        def cancel(d):
            waiting.discard(d)
            if not waiting and self._by_user.get(user_id) is waiting:
                del self._by_user[user_id]

        d = defer.Deferred(cancel)
        waiting.add(d)
        d.addBoth(_discard_from, waiting, d)
        return d

    def wake(self, user_id):
        """Wake the waiters of ``user_id`` (``None``: every waiter)."""
        if user_id is None:
            groups = list(self._by_user.values())
            self._by_user.clear()
        else:
            group = self._by_user.pop(user_id, None)
            groups = [group] if group else []
        for group in groups:
            for d in list(group):
                if not d.called:
                    d.callback(None)

    def count(self):
        return sum(len(g) for g in self._by_user.values())


def _discard_from(result, group, d):
    group.discard(d)
    return result


# -- the channel and request: body limits -------------------------------------------


def _raw_error(status, message):
    body = ApiError(status, message).body()
    head = (f"HTTP/1.1 {status} {http.RESPONSES[status].decode('ascii')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n").encode("ascii")
    return head + body


class _Channel(http.HTTPChannel):
    """HTTP/1.1 that refuses an oversized body as early as it can (see module doc)."""

    _refusing = False
    _left = None
    _linger_timer = None
    _idle_timer = None
    _linger_ended = False

    def allHeadersReceived(self):
        limit = self.site.api.max_body
        if self.length is not None and self.length > limit:
            self.requests[-1].gotLength(0)
            self.refuse_body(self.length)
            return
        super().allHeadersReceived()

    def refuse_body(self, left=None):
        """Answer 413 to the request whose body is arriving and drop the rest of it;
        ``left``: how many body bytes are still to come, if known."""
        if self._refusing:
            return
        self._refusing = True
        self.persistent = False
        self._left = left
        limit = self.site.api.max_body
        self.transport.write(_raw_error(
            413, f"the request body is over the limit of {limit} bytes"))
        self._linger_timer = self.callLater(LINGER_MAX, self.end_linger)
        self._idle_timer = self.callLater(LINGER_IDLE, self.end_linger)

    def rawDataReceived(self, data):
        if not self._refusing:
            return super().rawDataReceived(data)
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(LINGER_IDLE)
        if self._left is None:
            # A chunked body: its decoder finds where it ends (the request drops the
            # chunks, and calls end_linger at the end).
            return super().rawDataReceived(data)
        self._left -= len(data)
        if self._left <= 0:
            self.end_linger()

    def _respondToBadRequestAndDisconnect(self):
        if self._refusing:
            # Our answer is out already; whatever the client sends now is dropped.
            self.end_linger()
            return
        super()._respondToBadRequestAndDisconnect()

    def end_linger(self):
        if self._linger_ended:
            return
        self._linger_ended = True
        for timer in (self._linger_timer, self._idle_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._linger_timer = self._idle_timer = None
        self.loseConnection()

    def connectionLost(self, reason):
        for timer in (self._linger_timer, self._idle_timer):
            if timer is not None and timer.active():
                timer.cancel()
        super().connectionLost(reason)


class _Request(server.Request):
    """Counts a body without a Content-Length and stops it at the limit."""

    _received = 0
    _refused = False

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.channel.site.api.max_body:
            self._refused = True
            self.content.close()
            self.content = None
            self.channel.refuse_body(None)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if self._refused:
            # The end of a refused chunked body: the client has sent it all.
            self.channel.end_linger()
            return
        # Every body here is JSON, parsed by the API in a thread.  Without a
        # Content-Type, twisted.web does not parse a form body on the reactor.
        self.requestHeaders.removeHeader(b"content-type")
        super().requestReceived(command, path, version)


class _Site(server.Site):
    protocol = _Channel
    requestFactory = _Request
    #: Not an access log: a request's URL can carry an address, and logs are kept.
    #: Failures are logged by the API itself.
    noisy = False

    def __init__(self, api, root, reactor=None):
        super().__init__(root, reactor=reactor)
        self.api = api

    def log(self, request):
        pass


# -- the endpoints ------------------------------------------------------------------


class _Root(resource.Resource):
    isLeaf = True

    def __init__(self, api):
        super().__init__()
        self._api = api

    def render(self, request):
        defer.ensureDeferred(self._api.handle(request))
        return server.NOT_DONE_YET


class _Producer:
    """Lets a streamed answer wait while the client is slow to read it."""

    def __init__(self):
        self._resumed = None
        self.stopped = False

    def pauseProducing(self):
        if self._resumed is None:
            self._resumed = defer.Deferred()

    def resumeProducing(self):
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)

    def stopProducing(self):
        self.stopped = True
        self.resumeProducing()

    def drained(self):
        return self._resumed if self._resumed is not None else defer.succeed(None)


class ProviderAPI:
    """The endpoints of docs/sync.rst over an :class:`IProviderStorage`.

    ``threadpool`` runs the blocking storage calls (started and stopped by the
    caller).  ``secret`` keys the made-up login parameters.  ``clock`` (seconds) is
    what token and code expiry and the throttle go by; the long-poll timers use
    ``reactor``.
    """

    log = Logger()

    def __init__(self, storage, threadpool, secret, token_lifetime=TOKEN_LIFETIME,
                 reactor=None, clock=None):
        if reactor is None:
            from twisted.internet import reactor
        self.storage = storage
        self.threadpool = threadpool
        self.reactor = reactor
        self.secret = secret
        self.token_lifetime = int(token_lifetime)
        self.clock = clock or time.time
        self.max_body = MAX_BODY
        self.throttle = Throttle(self.clock)
        self.waiters = Waiters()
        self._stop_listening = None
        self._routes = {
            (b"GET", b"/v1/login-params"): self._login_params,
            (b"POST", b"/v1/enroll"): self._enroll,
            (b"POST", b"/v1/login"): self._login,
            (b"GET", b"/v1/bundle"): self._bundle,
            (b"POST", b"/v1/passphrase"): self._change_passphrase,
            (b"POST", b"/v1/docs"): self._push,
            (b"POST", b"/v1/docs/get"): self._get_docs,
            (b"GET", b"/v1/changes"): self._changes,
            (b"PUT", b"/v1/incoming-key"): self._incoming_key,
            (b"POST", b"/v1/incoming/claim"): self._incoming_claim,
            (b"GET", b"/v1/incoming/get"): self._incoming_get,
            (b"POST", b"/v1/incoming/fail"): self._incoming_fail,
            (b"POST", b"/v1/incoming/delete"): self._incoming_delete,
        }

    # -- life cycle -------------------------------------------------------------

    def start(self):
        """Hear of other processes' pushes (PostgreSQL), to wake our long polls."""
        self._stop_listening = self.storage.listen(
            lambda user_id: self.reactor.callFromThread(self.waiters.wake, user_id))

    def stop(self):
        if self._stop_listening is not None:
            stop, self._stop_listening = self._stop_listening, None
            stop()
        self.waiters.wake(None)

    def site(self):
        return _Site(self, _Root(self), reactor=self.reactor)

    # -- plumbing ---------------------------------------------------------------

    def _now(self):
        return int(self.clock())

    def _thread(self, fn, *args):
        return deferToThreadPool(self.reactor, self.threadpool, fn, *args)

    async def handle(self, request):
        path = request.path
        try:
            route = self._routes.get((request.method, path))
            if route is None:
                raise ApiError(404, "no such endpoint")
            status, body = await route(request)
            self._send(request, status, body)
        except _Streamed:
            pass
        except ApiError as e:
            self._send(request, e.status, e.body(), e.headers)
        except defer.CancelledError:
            # The client went away during a long poll: nobody to answer.
            if not request._disconnected and not request.finished:
                self._send(request, 503, ApiError(503, "the request was cancelled").body())
        except Unavailable as e:
            self.log.warn("{method} {path}: {error}", method=_text(request.method),
                          path=_text(path), error=str(e))
            self._send(request, 503, ApiError(
                503, "the provider's storage is unavailable; try again later").body(),
                {b"Retry-After": b"5"})
        except Exception:
            self.log.failure("{method} {path} failed", method=_text(request.method),
                             path=_text(path))
            self._send(request, 503, ApiError(
                503, "the provider failed to handle the request; try again later").body())

    def _send(self, request, status, body, headers=None):
        if request._disconnected or request.finished:
            return
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.setHeader(b"Cache-Control", b"no-store")
        for name, value in (headers or {}).items():
            request.setHeader(name, value)
        request.write(body)
        request.finish()

    def _body(self, request):
        return self._thread(_read_json, request.content)

    async def _authenticate(self, request):
        """The :class:`DeviceRecord` of the request's bearer token, else 401."""
        header = request.getHeader(b"authorization")
        if header is None:
            raise ApiError(401, "this request needs an 'Authorization: Bearer TOKEN' header")
        match = re.fullmatch(rb"[Bb]earer +(\S+) *", header)
        if match is None:
            raise ApiError(401, "unknown token")
        device = await self._thread(device_of_token, self.storage, match.group(1))
        if device is None:
            raise ApiError(401, "unknown token")
        if self._now() >= device.expires:
            raise ApiError(401, "the token has expired; log in again", code="token_expired")
        return device

    def _new_token(self):
        token = secrets.token_urlsafe(32)
        return token, sha256(token.encode("ascii")), self._now() + self.token_lifetime

    def _throttled(self, address):
        wait = self.throttle.begin(address)
        if wait:
            raise ApiError(429, f"too many failed attempts for this address; try again in "
                                f"{math.ceil(wait)} seconds",
                           headers={b"Retry-After": b"%d" % math.ceil(wait)})

    async def _attempt(self, address, fn, *args):
        """Run a login or enrollment attempt under the throttle of ``address``."""
        self._throttled(address)
        try:
            result = await self._thread(fn, *args)
        except ApiError as e:
            self.throttle.end(address, success=e.status not in (401, 403))
            raise
        except BaseException:
            self.throttle.abandon(address)
            raise
        self.throttle.end(address, success=True)
        return result

    # -- accounts ---------------------------------------------------------------

    def fake_kdf(self, address):
        salt = hmac.new(self.secret, b"login-params\0" + address.encode("utf-8"),
                        hashlib.sha256).digest()[:FAKE_SALT_BYTES]
        return {**FAKE_KDF, "salt": _b64(salt)}

    async def _login_params(self, request):
        address = normalize_address(_query(request, "address", None, str, "not UTF-8"))
        account = await self._thread(self.storage.find_account, address)
        if account is not None and account.claimed:
            kdf = account.login_kdf
        else:
            kdf = self.fake_kdf(address)
        return 200, _dumps({"kdf": kdf})

    async def _enroll(self, request):
        body = await self._body(request)
        address = normalize_address(body.get("address"))
        code = code_hash(body.get("code"))
        kdf, verifier = self._login_fields(body)
        bundle = _decode_b64(body.get("bundle"), "bundle", MAX_BUNDLE, 413)
        if not bundle:
            raise bad("bundle: the sealed secrets bundle is required")
        device_name = _device_name(body.get("device"))
        token, token_hash, expires = self._new_token()
        device_id = secrets.token_hex(8)

        def claim():
            try:
                self.storage.claim(address, code, self._now(), kdf, verifier, bundle,
                                   device_id, device_name, token_hash, expires)
            except EnrollmentRefused:
                raise ApiError(403, "wrong address or enrollment code") from None
            except CodeExpired:
                raise ApiError(403, "this enrollment code has expired; ask the provider "
                                    "for a new one") from None
            except CodeUsed:
                raise ApiError(409, "this enrollment code has been used already") from None

        await self._attempt(address, claim)
        return 201, _dumps({"token": token, "device": device_id, "expires": expires})

    async def _login(self, request):
        body = await self._body(request)
        address = normalize_address(body.get("address"))
        login_key = _decode_b64(body.get("login_key"), "login_key", MAX_LOGIN_KEY)
        if not login_key:
            raise bad("login_key: the login key is required")
        device_name = _device_name(body.get("device"))
        token, token_hash, expires = self._new_token()
        device_id = secrets.token_hex(8)
        presented = sha256(login_key)

        def login():
            account = self._proven_account(address, presented)
            try:
                self.storage.add_device(account.user_id, device_id, device_name, token_hash,
                                        expires, self._now())
            except NoSuchAccount:
                raise ApiError(401, "wrong address or login key") from None

        await self._attempt(address, login)
        return 200, _dumps({"token": token, "device": device_id, "expires": expires})

    def _proven_account(self, address, presented):
        """The claimed account whose verifier ``presented`` (SHA-256 of a login key)
        matches, else a 401 that is the same for an unknown address (on a storage
        thread)."""
        account = self.storage.find_account(address)
        known = account is not None and account.claimed
        # Compare either way, so an unknown address takes the same time.
        ok = hmac.compare_digest(presented, account.verifier if known else bytes(32))
        if not (known and ok):
            raise ApiError(401, "wrong address or login key")
        return account

    async def _change_passphrase(self, request):
        body = await self._body(request)
        address = normalize_address(body.get("address"))
        login_key = _decode_b64(body.get("login_key"), "login_key", MAX_LOGIN_KEY)
        if not login_key:
            raise bad("login_key: the current login key is required")
        kdf, verifier = self._login_fields(body)
        bundle = _decode_b64(body.get("bundle"), "bundle", MAX_BUNDLE, 413)
        if not bundle:
            raise bad("bundle: the sealed secrets bundle is required")
        presented = sha256(login_key)

        def change():
            account = self._proven_account(address, presented)
            try:
                self.storage.change_login(account.user_id, account.verifier, kdf, verifier,
                                          bundle)
            except LoginChanged:
                raise ApiError(409, "the passphrase was changed meanwhile; try again") from None

        await self._attempt(address, change)
        return 200, _dumps({})

    def _login_fields(self, body):
        login = _field(body, "login", dict, "an object {kdf, verifier}")
        kdf = _field(login, "kdf", dict, "an object")
        if len(_dumps(kdf)) > MAX_KDF_JSON:
            raise bad(f"login.kdf: longer than {MAX_KDF_JSON} bytes")
        verifier = _decode_b64(login.get("verifier"), "login.verifier", VERIFIER_BYTES)
        if len(verifier) != VERIFIER_BYTES:
            raise bad("login.verifier: the SHA-256 of the login key (32 bytes) is required")
        return kdf, verifier

    async def _bundle(self, request):
        device = await self._authenticate(request)
        bundle = await self._thread(self.storage.get_bundle, device.user_id)
        return 200, _dumps({"bundle": _b64(bundle)})

    # -- documents --------------------------------------------------------------

    async def _push(self, request):
        device = await self._authenticate(request)
        body = await self._body(request)

        def push():
            items = body.get("docs")
            if not isinstance(items, list):
                raise bad("docs: a list of documents is required")
            if len(items) > MAX_DOCS:
                raise ApiError(413, f"docs: more than {MAX_DOCS} documents in one push")
            docs, seen = [], set()
            for i, item in enumerate(items):
                where = f"docs[{i}]"
                if not isinstance(item, dict):
                    raise bad(f"{where}: an object {{id, base, data}} is required")
                doc_id = _doc_id(item.get("id"), f"{where}.id")
                if doc_id in seen:
                    raise bad(f"{where}.id: {doc_id} is in this push twice")
                seen.add(doc_id)
                base = item.get("base")
                if not isinstance(base, int) or isinstance(base, bool) or not 0 <= base < 2**53:
                    raise bad(f"{where}.base: a revision (an integer from 0) is required")
                data = _decode_b64(item.get("data"), f"{where}.data", MAX_DOC_BYTES, 413)
                docs.append((doc_id, base, data))
            try:
                seq, revs = self.storage.push(device.user_id, docs)
            except Conflict as e:
                raise ApiError(
                    409, f"{len(e.conflicts)} documents are not at their base revision; "
                         "nothing was written",
                    conflicts=[{"id": i, "rev": r} for i, r in e.conflicts]) from None
            return _dumps({"seq": seq, "revs": revs}), bool(docs)

        answer, wrote = await self._thread(push)
        if wrote:
            self.waiters.wake(device.user_id)
        return 200, answer

    async def _get_docs(self, request):
        device = await self._authenticate(request)
        body = await self._body(request)
        ids = body.get("ids")
        if not isinstance(ids, list):
            raise bad("ids: a list of document ids is required")
        if len(ids) > MAX_DOCS:
            raise ApiError(413, f"ids: more than {MAX_DOCS} ids in one request")
        ids = list(dict.fromkeys(_doc_id(v, f"ids[{i}]") for i, v in enumerate(ids)))
        sizes = await self._thread(self.storage.doc_sizes, device.user_id, ids)
        batches, batch, total = [], [], 0
        for doc_id in ids:
            if doc_id not in sizes:
                continue
            if batch and total + sizes[doc_id] > GET_BATCH_BYTES:
                batches.append(batch)
                batch, total = [], 0
            batch.append(doc_id)
            total += sizes[doc_id]
        if batch:
            batches.append(batch)
        if len(batches) <= 1:
            docs = await self._thread(self._encode_docs, device.user_id,
                                      batches[0] if batches else [])
            return 200, b'{"docs":[' + docs + b"]}"
        await self._stream_docs(request, device.user_id, batches)
        raise _Streamed()

    def _encode_docs(self, user_id, ids):
        docs = self.storage.get_docs(user_id, ids)
        return b",".join(_dumps(_doc_json(d)) for d in docs)

    async def _stream_docs(self, request, user_id, batches):
        """A big ``docs/get`` answer, a batch at a time, as fast as the client reads."""
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        producer = _Producer()
        request.registerProducer(producer, True)
        try:
            request.write(b'{"docs":[')
            first = True
            for batch in batches:
                chunk = await self._thread(self._encode_docs, user_id, batch)
                if producer.stopped or request._disconnected:
                    return
                if chunk:
                    request.write(chunk if first else b"," + chunk)
                    first = False
                await producer.drained()
            if producer.stopped or request._disconnected:
                return
            request.write(b"]}")
        except Exception:
            # The status is out: the only way left to say "failed" is to cut the answer.
            self.log.failure("POST /v1/docs/get failed while streaming")
            if not request._disconnected:
                request.unregisterProducer()
                request.channel.transport.abortConnection()
            return
        request.unregisterProducer()
        request.finish()

    async def _changes(self, request):
        since = _query(request, "since", 0, _nonneg_int, "a sequence number is required")
        limit = _query(request, "limit", MAX_CHANGES, _nonneg_int, "a count is required")
        if not 1 <= limit <= MAX_CHANGES:
            raise bad(f"limit: from 1 to {MAX_CHANGES}")
        wait = _query(request, "wait", 0, _seconds, "a number of seconds is required")
        if wait > MAX_WAIT:
            raise bad(f"wait: at most {MAX_WAIT} seconds")
        device = await self._authenticate(request)
        user_id = device.user_id
        deadline = self.reactor.seconds() + wait
        gone = request.notifyFinish()
        current = []            # the Deferred being waited on, for a disconnect to cancel

        def disconnected(failure):
            for d in current:
                d.cancel()
            return None

        gone.addErrback(disconnected)
        def look():
            return (self.storage.changes(user_id, since, limit, CHANGES_BYTES),
                    self.storage.incoming_count(user_id, self._now()))

        while True:
            waiter = self.waiters.register(user_id) if wait else None
            try:
                changes, incoming = await self._thread(look)
            except BaseException:
                _drop(waiter)
                raise
            remaining = deadline - self.reactor.seconds()
            # New mail ends the wait too: a delivery moves the head with no document.
            # Mail that was waiting already does not (the device has it in hand, or
            # has put it off after a failure).
            if (changes.docs or changes.seq > since or remaining <= 0
                    or waiter is None or request._disconnected):
                _drop(waiter)
                break
            timer = self.reactor.callLater(remaining, _fire, waiter)
            current.append(waiter)
            try:
                await waiter
            finally:
                current.remove(waiter)
                if timer.active():
                    timer.cancel()
        return 200, await self._thread(_encode_changes, changes, incoming)

    # -- incoming mail ----------------------------------------------------------

    async def _incoming_key(self, request):
        device = await self._authenticate(request)
        body = await self._body(request)
        key = _decode_b64(body.get("public_key"), "public_key", INCOMING_KEY_BYTES)

        def register():
            from leapmail.crypto.sealed import Sealer, SealedError

            try:
                Sealer(key)
            except (SealedError, ValueError):
                raise bad(f"public_key: not an incoming-mail public key (ML-KEM-768 + "
                          f"X25519, {INCOMING_KEY_BYTES} bytes)") from None
            self.storage.set_incoming_key(device.user_id, key)

        await self._thread(register)
        return 200, _dumps({})

    async def _incoming_claim(self, request):
        device = await self._authenticate(request)
        body = await self._body(request)
        limit = _field(body, "limit", int, "a count")
        lease = _field(body, "lease", int, "a number of seconds")
        reclaim = body.get("reclaim", False)
        if not isinstance(reclaim, bool):
            raise bad("reclaim: true or false")
        if not 1 <= limit <= MAX_CLAIM:
            raise bad(f"limit: from 1 to {MAX_CLAIM}")
        if not 0 <= lease <= MAX_LEASE:
            raise bad(f"lease: from 0 to {MAX_LEASE} seconds")
        now = self._now()
        claimed = await self._thread(self.storage.claim_incoming, device.user_id,
                                     device.device_id, limit, now + lease, now, reclaim)
        return 200, _dumps({"incoming": [
            {"id": r.id, "size": r.size, "received": r.received, "attempts": r.attempts}
            for r in claimed]})

    async def _incoming_get(self, request):
        device = await self._authenticate(request)
        delivery_id = _query(request, "id", None, str, "not UTF-8")
        delivery_id = _doc_id(delivery_id, "id")
        record = await self._thread(self.storage.incoming_record, device.user_id,
                                    device.device_id, delivery_id, self._now())
        if record is None:
            raise ApiError(404, "no such delivery, or another device holds its lease")
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.setHeader(b"Content-Length", b"%d" % record.size)
        request.setHeader(b"Cache-Control", b"no-store")
        producer = _Producer()
        request.registerProducer(producer, True)
        try:
            for n in range(record.chunks):
                data = await self._thread(self.storage.incoming_chunk, device.user_id,
                                          delivery_id, n)
                if producer.stopped or request._disconnected:
                    raise _Streamed()
                if data is None:
                    raise LookupError("the delivery was deleted while being read")
                request.write(data)
                await producer.drained()
        except _Streamed:
            raise
        except Exception:
            # The length is promised: a cut connection is the only way left to fail.
            self.log.failure("GET /v1/incoming/get failed while streaming")
            if not request._disconnected:
                request.unregisterProducer()
                request.channel.transport.abortConnection()
            raise _Streamed() from None
        request.unregisterProducer()
        request.finish()
        raise _Streamed()

    async def _incoming_fail(self, request):
        device = await self._authenticate(request)
        body = await self._body(request)
        delivery_id = _doc_id(body.get("id"), "id")
        retry_after = _field(body, "retry_after", int, "a number of seconds")
        if not 0 <= retry_after <= MAX_RETRY_AFTER:
            raise bad(f"retry_after: from 0 to {MAX_RETRY_AFTER} seconds")
        error = body.get("error", "")
        if not isinstance(error, str):
            raise bad("error: a short text is required")
        error = "".join(c if c.isprintable() else " " for c in error[:MAX_ERROR_TEXT])
        found = await self._thread(self.storage.fail_incoming, device.user_id,
                                   device.device_id, delivery_id, self._now() + retry_after,
                                   error)
        if not found:
            raise ApiError(404, "no such delivery leased to this device")
        return 200, _dumps({})

    async def _incoming_delete(self, request):
        device = await self._authenticate(request)
        body = await self._body(request)
        ids = body.get("ids")
        if not isinstance(ids, list):
            raise bad("ids: a list of delivery ids is required")
        if len(ids) > MAX_DOCS:
            raise ApiError(413, f"ids: more than {MAX_DOCS} ids in one request")
        ids = [_doc_id(v, f"ids[{i}]") for i, v in enumerate(ids)]
        deleted = await self._thread(self.storage.delete_incoming, device.user_id, ids)
        return 200, _dumps({"deleted": deleted})


class _Streamed(Exception):
    """The answer was written as a stream: nothing more to send."""


def _drop(d):
    """Cancel a waiter nobody awaits, without an unhandled CancelledError."""
    if d is not None and not d.called:
        d.addErrback(lambda f: f.trap(defer.CancelledError))
        d.cancel()


def _fire(d):
    if not d.called:
        d.callback(None)


def _doc_json(doc):
    return {"id": doc.id, "rev": doc.rev, "seq": doc.seq, "data": _b64(doc.data)}


def _encode_changes(changes, incoming=0):
    return _dumps({"changes": [_doc_json(d) for d in changes.docs], "seq": changes.seq,
                   "more": changes.more, "incoming": incoming})


def _text(value):
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
