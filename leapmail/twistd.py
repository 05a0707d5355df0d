"""What the twistd plugins (the daemon's and the provider's) share.

Option checks that give one clear line for a bad value, and the way a service that
cannot start (a port in use) tells the user in one line rather than a traceback.
"""

import ipaddress
import re
import sys

from twisted.python import usage

from leapmail.errors import LeapmailError


class StartError(LeapmailError):
    """A service cannot start; the message is the whole story, for one line on stderr."""


def parse_port(name, value):
    """``value`` as a port number 0..65535, else a :class:`usage.UsageError`."""
    text = str(value)
    # int() alone would also take " 1984", "+1984", "1_984" and non-ASCII digits.
    if re.fullmatch(r"[0-9]{1,5}", text) and int(text) <= 65535:
        return int(text)
    raise usage.UsageError(f"--{name} must be a port number from 0 to 65535, not {text!r}")


def parse_address(value):
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise usage.UsageError(
            f"--listen must be an IP address such as 127.0.0.1 or ::1, not {value!r}"
        ) from None


def host_port(host, port):
    """``HOST:PORT`` as people write it, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_failure(error):
    """Why ``listenTCP``/``listenSSL`` failed, as the end of a sentence."""
    cause = getattr(error, "socketError", None)
    text = getattr(cause, "strerror", None) or str(cause or error)
    return text[:1].lower() + text[1:]


def report_start_errors(program):
    """Make a :class:`StartError` that reaches ``sys.excepthook`` one line on stderr.

    twistd passes a failure in startService on only as an exception: to its waiting
    parent when it daemonizes, else as a traceback.
    """
    previous = sys.excepthook

    def hook(kind, value, tb):
        if isinstance(value, StartError):
            # twistd has redirected sys.stderr into its log by now; the user is on the
            # real one.
            print(f"{program}: {value}", file=sys.__stderr__, flush=True)
            return
        previous(kind, value, tb)

    sys.excepthook = hook
