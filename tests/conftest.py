import os
import subprocess
import sys

import pytest
import pytest_twisted

from leapmail.store import Store

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def key():
    return os.urandom(32)


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "store.db")


@pytest_twisted.async_yield_fixture
async def store(db_path, key):
    s = Store.open(db_path, key, create=True)
    yield s
    await s.close()


def run_helper(name, *args, check=True, env=None, **kw):
    """Run tests/helpers/NAME.py in a fresh interpreter (a real separate process)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "helpers", name + ".py"), *map(str, args)],
        capture_output=True, env=full_env, timeout=600, **kw,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"helper {name} failed ({result.returncode}):\n{result.stdout.decode()}\n"
            f"{result.stderr.decode()}"
        )
    return result


@pytest_twisted.async_yield_fixture
async def account(db_path, key):
    from leapmail.home import COMPONENTS
    from leapmail.mail.account import Account

    # An account's store as leapmail.home makes it: the mail core and sync.
    s = Store.open(db_path, key, COMPONENTS, create=True)
    acct = Account(s, os.urandom(32))
    await acct.setup()
    yield acct
    acct.close()
    await s.close()


# The in-process IMAP server fixture, for every test module (tests/imap_support.py).
from imap_support import imap_server  # noqa: E402,F401
# A throw-away PostgreSQL cluster for the provider's storage (tests/postgres_server.py).
from postgres_server import postgres_server  # noqa: E402,F401
