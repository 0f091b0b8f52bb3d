"""Issue 11's house: tiers as a list from a registry, one commit path, split pipeline
metrics, the step-hook seam, one manifest builder, and TierPolicy's deprecation."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

from recoverkit import Checkpointer, CheckpointOptions, CommitError
from recoverkit.config import StagingPolicy, TierPolicy, TierSpec, default_tiers
from recoverkit.distributed.coordinator import LocalCoordinator
from recoverkit.errors import ConfigError
from recoverkit.staging.base import StepHooks
from recoverkit.staging.registry import _KINDS, register_tier
from recoverkit.staging.schedule import Schedule
from recoverkit.storage.local import LocalTier
from tests.unit.test_lazy_save import GatedEngine


def _state(v: float) -> dict[str, object]:
    return {"w": torch.full((64,), v), "n": int(v)}


@pytest.fixture
def kind():
    """Register tier kinds for one test and remove them afterwards."""
    added: list[str] = []

    def add(name, factory):
        register_tier(name)(factory)
        added.append(name)

    yield add
    for name in added:
        del _KINDS[name]


# ------------------------------------------------------------------ the tier list
def test_default_list_is_host_then_local_every_step():
    opts = CheckpointOptions()
    assert opts.tier_specs == default_tiers()
    assert [(t.kind, t.every_steps, dict(t.settings)) for t in opts.tier_specs] == [
        ("host", 1, {"keep": 1}),
        ("local", 1, {}),
    ]


def test_tier_policy_still_works_with_a_deprecation_warning_and_becomes_its_list():
    with pytest.warns(DeprecationWarning, match="TierPolicy is deprecated"):
        opts = CheckpointOptions(
            tiers=TierPolicy(local_every=2, persistent_url="file:///x", persistent_every=4)
        )
    assert [t.name for t in opts.tier_specs] == ["host", "local", "persistent"]
    assert [t.name for t in opts.tier_specs if t.due(4)] == ["host", "local", "persistent"]
    assert [t.name for t in opts.tier_specs if t.due(2)] == ["host", "local"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TierPolicy(compression="zstd")  # building one alone (e.g. for ZarrTier) does not warn


def test_bad_tier_lists_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="unique"):
        CheckpointOptions(tiers=[TierSpec.local(), TierSpec.local()])
    with pytest.raises(ConfigError, match="list of TierSpec"):
        CheckpointOptions(tiers=["local"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="every_steps"):
        TierSpec(kind="local", every_steps=-1)
    with pytest.raises(ConfigError, match="unknown tier kind 'tape'"):
        Checkpointer(str(tmp_path / "a"), options=CheckpointOptions(tiers=[TierSpec(kind="tape")]))
    with pytest.raises(ConfigError, match="no setting"):
        Checkpointer(
            str(tmp_path / "b"),
            options=CheckpointOptions(tiers=[TierSpec(kind="local", settings={"url": "x"})]),
        )


def test_a_new_tier_is_one_registered_class_and_the_checkpointer_writes_it(tmp_path, kind):
    class MirrorTier(LocalTier):
        """A second disk, as a new kind: nothing else in the Checkpointer knows of it."""

    kind(
        "mirror",
        lambda spec, ctx: MirrorTier(str(spec.settings["root"]), fs=ctx.fs, faults=ctx.faults),
    )
    mirror = str(tmp_path / "mirror")
    tiers = [TierSpec.local(), TierSpec(kind="mirror", every_steps=2, settings={"root": mirror})]
    with Checkpointer(str(tmp_path / "main"), options=CheckpointOptions(tiers=tiers)) as ckpt:
        assert [ckpt.save(s, _state(s)).committed_to for s in (1, 2)] == [
            ("local",),
            ("local", "mirror"),
        ]
        handle = ckpt.save_async(4, _state(4))
        assert handle.wait(60) and handle.committed_to == ["local", "mirror"]
        assert isinstance(ckpt.tiers["mirror"], MirrorTier) and ckpt.tiers["mirror"].steps() == [
            2,
            4,
        ]
    back = _state(0)
    with Checkpointer(mirror, options=CheckpointOptions(tiers=[TierSpec.local()])) as only:
        assert only.restore(back) == 4 and back["n"] == 4


def test_a_named_local_tier_at_another_root_is_locked_and_written(tmp_path):
    other = str(tmp_path / "scratch")
    tiers = [
        TierSpec.local(),
        TierSpec(kind="local", name="scratch", settings={"root": other}, every_steps=3),
    ]
    with Checkpointer(str(tmp_path / "main"), options=CheckpointOptions(tiers=tiers)) as ckpt:
        assert ckpt.save(3, _state(3)).committed_to == ("local", "scratch")
        assert ckpt.tiers["scratch"].steps() == [3]
        from recoverkit.errors import CheckpointLockedError

        with pytest.raises(CheckpointLockedError):  # another job may not write there meanwhile
            Checkpointer(other)


def test_a_time_schedule_is_due_at_once_then_every_so_many_seconds():
    now = [100.0]
    s = Schedule(
        [TierSpec.local(every_steps=None, every_s=60.0), TierSpec(kind="p", every_steps=5)],
        coordinator=LocalCoordinator(),
        scope="t",
        clock=lambda: now[0],
    )
    assert s.due(1) == ("local",)  # never written yet: due at once
    now[0] += 30
    assert s.due(2) == ()
    now[0] += 30
    assert s.due(3) == ("local",)
    assert s.due(5) == ("p",)


# -------------------------------------------------------------- one commit path
class _BrokenTier(LocalTier):
    def write_rank(self, staging, payload):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")


def test_both_saves_fail_alike_through_the_one_committer(tmp_path, kind):
    kind(
        "broken",
        lambda spec, ctx: _BrokenTier(str(tmp_path / "broken"), fs=ctx.fs, faults=ctx.faults),
    )
    tiers = [
        TierSpec.host(),
        TierSpec.local(),
        TierSpec(kind="broken"),
        TierSpec(kind="local", name="never", settings={"root": str(tmp_path / "n")}),
    ]
    with Checkpointer(str(tmp_path / "main"), options=CheckpointOptions(tiers=tiers)) as ckpt:
        with pytest.raises(CommitError, match="broken"):
            ckpt.save(1, _state(1))
        handle = ckpt.save_async(2, _state(2))
        with pytest.raises(CommitError, match="broken"):
            handle.wait(60)
        assert handle.committed_to == ["local"]  # the tier before the failure keeps it
        assert ckpt.tiers["local"].steps() == [1, 2] and ckpt.tiers["never"].steps() == []
        assert ckpt.committer.learn("local") == ({2}, set())  # both commits known good, one record
        assert ckpt.take_failed_saves() == []  # its own wait reported it


def test_save_metrics_have_one_writer_and_are_read_only(tmp_path):
    with Checkpointer(str(tmp_path / "r")) as ckpt:
        handle = ckpt.save_async(1, _state(1))
        assert handle.wait(60)
        m = handle.metrics
        assert {
            "call_s",
            "bytes",
            "prestep_wait_s",
            "staging_s",
            "durable_s/local",
            "commit/local",
        } <= set(m)
        with pytest.raises(TypeError):
            m["call_s"] = 0  # type: ignore[index]
        result = ckpt.save(2, _state(2))
        assert {"commit/local", "retention/local", "commit", "retention", "total"} <= set(
            result.timings_s
        )


# ------------------------------------------------------------------ step-hook seam
class _Engine:
    """An engine that is not a torch optimizer: its own step and its own pre-step hooks."""

    def __init__(self) -> None:
        self.weight = torch.zeros(1 << 16)
        self._pre: list = []

    def state_dict(self):  # noqa: D102
        return {"weight": self.weight}

    def load_state_dict(self, sd):  # noqa: D102
        self.weight.copy_(sd["weight"])

    def step(self) -> None:
        for hook in self._pre:
            hook()
        self.weight.add_(1.0)


class _EngineHooks(StepHooks):
    def __init__(self) -> None:
        self.installed = 0

    def targets(self, state):
        return [v for v in state.values() if isinstance(v, _Engine)]

    def mutated_storages(self, target):
        from recoverkit.staging.snapshot import storage_id

        return {storage_id(target.weight)}

    def install(self, target, before_step):
        self.installed += 1
        fn = lambda: before_step(target)  # noqa: E731
        target._pre.append(fn)

        class _H:
            def remove(self) -> None:
                target._pre.remove(fn)

        return _H()


def test_an_engines_own_step_hook_waits_for_its_lazy_copies(tmp_path):
    slow, hooks, engine = GatedEngine(), _EngineHooks(), _Engine()
    opts = CheckpointOptions(
        capture_rng=False, staging=StagingPolicy(budget_bytes=8 << 20, eager_bytes=1024)
    )
    with Checkpointer(str(tmp_path / "r"), options=opts, engine=slow, step_hooks=hooks) as ckpt:
        handle = ckpt.save_async(1, {"engine": engine})
        assert hooks.installed == 1 and not handle.staged.is_set()
        stepper = threading.Thread(target=engine.step)
        stepper.start()
        assert slow.waiting(stepper)  # the engine's step waits on the held copy, before mutating
        assert float(engine.weight[0]) == 0.0
        slow.release.set()
        stepper.join(60)
        assert handle.wait(60) and handle.metrics["prestep_wait_s"] > 0
        assert float(engine.weight[0]) == 1.0
        back = {"engine": _Engine()}
        assert ckpt.restore(back) == 1 and float(back["engine"].weight[0]) == 0.0  # before the step
        ckpt.save_async(2, {"engine": engine}).wait(60)
        assert hooks.installed == 1  # once per target
    assert engine._pre == []  # removed at close


# ------------------------------------------------------------ one manifest builder
def test_the_host_tier_and_the_disk_commit_build_the_same_manifest(tmp_path):
    state = {"w": torch.arange(10.0), "b": {"x": torch.ones(3, dtype=torch.int32)}, "t": None}
    state["tied"] = state["w"]
    opts = CheckpointOptions(capture_rng=False)
    with Checkpointer(str(tmp_path / "r"), options=opts) as ckpt:
        assert ckpt.save_async(1, state).wait(60)
        host, disk = ckpt.tiers["host"].manifest(1), ckpt.tiers["local"].manifest(1)
    assert sorted(host.tensors) == sorted(disk.tensors)
    for k, t in disk.tensors.items():
        h = host.tensors[k]
        assert (h.dtype, h.shape, h.alias_of) == (t.dtype, t.shape, t.alias_of)
        assert [(s.offsets, s.shape, s.crc32c) for s in h.shards] == [
            (s.offsets, s.shape, s.crc32c) for s in t.shards
        ]


def test_options_with_a_tier_list_stay_hashable_and_comparable():
    a = CheckpointOptions(tiers=[TierSpec.persistent("file:///x", every_steps=5)])
    b = CheckpointOptions(tiers=[TierSpec.persistent("file:///x", every_steps=5)])
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
