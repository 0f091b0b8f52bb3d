"""The fetch plan of a memory restore (distributed/fetch.py): planning, parsing a plan as
hostile input, and running it in a real gloo world (bytes land bit-exact in the receivers'
own buffers; a transfer corrupted in flight is refused without stalling the other rounds)."""

from __future__ import annotations

import pytest

from recoverkit.distributed.fetch import Transfer, plan_transfers, rounds
from recoverkit.errors import IntegrityError
from tests.distributed.harness import run_world


def test_the_load_spreads_over_the_holders_and_never_sends_to_itself():
    needs = {r: {0: (0, 100), 1: (8, 50)} for r in (2, 3, 4, 5)}
    plan = plan_transfers(needs, {0: [0, 1], 1: [1, 0]})
    sent: dict[int, int] = {}
    for t in plan:
        sent[t.src] = sent.get(t.src, 0) + t.nbytes
        assert t.src != t.dst
    assert sent == {0: 300, 1: 300}  # 600 bytes over two holders
    assert plan == plan_transfers(needs, {0: [0, 1], 1: [1, 0]})  # the same on every rank
    with pytest.raises(ValueError, match="no rank can send owner 0"):
        plan_transfers({1: {0: (0, 1)}}, {0: [1]})


def test_rounds_move_one_buffer_per_peer_and_direction():
    ts = [Transfer(o, 0, 1, 0, 4) for o in range(3)] + [Transfer(0, 1, 0, 0, 4), Transfer(0, 2, 1, 0, 4)]
    out = rounds(ts)
    assert sum(map(len, out)) == len(ts)
    for batch in out:
        pairs = [(t.src, t.dst) for t in batch]
        assert len(pairs) == len(set(pairs))


@pytest.mark.parametrize(
    "bad",
    [
        [0, 0, 1, 0],  # four fields
        [0, 1, 1, 0, 4],  # to itself
        [0, 0, 9, 0, 4],  # outside the world
        [0, 0, 1, -1, 4],
        [0, 0, 1, 0, 1 << 63],
        [0, 0, 1, 0, 4.0],
        [0, 0, 1, 0, True],
        {"owner": 0},
    ],
)
def test_a_plan_is_parsed_as_hostile_input(bad):
    with pytest.raises(IntegrityError):
        Transfer.from_json(bad, world_size=4)


def _owner_bytes(owner: int, size: int) -> bytes:
    import torch

    g = torch.Generator().manual_seed(7919 * owner + size)
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g).numpy().tobytes()


def _fetch_world(rank: int, world: int, corrupt: bool) -> dict:
    """Ranks 0 and 1 hold owners 0 and 1 (100 KiB + 3 each); rank 2 needs a slice of both
    and rank 0 needs owner 1's head, in one plan every rank runs."""
    from recoverkit.distributed.fetch import plan_transfers, run_transfers
    from recoverkit.distributed.transport import ProcessGroupTransport
    from recoverkit.errors import IntegrityError

    size = (100 << 10) + 3
    held = {o: _owner_bytes(o, size) for o in (0, 1)} if rank in (0, 1) else {}

    def arrival(peer, payload):
        if corrupt and rank == 2 and peer == 1:
            payload[5] ^= 0xFF

    transport = ProcessGroupTransport(timeout_s=60, on_arrival=arrival)
    needs = {2: {0: (10, 5000), 1: (4096, size - 4096)}, 0: {1: (0, 4096)}}
    plan = plan_transfers(needs, {0: [0, 1], 1: [1, 0]})
    got = {o: bytearray(size) for o in (0, 1)}
    error = None
    try:
        run_transfers(
            transport, plan, timeout_s=60,
            source=lambda t: memoryview(held[t.owner])[t.offset : t.offset + t.nbytes],
            sink=lambda t: memoryview(got[t.owner])[t.offset : t.offset + t.nbytes],
        )
    except IntegrityError as e:
        error = str(e)
    out = {"error": error, "ok": []}
    for o, (off, n) in needs.get(rank, {}).items():
        if bytes(got[o][off : off + n]) == _owner_bytes(o, size)[off : off + n]:
            out["ok"].append(o)
    transport.close()
    return out


def test_a_plan_moves_every_range_bit_exact():
    out = run_world(3, _fetch_world, False)
    assert [o["error"] for o in out] == [None, None, None]
    assert sorted(out[2]["ok"]) == [0, 1] and out[0]["ok"] == [1]


def test_a_transfer_corrupted_in_flight_fails_on_both_ends_and_the_others_complete():
    out = run_world(3, _fetch_world, True)
    assert out[2]["error"] and "CRC-32C" in out[2]["error"]
    assert out[1]["error"] and "failed their CRC-32C" in out[1]["error"]
    assert out[0]["error"] is None and out[0]["ok"] == [1]  # its own round was not held up
    assert 0 in out[2]["ok"]
