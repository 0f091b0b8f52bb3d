"""save_async: returns at once, copies lazily, never reads a tensor after the optimizer changed it."""

from __future__ import annotations

import threading

import pytest
import torch

from recoverkit import Checkpointer, CheckpointOptions
from recoverkit._native import engine as real_engine
from recoverkit.config import StagingPolicy, TierSpec
from recoverkit.staging.plan import plan_save
from recoverkit.staging.snapshot import HostSnapshot
from tests.models import Trainer, params_equal

PIECE_BYTES = 64 << 20  # CheckpointOptions' default


class GatedEngine:
    """The real engine, with every copy held until ``release`` is set (a slow device-to-host
    link): what a test asserts happens while copies are pending happens for certain, with no
    sleep that hopes to be long enough."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.submitted = 0
        self.landed = 0
        self._cv = threading.Condition()
        self._waiters: set[int] = set()  # threads that waited on a copy still held
        for name in ("StagingPool", "crc32c", "crc32c_ptr", "BACKEND", "write_segment", "read_segment"):
            setattr(self, name, getattr(real_engine, name))

    def CopyEngine(self, threads: int):  # noqa: N802 - mirrors the engine's class name
        inner = real_engine.CopyEngine(threads)
        outer = self

        class _Gated:
            def submit(self, src, dst, n, *, crc=True):
                with outer._cv:
                    outer.submitted += 1
                return _Handle(inner, src, dst, n, outer)

            def close(self):
                inner.close()

        return _Gated()

    def waiting(self, thread: threading.Thread | None = None) -> bool:
        """Wait (60 s at most) until ``thread`` (default: any) waits on a held copy."""
        ident = None if thread is None else thread.ident
        with self._cv:
            return self._cv.wait_for(lambda: bool(self._waiters) if ident is None else ident in self._waiters, 60)

    def _note_waiter(self) -> None:
        with self._cv:
            self._waiters.add(threading.get_ident())
            self._cv.notify_all()

    def _note_landed(self) -> None:
        with self._cv:
            self.landed += 1


class _Handle:
    def __init__(self, inner, src, dst, n, outer):
        self._done = threading.Event()
        self._crc = None
        self._error = None
        self._outer = outer

        def run():
            try:
                if not outer.release.wait(60):
                    raise TimeoutError("the test never released the held copies")
                self._crc = inner.submit(src, dst, n, crc=True).result(None)
                outer._note_landed()
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits
                self._error = e
            self._done.set()

        threading.Thread(target=run, daemon=True).start()

    def _wait(self, timeout_s):
        if not self._done.is_set():
            self._outer._note_waiter()
        return self._done.wait(timeout_s)

    def wait(self, timeout_s=None):
        return self._wait(timeout_s)

    def done(self):
        return self._done.is_set()

    def result(self, timeout_s=None):
        if not self._wait(timeout_s):
            raise TimeoutError("copy not done")
        if self._error is not None:
            raise self._error
        return self._crc


def _opts(**staging):
    return CheckpointOptions(
        tiers=[TierSpec.host(keep=1), TierSpec.local(every_steps=1)],
        staging=StagingPolicy(budget_bytes=64 << 20, eager_bytes=1024, **staging),
    )


def test_save_async_snapshot_is_isolated_from_later_training(root):
    trainer = Trainer(seed=3)
    for _ in range(2):
        trainer.train_step()
    with Checkpointer(root, options=_opts()) as ckpt:
        trainer_state = trainer.state()
        handle = ckpt.save_async(2, trainer_state)
        expected = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        for _ in range(3):
            trainer.train_step()  # mutates the parameters the snapshot is copying
        assert handle.wait(60)
        assert handle.staged.is_set() and handle.durable["local"].is_set()
        assert handle.metrics["bytes"] > 0 and handle.metrics["call_s"] >= 0
        assert "prestep_wait_s" in handle.metrics and "durable_s/local" in handle.metrics
        fresh = Trainer(seed=99)
        ckpt.restore(fresh.state(), step=2)
    got = fresh.model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_prestep_hook_waits_for_slow_copies(root):
    trainer = Trainer(seed=4)
    trainer.train_step()
    slow = GatedEngine()
    landed_when_step_began: list[int] = []
    with Checkpointer(root, options=_opts(), engine=slow) as ckpt:
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        handle = ckpt.save_async(1, trainer.state())
        # the call returned while every lazy copy is still held: it did not wait for them
        assert slow.submitted > 0 and slow.landed == 0 and not handle.done()
        lazy = slow.submitted
        trainer.optimizer.register_step_pre_hook(lambda *a: landed_when_step_began.append(slow.landed))
        step = threading.Thread(target=trainer.train_step)  # the optimizer step must wait for the copies
        step.start()
        try:
            assert slow.waiting(step)  # its pre-step hook waits on a held copy ...
            assert landed_when_step_began == []  # ... and the optimizer has not begun
        finally:
            slow.release.set()
            step.join(60)
        assert not step.is_alive()
        assert handle.wait(60)
        assert handle.metrics["prestep_wait_s"] > 0
        fresh = Trainer(seed=5)
        ckpt.restore(fresh.state(), step=1)
    assert landed_when_step_began and landed_when_step_began[0] >= lazy  # every lazy copy first
    assert all(torch.equal(fresh.model.state_dict()[k], before[k]) for k in before)


def test_buffers_are_copied_eagerly(root):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(16, 8))
    with Checkpointer(root, options=_opts()) as ckpt:
        handle = ckpt.save_async(1, {"model": model, "opt": opt})
        saved_mean = model[1].running_mean.clone()
        model(torch.randn(16, 8) * 5)  # the forward pass changes the running statistics
        assert not torch.equal(model[1].running_mean, saved_mean)
        handle.wait(60)
        target = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
        ckpt.restore({"model": target, "opt": torch.optim.SGD(target.parameters(), lr=0.1)}, step=1)
    assert torch.equal(target[1].running_mean, saved_mean)


def test_full_pool_skips_and_counts(root):
    trainer = Trainer(seed=6)
    slow = GatedEngine()
    state = {"model": trainer.model, "optimizer": trainer.optimizer}  # params: copied lazily
    one_snapshot = HostSnapshot.footprint(plan_save(state, piece_bytes=PIECE_BYTES), 4096)
    opts = CheckpointOptions(
        tiers=[TierSpec.host(keep=0), TierSpec.local(every_steps=1)],
        staging=StagingPolicy(budget_bytes=one_snapshot * 3 // 2, eager_bytes=1024, when_full="skip"),
    )
    with Checkpointer(root, options=opts, engine=slow) as ckpt:
        first = ckpt.save_async(1, state)
        second = ckpt.save_async(2, state)  # pool still busy with step 1: its copies are held
        assert second.skipped and ckpt.skipped_saves == 1
        slow.release.set()
        assert first.wait(60)
        with pytest.raises(Exception, match="staging pool full"):
            second.wait(60)
        assert ckpt.steps() == [1]
        third = ckpt.save_async(3, state)  # space again
        assert third.wait(60) and not third.skipped
        assert ckpt.steps() == [1, 3]


def test_host_snapshot_is_restored_first(root):
    trainer = Trainer(seed=8)
    trainer.train_step()
    opts = CheckpointOptions(tiers=[TierSpec.host(keep=2), TierSpec.local(every_steps=0)], staging=StagingPolicy(budget_bytes=32 << 20))
    with Checkpointer(root, options=opts) as ckpt:
        ckpt.save_async(1, trainer.state()).wait(60)
        assert ckpt.tier.steps() == [] and ckpt.steps() == [1]  # host only: nothing on disk
        expected = Trainer(seed=8)
        expected.train_step()
        trainer.train_step()
        fresh = Trainer(seed=1)
        assert ckpt.restore(fresh.state()) == 1
        assert params_equal(fresh.model, expected.model)


def test_before_update_waits_for_manual_mutation(root):
    t = torch.arange(1 << 16, dtype=torch.float32)
    opt = torch.optim.SGD([torch.nn.Parameter(t)], lr=0.1)
    param = opt.param_groups[0]["params"][0]
    slow = GatedEngine()
    me = threading.current_thread()
    # the copies are released only once this thread waits on them in before_update()
    releaser = threading.Thread(target=lambda: slow.waiting(me) and slow.release.set(), daemon=True)
    with Checkpointer(root, options=_opts(), engine=slow) as ckpt:
        handle = ckpt.save_async(1, {"opt": opt, "p": param})
        releaser.start()
        ckpt.before_update()
        assert slow.release.is_set() and slow.landed == slow.submitted  # it waited for every copy
        with torch.no_grad():
            param.mul_(0)
        handle.wait(60)
        target = {"opt": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1 << 16))], lr=0.1), "p": torch.zeros(1 << 16)}
        ckpt.restore(target, step=1)
    releaser.join(60)
    assert torch.equal(target["p"], torch.arange(1 << 16, dtype=torch.float32))


class _GatedFaults:
    """A real FaultInjector whose first data write waits for a gate (a slow disk)."""

    def __init__(self) -> None:
        from recoverkit.storage.faults import FaultInjector

        self.inner = FaultInjector()
        self.gate = threading.Event()
        self.entered = threading.Event()

    def reached(self, phase, *, step=None, rank=None):
        if phase == "before_data" and step == 1:
            self.entered.set()
            assert self.gate.wait(30)
        self.inner.reached(phase, step=step, rank=rank)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_slow_tier_writes_the_newest_queued_save_instead_of_falling_behind(root):
    faults = _GatedFaults()
    opts = CheckpointOptions(tiers=[TierSpec.host(keep=1), TierSpec.local(every_steps=1)])
    with Checkpointer(root, options=opts, faults=faults) as ckpt:
        x = {"w": torch.zeros(1000)}
        handles = [ckpt.save_async(1, x)]
        assert faults.entered.wait(30)  # step 1 is being written; 2..5 queue up behind it
        for step in range(2, 6):
            x["w"].fill_(step)
            handles.append(ckpt.save_async(step, x))
        faults.gate.set()
        assert ckpt.wait(60)
        assert ckpt.steps() == [1, 5]
        assert [h.superseded for h in handles] == [{}, {"local": 5}, {"local": 5}, {"local": 5}, {}]
        assert all(h.done() and h.error is None for h in handles)
        assert not handles[2].durable["local"].is_set() and handles[4].durable["local"].is_set()
        target = {"w": torch.zeros(1000)}
        assert ckpt.restore(target) == 5
        assert torch.equal(target["w"], torch.full((1000,), 5.0))


def test_a_full_pool_frees_a_waiting_save_that_a_newer_one_supersedes(root):
    faults = _GatedFaults()
    staging = StagingPolicy(budget_bytes=int(2.5 * (1 << 20)), when_full="wait", wait_timeout_s=30)
    opts = CheckpointOptions(tiers=[TierSpec.host(keep=0), TierSpec.local(every_steps=1)], staging=staging)
    with Checkpointer(root, options=opts, faults=faults) as ckpt:
        x = {"w": torch.zeros(1 << 18)}  # 1 MiB: two snapshots fit the pool, three do not
        handles = [ckpt.save_async(1, x)]
        assert faults.entered.wait(30)  # step 1 holds its memory while its write is stuck
        for step in range(2, 6):
            x["w"].fill_(step)
            handles.append(ckpt.save_async(step, x))
            assert handles[-1].metrics["call_s"] < 20  # never waited out the back-pressure timeout
        assert ckpt.skipped_saves == 0
        assert [h.metrics.get("superseded_by") for h in handles] == [None, 3, 4, 5, None]
        assert not any(h.done() for h in handles)  # superseded saves settle with the newer one
        faults.gate.set()
        assert ckpt.wait(60)
        assert all(h.done() and h.error is None for h in handles)
        assert ckpt.steps() == [1, 5]
        target = {"w": torch.zeros(1 << 18)}
        assert ckpt.restore(target) == 5
        assert torch.equal(target["w"], torch.full((1 << 18,), 5.0))
