"""A Thunderbird-like IMAP session, timed, against any server: the messages and the client.

:func:`messages` makes the mailbox (seeded: the same bytes every run), and
:func:`run_workload` drives one server through what a mail client does with it, over
``imaplib`` connections, and returns the figures.  Nothing here knows which server it
talks to; ``bench_imap.py`` runs it against Dovecot and leapmail and compares.

Large responses are read by :func:`raw_command`, not by ``imaplib``'s own parser,
which spends more time per FETCH line than Dovecot does: timed with it, every server
would look the same.
"""

import base64
import calendar
import imaplib
import random
import socket
import statistics
import time

THUNDERBIRD_FIELDS = ("From To Cc Bcc Subject Date Message-ID Priority X-Priority References "
                      "Newsgroups In-Reply-To Content-Type Reply-To")
HEADER_FETCH = f"UID FETCH 1:* (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS ({THUNDERBIRD_FIELDS})])"
#: In the text of about 1% of the messages (one in a hundred), and nowhere else.
NEEDLE = "quetzalcoatl"
#: The sender that SEARCH FROM looks for (about 2% of the messages).
SOMEONE = ("Vera Okonkwo", "vera.okonkwo@example.com")
BODY_FETCH_COUNT = 300
#: Rounds of the body FETCH, each over other UIDs; the median round is the figure.
BODY_FETCH_ROUNDS = 5
IDLE_ROUNDS = 20
IDLE_DEADLINE = 10.0
CRLF = b"\r\n"

FIRST = ("Anna Ben Carla David Elena Farid Greta Hugo Ines Jonas Kiri Lars Mina Noah Olga "
         "Pavel Quinn Rosa Sven Tara Umar Vik Wanda Xavier Yuki Zoe Amir Bea Chen Dora").split()
LAST = ("Schmidt Rossi Dubois Novak Garcia Kowalski Jensen Silva Tanaka Murphy Berg Costa "
        "Fischer Moreau Ivanova Haddad Lindqvist Okafor Russo Weber Nakamura Petrov").split()
DOMAINS = ("example.com example.org example.net mail.example.de lists.example.org "
           "corp.example company.example uni.example.edu").split()
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when "
    "if so no will can more about said up out them some could into what then two time "
    "only new like other over after also first these any may most well where much through "
    "meeting report budget schedule project review draft release server client update "
    "patch build deploy ticket invoice contract proposal agenda minutes summary follow "
    "question answer thanks regards please attached document version change request "
    "customer support order delivery payment account password security notice reminder "
    "conference travel hotel flight booking lunch dinner weekend holiday office remote "
    "team manager quarter figures numbers results analysis design feature issue bug fix"
).split()
SUBJECT_TOPICS = ("quarterly report", "meeting notes", "release plan", "budget review",
                  "server migration", "travel booking", "contract draft", "team lunch",
                  "security notice", "invoice", "conference talk", "holiday schedule",
                  "design review", "bug triage", "customer feedback", "build failures")
UTF8_SUBJECTS = ("=?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?=", "=?UTF-8?Q?R=C3=A9sum=C3=A9_du_projet?=",
                 "=?UTF-8?B?5Lya6K2w44Gu6K2w5LqL6Yyy?=")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
#: Internal dates run from here over two years, in message order.
START = calendar.timegm((2023, 1, 2, 8, 0, 0))
SPAN = 2 * 365 * 86400


def rfc2822_date(t):
    tm = time.gmtime(t)
    return (f"{DAYS[tm.tm_wday]}, {tm.tm_mday} {MONTHS[tm.tm_mon - 1]} {tm.tm_year} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} +0000")


def imap_date(t):
    tm = time.gmtime(t)
    return f"{tm.tm_mday}-{MONTHS[tm.tm_mon - 1]}-{tm.tm_year}"


class Generator:
    """Realistic mail, 3-10 KB each: plain, alternative and mixed with an attachment,
    threads (In-Reply-To, References), lists, encoded subjects, Received chains.

    Bodies are drawn from a pool of paragraphs made once, so that 100,000 messages
    take seconds, not minutes.
    """

    def __init__(self, seed=1):
        self.r = random.Random(seed)
        r = self.r
        self.people = [(f"{r.choice(FIRST)} {r.choice(LAST)}", None) for _ in range(300)]
        self.people = [(name, f"{name.lower().replace(' ', '.')}.{k}@{r.choice(DOMAINS)}")
                       for k, (name, _) in enumerate(self.people)]
        self.paragraphs = []
        for _ in range(800):
            words = [r.choice(WORDS) for _ in range(r.randrange(40, 120))]
            words[0] = words[0].capitalize()
            lines, line = [], []
            for w in words:
                line.append(w)
                if sum(map(len, line)) + len(line) > 66:
                    lines.append(" ".join(line))
                    line = []
            if line:
                lines.append(" ".join(line) + ".")
            self.paragraphs.append("\r\n".join(lines).encode())
        self.message_ids = []

    def _address(self, person):
        name, addr = person
        return f"{name} <{addr}>"

    def _text(self, size, needle):
        r = self.r
        out, length = [], 0
        while length < size:
            p = r.choice(self.paragraphs)
            out.append(p)
            length += len(p) + 4
        if needle:
            out.insert(r.randrange(len(out) + 1),
                       f"Remember the {NEEDLE} codeword for the next call.".encode())
        return (CRLF + CRLF).join(out) + CRLF

    def message(self, i, n_total):
        """Message number ``i`` (0-based) of ``n_total``: ``(raw, flags, internal_date)``."""
        r = self.r
        date = START + (i * SPAN) // max(n_total, 1) + r.randrange(3600)
        sender = SOMEONE if i % 50 == 7 else r.choice(self.people)
        needle = i % 100 == 42
        msg_id = f"<{i}.{r.getrandbits(48):x}@{sender[1].split('@')[1]}>"
        headers = []
        for hop in range(r.randrange(1, 4)):
            headers.append(f"Received: from mx{hop}.example.net (mx{hop}.example.net "
                           f"[192.0.2.{hop + 10}])\r\n\tby mail.example.org with ESMTPS id "
                           f"{r.getrandbits(40):x};\r\n\t{rfc2822_date(date - hop * 3)}")
        headers.append(f"Return-Path: <{sender[1]}>")
        if r.random() < 0.4:
            sig = base64.b64encode(r.randbytes(128)).decode()
            headers.append("DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com;"
                           "\r\n\ts=sel; h=from:to:subject:date;\r\n\tb=" + sig[:70] +
                           "\r\n\t " + sig[70:])
        headers.append("From: " + self._address(sender))
        to = [self._address(r.choice(self.people)) for _ in range(r.randrange(1, 4))]
        headers.append("To: " + ",\r\n ".join(to))
        if r.random() < 0.25:
            headers.append("Cc: " + self._address(r.choice(self.people)))
        topic = r.choice(SUBJECT_TOPICS)
        if r.random() < 0.1:
            subject = f"{r.choice(UTF8_SUBJECTS)} {i}"
        elif self.message_ids and r.random() < 0.3:
            subject = f"Re: {topic} #{i % 97}"
        else:
            subject = f"{topic.capitalize()} #{i % 97}"
        headers.append("Subject: " + subject)
        headers.append("Date: " + rfc2822_date(date))
        headers.append("Message-ID: " + msg_id)
        if subject.startswith("Re:"):
            parents = r.sample(self.message_ids[-200:], min(len(self.message_ids[-200:]),
                                                             r.randrange(1, 4)))
            headers.append("In-Reply-To: " + parents[-1])
            headers.append("References: " + "\r\n ".join(parents))
        self.message_ids.append(msg_id)
        if r.random() < 0.15:
            headers.append(f"List-Id: Team discussion <team{r.randrange(5)}.lists.example.org>")
            headers.append("List-Unsubscribe: <mailto:leave@lists.example.org>")
        if r.random() < 0.05:
            headers.append("X-Priority: 1 (Highest)")
        headers.append(r.choice(["User-Agent: Mozilla Thunderbird", "X-Mailer: Apple Mail (2.3731)",
                                 "User-Agent: Mutt/2.2.9", "X-Mailer: Microsoft Outlook 16.0"]))
        headers.append("MIME-Version: 1.0")
        size = r.randrange(3000, 10000)
        kind = r.random()
        if kind < 0.6:
            headers.append("Content-Type: text/plain; charset=utf-8; format=flowed")
            headers.append("Content-Transfer-Encoding: 7bit")
            body = self._text(size - 1200, needle)
        else:
            boundary = f"----=_Part_{i}_{r.getrandbits(32)}"
            text = self._text((size - 1200) // 2, needle)
            if kind < 0.85:
                headers.append(f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"')
                html = (b"<html><body><p>" + text.replace(CRLF + CRLF, b"</p>\r\n<p>") +
                        b"</p></body></html>\r\n")
                second = (b"Content-Type: text/html; charset=utf-8\r\n"
                          b"Content-Transfer-Encoding: 7bit\r\n\r\n" + html)
            else:
                headers.append(f'Content-Type: multipart/mixed;\r\n boundary="{boundary}"')
                blob = r.randbytes(max(size - 1200 - len(text), 600) * 3 // 4)
                name = f"report-{i}.pdf"
                second = (f'Content-Type: application/pdf; name="{name}"\r\n'
                          f'Content-Disposition: attachment; filename="{name}"\r\n'
                          "Content-Transfer-Encoding: base64\r\n\r\n").encode() + \
                    base64.encodebytes(blob).replace(b"\n", CRLF)
            b = boundary.encode()
            body = (b"This is a multi-part message in MIME format.\r\n--" + b + CRLF +
                    b"Content-Type: text/plain; charset=utf-8\r\n"
                    b"Content-Transfer-Encoding: 7bit\r\n\r\n" + text + b"--" + b + CRLF +
                    second + b"--" + b + b"--" + CRLF)
        raw = CRLF.join(h.encode() for h in headers) + CRLF + CRLF + body
        flags = []
        if r.random() < 0.8:
            flags.append("\\Seen")
        if r.random() < 0.03:
            flags.append("\\Flagged")
        if r.random() < 0.1:
            flags.append("$Label1")
        return raw, tuple(flags), date


def messages(n, seed=1):
    """The first ``n`` messages of the seeded mailbox, as ``[(raw, flags, date)]``."""
    g = Generator(seed)
    return [g.message(i, n) for i in range(n)]


def iter_messages(n, seed=1):
    g = Generator(seed)
    for i in range(n):
        yield g.message(i, n)


def expected(msgs):
    """What the searches must find: counts from the generator's own records."""
    text = sum(1 for raw, _, _ in msgs if NEEDLE.encode() in raw)
    sender = sum(1 for raw, _, _ in msgs if b"From: " + SOMEONE[0].encode() in raw)
    return {"text": text, "from": sender}


# -- the client ------------------------------------------------------------------------


class ImapFailure(Exception):
    pass


def raw_command(conn, command, keep=False):
    """Send ``command`` on an imaplib connection and read to its tagged response.

    Returns ``(status_line, untagged_count, literal_bytes, [responses if keep])``;
    each kept response is its raw bytes, literals inline, without the final CRLF.
    Reads the socket in large chunks and scans with ``bytes.find``.
    """
    if isinstance(command, str):
        command = command.encode()
    tag = conn._new_tag()
    conn.send(tag + b" " + command + CRLF)
    f = conn.file
    tag_prefix = tag + b" "
    buf, start, pos = b"", 0, 0
    count = literal_bytes = 0
    kept = []
    while True:
        eol = buf.find(CRLF, pos)
        if eol < 0:
            chunk = f.read1(1 << 18)
            if not chunk:
                raise ImapFailure(f"connection closed during {command[:60]!r}")
            buf = buf[start:] + chunk
            pos -= start
            start = 0
            continue
        if eol > pos and buf[eol - 1] == 0x7D:     # "}": a literal follows
            brace = buf.rfind(b"{", pos, eol)
            digits = buf[brace + 1:eol - 1].rstrip(b"+") if brace >= 0 else b""
            if digits.isdigit():
                n = int(digits)
                end = eol + 2 + n
                if len(buf) < end:
                    buf += f.read(end - len(buf))
                    if len(buf) < end:
                        raise ImapFailure("connection closed in a literal")
                literal_bytes += n
                pos = end
                continue
        response = buf[start:eol]
        pos = start = eol + 2
        if response.startswith(tag_prefix):
            if not response[len(tag_prefix):].startswith(b"OK"):
                raise ImapFailure(f"{command[:80]!r} failed: {response!r}")
            return response, count, literal_bytes, kept
        count += 1
        if keep:
            kept.append(response)


def _first_literal(response):
    brace = response.index(b"{")
    close = response.index(b"}", brace)
    n = int(response[brace + 1:close])
    return response[close + 3:close + 3 + n]


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def _search(conn, criteria, rounds=3):
    """(first run, best run) in seconds, and the matching sequence numbers."""
    times, found = [], None
    for _ in range(rounds):
        elapsed, (_status, _n, _b, kept) = _timed(
            lambda: raw_command(conn, "SEARCH " + criteria, keep=True))
        times.append(elapsed)
        numbers = []
        for line in kept:
            if line.upper().startswith(b"* SEARCH"):
                numbers += [int(x) for x in line[8:].split()]
        found = numbers
    return times[0], min(times), found


def _login(host, port, user, password, nodelay=True):
    conn = imaplib.IMAP4(host, port)
    if nodelay:
        # imaplib sends an APPEND literal and the CRLF that ends the command in two
        # writes; with Nagle on, the second waits for the server's delayed ACK (up to
        # 40 ms on Linux) and the figure measures that, not the server.  Clients that
        # care about latency set TCP_NODELAY; --client-nagle in bench_imap.py shows
        # what a server does for the ones that do not.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    typ, data = conn.login(user, password)
    if typ != "OK":
        raise ImapFailure(f"LOGIN failed: {data!r}")
    return conn


def _idle_round(a, b, message):
    """One push: B idles, A appends; seconds from A's tagged OK to B's EXISTS."""
    tag = b._new_tag()
    b.send(tag + b" IDLE" + CRLF)
    b.sock.settimeout(IDLE_DEADLINE)
    line = b.readline()
    if not line.startswith(b"+"):
        raise ImapFailure(f"IDLE refused: {line!r}")
    raw, flags, date = message
    typ, data = a.append("INBOX", None, None, raw)
    appended = time.perf_counter()
    if typ != "OK":
        raise ImapFailure(f"APPEND failed: {data!r}")
    # Read on this thread after the OK: an EXISTS that came earlier is already in the
    # socket buffer and reads at once (latency ~0, correctly: it was not late).
    deadline = appended + IDLE_DEADLINE
    while True:
        b.sock.settimeout(max(deadline - time.perf_counter(), 0.001))
        line = b.readline()
        if not line:
            raise ImapFailure("IDLE connection closed")
        if line.startswith(b"* ") and line.rstrip().upper().endswith(b" EXISTS"):
            latency = time.perf_counter() - appended
            break
    b.sock.settimeout(IDLE_DEADLINE)
    b.send(b"DONE" + CRLF)
    while True:
        line = b.readline()
        if not line:
            raise ImapFailure("IDLE connection closed after DONE")
        if line.startswith(tag + b" "):
            if not line[len(tag) + 1:].startswith(b"OK"):
                raise ImapFailure(f"IDLE ended with {line!r}")
            break
    b.sock.settimeout(None)
    return latency


def run_workload(host, port, user, password, msgs, peak_rss=None, log=print, seed=1,
                 nodelay=True):
    """Run the whole session on a fresh INBOX holding nothing; return the figures.

    ``msgs`` is what :func:`messages` returns; ``peak_rss()`` (bytes) is called at the
    end with both connections open and INBOX selected.  ``nodelay``: the client sets
    TCP_NODELAY (see :func:`_login`).
    """
    n = len(msgs)
    fig = {"messages": n}
    a = _login(host, port, user, password, nodelay)
    b = None
    try:
        # APPEND, one by one as a client's "copy to folder" or an importer does it.
        # Not selected yet: a selected connection would be told of every new message.
        started = time.perf_counter()
        for raw, flags, date in msgs:
            typ, data = a.append("INBOX", "(" + " ".join(flags) + ")",
                                 imaplib.Time2Internaldate(date), raw)
            if typ != "OK":
                raise ImapFailure(f"APPEND failed: {data!r}")
        fig["append_s"] = time.perf_counter() - started
        fig["append_mb"] = sum(len(m[0]) for m in msgs) / 1e6
        log(f"  APPEND {n}: {fig['append_s']:.1f} s")

        typ, data = a.select("INBOX")
        if typ != "OK" or int(data[0]) != n:
            raise ImapFailure(f"SELECT INBOX: {typ} {data!r}, expected {n} messages")

        fig["header_s"], (_, count, fig["header_bytes"], _) = _timed(
            lambda: raw_command(a, HEADER_FETCH))
        if count != n:
            raise ImapFailure(f"header FETCH gave {count} responses for {n} messages")
        fig["flags_s"], (_, count, _, _) = _timed(lambda: raw_command(a, "UID FETCH 1:* (FLAGS)"))
        if count != n:
            raise ImapFailure(f"FLAGS FETCH gave {count} responses for {n} messages")

        _, _, _, kept = raw_command(a, "UID SEARCH ALL", keep=True)
        uids = sorted(int(x) for line in kept if line.upper().startswith(b"* SEARCH")
                      for x in line[8:].split())
        if len(uids) != n:
            raise ImapFailure(f"UID SEARCH ALL gave {len(uids)} UIDs for {n} messages")
        k = min(BODY_FETCH_COUNT, n)
        fig["body_count"] = k
        rounds = []
        for r in range(BODY_FETCH_ROUNDS):
            # Another spread of UIDs each round: no round reads what an earlier one read.
            picked = sorted({uids[(j * n // k + r * 7) % n] for j in range(k)})
            uid_set = ",".join(map(str, picked))
            took, (_, _, size, kept) = _timed(
                lambda: raw_command(a, f"UID FETCH {uid_set} (UID BODY.PEEK[])", keep=True))
            rounds.append((took, size))
            # After the clock: the bytes must be the ones appended, or the rate means nothing.
            by_uid = {}
            for line in kept:
                head = line[:line.index(b"{")].upper()
                uid = int(head.split(b"UID ", 1)[1].split()[0])
                by_uid[uid] = _first_literal(line)
            for uid in picked:
                if by_uid.get(uid) != msgs[uids.index(uid)][0]:
                    raise ImapFailure(f"BODY[] of UID {uid} differs from what was appended")
        log("  BODY[] rounds: " + ", ".join(f"{size / 1e6 / took:.0f}" for took, size in rounds)
            + " MB/s")
        fig["body_s"], fig["body_bytes"] = sorted(rounds)[len(rounds) // 2]

        want = expected(msgs)
        newest = msgs[-1][2]
        since = imap_date(newest - 60 * 86400)
        searches = {
            "text": f"TEXT {NEEDLE}",
            "from": f'FROM "{SOMEONE[0].split()[1]}"',
            "unseen_since": f"UNSEEN SINCE {since}",
        }
        for key, criteria in searches.items():
            first, best, found = _search(a, criteria)
            fig[f"search_{key}_first_s"], fig[f"search_{key}_s"] = first, best
            fig[f"search_{key}_found"] = len(found)
            if key in want and len(found) != want[key]:
                raise ImapFailure(f"SEARCH {criteria} found {len(found)}, expected {want[key]}")
        fig["search_criteria"] = searches

        fig["store_s"], (_, fig["store_responses"], _, _) = _timed(
            lambda: raw_command(a, "STORE 1:* +FLAGS (\\Seen)"))

        b = _login(host, port, user, password, nodelay)
        typ, data = b.select("INBOX")
        if typ != "OK":
            raise ImapFailure(f"SELECT on the IDLE connection: {data!r}")
        g = Generator(seed + 1)
        latencies = []
        for i in range(IDLE_ROUNDS):
            latencies.append(_idle_round(a, b, g.message(i, IDLE_ROUNDS)))
        fig["idle_median_s"] = statistics.median(latencies)
        fig["idle_max_s"] = max(latencies)
        fig["idle_all_s"] = latencies

        if peak_rss is not None:
            fig["rss_bytes"] = peak_rss()
    finally:
        for conn in (b, a):
            if conn is not None:
                try:
                    conn.logout()
                except Exception:
                    pass
    return fig
