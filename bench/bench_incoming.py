"""Incoming mail: MX intake rate, and latency from the MX's 250 to EXISTS on IDLE.

A real provider (``twistd -n leapmail-provider --mx-port 0``, SQLite by default or
PostgreSQL with --backend postgresql) and one real daemon for bob@example.org.

1. **MX intake.**  --messages (2,000) messages of 2-20 KB go to a second account
   (one with an incoming key and no daemon, so nothing else competes) over smtplib,
   a new connection every 100 messages.  Printed: msgs/s and MB/s accepted (250s).
2. **End to end.**  An IDLE client on bob's daemon; --latency (200) messages are sent
   one at a time, each timed from the MX's 250 to the ``* n EXISTS`` it causes.
   Printed: median, p95 and max.  Target: median under 1 s, PASS or MISS.

Usage: ``.venv/bin/python bench/bench_incoming.py [--messages N] [--latency N]
[--backend sqlite|postgresql] [--workdir DIR] [--keep]``.  The exit status is
non-zero only when something could not be run or answered wrongly.
"""

import argparse
import os
import random
import shutil
import smtplib
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from leapmail.crypto.sealed import IncomingKeyPair  # noqa: E402
from leapmail.provider.api import code_hash  # noqa: E402
from leapmail.provider.storage import open_storage  # noqa: E402
from leapmail_daemon import LeapmailDaemon  # noqa: E402
from provider_process import ProviderProcess  # noqa: E402

BOB = "bob@example.org"
SINK = "sink@example.org"


def message(i, rng):
    body = b"".join(b"%d %s\r\n" % (n, bytes(rng.choices(b"abcdefghij klmnop", k=70)))
                    for n in range(rng.randint(25, 250)))
    return (b"From: Alice <alice@example.net>\r\nTo: " + BOB.encode() + b"\r\n"
            b"Subject: bench %d\r\nMessage-ID: <%d@bench>\r\n\r\n" % (i, i) + body)


def smtp(port):
    client = smtplib.SMTP("127.0.0.1", port, timeout=60)
    client.ehlo("bench.example")
    return client


def intake(provider, count, rng):
    messages = [message(i, rng) for i in range(count)]
    total = sum(len(m) for m in messages)
    started = time.monotonic()
    client = None
    for i, raw in enumerate(messages):
        if i % 100 == 0:
            if client is not None:
                client.quit()
            client = smtp(provider.mx_port)
        refused = client.sendmail("alice@example.net", [SINK], raw)
        if refused:
            raise SystemExit(f"the MX refused message {i}: {refused}")
    client.quit()
    elapsed = time.monotonic() - started
    print(f"MX intake: {count} messages ({total / 1e6:.1f} MB) in {elapsed:.2f} s: "
          f"{count / elapsed:.0f} msgs/s, {total / 1e6 / elapsed:.2f} MB/s")


def latency(provider, daemon, count, rng):
    watcher = daemon.imap()
    status, [exists] = watcher.select("INBOX")
    seen = int(exists)
    watcher.send(b"I1 IDLE\r\n")
    if not watcher.readline().startswith(b"+ "):
        raise SystemExit("IDLE refused")
    watcher.sock.settimeout(60)
    client = smtp(provider.mx_port)
    times = []
    for i in range(count):
        raw = message(100_000 + i, rng)
        client.sendmail("alice@example.net", [BOB], raw)
        accepted = time.monotonic()
        while True:
            line = watcher.readline()
            if not line:
                raise SystemExit("the IMAP connection closed")
            if line.endswith(b" EXISTS\r\n"):
                n = int(line.split()[1])
                if n > seen:
                    seen = n
                    break
        times.append(time.monotonic() - accepted)
    client.quit()
    watcher.send(b"DONE\r\n")
    watcher.readline()
    times.sort()
    median = statistics.median(times)
    p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
    verdict = "PASS" if median < 1.0 else "MISS"
    print(f"MX 250 -> IDLE EXISTS over {count} messages: median {median * 1000:.0f} ms, "
          f"p95 {p95 * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms "
          f"(target median < 1 s: {verdict})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--latency", type=int, default=200)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--workdir")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench-incoming-")
    os.makedirs(work, exist_ok=True)
    rng = random.Random(6)
    postgres = None
    database = None
    if args.backend == "postgresql":
        from postgres_server import PostgresServer

        postgres = PostgresServer()
        postgres.start()
        database = postgres.create_database()
    provider = ProviderProcess(os.path.join(work, "provider"), database=database,
                               extra_args=["--mx-port", "0", "--hostname", "mx.bench"])
    daemon = None
    try:
        code = provider.adduser(BOB)
        sink_code = provider.adduser(SINK)
        provider.start()
        storage = open_storage(provider.home, database)
        try:
            # The sink account is claimed and keyed through the storage layer: it needs
            # no daemon, so nothing but the MX works during the intake run.
            storage.claim(SINK, code_hash(sink_code), int(time.time()), {"name": "scrypt"},
                          os.urandom(32), b"bundle", "dev", "bench", os.urandom(32), 2**40)
            storage.set_incoming_key(storage.find_account(SINK).user_id,
                                     IncomingKeyPair.generate().public_bytes())
        finally:
            storage.close()
        daemon = LeapmailDaemon(os.path.join(work, "bob"), "bench passphrase", BOB, init_args=[
            "--provider", provider.url, "--provider-ca", provider.ca_path, "--enroll", code])
        daemon.start()
        intake(provider, args.messages, rng)
        latency(provider, daemon, args.latency, rng)
    finally:
        if daemon is not None:
            daemon.stop()
        provider.stop()
        if postgres is not None:
            postgres.stop()
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
