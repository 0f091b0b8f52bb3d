"""Rank 0's decisions in a memory restore (recovery/memory_plan.py), from reports as every
rank sends them: which step, which copies, and when the disk wins. No processes needed:
the decisions are pure functions of the reports (the exchanges are tested in the worlds of
test_memory_restore*.py)."""

from __future__ import annotations

import pytest

from recoverkit.distributed.fetch import Transfer
from recoverkit.errors import IntegrityError
from recoverkit.recovery.memory_plan import HeldCopy, choose, span, unb64, wants_json, wants_of


def _held(owner, step, *, replica=False, crc=None, run="r", world=4):
    return HeldCopy(owner, replica, step, crc if crc is not None else 100 + owner, 50, 4096, run, world).to_json()


def _reports(held_a, held_b, disk=(-1, -1)):
    """Ranks 0, 1 on node a (both report a's slots), 2, 3 on node b."""
    return [
        {"node": "a", "held": held_a, "disk": disk[0]},
        {"node": "a", "held": held_a, "disk": disk[0]},
        {"node": "b", "held": held_b, "disk": disk[1]},
        {"node": "b", "held": held_b, "disk": disk[1]},
    ]


def _ring(step, **kw):
    """Own snapshots of 0, 1 and replicas of 2, 3 on node a; the mirror on node b."""
    a = [_held(0, step, **kw), _held(1, step, **kw), _held(2, step, replica=True, **kw), _held(3, step, replica=True, **kw)]
    b = [_held(2, step, **kw), _held(3, step, **kw), _held(0, step, replica=True, **kw), _held(1, step, replica=True, **kw)]
    return a, b


def test_the_newest_step_every_owner_holds_with_own_copies_first():
    a7, b7 = _ring(7)
    a6, b6 = _ring(6)
    c = choose(_reports(a6 + a7, b6 + b7[:1]), world=4, bad=set(), step=None)  # node b lost 3's step 7
    assert c["ok"] and c["step"] == 7  # 3's step 7 survives as a replica on node a
    assert c["holders"]["3"] == [["a", True]]
    assert c["holders"]["0"] == [["a", False]]
    assert c["holders"]["2"] == [["b", False], ["a", True]]  # own first, then the replica
    assert c["index_from"] == {}  # rank 0's node holds every index
    c = choose(_reports(a7, b7), world=4, bad=set(), step=None)
    assert c["holders"]["0"] == [["a", False], ["b", True]]


def test_rank_0_asks_a_holder_for_an_index_its_node_lacks():
    a7, b7 = _ring(7)
    c = choose(_reports(a7[:2], b7), world=4, bad=set(), step=None)  # node a lost its replicas
    assert c["ok"] and c["holders"]["2"] == [["b", False]]
    assert c["index_from"] == {"2": 2, "3": 2}  # the first rank of node b


def test_a_newer_disk_wins():
    a7, b7 = _ring(7)
    c = choose(_reports(a7, b7, disk=(8, 5)), world=4, bad=set(), step=None)
    assert not c["ok"] and "disk holds step 8" in c["reason"] and not c.get("warn")


def test_as_new_as_the_disk_memory_wins():
    a7, b7 = _ring(7)
    assert choose(_reports(a7, b7, disk=(7, 7)), world=4, bad=set(), step=None)["step"] == 7


def test_a_step_no_live_node_holds_whole_is_refused_naming_the_missing_rank_and_warned():
    a7, b7 = _ring(7)
    c = choose(_reports([x for x in a7 if x[0] != 2], [x for x in b7 if x[0] != 2], disk=(5, 5)), world=4, bad=set(), step=None)
    assert not c["ok"] and c["warn"]
    assert "step 7" in c["reason"] and "[2]" in c["reason"]


def test_nothing_in_memory_is_refused_quietly():
    c = choose(_reports([], [], disk=(5, 5)), world=4, bad=set(), step=None)
    assert not c["ok"] and not c["warn"] and "none held" in c["reason"]


def test_damaged_copies_are_left_out_then_an_older_step_is_taken():
    a7, b7 = _ring(7)
    a6, b6 = _ring(6)
    bad = {(2, 7, "b", False)}
    c = choose(_reports(a6 + a7, b6 + b7), world=4, bad=bad, step=None)
    assert c["step"] == 7 and c["holders"]["2"] == [["a", True]]  # the next holder
    bad.add((2, 7, "a", True))
    c = choose(_reports(a6 + a7, b6 + b7), world=4, bad=bad, step=None)
    assert c["step"] == 6  # no intact copy of 2's step 7 left


def test_copies_of_another_run_or_world_never_mix():
    a7, b7 = _ring(7)
    old = [_held(o, 8, run="old") for o in (0, 1)] + [_held(2, 8, run="old", replica=True)]
    c = choose(_reports(a7 + old, b7 + [_held(3, 8)]), world=4, bad=set(), step=None)  # 8: two runs
    assert c["step"] == 7
    mixed = [_held(0, 9, world=2), _held(1, 9), _held(2, 9, replica=True), _held(3, 9, replica=True)]
    assert choose(_reports(a7 + mixed, b7), world=4, bad=set(), step=None)["step"] == 7  # 9: two worlds
    two = [_held(0, 9, world=2), _held(1, 9, world=2)]  # a whole step of a world of 2: a grow 2 -> 4
    c = choose(_reports(a7 + two, b7), world=4, bad=set(), step=None)
    assert (c["step"], c["owners"], sorted(c["holders"])) == (9, 2, ["0", "1"])


def test_a_snapshot_of_another_world_size_is_restored_into_this_one():
    a7, b7 = _ring(7)
    c = choose(_reports(a7, b7)[:3], world=3, bad=set(), step=None)  # a shrink 4 -> 3
    assert c["ok"] and c["step"] == 7 and c["owners"] == 4 and len(c["places"]) == 3
    assert c["holders"]["3"] == [["b", False], ["a", True]]
    c = choose(_reports(a7, [])[:3], world=3, bad=set(), step=None)  # node b's memory lost too
    assert c["ok"] and c["holders"]["3"] == [["a", True]] and c["index_from"] == {}
    same = [_held(o, 7, world=3, run="later") for o in range(3)]  # the same step in both worlds
    assert choose(_reports(a7 + same, b7)[:3], world=3, bad=set(), step=None)["owners"] == 3


def test_a_step_asked_for():
    a7, b7 = _ring(7)
    a6, b6 = _ring(6)
    assert choose(_reports(a6 + a7, b6 + b7), world=4, bad=set(), step=6)["step"] == 6
    assert not choose(_reports(a6 + a7, b6 + b7), world=4, bad=set(), step=5)["ok"]


def test_copies_with_another_index_are_not_holders_of_the_chosen_one():
    a7, b7 = _ring(7)
    b7 = [x if x[0] != 0 else _held(0, 7, replica=True, crc=999) for x in b7]
    c = choose(_reports(a7, b7), world=4, bad=set(), step=None)
    assert c["holders"]["0"] == [["a", False]]


@pytest.mark.parametrize(
    "bad",
    [[0, 0, 7, 1, 1, 1, "r"], [0, 2, 7, 1, 1, 1, "r", 4], [-1, 0, 7, 1, 1, 1, "r", 4], [0, 0, 7, 1, 1 << 40, 1, "r", 4],
     [0, 0, 7, 1, 1, 1 << 50, "r", 4], [0, 0, 7, 1, 1, 1, 3, 4], [0, 0, 7.0, 1, 1, 1, "r", 4], "x"],
)
def test_a_report_is_parsed_as_hostile_input(bad):
    with pytest.raises(IntegrityError):
        HeldCopy.from_json(bad)


def test_an_index_sent_through_the_coordinator_is_bounded_base64():
    with pytest.raises(IntegrityError):
        unb64("not base64!")
    with pytest.raises(IntegrityError):
        unb64(12)
    assert span({(4096, 10): 0, (0, 8): 0}) == (0, 4106)


@pytest.mark.parametrize(
    "bad",
    [[], {"w": [[0], [1, 2]]}, {"w": [[0, 0], [1, -2]]}, {"w": [[0.0], [1]]}, {"w": [[0], [1], [2]]}, {3: [[0], [1]]},
     {"w": [[0] * 65, [1] * 65]}, {"w": [[1 << 62], [1]]}, {"w": "x"}],
)
def test_a_ranks_sharded_targets_are_parsed_as_hostile_input(bad):
    with pytest.raises(IntegrityError):
        wants_of(bad)


def test_sharded_targets_round_trip_and_none_means_unknown():
    assert wants_of(wants_json({"a/b": ((0, 4), (3, 4))})) == {"a/b": ((0, 4), (3, 4))}
    assert wants_of(None) is None and wants_json(None) is None


def test_a_transfer_may_carry_an_owner_beyond_the_world_only_when_told():
    assert Transfer.from_json([3, 0, 2, 0, 8], world_size=3, owners=4).owner == 3  # a shrink 4 -> 3
    with pytest.raises(IntegrityError):
        Transfer.from_json([3, 0, 2, 0, 8], world_size=3)
    with pytest.raises(IntegrityError):
        Transfer.from_json([4, 0, 2, 0, 8], world_size=3, owners=4)
    with pytest.raises(IntegrityError):
        Transfer.from_json([0, 0, 3, 0, 8], world_size=3, owners=4)  # a receiver outside the world
