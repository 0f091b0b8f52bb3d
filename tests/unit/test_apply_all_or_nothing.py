"""Restore is all or nothing (invariant 6): a damaged part of a checkpoint is found before the
first live object changes, so the model, the optimizer, the scheduler, the data position, the
counters and the random streams stay bit-identical to what they were before the restore."""

from __future__ import annotations

import copy
import json
import os
import random

import numpy as np
import pytest
import torch

from recoverkit import Checkpointer
from recoverkit.errors import IncompatibleCheckpointError
from recoverkit.format.checksum import crc32c
from recoverkit.restore.apply import apply_restored
from recoverkit.staging.plan import RNG_KEY
from recoverkit.state import ResumableSampler, RNGState, capture


def _make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    sampler = ResumableSampler(16, seed=3)
    return {"model": model, "optim": opt, "sched": sched, "data": sampler, "step": 0}


def _train(state, steps):
    model, opt, sched, sampler = state["model"], state["optim"], state["sched"], state["data"]
    it = iter(sampler)
    for _ in range(steps):
        next(it)
        opt.zero_grad()
        model(torch.randn(3, 4)).square().sum().backward()
        opt.step()
        sched.step()
        state["step"] += 1


def _fingerprint(state):
    """Everything a restore could change, deep-copied (tensors cloned)."""
    return copy.deepcopy(
        {
            "model": state["model"].state_dict(),
            "optim": state["optim"].state_dict(),
            "sched": state["sched"].state_dict(),
            "data": state["data"].state_dict(),
            "step": state["step"],
            "rng": (random.getstate(), np.random.get_state(legacy=True), torch.get_rng_state()),
        }
    )


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _saved_and_live():
    """A checkpointable captured tree of step 2, and a live state that moved on to step 5."""
    state = _make()
    _train(state, 2)
    captured = copy.deepcopy({**capture(state), RNG_KEY: RNGState().state_dict()})
    _train(state, 3)
    return captured, state


RNG_DAMAGE = {
    "torch state too short": lambda r: r.update(torch=torch.zeros(16, dtype=torch.uint8)),
    "torch state not bytes": lambda r: r.update(torch=r["torch"].float()),
    "python state version": lambda r: r.update(python=(99, *r["python"][1:])),
    "python state too short": lambda r: r.update(python=(3, r["python"][1][:-5], None)),
    "python word too large": lambda r: r.update(python=(3, (2**40,) + r["python"][1][1:], None)),
    "python gauss not a float": lambda r: r.update(python=(3, r["python"][1], "x")),
    "numpy key too short": lambda r: r.update(
        numpy=(r["numpy"][0], r["numpy"][1][:10], *r["numpy"][2:])
    ),
    "numpy not MT19937": lambda r: r.update(numpy=("PCG64", *r["numpy"][1:])),
    "numpy gaussian not a number": lambda r: r.update(numpy=(*r["numpy"][:4], "x")),
    "cuda state not bytes": lambda r: r.update(cuda=[torch.zeros(16)]),
    "missing stream": lambda r: r.pop("numpy"),
}


@pytest.mark.parametrize("damage", list(RNG_DAMAGE), ids=list(RNG_DAMAGE))
def test_a_damaged_rng_entry_changes_nothing(damage):
    captured, state = _saved_and_live()
    RNG_DAMAGE[damage](captured[RNG_KEY])
    before = _fingerprint(state)
    with pytest.raises(IncompatibleCheckpointError, match="random state"):
        apply_restored(state, captured, restore_rng=True)
    assert _same(_fingerprint(state), before)


def _bad_optimizer_state(c):
    del c["optim"]["state"][0]["step"]  # Adam's __setstate__ needs it


OTHER_DAMAGE = {
    "optimizer state without step": (_bad_optimizer_state, "optim"),
    "optimizer step not a number": (lambda c: c["optim"]["state"][0].update(step="x"), "optim"),
    "optimizer state not a dict": (lambda c: c["optim"]["state"].update({0: "x"}), "optim"),
    "optimizer group not a dict": (
        lambda c: c["optim"].update(param_groups=[[0, 1, 2, 3]]),
        "optim",
    ),
    "optimizer lr not a number": (lambda c: c["optim"]["param_groups"][0].update(lr="fast"), "lr"),
    "optimizer param ids not ints": (
        lambda c: c["optim"]["param_groups"][0].update(params=[[0], 1, 2, 3]),
        "optim",
    ),
    "optimizer moment of a wrong dtype": (
        lambda c: c["optim"]["state"][0].update(
            exp_avg=torch.zeros(8, 4, dtype=torch.uint8).view(torch.bits8)
        ),
        "optim",
    ),
    "scheduler step_size not a number": (lambda c: c["sched"].update(step_size="2"), "step_size"),
    "scheduler not a dict": (lambda c: c.update(sched=[1, 2]), "sched"),
    "sampler seed out of range": (lambda c: c["data"].update(seed=2**64), "seed"),
    "sampler index out of range": (lambda c: c["data"].update(index=10**6), "out of range"),
}


@pytest.mark.parametrize("damage", list(OTHER_DAMAGE), ids=list(OTHER_DAMAGE))
def test_a_damaged_entry_after_the_model_changes_nothing(damage):
    """The model comes first in the state: it used to be loaded before a later entry failed."""
    captured, state = _saved_and_live()
    change, match = OTHER_DAMAGE[damage]
    change(captured)
    before = _fingerprint(state)
    with pytest.raises(IncompatibleCheckpointError, match=match):
        apply_restored(state, captured, restore_rng=True)
    assert _same(_fingerprint(state), before)


@pytest.mark.parametrize("sched_kind", ["lambda", "plateau", "sequential"])
def test_scheduler_states_are_dry_run(sched_kind):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if sched_kind == "lambda":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9**e)
        good = sched.state_dict()
        bad = {**good, "lr_lambdas": [None, None]}  # one lambda here
    elif sched_kind == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
        good = sched.state_dict()
        bad = {**good, "mode": "sideways"}
    else:
        sched = torch.optim.lr_scheduler.SequentialLR(
            opt,
            [torch.optim.lr_scheduler.ConstantLR(opt), torch.optim.lr_scheduler.StepLR(opt, 3)],
            milestones=[2],
        )
        good = sched.state_dict()
        bad = {**good, "_schedulers": good["_schedulers"][:1]}
    state = {"model": model, "sched": sched}
    before = copy.deepcopy(
        {"w": model.state_dict(), "s": sched.state_dict(), "lr": opt.param_groups[0]["lr"]}
    )
    with pytest.raises(IncompatibleCheckpointError, match="'sched'"):
        apply_restored(
            state, {"model": copy.deepcopy(model.state_dict()), "sched": bad}, restore_rng=True
        )
    after = {"w": model.state_dict(), "s": sched.state_dict(), "lr": opt.param_groups[0]["lr"]}
    assert _same(after, before)
    apply_restored(
        state,
        {"model": copy.deepcopy(model.state_dict()), "sched": copy.deepcopy(good)},
        restore_rng=True,
    )


def test_a_valid_restore_still_applies_everything():
    captured, state = _saved_and_live()
    expected_python = captured[RNG_KEY]["python"]
    apply_restored(state, captured, restore_rng=True)
    assert state["step"] == 2 and random.getstate() == expected_python
    assert state["sched"].last_epoch == 2 and state["data"].state_dict()["index"] == 2


# ----------------------------------------------------------- through a real checkpoint
def _resign(manifest_path, change):
    """Edit a manifest's JSON with ``change`` and recompute its checksum (as anyone can)."""
    with open(manifest_path, "rb") as f:
        body = json.loads(f.read())
    change(body)
    body.pop("checksum")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["checksum"] = f"0x{crc32c(canonical):08x}"
    os.unlink(manifest_path)
    with open(manifest_path, "w") as f:
        json.dump(body, f)


def test_a_checkpoint_with_a_damaged_rng_blob_changes_nothing(tmp_path):
    """The blob is rewritten with python's random state at version 99 and the manifest
    re-signed, so every checksum passes and only the content is wrong."""
    root = str(tmp_path / "root")
    state = _make()
    _train(state, 2)
    with Checkpointer(root) as ckpt:
        ckpt.save(2, state)
    step_dir = os.path.join(root, "step-000000002")
    seg = os.path.join(step_dir, "rank-00000.seg")
    with open(os.path.join(step_dir, "manifest.json"), "rb") as f:
        blob_rec = json.loads(f.read())["blobs"][0]
    with open(seg, "rb") as f:
        f.seek(blob_rec["offset"])
        doc = json.loads(f.read(blob_rec["nbytes"]))
    doc["root"][RNG_KEY]["python"]["$tuple"][0] = 99
    blob = json.dumps(doc, separators=(",", ":")).encode()
    with open(seg, "r+b") as f:
        offset = -(-os.fstat(f.fileno()).st_size // 4096) * 4096
        f.seek(offset)
        f.write(blob)

    def point_at_new_blob(body):
        body["blobs"][0].update(offset=offset, nbytes=len(blob), crc32c=crc32c(blob))
        body["files"]["rank-00000.seg"] = offset + len(blob)

    _resign(os.path.join(step_dir, "manifest.json"), point_at_new_blob)

    _train(state, 3)
    before = _fingerprint(state)
    with Checkpointer(root) as ckpt:
        with pytest.raises(IncompatibleCheckpointError, match="random state: 'python'"):
            ckpt.restore(state)
    assert _same(_fingerprint(state), before)
