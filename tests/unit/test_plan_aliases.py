"""The save planner: one tensor under several keys is planned once, the other keys become
alias records that point at the key it is stored under (rank prefix included)."""

from __future__ import annotations

import torch

from recoverkit.format.manifest import Manifest, ShardRecord, TensorRecord
from recoverkit.restore.reader import resolve_record
from recoverkit.staging.plan import plan_save
from recoverkit.state.sharded import replicated

PIECE_BYTES = 64 << 20  # CheckpointOptions' default


def _stored(plan) -> list[str]:
    return sorted({p.key for p in plan.shards})


def test_same_tensor_in_two_entries_is_planned_once():
    t = torch.randn(3)
    plan = plan_save({"a": t, "b": {"x": t, "y": [t]}, "c": t.clone()}, capture_rng=False, piece_bytes=PIECE_BYTES)
    assert _stored(plan) == ["a", "c"]
    assert {k: r.alias_of for k, r in plan.aliases.items()} == {"b/x": "a", "b/y/0": "a"}
    assert plan.aliases["b/x"].dtype == "float32" and plan.aliases["b/x"].shape == (3,)


def test_a_state_dicts_detached_copy_is_the_same_tensor():
    model = torch.nn.Linear(2, 2)
    plan = plan_save({"model": model, "w": model.weight}, capture_rng=False, piece_bytes=PIECE_BYTES)
    assert _stored(plan) == ["model/bias", "model/weight"]
    assert plan.aliases["w"].alias_of == "model/weight"


def test_different_views_of_one_storage_are_different_tensors():
    base = torch.randn(4, 4, dtype=torch.complex64)
    plan = plan_save(
        {"a": base, "row": base[0], "t": base.t(), "conj": base.conj(), "f": base.view(torch.float32), "same": base[:]},
        capture_rng=False,
        piece_bytes=PIECE_BYTES,
    )
    assert _stored(plan) == ["a", "conj", "f", "row", "t"]
    assert {k: r.alias_of for k, r in plan.aliases.items()} == {"same": "a"}


def test_empty_tensors_alias_only_as_the_same_object():
    e = torch.zeros(0)
    plan = plan_save({"a": e, "b": e, "c": torch.zeros(0)}, capture_rng=False, piece_bytes=PIECE_BYTES)
    assert _stored(plan) == ["a", "c"]
    assert plan.aliases["b"].alias_of == "a"


def test_rank_local_aliases_carry_the_rank_prefix():
    # a world of 2, rank 1: plain entries are rank-local and stored under rank-00001/
    w = torch.randn(2)
    state = {"m": {"w": w, "tied": w}, "other": w}
    plan = plan_save(state, rank=1, world_size=2, capture_rng=False, piece_bytes=PIECE_BYTES)
    assert _stored(plan) == ["rank-00001/m/w"]
    assert {k: r.alias_of for k, r in plan.aliases.items()} == {
        "rank-00001/m/tied": "rank-00001/m/w",
        "rank-00001/other": "rank-00001/m/w",
    }
    # and the reader finds the bytes from the unprefixed key the object tree names
    shard = plan.shards[0]
    rec = ShardRecord(1, "rank-00001.seg", 0, 8, 0, (0,), (2,))
    tensors = {shard.key: TensorRecord(shard.key, "float32", (2,), (rec,)), **plan.aliases}
    manifest = Manifest(step=1, run_id="r", world_size=2, tensors=tensors)
    assert resolve_record(manifest, "m/tied", 1).key == "rank-00001/m/w"
    assert resolve_record(manifest, "other", 1).key == "rank-00001/m/w"


def test_replicated_and_rank_local_occurrences_are_not_merged():
    w = torch.randn(2)
    plan = plan_save({"r": replicated({"w": w}), "l": {"w": w}}, rank=0, world_size=2, capture_rng=False, piece_bytes=PIECE_BYTES)
    assert "rank-00000/l/w" in _stored(plan) and not plan.aliases
    # the replicated copy is written by its owner rank (rank 0 or 1), never aliased away
    other = plan_save({"r": replicated({"w": w}), "l": {"w": w}}, rank=1, world_size=2, capture_rng=False, piece_bytes=PIECE_BYTES)
    assert sorted(_stored(plan) + _stored(other)) == ["r/w", "rank-00000/l/w", "rank-00001/l/w"]


def test_random_states_are_never_aliased():
    plan = plan_save({"a": torch.ones(2)}, capture_rng=True, piece_bytes=PIECE_BYTES)
    rng = [p.key for p in plan.shards if p.key.startswith("__rng__")]
    assert rng and not any(k.startswith("__rng__") for k in plan.aliases)


def test_a_lazy_conjugate_view_is_not_an_alias(tmp_path):
    from recoverkit import Checkpointer

    t = torch.randn(3, dtype=torch.complex64)
    plan = plan_save({"m": {"a": t, "b": t.conj(), "c": t}}, capture_rng=False, piece_bytes=PIECE_BYTES)
    assert _stored(plan) == ["m/a", "m/b"]
    assert {k: r.alias_of for k, r in plan.aliases.items()} == {"m/c": "m/a"}
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, {"m": {"a": t, "b": t.conj()}})
        state = {"m": None}
        ckpt.restore(state)
    assert torch.equal(state["m"]["b"], t.conj()) and torch.equal(state["m"]["a"], t)


def test_containers_without_sharded_tensors_are_kept_as_they_are():
    size = torch.Size([2, 3])
    meta = {"shapes": [torch.Size([4])], "pair": (1, torch.Size([5]))}
    plan = plan_save({"shape": size, "meta": meta}, capture_rng=False, piece_bytes=PIECE_BYTES)
    from recoverkit.state import decode

    tree = decode(plan.blob)
    assert type(tree["shape"]) is torch.Size and tree["shape"] == size
    assert type(tree["meta"]["shapes"][0]) is torch.Size
