"""Generated odd mail: random messages built from the shapes real mail gets wrong.

``odd_messages(seed, count)`` returns raw messages (bytes) with header oddities
(folds, blanks before colons, duplicates, encoded words good and broken, raw 8-bit,
groups, routes, missing domains), MIME oddities (missing or quoted boundaries,
boundaries with junk after them, unclosed multiparts, nested message/rfc822, RFC 2231
parameters, unknown transfer encodings and charsets) and bodies with bare LFs, NULs
and no final line end.  Seeded: the same messages every run.  For differential
checks against Dovecot (tests/test_imap_dovecot_diff.py).
"""
import base64
import random

HEADER_NAMES = [b"Subject", b"From", b"To", b"Cc", b"Bcc", b"Reply-To", b"Sender",
                b"Date", b"Message-ID", b"In-Reply-To", b"References", b"X-Custom",
                b"Received", b"Comments", b"Keywords"]
ADDRS = [
    b"alice@example.org", b"Alice <alice@example.org>", b'"Doe, John" <john@example.com>',
    b"=?utf-8?q?J=C3=B6rg?= <joerg@example.de>", b"=?iso-8859-1?B?Suly9G1l?= <jerome@x.fr>",
    b"undisclosed-recipients:;", b"friends: a@b.c, \"B\" <b@c.d>;", b"<@route.one,@route.two:user@host.org>",
    b"user@[192.168.0.1]", b"(comment) bob@example.net (another)", b"\"quoted local\"@example.com",
    b"nodomain", b"@", b"<>", b"a@b.c, d@e.f,\r\n g@h.i", b"Name With Spaces<x@y.z>",
    b"\"\" <empty@name.org>", b"=?utf-8?b?5pel5pys6Kqe?= <jp@example.jp>", b"broken <a@b", b"a@b>",
    b"J\xc3\xb6rg Raw <raw8@example.de>", b"mary@example.net (Mary Smith)", b"group:;",
    b"=?UTF-8?Q?encoded_but=20broken?= <b@b.b>", b"<just@angle.org>",
]
SUBJECTS = [b"Hello", b"=?utf-8?B?R3LDvMOfZQ==?=", b"=?iso-8859-1?Q?caf=E9?= and more",
            b"Re: [list] thing", b"", b" leading space", b"trailing space ", b"Gr\xc3\xbc\xc3\x9fe raw",
            b"=?utf-8?q?a?= =?utf-8?q?b?=", b"=?bogus?x?y?=", b"folded\r\n subject\r\n\tline",
            b"\"quoted\" (paren) <angle>", b"a" * 300, b"=?UTF-8?B?broken base64!?="]
DATES = [b"Mon, 12 Feb 2024 10:00:00 +0100", b"12 Feb 2024 10:00:00 GMT", b"Tue, 31 Dec 2024 23:59:59 -1200",
         b"garbage date", b"", b"Mon, 12 Feb 2024 10:00 +0100", b"Mon,12 Feb 2024 10:00:00 +0100 (CET)"]
IDS = [b"<id1@example.org>", b"<a@b> <c@d>", b"no-angles@example.org", b"", b"<weird id with spaces>",
       b"<x@y>\r\n <z@w>"]
TYPES = [b"text/plain", b"text/html", b"TEXT/PLAIN", b"application/octet-stream", b"image/png",
         b"text/plain; charset=utf-8", b"text/plain; charset=\"iso-8859-1\"; format=flowed",
         b"text/plain;charset=us-ascii", b"application/pdf; name=\"a b.pdf\"",
         b"text/plain; name*=utf-8''%E2%82%AC.txt", b"text", b"/", b"text/plain; charset",
         b"application/x-foo; a=1; b=\"2\"; c*0=x; c*1=y", b"TeXt/HtMl; CHARSET=UTF-8",
         b"message/delivery-status", b"text/plain (comment)", b"text/plain; charset=utf-8 (c)"]
ENCODINGS = [None, b"7bit", b"8bit", b"base64", b"quoted-printable", b"binary", b"BASE64",
             b"x-uuencode", b"bogus"]
DISPOSITIONS = [None, b"inline", b"attachment", b"attachment; filename=\"f.txt\"",
                b"attachment; filename*=utf-8''%C3%A4.txt", b"INLINE; size=12",
                b"attachment;\r\n filename=\"folded.bin\"", b"weird-disposition"]
BOUNDARIES = [b"b1", b"----=_Part_123", b"with space", b"=_quoted=_", b"a'b()+_,-./:=?",
              b"x" * 70]
TEXTS = [b"Hello world\r\n", b"", b"no final newline", b"line\nbare lf\n", b"Gr\xc3\xbc\xc3\x9fe\r\n",
         b"=C3=A4 qp text=\r\nsoft break\r\n", b"SGVsbG8gYmFzZTY0\r\n", b"\r\n\r\n\r\n",
         b"--notaboundary\r\n", b"long " * 100 + b"\r\n", b"\x00nul\x00\r\n", b"tab\there\r\n",
         b"From start\r\n.\r\n"]


class Gen:
    def __init__(self, seed):
        self.r = random.Random(seed)

    def pick(self, seq):
        return self.r.choice(seq)

    def eol(self):
        return b"\r\n" if self.r.random() < 0.9 else b"\n"

    def header(self, name, value):
        sep = self.pick([b": ", b":", b":  ", b" : ", b":\t"])
        return name + sep + value

    def top_headers(self):
        hs = []
        for name, values in ((b"From", ADDRS), (b"To", ADDRS), (b"Cc", ADDRS), (b"Subject", SUBJECTS),
                             (b"Date", DATES), (b"Message-ID", IDS), (b"In-Reply-To", IDS),
                             (b"Reply-To", ADDRS), (b"Sender", ADDRS), (b"Bcc", ADDRS)):
            p = 0.9 if name in (b"From", b"To", b"Subject", b"Date") else 0.3
            if self.r.random() < p:
                hs.append(self.header(name, self.pick(values)))
            if self.r.random() < 0.05:
                hs.append(self.header(name, self.pick(values)))  # duplicate
        if self.r.random() < 0.3:
            hs.append(b"MIME-Version: 1.0")
        if self.r.random() < 0.1:
            hs.append(b"X-Empty:")
        if self.r.random() < 0.05:
            hs.append(b"NoColonHeaderLine")
        self.r.shuffle(hs)
        return hs

    def mime_headers(self, ctype, encoding=None):
        hs = []
        if ctype is not None:
            hs.append(self.header(self.pick([b"Content-Type", b"content-type", b"CONTENT-TYPE"]), ctype))
        if encoding is not None:
            hs.append(self.header(b"Content-Transfer-Encoding", encoding))
        if self.r.random() < 0.2:
            d = self.pick(DISPOSITIONS)
            if d:
                hs.append(self.header(b"Content-Disposition", d))
        if self.r.random() < 0.1:
            hs.append(b"Content-ID: <cid" + str(self.r.randrange(99)).encode() + b"@x>")
        if self.r.random() < 0.1:
            hs.append(b"Content-Description: " + self.pick(SUBJECTS))
        if self.r.random() < 0.05:
            hs.append(b"Content-Language: " + self.pick([b"en", b"en, de", b"(c) fr"]))
        if self.r.random() < 0.05:
            hs.append(b"Content-Location: " + self.pick([b"http://x/y", b"\"quoted\"", b"a\r\n b"]))
        if self.r.random() < 0.03:
            hs.append(b"Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==")
        return hs

    def leaf(self, depth):
        enc = self.pick(ENCODINGS)
        ctype = self.pick(TYPES + [None])
        body = self.pick(TEXTS)
        if enc in (b"base64", b"BASE64") and self.r.random() < 0.7:
            body = base64.encodebytes(self.r.randbytes(self.r.randrange(0, 200))).replace(b"\n", b"\r\n")
        return self.mime_headers(ctype, enc), body

    def entity(self, depth):
        """(headers, body)"""
        roll = self.r.random()
        if depth < 3 and roll < 0.35:
            return self.multipart(depth)
        if depth < 3 and roll < 0.45:
            inner_h, inner_b = self.message(depth + 1)
            hs = self.mime_headers(self.pick([b"message/rfc822", b"MESSAGE/RFC822", b"message/global"]),
                                   self.pick([None, b"7bit", b"8bit", b"base64"]))
            e = self.eol()
            return hs, e.join(inner_h) + e + e + inner_b
        return self.leaf(depth)

    def multipart(self, depth):
        sub = self.pick([b"mixed", b"alternative", b"related", b"digest", b"signed", b"report", b"MIXED"])
        bnd = self.pick(BOUNDARIES)
        params = self.pick([b'; boundary="' + bnd + b'"', b"; boundary=" + bnd, b'; BOUNDARY="' + bnd + b'"',
                            b"", b'; boundary=""', b';\r\n boundary="' + bnd + b'"; charset=x'])
        hs = self.mime_headers(b"multipart/" + sub + params, self.pick([None, None, b"7bit", b"base64"]))
        e = self.eol()
        parts = []
        for _ in range(self.r.choice([0, 1, 1, 2, 2, 3, 4])):
            if sub == b"digest" and self.r.random() < 0.5:
                # A digest's parts default to message/rfc822: a bare message.
                ih, ib = self.message(depth + 1)
                parts.append(([], e.join(ih) + e + e + ib))
            else:
                parts.append(self.entity(depth + 1))
        out = []
        if self.r.random() < 0.3:
            out.append(b"preamble text" + e)
        for ph, pb in parts:
            line = b"--" + bnd + self.pick([b"", b"", b"", b"  ", b"\t", b"junk"])
            out.append(line + e)
            if ph:
                out.append(e.join(ph) + e)
            if self.r.random() < 0.95 or ph:
                out.append(e)
            out.append(pb)
            if not pb.endswith(b"\n"):
                out.append(e)
        end = self.r.random()
        if end < 0.8:
            out.append(b"--" + bnd + b"--" + e)
        elif end < 0.9:
            out.append(b"--" + bnd + b"--")
        if self.r.random() < 0.2:
            out.append(b"epilogue" + e)
        return hs, b"".join(out)

    def message(self, depth=0):
        hs = self.top_headers()
        mh, body = self.entity(depth)
        hs += mh
        if self.r.random() < 0.1:
            hs = [h.replace(b": ", b":\r\n  ", 1) for h in hs]
        return hs, body

    def raw(self):
        hs, body = self.message()
        e = self.eol()
        if self.r.random() < 0.03:
            return e.join(hs) + e  # no body separator
        return e.join(hs) + e + e + body


def odd_messages(seed, count):
    return [Gen(seed * 100000 + i).raw() for i in range(count)]
