"""Message flags: the five system flags as bits, keywords as words.

System flags compare case-insensitively and are kept in their canonical spelling;
keywords keep the spelling they were first given, and compare case-insensitively
too, as Dovecot does.  ``\\Recent`` is not a stored flag: it belongs to a session.
"""

SEEN, ANSWERED, FLAGGED, DELETED, DRAFT = 1, 2, 4, 8, 16
#: The order system flags are listed in, Dovecot's (its bit order): what clients and
#: byte-for-byte comparisons see.
_LISTED = {ANSWERED: 0, FLAGGED: 1, DELETED: 2, SEEN: 3, DRAFT: 4}
SYSTEM = {
    "\\seen": ("\\Seen", SEEN),
    "\\answered": ("\\Answered", ANSWERED),
    "\\flagged": ("\\Flagged", FLAGGED),
    "\\deleted": ("\\Deleted", DELETED),
    "\\draft": ("\\Draft", DRAFT),
}


def normalize(flags):
    """Canonical, duplicate-free, ordered flags: system flags first, then keywords."""
    system, keywords, seen = [], [], set()
    for flag in flags:
        key = flag.lower()
        if key in seen or key == "\\recent":
            continue
        seen.add(key)
        if key in SYSTEM:
            system.append(SYSTEM[key])
        else:
            keywords.append(flag)
    system.sort(key=lambda item: _LISTED[item[1]])
    return [name for name, _ in system] + keywords


def split_flags(flags):
    """``(bits, keywords)`` for a normalized flag list."""
    bits, keywords = 0, []
    for flag in flags:
        entry = SYSTEM.get(flag.lower())
        if entry:
            bits |= entry[1]
        else:
            keywords.append(flag)
    return bits, keywords


def join_flags(bits, keywords):
    names = [name for name, bit in sorted(SYSTEM.values(), key=lambda v: _LISTED[v[1]])
             if bits & bit]
    return names + ([k for k in keywords.split(" ") if k] if isinstance(keywords, str) else list(keywords))


def apply(current, mode, given):
    """The flags after a STORE-like change: ``mode`` is "set", "add" or "remove"."""
    given = normalize(given)
    if mode == "set":
        return given
    if mode == "add":
        return normalize(list(current) + given)
    if mode == "remove":
        drop = {f.lower() for f in given}
        return [f for f in current if f.lower() not in drop]
    raise ValueError(f"unknown flag change {mode!r}")
