"""Issue 11's gap, closed: a data-parallel job restores from memory.

2 ranks of DDP on one node (gloo): the replicated parameters and optimizer state are written
by one owner rank each, so neither rank's snapshot restores it alone. With the tiers
[shm, local every 10], steps 1..12 saved with save_async: the disk holds step 10, memory
steps 11 and 12. A restore in the same processes, and one in fresh processes (a new
Checkpointer on the same root after the first ones died without closing: a crash), both
come from memory (the log names the source), bit-exact, the replicated tensors read from
the owner's slot.
"""

from __future__ import annotations

import logging
import os

import torch

from tests.distributed.harness import run_world


def _make(rank: int):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, opt


def _train(model, opt, rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(8, 32, generator=g)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def _snapshot(model, opt, extra) -> dict:
    out = {f"m/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            out[f"o/{i}/{k}"] = v.detach().clone() if torch.is_tensor(v) else v
    out["extra"] = extra["x"].clone()
    return out


def _diff(a: dict, b: dict) -> list[str]:
    """The keys whose values differ (or that only one side has)."""
    if a.keys() != b.keys():
        return sorted(a.keys() ^ b.keys())
    return [k for k in a if not (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k])]


def _options():
    from recoverkit import CheckpointOptions
    from recoverkit.config import StagingPolicy, TierSpec

    return CheckpointOptions(
        capture_rng=False,
        tiers=[TierSpec.shm(), TierSpec.local(every_steps=10)],
        staging=StagingPolicy(budget_bytes=32 << 20),
    )


def _capture_log() -> list[str]:
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: messages.append(r.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("recoverkit")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return messages


def _train_and_save(rank: int, world: int, root: str, shm_dir: str, restore_here: bool) -> dict:
    os.environ["RECOVERKIT_SHM_DIR"] = shm_dir
    from recoverkit import Checkpointer

    model, opt = _make(rank)
    extra = {"x": torch.zeros(16)}
    state = {"model": model, "optim": opt, "extra": extra}
    ckpt = Checkpointer(root, options=_options())
    for step in range(1, 13):
        _train(model, opt, rank, step)
        extra["x"] = torch.full((16,), float(100 * rank + step))
        ckpt.save_async(step, state)
    ckpt.wait()
    want = _snapshot(model, opt, extra)
    out = {"disk": ckpt.tiers["local"].steps(), "shm": ckpt.tiers["shm"].slots.steps()}
    if restore_here:
        messages = _capture_log()
        for _ in range(3):  # move on, then come back
            _train(model, opt, rank, 99)
        extra["x"] = torch.zeros(16)
        out["step"] = int(ckpt.restore(state))
        out["diff"] = _diff(_snapshot(model, opt, state["extra"]), want)
        out["log"] = [m for m in messages if "restored step" in m]
        ckpt.close()
    # else: the processes end without closing (as a crash does): the slots stay
    return out


def _restart(rank: int, world: int, root: str, shm_dir: str) -> dict:
    os.environ["RECOVERKIT_SHM_DIR"] = shm_dir
    from recoverkit import Checkpointer

    model, opt = _make(rank)
    extra = {"x": torch.zeros(16)}
    state = {"model": model, "optim": opt, "extra": extra}
    # what the first world trained, computed again here for the comparison
    ref_model, ref_opt = _make(rank)
    ref_extra = {"x": torch.zeros(16)}
    for step in range(1, 13):
        _train(ref_model, ref_opt, rank, step)
        ref_extra["x"] = torch.full((16,), float(100 * rank + step))
    messages = _capture_log()
    with Checkpointer(root, options=_options()) as ckpt:
        step = int(ckpt.restore(state))
        diff = _diff(_snapshot(model, opt, state["extra"]), _snapshot(ref_model, ref_opt, ref_extra))
    return {"step": step, "diff": diff, "log": [m for m in messages if "restored step" in m]}


def test_ddp_restores_from_memory_in_the_same_processes(tmp_path):
    out = run_world(2, _train_and_save, str(tmp_path / "ckpt"), str(tmp_path / "shm"), True)
    for r, o in enumerate(out):
        assert o["disk"] == [10] and o["shm"] == [11, 12]
        assert o["step"] == 12 and o["diff"] == []
        assert o["log"] and "with memory restore" in o["log"][0], o["log"]
        assert f"rank {1 - r}'s snapshot from own shm" in o["log"][0]  # the other owner's bytes
    assert not [f for _, _, fs in os.walk(tmp_path / "shm") for f in fs]  # closed: nothing left


def test_ddp_restores_from_memory_after_a_restart(tmp_path):
    root, shm = str(tmp_path / "ckpt"), str(tmp_path / "shm")
    first = run_world(2, _train_and_save, root, shm, False)
    assert [o["shm"] for o in first] == [[11, 12], [11, 12]]
    out = run_world(2, _restart, root, shm)
    for o in out:
        assert o["step"] == 12 and o["diff"] == []
        assert o["log"] and "with memory restore" in o["log"][0], o["log"]
    assert not [f for _, _, fs in os.walk(shm) for f in fs]  # closed normally: nothing left
