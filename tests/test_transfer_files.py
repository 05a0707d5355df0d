"""``leapmail import`` and ``leapmail export`` as real processes on real files.

Every round trip compares bytes: the exported mbox file with the imported one, each
Maildir and .eml file's bytes, flags (file names) and internal date (mtime).
"""

import os
import re
import subprocess
import sys
import time

import pytest

from leapmail_daemon import LeapmailDaemon
from mail_corpus import generated

BIN = os.path.dirname(sys.executable)
PASS = "a passphrase for tests"


def leapmail(*args, passphrase=PASS):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAPMAIL_")}
    env["LEAPMAIL_PASSPHRASE"] = passphrase
    return subprocess.run([os.path.join(BIN, "leapmail"), *args], capture_output=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=300)


def ok(result):
    assert result.returncode == 0, result.stderr.decode()
    assert b"Traceback" not in result.stderr
    return result


@pytest.fixture
def home(tmp_path):
    path = str(tmp_path / "acct")
    ok(leapmail("init", "--home", path, "--address", "me@example.org"))
    return path


def messages(count=40):
    """Generated messages (CRLF and LF) that end with a line end, plus the lines mbox
    must quote."""
    raws = [raw for _, raw in generated(count) if raw.endswith(b"\n")]
    raws += [
        b"From: a@example.org\nSubject: quoting\n\nFrom the start of a line\n"
        b">From already quoted\n>>From twice\nFrom\n",
        b"From: b@example.org\r\nSubject: crlf\r\n\r\nFrom here too\r\n\r\n",
        b"From: c@example.org\nSubject: blank lines at the end\n\nbody\n\n\n",
        b"From: a@example.org\nSubject: quoting\n\nFrom the start of a line\n"
        b">From already quoted\n>>From twice\nFrom\n",  # the same bytes again: two messages
    ]
    return raws


def from_line(date):
    return b"From MAILER-DAEMON " + time.strftime(
        "%a %b %d %H:%M:%S %Y", time.gmtime(date)).encode() + b"\n"


def mboxrd_file(raws, dates):
    out = []
    for raw, date in zip(raws, dates):
        body = re.sub(rb"(?m)^(>*From )", rb">\1", raw)
        out.append(from_line(date) + body + (b"\r\n" if body.endswith(b"\r\n") else b"\n"))
    return b"".join(out)


def imported(result):
    line = result.stdout.decode().splitlines()[-1]
    return int(re.match(r"import: (\d+) messages", line).group(1)), line


def test_mboxrd_round_trip_is_byte_identical_and_reimport_adds_nothing(home, tmp_path):
    raws = messages()
    dates = [1500000000 + 86400 * i for i in range(len(raws))]
    data = mboxrd_file(raws, dates)
    source = tmp_path / "in.mbox"
    source.write_bytes(data)
    count, _ = imported(ok(leapmail("--home", home, "import", str(source),
                                    "--mailbox", "Old/2017")))
    assert count == len(raws)
    out = tmp_path / "out.mbox"
    ok(leapmail("--home", home, "export", "--mailbox", "Old/2017", str(out)))
    assert out.read_bytes() == data
    # Again: nothing new, and the mailbox is the same.
    count, line = imported(ok(leapmail("--home", home, "import", str(source),
                                       "--mailbox", "Old/2017")))
    assert count == 0
    assert f"{len(raws)} were there before" in line
    ok(leapmail("--home", home, "export", "--mailbox", "Old/2017", str(out)))
    assert out.read_bytes() == data


def test_mboxo_round_trip_of_unambiguous_messages(home, tmp_path):
    # mboxo quotes only "From ": a body line ">From " would read back as "From ",
    # so the unambiguous messages are those without such a line.
    raws = [r for r in messages() if not re.search(rb"(?m)^>+From ", r)]
    raws.append(b"From: d@example.org\nSubject: o\n\nFrom one\n  From indented\nFrom two\n")
    dates = [1400000000 + 3600 * i for i in range(len(raws))]
    data = b"".join(
        from_line(d) + re.sub(rb"(?m)^From ", b">From ", r)
        + (b"\r\n" if r.endswith(b"\r\n") else b"\n") for r, d in zip(raws, dates))
    source = tmp_path / "in.mboxo"
    source.write_bytes(data)
    ok(leapmail("--home", home, "import", "--format", "mboxo", str(source), "--mailbox", "O"))
    out = tmp_path / "out.mboxo"
    ok(leapmail("--home", home, "export", "--format", "mboxo", "--mailbox", "O", str(out)))
    assert out.read_bytes() == data
    # The same mailbox as mboxrd: the quoting differs, the messages do not.
    ok(leapmail("--home", home, "export", "--format", "mboxrd", "--mailbox", "O",
                str(tmp_path / "out.mboxrd")))
    assert (tmp_path / "out.mboxrd").read_bytes() == mboxrd_file(raws, dates)


def test_mboxo_export_warns_about_the_ambiguous_line(home, tmp_path):
    raw = b"From: a@example.org\nSubject: x\n\n>From quoted in the original\n"
    (tmp_path / "in.mbox").write_bytes(mboxrd_file([raw], [1500000000]))
    ok(leapmail("--home", home, "import", str(tmp_path / "in.mbox"), "--mailbox", "A"))
    result = ok(leapmail("--home", home, "export", "--format", "mboxo", "--mailbox", "A",
                         str(tmp_path / "out")))
    assert b"warning: A UID 1: a line starts with '>From '" in result.stderr
    assert (tmp_path / "out").read_bytes() == from_line(1500000000) + raw + b"\n"


def write_maildir(root, folders):
    """``folders``: {folder dir name ("" for the root): [(raw, letters, mtime)]}."""
    for folder, entries in folders.items():
        directory = os.path.join(root, folder) if folder else root
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(directory, sub), exist_ok=True)
        for i, (raw, letters, mtime) in enumerate(entries):
            sub = "cur" if letters is not None else "new"
            name = f"{1600000000 + i}.M{i}P1.host" + (f":2,{letters}" if letters is not None
                                                        else "")
            path = os.path.join(directory, sub, name)
            with open(path, "wb") as f:
                f.write(raw)
            os.utime(path, (mtime, mtime))


def read_maildir(root):
    """{folder dir name: sorted [(raw, letters, mtime)]} of a Maildir++ tree."""
    found = {}
    folders = [""] + [d for d in os.listdir(root) if d.startswith(".")]
    for folder in folders:
        directory = os.path.join(root, folder) if folder else root
        entries = []
        for sub in ("cur", "new"):
            for name in os.listdir(os.path.join(directory, sub)):
                path = os.path.join(directory, sub, name)
                with open(path, "rb") as f:
                    raw = f.read()
                entries.append((raw, name.partition(":2,")[2], int(os.stat(path).st_mtime)))
        found[folder] = sorted(entries)
    return found


def test_maildir_round_trip_keeps_bytes_flags_dates_and_folders(home, tmp_path):
    raws = messages(30)
    letters = ["", "S", "FS", "RS", "DT", "P", "DFPRST"]
    tree = {
        "": [(r, letters[i % len(letters)], 1500000000 + i) for i, r in enumerate(raws[:12])],
        ".Archive": [(r, "S", 1400000000 + i) for i, r in enumerate(raws[12:20])],
        ".Archive.2019": [(r, "F", 1300000000 + i) for i, r in enumerate(raws[20:])],
        ".Caf&AOk-": [(raws[0], "S", 1200000000)],
    }
    source = tmp_path / "Maildir"
    write_maildir(str(source), tree)
    # A message in new/ (no info): no flags.
    write_maildir(str(tmp_path / "extra"), {"": [(raws[1], None, 1100000000)]})
    new_name = os.listdir(tmp_path / "extra" / "new")[0]
    os.rename(tmp_path / "extra" / "new" / new_name, source / "new" / new_name)
    tree[""].append((raws[1], "", 1100000000))
    count, _ = imported(ok(leapmail("--home", home, "import", str(source))))
    assert count == sum(len(v) for v in tree.values())
    out = tmp_path / "out"
    ok(leapmail("--home", home, "export", "--format", "maildir",
                "--mailbox", "INBOX", str(out / "inbox")))
    ok(leapmail("--home", home, "export", "--format", "maildir",
                "--mailbox", "Archive/2019", str(out / "a2019")))
    ok(leapmail("--home", home, "export", "--format", "maildir",
                "--mailbox", "Café", str(out / "cafe")))
    expected = {k: sorted(v) for k, v in tree.items()}
    assert read_maildir(str(out / "inbox")) == {"": expected[""]}
    assert read_maildir(str(out / "a2019")) == {"": expected[".Archive.2019"]}
    assert read_maildir(str(out / "cafe")) == {"": expected[".Caf&AOk-"]}
    # The whole account as one Maildir++ tree: the same folders come back, plus the
    # standard mailboxes (empty).
    ok(leapmail("--home", home, "export", "--format", "maildir", str(out / "all")))
    everything = read_maildir(str(out / "all"))
    assert {k: v for k, v in everything.items() if v} == expected
    assert set(everything) - set(expected) == {".Sent", ".Drafts", ".Trash", ".Junk"}
    # Re-import: nothing new; re-export into the same tree: nothing rewritten.
    count, _ = imported(ok(leapmail("--home", home, "import", str(source))))
    assert count == 0
    before = {p: os.stat(p).st_ino for p in _files(out / "all")}
    result = ok(leapmail("--home", home, "export", "--format", "maildir", str(out / "all")))
    assert result.stdout.decode().startswith("export: 0 messages")
    assert {p: os.stat(p).st_ino for p in _files(out / "all")} == before


def _files(root):
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def test_eml_round_trip(home, tmp_path):
    raws = messages(20)
    source = tmp_path / "eml"
    (source / "Projects" / "x").mkdir(parents=True)
    expected = {}
    for i, raw in enumerate(raws):
        folder = ["", "Projects", "Projects/x"][i % 3]
        path = source / folder / f"{i}.eml"
        path.write_bytes(raw)
        os.utime(path, (1500000000 + i, 1500000000 + i))
        expected.setdefault(folder or "INBOX", []).append((raw, 1500000000 + i))
    (source / "notes.txt").write_bytes(b"not a message")
    count, _ = imported(ok(leapmail("--home", home, "import", str(source))))
    assert count == len(raws)
    out = tmp_path / "out"
    ok(leapmail("--home", home, "export", "--format", "eml", str(out)))
    for mailbox, entries in expected.items():
        directory = out / mailbox
        got = sorted((p.read_bytes(), int(p.stat().st_mtime))
                     for p in directory.iterdir() if p.is_file())
        assert got == sorted(entries), mailbox
    # And back: importing the export adds nothing (same mailboxes, same bytes).
    count, _ = imported(ok(leapmail("--home", home, "import", str(out))))
    assert count == 0


def test_malformed_mbox_is_reported_and_the_good_messages_stay(home, tmp_path):
    good = [b"From: a@example.org\nSubject: one\n\nbody\n",
            b"From: a@example.org\nSubject: two\n\nbody\n"]
    data = (b"this is not an mbox separator\n\n"
            + mboxrd_file(good[:1], [1500000000])
            + b"From MAILER-DAEMON Sat Jul 15 02:40:00 2017\n"  # a message with no bytes
            + mboxrd_file(good[1:], [1500000001]))
    (tmp_path / "bad.mbox").write_bytes(data)
    result = leapmail("--home", home, "import", str(tmp_path / "bad.mbox"), "--mailbox", "B")
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr
    stderr = result.stderr.decode()
    assert f"{tmp_path}/bad.mbox: bytes 0-31: text before the first 'From ' line" in stderr
    assert "empty message; skipped" in stderr
    assert stderr.endswith("leapmail: 2 problems (see above); everything else was "
                           "imported\n")
    assert result.stdout.decode().startswith("import: 2 messages")
    ok(leapmail("--home", home, "export", "--mailbox", "B", str(tmp_path / "out")))
    assert (tmp_path / "out").read_bytes() == mboxrd_file(good, [1500000000, 1500000001])


def test_not_an_mbox_and_missing_input(home, tmp_path):
    (tmp_path / "text").write_bytes(b"hello\nworld\n")
    result = leapmail("--home", home, "import", str(tmp_path / "text"))
    assert result.returncode == 1
    assert result.stderr.decode().endswith(
        f"leapmail: {tmp_path}/text is not an mbox file: no line starts with 'From '\n")
    result = leapmail("--home", home, "import", str(tmp_path / "nothing"))
    assert (result.returncode, result.stderr) == (
        1, f"leapmail: {tmp_path}/nothing does not exist\n".encode())
    result = leapmail("--home", home, "export", "--mailbox", "Nope", str(tmp_path / "o"))
    assert (result.returncode, result.stderr.decode()) == (
        1, "leapmail: there is no mailbox 'Nope'\n")


def test_a_message_over_the_size_limit_is_skipped_not_fatal(home, tmp_path):
    from leapmail.mail.message import MAX_MESSAGE_SIZE

    source = tmp_path / "eml"
    source.mkdir()
    (source / "1.eml").write_bytes(b"From: a@example.org\nSubject: small\n\nbody\n")
    with open(source / "2.eml", "wb") as f:
        f.truncate(MAX_MESSAGE_SIZE + 1)  # sparse: no 64 MiB written
    result = leapmail("--home", home, "import", str(source))
    assert result.returncode == 1
    assert (f"{source}/2.eml: over the size limit of {MAX_MESSAGE_SIZE} bytes; skipped"
            in result.stderr.decode())
    assert result.stdout.decode().startswith("import: 1 messages")


def test_import_refuses_while_the_daemon_runs(tmp_path):
    daemon = LeapmailDaemon(str(tmp_path / "acct"), passphrase=PASS)
    (tmp_path / "one.eml").parent.mkdir(exist_ok=True)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "1.eml").write_bytes(b"Subject: x\n\nbody\n")
    with daemon:
        for args in (["import", str(tmp_path / "in")],
                     ["export", str(tmp_path / "out")],
                     ["fetch", "--insecure", "imap://u@127.0.0.1:1/"]):
            result = subprocess.run(
                [os.path.join(BIN, "leapmail"), "--home", daemon.home, *args],
                capture_output=True, stdin=subprocess.DEVNULL, timeout=120,
                env=dict(os.environ, LEAPMAIL_PASSPHRASE=PASS,
                         LEAPMAIL_FETCH_PASSWORD="pw"))
            assert result.returncode == 1, result
            assert result.stderr.decode() == (
                f"leapmail: the daemon (pid {daemon.pid}) has the store open; stop it "
                f"first ({args[0]} needs the store to itself)\n")
            assert result.stdout == b""


# -- the formats, bytes in and out -------------------------------------------------------

def test_from_line_dates_and_status_flags():
    from leapmail.transfer.formats import from_line_date, status_flags

    assert from_line_date(b"From a@b Sat Jul 15 02:40:00 2017\n") == 1500086400
    assert from_line_date(b"From a@b  Mon Jan  1 00:00:00 2024\n") == 1704067200
    assert from_line_date(b"From a@b Mon Jan  1 00:00:00 2024 +0000\n") == 1704067200
    assert from_line_date(b"From a@b yesterday\n") is None
    assert status_flags(b"Subject: x\nStatus: RO\nX-Status: AF") == (
        "\\Seen", "\\Answered", "\\Flagged")
    assert status_flags(b"Subject: x\nStatus: O\n") == ()


def test_maildir_names_and_flags():
    from leapmail.transfer.formats import maildir_info, maildir_letters

    assert maildir_info("1.M2P3.host:2,DFPRST") == (
        "\\Draft", "\\Flagged", "$Forwarded", "\\Answered", "\\Seen", "\\Deleted")
    assert maildir_info("1.M2P3.host:2,Sab") == ("\\Seen",)
    assert maildir_info("1.M2P3.host") == ()
    assert maildir_letters(["\\Seen", "\\flagged", "$Forwarded", "custom"]) == "FPS"


def test_mbox_reader_bounds_a_message_and_keeps_line_ends(tmp_path):
    from leapmail.transfer.formats import Message, Problem, read_mbox

    data = (b"From x Mon Jan  1 00:00:00 2024\r\nSubject: a\r\n\r\nbody\r\n\r\n"
            b"From x Mon Jan  1 00:00:01 2024\nSubject: big\n\n" + b"z" * 5000 + b"\n\n"
            b"From x Mon Jan  1 00:00:02 2024\nSubject: c\n\nno line end at the end")
    (tmp_path / "m").write_bytes(data)
    got = list(read_mbox(str(tmp_path / "m"), max_size=1000))
    assert [type(g) for g in got] == [Message, Problem, Message]
    assert got[0].raw == b"Subject: a\r\n\r\nbody\r\n"
    assert got[0].date == 1704067200
    assert got[1].reason == "over the size limit of 1000 bytes"
    assert got[2].raw == b"Subject: c\n\nno line end at the end"


def test_progress_bar_on_a_terminal_counts_bytes_and_messages():
    import io

    from leapmail.transfer.progress import Progress

    out = io.StringIO()
    progress = Progress("import", total_bytes=2000, stream=out, bar=True)
    progress.advance(messages=3, nbytes=1000, consumed=1000)
    progress.close()
    text = out.getvalue()
    assert "import:  50%" in text
    # Bytes of the total, the time left, and the message count.
    assert re.search(r"\| 1\.00k/2\.00k \[00:00<00:00, [0-9.]+[kMG]?B/s, 3 messages, 3 new "
                     r"\(1\.0 kB\)\]", text), text


def test_interrupted_imports_resume_without_duplicates(home, tmp_path):
    import signal

    rng_raws = [raw for _, raw in generated(120) if raw.endswith(b"\n")]
    raws = [b"X-Copy: %d\r\n" % i + rng_raws[i % len(rng_raws)] for i in range(3000)]
    dates = [1500000000 + 60 * i for i in range(len(raws))]
    data = mboxrd_file(raws, dates)
    (tmp_path / "big.mbox").write_bytes(data)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEAPMAIL_")}
    env["LEAPMAIL_PASSPHRASE"] = PASS
    done = []
    for how, status in ((signal.SIGINT, 130), (signal.SIGKILL, -9)):
        process = subprocess.Popen(
            [os.path.join(BIN, "leapmail"), "--home", home, "import", str(tmp_path / "big.mbox"),
             "--mailbox", "Big"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, env=env)
        first = process.stderr.readline()  # one line per batch: a batch is in
        assert first.startswith(b"import Big: "), first
        process.send_signal(how)
        assert process.wait(timeout=60) == status
        rest = process.stderr.read()
        process.stderr.close()
        process.stdout.close()
        if how == signal.SIGINT:
            assert rest.endswith(b"leapmail: interrupted\n"), rest
        assert b"Traceback" not in rest
        done.append(first)
    result = ok(leapmail("--home", home, "import", str(tmp_path / "big.mbox"),
                         "--mailbox", "Big"))
    count, line = imported(result)
    assert 0 < count < len(raws), line
    assert f"{len(raws) - count} were there before" in line
    ok(leapmail("--home", home, "export", "--mailbox", "Big", str(tmp_path / "out")))
    assert (tmp_path / "out").read_bytes() == data


def test_maildir_export_reports_a_name_maildir_cannot_hold(home, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "1.eml").write_bytes(b"Subject: x\n\nbody\n")
    ok(leapmail("--home", home, "import", str(tmp_path / "in"), "--mailbox", "v1.2"))
    ok(leapmail("--home", home, "import", str(tmp_path / "in"), "--mailbox", "Work"))
    result = leapmail("--home", home, "export", "--format", "maildir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.decode().endswith(
        "export: v1.2: the mailbox level 'v1.2' holds a '.', which Maildir++ uses as its "
        "hierarchy separator; not exported\n"
        "leapmail: 1 problem (see above); everything else was exported\n")
    assert read_maildir(str(tmp_path / "out"))[".Work"] == [
        (b"Subject: x\n\nbody\n", "", int((tmp_path / "in" / "1.eml").stat().st_mtime))]
