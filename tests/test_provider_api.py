"""The provider's HTTP API (docs/sync.rst) over real HTTPS on loopback.

Two ways to run it: in this process (:class:`Frontend`: the real site, thread pool and
storage on a real TLS port, with a clock the tests can move for expiry and
throttling, and hooks to know when a long poll is parked), and as real
``twistd -n leapmail-provider`` processes (:class:`ProviderProcess`).  The client is
Python's own ``http.client`` over TLS, pinned to the provider's certificate, run in
a thread when the test runs on the reactor.
"""

import base64
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.python.threadpool import ThreadPool

from leapmail.crypto.kdf import ScryptParams
from leapmail.provider.api import ProviderAPI, code_hash, load_secret
from leapmail.provider.storage import open_storage
from leapmail.tls import certificate_paths, context_factory

BIN = os.path.dirname(sys.executable)
MiB = 1024 * 1024
START = 1_800_000_000.0
KDF = {"name": "scrypt", "version": 1, "n": 16384, "r": 8, "p": 1,
       "salt": base64.b64encode(b"0123456789abcdef").decode()}
LOGIN_KEY = b"the login key of alice, 32 bytes"


def b64(data):
    return base64.b64encode(data).decode()


def sha(data):
    return hashlib.sha256(data).digest()


# -- a blocking HTTPS client pinned to the provider's certificate --------------------


class Response:
    def __init__(self, status, headers, raw):
        self.status = status
        self.headers = headers
        self.raw = raw
        binary = headers.get("Content-Type") == "application/octet-stream"
        self.json = json.loads(raw) if raw and not binary else None

    def __repr__(self):
        return f"<Response {self.status} {self.raw[:300]!r}>"


class Client:
    def __init__(self, port, cert, token=None):
        self.port = port
        self.cert = cert
        self.token = token

    def context(self):
        return ssl.create_default_context(cafile=self.cert)

    def request(self, method, path, body=None, raw=None, token=None, headers=None,
                encode_chunked=False):
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context(),
                                           timeout=90)
        try:
            all_headers = {"Accept": "application/json"}
            token = self.token if token is None else token
            if token:
                all_headers["Authorization"] = f"Bearer {token}"
            if body is not None:
                raw = json.dumps(body).encode()
            if raw is not None:
                all_headers["Content-Type"] = "application/json"
            all_headers.update(headers or {})
            conn.request(method, path, body=raw, headers=all_headers,
                         encode_chunked=encode_chunked)
            response = conn.getresponse()
            return Response(response.status, dict(response.getheaders()), response.read())
        finally:
            conn.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def raw_socket(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        return self.context().wrap_socket(sock, server_hostname="127.0.0.1")

    # The calls of docs/sync.rst, as a device makes them.

    def enroll(self, address, code, device="laptop", key=LOGIN_KEY, bundle=b"sealed bundle"):
        return self.post("/v1/enroll", {
            "address": address, "code": code,
            "login": {"kdf": KDF, "verifier": b64(sha(key))},
            "bundle": b64(bundle), "device": device,
        })

    def login(self, address, key=LOGIN_KEY, device="phone"):
        return self.post("/v1/login", {"address": address, "login_key": b64(key),
                                       "device": device})

    def push(self, docs, **kw):
        return self.post("/v1/docs", {"docs": [{"id": i, "base": b, "data": b64(d)}
                                               for i, b, d in docs]}, **kw)

    def changes(self, since=0, limit=None, wait=None, **kw):
        query = f"since={since}"
        if limit is not None:
            query += f"&limit={limit}"
        if wait is not None:
            query += f"&wait={wait}"
        return self.get("/v1/changes?" + query, **kw)

    def get_docs(self, ids, **kw):
        return self.post("/v1/docs/get", {"ids": ids}, **kw)


def read_raw_response(sock):
    """Status, headers and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed after {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def in_thread(fn, *args, **kw):
    return threads.deferToThread(fn, *args, **kw)


# -- the provider in this process ----------------------------------------------------


class Clock:
    """The time token expiry, code expiry and the throttle go by."""

    def __init__(self):
        self.now = START

    def __call__(self):
        return self.now


class Frontend:
    """One provider front end: the real API on a real TLS port of this process."""

    def __init__(self, home, database=None, clock=None, token_lifetime=3600, threads=4):
        os.makedirs(home, exist_ok=True)
        self.home = home
        self.clock = clock or Clock()
        self.storage = open_storage(home, database)
        self.pool = ThreadPool(minthreads=1, maxthreads=threads, name="test-provider")
        self.pool.start()
        self.api = ProviderAPI(self.storage, self.pool, load_secret(home),
                               token_lifetime=token_lifetime, reactor=reactor,
                               clock=self.clock)
        self.api.start()
        self.port = reactor.listenSSL(0, self.api.site(), context_factory(home),
                                      interface="127.0.0.1")
        self.cert = certificate_paths(home)[0]
        self.parked = []            # Deferreds fired when a long poll parks
        register = self.api.waiters.register

        def watched_register(user_id):
            d = register(user_id)
            waiting, self.parked = self.parked, []
            for w in waiting:
                w.callback(d)
            return d

        self.api.waiters.register = watched_register

    def client(self, token=None):
        return Client(self.port.getHost().port, self.cert, token)

    def next_poll(self):
        """A Deferred that fires with the waiter of the next long poll that parks."""
        d = defer.Deferred()
        self.parked.append(d)
        return d

    def adduser(self, address, code="abcde-fghij", expires_in=7 * 86400):
        self.storage.create_user(address, code_hash(code), int(self.clock.now) + expires_in,
                                 int(self.clock.now))
        return code

    async def enrolled(self, address, code="abcde-fghij", key=LOGIN_KEY, bundle=None):
        self.adduser(address, code)
        client = self.client()
        r = await in_thread(client.enroll, address, code, key=key,
                            bundle=bundle or f"bundle of {address}".encode())
        assert r.status == 201, r
        client.token = r.json["token"]
        return client

    async def stop(self):
        await self.port.stopListening()
        self.api.stop()
        self.pool.stop()
        self.storage.close()


@pytest_twisted.async_yield_fixture
async def provider(tmp_path):
    fe = Frontend(str(tmp_path / "provider"))
    yield fe
    await fe.stop()


async def park_then(frontend, poll, action):
    """Start ``poll`` (a blocking call) in a thread, wait until the provider has parked
    it, then run ``action`` (a blocking call) in a thread.  Returns (poll's response,
    action's result, seconds from the end of the action to the poll's answer)."""
    parked = frontend.next_poll()
    answered_at = []

    def timed_poll():
        r = poll()
        answered_at.append(time.monotonic())
        return r

    polling = in_thread(timed_poll)
    await parked
    result = await in_thread(action)
    done_at = time.monotonic()
    response = await polling
    return response, result, answered_at[0] - done_at


# -- login parameters ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_login_params_for_unknown_addresses_are_stable_and_well_formed(provider):
    c = provider.client()
    a1 = await in_thread(c.get, "/v1/login-params?address=nobody@example.org")
    a2 = await in_thread(c.get, "/v1/login-params?address=NoBody@Example.org")
    other = await in_thread(c.get, "/v1/login-params?address=somebody@example.org")
    assert a1.status == a2.status == other.status == 200
    assert a1.json == a2.json
    kdf = a1.json["kdf"]
    assert set(a1.json) == {"kdf"}
    assert {k: v for k, v in kdf.items() if k != "salt"} == {
        "name": "scrypt", "version": 1, "n": 65536, "r": 8, "p": 1}
    assert len(base64.b64decode(kdf["salt"], validate=True)) == 16
    assert other.json["kdf"]["salt"] != kdf["salt"]
    # What a device would do with them works (the client's own parser).
    ScryptParams.from_dict(kdf)
    # An account made but not claimed looks like no account at all.
    provider.adduser("waiting@example.org")
    waiting = await in_thread(c.get, "/v1/login-params?address=waiting@example.org")
    assert set(waiting.json["kdf"]) == set(kdf) and waiting.json["kdf"]["salt"] != kdf["salt"]
    # Stable across restarts: the salt comes from the provider secret.
    again = ProviderAPI(provider.storage, provider.pool, load_secret(provider.home))
    assert again.fake_kdf("nobody@example.org") == kdf
    secret_path = os.path.join(provider.home, "provider-secret")
    assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600


@pytest_twisted.ensureDeferred
async def test_login_params_of_a_claimed_account_are_its_own(provider):
    await provider.enrolled("alice@example.org")
    r = await in_thread(provider.client().get, "/v1/login-params?address=alice@example.org")
    assert (r.status, r.json) == (200, {"kdf": KDF})


@pytest_twisted.ensureDeferred
async def test_login_params_needs_an_address(provider):
    c = provider.client()
    r = await in_thread(c.get, "/v1/login-params")
    assert (r.status, r.json) == (400, {"error": "bad_request",
                                        "message": "address: a mail address is required"})
    r = await in_thread(c.get, "/v1/login-params?address=no-at-sign")
    assert (r.status, r.json["message"]) == (400, "address: not a mail address")


# -- enrollment and login ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_enroll(provider):
    code = provider.adduser("alice@example.org", "abcde-fghij-klmno")
    c = provider.client()
    # Case, spaces and dashes of a typed code do not matter.
    r = await in_thread(c.enroll, "Alice@example.org", "ABCDE FGHIJ-klmno", device="laptop")
    assert r.status == 201, r
    assert set(r.json) == {"token", "device", "expires"}
    assert r.json["expires"] == int(START) + 3600
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", r.json["token"])
    assert re.fullmatch(r"[0-9a-f]{16}", r.json["device"])
    b = await in_thread(c.get, "/v1/bundle", token=r.json["token"])
    assert (b.status, b.json) == (200, {"bundle": b64(b"sealed bundle")})
    # The code is used up.
    provider.clock.now += 10
    again = await in_thread(c.enroll, "alice@example.org", code)
    assert (again.status, again.json) == (409, {
        "error": "conflict", "message": "this enrollment code has been used already"})


@pytest_twisted.ensureDeferred
async def test_enroll_refusals(provider):
    provider.adduser("alice@example.org", "right-code")
    provider.adduser("late@example.org", "late-code", expires_in=100)
    c = provider.client()
    wrong = await in_thread(c.enroll, "alice@example.org", "wrong-code")
    unknown = await in_thread(c.enroll, "nobody@example.org", "right-code")
    forbidden = {"error": "forbidden", "message": "wrong address or enrollment code"}
    assert (wrong.status, wrong.json) == (403, forbidden)
    assert (unknown.status, unknown.json) == (403, forbidden)
    provider.clock.now += 100
    late = await in_thread(c.enroll, "late@example.org", "late-code")
    assert (late.status, late.json) == (403, {
        "error": "forbidden",
        "message": "this enrollment code has expired; ask the provider for a new one"})
    # Malformed enrollments are 400s that name the field.
    cases = [
        ({"address": "alice@example.org"}, "code: an enrollment code is required"),
        ({"address": "alice@example.org", "code": "x"},
         "login: an object {kdf, verifier} is required"),
        ({"address": "alice@example.org", "code": "x", "login": {"kdf": KDF, "verifier": "AA=="}},
         "login.verifier: the SHA-256 of the login key (32 bytes) is required"),
        ({"address": "alice@example.org", "code": "x",
          "login": {"kdf": KDF, "verifier": b64(bytes(32))}, "bundle": "not base64!"},
         "bundle: not valid base64"),
        ({"address": "alice@example.org", "code": "x",
          "login": {"kdf": KDF, "verifier": b64(bytes(32))}, "bundle": "AAAA", "device": ""},
         "device: a name of 1 to 100 printable characters is required"),
    ]
    for body, message in cases:
        r = await in_thread(c.post, "/v1/enroll", body)
        assert (r.status, r.json) == (400, {"error": "bad_request", "message": message}), body
    # None of that claimed the account: the right code still works.
    ok = await in_thread(c.enroll, "alice@example.org", "right-code")
    assert ok.status == 201


@pytest_twisted.ensureDeferred
async def test_login_with_right_and_wrong_key(provider):
    await provider.enrolled("alice@example.org")
    c = provider.client()
    r = await in_thread(c.login, "alice@example.org", device="phone")
    assert r.status == 200, r
    assert set(r.json) == {"token", "device", "expires"}
    phone = provider.client(r.json["token"])
    b = await in_thread(phone.get, "/v1/bundle")
    assert (b.status, b.json) == (200, {"bundle": b64(b"bundle of alice@example.org")})
    unauthorized = {"error": "unauthorized", "message": "wrong address or login key"}
    wrong = await in_thread(c.login, "alice@example.org", key=b"not the login key")
    unknown = await in_thread(c.login, "nobody@example.org")
    provider.adduser("waiting@example.org")
    unclaimed = await in_thread(c.login, "waiting@example.org")
    for answer in (wrong, unknown, unclaimed):
        assert (answer.status, answer.json) == (401, unauthorized)
        assert set(answer.headers) == set(wrong.headers)


@pytest_twisted.ensureDeferred
async def test_passphrase_change_replaces_verifier_and_bundle(provider):
    await provider.enrolled("alice@example.org")
    c = provider.client()
    new_key, new_kdf = b"the new login key", dict(KDF, salt=b64(b"another salt 123"))

    def change(key, body_extra=None):
        body = {"address": "alice@example.org", "login_key": b64(key),
                "login": {"kdf": new_kdf, "verifier": b64(sha(new_key))},
                "bundle": b64(b"resealed bundle")}
        body.update(body_extra or {})
        return c.post("/v1/passphrase", body)

    wrong = await in_thread(change, b"not the login key")
    assert (wrong.status, wrong.json) == (
        401, {"error": "unauthorized", "message": "wrong address or login key"})
    provider.clock.now += 10  # past the throttle of that failure
    bad = await in_thread(change, LOGIN_KEY, {"bundle": ""})
    assert (bad.status, bad.json["message"]) == (
        400, "bundle: the sealed secrets bundle is required")
    provider.clock.now += 10
    ok = await in_thread(change, LOGIN_KEY)
    assert (ok.status, ok.json) == (200, {})
    old = await in_thread(c.login, "alice@example.org")
    assert old.status == 401
    provider.clock.now += 10
    r = await in_thread(c.login, "alice@example.org", key=new_key)
    assert r.status == 200, r
    bundle = await in_thread(provider.client(r.json["token"]).get, "/v1/bundle")
    assert bundle.json == {"bundle": b64(b"resealed bundle")}
    params = await in_thread(c.get, "/v1/login-params?address=alice%40example.org")
    assert params.json == {"kdf": new_kdf}


@pytest_twisted.ensureDeferred
async def test_failed_logins_are_throttled_per_address(provider):
    await provider.enrolled("alice@example.org")
    await provider.enrolled("bob@example.org", code="bob-code")
    c = provider.client()
    clock = provider.clock
    r = await in_thread(c.login, "alice@example.org", key=b"wrong")
    assert r.status == 401
    # Refused at once, even with the right key, for 1 s, then 2, 4, ...
    for delay in (1, 2, 4, 8):
        r = await in_thread(c.login, "alice@example.org")
        assert (r.status, r.json, r.headers["Retry-After"]) == (429, {
            "error": "slow_down",
            "message": f"too many failed attempts for this address; try again in "
                       f"{delay} seconds"}, str(delay))
        clock.now += delay - 0.5
        r = await in_thread(c.login, "alice@example.org")
        assert r.status == 429
        clock.now += 0.5
        r = await in_thread(c.login, "alice@example.org", key=b"wrong")
        assert r.status == 401
    # Another address is not affected, and neither is an enrollment elsewhere.
    r = await in_thread(c.login, "bob@example.org")
    assert r.status == 200
    # Capped: after many failures the wait stops growing at 300 s.
    for _ in range(12):
        clock.now += 1000
        r = await in_thread(c.login, "alice@example.org", key=b"wrong")
        assert r.status == 401
    r = await in_thread(c.login, "alice@example.org")
    assert (r.status, r.headers["Retry-After"]) == (429, "300")
    # A success starts afresh.
    clock.now += 300
    r = await in_thread(c.login, "alice@example.org")
    assert r.status == 200
    r = await in_thread(c.login, "alice@example.org", key=b"wrong")
    assert r.status == 401
    r = await in_thread(c.login, "alice@example.org")
    assert r.headers["Retry-After"] == "1"


@pytest_twisted.ensureDeferred
async def test_failed_enrollments_are_throttled(provider):
    provider.adduser("alice@example.org", "right-code")
    c = provider.client()
    r = await in_thread(c.enroll, "alice@example.org", "wrong-code")
    assert r.status == 403
    r = await in_thread(c.enroll, "alice@example.org", "right-code")
    assert (r.status, r.json["error"]) == (429, "slow_down")
    provider.clock.now += 1
    r = await in_thread(c.enroll, "alice@example.org", "right-code")
    assert r.status == 201


# -- tokens ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tokens(provider):
    alice = await provider.enrolled("alice@example.org")
    anonymous = provider.client()
    r = await in_thread(anonymous.get, "/v1/bundle")
    assert (r.status, r.json) == (401, {
        "error": "unauthorized",
        "message": "this request needs an 'Authorization: Bearer TOKEN' header"})
    for token in ("x", "A" * 43, alice.token[:-1] + ("A" if alice.token[-1] != "A" else "B"),
                  "ünïcode-token-ünïcode-token"):
        r = await in_thread(anonymous.get, "/v1/bundle", headers={
            "Authorization": f"Bearer {token}".encode()})
        assert (r.status, r.json) == (401, {"error": "unauthorized", "message": "unknown token"})
    r = await in_thread(anonymous.get, "/v1/bundle",
                        headers={"Authorization": f"Basic {alice.token}"})
    assert r.status == 401
    # Good until the lifetime is up, then 'token_expired'.
    provider.clock.now += 3599
    assert (await in_thread(alice.get, "/v1/bundle")).status == 200
    provider.clock.now += 1
    expired = {"error": "token_expired", "message": "the token has expired; log in again"}
    for call in (lambda: alice.get("/v1/bundle"), lambda: alice.changes(0),
                 lambda: alice.push([("a", 0, b"x")]), lambda: alice.get_docs(["a"])):
        r = await in_thread(call)
        assert (r.status, r.json) == (401, expired)
    r = await in_thread(alice.login, "alice@example.org")
    assert r.status == 200
    assert (await in_thread(alice.get, "/v1/bundle", token=r.json["token"])).status == 200


@pytest_twisted.ensureDeferred
async def test_only_hashes_of_tokens_and_codes_are_stored(provider):
    code = provider.adduser("alice@example.org", "stored-nowhere-code")
    c = provider.client()
    r = await in_thread(c.enroll, "alice@example.org", code)
    second = await in_thread(c.login, "alice@example.org")
    tokens = [r.json["token"], second.json["token"]]
    data = b""
    for name in os.listdir(provider.home):
        if name.startswith("provider.db"):
            with open(os.path.join(provider.home, name), "rb") as f:
                data += f.read()
    assert b"alice@example.org" in data          # the reading works
    for secret in tokens + [code, "storednowherecode"]:
        assert secret.encode() not in data
    for token in tokens:
        assert base64.urlsafe_b64decode(token + "=") not in data
    assert LOGIN_KEY not in data
    assert sha(tokens[0].encode()) in data


# -- documents ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_push_changes_conflict_get(provider):
    alice = await provider.enrolled("alice@example.org")
    r = await in_thread(alice.push, [("msg-1", 0, b"\x00one"), ("msg_2", 0, b"two\xff")])
    assert (r.status, r.json) == (200, {"seq": 2, "revs": [1, 1]})
    r = await in_thread(alice.push, [("msg-1", 1, b"one, again")])
    assert (r.status, r.json) == (200, {"seq": 3, "revs": [2]})
    r = await in_thread(alice.changes, 0)
    assert (r.status, r.json) == (200, {"changes": [
        {"id": "msg_2", "rev": 1, "seq": 2, "data": b64(b"two\xff")},
        {"id": "msg-1", "rev": 2, "seq": 3, "data": b64(b"one, again")},
    ], "seq": 3, "more": False, "incoming": 0})
    r = await in_thread(alice.changes, 2, limit=1)
    assert r.json == {"changes": [{"id": "msg-1", "rev": 2, "seq": 3,
                                   "data": b64(b"one, again")}], "seq": 3, "more": False, "incoming": 0}
    r = await in_thread(alice.changes, 0, limit=1)
    assert (r.json["seq"], r.json["more"]) == (2, True)
    r = await in_thread(alice.changes, 3)
    assert r.json == {"changes": [], "seq": 3, "more": False, "incoming": 0}
    # A conflict names every stale document and writes nothing.
    r = await in_thread(alice.push, [("new", 0, b"n"), ("msg-1", 1, b"stale"),
                                     ("msg_2", 0, b"exists"), ("ghost", 3, b"g")])
    assert (r.status, r.json) == (409, {
        "error": "conflict",
        "message": "3 documents are not at their base revision; nothing was written",
        "conflicts": [{"id": "msg-1", "rev": 2}, {"id": "msg_2", "rev": 1},
                      {"id": "ghost", "rev": 0}]})
    r = await in_thread(alice.get_docs, ["msg-1", "new", "msg_2", "ghost", "msg-1"])
    assert (r.status, r.json) == (200, {"docs": [
        {"id": "msg-1", "rev": 2, "seq": 3, "data": b64(b"one, again")},
        {"id": "msg_2", "rev": 1, "seq": 2, "data": b64(b"two\xff")},
    ]})
    r = await in_thread(alice.changes, 3)
    assert r.json == {"changes": [], "seq": 3, "more": False, "incoming": 0}
    r = await in_thread(alice.push, [])
    assert (r.status, r.json) == (200, {"seq": 3, "revs": []})
    r = await in_thread(alice.get_docs, [])
    assert (r.status, r.json) == (200, {"docs": []})


@pytest_twisted.ensureDeferred
async def test_big_answers_are_bounded_and_streamed(provider):
    alice = await provider.enrolled("alice@example.org")
    docs = [(f"big{i}", 0, bytes([i]) * (5 * MiB)) for i in range(3)]
    r = await in_thread(alice.push, docs[:2])
    assert r.status == 200
    r = await in_thread(alice.push, docs[2:] + [("small", 0, b"s")])
    assert r.json == {"seq": 4, "revs": [1, 1]}
    # changes: about 8 MiB at most, but always one.
    pages = []
    since = 0
    while True:
        r = await in_thread(alice.changes, since)
        pages.append([c["id"] for c in r.json["changes"]])
        since = r.json["seq"]
        if not r.json["more"]:
            break
    assert pages == [["big0"], ["big1"], ["big2", "small"]]
    # docs/get: all of them, in one answer written a batch at a time.
    r = await in_thread(alice.get_docs, ["small", "big2", "nope", "big0", "big1"])
    assert r.status == 200
    assert "Content-Length" not in r.headers
    assert [(d["id"], base64.b64decode(d["data"])) for d in r.json["docs"]] == [
        ("small", b"s"), ("big2", docs[2][2]), ("big0", docs[0][2]), ("big1", docs[1][2])]


@pytest_twisted.ensureDeferred
async def test_accounts_are_isolated(provider):
    alice = await provider.enrolled("alice@example.org", code="code-a")
    bob = await provider.enrolled("bob@example.org", code="code-b")
    r = await in_thread(alice.push, [("shared-id", 0, b"alice's"), ("only-alice", 0, b"a")])
    assert r.json["seq"] == 2
    r = await in_thread(bob.changes, 0)
    assert r.json == {"changes": [], "seq": 0, "more": False, "incoming": 0}
    r = await in_thread(bob.get_docs, ["shared-id", "only-alice"])
    assert r.json == {"docs": []}
    # Alice's revision means nothing in Bob's account.
    r = await in_thread(bob.push, [("shared-id", 1, b"bob's")])
    assert (r.status, r.json["conflicts"]) == (409, [{"id": "shared-id", "rev": 0}])
    r = await in_thread(bob.push, [("shared-id", 0, b"bob's")])
    assert r.json == {"seq": 1, "revs": [1]}
    r = await in_thread(alice.get_docs, ["shared-id"])
    assert [base64.b64decode(d["data"]) for d in r.json["docs"]] == [b"alice's"]
    r = await in_thread(bob.get, "/v1/bundle")
    assert r.json == {"bundle": b64(b"bundle of bob@example.org")}
    # Bob's pushes wake Bob's long polls, not Alice's.
    r = await in_thread(alice.changes, 2, wait=0.2)
    assert r.json == {"changes": [], "seq": 2, "more": False, "incoming": 0}


# -- limits ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_oversized_body_is_refused_before_it_is_read(provider):
    alice = await provider.enrolled("alice@example.org")

    def declare_only():
        with alice.raw_socket() as sock:
            sock.sendall(b"POST /v1/docs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Authorization: Bearer " + alice.token.encode() + b"\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (32 * MiB + 1))
            # Not a byte of the body is sent: the answer comes anyway.
            return read_raw_response(sock)

    status, headers, body = await in_thread(declare_only)
    assert status == 413
    assert headers["connection"] == "close"
    assert json.loads(body) == {"error": "too_large",
                                "message": "the request body is over the limit of 33554432 bytes"}


@pytest_twisted.ensureDeferred
async def test_oversized_bodies_sent_whole_get_their_answer(provider):
    alice = await provider.enrolled("alice@example.org")
    too_large = {"error": "too_large",
                 "message": "the request body is over the limit of 33554432 bytes"}
    r = await in_thread(alice.post, "/v1/docs", raw=b" " * (32 * MiB + 1))
    assert (r.status, r.json) == (413, too_large)

    def chunks():
        for _ in range(33):
            yield b" " * MiB

    r = await in_thread(alice.post, "/v1/docs", raw=chunks(), encode_chunked=True)
    assert (r.status, r.json) == (413, too_large)
    # Exactly at the limit is not over it (and is read: a JSON error, not a 413).
    r = await in_thread(alice.post, "/v1/docs", raw=b" " * (32 * MiB))
    assert (r.status, r.json["message"]) == (400, "the body is not valid JSON")
    r = await in_thread(alice.push, [("ok", 0, b"fine")])
    assert r.status == 200


@pytest_twisted.ensureDeferred
async def test_request_limits(provider):
    alice = await provider.enrolled("alice@example.org")

    async def post(path, body=None, raw=None):
        return await in_thread(alice.post, path, body, raw=raw)

    def error(status, message):
        return status, {"error": {400: "bad_request", 413: "too_large", 404: "not_found"}[status],
                        "message": message}

    doc = {"id": "a", "base": 0, "data": "AA=="}
    cases = [
        (await post("/v1/docs", raw=b"{not json"), error(400, "the body is not valid JSON")),
        (await post("/v1/docs", raw=b"\xff\xfe"), error(400, "the body is not valid JSON")),
        (await post("/v1/docs", raw=b"[]"), error(400, "the body must be a JSON object")),
        (await post("/v1/docs", raw=b"[" * 100000), error(400, "the body is not valid JSON")),
        (await post("/v1/docs", {}), error(400, "docs: a list of documents is required")),
        (await post("/v1/docs", {"docs": [doc] * 1001}),
         error(413, "docs: more than 1000 documents in one push")),
        (await post("/v1/docs", {"docs": [{**doc, "id": "a/b"}]}),
         error(400, "docs[0].id: a document id is 1 to 64 characters of A-Z a-z 0-9 _ -")),
        (await post("/v1/docs", {"docs": [doc, {**doc, "id": "x" * 65}]}),
         error(400, "docs[1].id: a document id is 1 to 64 characters of A-Z a-z 0-9 _ -")),
        (await post("/v1/docs", {"docs": [{**doc, "id": ""}]}),
         error(400, "docs[0].id: a document id is 1 to 64 characters of A-Z a-z 0-9 _ -")),
        (await post("/v1/docs", {"docs": [{**doc, "id": "é"}]}),
         error(400, "docs[0].id: a document id is 1 to 64 characters of A-Z a-z 0-9 _ -")),
        (await post("/v1/docs", {"docs": [doc, doc]}),
         error(400, "docs[1].id: a is in this push twice")),
        (await post("/v1/docs", {"docs": [{**doc, "base": -1}]}),
         error(400, "docs[0].base: a revision (an integer from 0) is required")),
        (await post("/v1/docs", {"docs": [{**doc, "base": True}]}),
         error(400, "docs[0].base: a revision (an integer from 0) is required")),
        (await post("/v1/docs", {"docs": [{**doc, "data": "A"}]}),
         error(400, "docs[0].data: not valid base64")),
        (await post("/v1/docs", {"docs": [{**doc, "data": b64(bytes(8 * MiB + 1))}]}),
         error(413, "docs[0].data: more than 8388608 bytes")),
        (await post("/v1/docs/get", {"ids": ["a"] * 1001}),
         error(413, "ids: more than 1000 ids in one request")),
        (await post("/v1/docs/get", {"ids": ["ok", "not ok"]}),
         error(400, "ids[1]: a document id is 1 to 64 characters of A-Z a-z 0-9 _ -")),
        (await post("/v1/nothing", {}), error(404, "no such endpoint")),
        (await in_thread(alice.get, "/v1/docs"), error(404, "no such endpoint")),
        (await in_thread(alice.changes, "-1"),
         error(400, "since: a sequence number is required")),
        (await in_thread(alice.changes, 0, limit=0), error(400, "limit: from 1 to 1000")),
        (await in_thread(alice.changes, 0, limit=1001), error(400, "limit: from 1 to 1000")),
        (await in_thread(alice.changes, 0, wait=31), error(400, "wait: at most 30 seconds")),
        (await in_thread(alice.changes, 0, wait="soon"),
         error(400, "wait: a number of seconds is required")),
        (await in_thread(alice.get, "/v1/changes?since=1&since=2"),
         error(400, "since: given more than once")),
    ]
    for r, (status, body) in cases:
        assert (r.status, r.json) == (status, body)
    # The largest document is taken, and so is a full push.
    r = await in_thread(alice.push, [("max", 0, bytes(8 * MiB))])
    assert r.json == {"seq": 1, "revs": [1]}
    r = await in_thread(alice.push, [(f"d{i}", 0, b"x") for i in range(1000)])
    assert r.json == {"seq": 1001, "revs": [1] * 1000}
    r = await in_thread(alice.get_docs, ["a" * 64])
    assert r.json == {"docs": []}
    # Nothing of the refused pushes was written.
    r = await in_thread(alice.get_docs, ["a"])
    assert r.json == {"docs": []}


# -- long polls -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_long_poll_times_out_empty(provider):
    alice = await provider.enrolled("alice@example.org")
    await in_thread(alice.push, [("a", 0, b"x")])
    started = time.monotonic()
    r = await in_thread(alice.changes, 1, wait=0.5)
    assert time.monotonic() - started >= 0.5
    assert r.json == {"changes": [], "seq": 1, "more": False, "incoming": 0}
    # With something to say, no wait at all.
    r = await in_thread(alice.changes, 0, wait=30)
    assert [c["id"] for c in r.json["changes"]] == ["a"]
    assert provider.api.waiters.count() == 0


@pytest_twisted.ensureDeferred
async def test_long_poll_wakes_on_a_push(provider):
    alice = await provider.enrolled("alice@example.org")
    phone_token = (await in_thread(alice.login, "alice@example.org")).json["token"]
    phone = provider.client(phone_token)
    poll_started = time.monotonic()
    r, pushed, latency = await park_then(
        provider, lambda: alice.changes(0, wait=30), lambda: phone.push([("new", 0, b"hi")]))
    assert pushed.json == {"seq": 1, "revs": [1]}
    assert r.json == {"changes": [{"id": "new", "rev": 1, "seq": 1, "data": b64(b"hi")}],
                      "seq": 1, "more": False, "incoming": 0}
    assert latency < 1.0
    assert time.monotonic() - poll_started < 10


@pytest_twisted.ensureDeferred
async def test_a_long_poll_whose_client_leaves_is_cancelled(provider):
    alice = await provider.enrolled("alice@example.org")
    parked = provider.next_poll()
    sock = await in_thread(alice.raw_socket)
    await in_thread(sock.sendall, b"GET /v1/changes?since=0&wait=30 HTTP/1.1\r\n"
                                  b"Host: 127.0.0.1\r\nAuthorization: Bearer "
                                  + alice.token.encode() + b"\r\n\r\n")
    waiter = await parked
    assert provider.api.waiters.count() == 1
    ended = defer.Deferred()

    def observe(result):
        # Look, and pass the result on untouched to the poll that awaits it.
        ended.callback(type(getattr(result, "value", result)))
        return result

    waiter.addBoth(observe)
    await in_thread(sock.close)
    assert await ended is defer.CancelledError
    assert provider.api.waiters.count() == 0
    # The provider is fine for everyone else.
    r = await in_thread(alice.push, [("a", 0, b"x")])
    assert r.status == 200


@pytest_twisted.ensureDeferred
async def test_front_ends_sharing_postgresql_wake_each_other(postgres_server, tmp_path):
    url = postgres_server.create_database()
    a = Frontend(str(tmp_path / "a"), url)
    b = Frontend(str(tmp_path / "b"), url)
    try:
        # B hears of the database through its listener; make sure it is listening.
        listener = b.storage._listeners[0]
        assert await in_thread(listener.wait_ready, 30)
        alice_on_a = await a.enrolled("alice@example.org")
        alice_on_b = b.client(alice_on_a.token)
        for round_ in range(3):
            r, pushed, latency = await park_then(
                b, lambda: alice_on_b.changes(round_, wait=30),
                lambda: alice_on_a.push([(f"doc{round_}", 0, b"from a")]))
            assert pushed.json == {"seq": round_ + 1, "revs": [1]}
            assert [(c["id"], c["seq"]) for c in r.json["changes"]] == [(f"doc{round_}",
                                                                        round_ + 1)]
            assert latency < 1.0, latency
    finally:
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_a_lost_database_connection_is_a_503_then_heals(postgres_server, tmp_path):
    url = postgres_server.create_database()
    # One thread, so that the connection the next request uses is one that was cut.
    fe = Frontend(str(tmp_path / "p"), url, threads=1)
    try:
        alice = await fe.enrolled("alice@example.org")
        assert (await in_thread(alice.push, [("a", 0, b"x")])).status == 200
        database = url.rsplit("/", 1)[1]
        # Every connection of the front end's threads is cut, as a database restart would.
        postgres_server.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             f"WHERE datname = '{database}' AND pid <> pg_backend_pid();")
        r = await in_thread(alice.changes, 0)
        assert (r.status, r.json, r.headers["Retry-After"]) == (503, {
            "error": "unavailable",
            "message": "the provider's storage is unavailable; try again later"}, "5")
        # The broken connection was dropped; the next request opens a new one.
        r = await in_thread(alice.changes, 0)
        assert (r.status, r.json["seq"]) == (200, 1)
    finally:
        await fe.stop()


# -- the commands: leapmail-provider and twistd leapmail-provider ---------------------


def provider_cmd(*args, check=False):
    return subprocess.run([os.path.join(BIN, "leapmail-provider"), *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
                          check=check)


def adduser(home, address, database=None):
    extra = ["--database", database] if database else []
    result = provider_cmd("--home", home, *extra, "adduser", address)
    assert result.returncode == 0, result
    return result.stdout.splitlines()[-1]


def test_adduser_prints_the_code_last(tmp_path):
    home = str(tmp_path / "p")
    result = provider_cmd("--home", home, "adduser", "Alice@Example.org")
    assert result.returncode == 0 and result.stderr == ""
    code = result.stdout.splitlines()[-1]
    assert re.fullmatch(r"([a-z2-7]{5}-){4}[a-z2-7]{5}", code)
    assert "alice@example.org" in result.stdout
    # --home after the command too; the same address twice is an error.
    again = provider_cmd("adduser", "alice@example.org", "--home", home)
    assert again.returncode == 1
    assert again.stderr == "leapmail-provider: the account alice@example.org exists already\n"
    bad = provider_cmd("adduser", "not an address", "--home", home)
    assert (bad.returncode, bad.stderr) == (
        1, "leapmail-provider: 'not an address': not a mail address\n")
    nohome = subprocess.run([os.path.join(BIN, "leapmail-provider"), "adduser", "x@y"],
                            capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items()
                                 if k != "LEAPMAIL_PROVIDER_HOME"})
    assert nohome.returncode == 2 and "--home DIR is required" in nohome.stderr
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(home, "provider.db")).st_mode) == 0o600


def test_adduser_on_postgresql(postgres_server, tmp_path):
    url = postgres_server.create_database()
    home = str(tmp_path / "p")
    code = adduser(home, "alice@example.org", url)
    assert re.fullmatch(r"([a-z2-7]{5}-){4}[a-z2-7]{5}", code)
    again = provider_cmd("--home", home, "--database", url, "adduser", "alice@example.org")
    assert again.returncode == 1
    assert postgres_server.password not in again.stdout + again.stderr
    wrong = url.replace(postgres_server.password, "not-the-password")
    failed = provider_cmd("--home", home, "--database", wrong, "adduser", "bob@example.org")
    assert failed.returncode == 1
    assert len(failed.stderr.splitlines()) == 1
    assert failed.stderr.startswith("leapmail-provider: cannot connect to postgresql://"
                                    "leapmail:***@127.0.0.1:")
    assert "not-the-password" not in failed.stderr


class ProviderProcess:
    """``twistd -n leapmail-provider`` on a free loopback port."""

    LISTENING = re.compile(r"Provider listening on 127\.0\.0\.1:([0-9]+)")

    def __init__(self, home, *args):
        self.home = home
        self.args = args
        self.process = None
        self.port = None
        self.log = []

    def start(self):
        self.process = subprocess.Popen(
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "--logfile=-",
             "leapmail-provider", "--home", self.home, "--port", "0", *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, start_new_session=True)
        for line in self.process.stdout:
            self.log.append(line)
            match = self.LISTENING.search(line)
            if match:
                self.port = int(match.group(1))
                break
        else:
            self.process.wait(60)
            raise AssertionError(f"the provider exited ({self.process.returncode}):\n"
                                 + "".join(self.log))
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        return self

    def _drain(self):
        for line in self.process.stdout:
            self.log.append(line)

    def client(self, token=None):
        return Client(self.port, os.path.join(self.home, "tls-cert.pem"), token)

    def stop(self):
        if self.process is None:
            return ""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self._reader.join(30)
        self.process.stdout.close()
        log = "".join(self.log)
        assert self.process.returncode == -signal.SIGTERM, log
        assert "Traceback" not in log, log
        self.process = None
        return log


@pytest.fixture(params=["sqlite", "postgres"])
def database(request):
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_server").create_database()


def test_twistd_provider_headline_flow(tmp_path, database):
    home = str(tmp_path / "p")
    extra = ["--database", database] if database else []
    code = adduser(home, "alice@example.org", database)
    p = ProviderProcess(home, *extra).start()
    try:
        assert sum("Provider listening on" in line for line in p.log) == 1
        for name in ("tls-cert.pem", "tls-key.pem", "provider-secret"):
            assert stat.S_IMODE(os.stat(os.path.join(home, name)).st_mode) == 0o600
        c = p.client()
        fake = c.get("/v1/login-params?address=alice@example.org")
        assert fake.status == 200 and fake.json["kdf"] != KDF
        r = c.enroll("alice@example.org", code)
        assert r.status == 201, r
        laptop = p.client(r.json["token"])
        assert r.json["expires"] - time.time() == pytest.approx(30 * 86400, abs=120)
        assert c.get("/v1/login-params?address=alice@example.org").json == {"kdf": KDF}
        phone = p.client(c.login("alice@example.org").json["token"])
        assert c.login("alice@example.org", key=b"wrong").status == 401
        r = laptop.push([("m1", 0, b"one"), ("m2", 0, b"two")])
        assert (r.status, r.json) == (200, {"seq": 2, "revs": [1, 1]})
        r = phone.changes(0)
        assert r.json == {"changes": [{"id": "m1", "rev": 1, "seq": 1, "data": b64(b"one")},
                                      {"id": "m2", "rev": 1, "seq": 2, "data": b64(b"two")}],
                          "seq": 2, "more": False, "incoming": 0}
        r = phone.push([("m1", 0, b"stale")])
        assert (r.status, r.json["conflicts"]) == (409, [{"id": "m1", "rev": 1}])
        r = phone.get_docs(["m2", "m1"])
        assert [d["id"] for d in r.json["docs"]] == ["m2", "m1"]
        # A long poll of the laptop returns with the phone's push.
        result = {}
        poll = threading.Thread(target=lambda: result.update(r=laptop.changes(2, wait=30)))
        started = time.monotonic()
        poll.start()
        pushed = phone.push([("m3", 0, b"three")])
        pushed_at = time.monotonic()
        poll.join(60)
        assert pushed.json == {"seq": 3, "revs": [1]}
        assert [c["id"] for c in result["r"].json["changes"]] == ["m3"]
        assert time.monotonic() - pushed_at < 1.0
        assert time.monotonic() - started < 10
        # Another account's token opens nothing of Alice's.
        bob_code = adduser(home, "bob@example.org", database)
        bob = p.client(c.enroll("bob@example.org", bob_code).json["token"])
        assert bob.changes(0).json == {"changes": [], "seq": 0, "more": False, "incoming": 0}
        assert bob.get_docs(["m1", "m2", "m3"]).json == {"docs": []}
        assert bob.get("/v1/bundle").json == {"bundle": b64(b"sealed bundle")}
        tokens = [laptop.token, phone.token, bob.token]
    finally:
        log = p.stop()
    for secret in tokens + [code, b64(LOGIN_KEY)]:
        assert secret not in log
    if database:
        password = database.split(":")[2].split("@")[0]
        assert password not in log
        assert "postgresql://leapmail:***@127.0.0.1:" in log


def test_twistd_token_lifetime(tmp_path):
    home = str(tmp_path / "p")
    code = adduser(home, "alice@example.org")
    p = ProviderProcess(home, "--token-lifetime", "0").start()
    try:
        c = p.client()
        r = c.enroll("alice@example.org", code)
        assert r.status == 201
        assert r.json["expires"] <= time.time() + 1
        r = c.get("/v1/bundle", token=r.json["token"])
        assert (r.status, r.json) == (401, {"error": "token_expired",
                                            "message": "the token has expired; log in again"})
    finally:
        p.stop()


def test_two_twistd_front_ends_on_one_postgresql(postgres_server, tmp_path):
    url = postgres_server.create_database()
    home = str(tmp_path / "p")
    code = adduser(home, "alice@example.org", url)
    a = ProviderProcess(home, "--database", url).start()
    b = ProviderProcess(home, "--database", url).start()
    try:
        token = a.client().enroll("alice@example.org", code).json["token"]
        on_a, on_b = a.client(token), b.client(token)
        # B knows the account A enrolled: they share only the database.
        assert on_b.get("/v1/bundle").json == {"bundle": b64(b"sealed bundle")}
        for round_ in range(3):
            result = {}
            poll = threading.Thread(
                target=lambda: result.update(r=on_b.changes(round_, wait=30)))
            started = time.monotonic()
            poll.start()
            assert on_a.push([(f"d{round_}", 0, b"x")]).json["seq"] == round_ + 1
            pushed_at = time.monotonic()
            poll.join(60)
            assert [c["id"] for c in result["r"].json["changes"]] == [f"d{round_}"]
            assert time.monotonic() - pushed_at < 1.0
            assert time.monotonic() - started < 10
    finally:
        a.stop()
        b.stop()


def test_twistd_refuses_bad_options(tmp_path):
    def run(*args):
        return subprocess.run(
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "leapmail-provider", *args],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)

    r = run("--home", str(tmp_path), "--port", "70000")
    assert r.returncode == 1
    assert r.stdout.splitlines()[-1].endswith(
        ": --port must be a port number from 0 to 65535, not '70000'")
    r = run("--port", "0")
    assert r.stdout.splitlines()[-1].endswith(": --home DIR is required")
    r = run("--home", str(tmp_path), "--tls-cert", "x.pem")
    assert r.stdout.splitlines()[-1].endswith(": --tls-cert and --tls-key go together")
    r = run("--home", str(tmp_path / "h"), "--port", "0", "--database", "mysql://x")
    assert r.returncode == 1
    assert r.stderr.strip() == ("leapmail-provider: --database must be a postgresql:// URL "
                                "or sqlite:PATH")


# -- incoming mail ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_incoming_key_claim_get_fail_delete(provider):
    from leapmail.crypto.sealed import IncomingKeyPair
    from leapmail.provider.intake import Intake

    keys = IncomingKeyPair.generate()
    laptop = await provider.enrolled("alice@example.org")
    r = await in_thread(laptop.login, "alice@example.org")
    phone = provider.client(r.json["token"])
    bad_key = await in_thread(laptop.request, "PUT", "/v1/incoming-key",
                              {"public_key": b64(b"x" * 1215)})
    assert bad_key.status == 400 and "public_key" in bad_key.json["message"]
    for _ in range(2):          # idempotent
        r = await in_thread(laptop.request, "PUT", "/v1/incoming-key",
                            {"public_key": b64(keys.public_bytes())})
        assert (r.status, r.json) == (200, {})
    intake = Intake(provider.storage, provider.pool, 16 << 20, "mx.test", reactor,
                    wake=provider.api.waiters.wake, clock=provider.clock)
    assert await intake.accepts("alice@example.org")
    message = b"Subject: hello\r\n\r\n" + b"body line\r\n" * 300_000

    async def deliver():
        receiver = intake.receiver(["alice@example.org"], b"Received: test\r\n")
        receiver.write(message)
        await receiver.finish()

    # A parked long poll wakes for the new delivery and counts it.
    polling = in_thread(laptop.changes, 0, wait=20)
    await provider.next_poll()
    started = time.monotonic()
    await deliver()
    answer = await polling
    assert time.monotonic() - started < 2
    assert (answer.status, answer.json["incoming"], answer.json["changes"]) == (200, 1, [])

    r = await in_thread(laptop.post, "/v1/incoming/claim", {"limit": 10, "lease": 60})
    assert r.status == 200
    [item] = r.json["incoming"]
    assert set(item) == {"id", "size", "received", "attempts"} and item["attempts"] == 0
    # Leased to the laptop: the phone can neither claim nor read it.
    r = await in_thread(phone.post, "/v1/incoming/claim", {"limit": 10, "lease": 60})
    assert (r.status, r.json) == (200, {"incoming": []})
    r = await in_thread(phone.post, "/v1/incoming/claim",
                        {"limit": 10, "lease": 60, "reclaim": True})
    assert (r.status, r.json) == (200, {"incoming": []})
    r = await in_thread(phone.get, "/v1/incoming/get?id=" + item["id"])
    assert r.status == 404
    # The laptop, restarted, takes its own lease back without waiting for it to end.
    r = await in_thread(laptop.post, "/v1/incoming/claim", {"limit": 10, "lease": 60})
    assert r.json == {"incoming": []}
    r = await in_thread(laptop.post, "/v1/incoming/claim",
                        {"limit": 10, "lease": 60, "reclaim": True})
    assert [i["id"] for i in r.json["incoming"]] == [item["id"]]
    r = await in_thread(laptop.get, "/v1/incoming/get?id=" + item["id"])
    assert r.status == 200 and r.headers["Content-Type"] == "application/octet-stream"
    assert len(r.raw) == item["size"] > 3 * 1024 * 1024
    assert keys.open(r.raw) == b"Received: test\r\n" + message
    # A failure puts it off and counts; the lease is gone.
    r = await in_thread(phone.post, "/v1/incoming/fail",
                        {"id": item["id"], "retry_after": 30, "error": "not mine"})
    assert r.status == 404
    r = await in_thread(laptop.post, "/v1/incoming/fail",
                        {"id": item["id"], "retry_after": 30, "error": "cannot open\x00"})
    assert (r.status, r.json) == (200, {})
    r = await in_thread(phone.post, "/v1/incoming/claim", {"limit": 10, "lease": 60})
    assert r.json == {"incoming": []}
    provider.clock.now += 30
    r = await in_thread(phone.post, "/v1/incoming/claim", {"limit": 10, "lease": 60})
    assert [(i["id"], i["attempts"]) for i in r.json["incoming"]] == [(item["id"], 1)]
    r = await in_thread(phone.post, "/v1/incoming/delete", {"ids": [item["id"], "gone"]})
    assert (r.status, r.json) == (200, {"deleted": 1})
    r = await in_thread(phone.get, "/v1/incoming/get?id=" + item["id"])
    assert r.status == 404
    for body, message_part in (({"limit": 0, "lease": 60}, "limit"),
                               ({"limit": 1, "lease": 99999}, "lease"),
                               ({"limit": 1}, "lease"),
                               ({"limit": 1, "lease": 1, "reclaim": 1}, "reclaim")):
        r = await in_thread(phone.post, "/v1/incoming/claim", body)
        assert r.status == 400 and r.json["message"].startswith(message_part), r
    r = await in_thread(provider.client().post, "/v1/incoming/claim", {"limit": 1, "lease": 1})
    assert r.status == 401
