"""Progress of a long transfer: a bar on a terminal, plain log lines otherwise.

The bar is tqdm's (count, bytes, rate and ETA, redrawn in place); a log file or a pipe
gets one line per batch instead, which a script or a test can follow.
"""

import sys
import time


def _size(n):
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


class Progress:
    """Counts messages and bytes for ``what`` (e.g. ``"import"``).

    ``total_bytes`` (if known) gives the bar its ETA; ``total`` is messages.
    """

    def __init__(self, what, total=None, total_bytes=None, stream=None, bar=None):
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.messages = 0
        self.bytes = 0
        self.skipped = 0
        self.problems = 0
        self.total = total
        self.started = time.monotonic()
        use_bar = self.stream.isatty() if bar is None else bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            if total_bytes:
                self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=what,
                                 file=self.stream, dynamic_ncols=True)
            else:
                self._bar = tqdm(total=total, unit="msg", desc=what, file=self.stream,
                                 dynamic_ncols=True)
            self._by_bytes = bool(total_bytes)

    def set_total(self, total=None, total_bytes=None):
        self.total = total
        if self._bar is not None:
            self._bar.total = total_bytes if self._by_bytes else total
            self._bar.refresh()

    def advance(self, messages=0, nbytes=0, skipped=0, consumed=None, label=None):
        """Count ``messages`` imported (``nbytes`` of them) and ``skipped`` already there;
        ``consumed`` is input read, for a bar measured in input bytes."""
        self.messages += messages
        self.bytes += nbytes
        self.skipped += skipped
        if self._bar is not None:
            step = (consumed if consumed is not None else nbytes) if self._by_bytes \
                else messages + skipped
            self._bar.update(step)
            self._bar.set_postfix_str(self._counts(), refresh=False)
        else:
            where = f" {label}" if label else ""
            print(f"{self.what}{where}: {self._counts()}", file=self.stream, flush=True)

    def problem(self, text):
        self.problems += 1
        if self._bar is not None:
            self._bar.write(f"{self.what}: {text}", file=self.stream)
        else:
            print(f"{self.what}: {text}", file=self.stream, flush=True)

    def note(self, text):
        if self._bar is not None:
            self._bar.write(f"{self.what}: {text}", file=self.stream)
        else:
            print(f"{self.what}: {text}", file=self.stream, flush=True)

    def _counts(self):
        done = self.messages + self.skipped
        total = f"/{self.total}" if self.total is not None else ""
        text = f"{done}{total} messages, {self.messages} new ({_size(self.bytes)})"
        if self.skipped:
            text += f", {self.skipped} there before"
        return text

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self):
        seconds = max(time.monotonic() - self.started, 1e-9)
        text = (f"{self.what}: {self.messages} messages ({_size(self.bytes)}) in "
                f"{seconds:.1f} s")
        if self.skipped:
            text += f"; {self.skipped} were there before"
        if self.problems:
            text += f"; {self.problems} problems (see above)"
        return text
