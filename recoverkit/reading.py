"""Reading committed steps (discovery, restore, partial restore) without writing anything.

restore: a recovery chain (``recovery``; by default tier fallback: steps newest first, fastest
tier first -> manifest) -> read + verify every byte (``restore.reader``) -> keep the entries
asked for -> check they fit -> apply (``restore.apply``)

Over tiers that include a memory tier of a job of several ranks (the host tier
``staging.host_tier``, the shared-memory tier ``staging.shm_tier``), a restore first tries
the memory restore across ranks (``recovery.memory``: the newest step complete in memory on
any live rank or node, own snapshots, other ranks' host snapshots and peer replicas, unless a
disk holds a newer one; collective, every rank of the job restores together), then tier
fallback over the other tiers: the fastest source of the newest step. Such a restore reads in place (``restore.in_place``:
whole tensors held in memory are verified, then copied straight into the live ones). Which
source each rank used is logged (logger ``recoverkit``, INFO).

The one restore path: :class:`CheckpointReader` serves readers beside a training job (evaluation,
export, the CLI), and the Checkpointer delegates its restore and discovery to one built over its
tiers. A reader takes no lock and never writes, creates or deletes (DESIGN invariant 10): its
local tier's file operations refuse every mutation; other tiers are only read from. It cannot
pin a step (a pin is a write), so when a live writer's retention deletes the step being read,
it warns (:class:`StepDeletedWarning`) and starts over from the newest step.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
from collections.abc import Callable, Collection, Mapping, MutableMapping, Sequence
from typing import Any

from .errors import CheckpointNotFoundError, IncompatibleCheckpointError, StorageError
from .format.manifest import Manifest
from .recovery import Loss, RecoveryChain, RecoveryStrategy, Source, Survivors, TierFallback
from .recovery.tier_fallback import MAX_RESCANS, StepDeletedWarning  # noqa: F401 - MAX_RESCANS kept here too
from .restore.reader import in_place_reads
from .storage.base import ReadableTier
from .storage.fs import LocalFS
from .storage.local import LocalTier

__all__ = ["CheckpointReader", "RestoreResult", "StateTree", "StepDeletedWarning", "ReadOnlyFS"]

log = logging.getLogger("recoverkit")


class RestoreResult(int):
    """The step restored (an ``int``) and what a partial restore left out: ``missing_keys``
    (entries of the target the step lacks) and ``unexpected_keys`` (saved entries not loaded;
    ``__rng__``: the random streams). Both are empty after a strict restore."""

    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]

    def __new__(
        cls, step: int, missing: Sequence[str] = (), unexpected: Sequence[str] = ()
    ) -> RestoreResult:
        self = super().__new__(cls, step)
        self.missing_keys, self.unexpected_keys = tuple(missing), tuple(unexpected)
        return self

    step = property(int, doc="The step restored, as a plain int.")


class StateTree(dict):  # type: ignore[type-arg]
    """A step's saved state: entry name -> state (tensors on CPU), and the ``step`` it is."""

    step: int


class CheckpointReader:
    """Read-only access to a checkpoint root that a trainer may be writing right now.

    Args:
        root: the checkpoint root (node-local tier); None to read only ``persistent_url``.
        persistent_url: also read the persistent (zarr) tier at this kvstore URL.
        rank: whose rank-local state to read (a rank that did not exist reads rank 0's).
        allow_pickle: decode pickled objects (runs code from the checkpoint).
        restore_rng: restore the saved random streams in a strict :meth:`restore`.
        fs: the local tier's file operations (wrapped so that they never write).
        tiers: exactly these tiers, fastest first (``root``/``persistent_url`` then name them).
        learn: told ``learn(tier, good=step)`` of the step a restore used and
            ``learn(tier, bad=step)`` of each damaged one (the Checkpointer's retention).
        strategies: the recovery strategies tried in order (default: tier fallback over
            ``tiers``, reporting to ``learn``; a restore over tiers that include a
            memory tier of several ranks (host, shared memory) tries the memory restore
            across ranks first, then tier fallback over the other tiers).
        in_place: a restore copies whole tensors a tier holds in memory straight into the
            live tensors (verified first; the same objects afterwards); False: new tensors,
            loaded through ``load_state_dict`` (disk tiers always take that path).

    Example:
        >>> import tempfile, torch, recoverkit
        >>> root = tempfile.mkdtemp()
        >>> with recoverkit.Checkpointer(root) as ckpt:
        ...     _ = ckpt.save(3, {"model": torch.nn.Linear(2, 2), "step": 3})
        >>> reader = recoverkit.CheckpointReader(root)
        >>> reader.steps(), reader.latest()
        ([3], 3)
        >>> result = reader.restore({"model": torch.nn.Linear(2, 2)}, strict=False)
        >>> result, result.unexpected_keys  # the random streams load only if asked for
        (3, ('__rng__', 'step'))
    """

    def __init__(
        self,
        root: str | None = None,
        *,
        persistent_url: str | None = None,
        rank: int = 0,
        allow_pickle: bool = False,
        restore_rng: bool = True,
        fs: LocalFS | None = None,
        tiers: Sequence[ReadableTier] | None = None,
        learn: Callable[..., Any] | None = None,
        strategies: Sequence[RecoveryStrategy] | None = None,
        in_place: bool = True,
    ) -> None:
        if tiers is None:
            found: list[ReadableTier] = []
            if root is not None:
                found.append(LocalTier(root, fs=ReadOnlyFS(fs)))
            if persistent_url:
                from .storage.zarr_tier import ZarrTier

                found.append(ZarrTier(persistent_url))  # only its reading methods are called
            if not found:
                raise ValueError("CheckpointReader needs a root, a persistent_url or tiers")
            tiers = found
        self.tiers: list[ReadableTier] = list(tiers)
        self.label = root if root is not None else (persistent_url or self.tiers[0].describe(0))
        self.rank, self.allow_pickle, self.restore_rng = rank, allow_pickle, restore_rng
        self._learn = learn or (lambda *_, **__: None)  # nothing to tell
        self.chain = RecoveryChain(
            strategies or [TierFallback(label=self.label, learn=self._learn)]
        )
        #: restore's chain and the tiers it reads: the memory restore first when a
        #: memory tier of several ranks is among the tiers (its tiers are the memory restore's own)
        self._restore_chain, self._restore_tiers = self.chain, tuple(self.tiers)
        #: restores read in place (restore.in_place): a whole tensor a tier holds in memory
        #: (host snapshot, shared memory, a memory restore's verified bytes) is verified, then
        #: copied straight into the live tensor; disk tiers hold nothing in memory and keep
        #: the copy path either way
        self._in_place = in_place
        memory = _memory_restore(self.tiers) if strategies is None else None
        if memory is not None:
            strategy, held = memory
            self._restore_chain = RecoveryChain([strategy, TierFallback(label=self.label, learn=self._learn)])
            self._restore_tiers = tuple(t for t in self.tiers if all(t is not m for m in held))

    def steps(self) -> list[int]:
        """Committed steps on any tier, ascending (manifests not read)."""
        return sorted({s for t in self.tiers for s in t.steps()})

    def latest(self) -> int | None:
        """The newest step whose manifest and files verify on some tier, or None."""
        try:
            return self.find()[0]
        except CheckpointNotFoundError:
            return None

    def manifest(self, step: int) -> Manifest:
        """The verified manifest of ``step`` from the fastest tier holding a valid one."""
        return self.find(step)[1]

    def find(self, step: int | None = None) -> tuple[int, Manifest]:
        """``step`` (default: the newest whose manifest verifies) and its manifest; raises
        CheckpointNotFoundError when none verifies, or the fault of ``step`` if asked for."""

        def use(source: Source) -> tuple[int, Manifest]:
            if source.manifest is None:  # rebuilt, not read: nothing to look at
                raise CheckpointNotFoundError(f"{source.describe()} has no manifest")
            return source.step, source.manifest

        return self.chain.run(Loss(step=step), self._survivors(), use).value

    def read(self, step: int | None = None, *, entries: Collection[str] | None = None) -> StateTree:
        """The saved state of ``step`` (default: the newest valid), tensors on CPU, only the
        top-level ``entries`` if given; verified and skipped past faults as :meth:`restore`.

        Example:
            >>> import tempfile, torch, recoverkit
            >>> root = tempfile.mkdtemp()
            >>> with recoverkit.Checkpointer(root) as ckpt:
            ...     _ = ckpt.save(1, {"w": torch.ones(2)})
            >>> tree = recoverkit.CheckpointReader(root).read()
            >>> tree.step, tree["w"]
            (1, tensor([1., 1.]))
        """

        def use(source: Source) -> StateTree:
            captured = source.read(rank=self.rank, allow_pickle=self.allow_pickle, entries=entries)
            tree = StateTree((k, v) for k, v in captured.items() if entries is None or k in entries)
            tree.step = source.step
            return tree

        return self.chain.run(Loss(step=step), self._survivors(), use).value

    def restore(
        self,
        state: MutableMapping[str, Any],
        step: int | None = None,
        *,
        strict: bool = True,
        restore_rng: bool | None = None,
    ) -> RestoreResult:
        """Restore ``state`` in place from ``step`` (default: the newest valid step).

        Newest step from the fastest tier holding it, every byte verified first, damaged steps
        skipped with a warning (one asked for by number raises its fault); ShardedTensor and
        DTensor targets get their region of the global tensor. ``strict=True``: ``state`` names exactly the saved entries; the random streams are
        restored unless the reader has ``restore_rng=False``. ``strict=False``: only the
        entries of ``state`` the step holds are loaded, the random streams only with
        ``restore_rng=True``; ``missing_keys``/``unexpected_keys`` of the result name the
        rest. Either way all or nothing over what is loaded: every check passes before the
        first object changes (else IncompatibleCheckpointError). Returns the step (a
        :class:`RestoreResult`); raises CheckpointNotFoundError if no step is valid.
        """
        import torch  # restoring makes tensors: torch, and the apply side, only from here on

        from .restore.apply import target_shards
        from .staging.plan import RNG_KEY
        from .state.dtensor import prepare_optimizer_state
        from .state.sharded import unwrap

        rng = (self.restore_rng if strict else False) if restore_rng is None else restore_rng
        # optimizers over DTensors get state tensors to fill in place (undone if nothing is restored)
        prepared = [
            o
            for o in (unwrap(v) for v in state.values())
            if isinstance(o, torch.optim.Optimizer) and prepare_optimizer_state(o)
        ]
        wanted = None if strict else {*state, *((RNG_KEY,) if rng else ())}  # read only these

        def use(source: Source) -> tuple[list[str], list[str]]:
            captured = source.read(
                rank=self.rank, allow_pickle=self.allow_pickle, sharded=sharded, entries=wanted
            )
            return _apply(state, captured, source.step, strict=strict, rng=rng)

        try:
            sharded = target_shards(state)
            survivors = Survivors(tiers=self._restore_tiers)
            with in_place_reads(True) if self._in_place else contextlib.nullcontext(), _wanted(sharded):
                done = self._restore_chain.run(Loss(step=step), survivors, use)
            prepared = []
        finally:
            for o in prepared:
                o.state.clear()
        log.info("recoverkit: rank %d restored step %d with %s from %s", self.rank, done.step, done.strategy,
                 done.source.describe())
        if done.source.tier_name is not None:
            self._learn(done.source.tier_name, good=done.step)
        missing, unexpected = done.value
        return RestoreResult(done.step, missing, unexpected)

    # -------------------------------------------------------------- internals
    def _survivors(self) -> Survivors:
        return Survivors(tiers=tuple(self.tiers))


def _wanted(sharded: Mapping[str, Any]) -> contextlib.AbstractContextManager[None]:
    """A memory restore in the chain gathers of each sharded tensor only the pieces that
    overlap this rank's target (``recovery.memory.wanted_regions``); nothing is imported to
    say so when no memory restore was ever built."""
    mod = sys.modules.get("recoverkit.recovery.memory")
    if mod is None or not sharded:
        return contextlib.nullcontext()
    boxes = {k: (tuple(int(x) for x in st.offsets), tuple(int(x) for x in st.local.shape)) for k, st in sharded.items()}
    return mod.wanted_regions(boxes)  # type: ignore[no-any-return]


def _memory_restore(tiers: Sequence[ReadableTier]) -> tuple[RecoveryStrategy, list[ReadableTier]] | None:
    """The memory restore over the memory tiers among ``tiers`` (the host tier, the
    shared-memory tier and the replica tier, whichever are there), with the tiers it covers;
    None without a memory tier of a job of several ranks. A tier of a kind whose module was
    never imported cannot be among them, so nothing is imported to look."""

    def find(module: str, name: str) -> Any:
        mod = sys.modules.get(module)
        cls = getattr(mod, name, None) if mod is not None else None
        return next((t for t in tiers if cls is not None and isinstance(t, cls)), None)

    shm = find("recoverkit.staging.shm_tier", "ShmTier")
    host = find("recoverkit.staging.host_tier", "HostTier")
    # one rank: its own snapshot is the whole state, read by tier fallback like any tier
    # (verified before anything is applied)
    shm = shm if shm is not None and shm.world_size > 1 else None
    host = host if host is not None and host.world_size > 1 else None
    if shm is None and host is None:
        return None
    replica = find("recoverkit.staging.replica", "ReplicaTier") if shm is not None else None
    from .recovery.memory import MemoryRestore

    strategy = MemoryRestore(shm, replica=replica, host=host)
    return strategy, [t for t in (host, shm, replica) if t is not None]


def _apply(
    state: MutableMapping[str, Any], captured: dict[str, Any], step: int, *, strict: bool, rng: bool
) -> tuple[list[str], list[str]]:
    """Apply ``captured`` (all, or what ``state`` names); return (missing, unexpected)."""
    from .restore.apply import apply_restored
    from .staging.plan import RNG_KEY

    if strict:
        apply_restored(state, captured, restore_rng=rng)
        return [], []
    missing = sorted(str(k) for k in state if k not in captured)
    unexpected = sorted(str(k) for k in captured if k not in state and (k != RNG_KEY or not rng))
    chosen = {k: state[k] for k in state if k in captured and k != RNG_KEY}
    if state and not chosen:
        saved = sorted(str(k) for k in captured if k != RNG_KEY)
        raise IncompatibleCheckpointError(
            f"step {step} holds none of the entries {missing} (it holds {saved})"
        )
    subset = {k: captured[k] for k in (*chosen, RNG_KEY) if k in captured and (k != RNG_KEY or rng)}
    apply_restored(chosen, subset, restore_rng=rng)
    for k, v in chosen.items():  # plain values were replaced in `chosen`
        state[k] = v
    return missing, unexpected


class ReadOnlyFS(LocalFS):
    """A :class:`LocalFS` that reads through ``inner``: the reads are an allow-list; every other
    public operation (one added later too) raises StorageError (EROFS) before doing anything.

    Example:
        >>> import errno, tempfile
        >>> try:
        ...     ReadOnlyFS().mkdir(tempfile.mkdtemp() + "/x")
        ... except OSError as e:
        ...     e.errno == errno.EROFS
        True
    """

    READS = frozenset(
        {"read_file", "listdir", "size", "is_file", "is_dir", "exists", "read_segment"}
    )

    def __init__(self, inner: LocalFS | None = None) -> None:
        self.inner = inner if inner is not None else LocalFS()
        self.engine = self.inner.engine  # segments and checksums: the wrapped file system's engine


def _method(name: str) -> Callable[..., Any]:
    """ReadOnlyFS's ``name``: the inner file system's if it only reads, else a refusal."""

    def method(self: ReadOnlyFS, path: str, *args: Any, **kwargs: Any) -> Any:
        if name not in ReadOnlyFS.READS:
            raise StorageError(errno.EROFS, f"{path}: a reader never writes ({name} refused)", path)
        return getattr(self.inner, name)(path, *args, **kwargs)

    return method


for _name, _value in vars(LocalFS).items():
    if callable(_value) and not _name.startswith("_"):
        setattr(ReadOnlyFS, _name, _method(_name))
