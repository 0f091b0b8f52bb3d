"""The Checkpointer: a thin sequencer of the save and restore stages.

save:    capture -> flatten -> encode objects -> contiguous byte views -> tier.write_rank
         -> commit (manifest last, atomic rename, ``latest``) -> retention
restore: discover newest verifying step -> read + verify every byte -> check the target
         fits -> apply (model, optimizers, schedulers, RNG, data position, plain values)

Each stage lives in its own module; this one only orders them, times them and turns
failures into the error the user sees.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from .config import CheckpointOptions
from .errors import (
    CheckpointNotFoundError,
    CommitError,
    IntegrityError,
)
from .format.manifest import Manifest, TensorRecord
from .restore.reader import read_state
from .state import RNGState, apply, capture, dtype_name, encode, flatten, to_bytes_view
from .storage.base import RankPayload, ShardData
from .storage.discovery import CheckpointSkippedWarning, apply_retention, candidates
from .storage.faults import FaultInjector
from .storage.fs import LocalFS
from .storage.local import LocalTier
from .storage.lock import RunLock

__all__ = ["Checkpointer", "SaveResult", "RNG_KEY"]

#: Key under which the random states are stored when ``capture_rng`` is on.
RNG_KEY = "__rng__"


@dataclass(frozen=True)
class SaveResult:
    """What one save did and how long each stage took (seconds)."""

    step: int
    path: str
    nbytes: int
    timings_s: Mapping[str, float] = field(default_factory=dict)
    deleted_steps: tuple[int, ...] = ()


class Checkpointer:
    """Saves and restores a whole training state under one root directory.

    Args:
        root: the checkpoint root (created if missing; must be writable).
        options: :class:`~recoverkit.CheckpointOptions`.
        fs: file-system operations (inject a ``FaultyFS`` to test failures).
        faults: a :class:`~recoverkit.storage.faults.FaultInjector` told of every phase.
        run_id: identifies the run in every manifest (random if not given).

    Example:
        >>> import tempfile, torch
        >>> model = torch.nn.Linear(2, 2)
        >>> with Checkpointer(tempfile.mkdtemp()) as ckpt:
        ...     _ = ckpt.save(1, {"model": model})
        ...     ckpt.restore({"model": model})
        1
    """

    def __init__(
        self,
        root: str,
        *,
        options: CheckpointOptions | None = None,
        fs: LocalFS | None = None,
        faults: FaultInjector | None = None,
        run_id: str | None = None,
    ) -> None:
        self.options = options or CheckpointOptions()
        self.faults = faults or FaultInjector()
        self.tier = LocalTier(root, fs=fs, faults=self.faults, direct_io=self.options.direct_io)
        self.root = self.tier.root
        self.run_id = run_id or uuid.uuid4().hex
        self.rank = 0
        self.world_size = 1
        self._lock: RunLock | None = None
        fs_ = self.tier.fs
        fs_.makedirs(self.root)
        fs_.check_writable(self.root)  # an unwritable root fails here, before step 1
        if self.options.lock:
            self._lock = RunLock(self.root).acquire()
        self.tier.cleanup()

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Mapping[str, Any], *, user_meta: Mapping[str, Any] | None = None) -> SaveResult:
        """Save ``state`` as ``step`` and return once it is committed.

        ``state`` maps names to Stateful objects (modules, optimizers, schedulers, samplers,
        anything with ``state_dict``/``load_state_dict``), tensors and plain values.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        t = _Timer()
        captured = self._capture(state)
        skeleton, refs = flatten(captured)
        blob = encode(skeleton, allow_pickle=self.options.allow_pickle)
        t.lap("capture")
        shards: list[ShardData] = []
        records: dict[str, TensorRecord] = {}
        keep_alive = []
        for ref in refs:
            src = ref.tensor.detach()
            if ref.alias_of is not None:
                records[ref.key] = TensorRecord(ref.key, dtype_name(src.dtype), tuple(src.shape), alias_of=ref.alias_of)
                continue
            if src.device.type != "cpu":
                src = src.to("cpu")
            src = src.contiguous()
            keep_alive.append(src)
            shape = tuple(src.shape)
            shards.append(ShardData(ref.key, dtype_name(src.dtype), shape, (0,) * len(shape), shape, to_bytes_view(src)))
        t.lap("stage")
        manifest, deleted = self._commit(step, RankPayload(self.rank, blob, shards), records, t, user_meta or {})
        del keep_alive
        return SaveResult(step, self.tier.step_path(step), manifest.nbytes, t.laps, tuple(deleted))

    def _capture(self, state: Mapping[str, Any]) -> dict[str, Any]:
        if RNG_KEY in state:
            raise ValueError(f"{RNG_KEY!r} is reserved for the random states")
        captured = capture(state)
        if self.options.capture_rng:
            captured[RNG_KEY] = RNGState().state_dict()
        return captured

    def _commit(
        self,
        step: int,
        payload: RankPayload,
        aliases: dict[str, TensorRecord],
        t: _Timer,
        user_meta: Mapping[str, Any],
    ) -> tuple[Manifest, list[int]]:
        staging = None
        try:
            staging = self.tier.prepare(step)
            self.faults.reached("before_data", step=step, rank=self.rank)
            rank_records = self.tier.write_rank(staging, payload)
            self.faults.reached("after_data", step=step, rank=self.rank)
            t.lap("write")
            tensors: dict[str, TensorRecord] = {}
            dtypes = {s.key: (s.dtype, s.global_shape) for s in payload.shards}
            for key, shard in rank_records.shards:
                dtype, shape = dtypes[key]
                prev = tensors.get(key)
                tensors[key] = TensorRecord(key, dtype, shape, (prev.shards if prev else ()) + (shard,))
            tensors.update(aliases)
            manifest = Manifest(
                step=step,
                run_id=self.run_id,
                world_size=self.world_size,
                tensors=tensors,
                blobs=(rank_records.blob,),
                files=rank_records.files,
                pickled=self.options.allow_pickle,
                user_meta=dict(user_meta),
            )
            self.tier.commit(step, staging, manifest)
            t.lap("commit")
        except BaseException as e:
            if staging is not None:
                try:
                    self.tier.abort(staging)
                except OSError as cleanup_error:
                    warnings.warn(f"could not remove {staging}: {cleanup_error}", stacklevel=3)
            if isinstance(e, Exception):
                raise CommitError(f"saving step {step} to {self.root} failed: {e}", step=step) from e
            raise
        self.faults.reached("retention", step=step, rank=self.rank)
        deleted = apply_retention(self.tier, self.options.retention)
        t.lap("retention")
        return manifest, deleted

    # --------------------------------------------------------------- restore
    def restore(self, state: MutableMapping[str, Any], step: int | None = None) -> int:
        """Restore ``state`` in place from ``step`` (default: the newest valid step).

        Every byte is verified before anything is applied; a damaged newest step is skipped
        with a :class:`CheckpointSkippedWarning` and the previous one is used. Returns the
        step restored. Raises CheckpointNotFoundError when no valid step exists.
        """
        failures = []
        for s, manifest in candidates(self.tier, step=step):
            try:
                captured = read_state(self.tier, s, manifest, rank=self.rank, allow_pickle=self.options.allow_pickle)
            except (IntegrityError, OSError) as e:
                if step is not None:
                    raise
                warnings.warn(f"skipping {self.tier.describe(s)}: {e}", CheckpointSkippedWarning, stacklevel=2)
                failures.append(f"step {s}: {e}")
                continue
            self._apply(state, captured, s)
            return s
        detail = f" ({'; '.join(failures)})" if failures else ""
        raise CheckpointNotFoundError(f"{self.root}: no valid checkpoint to restore{detail}")

    def _apply(self, state: MutableMapping[str, Any], captured: dict[str, Any], step: int) -> None:
        rng = captured.pop(RNG_KEY, None)
        apply(state, captured)
        if rng is not None and self.options.capture_rng:
            RNGState().load_state_dict(rng)

    # ------------------------------------------------------------- discovery
    def latest(self) -> int | None:
        """The newest committed step whose manifest and files verify, or None."""
        for s, _ in candidates(self.tier):
            return s
        return None

    def steps(self) -> list[int]:
        """All committed steps, ascending."""
        return self.tier.steps()

    def manifest(self, step: int) -> Manifest:
        return self.tier.manifest(step)

    # ------------------------------------------------------------- lifecycle
    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Timer:
    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now
        self.laps["total"] = now - self.t0

