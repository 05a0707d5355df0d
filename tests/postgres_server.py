"""A throw-away PostgreSQL cluster on loopback, for the provider's PostgreSQL storage.

The session-scoped fixture :func:`postgres_server` runs ``initdb`` into a fresh
directory under the system temp dir, starts the server with ``pg_ctl`` on a free
loopback port with its unix socket in that directory, and yields a
:class:`PostgresServer`.  Each test asks it for a database of its own
(:meth:`PostgresServer.create_database`), so tests never see each other's rows.

Authentication is real: the socket trusts the cluster's own superuser (which is how
this module creates databases), but TCP asks for a password (SCRAM), so the URLs the
tests hand to the provider carry one, as a deployment's would.

``initdb`` refuses to run as root.  When we are root (CI is) the cluster belongs to the
``postgres`` system user the Debian package creates, and every server command runs
through ``runuser -u postgres --``; the directory is chowned to that user.

Nothing here skips: if PostgreSQL cannot start, the fixture fails with the server's
own words.
"""

import glob
import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile

import pytest

#: The role the tests' URLs log in as, with :attr:`PostgresServer.password`.
ROLE = "leapmail"


def postgres_bin_dir():
    """The newest ``/usr/lib/postgresql/VERSION/bin`` that has ``initdb``."""
    found = []
    for path in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        version = os.path.basename(os.path.dirname(os.path.dirname(path)))
        try:
            found.append((int(version.split(".")[0]), os.path.dirname(path)))
        except ValueError:
            continue
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); "
            "`make test` installs Debian's postgresql package"
        )
    return max(found)[1]


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One running cluster.  ``url`` is a superuser-free URL for database ``leapmail``."""

    def __init__(self):
        self.bin_dir = postgres_bin_dir()
        self.password = secrets.token_urlsafe(16)
        self.dir = None
        self.port = None
        self._as_user = []
        self._uid = self._gid = None
        self._names = itertools.count(1)

    # -- running commands as the cluster's owner ----------------------------------

    def _run(self, tool, *args, check=True, timeout=120, input=None):
        argv = [*self._as_user, os.path.join(self.bin_dir, tool), *args]
        result = subprocess.run(argv, capture_output=True, timeout=timeout, input=input,
                                stdin=None if input is not None else subprocess.DEVNULL,
                                cwd=self.dir)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{tool} failed ({result.returncode}):\n{result.stdout.decode()}"
                f"{result.stderr.decode()}{self._log_tail()}"
            )
        return result

    def _log_tail(self):
        try:
            with open(os.path.join(self.dir, "server.log"), "rb") as f:
                return "\nserver log:\n" + f.read()[-4000:].decode("utf-8", "replace")
        except (OSError, TypeError):
            return ""

    def psql(self, sql, database="postgres"):
        """Run ``sql`` as the cluster's superuser over the unix socket; return stdout."""
        result = self._run("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At",
                           "-h", self.dir, "-p", str(self.port), "-d", database,
                           "-f", "-", input=sql.encode())
        return result.stdout.decode()

    # -- life cycle ---------------------------------------------------------------

    def start(self):
        self.dir = tempfile.mkdtemp(prefix="leapmail-pg-")
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root, and there is no 'postgres' user to own the test "
                    "cluster (Debian's postgresql package creates it)"
                ) from None
            self._uid, self._gid = owner.pw_uid, owner.pw_gid
            os.chown(self.dir, self._uid, self._gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        data = os.path.join(self.dir, "data")
        self._run("initdb", "-D", data, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
        # The cluster's superuser (the OS user) over the socket, for creating databases;
        # ROLE with its password over TCP, as the provider would log in.
        with open(os.path.join(data, "pg_hba.conf"), "w") as f:
            f.write("local all all trust\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n")
        last_error = None
        for _attempt in range(5):
            self.port = _free_port()
            options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                       "-c max_connections=200")
            result = self._run("pg_ctl", "-D", data, "-l", os.path.join(self.dir, "server.log"),
                               "-o", options, "-w", "-t", "60", "start", check=False)
            if result.returncode == 0:
                break
            last_error = (result.stdout + result.stderr).decode() + self._log_tail()
            if "already in use" not in last_error:
                raise RuntimeError(f"PostgreSQL did not start:\n{last_error}")
        else:
            raise RuntimeError(f"PostgreSQL did not start:\n{last_error}")
        self.psql(f"CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{self.password}';")
        return self

    def stop(self):
        if self.dir is None:
            return
        data = os.path.join(self.dir, "data")
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            self._run("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    # -- databases ----------------------------------------------------------------

    def url(self, database, password=True):
        """A ``postgresql://`` URL for ``database`` over loopback TCP as ROLE."""
        secret = f":{self.password}" if password else ""
        return f"postgresql://{ROLE}{secret}@127.0.0.1:{self.port}/{database}"

    def create_database(self):
        """A new, empty database owned by ROLE; returns its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.psql(f"CREATE DATABASE {name} OWNER {ROLE};")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL cluster (a :class:`PostgresServer`), started on first use."""
    server = PostgresServer()
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    try:
        yield server
    finally:
        server.stop()
