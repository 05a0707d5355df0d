#!/usr/bin/env python3
"""Run Dovecot imaptest's scripted IMAP compliance tests against an IMAP server.

imaptest itself is C and needs Dovecot's source tree to build; its test *scripts*
are plain text, and this runner reads them the way imaptest does (``src/test-parser.c``
and ``src/test-exec.c`` of https://github.com/dovecot/imaptest).  The scripts and their
``.mbox`` files are imaptest's, not ours: download ``src/tests/`` of that repository
into a directory of your own (for example ``/tmp/imaptest-scripts/``) and point
``--scripts`` at it.  Nothing of theirs is kept in this repository.

Usage::

    # start a throw-away leapmail daemon (tests/leapmail_daemon.py) and run every script
    .venv/bin/python tools/imaptest_runner.py --scripts /tmp/imaptest-scripts --start leapmail

    # the same scripts against a throw-away Dovecot, to check a script (or this runner)
    .venv/bin/python tools/imaptest_runner.py --scripts /tmp/imaptest-scripts --start dovecot

    # a server that is already running, two scripts only
    tools/imaptest_runner.py --scripts DIR --host 127.0.0.1 --port 1984 \\
        --user USER --password PASS fetch store

What is implemented of the script format: the header (``connections:``, ``state:``,
``messages:``, ``capabilities:``, ``ignore_extra_untagged:``); numbered connections;
expected tagged replies (``ok``/``no``/``bad``/``""``) and pipelined ``tagN`` commands;
``*`` (must come), ``!`` (must not come) and ``?`` untagged lines; ``$var`` captures and
back-references, ``${var}``, ``$$``, relative sequences ``$1`` that follow EXPUNGEs;
``$!unordered[=N]``, ``$!noextra``, ``$!extra``, ``$!ignore=``, ``$!ban=`` and
imaptest's default directives (FETCH and STATUS items unordered, FETCH FLAGS unordered
with no extras but ``\\Recent``); ``$`` (skips a list) and ``$]``; ``{{{ }}}`` literals;
``append`` with no message (the next message of the script's mbox, or
``default.mbox``, its From_ line's date as INTERNALDATE); case-insensitive matching with
a prefix match of the text of OK/NO/BAD/BYE.  What is not: imaptest's own mailbox state
tracking (it also flags servers for protocol slips no script asks about), ``!ifenv``,
``!sleep``, ``!output``, banner checks and ``user N:`` headers.

Servers started with ``--start`` run with ``TZ=Europe/Helsinki`` unless TZ is set:
search-date and search-intdate assume a server in EET/EEST, as imaptest's comment says.
The test mailbox is ``imaptest`` (``--mailbox``); it and every mailbox below it are
deleted before each script, as imaptest does with its own.

A script whose ``capabilities:`` the server does not advertise after LOGIN is skipped,
as imaptest does (``--force`` runs it anyway).  Exit status: 0 if nothing failed.
"""

import argparse
import os
import re
import shutil
import socket
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# -- IMAP values ------------------------------------------------------------------------


class Nil:
    def __repr__(self):
        return "NIL"


NIL = Nil()


class Atom(str):
    pass


class String(str):
    """A quoted string or a literal: both are astrings to the matcher."""


class ParseError(Exception):
    pass


_LITERAL = re.compile(r"~?\{(\d+)\+?\}\r\n")


def parse_args(data, pos=0):
    """``data`` (str) parsed into a list of Atom, String, NIL and nested lists.

    Atoms end at a space, ``)`` or the end only, as Dovecot's parser does with
    IMAP_PARSE_FLAG_ATOM_ALLCHARS: ``BODY[HEADER.FIELDS`` is one atom, ``(FROM)`` a
    list, ``]`` another atom.
    """
    stack = [[]]
    n = len(data)
    while pos < n:
        c = data[pos]
        if c in " \r\n":
            pos += 1
        elif c == "(":
            stack.append([])
            pos += 1
        elif c == ")":
            if len(stack) == 1:
                raise ParseError("unexpected ')'")
            done = stack.pop()
            stack[-1].append(done)
            pos += 1
        elif c == '"':
            out = []
            pos += 1
            while True:
                if pos >= n:
                    raise ParseError("unterminated string")
                ch = data[pos]
                if ch == "\\" and pos + 1 < n:
                    out.append(data[pos + 1])
                    pos += 2
                elif ch == '"':
                    pos += 1
                    break
                else:
                    out.append(ch)
                    pos += 1
            stack[-1].append(String("".join(out)))
        elif c == "{" or (c == "~" and data[pos + 1:pos + 2] == "{"):
            match = _LITERAL.match(data, pos)
            if not match:
                atom_end = pos
                while atom_end < n and data[atom_end] not in " )\r\n":
                    atom_end += 1
                stack[-1].append(Atom(data[pos:atom_end]))
                pos = atom_end
                continue
            size = int(match.group(1))
            start = match.end()
            if start + size > n:
                raise ParseError("literal past the end")
            stack[-1].append(String(data[start:start + size]))
            pos = start + size
        else:
            end = pos
            while end < n and data[end] not in " )\r\n":
                end += 1
            word = data[pos:end]
            stack[-1].append(NIL if word.upper() == "NIL" else Atom(word))
            pos = end
    if len(stack) != 1:
        raise ParseError("unterminated list")
    return stack[0]


def lenient_parse(data):
    try:
        return parse_args(data)
    except ParseError:
        # Human-readable text after OK/NO/BAD may hold anything; words are enough.
        return [Atom(w) for w in data.split()]


def to_text(args):
    out = []
    for a in args:
        if a is NIL:
            out.append("NIL")
        elif isinstance(a, list):
            out.append("(" + to_text(a) + ")")
        elif isinstance(a, String):
            if "\n" in a or len(a) > 200:
                out.append("{%d}%r" % (len(a), a[:400]))
            else:
                out.append('"' + a.replace("\\", "\\\\").replace('"', '\\"') + '"')
        else:
            out.append(str(a))
    return " ".join(out)


# -- scripts ----------------------------------------------------------------------------

MUST, MUST_NOT, MAY = "*", "!", "?"


class Command:
    def __init__(self, text, reply, tag, line):
        self.text = text
        self.reply = reply      # parsed expected tagged reply; None while pending
        self.tag = tag
        self.line = line


class Group:
    def __init__(self, conn):
        self.conn = conn
        self.commands = []
        self.untagged = []      # (existence "*", "!" or "?", parsed args, line)
        self.pending = 0
        self.ordered = False


class Script:
    def __init__(self, path):
        self.path = path
        self.name = os.path.basename(path)
        self.connections = 1
        self.state = "selected"
        self.messages = None        # None: all of the mbox
        self.capabilities = []
        self.ignore_extra_untagged = True
        self.groups = []
        mbox = path + ".mbox"
        self.mbox = mbox if os.path.exists(mbox) else os.path.join(os.path.dirname(path),
                                                                   "default.mbox")


REPLY_WORDS = {"ok": "ok", "no": "no", "bad": "bad", '""': ""}


def split_reply(text):
    """(tag number or 0, expected reply args or None, rest of the line)."""
    tag = 0
    word, _, rest = text.partition(" ")
    m = re.fullmatch(r"(?i)tag(\d+)", word)
    if m and rest:
        tag = int(m.group(1))
        text = rest
        word, _, rest = text.partition(" ")
    if word.lower() in REPLY_WORDS:
        return tag, word, rest
    return tag, None, text


def add_default_directives(lst, reply_name, path):
    """imaptest's test_add_default_directives: ``path`` is the list's position as
    ((index in the top-level reply, previous atom), ...) from the outside in."""
    if any(isinstance(a, Atom) and a.startswith("$!") for a in lst[:1]):
        return
    if reply_name in ("list", "lsub"):
        if len(path) == 1 and path[0][0] == 1:
            lst.insert(0, Atom("$!unordered"))
    elif reply_name == "status":
        if len(path) == 1 and path[0][0] == 2:
            lst.insert(0, Atom("$!unordered=2"))
    elif reply_name == "fetch":
        if len(path) == 1 and path[0][0] == 2:
            lst.insert(0, Atom("$!unordered=2"))
        elif len(path) == 2 and path[0][0] == 2 and (path[1][1] or "").lower() == "flags":
            lst[0:0] = [Atom("$!unordered"), Atom("$!noextra"), Atom("$!ignore=\\recent"),
                        Atom("$!ignore=$HasAttachment"), Atom("$!ignore=$HasNoAttachment")]


def apply_directives(args, reply_name, path=()):
    prev = None
    for i, a in enumerate(args):
        if isinstance(a, list):
            sub = path + ((i, prev),)
            add_default_directives(a, reply_name, sub)
            apply_directives(a, reply_name, sub)
        prev = a if isinstance(a, Atom) else None


def parse_untagged(text):
    args = parse_args(text)
    name = ""
    if args and isinstance(args[0], Atom):
        name = args[0]
        if (name.startswith("$") or name[:1].isdigit()) and len(args) > 1 \
                and isinstance(args[1], Atom):
            name = args[1]
    apply_directives(args, name.lower())
    return args


def read_script(path):
    script = Script(path)
    with open(path, encoding="latin-1") as f:
        raw_lines = f.read().split("\n")
    if raw_lines and raw_lines[-1] == "":
        raw_lines.pop()
    # Join {{{ ... }}} blocks into one line with a literal, as test_parse_file does.
    lines = []
    i = 0
    while i < len(raw_lines):
        line = raw_lines[i]
        lineno = i + 1
        i += 1
        if line and not line.startswith("#") and line.endswith("{{{"):
            built = ""
            head = line
            while True:
                binary = head.endswith("~{{{")
                built += head[:-4] if binary else head[:-3]
                body = []
                while not raw_lines[i].startswith("}}}"):
                    body.append(raw_lines[i])
                    i += 1
                content = "\r\n".join(body)
                built += ("~" if binary else "") + "{%d}\r\n" % len(content) + content
                tail = raw_lines[i][3:]
                i += 1
                if tail.endswith("{{{"):
                    head = tail
                    continue
                built += tail
                break
            lines.append((lineno, built))
        else:
            lines.append((lineno, line))

    header = True
    group = None
    for lineno, line in lines:
        if line == "":
            header = False
            continue
        if line.startswith("#"):
            continue
        if header:
            key, _, value = line.partition(":")
            key, value = key.strip().lower(), value.strip()
            if key == "connections":
                script.connections = int(value)
            elif key == "state":
                script.state = value.lower()
                if script.state not in ("nonauth", "auth", "created", "appended",
                                        "selected"):
                    raise ParseError(f"{path}:{lineno}: unknown state {value}")
            elif key == "messages":
                script.messages = None if value == "all" else int(value)
            elif key == "capabilities":
                script.capabilities = value.split()
            elif key == "ignore_extra_untagged":
                script.ignore_extra_untagged = value.startswith("y")
            else:
                raise ParseError(f"{path}:{lineno}: unknown header {key}")
            continue
        if line.startswith(("!ifenv", "!ifnenv", "!else", "!endif", "!sleep", "!output")):
            raise ParseError(f"{path}:{lineno}: {line.split()[0]} is not supported")
        if group is not None and line == "!ordered":
            group.ordered = True
            continue
        if group is not None and line[:2] in ("* ", "! ", "? "):
            group.untagged.append((line[0], parse_untagged(line[2:]), lineno))
            continue
        conn_idx = 0
        body = line
        if script.connections > 1:
            word, _, rest = line.partition(" ")
            if word.isdigit():
                conn_idx = int(word) - 1
                body = rest
        if group is not None and group.pending:
            tag, reply, rest = split_reply(body)
            if reply is not None:
                for cmd in group.commands:
                    if cmd.tag == tag and cmd.reply is None:
                        cmd.reply = parse_args(reply + (" " + rest if rest else ""))
                        group.pending -= 1
                        break
                else:
                    raise ParseError(f"{path}:{lineno}: reply for an unknown tag")
                continue
        if group is None or group.pending == 0:
            group = Group(conn_idx)
            script.groups.append(group)
        elif group.conn != conn_idx:
            raise ParseError(f"{path}:{lineno}: pipelined commands on two connections")
        tag, reply, rest = split_reply(body)
        cmd = Command(rest, None if reply is None else parse_args(reply), tag, lineno)
        if reply is None:
            group.pending += 1
        group.commands.append(cmd)
    if group is not None and group.pending:
        raise ParseError(f"{path}: a command has no expected reply")
    return script


def read_mbox(path):
    """[(message bytes, INTERNALDATE string)] of an mbox file, as imaptest's mbox source
    gives them: everything between two From_ lines (the blank line before the next
    one included), bare LFs made CRLF, the date of the From_ line."""
    from_line = re.compile(rb"^From (\S+)\s+(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})"
                           rb"(?: ([+-]\d{4}))?[^\n]*\n?", re.MULTILINE)
    with open(path, "rb") as f:
        data = f.read()
    starts = list(from_line.finditer(data))
    out = []
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(data)
        stamp = time.strptime(m.group(2).decode(), "%a %b %d %H:%M:%S %Y")
        zone = (m.group(3) or b"+0000").decode()
        date = time.strftime("%d-%b-%Y %H:%M:%S", stamp) + " " + zone
        message = re.sub(rb"\r?\n", b"\r\n", data[m.end():end])
        out.append((message, date))
    return out


# -- matching (test-exec.c) ---------------------------------------------------------------

FULL = float("inf")


def is_var_char(c):
    return c.isalnum() or c == "_"


class Matcher:
    def __init__(self):
        self.variables = {}
        self.added = []
        self.seqmap = []

    def relative_seq(self, n):
        if n == 0:
            return "<zero seq>"
        if n > len(self.seqmap):
            return "<out of range>"
        if self.seqmap[n - 1] == 0:
            return "<expunged>"
        return str(self.seqmap[n - 1])

    def expunged(self, seq):
        if seq > len(self.seqmap):
            return
        for i in range(seq - 1, len(self.seqmap)):
            if self.seqmap[i] >= seq:
                self.seqmap[i] = 0 if self.seqmap[i] == seq else self.seqmap[i] - 1

    def expand_all(self, text, strict=True):
        """Variables of a command line replaced by their values."""
        out = []
        i = 0
        while i < len(text):
            c = text[i]
            if c != "$" or i + 1 == len(text):
                out.append(c)
                i += 1
                continue
            i += 1
            if text[i] == "$":
                out.append("$")
                i += 1
                continue
            if text[i] == "{":
                end = text.index("}", i)
                name = text[i + 1:end]
                i = end + 1
            else:
                j = i
                while j < len(text) and is_var_char(text[j]):
                    j += 1
                name = text[i:j]
                i = j
            if name.isdigit():
                out.append(self.relative_seq(int(name)))
            elif name in self.variables:
                out.append(self.variables[name])
            elif strict:
                raise ScriptFailure(f"uninitialized variable ${name}")
            else:
                out.append("$" + name)
        return "".join(out)

    def expand_input(self, pattern, value):
        """The pattern expanded against ``value`` (capturing unknown variables), or
        None when it cannot match; second item: whether to compare ignoring case."""
        icase = True
        out = []
        s = 0
        v = 0
        while s < len(pattern):
            if pattern[s] != "$" or pattern[s + 1:s + 2] == "$":
                if pattern[s] == "$":
                    s += 1
                if v >= len(value) or pattern[s].upper() != value[v].upper():
                    return None, icase
                out.append(pattern[s])
                s += 1
                v += 1
                continue
            s += 1
            if pattern[s:s + 1] == "{":
                end = pattern.find("}", s)
                if end < 0:
                    return "", icase
                name = pattern[s + 1:end]
                s = end + 1
            else:
                j = s
                while j < len(pattern) and is_var_char(pattern[j]):
                    j += 1
                name = pattern[s:j]
                s = j
            if name.isdigit():
                got = self.relative_seq(int(name))
            elif name.startswith("case:"):
                icase = False
                got = name[5:]
            else:
                got = self.variables.get(name) if name else None
                if got is None:
                    rest = pattern[s:]
                    stop = rest[:1] if not rest.startswith("$") else ""
                    end = v
                    while end < len(value) and (not stop or value[end].upper() != stop.upper()):
                        end += 1
                    got = value[v:end]
                    if name:
                        self.variables[name] = got
                        self.added.append(name)
            out.append(got)
            if value[v:v + len(got)] != got:
                return None, icase
            v += len(got)
        return "".join(out), icase

    def match_list(self, match, args):
        unordered = False
        chain = 1
        noextra = None
        ignores, bans = [], []
        k = 0
        while k < len(match) and isinstance(match[k], Atom) and match[k].startswith("$!"):
            d = match[k][2:]
            if d.startswith("unordered"):
                unordered = True
                if noextra is None:
                    noextra = False
                if d[9:10] == "=":
                    chain = int(d[10:])
            elif d == "ordered":
                unordered = False
            elif d == "extra":
                noextra = False
            elif d == "noextra":
                noextra = True
            elif d.startswith("ignore="):
                ignores.append(d[7:].lower())
            elif d.startswith("ban="):
                bans.append(d[4:].lower())
            k += 1
        match = match[k:]
        if noextra is None:
            noextra = True
        if not unordered:
            return self.match_args(match, args, FULL, False)
        if len(args) % chain:
            return 0
        matched = [False] * len(args)
        ret = 0
        for m in range(0, len(match), chain):
            for i in range(0, len(args), chain):
                if self.match_args(match[m:m + chain], args[i:i + chain], chain, False) == FULL:
                    matched[i] = True
                    break
            else:
                return ret
            ret += 1
        for i in range(0, len(args), chain):
            if matched[i] or not isinstance(args[i], str):
                continue
            if noextra and args[i].lower() not in ignores:
                return ret
            if not noextra and args[i].lower() in bans:
                return ret
        return FULL

    def match_args(self, match, args, limit, prefix):
        ret = 0
        a = 0
        m = 0
        while m < len(match) and limit > 0:
            want = match[m]
            got = args[a] if a < len(args) else None
            if want is NIL:
                if got is not NIL:
                    return ret
            elif isinstance(want, str):
                if want == "$" and isinstance(got, list):
                    pass
                elif want == "$]":
                    while isinstance(got, Atom) and "]" not in got:
                        a += 1
                        got = args[a] if a < len(args) else None
                else:
                    if not isinstance(got, str):
                        return ret
                    expanded, icase = self.expand_input(want, got)
                    if expanded is None:
                        return ret
                    last = m + 1 == len(match)
                    if prefix and last:
                        ok = (got[:len(expanded)].lower() == expanded.lower() if icase
                              else got.startswith(expanded))
                    else:
                        ok = got.lower() == expanded.lower() if icase else got == expanded
                    if not ok:
                        return ret
            elif isinstance(want, list):
                if not isinstance(got, list):
                    return ret
                sub = self.match_list(want, got)
                if sub != FULL:
                    return ret + sub
            ret += 1
            m += 1
            a += 1
            limit -= 1
        if prefix or a >= len(args) or limit == 0:
            return FULL
        return ret

    def try_match(self, match, args, prefix, tag=None):
        """Match, keeping captured variables only on success."""
        self.added = []
        if tag is not None:
            self.variables["tag"] = tag
        result = self.match_args(match, args, FULL, prefix)
        if tag is not None:
            self.variables.pop("tag", None)
        if result != FULL:
            for name in self.added:
                self.variables.pop(name, None)
        self.added = []
        return result == FULL


# -- connections --------------------------------------------------------------------------


class ScriptFailure(Exception):
    pass


class Connection:
    def __init__(self, host, port, number, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self.number = number
        self.next_tag = 1
        # The selected mailbox as this connection was told: None where unknown.
        self.exists = None
        self.uidvalidity = None
        self.readonly = False
        self.greeting = self.read_response()

    def tag(self):
        tag = f"{self.number}.{self.next_tag}"
        self.next_tag += 1
        return tag

    def send(self, data):
        self.sock.sendall(data)

    def read_response(self):
        """One response, literals included, as text (latin-1: a byte is a character,
        so literal sizes stay true)."""
        out = bytearray()
        while True:
            line = self.file.readline(1 << 24)
            if not line:
                raise ScriptFailure(f"connection {self.number}: the server closed it")
            out += line
            m = re.search(rb"\{(\d+)\+?\}\r\n$", line)
            if m:
                out += self.file.read(int(m.group(1)))
                continue
            break
        text = out.decode("latin-1")
        return text

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Runner:
    def __init__(self, host, port, user, password, mailbox, timeout=30, verbose=False,
                 force=False):
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.mailbox = mailbox
        self.timeout = timeout
        self.verbose = verbose
        self.force = force

    # A simple synchronous command for the set-up phase.
    def simple(self, conn, text, literal=None, allow_no=False):
        tag = conn.tag()
        self.forget_mailbox(conn, text)
        if literal is None:
            conn.send(f"{tag} {text}\r\n".encode("latin-1"))
        else:
            conn.send(f"{tag} {text} {{{len(literal)}}}\r\n".encode())
            while True:
                resp = conn.read_response()
                if resp.startswith("+"):
                    break
                if resp.startswith(tag + " "):
                    raise ScriptFailure(f"set-up {text}: {resp.strip()}")
            conn.send(literal + b"\r\n")
        untagged = []
        while True:
            resp = conn.read_response()
            if self.verbose:
                print(f"  S{conn.number}: {resp.rstrip()[:300]}")
            if resp.startswith(tag + " "):
                status = resp[len(tag) + 1:].split(" ", 1)[0].upper()
                if status != "OK" and not (allow_no and status == "NO"):
                    raise ScriptFailure(f"set-up {text}: {resp.strip()}")
                return status, untagged
            untagged.append(resp)
            if resp.startswith("* "):
                self.track(conn, lenient_parse(resp[2:].rstrip("\r\n")), None)

    def setup(self, script):
        conns = [Connection(self.host, self.port, i + 1, self.timeout)
                 for i in range(script.connections)]
        if script.state == "nonauth":
            return conns, None
        for conn in conns:
            self.simple(conn, f"LOGIN {quote(self.user)} {quote(self.password)}")
        first = conns[0]
        _, untagged = self.simple(first, "CAPABILITY")
        caps = set()
        for resp in untagged:
            if resp.upper().startswith("* CAPABILITY "):
                caps |= {c.upper() for c in resp.split()[2:]}
        missing = [c for c in script.capabilities if c.upper() not in caps]
        if missing and not self.force:
            return conns, missing
        # Start from nothing: every mailbox under the test mailbox's name goes.
        _, listed = self.simple(first, f'LIST "" {quote(self.mailbox + "*")}')
        _, subscribed = self.simple(first, f'LSUB "" {quote(self.mailbox + "*")}')

        def names(responses):
            out = []
            for resp in responses:
                args = lenient_parse(resp.rstrip("\r\n"))
                if len(args) >= 5 and isinstance(args[4], str):
                    out.append(str(args[4]))
            return out
        for name in sorted(names(listed), key=str.lower, reverse=True):
            self.simple(first, f"DELETE {quote(name)}", allow_no=True)
        for name in sorted(names(subscribed), key=str.lower, reverse=True):
            self.simple(first, f"UNSUBSCRIBE {quote(name)}", allow_no=True)
        self.source = read_mbox(script.mbox)
        self.source_next = 0
        if script.state == "auth":
            return conns, None
        if self.mailbox.upper() != "INBOX":
            self.simple(first, f"CREATE {quote(self.mailbox)}")
        if script.state == "created":
            return conns, None
        count = len(self.source) if script.messages is None else script.messages
        for _ in range(count):
            self.append_next(first, self.mailbox, "")
        for conn in conns:
            self.simple(conn, f"SELECT {quote(self.mailbox)}")
        return conns, None

    def next_message(self):
        message, date = self.source[self.source_next % len(self.source)]
        self.source_next += 1
        return message, date

    def append_next(self, conn, mailbox, extra):
        message, date = self.next_message()
        if not re.search(r'"\d', extra):
            extra = (extra + " " if extra else "") + quote(date)
        self.simple(conn, f"APPEND {quote(mailbox)} {extra}".rstrip(), literal=message)

    # -- running a script ---------------------------------------------------------------

    def run(self, script):
        self.recent_owner = {}
        matcher = Matcher()
        matcher.variables.update({"user": self.user, "username": self.user.split("@")[0],
                                  "domain": self.user.partition("@")[2] or self.host,
                                  "password": self.password, "mailbox": self.mailbox})
        for i in range(1, script.connections):
            matcher.variables[f"user{i + 1}"] = self.user
            matcher.variables[f"password{i + 1}"] = self.password
        conns, missing = self.setup(script)
        try:
            if missing:
                return "skip", f"capabilities not advertised: {' '.join(missing)}"
            failures = []
            for number, group in enumerate(script.groups, 1):
                failure = self.run_group(script, conns, group, matcher)
                if failure:
                    failures.append(f"group {number} (line {group.commands[0].line}: "
                                    f"{group.commands[0].text}):\n    {failure}")
            logout_needed = not any(c.text.lower() == "logout"
                                    for g in script.groups for c in g.commands)
            if logout_needed:
                try:
                    self.simple(conns[0], "LOGOUT")
                except ScriptFailure as e:
                    if "closed" not in str(e):
                        failures.append(f"LOGOUT: {e}")
            if failures:
                return "fail", "\n  ".join(failures)
            return "pass", ""
        finally:
            for conn in conns:
                conn.close()

    def run_group(self, script, conns, group, matcher):
        conn = conns[group.conn]
        matcher.seqmap = list(range(1, (conn.exists or 0) + 1))
        found = [False] * len(group.untagged)
        problems = []
        pending = {}
        for cmd in group.commands:
            try:
                text = matcher.expand_all(cmd.text)
            except ScriptFailure as e:
                return str(e)
            tag = conn.tag()
            pending[tag] = cmd
            lower = text.lower()
            self.forget_mailbox(conn, text)
            if lower == "append" or (lower.startswith("append ") and "{" not in text):
                # "append [mailbox [flags] [date]]": the next message of the mbox.
                rest = text[7:].strip() if lower.startswith("append ") else ""
                mailbox = self.mailbox
                if rest:
                    mailbox = str(parse_args(rest)[0])
                    rest = rest.partition(" ")[2].strip()
                message, date = self.next_message()
                extra = rest
                if not re.search(r'"\d', extra):
                    extra = (extra + " " if extra else "") + quote(date)
                conn.send(f"{tag} APPEND {quote(mailbox)} {extra} {{{len(message)}}}\r\n"
                          .encode())
                while True:
                    resp = conn.read_response()
                    if resp.startswith("+"):
                        conn.send(message + b"\r\n")
                        break
                    if resp.startswith(tag + " "):
                        break
                    self.handle_untagged(script, conn, group, matcher, resp, found, problems,
                                         tag)
                if not resp.startswith("+"):
                    # Tagged reply came instead of a continuation.
                    self.check_tagged(matcher, cmd, resp, tag, problems)
                    del pending[tag]
                continue
            if self.verbose:
                print(f"  C{conn.number}: {tag} {text}")
            # A synchronizing literal waits for the server's "+" before its data.
            line = f"{tag} {text}\r\n"
            sent = 0
            literal = re.compile(r"\{(\d+)\}\r\n")
            m = literal.search(line)
            while m:
                conn.send(line[sent:m.end()].encode("latin-1"))
                sent = m.end()
                while True:
                    resp = conn.read_response()
                    if resp.startswith("+"):
                        break
                    if resp.startswith(tag + " "):
                        raise ScriptFailure(f"literal refused: {resp.strip()}")
                    self.handle_untagged(script, conn, group, matcher, resp, found,
                                         problems, tag)
                m = literal.search(line, sent + int(m.group(1)))
            conn.send(line[sent:].encode("latin-1"))
        while pending:
            resp = conn.read_response()
            if self.verbose:
                print(f"  S{conn.number}: {resp.rstrip()[:300]}")
            tag = resp.split(" ", 1)[0]
            if tag in pending:
                self.check_tagged(matcher, pending.pop(tag), resp, tag, problems)
            elif resp.startswith("* "):
                current = next(iter(pending))
                self.handle_untagged(script, conn, group, matcher, resp, found, problems,
                                     current)
            else:
                problems.append(f"unexpected response: {resp.strip()}")
        missing = [group.untagged[i] for i, ok in enumerate(found)
                   if not ok and group.untagged[i][0] == MUST]
        if missing:
            problems.append(f"missing {len(missing)} untagged replies, first (line "
                            f"{missing[0][2]}): {to_text(missing[0][1])}")
        return "\n    ".join(problems)

    def handle_untagged(self, script, conn, group, matcher, resp, found, problems, tag):
        text = resp[2:].rstrip("\r\n")
        args = lenient_parse(text)
        first = args[0] if args else ""
        prefix = isinstance(first, str) and first.lower() in ("ok", "no", "bad", "bye")
        any_found = False
        for i, (existence, match, _line) in enumerate(group.untagged):
            if found[i]:
                continue
            if matcher.try_match(match, args, prefix, tag):
                if existence == MUST_NOT:
                    problems.append(f"unexpected untagged match: {to_text(match)}\n"
                                    f"      reply: {text[:300]}")
                    break
                found[i] = True
                any_found = True
                if group.ordered:
                    break
            elif group.ordered and existence == MUST:
                break
        if not any_found and not script.ignore_extra_untagged:
            problems.append(f"unexpected untagged reply: {text[:300]}")
        # Bookkeeping after matching, as imaptest does.
        if len(args) >= 2 and isinstance(args[0], Atom) and args[0].isdigit() \
                and isinstance(args[1], Atom) and args[1].upper() == "EXPUNGE":
            matcher.expunged(int(args[0]))
        self.track(conn, args, problems)

    def track(self, conn, args, problems):
        """Follow a connection's mailbox state, and report what no server may do
        whatever a script expects (a part of imaptest's own state tracking)."""
        def problem(text):
            if problems is not None:
                problems.append(f"connection {conn.number}: {text}")
        if len(args) >= 2 and isinstance(args[0], Atom) and args[0].isdigit() \
                and isinstance(args[1], Atom):
            number, what = int(args[0]), args[1].upper()
            if what == "EXISTS":
                if conn.exists is not None and number < conn.exists:
                    problem(f"EXISTS went down from {conn.exists} to {number} without "
                            f"EXPUNGE")
                conn.exists = number
            elif what == "EXPUNGE":
                if conn.exists is not None:
                    if not 1 <= number <= conn.exists:
                        problem(f"EXPUNGE {number} with {conn.exists} messages")
                    conn.exists -= 1
            elif what == "FETCH":
                if conn.exists is not None and not 1 <= number <= conn.exists:
                    problem(f"FETCH of message {number} with {conn.exists} messages")
                items = args[2] if len(args) > 2 and isinstance(args[2], list) else []
                pairs = dict(zip((str(i).upper() for i in items[::2]), items[1::2]))
                flags = pairs.get("FLAGS")
                uid = pairs.get("UID")
                if isinstance(flags, list) and isinstance(uid, str) and not conn.readonly \
                        and conn.uidvalidity is not None \
                        and any(str(f).lower() == "\\recent" for f in flags):
                    # RFC 3501 2.3.2: \Recent goes to one session only.
                    owner = self.recent_owner.setdefault((conn.uidvalidity, uid), conn.number)
                    if owner != conn.number:
                        problem(f"UID {uid} is \\Recent on connection {owner} too")
        elif len(args) >= 2 and isinstance(args[0], Atom) and args[0].upper() == "OK" \
                and isinstance(args[1], Atom) and args[1].upper() == "[UIDVALIDITY":
            conn.uidvalidity = str(args[2]).rstrip("]") if len(args) > 2 else None

    def forget_mailbox(self, conn, command):
        """A command that selects or closes: the state seen so far no longer holds."""
        verb = command.split(" ", 1)[0].lower()
        if verb in ("select", "examine", "close", "unselect"):
            conn.exists = None
            conn.uidvalidity = None
            conn.readonly = verb == "examine"

    def check_tagged(self, matcher, cmd, resp, tag, problems):
        args = lenient_parse(resp.rstrip("\r\n"))[1:]
        if cmd.reply is None:
            return
        if not matcher.try_match(cmd.reply, args, True, tag):
            problems.append(f"expected tagged reply '{to_text(cmd.reply)}', got "
                            f"'{resp.strip()[:300]}' for: {cmd.text[:200]}")


# -- servers to run against ---------------------------------------------------------------


def start_server(kind, directory):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    # search-intdate and search-date assume a server in EET/EEST (imaptest's own
    # comment); the servers inherit our environment.
    os.environ.setdefault("TZ", "Europe/Helsinki")
    if kind == "leapmail":
        from leapmail_daemon import LeapmailDaemon
        server = LeapmailDaemon(os.path.join(directory, "home")).start()
        return server, server.host, server.port, server.user, server.password
    from dovecot_server import DovecotServer
    server = DovecotServer(os.path.join(directory, "dovecot")).start()
    return server, server.host, server.port, server.user, server.password


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scripts", required=True,
                        help="directory holding imaptest's src/tests/ files")
    parser.add_argument("--start", choices=("leapmail", "dovecot"),
                        help="start a throw-away server of this kind")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--mailbox", default="imaptest",
                        help="the test mailbox (deleted and re-created for each script)")
    parser.add_argument("--timeout", type=float, default=30)
    parser.add_argument("--force", action="store_true",
                        help="run scripts whose capabilities the server lacks")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("names", nargs="*", help="scripts to run (default: all)")
    options = parser.parse_args(argv)

    if not os.path.isdir(options.scripts):
        parser.error(f"--scripts {options.scripts}: no such directory (download imaptest's "
                     f"src/tests/ there)")
    names = options.names or sorted(
        n for n in os.listdir(options.scripts)
        if not n.startswith(".") and not n.endswith(".mbox") and n != "Makefile.am"
        and os.path.isfile(os.path.join(options.scripts, n)))
    server = None
    workdir = None
    if options.start:
        workdir = tempfile.mkdtemp(prefix=f"imaptest-{options.start}-")
        try:
            server, host, port, user, password = start_server(options.start, workdir)
        except Exception as e:  # the daemon's own error says what is missing
            print(f"imaptest_runner: cannot start {options.start}: {e}", file=sys.stderr)
            return 2
    else:
        if not (options.port and options.user and options.password):
            parser.error("--port, --user and --password are needed without --start")
        host, port, user, password = options.host, options.port, options.user, \
            options.password
    runner = Runner(host, port, user, password, options.mailbox, options.timeout,
                    options.verbose, options.force)
    counts = {"pass": 0, "fail": 0, "skip": 0, "error": 0}
    try:
        for name in names:
            path = os.path.join(options.scripts, name)
            try:
                script = read_script(path)
                outcome, detail = runner.run(script)
            except (ParseError, ScriptFailure, OSError, ValueError) as e:
                outcome, detail = "error", f"{type(e).__name__}: {e}"
            counts[outcome] += 1
            print(f"{outcome.upper():5} {name}" + (f"\n  {detail}" if detail else ""),
                  flush=True)
    finally:
        if server is not None:
            server.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 1 if counts["fail"] or counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
