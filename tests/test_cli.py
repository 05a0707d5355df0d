"""The leapmail command and the twistd plugin, as real processes."""

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

BIN = os.path.dirname(sys.executable)
PASS = "a passphrase for tests"


def leapmail(*args, passphrase=PASS, extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAPMAIL_")}
    if passphrase is not None:
        env["LEAPMAIL_PASSPHRASE"] = passphrase
    env.update(extra_env or {})
    return subprocess.run(
        [os.path.join(BIN, "leapmail"), *args], capture_output=True, env=env,
        stdin=subprocess.DEVNULL, timeout=120,
    )


def assert_clean_failure(result, expected_stderr):
    assert result.returncode == 1, result
    assert b"Traceback" not in result.stderr
    assert result.stderr.decode() == expected_stderr


@pytest.fixture
def home(tmp_path):
    path = str(tmp_path / "acct")
    result = leapmail("init", "--home", path, "--address", "me@example.org")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == f"created the account me@example.org in {path}\n"
    return path


def test_init_creates_a_private_home(home):
    assert os.stat(home).st_mode & 0o777 == 0o700
    assert sorted(os.listdir(home)) == ["config.json", "secrets.json", "store.db", "store.db.lock"]
    for name in os.listdir(home):
        assert os.stat(os.path.join(home, name)).st_mode & 0o777 == 0o600, name
    for name in os.listdir(home):
        with open(os.path.join(home, name), "rb") as f:
            assert PASS.encode() not in f.read()


def test_init_refuses_an_existing_account(home):
    before = {n: open(os.path.join(home, n), "rb").read() for n in ("secrets.json", "store.db")}
    result = leapmail("--home", home, "init", "--address", "other@example.org")
    assert_clean_failure(result, f"leapmail: {home} already holds an account; nothing was changed\n")
    assert before == {n: open(os.path.join(home, n), "rb").read() for n in before}


def test_check_ok_and_wrong_passphrase(home):
    result = leapmail("--home", home, "check")
    assert result.returncode == 0
    assert result.stdout.decode() == f"{home}/store.db: ok\n"
    result = leapmail("check", "--home", home, passphrase="not it")
    assert_clean_failure(result, f"leapmail: wrong passphrase for {home}/secrets.json\n")


def test_no_passphrase_without_a_terminal(home):
    result = leapmail("--home", home, "check", passphrase=None)
    assert_clean_failure(
        result, "leapmail: no passphrase: set LEAPMAIL_PASSPHRASE or run from a terminal\n"
    )


def test_missing_account(tmp_path):
    path = str(tmp_path / "nothing")
    result = leapmail("--home", path, "check")
    assert_clean_failure(
        result, f"leapmail: no account in {path}: create one with 'leapmail init --home {path}'\n"
    )


def test_passwd(home):
    result = leapmail("--home", home, "passwd", extra_env={"LEAPMAIL_NEW_PASSPHRASE": "new words"})
    assert result.returncode == 0, result.stderr
    assert leapmail("--home", home, "check", passphrase="new words").returncode == 0
    result = leapmail("--home", home, "check")
    assert_clean_failure(result, f"leapmail: wrong passphrase for {home}/secrets.json\n")


def test_check_reports_a_damaged_page(home):
    # Grow the store so that a page in the middle exists, then damage it.
    script = (
        "import sys; from leapmail.home import Home; from leapmail.store.database import connect;"
        "h = Home(sys.argv[1]); b = h.unlock(sys.argv[2]); db = h.open_database(b);"
        "c = db.connect(); c.execute('BEGIN');"
        "[c.execute('INSERT INTO documents (id, kind, rev, gen, content) VALUES (?, ?, 1, ?, ?)',"
        " (f'd{i}', 'n', 10**6 + i, bytes(300))) for i in range(1000)];"
        "c.execute('COMMIT'); c.execute('PRAGMA wal_checkpoint(TRUNCATE)'); c.close(); db.close()"
    )
    subprocess.run([sys.executable, "-c", script, home, PASS], check=True)
    path = os.path.join(home, "store.db")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek((size // 4096 // 2) * 4096 + 500)
        f.write(b"\xff" * 8)
    result = leapmail("--home", home, "check")
    assert result.returncode == 1
    err = result.stderr.decode()
    assert f"{path}: HMAC verification failed for page {size // 4096 // 2 + 1}\n" in err
    assert err.endswith("restore it from a backup\n")
    assert "Traceback" not in err


def test_twistd_lists_the_plugin():
    result = subprocess.run([os.path.join(BIN, "twistd"), "--help"], capture_output=True)
    assert result.returncode == 0
    assert b"leapmail " in result.stdout


def twistd(home, passphrase=PASS):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAPMAIL_")}
    env["LEAPMAIL_PASSPHRASE"] = passphrase
    # Port 0: tests must not collide with each other or with a running 'make run'.
    return subprocess.Popen(
        [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "--logfile=-", "leapmail", "--home", home,
         "--imap-port", "0", "--smtp-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
    )


def test_daemon_wrong_passphrase_exits_cleanly(home):
    daemon = twistd(home, passphrase="wrong")
    out, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 1
    assert b"Traceback" not in out + err
    assert err.decode() == f"leapmail: wrong passphrase for {home}/secrets.json\n"


def test_daemon_holds_the_store_and_releases_it_on_stop(home):
    daemon = twistd(home)
    try:
        for line in daemon.stdout:
            if b"store " in line and b" open" in line:
                break
        else:
            pytest.fail(daemon.stderr.read().decode())
        result = leapmail("--home", home, "check")
        assert_clean_failure(
            result,
            f"leapmail: {home}/store.db is in use by another running leapmail (pid {daemon.pid}). "
            "Stop that process first; only one daemon may open an account at a time.\n",
        )
        second = twistd(home)
        out, err = second.communicate(timeout=60)
        assert second.returncode == 1
        assert b"Traceback" not in out + err
        assert b"is in use by another running leapmail" in err
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=60)
    # twistd shuts down cleanly, then re-raises the signal so its exit status tells why.
    assert daemon.returncode == -signal.SIGTERM
    assert b"Server Shut Down." in out
    assert b"Traceback" not in out + err
    assert leapmail("--home", home, "check").returncode == 0
    # A clean stop folds the WAL back into the file.
    assert not os.path.exists(os.path.join(home, "store.db-wal"))


def test_init_will_not_write_beside_a_store_without_secrets(tmp_path):
    path = tmp_path / "acct"
    path.mkdir()
    (path / "store.db").write_bytes(b"\x01" * 8192)
    result = leapmail("init", "--home", str(path), "--address", "me@example.org")
    assert_clean_failure(
        result,
        f"leapmail: {path}/store.db exists but {path}/secrets.json does not: without its "
        "secrets the store cannot be opened, and init will not replace them. Restore "
        "secrets.json from a backup, or choose an empty directory.\n",
    )
    assert sorted(os.listdir(path)) == ["store.db"]


def test_detached_daemon_names_itself_in_the_lock(home, tmp_path):
    """Without -n, twistd forks after makeService: the lock must name the daemon."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAPMAIL_")}
    env["LEAPMAIL_PASSPHRASE"] = PASS
    pidfile, logfile = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    subprocess.run(
        [os.path.join(BIN, "twistd"), f"--pidfile={pidfile}", f"--logfile={logfile}",
         "leapmail", "--home", home, "--imap-port", "0", "--smtp-port", "0"],
        check=True, env=env, stdin=subprocess.DEVNULL, timeout=60,
    )
    pid = int(pidfile.read_text())
    try:
        deadline = time.monotonic() + 60
        while b"store " not in (logfile.read_bytes() if logfile.exists() else b""):
            assert time.monotonic() < deadline, "daemon never opened its store"
            time.sleep(0.05)  # polling the log for a condition, not a guess at timing
        result = leapmail("--home", home, "check")
        assert result.returncode == 1
        assert f"in use by another running leapmail (pid {pid})" in result.stderr.decode()
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while os.path.exists(pidfile):
            assert time.monotonic() < deadline, "daemon did not stop"
            time.sleep(0.05)


def credentials(home, **kw):
    result = leapmail("--home", home, "credentials", **kw)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    match = re.fullmatch(r"username: (\S+)\npassword: (\S+)\n", result.stdout.decode())
    assert match, result.stdout
    return match.group(1), match.group(2)


def test_credentials_prints_the_address_and_a_strong_password(home):
    username, password = credentials(home)
    assert username == "me@example.org"
    # secrets.token_urlsafe(24): 24 random bytes, 32 URL-safe characters.
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", password)
    assert len(base64.urlsafe_b64decode(password)) * 8 >= 128
    # The same password every time: it lives in the bundle, it is not made up per call.
    assert credentials(home) == (username, password)
    result = leapmail("credentials", "--home", home)
    assert result.stdout.decode() == f"username: {username}\npassword: {password}\n"


def test_the_password_generator_draws_at_least_128_random_bits():
    from leapmail.crypto import SecretsBundle, new_client_password
    from leapmail.crypto.bundle import CLIENT_PASSWORD_BYTES

    assert CLIENT_PASSWORD_BYTES * 8 >= 128
    raw = [base64.urlsafe_b64decode(new_client_password()) for _ in range(2000)]
    assert {len(r) for r in raw} == {CLIENT_PASSWORD_BYTES}
    assert len(set(raw)) == len(raw)
    # Every one of the bits varies, about half the time each: no byte is fixed or biased.
    # (With 2000 samples, the odds that any fair bit strays outside 0.4..0.6 are < 1e-16.)
    for bit in range(CLIENT_PASSWORD_BYTES * 8):
        ones = sum((r[bit // 8] >> (bit % 8)) & 1 for r in raw)
        assert 0.4 < ones / len(raw) < 0.6, bit
    assert SecretsBundle.generate().client_password != SecretsBundle.generate().client_password


def test_credentials_stay_sealed(home):
    _, password = credentials(home)
    for name in os.listdir(home):
        with open(os.path.join(home, name), "rb") as f:
            assert password.encode() not in f.read(), name


def test_every_account_gets_its_own_password(tmp_path, home):
    other = str(tmp_path / "other")
    assert leapmail("init", "--home", other, "--address", "me@example.org").returncode == 0
    assert credentials(home)[1] != credentials(other)[1]


def test_credentials_errors_are_one_line(home, tmp_path):
    result = leapmail("--home", home, "credentials", passphrase="not it")
    assert_clean_failure(result, f"leapmail: wrong passphrase for {home}/secrets.json\n")
    assert result.stdout == b""
    missing = str(tmp_path / "nothing")
    result = leapmail("credentials", "--home", missing)
    assert_clean_failure(
        result,
        f"leapmail: no account in {missing}: create one with 'leapmail init --home {missing}'\n",
    )
    os.unlink(os.path.join(home, "config.json"))
    result = leapmail("credentials", "--home", home)
    assert_clean_failure(
        result,
        f"leapmail: {home}/config.json does not name the account's address; "
        'write {"address": "you@example.org"} into it\n',
    )
    assert result.stdout == b""


def test_credentials_work_while_the_daemon_runs(home):
    before = credentials(home)
    daemon = twistd(home)
    try:
        for line in daemon.stdout:
            if b"store " in line and b" open" in line:
                break
        else:
            pytest.fail(daemon.stderr.read().decode())
        assert credentials(home) == before
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=60)


def seal_as_before_client_passwords(home_path, passphrase):
    """Rewrite secrets.json the way releases before client passwords sealed it."""
    script = (
        "import sys; from leapmail.crypto import SecretsBundle, seal, unseal;"
        "from leapmail.fsutil import atomic_write;"
        "p = sys.argv[1] + '/secrets.json'; b = unseal(open(p, 'rb').read(), sys.argv[2]);"
        "old = SecretsBundle(storage_key=b.storage_key, id_key=b.id_key, keypairs=b.keypairs);"
        "atomic_write(p, seal(old, sys.argv[2]))"
    )
    subprocess.run([sys.executable, "-c", script, home_path, passphrase], check=True)


def test_a_bundle_from_before_client_passwords_gets_one(home):
    seal_as_before_client_passwords(home, PASS)
    from leapmail.crypto import unseal

    with open(os.path.join(home, "secrets.json"), "rb") as f:
        old = f.read()
    assert unseal(old, PASS).client_password is None
    # The format version did not change: older releases read the new field as unknown.
    assert json.loads(old)["version"] == 1

    username, password = credentials(home)
    assert username == "me@example.org"
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", password)
    with open(os.path.join(home, "secrets.json"), "rb") as f:
        upgraded = f.read()
    assert upgraded != old
    assert unseal(upgraded, PASS).client_password == password
    assert os.stat(os.path.join(home, "secrets.json")).st_mode & 0o777 == 0o600
    # Upgraded once, then stable; and the store still opens with the same keys.
    assert credentials(home) == (username, password)
    assert leapmail("--home", home, "check").returncode == 0
    assert [n for n in os.listdir(home) if ".tmp" in n] == []


def test_a_wrong_passphrase_does_not_upgrade_an_old_bundle(home):
    seal_as_before_client_passwords(home, PASS)
    with open(os.path.join(home, "secrets.json"), "rb") as f:
        old = f.read()
    result = leapmail("--home", home, "credentials", passphrase="not it")
    assert result.returncode == 1
    with open(os.path.join(home, "secrets.json"), "rb") as f:
        assert f.read() == old
