"""Delivery status notifications (RFC 3464) for mail the provider refused for good."""

import email.utils
import os
import re
import time

_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\b")


def status_of(code, text):
    """The enhanced status code (RFC 3463) of a reply: the one it gives, else the
    class of its reply code."""
    match = _STATUS.match(text or "")
    if match and match.group(1) == str(code)[:1]:
        return match.group(0)
    return f"{str(code)[:1] if code else '5'}.0.0"


def _clean(text):
    # A header field value on one line, ASCII: a remote reply may carry anything.
    return " ".join((text or "").split()).encode("ascii", "replace").decode("ascii")


def delivery_status_notification(sender, failures, original_header, reporting_mta,
                                 arrival=None, now=None):
    """The bytes of a multipart/report bounce to ``sender`` listing ``failures``
    (``(recipient, code, reply)``), with the original message's header attached."""
    now = time.time() if now is None else now
    # The account's own domain: the report is made on this machine, for its user.
    domain = sender.rpartition("@")[2] or "localhost"
    boundary = "=_dsn_" + os.urandom(12).hex()
    listing = "\r\n".join(f"  {rcpt}: {code} {_clean(text)}" for rcpt, code, text in failures)
    human = (
        "Your message could not be delivered to these recipients; the provider\r\n"
        "refused it for good, so it will not be tried again:\r\n\r\n"
        f"{listing}\r\n\r\nThe header of your message follows.\r\n"
    )
    per_message = [f"Reporting-MTA: dns; {reporting_mta}"]
    if arrival is not None:
        per_message.append(f"Arrival-Date: {email.utils.formatdate(arrival)}")
    per_recipient = []
    for rcpt, code, text in failures:
        per_recipient.append("\r\n".join([
            f"Final-Recipient: rfc822; {rcpt}",
            "Action: failed",
            f"Status: {status_of(code, text)}",
            f"Diagnostic-Code: smtp; {code} {_clean(text)}",
        ]))
    status = "\r\n".join(per_message) + "\r\n\r\n" + "\r\n\r\n".join(per_recipient) + "\r\n"
    header = original_header.rstrip(b"\r\n") + b"\r\n"
    head = "\r\n".join([
        f"From: Mail Delivery System <MAILER-DAEMON@{domain}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {email.utils.formatdate(now)}",
        f"Message-ID: <{os.urandom(12).hex()}@{domain}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ])
    return (
        head.encode() + b"\r\n\r\n"
        + f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{human}\r\n"
          .encode()
        + f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n{status}\r\n"
          .encode()
        + f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n".encode()
        + header + f"\r\n--{boundary}--\r\n".encode()
    )


def header_of(data, limit=64 * 1024):
    """The header block at the start of ``data`` (at most ``limit`` bytes)."""
    data = data[:limit]
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = data.find(sep)
        if end >= 0:
            return data[:end + len(sep) // 2]
    return data
