"""A corpus of raw messages for the MIME code: generated mail plus every tricky shape.

``corpus()`` returns ``[(name, raw_bytes)]``: a few hundred generated messages (seeded,
so the same every run) and the hand-made malformed shapes that real mail has.  The
50 MB message is not in it: ``big_message()`` builds it on demand, because the fast
tests loop over the corpus.

Messages are built as bytes, not with the ``email`` package, so that every byte -
line ends, quoting, folding, broken syntax - is exactly what the test intends.
"""

import base64
import binascii
import hashlib
import random

CRLF = b"\r\n"

TEXTS = [
    ("us-ascii", "Hello,\nthis is a plain message.\nRegards,\nA. Sender\n"),
    ("utf-8", "Grüße aus Köln — ünïcödé ✓\n日本語のテキスト\n테스트 메시지\n"),
    ("iso-8859-1", "Grüße, café, naïve façade.\nÀ bientôt!\n"),
    ("iso-8859-15", "Prix: 10 € - œuvre\n"),
    ("windows-1252", "“Smart quotes” – and an ellipsis…\n"),
    ("koi8-r", "Привет, мир!\nКак дела?\n"),
    ("shift_jis", "日本語のテキストです。\n"),
    ("euc-jp", "こんにちは世界\n"),
    ("iso-2022-jp", "こんにちは、世界。\n"),
    ("gb2312", "中文测试邮件\n"),
    ("big5", "中文測試郵件\n"),
    ("utf-8", "Line with trailing spaces   \nand a very long line " + "x" * 200 + "\n"),
    ("us-ascii", "--\nA signature line above starts with two dashes.\n-- \nSig\n"),
    ("us-ascii", "From the start of a line: From here\n.\n..\nend\n"),
]

HTML = ("<html><head><meta charset=\"utf-8\"></head><body><p>Hello <b>world</b> "
        "&amp; friends — ✓</p><img src=\"cid:{cid}\"></body></html>\n")

NAMES = [
    b'filename="report.pdf"',
    b'filename="my file (final).txt"',
    b"filename*=UTF-8''%E2%82%AC%20rates%202024.txt",
    b"filename*0*=UTF-8''%C3%A4%C3%B6%C3%BC; filename*1*=%20part%20two; filename*2=.doc",
    b'filename="=?UTF-8?B?w6TDtsO8LnR4dA==?="',
    b"filename=plain-token.bin",
    b'filename="quoted \\"inner\\" name.txt"',
    b"filename*=iso-8859-1'de'Gr%FC%DFe.txt",
]

BINARY_TYPES = [
    b"image/png", b"image/jpeg", b"application/pdf", b"application/octet-stream",
    b"audio/ogg", b"video/mp4", b"application/zip", b"application/x-unknown-thing",
    b"APPLICATION/VND.MS-EXCEL", b"font/woff2", b"model/gltf+json",
]


def _b64(data, eol):
    return base64.encodebytes(data).replace(b"\n", eol)


def _qp(data, eol):
    # b2a_qp keeps the input's line ends; give it LF so that eol is the only one.
    return binascii.b2a_qp(data.replace(b"\r\n", b"\n")).replace(b"\n", eol)


def _lines(text, eol):
    return text.replace(b"\r\n", b"\n").replace(b"\n", eol)


class _Gen:
    """Random but reproducible messages, built top-down as bytes."""

    def __init__(self, seed):
        self.r = random.Random(seed)
        self.n = 0

    def uid(self):
        self.n += 1
        return self.n

    def boundary(self):
        r = self.r
        style = r.randrange(5)
        k = self.uid()
        if style == 0:
            return b"----=_Part_%d_%d.%d" % (k, r.randrange(10**6), r.randrange(10**9))
        if style == 1:
            return b"b%d_%x" % (k, r.getrandbits(48))
        if style == 2:
            return b"=_%d'()+_,-./:=?" % k       # every RFC 2046 bchars special
        if style == 3:
            return b"Apple-Mail=_%08X-%04X" % (r.getrandbits(32), k)
        return b"%d==boundary with spaces" % k

    def bparam(self, b):
        # A token may go unquoted; anything with specials or blanks must be quoted.
        if all(c not in b' ()<>@,;:\\"/[]?=' for c in b) and self.r.random() < 0.5:
            return b"boundary=" + b
        return b'boundary="' + b + b'"'

    def mime_headers(self, ctype, params=(), cte=None, extra=True):
        r = self.r
        h = [b"Content-Type: " + ctype + b"".join(b"; " + p for p in params)]
        if cte is not None:
            h.append(b"Content-Transfer-Encoding: " + cte)
        if extra:
            if r.random() < 0.2:
                h.append(b"Content-ID: <part%d.%x@example.org>" % (self.uid(),
                                                                  r.getrandbits(32)))
            if r.random() < 0.15:
                h.append(r.choice([b"Content-Description: A part",
                                   b"Content-Description: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=",
                                   b"Content-Description: folded\r\n  over two lines"]))
            if r.random() < 0.15:
                h.append(b"Content-Language: " + r.choice([b"en", b"de-CH, fr",
                                                           b"en-US (comment), ja"]))
            if r.random() < 0.1:
                h.append(b"Content-Location: http://example.org/part/%d" % self.uid())
        return h

    def text_leaf(self, eol, subtype=b"plain"):
        r = self.r
        charset, text = r.choice(TEXTS)
        if subtype == b"html":
            text = HTML.format(cid=f"img{self.uid()}@example.org")
            charset = "utf-8"
        try:
            data = text.encode(charset)
        except (LookupError, UnicodeError):
            data, charset = text.encode("utf-8"), "utf-8"
        ascii_only = all(c < 128 for c in data)
        cte = r.choice([None, b"7bit"] if ascii_only and r.random() < 0.5
                       else [b"8bit", b"quoted-printable", b"base64", b"Quoted-Printable",
                             b"BASE64"])
        data = data.replace(b"\n", b"\r\n")
        if cte is not None and cte.lower() == b"base64":
            body = _b64(data, eol)
        elif cte is not None and cte.lower() == b"quoted-printable":
            body = _qp(data, eol)
        else:
            body = _lines(data, eol)
        params = [b"charset=" + r.choice([charset.encode(), b'"%s"' % charset.encode(),
                                          charset.upper().encode()])]
        if r.random() < 0.1:
            params.append(b"format=flowed")
        headers = self.mime_headers(b"text/" + subtype, params, cte)
        if r.random() < 0.15:
            headers.append(b"Content-Disposition: inline")
        if r.random() < 0.2:
            digest = base64.b64encode(hashlib.md5(data).digest())
            headers.append(b"Content-MD5: " + digest)
        if r.random() < 0.1 and body.endswith(eol):
            body = body[:-len(eol)]     # no final line end
        return headers, body

    def binary_leaf(self, eol):
        r = self.r
        ctype = r.choice(BINARY_TYPES)
        data = r.randbytes(r.choice([0, 1, 3, 57, 300, 1024, 4000]))
        cte = r.choice([b"base64", b"base64", b"base64", b"binary", b"8bit",
                        b"x-uuencode", b"quoted-printable"])
        if cte == b"base64":
            body = _b64(data, eol)
        elif cte == b"quoted-printable":
            body = _qp(data, eol)
        else:
            body = data
        params = []
        if r.random() < 0.4:
            params.append(b'name="attachment%d.bin"' % self.uid())
        headers = self.mime_headers(ctype, params, cte)
        disp = r.choice([b"attachment", b"inline", b"ATTACHMENT", None])
        if disp is not None:
            dparams = [r.choice(NAMES)]
            if r.random() < 0.3:
                dparams.append(b"size=%d" % len(data))
            if r.random() < 0.2:
                dparams.append(b'creation-date="Mon, 1 Jan 2024 10:00:00 +0000"')
            headers.append(b"Content-Disposition: " + disp +
                           b"".join(b";\r\n\t" + p for p in dparams))
        if r.random() < 0.3:
            headers.append(b"Content-MD5: " + base64.b64encode(hashlib.md5(data).digest()))
        return headers, body

    def multipart(self, eol, depth, subtype=None):
        r = self.r
        subtype = subtype or r.choice([b"mixed", b"mixed", b"alternative", b"related",
                                       b"digest", b"signed", b"report", b"MIXED",
                                       b"x-custom"])
        b = self.boundary()
        params = [self.bparam(b)]
        if subtype == b"related":
            params.append(b'type="text/html"')
        elif subtype == b"signed":
            params.append(b'protocol="application/pgp-signature"; micalg=pgp-sha256')
        elif subtype == b"report":
            params.append(b"report-type=delivery-status")
        children = []
        if subtype == b"alternative":
            children = [self.text_leaf(eol), self.text_leaf(eol, b"html")]
        elif subtype == b"related":
            children = [self.text_leaf(eol, b"html")] + [self.binary_leaf(eol)
                                                          for _ in range(r.randrange(1, 3))]
        elif subtype == b"digest":
            children = [(None, self.message(eol, depth + 1, top=False))
                        for _ in range(r.randrange(1, 4))]
        elif subtype == b"signed":
            children = [self.entity(eol, depth + 1),
                        (self.mime_headers(b"application/pgp-signature", extra=False),
                         _lines(b"-----BEGIN PGP SIGNATURE-----\n\niQEzBAEBCAAd\n"
                                b"-----END PGP SIGNATURE-----\n", eol))]
        elif subtype == b"report":
            children = [self.text_leaf(eol),
                        (self.mime_headers(b"message/delivery-status", extra=False),
                         _lines(b"Reporting-MTA: dns; mx.example.org\n\n"
                                b"Final-Recipient: rfc822; a@example.org\n"
                                b"Action: failed\nStatus: 5.1.1\n", eol)),
                        (self.mime_headers(b"message/rfc822", extra=False),
                         self.message(eol, depth + 1, top=False))]
        else:
            for _ in range(r.randrange(1, 5)):
                children.append(self.entity(eol, depth + 1))
        out = [b"This is a multi-part message in MIME format." + eol
               if r.random() < 0.5 else b""]
        for headers, body in children:
            out.append(b"--" + b + (b"   " if r.random() < 0.05 else b"") + eol)
            if headers:     # None: digest default (message/rfc822, no header)
                out.append(eol.join(headers) + eol)
            out.append(eol + body + eol)
        out.append(b"--" + b + b"--" + eol)
        if r.random() < 0.3:
            out.append(b"epilogue text" + eol)
        headers = [b"Content-Type: multipart/" + subtype +
                   b"".join(b";" + r.choice([b" ", eol + b"\t", eol + b" "]) + p
                            for p in params)]
        if r.random() < 0.1:
            headers.append(b"Content-Description: a multipart")
        return headers, b"".join(out)

    def entity(self, eol, depth):
        r = self.r
        x = r.random()
        if depth < 5 and x < 0.25:
            return self.multipart(eol, depth)
        if depth < 6 and x < 0.35:
            headers = self.mime_headers(b"message/rfc822")
            if r.random() < 0.3:
                headers.append(b'Content-Disposition: attachment; filename="fwd.eml"')
            return headers, self.message(eol, depth + 1, top=False)
        if x < 0.7:
            return self.text_leaf(eol, r.choice([b"plain", b"plain", b"html"]))
        return self.binary_leaf(eol)

    def message(self, eol, depth=0, top=True):
        r = self.r
        k = self.uid()
        subject = r.choice([b"Meeting notes %d" % k,
                            b"=?UTF-8?B?w5xiZXJzaWNodCDinJM=?= %d" % k,
                            b"=?ISO-8859-1?Q?Gr=FC=DFe?= aus =?UTF-8?Q?K=C3=B6ln?=",
                            b"Re: [list] a very long subject that goes on and on and"
                            + eol + b" is folded onto a second line %d" % k])
        headers = []
        if top and r.random() < 0.3:
            headers.append(b"Received: from mx.example.org (mx.example.org [192.0.2.1])"
                           + eol + b"\tby mail.example.net with ESMTPS id %d;" % k
                           + eol + b"\tMon, 1 Jan 2024 10:00:00 +0000")
        headers += [
            b"From: " + r.choice([b"Alice Example <alice@example.org>",
                                  b'"Bob, Jr." <bob@example.net>',
                                  b"=?UTF-8?Q?J=C3=BCrgen?= <juergen@example.de>"]),
            b"To: carol@example.com, Dave <dave@example.com>",
            b"Subject: " + subject,
            b"Date: Mon, %d Jan 2024 10:%02d:00 +0100" % (1 + k % 28, k % 60),
            b"Message-ID: <%d.%x@example.org>" % (k, r.getrandbits(40)),
        ]
        if r.random() < 0.3:
            headers.append(b"Cc: =?UTF-8?B?w4lsb2lzZQ==?= <eloise@example.fr>")
        if r.random() < 0.8:
            headers.append(b"MIME-Version: 1.0")
        if depth < 5 and r.random() < 0.5:
            mh, body = self.multipart(eol, depth)
        elif depth < 5 and r.random() < 0.1:
            mh = self.mime_headers(b"message/rfc822")
            body = self.message(eol, depth + 1, top=False)
        elif r.random() < 0.5:
            mh, body = self.text_leaf(eol)
        else:
            mh, body = self.entity(eol, depth + 3)
        return eol.join(headers + mh) + eol + eol + body


def generated(count=240, seed=2024):
    """``count`` generated messages: plain, multipart of all kinds, nested, attached."""
    g = _Gen(seed)
    out = []
    for i in range(count):
        eol = b"\n" if g.r.random() < 0.15 else CRLF
        suffix = "-lf" if eol == b"\n" else ""
        out.append((f"gen{i:03d}{suffix}", g.message(eol)))
    return out


# ----------------------------------------------------------------------------------------
# The shapes real mail has and RFCs do not

def _mp(boundary_param, body, extra=b""):
    return (b"From: a@example.org\r\nSubject: test\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; " + boundary_param + b"\r\n" + extra +
            b"\r\n" + body)


def deep_multipart(depth):
    """``depth`` multiparts, each the only part of the one around it."""
    head = []
    tail = []
    for i in range(depth):
        head.append(b"--d%d\r\nContent-Type: multipart/mixed; boundary=\"d%d\"\r\n\r\n"
                    % (i, i + 1))
        tail.append(b"\r\n--d%d--\r\n" % i)
    return (b"Content-Type: multipart/mixed; boundary=\"d0\"\r\n\r\n" + b"".join(head) +
            b"--d%d\r\nContent-Type: text/plain\r\n\r\ninnermost\r\n--d%d--" % (depth, depth)
            + b"".join(reversed(tail)))


def deep_rfc822(depth):
    """``depth`` messages, each attached as message/rfc822 to the one around it."""
    return (b"Subject: level\r\nContent-Type: message/rfc822\r\n\r\n" * depth +
            b"Subject: innermost\r\n\r\nbody\r\n")


def deep_mixed(depth):
    """Alternating multipart and message/rfc822 levels."""
    head = []
    tail = []
    for i in range(depth):
        if i % 2:
            head.append(b"Content-Type: message/rfc822\r\n\r\nSubject: %d\r\n" % i)
        else:
            head.append(b"Content-Type: multipart/mixed; boundary=m%d\r\n\r\n--m%d\r\n"
                        % (i, i))
            tail.append(b"\r\n--m%d--\r\n" % i)
    return b"".join(head) + b"\r\ninnermost\r\n" + b"".join(reversed(tail))


def tricky():
    """Hand-made malformed or unusual messages, each named for what it tests."""
    t = []
    add = lambda name, raw: t.append((name, raw))

    add("empty", b"")
    add("only-crlf", b"\r\n")
    add("only-lf", b"\n")
    add("header-only-no-newline", b"Subject: no body\r\nFrom: a@example.org")
    add("header-only-final-newline", b"Subject: no body\r\nFrom: a@example.org\r\n")
    add("header-only-blank-line", b"Subject: no body\r\n\r\n")
    add("starts-with-blank-line", b"\r\nThis message has no header at all.\r\n")
    add("starts-with-blank-line-lf", b"\nno header\n")
    add("no-header-no-blank", b"just some text without a header\r\nsecond line\r\n")
    add("header-line-without-colon",
        b"Subject: x\r\nthis line has no colon\r\nContent-Type: text/html\r\n\r\n<p>hi</p>")
    add("whitespace-before-colon",
        b"Content-Type : multipart/mixed; boundary=z\r\n\r\n--z\r\n\r\nZ\r\n--z--\r\n")
    add("folded-content-type",
        b"Content-Type: multipart/mixed;\r\n\tboundary=\"a b\";\r\n charset=x\r\n\r\n"
        b"--a b\r\nContent-Type:\r\n text/html\r\n\r\n<b>X</b>\r\n--a b--\r\n")
    add("duplicate-content-type",
        b"Content-Type: text/html\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n"
        b"--x\r\n\r\nx\r\n--x--\r\n")
    add("duplicate-content-type-multipart-first",
        b"Content-Type: multipart/mixed; boundary=x\r\nContent-Type: text/plain\r\n\r\n"
        b"--x\r\n\r\nx\r\n--x--\r\n")
    add("uppercase-types",
        b"MIME-Version: 1.0\r\nCONTENT-TYPE: MULTIPART/MIXED; BOUNDARY=\"UP\"\r\n\r\n--UP\r\n"
        b"Content-Type: TEXT/HTML; CHARSET=UTF-8\r\nCONTENT-TRANSFER-ENCODING: BASE64\r\n"
        b"\r\nPGI+aGk8L2I+\r\n--UP\r\nContent-Type: IMAGE/PNG; NAME=\"A.PNG\"\r\n\r\nPNG\r\n"
        b"--UP--\r\n")
    add("quoted-type", b"Content-Type: \"text/plain\"\r\n\r\nbody\r\n")
    add("quoted-subtype-params",
        b"Content-Type: text/plain; charset=\"utf-8\"; format=\"flowed\"\r\n\r\nbody\r\n")
    add("type-without-subtype", b"Content-Type: text\r\n\r\nbody\r\n")
    add("type-image-without-subtype", b"Content-Type: image\r\n\r\nbody\r\n")
    add("type-multipart-without-subtype", b"Content-Type: multipart\r\n\r\nbody\r\n")
    add("type-empty", b"Content-Type:\r\n\r\nbody\r\n")
    add("type-junk-after", b"Content-Type: text/plain junk; charset=utf-8\r\n\r\nbody\r\n")
    add("type-with-comments",
        b"Content-Type: (c) text (c) / (c) plain (c); charset=utf-8 (c)\r\n\r\nbody\r\n")
    add("type-unterminated-comment", b"Content-Type: text/plain (oops\r\n\r\nbody\r\n")
    add("plain-7bit-uppercase",
        b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\nContent-Transfer-Encoding: 7BIT\r\n"
        b"\r\nbody\r\n")
    add("no-mime-version-cte",
        b"Content-Transfer-Encoding: base64\r\nContent-Disposition: inline\r\n\r\nYQ==\r\n")
    add("mime-version-no-type",
        b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\na=3D\r\n")
    add("missing-boundary-parameter",
        _mp(b"charset=us-ascii", b"--x\r\n\r\nhello\r\n--x--\r\n"))
    add("wrong-boundaries", _mp(b"boundary=right", b"--wrong\r\n\r\nP1\r\n--wrong--\r\n"))
    add("no-closing-boundary",
        _mp(b"boundary=b", b"--b\r\n\r\nP1\r\n--b\r\nContent-Type: text/html\r\n\r\nP2\r\n"))
    add("no-closing-inner-boundary",
        _mp(b"boundary=outer",
            b"--outer\r\nContent-Type: multipart/alternative; boundary=inner\r\n\r\n"
            b"--inner\r\n\r\nI1\r\n--inner\r\nContent-Type: text/html\r\n\r\nI2\r\n"
            b"--outer\r\n\r\nO2\r\n--outer--\r\n"))
    add("boundary-prefix-inner-longer",
        _mp(b"boundary=ab",
            b"--ab\r\nContent-Type: multipart/mixed; boundary=abc\r\n\r\n--abc\r\n\r\nI1\r\n"
            b"--ab\r\n\r\nO2\r\n--ab--\r\n"))
    add("boundary-prefix-outer-longer",
        _mp(b"boundary=abc",
            b"--abc\r\nContent-Type: multipart/mixed; boundary=ab\r\n\r\n--ab\r\n\r\nI1\r\n"
            b"--abc\r\n\r\nO2\r\n--abc--\r\n"))
    add("boundary-prefix-trailing-dashes",
        _mp(b"boundary=b",
            b"--b\r\nContent-Type: multipart/mixed; boundary=b--\r\n\r\n--b--\r\n\r\nX\r\n"
            b"--b----\r\n--b--\r\n"))
    add("boundary-same-nested",
        _mp(b"boundary=b",
            b"--b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nI\r\n"
            b"--b--\r\n--b\r\n\r\nO\r\n--b--\r\n"))
    add("boundary-line-junk",
        _mp(b"boundary=b", b"--bxyz\r\n\r\nP1\r\n--b  \r\n\r\nP2\r\n--b--junk\r\nepi\r\n"))
    add("boundary-empty", _mp(b'boundary=""', b"--\r\n\r\nP1\r\n--x\r\n\r\nP2\r\n----\r\n"))
    add("boundary-case", _mp(b"BOUNDARY=B", b"--B\r\n\r\nP1\r\n--b\r\nnot\r\n--B--\r\n"))
    add("boundary-too-long",
        _mp(b'boundary="' + b"L" * 100 + b'"',
            b"--" + b"L" * 100 + b"\r\n\r\nP1\r\n--" + b"L" * 80 + b"X\r\n\r\nP2\r\n--"
            + b"L" * 100 + b"--\r\n"))
    add("boundary-at-eof-no-newline", _mp(b"boundary=b", b"--b\r\n\r\nP1\r\n--b--"))
    add("open-boundary-at-eof-no-newline", _mp(b"boundary=b", b"--b\r\n\r\nP1\r\n--b"))
    add("open-boundary-at-eof-newline", _mp(b"boundary=b", b"--b\r\n\r\nP1\r\n--b\r\n"))
    add("boundary-unterminated-comment",
        _mp(b"boundary=b (x", b"--b\r\n\r\ny\r\n--b--\r\n"))
    add("preamble-epilogue",
        _mp(b"boundary=pe",
            b"This is the preamble.\r\nIt has two lines.\r\n--pe\r\n\r\nP1\r\n--pe--\r\n"
            b"This is the epilogue.\r\n--pe\r\nnot a part any more\r\n"))
    add("empty-multipart", _mp(b"boundary=x", b"--x--\r\n"))
    add("empty-multipart-preamble", _mp(b"boundary=x", b"preamble\r\n--x--\r\nepi\r\n"))
    add("multipart-no-body", _mp(b"boundary=x", b""))
    add("multipart-header-no-blank-line",
        b"Content-Type: multipart/mixed; boundary=b\r\n")
    add("multipart-one-part", _mp(b"boundary=one", b"--one\r\n\r\nonly part\r\n--one--\r\n"))
    add("part-header-ends-at-boundary",
        _mp(b"boundary=x", b"--x\r\nContent-Type: text/plain\r\n--x--\r\n"))
    add("part-blank-line-then-boundary",
        _mp(b"boundary=x", b"--x\r\nContent-Type: text/plain\r\n\r\n--x--\r\n"))
    add("part-empty-between-boundaries", _mp(b"boundary=x", b"--x\r\n--x\r\n\r\nB\r\n--x--\r\n"))
    add("rfc822-empty", _mp(b"boundary=x",
                            b"--x\r\nContent-Type: message/rfc822\r\n\r\n--x--\r\n"))
    add("rfc822-at-eof", b"Content-Type: message/rfc822\r\n")
    add("rfc822-header-only-in-multipart",
        _mp(b"boundary=x",
            b"--x\r\nContent-Type: message/rfc822\r\n\r\nSubject: a\r\nFrom: b\r\n--x--\r\n"))
    add("rfc822-top-level",
        b"Content-Type: message/rfc822\r\n\r\nSubject: in\r\nContent-Type: multipart/mixed;"
        b" boundary=q\r\n\r\n--q\r\n\r\nA\r\n--q\r\n\r\nB\r\n--q--\r\n")
    add("message-global", b"Content-Type: message/global\r\n\r\nSubject: x\r\n\r\nbody\r\n")
    add("digest-defaults",
        b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nSubject: a\r\n\r\nA\r\n"
        b"--d\r\nContent-Type: text/plain\r\n\r\nB\r\n--d\r\n\r\n--d--\r\n")
    add("bare-lf", b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\nP1\n--b\n"
                   b"Content-Type: text/plain\n\nP2\n\n--b--\n")
    add("mixed-crlf-lf", b"Content-Type: multipart/mixed; boundary=b\r\n\n--b\n\r\nP1\r\n\n"
                         b"--b\r\n\nP2\n--b--\r\n")
    add("lone-cr", b"Subject: a\rb\r\nContent-Type: text/plain\r\r\n\r\nline\rwith CR\r\r\n")
    add("cr-only-line-ends", b"Subject: mac\rContent-Type: text/plain\r\rbody\r")
    add("nul-bytes",
        b"Subject: nul\x00here\r\nContent-Type: text/plain; name=\"a\x00b\"\r\n"
        b"Content-ID: <x\x00y>\r\n\r\nbody\x00with\x00nuls\r\n")
    add("nul-in-header-name", b"Content-Type\x00junk: text/html\r\n\r\n<p>x</p>")
    add("8bit-junk-in-headers",
        b"Subject: \xff\xfe junk \xe4\xf6\xfc\r\nFrom: \xc3\xa4 <a@example.org>\r\n"
        b"Content-Type: text/pl\xe4in; name=\xe4b\r\n\r\nbody \xe9\r\n")
    add("unknown-charset",
        b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\nbody \xe9\xff\r\n")
    add("codec-not-a-charset",
        b"Content-Type: text/plain; charset=base64\r\n\r\naGVsbG8=\r\n")
    add("unknown-transfer-encoding",
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-rot13\r\n\r\nuryyb\r\n")
    add("bad-base64",
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"aGVsbG8gd29ybGQ*!!\r\n===\r\nx\r\n")
    add("bad-quoted-printable",
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"a=ZZb=\r\nc=4\r\n=\r\n")
    add("rfc2231-params",
        b"Content-Type: application/octet-stream;\r\n name*0*=UTF-8''%E2%82%AC;\r\n"
        b" name*1*=%20rates; name*2=\".txt\"\r\nContent-Disposition: attachment;\r\n"
        b" filename*=utf-8'en'%E2%82%AC%20rates.txt\r\n\r\ndata\r\n")
    add("rfc2231-missing-index",
        b"Content-Type: text/plain; a*0=x; a*2=z; name*=utf-8''q\r\n\r\nb\r\n")
    add("param-without-value", b"Content-Type: text/plain; charset; format=flowed\r\n\r\nx\r\n")
    add("param-encoded-word-unquoted",
        b"Content-Type: text/plain; name==?utf-8?b?Zm9v?=; x=y\r\n\r\nx\r\n")
    add("content-extension-fields",
        b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\nContent-ID:   <x@y>  \r\n"
        b"Content-Description: foo\r\n  bar\r\nContent-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\n"
        b"Content-Language: en-US, fr\r\nContent-Location: http://x/\r\n y\r\n"
        b"Content-Disposition: attachment; filename=\"a b.txt\"\r\n\r\nbody\r\n")
    add("disposition-override",
        b"Content-Type: text/plain\r\nContent-Disposition: inline\r\n"
        b"Content-Disposition: attachment; filename=a\r\n\r\nx")
    add("ten-thousand-parts",
        _mp(b"boundary=b", b"".join(b"--b\r\n\r\n%d\r\n" % i for i in range(10005))
            + b"--b--\r\nepi\r\n"))
    add("deep-multipart-1000", deep_multipart(1000))
    add("deep-rfc822-1000", deep_rfc822(1000))
    add("deep-mixed-1000", deep_mixed(1000))
    add("deep-multipart-98", deep_multipart(98))
    add("deep-multipart-99", deep_multipart(99))
    add("long-header-line", b"Subject: " + b"x" * 100000 + b"\r\n\r\nbody\r\n")
    add("many-dash-lines",
        _mp(b"boundary=real", b"--real\r\n\r\n" + b"--fake\r\n-- \r\n--\r\n" * 200
            + b"\r\n--real--\r\n"))
    return t


def corpus():
    """Every message of the fast tests: ``[(name, raw)]``, generated then tricky."""
    return generated() + tricky()


def big_message(size=50 * 1024 * 1024):
    """A message with one base64 attachment of about ``size`` bytes, built on demand."""
    # One encoded chunk of whole base64 lines, repeated: cheap to build, and a
    # multiple of 57 input bytes so that every line is a full 76 characters.
    chunk = base64.encodebytes(random.Random(7).randbytes(57 * 16384)).replace(b"\n", CRLF)
    head = (b"From: big@example.org\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"BIG\"\r\n\r\n--BIG\r\n"
            b"Content-Type: text/plain\r\n\r\nSee attachment.\r\n--BIG\r\n"
            b"Content-Type: application/octet-stream; name=big.bin\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n")
    body = chunk * max(1, size // len(chunk))
    return head + body + b"\r\n--BIG--\r\n"
