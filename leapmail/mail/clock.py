"""A hybrid logical clock: the order of flag and mailbox changes across devices.

A stamp is wall-clock milliseconds, a counter for changes within one millisecond (or
while the wall clock lags a stamp seen from another device), and a random id of this
process, so two stamps never tie.  As fixed-width text, stamps sort as strings.  A
device that sees a stamp from another device moves its own clock past it, so a change
made after seeing another is ordered after it even if the two wall clocks disagree.
"""

import os
import threading
import time


class HybridClock:
    def __init__(self, node=None, wall=time.time):
        self.node = node or os.urandom(4).hex()
        self._wall = wall
        self._ms = 0
        self._counter = 0
        self._lock = threading.Lock()

    def now(self):
        with self._lock:
            ms = int(self._wall() * 1000)
            if ms > self._ms:
                self._ms, self._counter = ms, 0
            else:
                self._counter += 1
            return f"{self._ms:012x}{self._counter:06x}{self.node}"

    def observe(self, stamp):
        """Move past ``stamp``, a stamp from another device (ignored if malformed)."""
        try:
            ms, counter = int(stamp[:12], 16), int(stamp[12:18], 16)
        except (TypeError, ValueError):
            return
        with self._lock:
            if (ms, counter) > (self._ms, self._counter):
                self._ms, self._counter = ms, counter


#: The process's clock: every change this process makes is stamped from it.
CLOCK = HybridClock()
