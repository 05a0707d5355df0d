"""Sync as a user meets it: a new device catching up, and a provider under many devices.

1. **Initial sync.**  A real provider (``twistd -n leapmail-provider``, on SQLite, or
   PostgreSQL with --initial-backend postgresql) and
   two real daemons.  Device one enrolls, and its account is filled offline with
   --messages (10,000) seeded messages of realistic sizes (most 2-30 KB, about 1% with
   an attachment of 100 KB-2 MB; some 130 MB in all) in INBOX, Archive and Sent,
   through ``Account.append_many`` before its daemon starts (APPEND over IMAP would
   take minutes); then its daemon starts and pushes everything (timed until the
   provider holds every document).  Then a fresh second device joins (``leapmail
   init --provider``) and starts: timed until IMAP ``STATUS`` shows every message on
   it; then a SEARCH TEXT (which waits for the full-text index, built once the device
   has caught up), and every ``BODY[]`` is read over IMAP and checked against what was
   loaded.
   Printed: msgs/s, MB/s (message bytes), the wall time, the peak RSS (``VmHWM``) of
   both daemons and of the provider, and how long the IMAP ``STATUS`` polls took
   while the second device was syncing (a store job that holds the writer shows up
   there).  Target: a new device has 10,000 messages readable in under a minute
   (from ``leapmail init`` to the last message), PASS or MISS.

2. **Provider throughput.**  --devices (20) in-process devices (``ProviderClient`` and
   ``WireKeys``, each its own account) against one provider process, once on SQLite
   and once on PostgreSQL (a throw-away cluster, run with ``fsync`` and synchronous
   commit on, as SQLite runs with ``synchronous=FULL``): every device pushes
   --docs-per-device sealed documents (half of them flags-sized, half 2-30 KB) in
   batches as the daemon's pusher makes them, all devices at once; then every device
   pulls its whole feed, all at once.  Printed: docs/s and MB/s (sealed bytes) pushed
   and pulled for each backend, the provider's CPU seconds and peak RSS, and the ratio
   PostgreSQL/SQLite.  Nothing here is a peer to compare with, so no other target.

Usage: ``.venv/bin/python bench/bench_sync.py [--quick] [--messages N] [--devices N]
[--docs-per-device N] [--only initial|providers] [--backend sqlite|postgresql]
[--initial-backend sqlite|postgresql] [--workdir DIR] [--keep]
[--profile DIR [--profile-format raw]]``.  --quick: 1,000 messages, 20 devices of
300 documents.  --profile runs ``py-spy record`` on each daemon and the provider during
the push and the pull, and on the provider of each throughput run, and writes their
flame graphs (SVG; raw: collapsed stacks) into DIR.  The exit status is non-zero only when something could not be run or answered
wrongly (a MISS is not a failure).
"""

import argparse
import base64
import hashlib
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import traceback
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

import imap_workload as workload  # noqa: E402
from dovecot_server import reset_peak, vm_hwm  # noqa: E402
from leapmail_daemon import BIN, LeapmailDaemon  # noqa: E402
from provider_process import ProviderProcess  # noqa: E402

ADDRESS = "bench@example.org"
PASSPHRASE = "leapmail-bench-sync"
MB = 1e6
MIB = 1024 * 1024
TARGET_SECONDS = 60.0
#: Where the messages go, and what share of them.
MAILBOXES = (("INBOX", 0.7), ("Archive", 0.2), ("Sent", 0.1))
#: Share of messages with a big attachment (100 KB - 2 MB).
ATTACHMENT_SHARE = 0.007
#: Documents a device of the throughput run asks for per pull (a daemon asks for as
#: many as it can apply in about 0.1 s: some hundreds).
PULL_BATCH = 500
#: Give up waiting for a sync after this long.
DEADLINE = 1800.0


# -- the mail ----------------------------------------------------------------------


class SyncMail(workload.Generator):
    """Realistic mail in realistic sizes: most 2-30 KB (median about 4 KB), about 1%
    with an attachment of 100 KB-2 MB.  Seeded: the same bytes every run."""

    def message(self, i, n_total):
        r = self.r
        date = workload.START + (i * workload.SPAN) // max(n_total, 1) + r.randrange(3600)
        sender = r.choice(self.people)
        headers = []
        for hop in range(r.randrange(1, 4)):
            headers.append(f"Received: from mx{hop}.example.net (mx{hop}.example.net "
                           f"[192.0.2.{hop + 10}])\r\n\tby mail.example.org with ESMTPS id "
                           f"{r.getrandbits(40):x};\r\n\t{workload.rfc2822_date(date - hop * 3)}")
        headers.append("From: " + self._address(sender))
        headers.append("To: " + self._address(r.choice(self.people)))
        topic = r.choice(workload.SUBJECT_TOPICS)
        headers.append(f"Subject: {topic.capitalize()} #{i}")
        headers.append("Date: " + workload.rfc2822_date(date))
        headers.append(f"Message-ID: <{i}.{r.getrandbits(48):x}@{sender[1].split('@')[1]}>")
        headers.append("MIME-Version: 1.0")
        if r.random() < ATTACHMENT_SHARE:
            size = int(100_000 * 20 ** r.random())
        else:
            size = int(2000 * 15 ** (r.random() ** 1.8))
        head = "\r\n".join(headers).encode()
        room = max(size - len(head), 300)
        if room < 60_000 and r.random() < 0.7:
            body_head = (b"Content-Type: text/plain; charset=utf-8\r\n"
                         b"Content-Transfer-Encoding: 7bit\r\n\r\n")
            body = self._text(room - 200, False)
        else:
            boundary = f"----=_Part_{i}_{r.getrandbits(32)}".encode()
            text = self._text(min(room // 2, 6000), False)
            blob = r.randbytes(max(room - len(text) - 400, 300) * 3 // 4)
            name = f"attachment-{i}.pdf"
            body_head = (b'Content-Type: multipart/mixed;\r\n boundary="' + boundary
                         + b'"\r\n\r\n')
            body = (b"--" + boundary + b"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                    + text + b"--" + boundary + b"\r\n"
                    + f'Content-Type: application/pdf; name="{name}"\r\n'
                      f'Content-Disposition: attachment; filename="{name}"\r\n'
                      "Content-Transfer-Encoding: base64\r\n\r\n".encode()
                    + base64.encodebytes(blob).replace(b"\n", b"\r\n")
                    + b"--" + boundary + b"--\r\n")
        raw = head + b"\r\n" + body_head + body
        flags = []
        if r.random() < 0.8:
            flags.append("\\Seen")
        if r.random() < 0.03:
            flags.append("\\Flagged")
        pick, mailbox = r.random(), MAILBOXES[-1][0]
        for name, share in MAILBOXES:
            if pick < share:
                mailbox = name
                break
            pick -= share
        return raw, tuple(flags), date, mailbox


def iter_mail(n, seed=7):
    g = SyncMail(seed)
    for i in range(n):
        yield g.message(i, n)


def expected_mail(n):
    """``({mailbox: Counter of sha256(BODY[])}, total bytes)`` of the seeded mail."""
    out, total = {name: Counter() for name, _ in MAILBOXES}, 0
    for raw, _, _, mailbox in iter_mail(n):
        out[mailbox][hashlib.sha256(raw).hexdigest()] += 1
        total += len(raw)
    return out, total


# -- loading device one offline (a subprocess: it needs a reactor of its own) ------


def bulk_load(home_path, n):
    from twisted.internet import defer, task

    from leapmail.home import Home
    from leapmail.mail.account import Account

    async def load(reactor):
        started = time.perf_counter()
        home = Home(home_path)
        bundle = home.unlock(PASSPHRASE)
        store = home.open_store(bundle, reactor=reactor)
        account = Account(store, bundle.id_key)
        try:
            pending = []
            chunks = {name: [] for name, _ in MAILBOXES}
            sizes = dict.fromkeys(chunks, 0)
            for raw, flags, date, mailbox in iter_mail(n):
                chunks[mailbox].append((raw, flags, date))
                sizes[mailbox] += len(raw)
                if len(chunks[mailbox]) >= 300 or sizes[mailbox] > 8 * MIB:
                    pending.append(defer.ensureDeferred(
                        account.append_many(mailbox, chunks[mailbox])))
                    chunks[mailbox], sizes[mailbox] = [], 0
                    # Two batches in flight: one is parsed while the other is written.
                    if len(pending) >= 2:
                        await pending.pop(0)
            for mailbox, chunk in chunks.items():
                if chunk:
                    pending.append(defer.ensureDeferred(account.append_many(mailbox, chunk)))
            for d in pending:
                await d
            imported = time.perf_counter()
            # The daemon would index in the background while it pushes; do it now.
            await account.text_indexer.flush()
            indexed = time.perf_counter()

            def count(q):
                docs = q.execute("SELECT count(*) FROM documents").fetchone()[0]
                chunks = q.execute("SELECT count(*) FROM blob_chunks").fetchone()[0]
                return docs, chunks

            docs, chunk_count = await store.read(count)
        finally:
            account.close()
            await store.close()
        print(json.dumps({"import_s": imported - started, "index_s": indexed - imported,
                          "documents": docs, "chunks": chunk_count}))

    task.react(lambda reactor: defer.ensureDeferred(load(reactor)))


# -- initial sync ------------------------------------------------------------------


def fresh_dir(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def cpu_seconds(pid):
    """User + system CPU time of a process so far (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def provider_doc_count(provider):
    """Documents the provider holds (all accounts), read from its database."""
    if provider.database:
        import psycopg

        with psycopg.connect(provider.database, autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM docs").fetchone()[0]
    path = os.path.join(provider.home, "provider.db")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT count(*) FROM docs").fetchone()[0]
    finally:
        conn.close()


def imap_counts(client):
    """``{mailbox: MESSAGES}`` over STATUS (0 for a mailbox not there yet)."""
    out = {}
    for name, _ in MAILBOXES:
        typ, data = client.status(name, "(MESSAGES)")
        found = re.search(rb"MESSAGES (\d+)", data[0] or b"") if typ == "OK" else None
        out[name] = int(found.group(1)) if found else 0
    return out


def read_all(client, expect):
    """Read every BODY[] over IMAP and compare with ``expect``; returns bytes read."""
    total = 0
    for name, _ in MAILBOXES:
        typ, data = client.select(name, readonly=True)
        if typ != "OK":
            raise RuntimeError(f"SELECT {name}: {typ} {data!r}")
        _, [uids] = client.uid("SEARCH", "ALL")
        uids = uids.split()
        seen = Counter()
        for start in range(0, len(uids), 500):
            chunk = b",".join(uids[start:start + 500]).decode()
            typ, data = client.uid("FETCH", chunk, "(BODY.PEEK[])")
            if typ != "OK":
                raise RuntimeError(f"FETCH in {name}: {typ} {data!r}")
            for item in data:
                if isinstance(item, tuple):
                    seen[hashlib.sha256(item[1]).hexdigest()] += 1
                    total += len(item[1])
        if seen != expect[name]:
            missing = sum((expect[name] - seen).values())
            extra = sum((seen - expect[name]).values())
            raise RuntimeError(f"{name} on device two differs from what was loaded: "
                               f"{missing} messages missing, {extra} unexpected")
    return total


class Spy:
    """``py-spy record`` on a process, while it runs (--profile)."""

    def __init__(self, pid, out):
        self.out = out
        self.process = subprocess.Popen(
            [os.path.join(BIN, "py-spy"), "record", "--pid", str(pid), "--output", out,
             "--rate", "100", "--threads", "--format",
             "raw" if out.endswith(".txt") else "flamegraph"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def stop(self):
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        print(f"  profile: {self.out}")


def initial_sync(workdir, n, profile=None, profile_format="svg", backend="sqlite"):
    postgres = durable_postgres() if backend == "postgresql" else None
    try:
        return _initial_sync(workdir, n, profile, profile_format, postgres)
    finally:
        if postgres is not None:
            postgres.stop()


def _initial_sync(workdir, n, profile, profile_format, postgres):
    fig = {"messages": n, "backend": "postgresql" if postgres else "sqlite"}
    base = fresh_dir(os.path.join(workdir, "initial"))
    started = time.perf_counter()
    expect, total = expected_mail(n)
    fig["bytes"] = total
    print(f"{n:,} messages, {total / MB:.1f} MB "
          f"({', '.join(f'{k} {sum(v.values()):,}' for k, v in expect.items())}), "
          f"made in {time.perf_counter() - started:.1f} s")

    provider = ProviderProcess(os.path.join(base, "provider"),
                               database=postgres.create_database() if postgres else None)
    code = provider.adduser(ADDRESS)
    provider.start()
    try:
        one = LeapmailDaemon(os.path.join(base, "one"), PASSPHRASE, ADDRESS, init_args=[
            "--provider", provider.url, "--provider-ca", provider.ca_path, "--enroll", code])
        one.init()
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--bulk-load", one.home,
             "--messages", str(n)], check=True, capture_output=True, text=True)
        loaded = json.loads(out.stdout.strip().splitlines()[-1])
        expected_docs = loaded["documents"] + loaded["chunks"]
        print(f"device one: loaded offline in {time.perf_counter() - started:.1f} s "
              f"(import {loaded['import_s']:.1f} s, full-text index {loaded['index_s']:.1f} s): "
              f"{loaded['documents']:,} documents and {loaded['chunks']:,} blob chunks to push")

        # -- device one pushes everything
        reset_peak(provider.pid)
        provider_cpu = cpu_seconds(provider.pid)
        spies = []
        started = time.perf_counter()
        one.start()
        listening = time.perf_counter()
        ext = "txt" if profile_format == "raw" else "svg"
        if profile:
            os.makedirs(profile, exist_ok=True)
            spies = [Spy(one.pid, os.path.join(profile, f"device-one.{ext}")),
                     Spy(provider.pid, os.path.join(profile, f"provider-push.{ext}"))]
        while provider_doc_count(provider) < expected_docs:
            if time.perf_counter() - started > DEADLINE:
                raise RuntimeError("device one did not push everything in time")
            if one.process.poll() is not None:
                raise RuntimeError(f"device one exited:\n{one.log_text()[-3000:]}")
            time.sleep(0.1)
        pushed = time.perf_counter()
        for spy in spies:
            spy.stop()
        # The daemon syncs from the moment its store is open, before IMAP listens:
        # the push is timed from the daemon's launch, its start-up included.
        fig["push_s"] = pushed - started
        fig["push_startup_s"] = listening - started
        fig["push_cpu_one"] = cpu_seconds(one.pid)  # its whole life: it pushes at once
        fig["push_cpu_provider"] = cpu_seconds(provider.pid) - provider_cpu
        fig["rss_one"] = vm_hwm(one.pid)
        fig["rss_provider_push"] = vm_hwm(provider.pid)
        fig["docs"] = expected_docs
        print(f"device one: pushed {expected_docs:,} documents {fig['push_s']:.1f} s after "
              f"its launch (listening after {fig['push_startup_s']:.1f} s)")
        one.stop()

        # -- device two joins and pulls
        two = LeapmailDaemon(os.path.join(base, "two"), PASSPHRASE, ADDRESS, init_args=[
            "--provider", provider.url, "--provider-ca", provider.ca_path])
        reset_peak(provider.pid)
        provider_cpu = cpu_seconds(provider.pid)
        spies = []
        started = time.perf_counter()
        two.init()
        joined = time.perf_counter()
        two.start()
        listening = time.perf_counter()
        try:
            fig["rss_two_startup"] = vm_hwm(two.pid)
            reset_peak(two.pid)
            if profile:
                spies = [Spy(two.pid, os.path.join(profile, f"device-two.{ext}")),
                         Spy(provider.pid, os.path.join(profile, f"provider-pull.{ext}"))]
            client = two.imap()
            polls, appends, last_print, count = [], [], listening, 0
            while True:
                t = time.perf_counter()
                counts = imap_counts(client)
                polls.append(time.perf_counter() - t)
                count = sum(counts.values())
                now = time.perf_counter()
                if count >= n:
                    break
                # A user working meanwhile: an APPEND needs the store's writer, which
                # the sync keeps busy; how long it waits is what a client feels.
                note = (f"From: {ADDRESS}\r\nSubject: draft {len(appends)}\r\n\r\n"
                        "written while syncing\r\n").encode()
                t = time.perf_counter()
                typ, data = client.append("Drafts", None, None, note)
                appends.append(time.perf_counter() - t)
                if typ != "OK":
                    raise RuntimeError(f"APPEND during the sync: {typ} {data!r}")
                if now - started > DEADLINE:
                    raise RuntimeError(f"device two has {count} of {n} messages after "
                                       f"{DEADLINE:.0f} s")
                if now - last_print >= 10:
                    print(f"  device two: {count:,} of {n:,} messages after "
                          f"{now - started:.0f} s")
                    last_print = now
                time.sleep(0.2)
            done = time.perf_counter()
            for spy in spies:
                spy.stop()
            fig["pull_cpu_two"] = cpu_seconds(two.pid)
            fig["pull_cpu_provider"] = cpu_seconds(provider.pid) - provider_cpu
            fig["rss_two_sync"] = vm_hwm(two.pid)
            fig["rss_provider_pull"] = vm_hwm(provider.pid)
            fig["join_s"] = joined - started
            fig["start_s"] = listening - joined
            # As for the push: from the daemon's launch (it pulls before it listens).
            fig["sync_s"] = done - joined
            fig["total_s"] = done - started
            fig["status_polls"] = sorted(polls)
            fig["appends"] = sorted(appends)
            if count != n:
                raise RuntimeError(f"device two shows {count} messages, not {n}")
            # Full-text indexing waits while a device catches up, as for a bulk import,
            # and runs once it has; a text search first finishes it.
            client.select("INBOX", readonly=True)
            t = time.perf_counter()
            typ, data = client.search(None, "TEXT", "budget")
            fig["search_s"] = time.perf_counter() - t
            if typ != "OK":
                raise RuntimeError(f"SEARCH TEXT: {typ} {data!r}")
            t = time.perf_counter()
            read = read_all(client, expect)
            fig["read_s"] = time.perf_counter() - t
            fig["read_bytes"] = read
            client.logout()
        finally:
            for spy in spies:
                if spy.process.poll() is None:
                    spy.stop()
            two.stop()
    finally:
        provider.stop()
    return fig


def report_initial(fig):
    n, size = fig["messages"], fig["bytes"]
    polls = fig["status_polls"]
    print(f"\nInitial sync of {n:,} messages ({size / MB:.1f} MB, {fig['docs']:,} documents "
          f"on the wire), the provider on {fig['backend']}")
    rows = [
        ("push (device one -> provider), from launch", fig["push_s"],
         f"CPU: device one {fig['push_cpu_one']:.1f} s, provider "
         f"{fig['push_cpu_provider']:.1f} s"),
        ("pull (provider -> device two), from launch", fig["sync_s"],
         f"CPU: device two {fig['pull_cpu_two']:.1f} s, provider "
         f"{fig['pull_cpu_provider']:.1f} s"),
    ]
    print(f"  {'':46} {'s':>7} {'msgs/s':>8} {'MB/s':>7}")
    for label, seconds, note in rows:
        print(f"  {label:46} {seconds:7.1f} {n / seconds:8,.0f} {size / MB / seconds:7.1f}   "
              f"{note}")
    print(f"  new device: leapmail init {fig['join_s']:.1f} s + daemon launched until IMAP "
          f"shows all {n:,} {fig['sync_s']:.1f} s (listening after {fig['start_s']:.1f} s) "
          f"= {fig['total_s']:.1f} s")
    print(f"  then SEARCH TEXT in INBOX, which first finishes the full-text index: "
          f"{fig['search_s']:.1f} s")
    print(f"  then every BODY[] read over IMAP and checked: {fig['read_bytes'] / MB:.1f} MB "
          f"in {fig['read_s']:.1f} s")
    print(f"  IMAP on device two while it synced: STATUS x{len(MAILBOXES)} median "
          f"{polls[len(polls) // 2] * 1000:.0f} ms, max {polls[-1] * 1000:.0f} ms "
          f"({len(polls)} times)")
    appends = fig["appends"]
    if appends:
        print(f"    APPEND of a small message to Drafts: median "
              f"{appends[len(appends) // 2] * 1000:.0f} ms, 90th percentile "
              f"{appends[len(appends) * 9 // 10] * 1000:.0f} ms, max "
              f"{appends[-1] * 1000:.0f} ms ({len(appends)} times)")
    print(f"  peak RSS (VmHWM): device two {fig['rss_two_sync'] / MIB:.0f} MiB while syncing "
          f"({fig['rss_two_startup'] / MIB:.0f} MiB at start-up: the scrypt unlock); "
          f"device one {fig['rss_one'] / MIB:.0f} MiB; provider {fig['rss_provider_push'] / MIB:.0f}"
          f" MiB during the push, {fig['rss_provider_pull'] / MIB:.0f} MiB during the pull")


# -- provider throughput -----------------------------------------------------------


def durable_postgres():
    """A throw-away PostgreSQL cluster with fsync and synchronous commit on (the test
    fixture turns them off for speed; a comparison with SQLite's synchronous=FULL
    needs them on)."""
    from postgres_server import PostgresServer

    server = PostgresServer()
    try:
        server.start()
        data = os.path.join(server.dir, "data")
        server._run("pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        options = (f"-p {server.port} -k {server.dir} -c listen_addresses=127.0.0.1 "
                   "-c max_connections=200 -c fsync=on -c synchronous_commit=on "
                   "-c full_page_writes=on")
        server._run("pg_ctl", "-D", data, "-l", os.path.join(server.dir, "server.log"),
                    "-o", options, "-w", "-t", "60", "start")
    except BaseException:
        server.stop()
        raise
    return server


def load_clients(spec_path):
    """The device side of the throughput run (a subprocess); prints its figures."""
    from twisted.internet import defer, task

    from leapmail.crypto.wire import WireKeys
    from leapmail.sync.engine import PUSH_MAX_BYTES, PUSH_MAX_DOCS
    from leapmail.sync.remote import ProviderClient

    with open(spec_path) as f:
        spec = json.load(f)
    with open(spec["ca"], "rb") as f:
        ca_pem = f.read()

    def documents(keys, count, rng):
        """Sealed documents as a device pushes them: ``[[(id, base, data)]]`` batches."""
        batches, batch, size = [], [], 0
        for k in range(count):
            if k % 2:
                kind, content = "flags", rng.randbytes(rng.randrange(120, 200))
            else:
                kind, content = "message", rng.randbytes(int(2000 * 15 ** (rng.random() ** 1.8)))
            doc_id = f"{kind}-{k}"
            data = keys.seal(kind, doc_id, 1, content)
            if batch and (len(batch) >= PUSH_MAX_DOCS or size + len(data) > PUSH_MAX_BYTES):
                batches.append(batch)
                batch, size = [], 0
            batch.append((keys.wire_id(kind, doc_id), 0, data))
            size += len(data)
        if batch:
            batches.append(batch)
        return batches

    async def run(reactor):
        devices = []
        for address, code in spec["users"]:
            client = ProviderClient(spec["url"], ca_pem, reactor=reactor, timeout=600)
            kdf = {"name": "scrypt", "version": 1, "n": 2, "r": 1, "p": 1,
                   "salt": base64.b64encode(os.urandom(16)).decode()}
            client.token, _, _ = await client.enroll(address, code, kdf, os.urandom(32),
                                                     os.urandom(200), "bench")
            keys = WireKeys(os.urandom(32))
            rng = random.Random(address)
            devices.append((client, keys, documents(keys, spec["docs"], rng)))
        pushed_bytes = sum(len(d[2]) for _, _, batches in devices for b in batches for d in b)
        pushed_docs = sum(len(b) for _, _, batches in devices for b in batches)

        async def push(client, batches):
            for batch in batches:
                await client.push(batch)

        async def pull(client, keys):
            since, docs, size, more = 0, 0, 0, True
            while more:
                changes, since, more = await client.changes(since, PULL_BATCH, 0)
                docs += len(changes)
                size += sum(len(c[3]) for c in changes)
            # The feed is the device's own: it opens.
            wire_id, rev, _, data = changes[-1]
            keys.open(wire_id, rev, data)
            return docs, size

        out = {"docs": pushed_docs, "bytes": pushed_bytes}
        t, cpu = time.perf_counter(), time.process_time()
        await defer.gatherResults([defer.ensureDeferred(push(c, b)) for c, _, b in devices],
                                  consumeErrors=True)
        out["push_s"], out["push_client_cpu"] = (time.perf_counter() - t,
                                                 time.process_time() - cpu)
        t, cpu = time.perf_counter(), time.process_time()
        pulled = await defer.gatherResults(
            [defer.ensureDeferred(pull(c, k)) for c, k, _ in devices], consumeErrors=True)
        out["pull_s"], out["pull_client_cpu"] = (time.perf_counter() - t,
                                                 time.process_time() - cpu)
        out["pulled_docs"] = sum(d for d, _ in pulled)
        out["pulled_bytes"] = sum(s for _, s in pulled)
        for client, _, _ in devices:
            await client.close()
        print(json.dumps(out))

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


def provider_throughput(workdir, backend, devices, docs, profile=None, profile_format="svg"):
    base = fresh_dir(os.path.join(workdir, f"providers-{backend}"))
    postgres = None
    try:
        database = None
        if backend == "postgresql":
            postgres = durable_postgres()
            database = postgres.create_database()
        provider = ProviderProcess(os.path.join(base, "provider"), database=database)
        users = []
        for k in range(devices):
            address = f"device{k}@example.org"
            users.append((address, provider.adduser(address)))
        provider.start()
        try:
            spec_path = os.path.join(base, "clients.json")
            with open(spec_path, "w") as f:
                json.dump({"url": provider.url, "ca": provider.ca_path, "users": users,
                           "docs": docs}, f)
            reset_peak(provider.pid)
            cpu = cpu_seconds(provider.pid)
            spy = None
            if profile:
                os.makedirs(profile, exist_ok=True)
                ext = "txt" if profile_format == "raw" else "svg"
                spy = Spy(provider.pid, os.path.join(profile, f"provider-{backend}.{ext}"))
            try:
                out = subprocess.run([sys.executable, os.path.abspath(__file__),
                                      "--load-clients", spec_path],
                                     capture_output=True, text=True)
            finally:
                if spy is not None:
                    spy.stop()
            if out.returncode != 0:
                raise RuntimeError(f"the clients failed:\n{out.stdout}{out.stderr}")
            fig = json.loads(out.stdout.strip().splitlines()[-1])
            fig["provider_cpu"] = cpu_seconds(provider.pid) - cpu
            fig["provider_rss"] = vm_hwm(provider.pid)
        finally:
            provider.stop()
    finally:
        if postgres is not None:
            postgres.stop()
    if fig["pulled_docs"] != fig["docs"]:
        raise RuntimeError(f"{backend}: pushed {fig['docs']} documents, pulled "
                           f"{fig['pulled_docs']}")
    return fig


def report_providers(figs, devices, docs):
    print(f"\nProvider throughput: {devices} devices (one account each) x {docs:,} documents, "
          "all at once")
    names = list(figs)
    print(f"  {'':28}" + "".join(f"{n:>14}" for n in names)
          + ("   postgresql/sqlite" if len(names) == 2 else ""))
    rows = [
        ("push docs/s", lambda f: f["docs"] / f["push_s"]),
        ("push MB/s", lambda f: f["bytes"] / MB / f["push_s"]),
        ("pull docs/s", lambda f: f["pulled_docs"] / f["pull_s"]),
        ("pull MB/s", lambda f: f["pulled_bytes"] / MB / f["pull_s"]),
        ("provider CPU s", lambda f: f["provider_cpu"]),
        ("devices' CPU s", lambda f: f["push_client_cpu"] + f["pull_client_cpu"]),
        ("provider peak RSS MiB", lambda f: f["provider_rss"] / MIB),
    ]
    for label, value in rows:
        values = [value(figs[n]) for n in names]
        line = f"  {label:28}" + "".join(f"{v:14,.1f}" for v in values)
        if len(names) == 2 and values[0]:
            line += f"   {values[1] / values[0]:6.2f}"
        print(line)
    any_fig = figs[names[0]]
    print(f"  ({any_fig['docs']:,} documents, {any_fig['bytes'] / MB:.1f} MB sealed, "
          "in each direction)")


# -- main --------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, help="messages of the initial sync "
                        "(default 10,000; 1,000 with --quick)")
    parser.add_argument("--devices", type=int, default=20,
                        help="devices of the throughput run (default 20)")
    parser.add_argument("--docs-per-device", type=int,
                        help="documents each device pushes (default 2,000; 300 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smaller run")
    parser.add_argument("--only", choices=("initial", "providers"))
    parser.add_argument("--backend", action="append", choices=("sqlite", "postgresql"),
                        help="the throughput run on this storage only (may be repeated)")
    parser.add_argument("--initial-backend", choices=("sqlite", "postgresql"),
                        default="sqlite",
                        help="the provider's storage for the initial sync (default sqlite)")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "build", "bench-sync"),
                        help="throw-away directory (default build/bench-sync)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (removed after a clean run)")
    parser.add_argument("--profile", metavar="DIR",
                        help="py-spy flame graphs of the daemons and the providers")
    parser.add_argument("--profile-format", choices=("svg", "raw"), default="svg",
                        help="flame graphs (svg, the default) or collapsed stacks (raw)")
    parser.add_argument("--bulk-load", metavar="HOME", help=argparse.SUPPRESS)
    parser.add_argument("--load-clients", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = args.messages or (1000 if args.quick else 10_000)
    docs = args.docs_per_device or (300 if args.quick else 2000)
    if args.bulk_load:
        bulk_load(args.bulk_load, n)
        return 0
    if args.load_clients:
        load_clients(args.load_clients)
        return 0

    os.makedirs(args.workdir, exist_ok=True)
    started = time.perf_counter()
    failed, initial, providers = [], None, {}
    if args.only in (None, "initial"):
        print(f"== Initial sync of {n:,} messages to a new device, the provider on "
              f"{args.initial_backend}")
        try:
            initial = initial_sync(args.workdir, n, args.profile, args.profile_format,
                                   args.initial_backend)
        except Exception:
            traceback.print_exc()
            failed.append("initial sync")
    if args.only in (None, "providers"):
        for backend in args.backend or ("sqlite", "postgresql"):
            print(f"\n== Provider throughput on {backend}: {args.devices} devices")
            try:
                providers[backend] = provider_throughput(
                    args.workdir, backend, args.devices, docs, args.profile,
                    args.profile_format)
            except Exception:
                traceback.print_exc()
                failed.append(f"provider on {backend}")

    if initial:
        report_initial(initial)
    if providers:
        report_providers(providers, args.devices, docs)
    print("\nTarget")
    if initial is None:
        print("  SKIP  a new device has 10,000 messages readable in under a minute: not run")
    else:
        total = initial["total_s"]
        # The target is for 10,000 messages; a run of another size is held to the
        # same rate.
        limit = TARGET_SECONDS * initial["messages"] / 10_000
        verdict = "PASS" if total < limit else "MISS"
        print(f"  {verdict}  a new device has {initial['messages']:,} messages readable in "
              f"under {limit:.0f} s: {total:.1f} s "
              f"({initial['messages'] / total:,.0f} msgs/s)")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if failed:
        print(f"FAILED: {', '.join(failed)} (see above; logs in {args.workdir})")
        return 1
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
