"""Bringing mail in: ``leapmail import`` of a big mbox, ``leapmail fetch`` from Dovecot.

Figures (issue 7), each the real command as a user runs it (so the passphrase's
scrypt unlock, about a quarter of a second, is in them):

1. ``leapmail import`` of a generated 10,000-message mboxrd file (messages of 1-20 KB,
   CRLF, a few multipart with an attachment): messages/s and MB/s;
2. ``leapmail fetch`` of a Dovecot account (the same 10,000 messages, in INBOX and two
   folders) over loopback IMAP: messages/s and MB/s;
3. the peer: mbsync (isync), the usual tool for this job, copying the same Dovecot
   account into a local Maildir (no encryption, no MIME analysis), when installed.

Usage: ``.venv/bin/python bench/bench_transfer.py [--quick]`` (--quick: 1,000 messages).
"""

import argparse
import base64
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from dovecot_server import DovecotServer  # noqa: E402

BIN = os.path.dirname(sys.executable)
PASSPHRASE = "bench passphrase"
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()


def make_message(i, rng):
    size = rng.randrange(1000, 20000)
    words, length = [], 0
    while length < size:
        words.append(rng.choice(WORDS))
        length += len(words[-1]) + 1
    text = "\r\n".join(" ".join(words[j:j + 12]) for j in range(0, len(words), 12)).encode()
    header = (f"From: sender{i % 50}@example.org\r\nTo: me@example.org\r\n"
              f"Subject: message {i} {rng.choice(WORDS)}\r\nMessage-ID: <{i}@bench>\r\n"
              f"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMIME-Version: 1.0\r\n").encode()
    if i % 10:
        return header + b"Content-Type: text/plain\r\n\r\n" + text + b"\r\n"
    blob = base64.encodebytes(rng.randbytes(30000)).replace(b"\n", b"\r\n")
    return (header + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            b"Content-Type: text/plain\r\n\r\n" + text + b"\r\n--b\r\nContent-Type: "
            b"application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + blob + b"--b--\r\n")


def env():
    values = {k: v for k, v in os.environ.items() if not k.startswith("LEAPMAIL_")}
    values["LEAPMAIL_PASSPHRASE"] = PASSPHRASE
    return values


def leapmail(*args, extra=None):
    started = time.monotonic()
    result = subprocess.run([os.path.join(BIN, "leapmail"), *args], capture_output=True,
                            env=dict(env(), **(extra or {})), stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"leapmail {' '.join(args)} failed:\n{result.stderr.decode()}")
    return elapsed, result.stdout.decode()


def new_home(tmp, name):
    home = os.path.join(tmp, name)
    leapmail("init", "--home", home, "--address", "me@example.org")
    return home


def row(label, count, size, seconds):
    print(f"{label:<44} {count:>7} {size / 1e6:>8.1f} {seconds:>8.2f} "
          f"{count / seconds:>9,.0f} {size / 1e6 / seconds:>7.1f}")


def mbsync(server, tmp):
    if shutil.which("mbsync") is None:
        return None
    target = os.path.join(tmp, "mbsync-maildir")
    os.makedirs(target)
    config = os.path.join(tmp, "mbsyncrc")
    with open(config, "w") as f:
        f.write(f"""IMAPAccount legacy
Host {server.host}
Port {server.port}
User {server.user}
Pass {server.password}
SSLType None
AuthMechs LOGIN

IMAPStore legacy-remote
Account legacy

MaildirStore legacy-local
Path {target}/
Inbox {target}/INBOX
SubFolders Verbatim

Channel legacy
Far :legacy-remote:
Near :legacy-local:
Patterns *
Create Near
SyncState *
Sync Pull
""")
    started = time.monotonic()
    result = subprocess.run(["mbsync", "-c", config, "-a", "-q"], capture_output=True,
                            stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        print(f"(mbsync failed, no peer figure: {result.stderr.decode().strip()[:200]})")
        return None
    return elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    count = 1000 if args.quick else 10000
    rng = random.Random(7)
    messages = [make_message(i, rng) for i in range(count)]
    total = sum(len(m) for m in messages)
    tmp = tempfile.mkdtemp(prefix="leapmail-bench-transfer-")
    try:
        print(f"leapmail transfer benchmark: {count} messages, {total / 1e6:.1f} MB")
        print(f"{'':<44} {'msgs':>7} {'MB':>8} {'s':>8} {'msgs/s':>9} {'MB/s':>7}")
        # 1. import of an mboxrd file
        mbox = os.path.join(tmp, "big.mbox")
        with open(mbox, "wb") as f:
            for i, raw in enumerate(messages):
                f.write(b"From MAILER-DAEMON Mon Jan  1 00:00:00 2024\n")
                f.write(re.sub(rb"(?m)^(>*From )", rb">\1", raw) + b"\r\n")
        home = new_home(tmp, "import")
        seconds, out = leapmail("--home", home, "import", mbox, "--mailbox", "Old")
        assert out.startswith(f"import: {count} messages"), out
        row("leapmail import (mboxrd file)", count, os.path.getsize(mbox), seconds)
        seconds, out = leapmail("--home", home, "import", mbox, "--mailbox", "Old")
        assert out.startswith("import: 0 messages"), out
        row("leapmail import again (all there: skipped)", count, os.path.getsize(mbox),
            seconds)
        seconds, out = leapmail("--home", home, "export", "--mailbox", "Old",
                                os.path.join(tmp, "out.mbox"))
        row("leapmail export (mboxrd file)", count, total, seconds)
        # 2. fetch from Dovecot
        server = DovecotServer(os.path.join(tmp, "dovecot"), user="legacy",
                               password="legacy-secret")
        server.start()
        try:
            thirds = [messages[:count // 2], messages[count // 2:count * 3 // 4],
                      messages[count * 3 // 4:]]
            for folder, part in zip((None, "Archive", "Archive.2023"), thirds):
                server.deliver([(raw, ["\\Seen"] if i % 3 else [], 1700000000 + i)
                                for i, raw in enumerate(part)], folder)
            home = new_home(tmp, "fetch")
            url = f"imap://{server.user}@{server.host}:{server.port}/"
            seconds, out = leapmail("--home", home, "fetch", "--insecure", url,
                                    extra={"LEAPMAIL_FETCH_PASSWORD": server.password})
            assert out.startswith(f"fetch: {count} messages"), out
            row("leapmail fetch (Dovecot, loopback IMAP)", count, total, seconds)
            seconds, out = leapmail("--home", home, "fetch", "--insecure", url,
                                    extra={"LEAPMAIL_FETCH_PASSWORD": server.password})
            assert out.startswith("fetch: 0 messages"), out
            row("leapmail fetch again (all there: skipped)", count, total, seconds)
            peer = mbsync(server, tmp)
            if peer is not None:
                row("peer: mbsync to a plain Maildir", count, total, peer)
        finally:
            server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
