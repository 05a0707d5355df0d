"""How the mail core merges a document changed on two devices at once.

Sync (``leapmail.sync``) calls a merger when a document it pulls was also changed here
since the last exchange.  A merger returns what the document becomes, and may fix up
other documents in the same transaction; sync pushes the result.  Every rule gives the
same answer whichever device runs it, so devices converge.

- **flags**: per flag, the latest add or remove wins, by hybrid-logical-clock stamp
  (:mod:`leapmail.mail.clock`); so a flag set on one device and another flag cleared
  on the other are both kept.  An expunge wins over a flag change; a move (an expunge
  whose tombstone names the copy it moved to) carries the other device's flag changes
  over to that copy.
- **mailbox**: per field (name, role), the latest change wins; a deletion wins.
- **subscription**: a subscription wins over an unsubscription.
- content, parts and blobs are immutable, named by keyed hashes of their bytes: the
  same id means the same bytes, and there is nothing to merge.
"""

import dataclasses

from leapmail.mail import codec
from leapmail.mail.clock import CLOCK
from leapmail.mail.flags import normalize
from leapmail.mail.schema import FLAGS_KIND, MAILBOX_KIND, MESSAGE_KIND, PART_KIND, SUBSCRIPTION_KIND
from leapmail.store.documents import BLOB_KIND


def merge_flag_values(ours, theirs):
    """Flags document values merged per flag; fields other than flags are ``ours``."""
    stamps_a, stamps_b = ours.get("hlc", {}), theirs.get("hlc", {})
    spelled_a = {f.lower(): f for f in ours["flags"]}
    spelled_b = {f.lower(): f for f in theirs["flags"]}
    stamps, flags = {}, []
    for key in sorted(set(stamps_a) | set(stamps_b) | set(spelled_a) | set(spelled_b)):
        sa, sb = stamps_a.get(key, ""), stamps_b.get(key, "")
        if sa > sb:
            spelling = spelled_a.get(key)
        elif sb > sa:
            spelling = spelled_b.get(key)
        else:
            # Both as they were: present if either has it, spelled the same everywhere.
            spelling = min(filter(None, (spelled_a.get(key), spelled_b.get(key))), default=None)
        if sa or sb:
            stamps[key] = max(sa, sb)
            CLOCK.observe(stamps[key])
        if spelling is not None:
            flags.append(spelling)
    merged = dict(ours)
    merged["flags"] = normalize(flags)
    if stamps:
        merged["hlc"] = stamps
    return merged


def _moved_to(doc):
    if doc.content:
        try:
            return codec.loads(doc.content).get("moved_to")
        except Exception:
            return None
    return None


def _fold_into(txn, target_id, source_value):
    """Carry a flags value's changes over to the copy a move made."""
    target = txn.get(target_id) if target_id else None
    if target is None or target.kind != FLAGS_KIND:
        return
    value = codec.loads(target.content)
    merged = merge_flag_values(value, source_value)
    if merged != value:
        txn.put(target_id, FLAGS_KIND, codec.dumps(merged), expected_rev=target.rev)


def merge_flags(txn, local, remote):
    if remote.deleted and local.deleted:
        return remote
    if remote.deleted:
        _fold_into(txn, _moved_to(remote), codec.loads(local.content))
        return remote
    if local.deleted:
        _fold_into(txn, _moved_to(local), codec.loads(remote.content))
        return local
    merged = merge_flag_values(codec.loads(local.content), codec.loads(remote.content))
    return dataclasses.replace(local, content=codec.dumps(merged))


def merge_mailbox(txn, local, remote):
    if local.deleted:
        return local
    if remote.deleted:
        return remote
    ours, theirs = codec.loads(local.content), codec.loads(remote.content)
    stamps_a, stamps_b = ours.get("hlc", {}), theirs.get("hlc", {})
    merged, stamps = dict(ours), {}
    for name in ("name", "role"):
        a = (stamps_a.get(name, ""), repr(ours.get(name)))
        b = (stamps_b.get(name, ""), repr(theirs.get(name)))
        merged[name] = ours.get(name) if a >= b else theirs.get(name)
        stamp = max(a[0], b[0])
        if stamp:
            stamps[name] = stamp
            CLOCK.observe(stamp)
    if stamps:
        merged["hlc"] = stamps
    return dataclasses.replace(local, content=codec.dumps(merged))


def merge_subscription(txn, local, remote):
    if local.deleted and not remote.deleted:
        return remote
    return local


def keep_remote(txn, local, remote):
    return remote


MERGERS = {
    FLAGS_KIND: merge_flags,
    MAILBOX_KIND: merge_mailbox,
    SUBSCRIPTION_KIND: merge_subscription,
    MESSAGE_KIND: keep_remote,
    PART_KIND: keep_remote,
    BLOB_KIND: keep_remote,
}
