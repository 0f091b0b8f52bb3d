"""Frozen, typed options.

Every option a user can set lives here, as a keyword-only frozen dataclass whose
``__post_init__`` says exactly what is wrong with a bad value. Units are in the names
(``timeout_s``, ``budget_bytes``). Nothing here does I/O; the layers below read these.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

__all__ = ["RetentionPolicy", "TierSpec", "TierPolicy", "StagingPolicy", "CheckpointOptions", "ProtectOptions"]


def _positive(name: str, value: float | int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
    """Which committed steps to keep.

    A step is kept if it is among the newest ``keep_last`` committed steps, or if
    ``keep_every`` is set and ``step % keep_every == 0``. Whatever the policy says,
    retention never deletes a step whose data is known good (the step just committed, the
    step a restore used) nor the newest step not known bad; steps whose data is known
    damaged are not counted among the newest ``keep_last`` (see
    :func:`recoverkit.storage.discovery.decide_retention`).

    Example:
        >>> RetentionPolicy(keep_last=2, keep_every=1000).keeps(step=3000, rank_from_newest=5)
        True
    """

    keep_last: int | None = 3
    keep_every: int | None = None

    def __post_init__(self) -> None:
        if self.keep_last is not None and (not isinstance(self.keep_last, int) or self.keep_last < 1):
            raise ConfigError(f"keep_last must be an integer >= 1 or None, got {self.keep_last!r}")
        if self.keep_every is not None and (
            not isinstance(self.keep_every, int) or self.keep_every < 1
        ):
            raise ConfigError(f"keep_every must be an integer >= 1 or None, got {self.keep_every!r}")

    def keeps(self, *, step: int, rank_from_newest: int) -> bool:
        """Whether ``step`` is kept; ``rank_from_newest`` is 0 for the newest committed step."""
        if rank_from_newest == 0:
            return True
        if self.keep_last is None or rank_from_newest < self.keep_last:
            return True
        return self.keep_every is not None and step % self.keep_every == 0


_COMPRESSIONS = ("none", "zstd", "blosc")


@dataclass(frozen=True, kw_only=True)
class TierSpec:
    """One entry of :attr:`CheckpointOptions.tiers`: a tier (its kind and settings) and its
    schedule.

    A step goes to this tier when ``every_steps`` divides it, or when at least ``every_s``
    seconds passed since the last step this tier was due for (leave either off; both off:
    never written, still read). The kinds are the registry's
    (:mod:`recoverkit.staging.registry`): ``"host"`` (snapshots kept in host memory by
    ``save_async``; settings ``keep``), ``"local"`` (segment files under a root; settings
    ``root``, default the Checkpointer's), ``"persistent"`` (zarr v3 in any tensorstore
    kvstore; settings ``url``, ``compression``, ``compression_level``), ``"shm"`` (per-step
    snapshots in shared memory that survive the process; :meth:`shm`), ``"replica"``
    (those snapshots replicated to peers; :meth:`replica`). The list is ordered fastest
    first; restore looks in that order.

    Attributes:
        kind: the registry key of the tier's class.
        every_steps: due when ``step % every_steps == 0`` (0 or None: not by step count).
        every_s: due when this many seconds passed since it was last due (None: not by time).
        name: the tier's name in results and handles (default: ``kind``); unique in a list.
        settings: the tier's own settings (see above).

    Example:
        >>> tiers = [TierSpec.host(keep=1), TierSpec.local(every_steps=10),
        ...          TierSpec.persistent("file:///ckpt/zarr", every_steps=100)]
        >>> [t.name for t in tiers], tiers[2].due(200), tiers[1].due(5)
        (['host', 'local', 'persistent'], True, False)
    """

    kind: str
    every_steps: int | None = 1
    every_s: float | None = None
    name: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ConfigError(f"kind must be a non-empty string, got {self.kind!r}")
        v = self.every_steps
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ConfigError(f"every_steps must be an integer >= 0 or None, got {v!r}")
        _positive("every_s", self.every_s, allow_none=True)
        if not isinstance(self.settings, Mapping):
            raise ConfigError(f"settings must be a mapping, got {type(self.settings).__name__}")
        object.__setattr__(self, "settings", dict(self.settings))
        if not self.name:
            object.__setattr__(self, "name", self.kind)

    def __hash__(self) -> int:  # settings is a dict: hash its items (options stay hashable)
        return hash((self.kind, self.every_steps, self.every_s, self.name, tuple(sorted(self.settings.items()))))

    def due(self, step: int, *, since_s: float | None = None) -> bool:
        """Whether ``step`` goes to this tier; ``since_s``: seconds since it was last due
        (None: never, so a time schedule is due at once)."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        return self.every_s is not None and (since_s is None or since_s >= self.every_s)

    @classmethod
    def host(cls, *, keep: int = 1, every_steps: int | None = 1, every_s: float | None = None) -> TierSpec:
        """Keep the newest ``keep`` staged snapshots of ``save_async`` in host memory."""
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
            raise ConfigError(f"keep must be an integer >= 0, got {keep!r}")
        return cls(kind="host", every_steps=every_steps, every_s=every_s, settings={"keep": keep})

    @classmethod
    def local(cls, *, every_steps: int | None = 1, every_s: float | None = None, root: str | None = None) -> TierSpec:
        """Segment files on node-local disk, under ``root`` (default: the Checkpointer's)."""
        return cls(kind="local", every_steps=every_steps, every_s=every_s, settings={} if root is None else {"root": root})

    @classmethod
    def persistent(
        cls, url: str, *, every_steps: int | None = 10, every_s: float | None = None, compression: str = "none",
        compression_level: int = 1,
    ) -> TierSpec:
        """Zarr v3 groups in the tensorstore kvstore at ``url``."""
        if not isinstance(url, str) or not url:
            raise ConfigError(f"url must be a non-empty kvstore URL, got {url!r}")
        if compression not in _COMPRESSIONS:
            raise ConfigError(f"compression must be one of {_COMPRESSIONS}, got {compression!r}")
        settings = {"url": url, "compression": compression, "compression_level": compression_level}
        return cls(kind="persistent", every_steps=every_steps, every_s=every_s, settings=settings)


    @classmethod
    def shm(
        cls, *, every_steps: int | None = 1, every_s: float | None = None, slots: int | None = None,
        budget_bytes: int | None = None, shm_dir: str | None = None,
    ) -> TierSpec:
        """Per-step snapshots in shared memory that outlive the process (``save_async``).

        Each staged save due is copied into one of ``slots`` slots (default: 2, double
        buffering; 3 when a ``replica`` tier is in the list, since a send in flight keeps
        its slot while the next step is written) under
        ``shm_dir`` (default ``RECOVERKIT_SHM_DIR``, else ``/dev/shm``), right after staging
        and before the disk commits; a process restarted on the same node with the same
        root restores from the newest complete one. ``budget_bytes`` bounds the shared
        memory of this rank (default: twice ``StagingPolicy.budget_bytes``, room for two
        snapshots as large as the staging pool). The regions are removed when the
        Checkpointer closes normally, kept after a crash or a preemption signal (for the
        restarted process), and ``recoverkit gc ROOT --yes`` removes what a dead job left.

        Example:
            >>> TierSpec.shm(budget_bytes=8 << 30).settings["budget_bytes"]
            8589934592
        """
        if slots is not None and (not isinstance(slots, int) or isinstance(slots, bool) or not 2 <= slots <= 16):
            raise ConfigError(f"slots must be an integer in [2, 16] (double buffering at least), got {slots!r}")
        if budget_bytes is not None and (
            not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes < 4096
        ):
            raise ConfigError(f"budget_bytes must be an integer >= 4096 or None, got {budget_bytes!r}")
        if shm_dir is not None and (not isinstance(shm_dir, str) or not shm_dir):
            raise ConfigError(f"shm_dir must be a non-empty path or None, got {shm_dir!r}")
        settings: dict[str, Any] = {} if slots is None else {"slots": slots}
        if budget_bytes is not None:
            settings["budget_bytes"] = budget_bytes
        if shm_dir is not None:
            settings["shm_dir"] = shm_dir
        return cls(kind="shm", every_steps=every_steps, every_s=every_s, settings=settings)

    @classmethod
    def replica(
        cls, *, k: int = 1, groups: Sequence[Sequence[str]] | None = None, every_steps: int | None = 1,
        budget_bytes: int | None = None,
    ) -> TierSpec:
        """Replicas of each rank's shared-memory snapshot in the memory of ``k`` peers on
        other nodes (placement by node; ``groups``: lists of node names, e.g. racks, a
        replica is placed outside its owner's group). Needs a ``shm`` tier in the list.
        ``budget_bytes`` bounds the replicas this rank holds (default as for ``shm``).

        Example:
            >>> TierSpec.replica(k=1, groups=[["n0", "n1"], ["n2", "n3"]]).settings["groups"]
            (('n0', 'n1'), ('n2', 'n3'))
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"k must be an integer >= 1, got {k!r}")
        if budget_bytes is not None and (
            not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes < 4096
        ):
            raise ConfigError(f"budget_bytes must be an integer >= 4096 or None, got {budget_bytes!r}")
        settings: dict[str, Any] = {"k": k}
        if groups is not None:
            if isinstance(groups, (str, bytes)) or not all(
                not isinstance(g, (str, bytes)) and all(isinstance(n, str) and n for n in g) for g in groups
            ):
                raise ConfigError(f"groups must be lists of node names, got {groups!r}")
            settings["groups"] = tuple(tuple(g) for g in groups)  # hashable: options stay hashable
        if budget_bytes is not None:
            settings["budget_bytes"] = budget_bytes
        return cls(kind="replica", every_steps=every_steps, settings=settings)


def default_tiers() -> tuple[TierSpec, ...]:
    """Host memory (newest snapshot) and the local disk at every step."""
    return (TierSpec.host(keep=1), TierSpec.local(every_steps=1))


@dataclass(frozen=True, kw_only=True)
class TierPolicy:
    """Deprecated: the fixed host / local / persistent slots. Pass a list of
    :class:`TierSpec` as ``CheckpointOptions(tiers=...)`` instead; a ``TierPolicy`` given
    there still works (with a DeprecationWarning) and becomes the list :meth:`specs` returns.

    Every ``save_async`` is staged in host memory (tier 1) and the newest ``host_keep``
    snapshots stay there. A step is also written to node-local disk (tier 2) when
    ``step % local_every == 0`` and to the persistent zarr store (tier 3, any tensorstore
    kvstore URL) when ``persistent_url`` is set and ``step % persistent_every == 0``.

    Example:
        >>> p = TierPolicy(local_every=10, persistent_url="file:///ckpt/zarr", persistent_every=100)
        >>> p.tiers_for(200), p.tiers_for(30), p.tiers_for(5)
        (('local', 'persistent'), ('local',), ())
        >>> [s.name for s in p.specs()]
        ['host', 'local', 'persistent']
    """

    host_keep: int = 1
    local_every: int = 1
    persistent_url: str | None = None
    persistent_every: int = 10
    compression: str = "none"
    compression_level: int = 1

    def __post_init__(self) -> None:
        for name in ("host_keep", "local_every", "persistent_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")
        if self.compression not in _COMPRESSIONS:
            raise ConfigError(f"compression must be one of {_COMPRESSIONS}, got {self.compression!r}")

    def specs(self) -> tuple[TierSpec, ...]:
        """The same tiers and schedules as a tier list."""
        out = [TierSpec.host(keep=self.host_keep), TierSpec.local(every_steps=self.local_every)]
        if self.persistent_url:
            out.append(
                TierSpec.persistent(
                    self.persistent_url, every_steps=self.persistent_every, compression=self.compression,
                    compression_level=self.compression_level,
                )
            )
        return tuple(out)

    def tiers_for(self, step: int) -> tuple[str, ...]:
        """The disk tiers ``step`` is committed to, fastest first."""
        return tuple(s.name for s in self.specs() if s.kind != "host" and s.due(step))


@dataclass(frozen=True, kw_only=True)
class StagingPolicy:
    """The host staging pool of the lazy path and what happens when it is full.

    Attributes:
        budget_bytes: size of the staging pool (allocated once, reused across saves).
        when_full: ``"wait"`` for older snapshots to drain (at most ``wait_timeout_s``,
            then the save is skipped) or ``"skip"`` the new save at once. Skips are
            counted and logged, never silent.
        eager_bytes: tensors up to this size, and every tensor no optimizer in the state
            mutates (buffers such as BatchNorm statistics), are copied during the call.
        copy_threads: threads of the native copy engine.
        lock_memory: ``mlock`` the pool so it is never swapped out.
    """

    budget_bytes: int = 2 << 30
    when_full: str = "wait"
    wait_timeout_s: float = 60.0
    eager_bytes: int = 1 << 20
    copy_threads: int = 2
    lock_memory: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.budget_bytes, int) or self.budget_bytes < 4096:
            raise ConfigError(f"budget_bytes must be an integer >= 4096, got {self.budget_bytes!r}")
        if self.when_full not in ("wait", "skip"):
            raise ConfigError(f"when_full must be 'wait' or 'skip', got {self.when_full!r}")
        _positive("wait_timeout_s", self.wait_timeout_s)
        if not isinstance(self.copy_threads, int) or self.copy_threads < 1:
            raise ConfigError(f"copy_threads must be an integer >= 1, got {self.copy_threads!r}")


@dataclass(frozen=True, kw_only=True)
class CheckpointOptions:
    """How a :class:`~recoverkit.Checkpointer` saves and restores.

    Attributes:
        allow_pickle: encode objects that have no pickle-free encoding with pickle, and
            accept such checkpoints on load. Off by default: loading never runs code.
        capture_rng: save and restore Python, NumPy, torch CPU and CUDA random states.
        retention: which committed steps survive garbage collection after each commit.
        tiers: the tiers, fastest first, each with its schedule (a list of :class:`TierSpec`;
            default: host memory, then the local disk at every step). ``save`` and
            ``save_async`` write each step to the entries due for it. A (deprecated)
            :class:`TierPolicy` is turned into its list.
        staging: the host staging pool of ``save_async`` (:class:`StagingPolicy`).
        lock: hold a run lock on the root so a second writer fails fast.
        direct_io: write segment files with O_DIRECT where the file system allows it (the
            default: the bytes bypass the page cache, so the background write costs the
            training almost no CPU; file systems without O_DIRECT, e.g. tmpfs, fall back to
            buffered writes).
        commit_timeout_s: how long the commit waits for every rank before it fails.
        piece_bytes: the largest region written under one checksum; a resharded restore
            reads and verifies whole pieces, so this bounds its temporary memory.
    """

    allow_pickle: bool = False
    capture_rng: bool = True
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    tiers: Sequence[TierSpec] | TierPolicy = field(default_factory=default_tiers)
    staging: StagingPolicy = field(default_factory=StagingPolicy)
    lock: bool = True
    direct_io: bool = True
    commit_timeout_s: float = 300.0
    piece_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if not isinstance(self.retention, RetentionPolicy):
            raise ConfigError(f"retention must be a RetentionPolicy, got {type(self.retention).__name__}")
        _positive("commit_timeout_s", self.commit_timeout_s)
        object.__setattr__(self, "tiers", _tier_list(self.tiers))
        if not isinstance(self.piece_bytes, int) or self.piece_bytes < 4096:
            raise ConfigError(f"piece_bytes must be an integer >= 4096, got {self.piece_bytes!r}")

    @property
    def tier_specs(self) -> tuple[TierSpec, ...]:
        """:attr:`tiers` as the list it always is once built (a TierPolicy given is converted)."""
        tiers = self.tiers
        assert isinstance(tiers, tuple)
        return tiers


def _tier_list(tiers: Sequence[TierSpec] | TierPolicy) -> tuple[TierSpec, ...]:
    if isinstance(tiers, TierPolicy):
        warnings.warn(
            "TierPolicy is deprecated: pass CheckpointOptions(tiers=[TierSpec...]), e.g. "
            "TierPolicy(...).specs()",
            DeprecationWarning,
            stacklevel=4,  # _tier_list <- __post_init__ <- __init__ <- the caller
        )
        return tiers.specs()
    if isinstance(tiers, (str, bytes)) or not isinstance(tiers, Sequence):
        raise ConfigError(f"tiers must be a list of TierSpec, got {type(tiers).__name__}")
    out = tuple(tiers)
    for t in out:
        if not isinstance(t, TierSpec):
            raise ConfigError(f"tiers must be a list of TierSpec, got an entry {t!r}")
    names = [t.name for t in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"tier names must be unique in the list, {dup} appear twice (set name=)")
    return out


#: what leaving a protected loop does about lazy saves that failed
OnFailedSaves = Literal["raise", "exit", "warn"]
_ON_FAILED_SAVES = ("raise", "exit", "warn")


@dataclass(frozen=True, kw_only=True)
class ProtectOptions:
    """How :func:`~recoverkit.protect` drives a training loop (what it does around the
    Checkpointer; how the Checkpointer saves is :class:`CheckpointOptions`).

    ``protect``'s keyword arguments of the same names are sugar for this object: their
    defaults are read from here, so each option has one default, in one place.

    Attributes:
        save_every: steps between lazy saves (``save_async``); which tiers each save then
            reaches is :class:`TierPolicy`'s business. The loop's final step is saved too.
        epochs: epochs to iterate (None: until ``max_steps``).
        max_steps: steps to iterate (None: until ``epochs``).
        grace_s: how long a preempted run waits for its final save to be durable.
        spike_factor: the loss guard rejects a loss above this multiple of its running
            average (None: only non-finite losses are rejected).
        on_failed_saves: when the loop ends normally and lazy saves failed: ``"raise"`` a
            CommitError naming them, ``"exit"`` with status 1, or ``"warn"`` only.
        log_saves: one INFO line (logger ``recoverkit``) per committed save.
        keyed_rng: run each step's body under
            :func:`~recoverkit.state.keyed_rng.keyed_rng`, keyed by ``(seed, "protect",
            epoch, batch index in the epoch, rank)`` (``run.rng_key``): dropout and every
            other draw from torch's global generators inside the loop body depend on which
            batch it is, not on what ran before (a batch the loss guard rejected, a restart),
            and the outer streams, saved with the checkpoint, are left untouched.
        seed: the base seed of those keyed streams (the data order is the loader's own).

    Example:
        >>> ProtectOptions(save_every=50, max_steps=1000, epochs=None).save_every
        50
        >>> ProtectOptions(save_every=0)
        Traceback (most recent call last):
        ...
        recoverkit.errors.ConfigError: save_every must be an integer >= 1, got 0
    """

    save_every: int = 100
    epochs: int | None = 1
    max_steps: int | None = None
    grace_s: float = 30.0
    spike_factor: float | None = None
    on_failed_saves: OnFailedSaves = "raise"
    log_saves: bool = True
    keyed_rng: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.keyed_rng, bool):
            raise ConfigError(f"keyed_rng must be True or False, got {self.keyed_rng!r}")
        if type(self.seed) is not int or not -(1 << 127) <= self.seed < 1 << 127:
            raise ConfigError(f"seed must be an int that fits in 128 signed bits, got {self.seed!r}")
        if not isinstance(self.save_every, int) or isinstance(self.save_every, bool) or self.save_every < 1:
            raise ConfigError(f"save_every must be an integer >= 1, got {self.save_every!r}")
        for name in ("epochs", "max_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ConfigError(f"{name} must be an integer >= 0 or None, got {v!r}")
        if isinstance(self.grace_s, bool) or not isinstance(self.grace_s, (int, float)) or self.grace_s < 0:
            raise ConfigError(f"grace_s must be a number >= 0, got {self.grace_s!r}")
        _positive("spike_factor", self.spike_factor, allow_none=True)
        if self.on_failed_saves not in _ON_FAILED_SAVES:
            raise ConfigError(f"on_failed_saves must be one of {_ON_FAILED_SAVES}, got {self.on_failed_saves!r}")
