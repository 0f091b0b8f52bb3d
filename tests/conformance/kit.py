"""The conformance kit every storage tier passes: one harness per tier, one suite for all.

A tier joins the suite with one entry in :data:`CASES`: a :class:`TierCase` that says how to
open a :class:`Harness` on it (save a step through the real commit protocol, open a fresh
reader, damage a step's data or manifest on its storage, apply retention) and which parts of
the suite do not apply to it, with the reason. The suite (``test_tiers.py``) runs every part
against every case; a part that does not apply is skipped with the case's reason.

Saves go through the same stages as ``Checkpointer.save``: ``plan_save`` -> ``stage_now`` ->
``commit_step`` (with the injected :class:`FaultInjector` hearing every phase) -> the
``retention`` phase -> ``apply_retention``. Reads go through :class:`CheckpointReader`, the
one restore path, over a tier object built afresh on the same storage.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from recoverkit.config import CheckpointOptions, RetentionPolicy, StagingPolicy, TierSpec
from recoverkit.distributed.commit import CommitRequest, commit_step
from recoverkit.distributed.coordinator import LocalCoordinator
from recoverkit.format.manifest import MANIFEST_NAME
from recoverkit.format.zarr_layout import MANIFEST_ARRAY
from recoverkit.reading import CheckpointReader
from recoverkit.staging.plan import plan_save
from recoverkit.staging.sync import stage_now
from recoverkit.state.dtypes import to_bytes_view
from recoverkit.storage.base import RankPayload, ReadableTier, Tier
from recoverkit.storage.discovery import apply_retention
from recoverkit.storage.faults import FaultInjector
from recoverkit.storage.layout import step_dirname
from recoverkit.storage.local import LocalTier
from recoverkit.storage.zarr_tier import ZarrTier

PIECE_BYTES = 64 << 20  # CheckpointOptions' default

#: the parts of the suite; a case names those that do not apply to it, with the reason
PARTS = ("round_trip", "crash", "data_corruption", "manifest_corruption", "retention")
TIMEOUT_S = 60.0


def state_for(step: int) -> dict[str, Any]:
    """A state whose every byte depends on ``step``: several dtypes, a 2-D tensor, a scalar,
    an empty tensor and plain values."""
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(64, 33, generator=g),
        "h": torch.randn(17, generator=g).to(torch.bfloat16),
        "i": torch.randint(-(2**40), 2**40, (9,), generator=g, dtype=torch.int64),
        "flags": torch.rand(5, generator=g) > 0.5,
        "s": torch.tensor(float(step)),
        "none": torch.empty(0, 3),
        "meta": {"step": step, "name": f"step {step}"},
    }


def bits(x: Any) -> Any:
    """``x`` with every tensor replaced by (dtype, shape, raw bytes): equal means bit-exact."""
    if isinstance(x, torch.Tensor):
        return (
            str(x.dtype),
            tuple(x.shape),
            bytes(to_bytes_view(x.detach().cpu().contiguous()).numpy()),
        )
    if isinstance(x, Mapping):
        return {k: bits(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(bits(v) for v in x)
    return x


def flip_byte(path: str, offset: int) -> None:
    """Invert one byte of the file ``path`` in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        assert len(b) == 1, f"{path}: nothing at {offset}"
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


class Harness:
    """One tier's storage under test, as the suite drives it."""

    def save(
        self, step: int, state: Mapping[str, Any], *, retention: RetentionPolicy | None = None
    ) -> list[int]:
        """Save ``state`` as ``step`` through the tier's commit; return the steps retention deleted."""
        raise NotImplementedError

    def reader_tier(self) -> ReadableTier:
        """A new tier object on the same storage, as a process starting now would build it."""
        raise NotImplementedError

    def reader(self) -> CheckpointReader:
        return CheckpointReader(tiers=[self.reader_tier()], restore_rng=False)

    def damage_data(self, step: int) -> None:
        """Flip one byte of a tensor's stored bytes in ``step``."""
        raise NotImplementedError

    def damage_manifest(self, step: int) -> None:
        """Flip one byte of ``step``'s stored manifest."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class DiskHarness(Harness):
    """A tier that commits through the protocol (``Tier``): local segment files, zarr."""

    def __init__(self, case: TierCase, where: str, faults: FaultInjector) -> None:
        assert case.writer is not None
        self.case, self.where, self.faults = case, where, faults
        self.tier: Tier = case.writer(where, faults)
        self.coordinator = LocalCoordinator()
        self.seq = 0

    def save(
        self, step: int, state: Mapping[str, Any], *, retention: RetentionPolicy | None = None
    ) -> list[int]:
        return save_step(
            self.tier,
            self.coordinator,
            step,
            state,
            self.faults,
            seq=self._next(),
            retention=retention,
        )

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def reader_tier(self) -> ReadableTier:
        return self.case.writer(self.where, FaultInjector())  # type: ignore[misc]

    def damage_data(self, step: int) -> None:
        manifest = self.reader_tier().manifest(step)
        rec = manifest.tensors["w"].shards[0]
        path, offset = self.case.data_spot(self.where, step, rec)  # type: ignore[misc]
        flip_byte(path, offset)

    def damage_manifest(self, step: int) -> None:
        path = self.case.manifest_file(self.where, step)  # type: ignore[misc]
        flip_byte(path, os.path.getsize(path) // 2)


def save_step(
    tier: Tier,
    coordinator: Any,
    step: int,
    state: Mapping[str, Any],
    faults: FaultInjector,
    *,
    seq: int = 0,
    retention: RetentionPolicy | None = None,
    run_id: str = "conformance",
) -> list[int]:
    """What ``Checkpointer.save`` does for one tier, stage by stage."""
    plan = plan_save(state, capture_rng=False, piece_bytes=PIECE_BYTES)
    payload = RankPayload(0, plan.blob, [stage_now(p) for p in plan.shards])
    request = CommitRequest(step, run_id, payload, plan.aliases, seq=seq)
    commit_step(tier, coordinator, request, faults=faults, timeout_s=TIMEOUT_S)
    faults.reached("retention", step=step, rank=0)
    if retention is None:
        return []
    return apply_retention(tier, retention, good=[step])


class HostHarness(Harness):
    """Host-memory snapshots (read-only tier): saved by a Checkpointer's lazy path."""

    def __init__(self, case: TierCase, where: str, faults: FaultInjector) -> None:
        from recoverkit import Checkpointer

        opts = CheckpointOptions(
            tiers=[TierSpec.host(keep=4), TierSpec.local(every_steps=0)],
            staging=StagingPolicy(budget_bytes=16 << 20),
            capture_rng=False,
        )
        self.ckpt = Checkpointer(where, options=opts, faults=faults)

    def save(
        self, step: int, state: Mapping[str, Any], *, retention: RetentionPolicy | None = None
    ) -> list[int]:
        assert retention is None, "host snapshots are not subject to retention"
        self.ckpt.save_async(step, state).wait(TIMEOUT_S)
        return []

    def reader_tier(self) -> ReadableTier:
        return self.ckpt.tiers["host"]  # the host tier holds the snapshots

    def damage_data(self, step: int) -> None:
        from recoverkit.staging.host_tier import HostTier

        host = self.reader_tier()
        assert isinstance(host, HostTier)
        rec = host.manifest(step).tensors["w"].shards[0]
        ptr = host.snapshot(step).address(rec.offset + rec.nbytes // 2)
        byte = ctypes.c_uint8.from_address(ptr)
        byte.value ^= 0xFF

    def close(self) -> None:
        self.ckpt.close()


class ShmHarness(Harness):
    """Shared-memory snapshots: saved by a Checkpointer's lazy path, read by a new tier object
    over the same slots (as a restarted process builds it)."""

    def __init__(self, case: TierCase, where: str, faults: FaultInjector) -> None:
        from recoverkit import Checkpointer

        self.opts = CheckpointOptions(
            tiers=[TierSpec.shm(slots=3, shm_dir=os.path.join(where, "shm")), TierSpec.local(every_steps=0)],
            staging=StagingPolicy(budget_bytes=16 << 20),
            capture_rng=False,
        )
        self.where = where
        self.ckpt = Checkpointer(where, options=self.opts, faults=faults)

    def save(
        self, step: int, state: Mapping[str, Any], *, retention: RetentionPolicy | None = None
    ) -> list[int]:
        assert retention is None, "shm snapshots are not subject to retention"
        self.ckpt.save_async(step, state).wait(TIMEOUT_S)
        return []

    def reader_tier(self) -> ReadableTier:
        from recoverkit.staging.registry import TierContext, build_tier

        ctx = TierContext(
            root=self.ckpt.root, fs=self.ckpt.fs, engine=self.ckpt.engine, faults=FaultInjector(),
            options=self.opts, run_id="reader", rank=0, world_size=1, coordinator=self.ckpt.coordinator,
        )
        return build_tier(self.opts.tier_specs[0], ctx)

    def damage_data(self, step: int) -> None:
        from recoverkit.staging.shm_tier import ShmTier

        tier = self.ckpt.tiers["shm"]
        assert isinstance(tier, ShmTier)
        rec = tier.manifest(step).tensors["w"].shards[0]
        view = tier.slots.open(step)
        path = view.path  # the slot's data file
        view.close()
        flip_byte(path, rec.offset + rec.nbytes // 2)

    def close(self) -> None:
        self.ckpt.close()


@dataclass(frozen=True)
class TierCase:
    """One tier in the suite: how to build it, where its bytes lie, what does not apply."""

    name: str
    harness: Callable[[TierCase, str, FaultInjector], Harness]
    #: the tier that writes at ``where`` (also what a fresh reader builds); None: read-only
    writer: Callable[[str, FaultInjector], Tier] | None = None
    #: the file and offset of a byte inside a shard record's stored bytes
    data_spot: Callable[[str, int, Any], tuple[str, int]] | None = None
    #: the file holding ``step``'s manifest bytes
    manifest_file: Callable[[str, int], str] | None = None
    #: part -> why it does not apply to this tier
    not_applicable: Mapping[str, str] = field(default_factory=dict)

    def open(self, where: str, faults: FaultInjector | None = None) -> Harness:
        return self.harness(self, where, faults or FaultInjector())


# ------------------------------------------------------------------- local tier
def _local_writer(where: str, faults: FaultInjector) -> Tier:
    return LocalTier(where, faults=faults)


def _local_data_spot(where: str, step: int, rec: Any) -> tuple[str, int]:
    return os.path.join(where, step_dirname(step), rec.file), rec.offset + rec.nbytes // 2


def _local_manifest(where: str, step: int) -> str:
    return os.path.join(where, step_dirname(step), MANIFEST_NAME)


# -------------------------------------------------------------------- zarr tier
def _zarr_writer(where: str, faults: FaultInjector) -> Tier:
    return ZarrTier("file://" + where, faults=faults)


def _zarr_data_spot(where: str, step: int, rec: Any) -> tuple[str, int]:
    chunks = os.path.join(where, step_dirname(step), rec.file, "c")
    files = sorted(
        os.path.join(d, f) for d, _, fs in os.walk(chunks) for f in fs if not f.endswith(".__lock")
    )
    assert files, f"no chunk stored under {chunks}"
    return files[0], os.path.getsize(files[0]) // 2


def _zarr_manifest(where: str, step: int) -> str:
    return os.path.join(where, step_dirname(step), MANIFEST_ARRAY, "c", "0")


CASES: dict[str, TierCase] = {
    "local": TierCase("local", DiskHarness, _local_writer, _local_data_spot, _local_manifest),
    "zarr": TierCase("zarr", DiskHarness, _zarr_writer, _zarr_data_spot, _zarr_manifest),
    "host": TierCase(
        "host",
        HostHarness,
        not_applicable={
            "crash": "host snapshots live in the training process's memory and die with it: "
            "a crash leaves nothing to read (the shm tier's snapshots survive it)",
            "manifest_corruption": "the host tier stores no manifest bytes: it builds the manifest "
            "from the snapshot's in-memory records on every call",
            "retention": "host snapshots are evicted by the host tier's keep, not deleted by "
            "retention (HostTier is a snapshot tier: it has no delete)",
        },
    ),
    "shm": TierCase(
        "shm",
        ShmHarness,
        not_applicable={
            "crash": "the shm tier is written by the drain, not through the two-phase commit "
            "the crash part drives; SIGKILLs during its copy are tests/integrations/test_shm_crash.py",
            "manifest_corruption": "a damaged slot index makes the slot torn: it is no longer "
            "listed (tests/unit/test_shm_store.py), so there is no manifest to fail",
            "retention": "shm snapshots are overwritten slot by slot, not deleted by retention",
        },
    ),
}
