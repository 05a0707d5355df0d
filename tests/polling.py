"""Waiting for another process to reach a state: poll a condition, with a deadline.

Not a sleep standing in for synchronization: the wait ends as soon as the condition
holds, and fails loudly when it never does.
"""

import time

DEADLINE = 60


def wait_for(condition, what, deadline=DEADLINE, interval=0.05):
    """``condition()``'s first true value; AssertionError naming ``what`` after
    ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
