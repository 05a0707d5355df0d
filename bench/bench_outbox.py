"""Outgoing mail: local SMTP accept rate and outbox relay rate, real processes.

1. **accept**: N messages (~4 KB) through the daemon's local SMTP on one connection
   (smtplib, AUTH once, one MAIL/RCPT/DATA per message), each answered 250 only once
   durably in the outbox; the provider is down meanwhile, so the relay does not
   compete.  Messages/s.
2. **relay**: the provider comes back and the daemon restarts (a start retries the
   whole queue); the time from the daemon listening until the smarthost (Twisted's
   ESMTP server, tests/helpers/smtp_sink.py) has all N is the relay rate: daemon
   outbox → submission (STARTTLS, AUTH) → provider → smarthost, 50 messages per
   connection.

Usage: ``.venv/bin/python bench/bench_outbox.py [--quick] [-n N]``.
"""

import argparse
import os
import shutil
import smtplib
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from leapmail_daemon import LeapmailDaemon  # noqa: E402
from provider_process import ProviderProcess  # noqa: E402
from test_smtp import ALICE, PASSPHRASE, SinkProcess  # noqa: E402


def message(i):
    body = b"".join(b"line %05d of message %06d, some words to make it mail-like\r\n"
                    % (j, i) for j in range(60))
    return (b"From: <alice@example.org>\r\nTo: <bob@elsewhere.test>\r\n"
            b"Subject: bench %d\r\nMessage-ID: <bench-%d@example.org>\r\n\r\n" % (i, i)
            + body)


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = args.n // 10 if args.quick else args.n
    root = tempfile.mkdtemp(prefix="bench-outbox-")
    sink = SinkProcess(os.path.join(root, "sink")).start()
    provider = ProviderProcess(os.path.join(root, "provider"), submission=True,
                               extra_args=["--smarthost", f"127.0.0.1:{sink.port}"])
    daemon = None
    try:
        provider.code = provider.adduser(ALICE)
        provider.start()
        daemon = LeapmailDaemon(os.path.join(root, "alice"), PASSPHRASE, ALICE, init_args=[
            "--provider", provider.url, "--provider-ca", provider.ca_path, "--enroll",
            provider.code], extra_args=["--submission",
                                        f"127.0.0.1:{provider.submission_port}"]).start()
        provider.stop()
        messages = [message(i) for i in range(n)]
        size = sum(len(m) for m in messages)
        client = smtplib.SMTP("127.0.0.1", daemon.smtp_port)
        client.login(daemon.user, daemon.password)
        start = time.perf_counter()
        for m in messages:
            client.sendmail(ALICE, ["bob@elsewhere.test"], m)
        accept = time.perf_counter() - start
        client.quit()
        print(f"accept: {n} messages ({size / 1e6:.1f} MB) in {accept:.2f} s: "
              f"{n / accept:.0f} msgs/s, {size / accept / 1e6:.1f} MB/s")
        daemon.stop()
        provider.start()
        daemon.start()
        cpus = {name: cpu_seconds(p.pid) for name, p in
                (("daemon", daemon), ("provider", provider), ("smarthost", sink))}
        start = time.perf_counter()
        while len(os.listdir(sink.directory)) < n:
            if time.perf_counter() - start > 600:
                raise SystemExit("the relay did not finish in 10 minutes")
            time.sleep(0.02)
        relay = time.perf_counter() - start
        print(f"relay:  {n} messages in {relay:.2f} s: {n / relay:.0f} msgs/s "
              f"(outbox → submission → smarthost)")
        print("        CPU seconds meanwhile: " + ", ".join(
            f"{name} {cpu_seconds(p.pid) - cpus[name]:.2f}" for name, p in
            (("daemon", daemon), ("provider", provider), ("smarthost", sink))))
    finally:
        if daemon is not None:
            daemon.stop()
        provider.stop()
        sink.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
