"""The shared-memory tier: every staged step copied before the disk commits, found again by
a new Checkpointer on the same root, verified on read, and removed when the job ends.

Real Checkpointers, real shared-memory files (in a per-test directory), a real training
loop; nothing is mocked.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from recoverkit import Checkpointer, CheckpointOptions
from recoverkit.config import StagingPolicy, TierSpec
from recoverkit.errors import ConfigError, IntegrityError
from recoverkit.storage.faults import FaultInjector
from recoverkit.storage.shm import ShmStore
from tests.models import Trainer, params_equal


@pytest.fixture
def shm(tmp_path):
    path = str(tmp_path / "shm")
    yield path
    for job in ShmStore.jobs(path):  # nothing a test leaves behind outlives it
        ShmStore.remove(job)


def _opts(shm: str, *, local_every: int = 5, **kw) -> CheckpointOptions:
    return CheckpointOptions(
        tiers=[TierSpec.shm(shm_dir=shm, **kw), TierSpec.local(every_steps=local_every)],
        staging=StagingPolicy(budget_bytes=32 << 20),
    )


def _train(ckpt: Checkpointer, trainer: Trainer, steps: int) -> None:
    for _ in range(steps):
        trainer.train_step()
        ckpt.save_async(trainer.step, trainer.state())
    ckpt.wait()


def test_a_new_checkpointer_restores_the_newest_shm_step_bit_exact(root, shm):
    t = Trainer()
    ckpt = Checkpointer(root, options=_opts(shm))
    _train(ckpt, t, 7)
    shm_tier = ckpt.tiers["shm"]
    assert shm_tier.steps() == [6, 7] and ckpt.tiers["local"].steps() == [5]
    assert shm_tier.written == 7 and shm_tier.in_place >= 1  # staged in place where a slot was ready
    ckpt.close(keep_snapshots=True)  # as a crash would leave it
    again = Trainer(seed=1)
    with Checkpointer(root, options=_opts(shm)) as second:  # a new run id: accepted
        assert second.run_id != ckpt.run_id
        state = again.state()
        assert second.restore(state) == 7 and state["step"] == 7
        assert params_equal(again.model, t.model)
        assert second.tiers["shm"].manifest(7).run_id == ckpt.run_id
        # the restored process goes on; its slots are reused, the newest never overwritten
        again.step = 7
        _train(second, again, 3)
        assert second.tiers["shm"].steps() == [9, 10]
        t2 = Trainer()
        _ = [t2.train_step() for _ in range(10)]
        assert params_equal(again.model, t2.model)
    assert ShmStore.jobs(shm) == []  # closed normally: the job's shared memory is gone


def test_the_shm_copy_comes_before_the_disk_commit(root, shm):
    faults = FaultInjector()
    with Checkpointer(root, options=_opts(shm, local_every=1), faults=faults) as ckpt:
        ckpt.save_async(1, {"w": torch.arange(1000.0)})
        ckpt.wait()
    phases = [p for p, step, _ in faults.seen if step == 1]
    assert phases.index("shm_index") < phases.index("before_data")
    assert phases.index("shm_copy") < phases.index("shm_index")


def test_a_shm_failure_is_logged_and_counted_never_fails_the_save(root, shm, caplog):
    # a budget smaller than one snapshot: every shm write fails, every save succeeds
    opts = CheckpointOptions(
        tiers=[TierSpec.shm(shm_dir=shm, budget_bytes=4096), TierSpec.local(every_steps=1)],
        staging=StagingPolicy(budget_bytes=32 << 20),
    )
    with caplog.at_level(logging.WARNING, logger="recoverkit"), Checkpointer(root, options=opts) as ckpt:
        for step in (1, 2):
            ckpt.save_async(step, {"w": torch.zeros(10000)}).wait()
        assert ckpt.wait() and ckpt.tiers["local"].steps() == [1, 2]
        assert ckpt.tiers["shm"].steps() == [] and ckpt.tiers["shm"].failed_writes == 2
        assert ckpt._pipeline.drain.early_failures == {"shm": 2}
    assert "step 1 was not kept in the shm tier (1 failure(s) so far)" in caplog.text and "budget of 4096 bytes" in caplog.text


def test_damaged_shm_bytes_fall_back_to_disk(root, shm):
    w = torch.arange(4096.0)
    ckpt = Checkpointer(root, options=_opts(shm, local_every=1))
    ckpt.save_async(1, {"w": w})
    ckpt.save_async(2, {"w": w + 1})
    ckpt.wait()
    tier = ckpt.tiers["shm"]
    rec = tier.manifest(2).tensors["w"].shards[0]
    ckpt.close(keep_snapshots=True)
    slots = ShmStore(root, shm_dir=shm).slots(0)
    idx = next(i for i in slots.indexes() if i.step == 2)
    k = next(k for k in range(2) if open(os.path.join(slots.dir, f"slot-{k}.index"), "rb").read().find(b'"step":2,') >= 0)
    with open(os.path.join(slots.dir, f"slot-{k}.data"), "r+b") as f:
        f.seek(rec.offset + 8)
        f.write(b"\xff")
    assert idx.data_bytes > rec.offset
    with Checkpointer(root, options=_opts(shm, local_every=1)) as again:
        out = {"w": torch.zeros(4096)}
        with pytest.warns(UserWarning, match="crc"):
            assert again.restore(out) == 2
        assert torch.equal(out["w"], w + 1)  # from the local disk


def test_memory_view_is_read_only_and_bounds_checked(root, shm):
    w = torch.arange(256, dtype=torch.float64)
    with Checkpointer(root, options=_opts(shm)) as ckpt:
        ckpt.save_async(3, {"w": w})
        ckpt.wait()
        tier = ckpt.tiers["shm"]
        rec = tier.manifest(3).tensors["w"].shards[0]
        view = tier.memory_view(3, rec)
        assert view.readonly and bytes(view) == w.numpy().tobytes()
        view.release()
        bad = type(rec)(rec.rank, rec.file, rec.offset, 1 << 40, rec.crc32c, rec.offsets, rec.shape)
        with pytest.raises(IntegrityError, match="is not inside"):
            tier.memory_view(3, bad)
        with pytest.raises(IntegrityError, match="is not inside"):
            tier.read(3, [(type(rec)(0, "../x", 0, 8, 0, (0,), (1,)), bytearray(8))])


def test_a_failed_save_is_withdrawn_from_shm(root, shm):
    faults = FaultInjector().fail_at(phase="before_data", step=2)
    with Checkpointer(root, options=_opts(shm, local_every=1), faults=faults) as ckpt:
        ckpt.save_async(1, {"w": torch.ones(100)}).wait()  # settled before step 2 supersedes it
        ckpt.save_async(2, {"w": torch.ones(100) * 2})
        with pytest.raises(Exception, match="step 2"):
            ckpt.wait()
        assert ckpt.tiers["shm"].steps() == [1]


def test_leaving_with_an_exception_keeps_the_snapshots(root, shm):
    with pytest.raises(RuntimeError, match="boom"), Checkpointer(root, options=_opts(shm)) as ckpt:
        ckpt.save_async(1, {"w": torch.ones(10)})
        ckpt.wait()
        raise RuntimeError("boom")
    [job] = ShmStore.jobs(shm)
    assert job.root == os.path.abspath(root)
    with Checkpointer(root, options=_opts(shm)) as again:
        assert again.tiers["shm"].steps() == [1]
    assert ShmStore.jobs(shm) == []


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="slots"):
        TierSpec.shm(slots=1)
    with pytest.raises(ConfigError, match="budget_bytes"):
        TierSpec.shm(budget_bytes=10)
    with pytest.raises(ConfigError, match="groups"):
        TierSpec.replica(groups=["n0"])
    assert hash(CheckpointOptions(tiers=[TierSpec.replica(groups=[["a"], ["b"]])]))


def test_a_bad_node_name_fails_at_construction(root, shm, monkeypatch):
    monkeypatch.setenv("RECOVERKIT_NODE", "../etc")
    with pytest.raises(ConfigError, match="node name"):
        Checkpointer(root, options=_opts(shm))


def _protected_loop(root: str, shm: str, *, stop: str | None) -> None:
    import signal

    import recoverkit

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [torch.ones(2, 4) * i for i in range(6)]
    with recoverkit.protect(root, model=model, optimizer=opt, loader=loader, options=_opts(shm), save_every=1,
                            log_saves=False, grace_s=30) as run:
        for batch in run:
            model(batch).sum().backward()
            opt.step()
            opt.zero_grad()
            if run.step == 3 and stop == "signal":  # the 4th batch
                os.kill(os.getpid(), signal.SIGTERM)  # preempted: this step is saved, then exit 143
            if run.step == 4 and stop == "error":
                raise RuntimeError("boom")


def test_protect_keeps_shm_after_a_signal_or_an_exception_and_removes_it_at_the_end(root, shm):
    with pytest.raises(SystemExit) as exit_:
        _protected_loop(root, shm, stop="signal")
    assert exit_.value.code == 143
    [job] = ShmStore.jobs(shm)  # the restarted process will want them
    assert ShmStore(root, shm_dir=shm).slots(0).steps()[-1] == 4
    with pytest.raises(RuntimeError, match="boom"):
        _protected_loop(root, shm, stop="error")
    assert ShmStore.jobs(shm) == [job]
    _protected_loop(root, shm, stop=None)  # resumes and runs to the end: the job is over
    assert ShmStore.jobs(shm) == []


def test_small_shards_copied_in_runs_keep_their_alignment_and_bytes(root, shm):
    from recoverkit.staging.shm_tier import _PAGE_FROM

    state = {f"s{i}": torch.arange(1 + i % 13, dtype=(torch.uint8, torch.float16, torch.float64)[i % 3]) for i in range(3000)}
    state["big"] = torch.randn(_PAGE_FROM)  # copied alone, CRC on the fly
    state["empty"] = torch.zeros(0)
    with Checkpointer(root, options=_opts(shm, local_every=0)) as ckpt:
        ckpt.save_async(1, state).wait()
        tier = ckpt.tiers["shm"]
        assert tier.failed_writes == 0
        m = tier.manifest(1)
        for key, t in m.tensors.items():
            size = state[key].element_size() if key in state else 1  # (the RNG's bytes too)
            assert all(s.offset % size == 0 for s in t.shards), key  # natural alignment kept
        ckpt.close(keep_snapshots=True)
    with Checkpointer(root, options=_opts(shm, local_every=0)) as again:
        out = {k: torch.zeros_like(v) for k, v in state.items()}
        assert again.restore(out) == 1
        assert all(torch.equal(out[k], v) for k, v in state.items())


def test_a_rollback_makes_the_abandoned_later_snapshots_unselectable(root, shm):
    """Resuming from an older step abandons the later snapshots: a later restore never
    returns to them (they would mix two timelines), and the slots are reused."""
    t = Trainer()
    opts = _opts(shm, local_every=0, slots=3)
    ckpt = Checkpointer(root, options=opts)
    _train(ckpt, t, 3)
    assert ckpt.tiers["shm"].steps() == [1, 2, 3]
    state = t.state()
    assert ckpt.restore(state, step=1) == 1
    assert ckpt.tiers["shm"].steps() == [1]
    ckpt.close(keep_snapshots=True)
    with Checkpointer(root, options=opts) as second:  # a restart finds only step 1
        again = Trainer(seed=1)
        assert second.restore(again.state()) == 1
        assert second.tiers["shm"].steps() == [1]
