"""The mail core on the encrypted store: import, the header fetch of a big mailbox, search.

Figures (issue 3):

1. import of ~10 KB messages in batches (``Account.append_many``, 100 per transaction):
   messages/s and MB/s (target: >= 1,000 messages/s);
2. a 100,000-message mailbox (~2 KB messages) is built the same way, then the header
   set Thunderbird asks for on first sync (UID, RFC822.SIZE, FLAGS and
   BODY.PEEK[HEADER.FIELDS (From To Cc Bcc Subject Date Message-ID Priority X-Priority
   References Newsgroups In-Reply-To Content-Type Reply-To)]) is read for every
   message, in jobs of 1,000;
3. SEARCH TEXT over those 100,000 messages, for a word in about 1% of them and for one
   in none (target: < 100 ms);
4. peak RSS of the process.

The peer is Dovecot 2.3 from Debian on the same messages, driven over a pipe (its imap
binary, preauthenticated, Maildir, no full-text plugin): the same header fetch and
SEARCH TEXT, in the same run.  Dovecot's figures include IMAP parsing and formatting,
ours do not (the IMAP server is the next issue); read the ratio with that in mind.

Usage: ``.venv/bin/python bench/bench_mail.py [--quick]`` (--quick divides N by 10).
"""

import argparse
import os
import random
import resource
import shutil
import sys
import tempfile
import time

from twisted.internet import defer, task

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from leapmail.mail.account import Account  # noqa: E402
from leapmail.mail.headers import filter_fields  # noqa: E402
from leapmail.mail.message import load_content, read_range  # noqa: E402
from leapmail.mail.schema import MAIL  # noqa: E402
from leapmail.store import Store  # noqa: E402

THUNDERBIRD_FIELDS = ["From", "To", "Cc", "Bcc", "Subject", "Date", "Message-ID", "Priority",
                      "X-Priority", "References", "Newsgroups", "In-Reply-To", "Content-Type",
                      "Reply-To"]
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()


def make_message(i, size, rng):
    words, length = [], 0
    while length < size:
        words.append(rng.choice(WORDS))
        length += len(words[-1]) + 1
    if i % 100 == 0:
        words.insert(len(words) // 2, "needleword")
    lines = [" ".join(words[j:j + 12]) for j in range(0, len(words), 12)]
    body = "\r\n".join(lines).encode()
    header = (
        f"From: Sender {i % 97} <sender{i % 97}@example.org>\r\n"
        f"To: user@example.net\r\nSubject: Message number {i} about {rng.choice(WORDS)}\r\n"
        f"Date: Mon, 4 Mar 2024 10:{i % 60:02d}:00 +0100\r\n"
        f"Message-ID: <{i}.{rng.randrange(10**9)}@example.org>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    ).encode()
    return header + body + b"\r\n"


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def import_messages(account, mailbox, messages, batch, in_flight=2):
    """Two batches in flight, as an importer would: one is parsed while one is written."""
    started = time.perf_counter()
    pending = []
    for i in range(0, len(messages), batch):
        pending.append(account.append_many(mailbox, [(m, (), None) for m in messages[i:i + batch]]))
        if len(pending) >= in_flight:
            await pending.pop(0)
    for d in pending:
        await d
    return time.perf_counter() - started


def header_job(q, metas):
    out = []
    for meta in metas:
        content = load_content(q, meta.content)
        start, end = content.section_range((), "HEADER")
        header = read_range(q, content, start, end)
        out.append((meta.uid, meta.size, meta.flags, filter_fields(header, THUNDERBIRD_FIELDS, True)))
    return out


async def header_fetch(account, view):
    started = time.perf_counter()
    total = 0
    for i in range(0, view.exists, 1000):
        metas = await view.meta(view.uids[i:i + 1000])
        total += len(await account.store.read(header_job, metas))
    return time.perf_counter() - started, total


async def timed_search(view, query, rounds=5):
    best, result = None, None
    for _ in range(rounds):
        started = time.perf_counter()
        result = await view.search(query)
        elapsed = time.perf_counter() - started
        best = elapsed if best is None else min(best, elapsed)
    return best, result


def dovecot_figures(messages):
    import dovecot

    dovecot.require_dovecot()
    box, conn = dovecot.open_mailbox(messages)
    try:
        fields = " ".join(THUNDERBIRD_FIELDS)
        started = time.perf_counter()
        typ, data = conn.uid("FETCH", "1:*", f"(UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS ({fields})])")
        fetch_time = time.perf_counter() - started
        assert typ == "OK"
        searches = {}
        for word in ("needleword", "nowherefound"):
            best = None
            for _ in range(3):
                started = time.perf_counter()
                typ, data = conn.search(None, "TEXT", word)
                elapsed = time.perf_counter() - started
                best = elapsed if best is None else min(best, elapsed)
            searches[word] = (best, len(data[0].split()))
        return fetch_time, searches
    finally:
        box.close()


async def main(reactor, args):
    scale = 10 if args.quick else 1
    n_import, n_big = 10_000 // scale, 100_000 // scale
    rng = random.Random(1)
    workdir = tempfile.mkdtemp(prefix="leapmail-bench-mail-")
    try:
        store = Store.open(os.path.join(workdir, "store.db"), os.urandom(32), [MAIL], create=True)
        account = Account(store, os.urandom(32))
        await account.setup()

        ten_kb = [make_message(i, 10_000, rng) for i in range(n_import)]
        megabytes = sum(map(len, ten_kb)) / 1e6
        await account.create_mailbox("import")
        elapsed = await import_messages(account, "import", ten_kb, 100)
        print(f"import, ~10 KB messages, 100 per transaction: {n_import} in {elapsed:.1f} s = "
              f"{n_import / elapsed:,.0f} msgs/s, {megabytes / elapsed:.1f} MB/s (target >= 1,000 msgs/s)")
        started = time.perf_counter()
        await account.text_indexer.flush()
        indexing = time.perf_counter() - started
        print(f"full-text indexing of those, after the import: {indexing:.1f} s = "
              f"{n_import / indexing:,.0f} msgs/s")
        del ten_kb

        small = [make_message(i, 1_500, rng) for i in range(n_big)]
        elapsed = await import_messages(account, "INBOX", small, 500)
        print(f"import, ~2 KB messages, 500 per transaction: {n_big} in {elapsed:.1f} s = "
              f"{n_big / elapsed:,.0f} msgs/s")
        started = time.perf_counter()
        await account.text_indexer.flush()
        elapsed = time.perf_counter() - started
        print(f"full-text indexing left after the imports: {elapsed:.1f} s")

        view = await account.select("INBOX")
        elapsed, count = await header_fetch(account, view)
        print(f"Thunderbird header set for {count} messages: {elapsed:.2f} s = {count / elapsed:,.0f} msgs/s")
        searches = {}
        for word in ("needleword", "nowherefound"):
            best, uids = await timed_search(view, ("text", word))
            searches[word] = (best, len(uids))
            print(f"SEARCH TEXT {word!r} over {view.exists} messages: {best * 1000:.1f} ms, "
                  f"{len(uids)} found (target < 100 ms)")
        print(f"peak RSS: {peak_rss_mib():.0f} MiB")
        view.close()
        account.close()
        await store.close()

        if not args.no_dovecot:
            d_fetch, d_searches = dovecot_figures(small)
            print(f"Dovecot header set for {n_big}: {d_fetch:.2f} s; ratio (dovecot / leapmail time): "
                  f"{d_fetch / elapsed:.2f}")
            for word, (best, found) in d_searches.items():
                ours = searches[word][0]
                print(f"Dovecot SEARCH TEXT {word!r}: {best * 1000:.1f} ms, {found} found; "
                      f"ratio (dovecot / leapmail time): {best / ours:.1f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-dovecot", action="store_true")
    arguments = parser.parse_args()
    task.react(lambda r: defer.ensureDeferred(main(r, arguments)))
