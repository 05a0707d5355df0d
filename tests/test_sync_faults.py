"""Sync under attack and failure: a provider that tampers, replays, expires tokens.

The provider here is a real process on SQLite; the tests reach into its database the
way a compromised provider could.  A refused batch must leave the device untouched,
say why in ``leapmail status``, and the device must recover by itself once the provider
serves the truth again.
"""

import json
import os
import sqlite3
import subprocess
import time

import pytest

from leapmail_daemon import BIN
from provider_process import ProviderProcess
from test_sync import ADDRESS, by_subject, connect, first_device, note, other_device
from polling import wait_for



@pytest.fixture
def provider(tmp_path):
    process = ProviderProcess(str(tmp_path / "provider"))
    process.code = process.adduser(ADDRESS)
    process.start()
    yield process
    process.stop()


def status(daemon):
    try:
        with open(os.path.join(daemon.home, "sync-status.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}




def provider_db(provider):
    conn = sqlite3.connect(os.path.join(provider.home, "provider.db"), timeout=30)
    conn.isolation_level = None
    return conn


def feed_head(provider):
    conn = provider_db(provider)
    try:
        return conn.execute("SELECT seq FROM users WHERE address = ?", (ADDRESS,)).fetchone()[0]
    finally:
        conn.close()


def pushed(daemon):
    """Until the device reports, in a status written after now, nothing left to push."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def done():
        s = status(daemon)
        return s.get("written", "") > now and s.get("pending") == 0 and s.get("error") is None

    wait_for(done, "the device to push everything")


def republish(provider, wire_id, rev, data):
    """Serve ``(rev, data)`` for a document as its newest change (as a provider could)."""
    conn = provider_db(provider)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE users SET seq = seq + 1 WHERE address = ?", (ADDRESS,))
        (seq,) = conn.execute("SELECT seq FROM users WHERE address = ?", (ADDRESS,)).fetchone()
        conn.execute("UPDATE docs SET rev = ?, data = ?, seq = ? WHERE id = ?",
                     (rev, data, seq, wire_id))
        conn.execute("COMMIT")
    finally:
        conn.close()


def newest_doc(provider):
    conn = provider_db(provider)
    try:
        return conn.execute("SELECT id, rev, data FROM docs ORDER BY seq DESC LIMIT 1").fetchone()
    finally:
        conn.close()


def leapmail_status(daemon):
    result = subprocess.run([os.path.join(BIN, "leapmail"), "--home", daemon.home, "status"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_tampered_document_is_refused_with_its_batch_then_sync_recovers(provider, tmp_path):
    one = first_device(provider, str(tmp_path / "one")).start()
    two = other_device(provider, str(tmp_path / "two"))
    try:
        client = connect(one)
        client.create("Victims")
        client.append("INBOX", None, None, note("victim"))
        client.logout()
        pushed(one)
        wire_id, rev, data = newest_doc(provider)
        tampered = bytearray(data)
        tampered[len(tampered) // 2] ^= 0x20
        republish(provider, wire_id, rev, bytes(tampered))

        two.start()
        wait_for(lambda: "does not authenticate" in (status(two).get("error") or ""),
                 "device two to refuse the tampered document")
        # Nothing of the refused batch was applied: not the message, not the mailbox
        # that came in the same batch.
        assert by_subject(two, "INBOX") == {}
        assert "Victims" not in str(connect(two).list()[1])
        shown = leapmail_status(two)
        assert "error:" in shown and "does not authenticate" in shown
        assert f"daemon:    running (pid {two.pid})\n" in shown

        republish(provider, wire_id, rev, data)
        wait_for(lambda: by_subject(two, "INBOX") == {"victim": []},
                 "device two to recover once the provider serves the real document")
        wait_for(lambda: status(two).get("error") is None and status(two).get("state") == "ok",
                 "the error to clear")
        assert "error:" not in leapmail_status(two)
        assert "sync works again" in two.log_text()
        one.stop()
        shown = leapmail_status(one)
        assert "daemon:    not running (sync waits for it)\n" in shown
        assert "pending:   0 local changes to push\n" in shown
    finally:
        one.stop()
        two.stop()


def test_a_replayed_old_revision_is_refused_then_sync_recovers(provider, tmp_path):
    one = first_device(provider, str(tmp_path / "one")).start()
    two = other_device(provider, str(tmp_path / "two")).start()
    try:
        client = connect(one)
        client.append("INBOX", None, None, note("flagged"))
        pushed(one)
        old = newest_doc(provider)  # the message's flags document, revision 1
        client.select("INBOX")
        client.store("1", "+FLAGS", "\\Flagged")
        new = wait_for(lambda: (lambda d: d if d[1] == 2 else None)(newest_doc(provider)),
                       "the flag change to reach the provider")
        assert new[0] == old[0]
        wait_for(lambda: by_subject(two, "INBOX") == {"flagged": ["\\Flagged"]},
                 "device two to see the flag")

        republish(provider, old[0], old[1], old[2])
        client.create("AfterReplay")  # a change that wakes device two's long poll
        client.logout()
        wait_for(lambda: "replay" in (status(two).get("error") or ""),
                 "device two to refuse the replayed revision")
        assert by_subject(two, "INBOX") == {"flagged": ["\\Flagged"]}
        assert "AfterReplay" not in str(connect(two).list()[1])

        republish(provider, new[0], new[1], new[2])
        wait_for(lambda: "AfterReplay" in str(connect(two).list()[1]),
                 "device two to go on once the provider stops replaying")
        wait_for(lambda: status(two).get("error") is None, "the error to clear")
        assert by_subject(two, "INBOX") == {"flagged": ["\\Flagged"]}
    finally:
        one.stop()
        two.stop()


def test_an_expired_token_is_replaced_by_logging_in_again(tmp_path):
    provider = ProviderProcess(str(tmp_path / "provider"), extra_args=["--token-lifetime", "2"])
    provider.code = provider.adduser(ADDRESS)
    provider.start()
    one = first_device(provider, str(tmp_path / "one")).start()
    try:
        start = time.monotonic()
        wait_for(lambda: "logged in to the provider again" in one.log_text(),
                 "the device to log in again after its token expired")
        assert time.monotonic() - start < 30
        client = connect(one)
        client.append("INBOX", None, None, note("after-expiry"))
        client.logout()
        head = feed_head(provider)
        wait_for(lambda: feed_head(provider) > head, "the push with the new token")
        assert status(one).get("error") in (None, )
    finally:
        one.stop()
        provider.stop()


def test_a_wrong_passphrase_on_a_second_device_changes_nothing(provider, tmp_path):
    one = first_device(provider, str(tmp_path / "one")).start()
    try:
        conn = provider_db(provider)
        devices_before = conn.execute("SELECT count(*) FROM devices").fetchone()[0]
        conn.close()
        home = str(tmp_path / "intruder")
        result = subprocess.run(
            [os.path.join(BIN, "leapmail"), "init", "--home", home, "--address", ADDRESS,
             "--provider", provider.url, "--provider-ca", provider.ca_path],
            env=dict(os.environ, LEAPMAIL_PASSPHRASE="not the passphrase"),
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert result.stderr == (
            f"leapmail: the provider refused the login for {ADDRESS}: wrong passphrase, "
            "or no such account there (nothing was changed)\n")
        assert not os.path.exists(os.path.join(home, "secrets.json"))
        assert not os.path.exists(os.path.join(home, "store.db"))
        conn = provider_db(provider)
        assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == devices_before
        conn.close()
    finally:
        one.stop()


def test_a_passphrase_change_reaches_the_provider(provider, tmp_path):
    one = first_device(provider, str(tmp_path / "one")).start()
    try:
        client = connect(one)
        client.append("INBOX", None, None, note("before"))
        client.logout()
        pushed(one)

        def passwd(old, new):
            return subprocess.run(
                [os.path.join(BIN, "leapmail"), "--home", one.home, "passwd"],
                env=dict(os.environ, LEAPMAIL_PASSPHRASE=old, LEAPMAIL_NEW_PASSPHRASE=new),
                capture_output=True, text=True, timeout=120)

        conn = provider_db(provider)
        before = conn.execute("SELECT verifier, bundle FROM users").fetchone()
        conn.close()
        wrong = passwd("not it", "new passphrase 2")
        assert wrong.returncode == 1 and "wrong passphrase" in wrong.stderr
        conn = provider_db(provider)
        assert conn.execute("SELECT verifier, bundle FROM users").fetchone() == before
        conn.close()

        done = passwd(one.passphrase, "new passphrase 2")
        assert done.returncode == 0, done.stderr
        assert "and at its provider" in done.stdout
        one.stop()
        one.passphrase = "new passphrase 2"
        one.start()

        def join(name, passphrase):
            return subprocess.run(
                [os.path.join(BIN, "leapmail"), "init", "--home", str(tmp_path / name),
                 "--address", ADDRESS, "--provider", provider.url,
                 "--provider-ca", provider.ca_path],
                env=dict(os.environ, LEAPMAIL_PASSPHRASE=passphrase),
                capture_output=True, text=True, timeout=120)

        old = join("old", "correct horse battery staple")
        assert old.returncode == 1 and "wrong passphrase" in old.stderr
        # The failed login above is throttled: wait out the provider's delay.
        wait_for(lambda: join("new", "new passphrase 2").returncode == 0,
                 "a device with the new passphrase to join", deadline=30)
        two = other_device(provider, str(tmp_path / "new"))
        two.passphrase = "new passphrase 2"
        two.start()
        try:
            wait_for(lambda: by_subject(two, "INBOX") == {"before": []},
                     "the new device to sync")
        finally:
            two.stop()
    finally:
        one.stop()
