"""Searching a mailbox: a protocol-neutral query tree, compiled to one SQL statement.

The protocol layer parses its own syntax into these nodes (tuples), turning what only
it knows — sequence numbers, \\Recent — into UID ranges first:

    ("all",)                       every message
    ("and", [node, ...])           all of them
    ("or", a, b)  ("not", a)
    ("flag", bit, present)         a system flag (see leapmail.mail.flags) set or not
    ("keyword", name, present)     a keyword set or not (case-insensitive)
    ("uid", [(low, high), ...])    UID ranges, inclusive
    ("larger", n)  ("smaller", n)  RFC822.SIZE
    ("internal", op, day)          op in before/on/since; day a datetime.date, compared
    ("sent", op, day)              with the date in the message's own time zone
    ("header", name, text)         a header field containing text (empty: field present)
    ("body", text)  ("text", text) body text / header and body text
    ("modseq", n)                  MODSEQ >= n

Text matches are case-insensitive substring matches on decoded text (RFC 3501 6.4.4),
served by the trigram full-text index for needles of three characters or more.
Messages the background indexer has not reached yet (``text_pending``: right after a
bulk import or a new device's first sync) are scanned instead, in the same read, so a
search never waits for the index and never misses a message.
"""

import json

_EPOCH_DAY = 719163  # datetime.date(1970, 1, 1).toordinal()
_DAY_OPS = {"before": "<", "on": "=", "since": ">="}


class QueryError(ValueError):
    pass


def _fts_phrase(text):
    return '"' + text.replace('"', '""') + '"'


def _text_condition(column, text, params):
    """Rows of text_index whose ``column`` contains ``text``, case-insensitively."""
    if len(text) >= 3:
        params.append(f"{column}: {_fts_phrase(text)}")
        return "text_index MATCH ?"
    # Trigrams cannot index one or two characters: scan, folding case in Python
    # (SQLite's LIKE folds ASCII only).
    params.append(text)
    return f"contains_folded(text_index.{column}, ?)"


def _balanced(op, parts):
    """``parts`` joined by ``op`` as a balanced tree: SQLite limits expression depth
    to 1,000, and a flat chain of 10,000 search keys would be 10,000 deep."""
    if len(parts) <= 8:
        return "(" + f" {op} ".join(parts) + ")"
    middle = len(parts) // 2
    return f"({_balanced(op, parts[:middle])} {op} {_balanced(op, parts[middle:])})"


def compile_query(node, params, unindexed=None):
    """SQL condition over ``m`` (a row of ``messages``) for ``node``.

    ``unindexed``: ``{(kind, text): [content_row, ...]}``, the messages not in the
    text index yet that match each text key (see :func:`scan_unindexed`).
    """
    kind = node[0]
    if kind == "all":
        return "1"
    if kind == "and":
        return _balanced("AND", [compile_query(child, params, unindexed) for child in node[1]]
                         or ["1"])
    if kind == "or":
        return (f"({compile_query(node[1], params, unindexed)} OR "
                f"{compile_query(node[2], params, unindexed)})")
    if kind == "not":
        return f"(NOT {compile_query(node[1], params, unindexed)})"
    if kind == "flag":
        params.append(node[1])
        return f"((m.sysflags & ?) {'!=' if node[2] else '='} 0)"
    if kind == "keyword":
        params.append(node[1].lower())
        test = "instr(' ' || lower(m.keywords) || ' ', ' ' || ? || ' ') > 0"
        return f"({test})" if node[2] else f"(NOT {test})"
    if kind == "uid":
        if not node[1]:
            return "0"
        if len(node[1]) > 50:
            # One parameter however long the set: SQLite bounds both parameters and
            # expression depth, and a client's UID set is not bounded by us.
            params.append(json.dumps([[low, high] for low, high in node[1]]))
            return ("(EXISTS (SELECT 1 FROM json_each(?) j "
                    "WHERE m.uid BETWEEN j.value ->> 0 AND j.value ->> 1))")
        conditions = []
        for low, high in node[1]:
            params.extend((low, high))
            conditions.append("(m.uid BETWEEN ? AND ?)")
        return _balanced("OR", conditions)
    if kind in ("larger", "smaller"):
        params.append(node[1])
        return f"(m.size {'>' if kind == 'larger' else '<'} ?)"
    if kind in ("internal", "sent"):
        op, day = node[1], node[2]
        if op not in _DAY_OPS:
            raise QueryError(f"unknown date comparison {op!r}")
        params.append(day.toordinal())
        # A message without a usable Date: counts as sent on 1 January 1970, as in
        # Dovecot: SENTBEFORE finds it, SENTSINCE does not.
        column = ("m.internal_day" if kind == "internal"
                  else "(SELECT coalesce(sent_day, %d) FROM contents WHERE rowid = m.content_row)"
                  % _EPOCH_DAY)
        return f"({column} {_DAY_OPS[op]} ?)"
    if kind == "modseq":
        params.append(node[1])
        return "(m.modseq >= ?)"
    if kind == "header":
        name, text = node[1].lower(), node[2]
        params.append(name)
        if text == "":
            return ("(EXISTS (SELECT 1 FROM header_fields h WHERE h.content = m.content_row "
                    "AND h.name = ?))")
        # instr, not LIKE: no pattern-length limit, no wildcards to escape, and the
        # values are stored case-folded already.
        params.append(text.casefold())
        return ("(EXISTS (SELECT 1 FROM header_fields h WHERE h.content = m.content_row "
                "AND h.name = ? AND instr(h.value, ?) > 0))")
    if kind in ("body", "text"):
        text = node[1]
        if text == "":
            return "1"
        if kind == "body":
            condition = _text_condition("body", text, params)
        else:
            condition = _text_condition("{headers body}", text, params) if len(text) >= 3 else (
                "(" + _text_condition("headers", text, params) + " OR "
                + _text_condition("body", text, params) + ")"
            )
        indexed = f"m.content_row IN (SELECT rowid FROM text_index WHERE {condition})"
        if not unindexed:
            return f"({indexed})"
        params.append(json.dumps(unindexed.get((kind, text), [])))
        return f"({indexed} OR m.content_row IN (SELECT value FROM json_each(?)))"
    raise QueryError(f"unknown search key {kind!r}")


def search(queries, mailbox_id, node):
    """UIDs in ``mailbox_id`` matching ``node``, ascending."""
    params = []
    unindexed = scan_unindexed(queries, mailbox_id, node) if uses_text(node) else None
    condition = compile_query(node, params, unindexed)
    sql = (
        f"SELECT m.uid FROM messages m WHERE m.mailbox = ? AND {condition} ORDER BY m.uid"
    )
    return [uid for (uid,) in queries.execute(sql, (mailbox_id, *params))]


def _text_keys(node, keys):
    if node[0] in ("body", "text"):
        if node[1]:
            keys.add((node[0], node[1]))
    elif node[0] == "and":
        for child in node[1]:
            _text_keys(child, keys)
    elif node[0] in ("or", "not"):
        for child in node[1:]:
            _text_keys(child, keys)
    return keys


def scan_unindexed(queries, mailbox_id, node):
    """``{(kind, text): [content_row, ...]}`` (None if nothing waits): which of the mailbox's messages still
    waiting for the text index match each text key of ``node``, found by decoding
    them one at a time as the indexer would, and matching as the index does."""
    from leapmail.mail.message import load_content
    from leapmail.mail.textindex import message_text

    keys = _text_keys(node, set())
    if not keys:
        return None
    found = {key: [] for key in keys}
    rows = queries.execute(
        "SELECT DISTINCT p.content_row, c.doc_id FROM text_pending p "
        "JOIN contents c ON c.rowid = p.content_row "
        "WHERE EXISTS (SELECT 1 FROM messages m WHERE m.content_row = p.content_row "
        "AND m.mailbox = ?)", (mailbox_id,)).fetchall()
    if not rows:
        return None
    folded = [(key, key[1].lower()) for key in keys]
    for row, doc_id in rows:
        content = load_content(queries, doc_id)
        if content is None:
            continue
        headers, body = message_text(queries, content)
        headers, body = headers.lower(), body.lower()
        for key, needle in folded:
            if needle in body or (key[0] == "text" and needle in headers):
                found[key].append(row)
    return found


def uses_text(node):
    """Whether a query needs the full-text index."""
    if node[0] in ("body", "text"):
        return True
    if node[0] == "and":
        return any(uses_text(child) for child in node[1])
    if node[0] in ("or", "not"):
        return any(uses_text(child) for child in node[1:])
    return False
