"""The device's provider client against a provider that answers badly.

A real HTTPS server on loopback (twisted.web, a self-signed certificate the client
pins) plays a broken or hostile provider: cut-off answers, junk instead of JSON,
answers too large, wrong certificates.  Every case must end in a ProviderError with a
message a user can act on, and a pull that fails must change nothing in the store.
"""

import json
import os

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web import resource, server

from leapmail.crypto.wire import WireKeys
from leapmail.sync import remote
from leapmail.sync.engine import Replicator, SyncRefused
from leapmail.sync.remote import ProviderClient, ProviderError, TokenExpired, Unreachable
from leapmail.tls import context_factory, ensure_certificate


class Scripted(resource.Resource):
    """Answers every request with ``self.answer(request)``."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.answer = None

    def render(self, request):
        return self.answer(request)


@pytest.fixture
def bad_provider(tmp_path):
    home = str(tmp_path / "provider")
    os.makedirs(home)
    script = Scripted()
    port = reactor.listenSSL(0, server.Site(script), context_factory(home),
                             interface="127.0.0.1")
    with open(ensure_certificate(home)[0], "rb") as f:
        pem = f.read()
    client = ProviderClient(f"https://127.0.0.1:{port.getHost().port}", pem, token="t",
                            timeout=5)
    yield script, client
    pytest_twisted.blockon(client.close())
    pytest_twisted.blockon(port.stopListening())


def answer(status, body, headers=()):
    def respond(request):
        request.setResponseCode(status)
        for name, value in headers:
            request.setHeader(name, value)
        return body
    return respond


async def failure_of(d):
    with pytest.raises(ProviderError) as info:
        await d
    return info.value


@pytest_twisted.ensureDeferred
async def test_junk_instead_of_json(bad_provider):
    script, client = bad_provider
    script.answer = answer(200, b"<html>not json</html>")
    error = await failure_of(client.changes(0))
    assert str(error) == ("the provider answered GET /v1/changes with HTTP 200 and no valid "
                          "JSON")


@pytest_twisted.ensureDeferred
async def test_json_of_the_wrong_shape(bad_provider):
    script, client = bad_provider
    script.answer = answer(200, b'{"changes": "many", "seq": 3}')
    error = await failure_of(client.changes(0))
    assert str(error) == "the provider's answer lacks a valid 'changes'"
    script.answer = answer(200, b'{"changes": [{"id": "x", "rev": 1, "data": "!!"}], "seq": 1}')
    error = await failure_of(client.changes(0))
    assert str(error) == "the provider sent malformed base64"
    script.answer = answer(200, b'[1, 2]')
    error = await failure_of(client.push([("a", 0, b"x")]))
    assert "no valid JSON" in str(error)
    script.answer = answer(200, b'{"seq": 4, "revs": [1, 2]}')
    error = await failure_of(client.push([("a", 0, b"x")]))
    assert str(error) == "the provider's push answer is malformed"


@pytest_twisted.ensureDeferred
async def test_an_answer_cut_off(bad_provider):
    script, client = bad_provider

    def cut(request):
        request.setHeader(b"content-length", b"1000")
        request.write(b'{"changes": [')
        # Once what was written has gone out: the client has the head and part of
        # the body when the connection ends.
        reactor.callLater(0.05, request.channel.transport.abortConnection)
        return server.NOT_DONE_YET

    script.answer = cut
    error = await failure_of(client.changes(0))
    assert isinstance(error, Unreachable)
    assert str(error).startswith("the provider's answer was cut off")


@pytest_twisted.ensureDeferred
async def test_an_answer_too_large(bad_provider, monkeypatch):
    script, client = bad_provider
    monkeypatch.setattr(remote, "MAX_RESPONSE", 1000)
    script.answer = answer(200, json.dumps({"changes": [], "pad": "x" * 5000}).encode())
    error = await failure_of(client.changes(0))
    assert str(error) == "the provider's answer is larger than 1000 bytes"


@pytest_twisted.ensureDeferred
async def test_refusals_say_what_the_provider_said(bad_provider):
    script, client = bad_provider
    script.answer = answer(401, b'{"error": "token_expired", "message": "token expired"}')
    error = await failure_of(client.changes(0))
    assert isinstance(error, TokenExpired)
    assert str(error) == "the provider refused: token expired"
    script.answer = answer(503, b'{"error": "unavailable", "message": "database down"}')
    error = await failure_of(client.changes(0))
    assert (error.status, str(error)) == (
        503, "the provider refused: database down (HTTP 503)")
    script.answer = answer(409, b'{"error": "conflict", "conflicts": 7}')
    error = await failure_of(client.push([("a", 0, b"x")]))
    assert str(error) == "the provider's conflict answer is malformed"


@pytest_twisted.ensureDeferred
async def test_no_answer_in_time(bad_provider):
    script, client = bad_provider
    client._timeout = 0.3
    script.answer = lambda request: server.NOT_DONE_YET
    error = await failure_of(client.changes(0))
    assert isinstance(error, Unreachable)
    assert str(error) == "the provider did not answer within 0.3 s"


@pytest_twisted.ensureDeferred
async def test_another_certificate_is_not_trusted(bad_provider, tmp_path):
    script, client = bad_provider
    script.answer = answer(200, b'{"changes": [], "seq": 0}')
    other = str(tmp_path / "other")
    os.makedirs(other)
    with open(ensure_certificate(other)[0], "rb") as f:
        stranger = ProviderClient(client.url, f.read(), token="t", timeout=5)
    try:
        error = await failure_of(stranger.changes(0))
    finally:
        await stranger.close()
    assert isinstance(error, Unreachable)
    assert "cannot reach the provider at" in str(error)
    assert await client.changes(0) == ([], 0, False)


@pytest_twisted.ensureDeferred
async def test_a_failed_pull_changes_nothing(bad_provider, account):
    script, client = bad_provider
    keys = WireKeys(os.urandom(32))
    store = account.store
    replicator = Replicator(store, keys, client)
    good = keys.seal("mailbox", "mbx-x", 1, b"\xa2dnamecNewdrole\xf6")
    import base64

    items = [{"id": keys.wire_id("mailbox", "mbx-x"), "rev": 1, "seq": 1,
              "data": base64.b64encode(good).decode()},
             {"id": keys.wire_id("flags", "f"), "rev": 1, "seq": 2,
              "data": base64.b64encode(good).decode()}]
    script.answer = answer(200, json.dumps({"changes": items, "seq": 2}).encode())
    before = await store.generation()
    with pytest.raises(SyncRefused, match="header does not authenticate"):
        await replicator.pull()
    assert await store.generation() == before
    assert "New" not in [m.name for m in await account.mailboxes()]
    script.answer = answer(200, json.dumps({"changes": items[:1], "seq": 1}).encode())
    await replicator.pull()
    assert "New" in [m.name for m in await account.mailboxes()]
