"""The provider's HTTP API as the device calls it (see docs/sync.rst).

HTTPS with the provider's certificate pinned: a device trusts exactly the certificate
given at ``init`` (``--provider-ca``), or the system's authorities when none was.
Responses are read up to a bound, so a broken or hostile provider cannot make the
daemon buffer without limit.
"""

import json
from base64 import b64decode, b64encode
from io import BytesIO
from urllib.parse import urlencode, urlsplit

from twisted.internet import defer, protocol, threads
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from leapmail.errors import LeapmailError

# One log line per connection the pool opens says nothing a user needs.
_HTTP11ClientFactory.noisy = False

#: The most a response may hold: a changes batch is about 8 MiB of documents, which
#: base64 and JSON make about 11 MiB.
MAX_RESPONSE = 48 * 1024 * 1024
#: Bodies and answers larger than this are encoded and parsed on a thread, not on
#: the reactor (an 8 MiB batch takes tens of milliseconds).
ON_REACTOR = 64 * 1024


class ProviderError(LeapmailError):
    """The provider refused a request, or its answer made no sense."""

    def __init__(self, message, status=None, code=None):
        super().__init__(message)
        self.status = status
        self.code = code


class Unauthorized(ProviderError):
    pass


class TokenExpired(Unauthorized):
    pass


class Conflict(ProviderError):
    def __init__(self, conflicts):
        super().__init__(f"{len(conflicts)} documents changed at the provider meanwhile",
                         409, "conflict")
        self.conflicts = conflicts


class Unreachable(ProviderError):
    """No answer at all: connection refused, reset, timed out, TLS failed."""


@implementer(IPolicyForHTTPS)
class PinnedPolicy:
    """Trust exactly one certificate (the provider's self-signed one)."""

    def __init__(self, pem):
        self._root = Certificate.loadPEM(pem)

    def creatorForNetloc(self, hostname, port):
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._root)


class _Collect(protocol.Protocol):
    def __init__(self, finished, limit):
        self.finished, self.limit, self.parts, self.size = finished, limit, [], 0

    def dataReceived(self, data):
        self.size += len(data)
        if self.size > self.limit:
            self.transport.stopProducing()
            if not self.finished.called:
                self.finished.errback(ProviderError(
                    f"the provider's answer is larger than {self.limit} bytes"))
            return
        self._keep(data)

    def _keep(self, data):
        self.parts.append(data)

    def connectionLost(self, reason):
        if self.finished.called:
            return
        from twisted.web.client import ResponseDone

        if reason.check(ResponseDone):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(Unreachable(
                f"the provider's answer was cut off ({reason.getErrorMessage()})"))


class _Save(_Collect):
    """Like :class:`_Collect`, into a file instead of memory."""

    def __init__(self, finished, limit, sink):
        super().__init__(finished, limit)
        self.sink = sink

    def _keep(self, data):
        self.sink.write(data)


class ProviderClient:
    """Calls on one provider; ``token`` is set once the device has one."""

    def __init__(self, url, ca_pem=None, token=None, reactor=None, timeout=60):
        if reactor is None:
            from twisted.internet import reactor
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ProviderError(f"provider URL must be https://HOST[:PORT], not {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self._reactor = reactor
        self._timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 4
        policy = PinnedPolicy(ca_pem) if ca_pem else BrowserLikePolicyForHTTPS()
        self._agent = Agent(reactor, contextFactory=policy, pool=self._pool,
                            connectTimeout=timeout)
        self._inflight = set()

    def close(self):
        """Cancel what is in flight and drop idle connections."""
        for d in list(self._inflight):
            d.cancel()
        return defer.maybeDeferred(self._pool.closeCachedConnections)

    def _thread(self, fn, *args):
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                         fn, *args)

    async def _request(self, method, path, body=None, auth=True, timeout=None, convert=None):
        """``convert(value)`` of the JSON object of a successful answer (else the value).

        ``body`` is a JSON value, or a callable that makes one.  A body or an answer of
        more than :data:`ON_REACTOR` bytes is encoded or parsed (and converted) on a
        thread: a batch of documents is megabytes of JSON and base64.
        """
        headers = {b"Accept": [b"application/json"], b"User-Agent": [b"leapmail"]}
        if auth:
            if not self.token:
                raise Unauthorized("this device has no token for the provider", 401)
            headers[b"Authorization"] = [b"Bearer " + self.token.encode("ascii")]
        producer = None
        if body is not None:
            headers[b"Content-Type"] = [b"application/json"]
            if callable(body):
                encoded = await self._thread(_encode, body)
            else:
                encoded = _encode(body)
            producer = FileBodyProducer(BytesIO(encoded))
        limit = timeout or self._timeout
        current = self._agent.request(method, (self.url + path).encode("ascii"),
                                      Headers(headers), producer)
        timed_out = []

        def expire():
            timed_out.append(True)
            current.cancel()

        timer = self._reactor.callLater(limit, expire)
        self._inflight.add(current)
        try:
            response = await current
            self._inflight.discard(current)
            collect = _Collect(None, MAX_RESPONSE)
            # Cancelling (timeout, close) drops the connection mid-answer.
            current = collect.finished = defer.Deferred(
                lambda _: collect.transport.stopProducing())
            self._inflight.add(current)
            response.deliverBody(collect)
            data = await current
        except Exception as e:
            if timed_out:
                raise Unreachable(f"the provider did not answer within {limit:g} s") from None
            if isinstance(e, (ProviderError, defer.CancelledError)):
                raise
            reasons = getattr(e, "reasons", None)
            if reasons and all(r.check(defer.CancelledError) for r in reasons):
                raise defer.CancelledError() from None  # close() while connecting
            raise Unreachable(f"cannot reach the provider at {self.url}: {_reason(e)}") from None
        finally:
            self._inflight.discard(current)
            if timer.active():
                timer.cancel()
        what = (method, path, response.code)
        if 200 <= response.code < 300:
            if len(data) > ON_REACTOR:
                return await self._thread(_parse, data, what, convert)
            return _parse(data, what, convert)
        value = _parse(data, what)
        code = value.get("error")
        message = value.get("message") or f"HTTP {response.code}"
        if response.code == 409 and code == "conflict" and "conflicts" in value:
            conflicts = value["conflicts"]
            if not isinstance(conflicts, list):
                raise ProviderError("the provider's conflict answer is malformed", 409)
            raise Conflict(conflicts)
        if response.code == 401:
            cls = TokenExpired if code == "token_expired" else Unauthorized
            raise cls(f"the provider refused: {message}", 401, code)
        raise ProviderError(f"the provider refused: {message} (HTTP {response.code})",
                            response.code, code)

    # -- accounts ----------------------------------------------------------------------

    async def login_params(self, address):
        value = await self._request(
            b"GET", "/v1/login-params?" + urlencode({"address": address}), auth=False)
        return _field(value, "kdf", dict)

    async def enroll(self, address, code, login_kdf, verifier, bundle, device):
        value = await self._request(b"POST", "/v1/enroll", {
            "address": address, "code": code,
            "login": {"kdf": login_kdf, "verifier": b64encode(verifier).decode("ascii")},
            "bundle": b64encode(bundle).decode("ascii"), "device": device,
        }, auth=False)
        return _token(value)

    async def login(self, address, login_key, device):
        value = await self._request(b"POST", "/v1/login", {
            "address": address, "login_key": b64encode(login_key).decode("ascii"),
            "device": device,
        }, auth=False)
        return _token(value)

    async def change_passphrase(self, address, login_key, login_kdf, verifier, bundle):
        """Replace the login verifier and the sealed bundle, proving the current key."""
        await self._request(b"POST", "/v1/passphrase", {
            "address": address, "login_key": b64encode(login_key).decode("ascii"),
            "login": {"kdf": login_kdf, "verifier": b64encode(verifier).decode("ascii")},
            "bundle": b64encode(bundle).decode("ascii"),
        }, auth=False)

    async def bundle(self):
        value = await self._request(b"GET", "/v1/bundle")
        return _b64(_field(value, "bundle", str))

    # -- documents ---------------------------------------------------------------------

    async def push(self, docs):
        """``docs``: ``[(wire_id, base_rev, data)]``; returns ``(seq, [rev, ...])``."""
        def body():
            return {"docs": [{"id": wid, "base": base, "data": b64encode(data).decode("ascii")}
                             for wid, base, data in docs]}

        size = sum(len(data) for _, _, data in docs)
        value = await self._request(b"POST", "/v1/docs",
                                    body if size > ON_REACTOR else body())
        revs = _field(value, "revs", list)
        if len(revs) != len(docs) or not all(isinstance(r, int) for r in revs):
            raise ProviderError("the provider's push answer is malformed")
        return _field(value, "seq", int), revs

    async def get_docs(self, ids):
        return await self._request(b"POST", "/v1/docs/get", {"ids": list(ids)},
                                   convert=_docs)

    async def changes(self, since, limit=1000, wait=0):
        """``(changes, seq, more)``; the count of incoming mail waiting goes to
        ``on_incoming(count)``, if set (the daemon's incoming service)."""
        query = urlencode({"since": since, "limit": limit, "wait": wait})
        changes, seq, more, incoming = await self._request(
            b"GET", "/v1/changes?" + query, timeout=self._timeout + wait, convert=_changes)
        if self.on_incoming is not None and incoming:
            self.on_incoming(incoming)
        return changes, seq, more

    # -- incoming mail (docs/incoming.rst) ---------------------------------------------

    on_incoming = None

    async def put_incoming_key(self, public_key):
        await self._request(b"PUT", "/v1/incoming-key",
                            {"public_key": b64encode(public_key).decode("ascii")})

    async def claim_incoming(self, limit, lease, reclaim=False):
        """``[{"id", "size", "received", "attempts"}]`` leased to this device
        (``reclaim``: its own earlier leases included)."""
        value = await self._request(b"POST", "/v1/incoming/claim",
                                    {"limit": limit, "lease": lease, "reclaim": reclaim})
        items = _field(value, "incoming", list)
        for item in items:
            if not (isinstance(item, dict) and isinstance(item.get("id"), str)
                    and all(isinstance(item.get(k), int) for k in
                            ("size", "received", "attempts"))):
                raise ProviderError("the provider's claim answer is malformed")
        return items

    async def fail_incoming(self, delivery_id, retry_after, error):
        await self._request(b"POST", "/v1/incoming/fail", {
            "id": delivery_id, "retry_after": int(retry_after), "error": error[:200]})

    async def delete_incoming(self, ids):
        await self._request(b"POST", "/v1/incoming/delete", {"ids": list(ids)})

    async def get_incoming(self, delivery_id, sink, limit):
        """Write a delivery's sealed bytes to ``sink`` (a file) as they arrive, at most
        ``limit`` of them."""
        headers = {b"User-Agent": [b"leapmail"],
                   b"Authorization": [b"Bearer " + (self.token or "").encode("ascii")]}
        path = "/v1/incoming/get?" + urlencode({"id": delivery_id})
        current = self._agent.request(b"GET", (self.url + path).encode("ascii"),
                                      Headers(headers), None)
        timer = self._reactor.callLater(self._timeout, current.cancel)
        self._inflight.add(current)
        try:
            response = await current
            self._inflight.discard(current)
            if response.code != 200:
                collect = _Collect(None, 64 * 1024)
                current = collect.finished = defer.Deferred(
                    lambda _: collect.transport.stopProducing())
                self._inflight.add(current)
                response.deliverBody(collect)
                value = _parse(await current, (b"GET", path, response.code))
                message = value.get("message") or f"HTTP {response.code}"
                cls = Unauthorized if response.code == 401 else ProviderError
                raise cls(f"the provider refused: {message} (HTTP {response.code})",
                          response.code, value.get("error"))
            saver = _Save(None, limit, sink)
            current = saver.finished = defer.Deferred(
                lambda _: saver.transport.stopProducing())
            self._inflight.add(current)
            response.deliverBody(saver)
            await current
        except (ProviderError, defer.CancelledError):
            raise
        except Exception as e:
            raise Unreachable(f"cannot fetch incoming mail from {self.url}: {_reason(e)}"
                              ) from None
        finally:
            self._inflight.discard(current)
            if timer.active():
                timer.cancel()


def _encode(body):
    return json.dumps(body() if callable(body) else body).encode("utf-8")


def _parse(data, what, convert=None):
    """The JSON object of an answer, converted; ``what``: method, path, status."""
    try:
        value = json.loads(data) if data else {}
        if not isinstance(value, dict):
            raise ValueError
    except ValueError:
        method, path, status = what
        raise ProviderError(
            f"the provider answered {method.decode()} {path.split('?')[0]} with "
            f"HTTP {status} and no valid JSON", status) from None
    return convert(value) if convert is not None else value


def _docs(value):
    return [_change(c) for c in _field(value, "docs", list)]


def _changes(value):
    changes = [_change(c) for c in _field(value, "changes", list)]
    incoming = value.get("incoming", 0)
    return (changes, _field(value, "seq", int), bool(value.get("more")),
            incoming if isinstance(incoming, int) else 0)


def _reason(exc):
    inner = getattr(exc, "reasons", None)
    if inner:
        return "; ".join(r.getErrorMessage() for r in inner)
    return str(exc) or type(exc).__name__


def _field(value, name, kind):
    item = value.get(name)
    if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
        raise ProviderError(f"the provider's answer lacks a valid {name!r}")
    return item


def _b64(text):
    try:
        return b64decode(text, validate=True)
    except ValueError:
        raise ProviderError("the provider sent malformed base64") from None


def _change(item):
    if not isinstance(item, dict):
        raise ProviderError("the provider sent a malformed document")
    return (_field(item, "id", str), _field(item, "rev", int), item.get("seq"),
            _b64(_field(item, "data", str)))


def _token(value):
    return _field(value, "token", str), str(value.get("device", "")), value.get("expires")
