"""The tier registry: tier kind -> the class (or factory) that builds it.

``CheckpointOptions.tiers`` lists :class:`~recoverkit.config.TierSpec` entries; the
Checkpointer hands each to :func:`build_tier` with what it owns (root, file system, engine,
fault injector, coordinator) and gets the tier back, never naming a kind itself. A new tier
is one class registered here with :func:`register_tier` (``shm``: per-step snapshots in
shared memory; ``replica``: those snapshots replicated to peers, built by
``staging.replica.build_replica_tier``).

A built tier is either a :class:`~recoverkit.storage.base.Tier` (committed through the
two-phase commit protocol by the blocking save and the drain) or a
:class:`~recoverkit.staging.base.SnapshotTier` (fed staged snapshots by ``save_async``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from ..config import CheckpointOptions, TierPolicy, TierSpec
from ..distributed.coordinator import Coordinator
from ..errors import ConfigError, StorageError
from ..storage.base import ReadableTier
from ..storage.faults import FaultInjector
from ..storage.fs import LocalFS

__all__ = ["TierContext", "build_tier", "check_writable", "register_tier", "tier_kinds"]


@dataclass(frozen=True)
class TierContext:
    """What the Checkpointer lends every tier it builds."""

    root: str
    fs: LocalFS
    engine: Any
    faults: FaultInjector
    options: CheckpointOptions
    run_id: str
    rank: int
    world_size: int
    coordinator: Coordinator


#: builds a tier from its entry and the Checkpointer's context
TierFactory = Callable[[TierSpec, TierContext], ReadableTier]
_KINDS: dict[str, TierFactory] = {}


def register_tier(kind: str) -> Callable[[TierFactory], TierFactory]:
    """Register the class (or factory) building tiers of ``kind``; a decorator."""

    def add(factory: TierFactory) -> TierFactory:
        if kind in _KINDS and _KINDS[kind] is not factory:
            raise ValueError(f"tier kind {kind!r} is registered already")
        _KINDS[kind] = factory
        return factory

    return add


def tier_kinds() -> list[str]:
    """The registered kinds."""
    return sorted(_KINDS)


def build_tier(spec: TierSpec, ctx: TierContext) -> ReadableTier:
    """The tier ``spec`` names, built with ``ctx``; it answers to ``spec.name``."""
    factory = _KINDS.get(spec.kind)
    if factory is None:
        raise ConfigError(f"unknown tier kind {spec.kind!r}; known: {tier_kinds()}")
    tier = factory(spec, ctx)
    tier.name = spec.name
    return tier


def check_writable(fs: LocalFS, path: str, what: str) -> None:
    """Raise StorageError (an OSError with the errno) unless files can be created in ``path``."""
    try:
        fs.makedirs(path)
        fs.check_writable(path)
    except OSError as e:
        raise StorageError(
            e.errno, f"{what} {path} is not writable: {e.strerror or e}", path
        ) from e


def _settings(spec: TierSpec, allowed: tuple[str, ...]) -> dict[str, Any]:
    extra = sorted(set(spec.settings) - set(allowed))
    if extra:
        raise ConfigError(
            f"tier {spec.name!r} ({spec.kind}) has no setting {extra}; it takes {list(allowed)}"
        )
    return dict(spec.settings)


# ------------------------------------------------------------------ the built-in kinds
@register_tier("local")
def _local(spec: TierSpec, ctx: TierContext) -> ReadableTier:
    from ..storage.local import LocalTier

    root = str(_settings(spec, ("root",)).get("root") or ctx.root)
    if root != ctx.root:
        check_writable(ctx.fs, root, f"tier {spec.name!r} root")
    return LocalTier(root, fs=ctx.fs, faults=ctx.faults, direct_io=ctx.options.direct_io)


@register_tier("persistent")
def _persistent(spec: TierSpec, ctx: TierContext) -> ReadableTier:
    from ..storage.zarr_tier import ZarrTier

    s = _settings(spec, ("url", "compression", "compression_level"))
    url = str(s["url"])
    if url.startswith("file://"):
        check_writable(LocalFS(), unquote(urlparse(url).path), "persistent store")
    compression = TierPolicy(
        compression=s.get("compression", "none"), compression_level=s.get("compression_level", 1)
    )
    return ZarrTier(url, options=compression, faults=ctx.faults, fs=ctx.fs)


@register_tier("host")
def _host(spec: TierSpec, ctx: TierContext) -> ReadableTier:
    from .agreement import agree_steps
    from .host_tier import HostTier

    keep = int(_settings(spec, ("keep",)).get("keep", 1))
    calls = itertools.count()  # every rank agrees as often, in the same order (restore)

    def agree(held: list[int]) -> list[int]:
        scope = f"{ctx.run_id}/{spec.name}/agree/{next(calls)}"
        return agree_steps(ctx.coordinator, scope, held, timeout_s=ctx.options.commit_timeout_s)

    return HostTier(
        keep=keep, run_id=ctx.run_id, rank=ctx.rank, world_size=ctx.world_size, agree=agree,
        engine=ctx.engine, coordinator=ctx.coordinator, timeout_s=ctx.options.commit_timeout_s,
    )


@register_tier("shm")
def _shm(spec: TierSpec, ctx: TierContext) -> ReadableTier:
    from ..storage.shm import ShmStore
    from .agreement import agree_steps
    from .shm_tier import ShmTier

    s = _settings(spec, ("slots", "budget_bytes", "shm_dir"))
    budget = s.get("budget_bytes") or 2 * ctx.options.staging.budget_bytes
    # a replica send in flight pins its slot: a third keeps every step written meanwhile
    replicated = any(t.kind == "replica" for t in ctx.options.tier_specs)
    slots = int(s.get("slots") or (3 if replicated else 2))
    try:  # the node's name (RECOVERKIT_NODE) is checked here, before step 1
        store = ShmStore(ctx.root, shm_dir=s.get("shm_dir"), budget_bytes=int(budget), slots=slots,
                         fs=LocalFS(engine=ctx.engine))  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"tier {spec.name!r} (shm): {e}") from e
    calls = itertools.count()

    def agree(held: list[int]) -> list[int]:
        scope = f"{ctx.run_id}/{spec.name}/agree/{next(calls)}"
        return agree_steps(ctx.coordinator, scope, held, timeout_s=ctx.options.commit_timeout_s)

    return ShmTier(
        store, run_id=ctx.run_id, rank=ctx.rank, world_size=ctx.world_size, coordinator=ctx.coordinator,
        timeout_s=ctx.options.commit_timeout_s, engine=ctx.engine, faults=ctx.faults, agree=agree,
    )


@register_tier("replica")
def _replica(spec: TierSpec, ctx: TierContext) -> ReadableTier:
    try:
        from .replica import build_replica_tier  # type: ignore[attr-defined,unused-ignore]
    except ImportError as e:
        raise ConfigError(
            f"tier {spec.name!r} (replica): peer replicas are not available in this build ({e})"
        ) from e
    tier: ReadableTier = build_replica_tier(spec, ctx)
    return tier
