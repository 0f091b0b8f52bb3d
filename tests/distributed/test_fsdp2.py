"""FSDP2 (DTensor) state in real gloo worlds: saved as global shards, resumed bit-exactly, and
resharded into other world sizes and into plain modules (and back)."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.distributed.harness import run_world

STEPS, SAVE_AT = 6, 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 7 and 3 rows: uneven shards on 2 and 3 ranks
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _fsdp(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(1000 * step + rank))


def _train_step(model, opt, step, rank) -> float:
    loss = model(_batch(step, rank)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def _full(tree):
    """Full tensors of a (possibly DTensor) state dict, as nested lists."""
    from recoverkit.state.dtensor import is_dtensor

    if isinstance(tree, dict):
        return {k: _full(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_full(v) for v in tree]
    if isinstance(tree, torch.Tensor):
        return (tree.full_tensor() if is_dtensor(tree) else tree).tolist()
    return tree


def _run(rank, world, root, lazy, resume):
    """Train STEPS steps under FSDP2, saving at SAVE_AT; with ``resume`` start from the save."""
    from recoverkit import Checkpointer, CheckpointOptions
    from recoverkit.config import TierPolicy

    model = _fsdp(_model())
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    opts = CheckpointOptions(tiers=TierPolicy(local_every=1, host_keep=0))
    losses = {}
    with Checkpointer(root, options=opts) as ckpt:
        start = 1
        if resume:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start = ckpt.restore({"model": model, "optim": opt}) + 1
        for step in range(start, STEPS + 1):
            losses[step] = _train_step(model, opt, step, rank)
            if step == SAVE_AT and not resume:
                state = {"model": model, "optim": opt}
                if lazy:
                    handle = ckpt.save_async(step, state)
                else:
                    ckpt.save(step, state)
                saved = {"model": _full(model.state_dict()), "optim": _full(opt.state_dict()["state"])}
        if lazy and not resume:
            assert handle.wait(60) and handle.error is None
    out = {"losses": losses, "final": _full(model.state_dict())}
    if not resume:
        out["saved"] = saved
    return out


@pytest.mark.parametrize("lazy", [False, True], ids=["sync", "lazy"])
def test_fsdp2_resume_is_bit_exact(tmp_path, lazy):
    root = str(tmp_path / "ckpt")
    first = run_world(2, _run, root, lazy, False)
    again = run_world(2, _run, root, lazy, True)
    for rank in range(2):
        assert set(again[rank]["losses"]) == set(range(SAVE_AT + 1, STEPS + 1))
        for step, loss in again[rank]["losses"].items():
            assert loss == first[rank]["losses"][step], (rank, step)
        assert again[rank]["final"] == first[rank]["final"]

    from recoverkit import Checkpointer

    with Checkpointer(root) as ckpt:
        tensors = ckpt.manifest(SAVE_AT).tensors
    w = tensors["model/0.weight"]
    assert tuple(w.shape) == (7, 5)  # stored with its global shape...
    assert sorted((s.rank, tuple(s.offsets)) for s in w.shards) == [(0, (0, 0)), (1, (4, 0))]  # ...one shard per rank
    assert tuple(tensors["optim/state/2/exp_avg"].shape) == (3, 7)


def _restore_fsdp(rank, world, root):
    from recoverkit import Checkpointer

    model = _fsdp(_model())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    with Checkpointer(root) as ckpt, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = ckpt.restore({"model": model, "optim": opt})
    # the restored optimizer state is DTensors with the parameters' placements, and trains on
    exp_avg = opt.state[next(iter(model.parameters()))]["exp_avg"]
    assert type(exp_avg).__name__ == "DTensor"
    out = {"step": step, "model": _full(model.state_dict()), "optim": _full(opt.state_dict()["state"])}
    _train_step(model, opt, 99, rank)
    return out


def test_fsdp2_reshards_to_three_ranks_and_one_plain_process(tmp_path):
    from recoverkit import Checkpointer

    root = str(tmp_path / "ckpt")
    saved = run_world(2, _run, root, False, False)[0]["saved"]

    on_three = run_world(3, _restore_fsdp, root)
    for r in on_three:
        assert r["step"] == SAVE_AT
        assert r["model"] == saved["model"]
        assert r["optim"] == saved["optim"]

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    with Checkpointer(root) as ckpt, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ckpt.restore({"model": model, "optim": opt}) == SAVE_AT
    assert _full(model.state_dict()) == saved["model"]
    assert _full(opt.state_dict()["state"]) == saved["optim"]


def test_plain_checkpoint_restores_into_fsdp2(tmp_path):
    from recoverkit import Checkpointer

    root = str(tmp_path / "ckpt")
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    for step in (1, 2):
        _train_step(model, opt, step, 0)
    with Checkpointer(root) as ckpt:
        ckpt.save(2, {"model": model, "optim": opt})
    expect = {"model": _full(model.state_dict()), "optim": _full(opt.state_dict()["state"])}
    for r in run_world(2, _restore_fsdp, root):
        assert r["step"] == 2
        assert r["model"] == expect["model"]
        assert r["optim"] == expect["optim"]
