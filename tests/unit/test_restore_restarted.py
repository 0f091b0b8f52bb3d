"""Restore in a restarted process (issue 12): a new process, with a freshly built model and a
fresh optimizer that has no state yet, restores the snapshot the dead process left in shared
memory; the optimizer's state tensors are built from the record and take the bytes in place.

Real processes (the first one SIGKILLed, or leaving on an exception), real shared memory (a
per-test directory), real Checkpointers; nothing is mocked. What is checked: the restore is
bit-exact (parameters, every moment, step counts, parameter groups with their options), the
restored optimizer steps on exactly as the saved one; the fresh optimizer's state really is
built in place (new tensors of the saved dtype and shape on the parameter's device, filled
once); a snapshot that does not fit (a layer of another shape or dtype, a moment of another
shape) is refused before anything changes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from recoverkit import Checkpointer, CheckpointOptions
from recoverkit.config import StagingPolicy, TierSpec
from recoverkit.errors import CheckpointNotFoundError, IncompatibleCheckpointError
from recoverkit.restore.in_place import PendingTensor, resolve
from recoverkit.restore.reader import read_state
from recoverkit.storage.shm import ShmStore

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD_TIMEOUT_S = 120
STEPS = 4


@pytest.fixture
def shm(tmp_path):
    path = str(tmp_path / "shm")
    yield path
    for job in ShmStore.jobs(path):  # nothing a test leaves behind outlives it
        ShmStore.remove(job)


def _opts(shm: str) -> CheckpointOptions:
    return CheckpointOptions(
        tiers=[TierSpec.shm(shm_dir=shm), TierSpec.local(every_steps=None)],
        staging=StagingPolicy(budget_bytes=32 << 20),
    )


def _build(seed: int, lr: float = 1e-2):
    """A model with a float64 layer, and AdamW over two groups (one with amsgrad: a third
    moment, other options)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 16).double())
    opt = torch.optim.AdamW(
        [
            {"params": list(model[0].parameters()), "weight_decay": 0.0},
            {"params": list(model[2].parameters()), "amsgrad": True, "betas": (0.8, 0.95)},
        ],
        lr=lr,
    )
    return model, opt


def _step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    out = model[2](model[1](model[0](torch.randn(8, 32, generator=g))).double())
    out.square().mean().backward()
    opt.step()


def _child(mode: str, root: str, shm: str, ref: str, how: str = "sigkill") -> None:
    """The processes of a test: ``save`` trains and saves every step, writes the reference
    state, then dies (``how``); ``restore`` builds everything anew, restores, compares."""
    if mode == "save":
        model, opt = _build(0)
        ckpt = Checkpointer(root, options=_opts(shm))
        for step in range(1, STEPS + 1):
            _step(model, opt, step)
            ckpt.save_async(step, {"model": model, "optim": opt})
        ckpt.wait()
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, ref)
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        with ckpt:  # leaving on an exception keeps the snapshots for the restarted process
            raise SystemExit(3)
    saved = torch.load(ref, weights_only=True)
    model, opt = _build(1, lr=0.5)  # another init, another lr: everything comes from the snapshot
    assert not opt.state
    problems: list[str] = []
    with Checkpointer(root, options=_opts(shm)) as ckpt:
        assert ckpt.tiers["local"].steps() == []  # only shared memory holds a step
        step = ckpt.restore({"model": model, "optim": opt})
        ckpt.close(keep_snapshots=True)
    for k, v in saved["model"].items():
        now = model.state_dict()[k]
        if now.dtype != v.dtype or not torch.equal(now, v):
            problems.append(f"model {k}")
    sd = opt.state_dict()
    if sd["param_groups"] != saved["optim"]["param_groups"]:
        problems.append(f"param_groups {sd['param_groups']} != {saved['optim']['param_groups']}")
    if sorted(sd["state"]) != sorted(saved["optim"]["state"]):
        problems.append("state ids")
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, st in saved["optim"]["state"].items():
        now_st = sd["state"].get(pid, {})
        if sorted(now_st) != sorted(st):
            problems.append(f"state {pid} keys {sorted(now_st)}")
        for k, v in st.items():
            t = now_st.get(k)
            if not isinstance(t, torch.Tensor) or t.dtype != v.dtype or not torch.equal(t, v):
                problems.append(f"state {pid} {k}")
            elif k != "step" and (not t.is_contiguous() or t.device != params[pid].device):
                problems.append(f"state {pid} {k} layout")
    # the restored optimizer steps on exactly as the saved one would
    twin_model, twin_opt = _build(2)
    twin_model.load_state_dict(saved["model"])
    twin_opt.load_state_dict(saved["optim"])
    _step(model, opt, 99)
    _step(twin_model, twin_opt, 99)
    if not all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters())):
        problems.append("the next step differs")
    print(json.dumps({"step": step, "problems": problems}))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from tests.unit.test_restore_restarted import _child; _child(*sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
    )


@pytest.mark.parametrize("how", ["sigkill", "exception"])
def test_a_restarted_process_restores_from_shared_memory_bit_exact(root, shm, tmp_path, how):
    ref = str(tmp_path / "ref.pt")
    first = _run("save", root, shm, ref, how)
    assert first.returncode == (-signal.SIGKILL if how == "sigkill" else 3), first.stderr[-3000:]
    assert ShmStore.jobs(shm), "the dead process left no shared memory"
    for _ in range(2 if how == "sigkill" else 1):  # a second restart restores the same snapshot again
        again = _run("restore", root, shm, ref)
        assert again.returncode == 0, again.stderr[-3000:]
        out = json.loads(again.stdout.strip().splitlines()[-1])
        assert out == {"step": STEPS, "problems": []}


# --------------------------------------------------------------------------- in this process
def _saved(root: str, shm: str, state_fn=None):
    """Save step 1 of a trained model into shared memory, as a dead process leaves it."""
    model, opt = _build(0)
    _step(model, opt, 1)
    state = {"model": model, "optim": opt} if state_fn is None else state_fn(model, opt)
    ckpt = Checkpointer(root, options=_opts(shm))
    ckpt.save_async(1, state).wait()
    ckpt.wait()
    ckpt.close(keep_snapshots=True)
    return model, opt


def test_a_fresh_optimizers_state_is_built_from_the_record_and_filled_in_place(root, shm):
    model, opt = _saved(root, shm)
    fresh_model, fresh_opt = _build(1)
    with Checkpointer(root, options=_opts(shm)) as ckpt:
        tier = ckpt.tiers["shm"]
        tree = read_state(tier, 1, tier.manifest(1), in_place=True)
        moments = [v for st in tree["optim"]["state"].values() for k, v in st.items() if k != "step"]
        assert moments and all(isinstance(v, PendingTensor) for v in moments)
        copies = resolve({"model": fresh_model, "optim": fresh_opt}, tree)
        assert not fresh_opt.state  # nothing changed yet: the targets are new tensors
        built = {id(t) for st in tree["optim"]["state"].values() for k, t in st.items() if k != "step"}
        assert built <= {id(t) for t, _ in copies}  # every moment lands in its new target
        for st in tree["optim"]["state"].values():
            for k, t in st.items():
                assert type(t) is torch.Tensor and (k == "step" or not t.requires_grad)
        ckpt.restore({"model": fresh_model, "optim": fresh_opt})
        ckpt.close(keep_snapshots=True)
    for p, q in zip(fresh_model.parameters(), model.parameters()):
        assert torch.equal(p, q) and fresh_opt.state[p].keys() == opt.state[q].keys()
        for k, v in opt.state[q].items():
            assert torch.equal(fresh_opt.state[p][k], v) and fresh_opt.state[p][k].dtype == v.dtype, k


def _unchanged(model, opt):
    values = [p.detach().clone() for p in model.parameters()]

    def check() -> None:
        assert not opt.state, "the optimizer got state from a refused restore"
        assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values))

    return check


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_a_layer_that_does_not_fit_is_refused_before_anything_changes(root, shm, change):
    _saved(root, shm)
    model, opt = _build(1)
    if change == "shape":
        model[2] = torch.nn.Linear(64, 15).double()
    else:
        model[2] = torch.nn.Linear(64, 16)  # float32 where float64 was saved
    opt = torch.optim.AdamW(
        [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "amsgrad": True}]
    )
    check = _unchanged(model, opt)
    with Checkpointer(root, options=_opts(shm)) as ckpt:
        with pytest.raises(IncompatibleCheckpointError, match="'model'.*2.weight"):
            ckpt.restore({"model": model, "optim": opt})
        ckpt.close(keep_snapshots=True)
    check()


def test_a_moment_of_another_shape_is_refused_before_anything_changes(root, shm):
    """A crafted snapshot: one moment flattened (same bytes, another shape). torch's own
    load_state_dict would take it and fail at the next step."""

    def crafted(model, opt):
        sd = opt.state_dict()
        sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].reshape(-1).clone()
        return {"model": model, "optim": _Saved(sd)}

    _saved(root, shm, crafted)
    model, opt = _build(1)
    check = _unchanged(model, opt)
    with Checkpointer(root, options=_opts(shm)) as ckpt:
        with pytest.raises(IncompatibleCheckpointError, match="'exp_avg' of parameter 0 is \\[2048\\], the parameter \\[64, 32\\]"):
            ckpt.restore({"model": model, "optim": opt})
        ckpt.close(keep_snapshots=True)
    check()


def test_a_restore_that_finds_nothing_changes_nothing(root, shm):
    model, opt = _build(1)
    check = _unchanged(model, opt)
    with Checkpointer(root, options=_opts(shm)) as ckpt, pytest.raises(CheckpointNotFoundError):
        ckpt.restore({"model": model, "optim": opt})
    check()


class _Saved:
    """A Stateful that saves a given optimizer state dict (to craft a snapshot)."""

    def __init__(self, sd):
        self.sd = sd

    def state_dict(self):
        return self.sd

    def load_state_dict(self, sd):  # pragma: no cover - only saved
        self.sd = sd


@pytest.mark.gpu
def test_a_fresh_optimizer_on_a_gpu_gets_its_state_straight_on_the_device(root, shm):
    """The new state tensors are built on the parameter's device: one host -> device copy,
    no host tensor cast or moved by load_state_dict afterwards."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 64, device="cuda")).sum().backward()
    opt.step()
    ckpt = Checkpointer(root, options=_opts(shm))
    ckpt.save_async(1, {"model": model, "optim": opt}).wait()
    ckpt.wait()
    ckpt.close(keep_snapshots=True)
    torch.manual_seed(1)
    fresh = torch.nn.Linear(64, 32).cuda()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    with Checkpointer(root, options=_opts(shm)) as again:
        tier = again.tiers["shm"]
        tree = read_state(tier, 1, tier.manifest(1), in_place=True)
        resolve({"model": fresh, "optim": fresh_opt}, tree)
        for st in tree["optim"]["state"].values():
            assert all(t.device.type == "cuda" for k, t in st.items() if k != "step")
        again.restore({"model": fresh, "optim": fresh_opt})
    for p, q in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(p, q)
        for k, v in opt.state[q].items():
            got = fresh_opt.state[p][k]
            assert got.device == v.device and torch.equal(got, v), k
