"""Python values to IMAP wire syntax (RFC 3501 section 4), as bytes.

The mail core (``leapmail.mail``) computes envelopes and body structures as plain
Python structures; this module is where they become IMAP.  Every function returns
bytes ready to be written to the wire.

Strings are written the way Dovecot writes them, so that differential tests can
compare bytes: a quoted string when possible (``\\`` and ``"`` escaped, at most four
of them), a literal ``{n}\\r\\n...`` when the bytes contain CR, LF, NUL or 8-bit
bytes, or are very long.  Subjects and display names use Dovecot's "for humans"
choice: any ``"``, ``\\``, 8-bit byte, tab or doubled space makes a literal.
(Quoted versus literal is the server's free choice in IMAP; NIL versus ``""``,
case, order and extension data are not, and follow Dovecot exactly.)
"""

__all__ = [
    "NIL", "quoted", "literal", "string", "nstring", "astring", "human_nstring",
    "nstring_nolf", "number", "encode_list", "encode_value", "encode_address_list",
    "encode_envelope", "encode_bodystructure",
]

NIL = b"NIL"

# Dovecot switches from a quoted string to a literal after this many characters
# that need a backslash.
QUOTED_MAX_ESCAPES = 4
# Longer strings are sent as literals (Dovecot has no such limit; clients that cut
# long lines do better with literals).
QUOTED_MAX_LENGTH = 4096

_ATOM_SPECIALS = frozenset(b'(){ %*"\\]')
_TEXT_UNSAFE = frozenset(b"\r\n\x00")


def _bytes(value):
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"IMAP string must be bytes or str, not {type(value).__name__}")


def literal(value):
    """``{n}\\r\\n`` followed by the bytes."""
    data = _bytes(value)
    return b"{%d}\r\n" % len(data) + data


def quoted(value):
    """A quoted string; the caller makes sure it holds no CR, LF, NUL or 8-bit byte."""
    data = _bytes(value)
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _needs_literal(data):
    if len(data) > QUOTED_MAX_LENGTH:
        return True
    if not data.isascii():
        return True
    if b"\r" in data or b"\n" in data or b"\x00" in data:
        return True
    return data.count(b"\\") + data.count(b'"') > QUOTED_MAX_ESCAPES


def string(value):
    """An IMAP string (quoted or literal); never NIL."""
    data = _bytes(value)
    return literal(data) if _needs_literal(data) else quoted(data)


def nstring(value):
    """NIL for ``None``, else :func:`string`."""
    return NIL if value is None else string(value)


def human_nstring(value):
    """A subject or display name, with Dovecot's quoted/literal choice for them."""
    if value is None:
        return NIL
    if isinstance(value, (list, tuple)):
        # Normalized from something with line breaks, tabs or extra spaces: Dovecot
        # sends those as literals (an all-blank one as "").
        return literal(value[0]) if value[0] else b'""'
    data = _bytes(value)
    if (len(data) > QUOTED_MAX_LENGTH or not data.isascii() or b'"' in data
            or b"\\" in data or b"\t" in data or b"  " in data
            or any(c in _TEXT_UNSAFE for c in data)
            or (data and (data[0] == 0x20 or data[-1] == 0x20))):
        return literal(data)
    return b'"' + data + b'"'


def nolf(value):
    """Drop CR and LF, putting a space where a line break ran two words together."""
    if value is None:
        return None
    data = _bytes(value)
    if b"\r" not in data and b"\n" not in data:
        return data
    out = bytearray()
    for i, c in enumerate(data):
        if c != 0x0D and c != 0x0A:
            out.append(c)
        elif i + 1 < len(data) and data[i + 1] not in b" \t\r\n":
            out.append(0x20)
    return bytes(out)


def nstring_nolf(value):
    """:func:`nstring` of ``value`` with its line breaks removed (see :func:`nolf`)."""
    return nstring(nolf(value))


def astring(value):
    """An atom when the bytes allow it (not empty, not ``NIL``), else a string."""
    data = _bytes(value)
    if (data and data.isascii() and data.upper() != b"NIL"
            and all(c > 0x20 and c != 0x7F and c not in _ATOM_SPECIALS or c == 0x5D
                    for c in data)):
        return data
    return string(data)


def number(value):
    """A non-negative decimal number."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not an IMAP number: {value!r}")
    return b"%d" % value


def encode_list(items):
    """A parenthesized list of already encoded items."""
    return b"(" + b" ".join(items) + b")"


def encode_value(value):
    """Generic encoding: None -> NIL, int -> number, bytes/str -> string, list -> list."""
    if value is None:
        return NIL
    if isinstance(value, (list, tuple)):
        return encode_list([encode_value(v) for v in value])
    if isinstance(value, int) and not isinstance(value, bool):
        return number(value)
    return string(value)


# --- ENVELOPE --------------------------------------------------------------------

def _encode_address(address):
    name, adl, mailbox, host = address
    return b"(" + b" ".join((human_nstring(name), nstring(adl), nstring(mailbox),
                             nstring(host))) + b")"


def encode_address_list(addresses):
    """``((name adl mailbox host)...)``, or NIL for ``None`` or an empty list."""
    if not addresses:
        return NIL
    return b"(" + b"".join(_encode_address(a) for a in addresses) + b")"


def encode_envelope(env):
    """The parenthesized ENVELOPE of a tuple from :func:`leapmail.mail.envelope.envelope`."""
    (date, subject, from_, sender, reply_to, to, cc, bcc, in_reply_to, message_id) = env
    return b"(" + b" ".join([
        nstring(date), human_nstring(subject),
        encode_address_list(from_), encode_address_list(sender),
        encode_address_list(reply_to), encode_address_list(to),
        encode_address_list(cc), encode_address_list(bcc),
        nstring(in_reply_to), nstring(message_id),
    ]) + b")"


# --- BODY / BODYSTRUCTURE -------------------------------------------------------------

_EMPTY_BODY = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)'
_EMPTY_BODYSTRUCTURE = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL)'


def _lower(value):
    return _bytes(value).lower() if value is not None else None


def _params(params):
    """``("name" "value" ...)`` or NIL for None or no parameters."""
    if not params:
        return NIL
    items = []
    for name, value in params:
        items.append(string(name))
        items.append(string(value if value is not None else b""))
    return encode_list(items)


def _disposition(disposition):
    if disposition is None:
        return NIL
    kind, params = disposition
    return b"(" + string(kind) + b" " + _params(params) + b")"


def _language(language):
    if not language:
        return NIL
    if isinstance(language, (bytes, bytearray, str)):
        language = [language]
    return encode_list([string(tag) for tag in language])


def _extension_common(bs):
    return b" ".join([_disposition(bs.get("disposition")), _language(bs.get("language")),
                      nstring_nolf(bs.get("location"))])


def _is_multipart(bs):
    return "parts" in bs or _lower(bs.get("type")) == b"multipart"


def _is_message_rfc822(bs):
    if "envelope" in bs or "body" in bs:
        return True
    return _lower(bs.get("type")) == b"message" and _lower(bs.get("subtype")) == b"rfc822"


def encode_bodystructure(bs, extension=True):
    """BODYSTRUCTURE (``extension=True``) or BODY (False) of a body-structure dict.

    Non-multipart parts are dicts with ``type``, ``subtype``, ``params`` (list of
    (name, value) or None), ``id``, ``description``, ``encoding``, ``size``,
    ``lines`` (text/* and message/rfc822), ``envelope`` and ``body``
    (message/rfc822), ``md5``, ``disposition`` ((type, params or None) or None),
    ``language`` (list or None) and ``location``.  Multiparts have ``type``
    b"multipart", ``subtype``, ``parts``, ``params``, ``disposition``,
    ``language`` and ``location``.  The result includes the outer parentheses.
    """
    if _is_multipart(bs):
        parts = bs.get("parts") or []
        if parts:
            out = b"".join(encode_bodystructure(p, extension) for p in parts)
        else:
            # a multipart without parts is not allowed: Dovecot shows an empty text
            out = _EMPTY_BODYSTRUCTURE if extension else _EMPTY_BODY
        out += b" " + string(bs.get("subtype") or b"")
        if extension:
            out += b" " + _params(bs.get("params")) + b" " + _extension_common(bs)
        return b"(" + out + b")"

    rfc822 = _is_message_rfc822(bs)
    if rfc822:
        fields = [b'"message" "rfc822"']
    elif bs.get("type") is None:
        fields = [b'"text" "plain"']
    else:
        fields = [string(bs["type"]) + b" " + string(bs.get("subtype") or b"")]
    text = not rfc822 and (bs.get("type") is None or _lower(bs["type"]) == b"text")
    encoding = bs.get("encoding")
    fields += [
        _params(bs.get("params")),
        nstring_nolf(bs.get("id")),
        nstring_nolf(bs.get("description")),
        string(encoding) if encoding is not None else b'"7bit"',
        number(bs.get("size") or 0),
    ]
    if text:
        fields.append(number(bs.get("lines") or 0))
    elif rfc822:
        env = bs.get("envelope")
        fields.append(encode_envelope(env) if env is not None
                      else b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)")
        body = bs.get("body")
        fields.append(encode_bodystructure(body, extension) if body is not None
                      else (_EMPTY_BODYSTRUCTURE if extension else _EMPTY_BODY))
        fields.append(number(bs.get("lines") or 0))
    if extension:
        fields.append(nstring_nolf(bs.get("md5")))
        fields.append(_extension_common(bs))
    return b"(" + b" ".join(fields) + b")"
