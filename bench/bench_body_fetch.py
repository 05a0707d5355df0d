"""``BODY.PEEK[]`` of 300 messages against the leapmail daemon alone, many times.

What ``bench_imap.py`` measures in one shot (step 3 of its session), repeated on a
mailbox loaded once, so that a change to the body path can be timed in seconds
instead of minutes.  Each round picks another 300 UIDs spread over the mailbox (the
store's page cache is not warm for them, as in the session) and checks the bytes.

The VM this runs on is noisy, so variants are best compared side by side:
``--variant NAME=VAR=VALUE,...`` runs one more daemon, on its own copy of the home,
with those environment variables (``PYTHONPATH=/some/worktree`` runs other code), and
the rounds alternate between the daemons so that a busy moment hits all of them.

``--cache cold`` drops the store's files (database, log, read cache) from the OS page
cache before each round, ``--cache warm`` reads them all in: the two ends of what a
round may meet (the default leaves it to the kernel).

Usage: ``.venv/bin/python bench/bench_body_fetch.py [--messages N] [--rounds R]
[--home DIR] [--cache as-is|cold|warm] [--variant NAME=VAR=VALUE,...]...
[--profile OUT [--native] [--gil]]``.
The home is built once and kept (delete it after a change of the stored format);
``--profile`` runs perf (``OUT.perf``) or py-spy (``.txt``: raw stacks, else an SVG)
on the (first) daemon during the rounds.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

import imap_workload as workload  # noqa: E402
from leapmail_daemon import LeapmailDaemon  # noqa: E402

PASSPHRASE = "leapmail-bench"


class Variant:
    def __init__(self, name, home, env):
        self.name, self.home, self.env = name, home, env
        self.daemon = LeapmailDaemon(home, passphrase=PASSPHRASE)
        self.rates, self.cpus = [], []
        self.conn = self.uids = None

    def start(self):
        saved = dict(os.environ)
        os.environ.update(self.env)  # LeapmailDaemon passes its own environment on
        try:
            self.daemon.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        d = self.daemon
        self.conn = workload._login(d.host, d.port, d.user, d.password)
        self.conn.select("INBOX")
        _, _, _, kept = workload.raw_command(self.conn, "UID SEARCH ALL", keep=True)
        self.uids = sorted(int(x) for line in kept if line.upper().startswith(b"* SEARCH")
                           for x in line[8:].split())

    def round(self, r, count, appended):
        uids, n = self.uids, len(self.uids)
        k = min(count, n)
        picked = sorted({uids[(j * n // k + r * 7) % n] for j in range(k)})
        uid_set = ",".join(map(str, picked))
        cpu = _cpu_seconds(self.daemon.pid)
        seconds, (_, _, size, kept) = workload._timed(
            lambda: workload.raw_command(self.conn, f"UID FETCH {uid_set} (UID BODY.PEEK[])",
                                         keep=True))
        self.cpus.append((_cpu_seconds(self.daemon.pid) - cpu) * 1000)
        self.rates.append(size / 1e6 / seconds)
        if len(kept) != len(picked):
            raise SystemExit(f"{self.name}: {len(kept)} responses for {len(picked)} UIDs")
        for line in kept:
            if workload._first_literal(line) not in appended:
                raise SystemExit(f"{self.name}: BODY[] differs from what was appended: "
                                 f"{line[:40]!r}")

    def stop(self):
        if self.conn is not None:
            try:
                self.conn.logout()
            except Exception:
                pass
        self.daemon.stop()

    def report(self, k):
        rates = sorted(self.rates)
        return (f"{self.name:12} BODY[]x{k}: median {statistics.median(rates):6.1f} MB/s, "
                f"best {rates[-1]:6.1f}, worst {rates[0]:6.1f} ({len(rates)} rounds); "
                f"daemon CPU {statistics.mean(self.cpus):.1f} ms a round")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--count", type=int, default=workload.BODY_FETCH_COUNT)
    parser.add_argument("--home", default=os.path.join(ROOT, "build", "bench-body", "home"))
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=VAR=VALUE,VAR=VALUE: another daemon with this environment")
    parser.add_argument("--profile", metavar="OUT",
                        help="profile the (first) daemon into OUT: perf if OUT ends in .perf, "
                        "else py-spy (raw stacks if .txt, else an SVG)")
    parser.add_argument("--rate", default="1000", help="py-spy samples a second")
    parser.add_argument("--native", action="store_true", help="py-spy: with C frames")
    parser.add_argument("--gil", action="store_true",
                        help="py-spy: only the thread holding the GIL")
    parser.add_argument("--cache", choices=("as-is", "cold", "warm"), default="as-is",
                        help="before each round, drop the store from the OS page cache "
                        "(cold) or read it all in (warm); as-is: leave it to the kernel")
    args = parser.parse_args()

    if not os.path.exists(os.path.join(args.home, "store.db")):
        shutil.rmtree(args.home, ignore_errors=True)
        os.makedirs(os.path.dirname(args.home), exist_ok=True)
        LeapmailDaemon(args.home, passphrase=PASSPHRASE).init()
        subprocess.run([sys.executable, os.path.join(HERE, "bench_imap.py"), "--bulk-load",
                        args.home, "--rss-messages", str(args.messages)], check=True,
                       env=dict(os.environ, LEAPMAIL_PASSPHRASE=PASSPHRASE))
    variants = [Variant("base", args.home, {})]
    for spec in args.variant:
        name, _, assignments = spec.partition("=")
        env = dict(a.split("=", 1) for a in assignments.split(",") if a)
        home = f"{args.home}-{name}"
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(args.home, home)
        variants.append(Variant(name, home, env))
    # Bulk loading may give UIDs in another order than the messages': check membership.
    appended = {raw for raw, _, _ in workload.messages(args.messages)}
    spy = None
    try:
        for v in variants:
            v.start()
        if args.profile:
            spy = _profiler(args, variants[0].daemon.pid)
            time.sleep(1.0)
        for r in range(args.rounds):
            # Alternate which variant goes first, too.
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                _set_cache(v.home, args.cache)
                v.round(r, args.count, appended)
    finally:
        if spy is not None:
            spy.send_signal(2)
            spy.wait()
        for v in variants:
            v.stop()
    for v in variants:
        print(v.report(min(args.count, args.messages)))


def _profiler(args, pid):
    if args.profile.endswith(".perf"):
        command = ["perf", "record", "-F", "4000", "-g", "-o", args.profile, "-p", str(pid)]
    else:
        command = [os.path.join(ROOT, ".venv", "bin", "py-spy"), "record", "-o", args.profile,
                   "--pid", str(pid), "--threads", "--rate", args.rate]
        command += ["--native"] * args.native + ["--gil"] * args.gil
        command += ["--format", "raw"] if args.profile.endswith(".txt") else []
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _set_cache(home, state):
    """Put the store's files in the OS page cache (warm) or out of it (cold)."""
    if state == "as-is":
        return
    for name in ("store.db", "store.db-wal", "store.cache"):
        path = os.path.join(home, name)
        if not os.path.exists(path):
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            if state == "cold":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 1 << 20):
                    pass
        finally:
            os.close(fd)


def _cpu_seconds(pid):
    """User + system CPU time of a process so far (in clock ticks of 10 ms)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
