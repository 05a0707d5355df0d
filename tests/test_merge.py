"""The merge rules on their own: every device must reach the same answer."""

from hypothesis import given, settings
from hypothesis import strategies as st

from leapmail.mail.clock import HybridClock
from leapmail.mail.merge import merge_flag_values

FLAGS = ["\\Seen", "\\Flagged", "\\Answered", "$Later", "$label1"]


def value(flags, stamps):
    v = {"mailbox": "m", "message": "c", "flags": flags, "date": 0, "tz": 0}
    if stamps:
        v["hlc"] = stamps
    return v


def test_the_later_change_of_each_flag_wins():
    ours = value(["\\Seen"], {"\\seen": "0000000000010000000a", "\\flagged": "00000000000300000000a"})
    theirs = value(["\\Flagged"], {"\\flagged": "0000000000020000000b"})
    # \Seen: only we touched it. \Flagged: we removed it at 3, they added it at 2.
    assert merge_flag_values(ours, theirs)["flags"] == ["\\Seen"]
    assert merge_flag_values(theirs, ours)["flags"] == ["\\Seen"]


def test_changes_to_different_flags_are_both_kept():
    base = ["\\Seen"]
    ours = value(base + ["\\Flagged"], {"\\flagged": "000000000005000000a"})
    theirs = value(["$Later"], {"\\seen": "000000000006000000b", "$later": "000000000006000000b"})
    merged = merge_flag_values(ours, theirs)
    assert merged["flags"] == ["\\Flagged", "$Later"]
    assert merged["hlc"] == {"\\flagged": "000000000005000000a",
                             "\\seen": "000000000006000000b", "$later": "000000000006000000b"}


def test_keyword_spelling_comes_from_the_winner():
    ours = value(["$LABEL"], {"$label": "000000000001000000a"})
    theirs = value(["$Label"], {"$label": "000000000002000000b"})
    assert merge_flag_values(ours, theirs)["flags"] == ["$Label"]


def test_the_clock_moves_past_what_it_sees():
    now = [1000.0]
    clock = HybridClock(node="aa", wall=lambda: now[0])
    first = clock.now()
    clock.observe("0000000f4240" + "000005" + "bb")  # 1,000,000 ms, counter 5
    later = clock.now()
    assert later > "0000000f4240000005bb" > first
    assert clock.now() > later
    clock.observe("not a stamp")
    assert clock.now() > later


stamps = st.text(alphabet="0123456789abcdef", min_size=3, max_size=3)


@st.composite
def flag_values(draw, node):
    chosen = draw(st.lists(st.sampled_from(FLAGS), unique=True))
    touched = draw(st.dictionaries(st.sampled_from([f.lower() for f in FLAGS]), stamps))
    return value(chosen, {k: s + node for k, s in touched.items()})


@settings(max_examples=300, deadline=None)
@given(flag_values("a"), flag_values("b"), flag_values("c"))
def test_merging_is_order_independent(a, b, c):
    ab = merge_flag_values(a, b)
    assert sorted(ab["flags"]) == sorted(merge_flag_values(b, a)["flags"])
    assert ab.get("hlc") == merge_flag_values(b, a).get("hlc")
    left = merge_flag_values(merge_flag_values(a, b), c)
    right = merge_flag_values(a, merge_flag_values(b, c))
    assert sorted(left["flags"]) == sorted(right["flags"])
    assert merge_flag_values(ab, ab)["flags"] == ab["flags"]
