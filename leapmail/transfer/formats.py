"""Mail files: mbox (mboxrd, mboxo), Maildir (with Maildir++ folders) and ``.eml`` folders.

Readers are blocking generators that stream: they hold one message at a time, never a
whole file, and never more than ``max_size`` bytes of one message (a bigger one is
skipped to its end and reported).  They yield :class:`Message` and :class:`Problem`
objects in file order; a problem never stops the messages after it.

Writers take the exact bytes the store gives back.  Import followed by export gives
every message back byte for byte, with these limits, inherent to the formats:

- mbox: a message whose last line has no line end gets one (the separator needs it);
  an mboxo file cannot tell a body line ``>From `` from a quoted ``From ``, so mboxo
  reads it back as ``From `` (mboxrd has no such ambiguity, and is what export writes
  unless told otherwise).  The ``From `` line itself is rebuilt (sender
  ``MAILER-DAEMON``, the internal date): leapmail keeps message bytes, not mbox lines.
- Maildir: only the flags a file name can carry (D F P R S T) travel; Dovecot's
  keyword letters (a-z) need its ``dovecot-keywords`` file and are ignored.
- ``.eml``: a file carries no flags.
"""

import calendar
import hashlib
import os
import re
import time
from dataclasses import dataclass

MBOX_FORMATS = ("mboxrd", "mboxo")
FORMATS = ("mbox",) + MBOX_FORMATS + ("maildir", "eml")

#: Maildir info letters and the flags they stand for (the Maildir specification).
MAILDIR_FLAGS = {"D": "\\Draft", "F": "\\Flagged", "P": "$Forwarded", "R": "\\Answered",
                 "S": "\\Seen", "T": "\\Deleted"}
_LETTER_OF = {flag.lower(): letter for letter, flag in MAILDIR_FLAGS.items()}

_READ_SIZE = 1024 * 1024
_LINE_CAP = 64 * 1024
_UNQUOTE = {"mboxrd": re.compile(rb"^>(>*From )", re.M), "mboxo": re.compile(rb"^>(From )", re.M)}
_QUOTE = {"mboxrd": re.compile(rb"^(>*From )", re.M), "mboxo": re.compile(rb"^(From )", re.M)}


class FormatError(Exception):
    """The input cannot be read as the format at all (not one message in it)."""


@dataclass
class Message:
    raw: bytes
    flags: tuple
    date: int  # Unix time; None when the file does not say
    folder: tuple  # path of sub-folder names below the imported root, () for the root
    key: bytes  # stable per message of this input: the basis of its import source
    where: str  # for messages to the user: file and offset or name


@dataclass
class Problem:
    where: str
    reason: str
    size: int = 0


def detect(path):
    """The format of ``path``: a Maildir, a folder of ``.eml`` files, or an mbox file."""
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "cur")) or os.path.isdir(os.path.join(path, "new")):
            return "maildir"
        return "eml"
    return "mbox"


class _Occurrences:
    """Tells apart identical messages in one input: the n-th copy gets key n."""

    def __init__(self):
        self._seen = {}

    def key(self, folder, raw):
        digest = hashlib.sha256(raw).digest()
        scope = ("/".join(folder), digest)
        n = self._seen.get(scope, 0)
        self._seen[scope] = n + 1
        return digest + n.to_bytes(4, "big")


# -- mbox ------------------------------------------------------------------------------

def from_line_date(line):
    """The Unix time at the end of a ``From sender date`` line, or None."""
    words = line.decode("latin-1").split()
    for take in (5, 6):  # asctime, optionally followed by a zone ("+0000", "UTC")
        if len(words) < take + 1:
            continue
        text = " ".join(words[-take:][:5])
        try:
            return calendar.timegm(time.strptime(text, "%a %b %d %H:%M:%S %Y"))
        except ValueError:
            continue
    return None


def status_flags(header):
    """Flags from the ``Status:`` and ``X-Status:`` fields mutt, Thunderbird and
    Python's ``mailbox`` write into mbox messages."""
    flags = []
    for name, value in re.findall(rb"(?mi)^(x-status|status):[ \t]*([A-Za-z]*)", header):
        letters = value.decode("ascii").upper()
        if name.lower() == b"status":
            if "R" in letters:
                flags.append("\\Seen")
        else:
            flags += [f for letter, f in (("A", "\\Answered"), ("F", "\\Flagged"),
                                          ("T", "\\Draft"), ("D", "\\Deleted"))
                      if letter in letters]
    return tuple(flags)


def _header_of(raw):
    end = raw.find(b"\n\n")
    crlf = raw.find(b"\r\n\r\n")
    if end < 0 or 0 <= crlf < end:
        end = crlf
    return raw if end < 0 else raw[:end]


def read_mbox(path, fmt="mboxrd", max_size=None, progress=None):
    """Messages of an mbox file (streamed, line by line, lines read in bounded pieces).

    A message starts at a line beginning with ``From `` (both mboxrd and mboxo quote
    such lines inside messages) and ends before the blank line that precedes the next.
    ``progress(bytes)`` is called with the bytes consumed as reading goes.
    """
    if fmt == "mbox":
        fmt = "mboxrd"
    unquote = _UNQUOTE[fmt]
    occurrences = _Occurrences()
    with open(path, "rb", buffering=_READ_SIZE) as f:
        position = 0
        at_line_start = True
        start = None  # offset of the current message's From line
        from_line = None
        pieces, size, over = [], 0, False
        junk = 0

        def finish():
            where = f"{path}: message at byte {start}"
            if over:
                return Problem(where, f"over the size limit of {max_size} bytes", size)
            raw = b"".join(pieces)
            if raw.endswith(b"\r\n\r\n"):
                raw = raw[:-2]
            elif raw.endswith(b"\n\n"):
                raw = raw[:-1]
            raw = unquote.sub(rb"\1", raw)
            if not raw.strip():
                return Problem(where, "empty message")
            flags = status_flags(_header_of(raw))
            return Message(raw, flags, from_line_date(from_line), (),
                           occurrences.key((), raw), where)

        while True:
            line = f.readline(_LINE_CAP)
            if not line:
                break
            if at_line_start and line.startswith(b"From "):
                if start is not None:
                    yield finish()
                elif junk:
                    yield Problem(f"{path}: bytes 0-{position}",
                                  "text before the first 'From ' line (not an mbox message)",
                                  junk)
                start, from_line = position, line
                pieces, size, over = [], 0, False
                # The rest of an over-long From line is not the message either.
                while not line.endswith(b"\n"):
                    more = f.readline(_LINE_CAP)
                    if not more:
                        break
                    position += len(line)
                    line = more
            elif start is None:
                junk += len(line)
            else:
                size += len(line)
                if max_size is not None and size > max_size + 2:
                    over, pieces = True, []
                elif not over:
                    pieces.append(line)
            position += len(line)
            at_line_start = line.endswith(b"\n")
            if progress is not None:
                progress(len(line))
        if start is not None:
            yield finish()
        elif junk:
            raise FormatError(f"{path} is not an mbox file: no line starts with 'From '")


def mbox_from_line(date):
    stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(date or 0))
    return b"From MAILER-DAEMON " + stamp.encode("ascii") + b"\n"


def mbox_entry(raw, date, fmt="mboxrd"):
    """One message as it goes into an mbox file: From line, quoted body, blank line."""
    if fmt == "mbox":
        fmt = "mboxrd"
    body = _QUOTE[fmt].sub(rb">\1", raw)
    if not body.endswith(b"\n"):
        body += b"\n"
    end = b"\r\n" if body.endswith(b"\r\n") else b"\n"
    return mbox_from_line(date) + body + end


def mboxo_ambiguous(raw):
    """Whether mboxo would give ``raw`` back changed (a line starting ``>From ``)."""
    return re.search(rb"(?m)^>From ", raw) is not None


# -- Maildir ---------------------------------------------------------------------------

def maildir_info(name):
    """Flags from a Maildir file name's ``:2,`` info (Dovecot's keyword letters aside)."""
    _, sep, info = name.rpartition(":2,")
    if not sep:
        return ()
    return tuple(MAILDIR_FLAGS[c] for c in info if c in MAILDIR_FLAGS)


def maildir_letters(flags):
    return "".join(sorted({_LETTER_OF[f.lower()] for f in flags if f.lower() in _LETTER_OF}))


def decode_folder(name):
    """A Maildir++ folder name (modified UTF-7, as Dovecot writes it) as text."""
    if "&" in name:
        try:
            import twisted.mail.imap4  # noqa: F401 - registers the imap4-utf-7 codec
            return name.encode("ascii").decode("imap4-utf-7")
        except (UnicodeError, ValueError):
            return name
    return name


def encode_folder(name):
    import twisted.mail.imap4  # noqa: F401 - registers the imap4-utf-7 codec

    return name.encode("imap4-utf-7").decode("ascii")


def maildir_folders(root):
    """``[(folder path tuple, directory)]``: the root and its Maildir++ ``.A.B`` folders."""
    folders = [((), root)]
    for entry in sorted(os.listdir(root)):
        full = os.path.join(root, entry)
        if (entry.startswith(".") and entry not in (".", "..") and len(entry) > 1
                and os.path.isdir(full)
                and (os.path.isdir(os.path.join(full, "cur"))
                     or os.path.isdir(os.path.join(full, "new")))):
            folders.append((tuple(decode_folder(p) for p in entry[1:].split(".")), full))
    return folders


def _read_file(path, max_size, where):
    size = os.path.getsize(path)
    if max_size is not None and size > max_size:
        return Problem(where, f"over the size limit of {max_size} bytes", size)
    with open(path, "rb") as f:
        raw = f.read(size + 1 if max_size is None else max_size + 1)
    if not raw:
        return Problem(where, "empty file")
    return raw


def read_maildir(root, max_size=None, progress=None):
    occurrences = _Occurrences()
    for folder, directory in maildir_folders(root):
        names = []
        for sub in ("new", "cur"):
            try:
                names += [(sub, n) for n in os.listdir(os.path.join(directory, sub))
                          if not n.startswith(".")]
            except FileNotFoundError:
                continue
        # By the delivery time stamp that starts a Maildir name, then by name.
        names.sort(key=lambda item: (_leading_number(item[1]), item[1]))
        for sub, name in names:
            path = os.path.join(directory, sub, name)
            where = path
            try:
                got = _read_file(path, max_size, where)
                mtime = int(os.stat(path).st_mtime)
            except FileNotFoundError:
                continue  # moved by a mail client meanwhile: it is read under its new name
            if isinstance(got, Problem):
                yield got
            else:
                yield Message(got, maildir_info(name), mtime, folder,
                              occurrences.key(folder, got), where)
            if progress is not None:
                progress(1)


def _leading_number(name):
    match = re.match(r"\d+", name)
    return int(match.group()) if match else 0


def maildir_dir(root, folder):
    """The directory of ``folder`` (a tuple of names) in a Maildir++ tree at ``root``."""
    if not folder:
        return root
    for part in folder:
        if "." in part or "/" in part:
            raise ValueError(f"the mailbox level {part!r} holds a '.', which Maildir++ "
                             "uses as its hierarchy separator")
    return os.path.join(root, "." + ".".join(encode_folder(p) for p in folder))


def make_maildir(directory):
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(directory, sub), mode=0o700, exist_ok=True)
    if os.path.basename(directory).startswith("."):
        open(os.path.join(directory, "maildirfolder"), "ab").close()


def maildir_name(stem, flags):
    return f"{stem}:2,{maildir_letters(flags)}"


# -- .eml folders ----------------------------------------------------------------------

def _natural(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_eml(root, max_size=None, progress=None):
    """Every ``*.eml`` file below ``root``; sub-directories are sub-folders."""
    occurrences = _Occurrences()
    stack = [((), root)]
    while stack:
        folder, directory = stack.pop(0)
        entries = sorted(os.listdir(directory), key=_natural)
        for name in entries:
            path = os.path.join(directory, name)
            if os.path.isdir(path):
                stack.append((folder + (name,), path))
                continue
            if not name.lower().endswith(".eml"):
                continue
            got = _read_file(path, max_size, path)
            if isinstance(got, Problem):
                yield got
            else:
                yield Message(got, (), int(os.stat(path).st_mtime), folder,
                              occurrences.key(folder, got), path)
            if progress is not None:
                progress(1)


def count_files(path, fmt):
    """How many messages a Maildir or eml tree holds (for the progress bar's total)."""
    total = 0
    if fmt == "maildir":
        for _, directory in maildir_folders(path):
            for sub in ("new", "cur"):
                try:
                    total += sum(1 for n in os.listdir(os.path.join(directory, sub))
                                 if not n.startswith("."))
                except FileNotFoundError:
                    pass
    else:
        for _, _, files in os.walk(path):
            total += sum(1 for n in files if n.lower().endswith(".eml"))
    return total
