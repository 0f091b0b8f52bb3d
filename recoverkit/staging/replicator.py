"""The replication rounds: each rank's newest shared-memory snapshot copied to its holders.

Where it sits: the peer-replica tier (:mod:`recoverkit.staging.replica`) runs one
:class:`Replicator` thread per rank over a :class:`~recoverkit.distributed.transport.PeerTransport`
of its own (its own process group, so training collectives never queue behind it). The shm
tier writes this rank's own snapshots into ``store.slots(rank)``; the replicator sends the
newest of them to this rank's *holders* and receives its *owners'* snapshots into
``store.slots(owner, replica=True)``. Holders and owners come from
:mod:`recoverkit.distributed.placement`.

Rounds run in lock-step with every peer (holder or owner), two exchanges each::

    header  every peer, both ways, one message each (:mod:`.replica_wire`: fields + index):
              to a holder:  "my newest snapshot is step S of N bytes" + its index
                            (only while the holder lacks it), or nothing new
              to an owner:  "I hold your step H; I take up to C bytes (C = 0 while
                            stopping); I refused your step F"
              either way:   the stopping flag; a CRC-32C of the message itself
    data    every peer, both ways: the snapshot's bytes where a transfer was agreed, else
            0 bytes. Owner and holder agree without another message: a transfer happens
            exactly when the owner announced S > H within C (both saw both headers).
            A holder that refuses what was announced (an index its hostile decoder
            rejects, of another owner, step or world, no free slot) posts a 0-byte
            buffer: the transport refuses it on both ends before a byte moves; its next
            header names the step refused, and the owner announces only newer ones.

The receiver writes straight into a replica slot (``begin(step, N).view``), then checks the
CRC-32C of *every* record of the index (blob and shards) before ``commit(index)``. Where the
transport takes bytes verified by the receiver's records (``distributed.transport.Unsigned``
and ``exchange(checks=)``), the sender computes no CRC of its own (the records' are in the
index it announced: it reads the slot once, to send it) and the receiver's records check is
the transport's one pass over the landed bytes; otherwise the transport's CRC over the
whole buffer comes on top. A bad
transfer is aborted (the slot stays torn, never listed), counted and logged, and the next
round offers the owner's newest snapshot again. A replica counts as held only once
committed; only then is it published (``publish``).

At most one replication is in flight per rank: a round sends one snapshot, the newest
complete one when it starts; steps offered meanwhile and never sent are *superseded*
(counted in :attr:`Replicator.stats`, logged at debug). The sender keeps its slot open
(pinned: the shm tier's next write never reuses it) until the round's data exchange ends.
A round where nothing moves waits up to ``idle_s`` (or until :meth:`Replicator.wake`).

Errors. The transport raises one error for a whole exchange, without saying which transfers
did get through, so no decision here rests on it: a header is checked by its own CRC, a
replica by its records' CRCs, and a sender learns from the holder's next header what it
holds (it announces again until then). A lost or stuck peer (PeerLostError /
PeerTimeoutError, within the transport's timeout) ends the thread with the error logged and
kept in ``stats["error"]``.

Stopping. :meth:`Replicator.stop` sets the stopping flag; each pair of peers stops once
both sent their flag (both sides see that in the same round), and the thread ends when no
pair is left, so no rank waits on a peer that already left.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from ..errors import IntegrityError, StorageError, TransportError
from ..format.shm_index import MAX_INDEX_BYTES, ShmIndex, decode_index
from .replica_wire import (
    ANNOUNCE,
    HEADER,
    HOLDER,
    OVERSIZE,
    STOP,
    Header,
    decode_header,
    encode_header,
    verify_records,
)

__all__ = ["COUNTERS", "Replicator"]

log = logging.getLogger("recoverkit")

#: index bytes a header buffer takes at first; grown (both sides alike) for a larger index
FIRST_INDEX_CAP = 1 << 20
#: the counters of :attr:`Replicator.stats`
COUNTERS = (
    "rounds", "announced", "sent", "bytes_sent", "received", "bytes_received", "superseded",
    "bad_transfers", "refused", "transport_errors",
)  # fmt: skip
NO_LIMIT = (1 << 63) - 1


def _unsigned_sends(transport: Any) -> Callable[[Any], Any] | None:
    """The transport's wrapper for bytes it sends without a CRC (the receiver verifies them
    by its records: ``exchange(checks=)``), or None where it has none."""
    wrap = getattr(importlib.import_module("recoverkit.distributed.transport"), "Unsigned", None)
    try:
        takes_checks = "checks" in inspect.signature(transport.exchange).parameters
    except (TypeError, ValueError):  # pragma: no cover - not introspectable
        return None
    return wrap if callable(wrap) and takes_checks else None


class _Peer:
    """One peer's pair state (the same round count on both sides)."""

    def __init__(self, rank: int, *, holder: bool, owner: bool) -> None:
        self.rank = rank
        self.holder = holder  # it holds replicas of this rank's snapshots
        self.owner = owner  # this rank holds replicas of its snapshots
        self.round = 0
        self.send_cap = FIRST_INDEX_CAP  # (holder) the index bytes its header buffer takes
        self.recv_cap = FIRST_INDEX_CAP if owner else 0  # (owner) the index bytes ours takes
        self.buf = bytearray(HEADER.size + self.recv_cap)  # its headers land here
        self.known_held = -1  # (holder) the newest of our steps it holds, as far as we know
        self.refused_by_it = -1  # (holder) the newest of our steps it refused: not announced again
        self.refused = -1  # (owner) the newest of its steps we refused
        self.sent_stop = self.got_stop = self.done = False
        self.warned = False  # a snapshot too large for it was warned about

    def grow_send(self, index_len: int) -> None:
        """We announced an index too large for its buffer: it grows it (see grow_recv);
        its next header says the size it took."""
        if self.send_cap < index_len <= MAX_INDEX_BYTES:
            self.send_cap = index_len

    def grow_recv(self, index_len: int) -> None:
        """It announced an index too large for our buffer: grow it for the next round
        (up to the largest index a decoder takes; a larger one is never accepted)."""
        if self.recv_cap < index_len <= MAX_INDEX_BYTES:
            self.recv_cap = index_len
            self.buf = bytearray(HEADER.size + index_len)


class Replicator:
    """One rank's replication thread (see the module docstring).

    Args:
        transport: the peer transport (its own process group), used by this thread only.
        rank, world_size: this rank and the job's size (an index of another world is refused).
        holders: the ranks holding this rank's replicas; owners: the ranks whose replicas
            this rank holds (both from the placement).
        source: this rank's own snapshots (``store.slots(rank)``: ``newest()``, ``open()``).
        sink: ``sink(owner)`` -> the replica slots of ``owner`` (``store.slots(owner, replica=True)``).
        capacity: the largest snapshot accepted from one owner (the replica budget's share).
        publish: called with ``{owner: step}`` (every replica held, committed) after a commit.
        idle_s: how long a round where nothing moved waits before the next.
        engine: the copy engine computing the CRCs (default: the process-wide one).
        run_id: this run's id: only snapshots of this run are sent, and only replicas of
            this run count as held (a restarted job's new run never mistakes the replicas
            of a dead run's steps for its own); None: any run.

    Example (every rank, after the placement; what ``join_replication`` does)::

        r = Replicator(ProcessGroupTransport(timeout_s=60), rank=rank, world_size=world,
                       holders=placement[rank], owners=owners_of(placement, rank),
                       source=store.slots(rank), sink=lambda o: store.slots(o, replica=True))
        r.start()
        r.offered(step)          # after the shm tier wrote ``step``
        r.stop(); r.join(65.0)   # every rank: the stop handshake
    """

    def __init__(
        self,
        transport: Any,
        *,
        rank: int,
        world_size: int,
        holders: Sequence[int],
        owners: Sequence[int],
        source: Any,
        sink: Callable[[int], Any],
        capacity: int = NO_LIMIT,
        publish: Callable[[Mapping[int, int]], None] | None = None,
        idle_s: float = 0.05,
        engine: Any = None,
        run_id: str | None = None,
    ) -> None:
        self.transport = transport
        self.rank = rank
        self.world_size = world_size
        self.source = source
        self.sink = sink
        self.capacity = capacity
        self.publish = publish
        self.idle_s = idle_s
        self.engine = engine
        self.peers = {
            p: _Peer(p, holder=p in holders, owner=p in owners) for p in sorted({*holders, *owners})
        }
        self.held: dict[int, int] = {}  # owner -> newest replica step committed here
        self.run_id = run_id
        for o in owners:
            self.held[o] = max((i.step for i in self._ours(sink(o))), default=-1)
        self._lock = threading.Lock()
        self._offered: set[int] = set()
        self._picked = -1
        self._stats: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
        self._stats.update(in_flight=None, error=None, stopped=False)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsigned = _unsigned_sends(transport)  # None: the transport CRCs every buffer

    # ------------------------------------------------------------ control
    def start(self) -> None:
        """Start the thread (once); the replicas already held (this run's) are published."""
        if self.publish is not None and any(s >= 0 for s in self.held.values()):
            self.publish(dict(self.held))
        if self.peers and self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"recoverkit-replica-{self.rank}", daemon=True)
            self._thread.start()

    def offered(self, step: int) -> None:
        """Step ``step`` is (about to be) in this rank's shm slots: wake the thread."""
        with self._lock:
            self._offered.add(step)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread to end; True when it did (or never ran)."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._stats)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._stats[k] += v

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            while any(not p.done for p in self.peers.values()):
                moved = self._round()
                if not moved and not self._stop.is_set():
                    self._wake.wait(self.idle_s)
                self._wake.clear()
        except TransportError as e:
            log.error("recoverkit: replication on rank %d stopped: %s", self.rank, e)
            with self._lock:
                self._stats["error"] = f"{type(e).__name__}: {e}"
        except BaseException as e:  # noqa: BLE001 - a background thread: logged, kept in stats
            log.exception("recoverkit: replication on rank %d failed", self.rank)
            with self._lock:
                self._stats["error"] = f"{type(e).__name__}: {e}"
        finally:
            with self._lock:
                self._stats["stopped"] = True
                self._stats["in_flight"] = None

    def _ours(self, slots: Any) -> list[ShmIndex]:
        """The complete snapshots in ``slots`` of this run, by step."""
        return [i for i in slots.indexes() if self.run_id is None or i.run_id == self.run_id]

    def _pick(self, active: list[_Peer]) -> Any:
        """The view of the newest own snapshot offered if a holder lacks it (pinned), else None.

        Only offered steps are sent (the tier's schedule, and this run's snapshots only)."""
        with self._lock:
            offered = {*self._offered, self._picked}
        complete = [i.step for i in self._ours(self.source) if i.step in offered]
        if not complete:
            return None
        newest = max(complete)
        with self._lock:
            if newest != self._picked:
                skipped = sorted(s for s in self._offered if self._picked < s < newest)
                if skipped:
                    self._stats["superseded"] += len(skipped)
                    log.debug("recoverkit: rank %d replicates step %d, superseding steps %s", self.rank, newest, skipped)
                self._offered = {s for s in self._offered if s > newest}
                self._picked = newest
        if not any(p.holder and max(p.known_held, p.refused_by_it) < newest for p in active):
            return None
        try:
            return self.source.open(newest)
        except (OSError, IntegrityError) as e:  # overwritten meanwhile: the next round picks again
            log.debug("recoverkit: rank %d cannot open its step %d to replicate: %s", self.rank, newest, e)
            return None

    def _round(self) -> bool:
        stopping = self._stop.is_set()
        active = [p for p in self.peers.values() if not p.done]
        view = None if stopping else self._pick(active)
        try:
            return self._exchange(active, view, stopping)
        finally:
            if view is not None:
                view.close()

    def _exchange(self, active: list[_Peer], view: Any, stopping: bool) -> bool:
        # ---- headers
        sent: dict[int, Header] = {}
        for p in active:
            flags = STOP if stopping else 0
            h = Header(flags, p.round, -1, 0, -1, -1, 0, 0, b"")
            if p.holder and view is not None and view.step > max(p.known_held, p.refused_by_it):
                raw = view.index_bytes
                h.flags |= ANNOUNCE if len(raw) <= p.send_cap else OVERSIZE
                h.step, h.data_bytes, h.index = view.step, view.index.data_bytes, raw
            if p.owner:
                h.flags |= HOLDER
                h.held, h.refused = self.held.get(p.rank, -1), p.refused
                h.capacity = 0 if stopping else self.capacity
                h.index_cap = p.recv_cap
            sent[p.rank] = h
        got: dict[int, Header | None] = {}
        try:
            self.transport.exchange(
                {r: encode_header(h) for r, h in sent.items()}, {p.rank: p.buf for p in active}, exact=False
            )
        except IntegrityError as e:  # which transfer failed is found below, header by header
            self._count(transport_errors=1)
            log.debug("recoverkit: rank %d, replication headers: %s", self.rank, e)
        for p in active:
            try:
                got[p.rank] = decode_header(p.buf, p.round, p.rank)
            except IntegrityError as e:
                got[p.rank] = None
                log.warning("recoverkit: rank %d: %s", self.rank, e)
        with self._lock:
            self._stats["rounds"] += 1
        # ---- what moves: both ends decide alike from both headers
        sends: dict[int, Any] = {}
        recvs: dict[int, Any] = {}
        writers: dict[int, tuple[Any, ShmIndex, bytes]] = {}
        moved = False
        for p in active:
            mine, theirs = sent[p.rank], got[p.rank]
            p.round += 1
            p.sent_stop |= stopping
            if theirs is not None and theirs.flags & STOP:
                p.got_stop = True
            if mine.flags & (ANNOUNCE | OVERSIZE):
                self._count(announced=1)
            if p.holder:
                send = b""
                if theirs is not None and theirs.flags & HOLDER:
                    p.known_held, p.send_cap = theirs.held, theirs.index_cap
                    p.refused_by_it = theirs.refused
                    if mine.flags & ANNOUNCE and mine.step > theirs.held:
                        if mine.data_bytes <= theirs.capacity:
                            send = view.data if self._unsigned is None else self._unsigned(view.data)
                        elif not p.warned:  # once per peer
                            p.warned = True
                            log.warning(
                                "recoverkit: rank %d: step %d (%d bytes) exceeds what rank %d takes as its "
                                "replica (%d bytes: raise the replica tier's budget_bytes)",
                                self.rank, mine.step, mine.data_bytes, p.rank, theirs.capacity,
                            )  # fmt: skip
                sends[p.rank] = send
            if mine.flags & OVERSIZE:  # both ends grow the buffer for the next round
                p.grow_send(len(mine.index))
            if p.owner:
                recvs[p.rank] = bytearray(0)
                if theirs is not None and theirs.flags & OVERSIZE:
                    p.grow_recv(theirs.index_len)
                if theirs is not None and theirs.flags & ANNOUNCE:
                    if theirs.step > mine.held and theirs.data_bytes <= mine.capacity:
                        w = self._accept(p.rank, theirs)
                        if w is None:
                            p.refused = theirs.step
                        else:
                            writers[p.rank] = w
                            recvs[p.rank] = w[0].view
        # ---- data
        ok = True
        busy = bool(writers) or any(_nbytes(d) for d in sends.values())
        with self._lock:
            self._stats["in_flight"] = self._stats["rounds"] if busy else None
        verified: set[int] = set()  # owners whose replica passed every record's CRC on arrival
        try:
            if self._unsigned is None:
                self.transport.exchange(sends, recvs, exact=True)
            else:
                checks = {o: self._check(o, idx, verified) for o, (_, idx, _) in writers.items()}
                self.transport.exchange(sends, recvs, exact=True, checks=checks)
        except IntegrityError as e:
            ok = False
            self._count(transport_errors=1)
            log.debug("recoverkit: rank %d, replication data: %s", self.rank, e)
        except BaseException:
            for w, _, _ in writers.values():
                w.abort()
            raise
        finally:
            with self._lock:
                self._stats["in_flight"] = None
        for r, data in sends.items():
            if _nbytes(data) and ok:
                self.peers[r].known_held = view.step
                self._count(sent=1, bytes_sent=_nbytes(data))
                moved = True
        if writers:
            moved = True
            self._commit(writers, verified)
        for p in active:
            p.done = p.sent_stop and p.got_stop
        return moved

    def _accept(self, owner: int, h: Header) -> tuple[Any, ShmIndex, bytes] | None:
        """A replica slot for what ``owner`` announced, or None (refused: 0-byte receive)."""
        try:
            idx = decode_index(h.index, path=f"index announced by rank {owner}")
            if idx.rank != owner or idx.step != h.step or idx.data_bytes != h.data_bytes:
                raise IntegrityError(
                    f"rank {owner} announced step {h.step} of {h.data_bytes} bytes with the index of rank "
                    f"{idx.rank} step {idx.step} of {idx.data_bytes} bytes"
                )
            if idx.world_size != self.world_size:
                raise IntegrityError(f"rank {owner} announced a snapshot of a world of {idx.world_size}")
            return self.sink(owner).begin(idx.step, idx.data_bytes), idx, h.index
        except (IntegrityError, StorageError, ValueError) as e:
            self._count(refused=1)
            log.warning("recoverkit: rank %d refuses the replica of rank %d step %d: %s", self.rank, owner, h.step, e)
            return None

    def _drop_dead_timeline(self, owner: int, idx: ShmIndex) -> None:
        """Replicas of ``owner`` from another run past this step are of a timeline that
        ended (the job restarted from an earlier step): never offered for restore. (An
        older copy of the same step was dropped by the commit.)"""
        slots = self.sink(owner)
        for other in slots.indexes():
            if other.run_id != idx.run_id and other.step > idx.step:
                slots.invalidate(other.step)
                log.info(
                    "recoverkit: rank %d dropped the replica of rank %d step %d of an earlier run",
                    self.rank, owner, other.step,
                )  # fmt: skip

    def _check(self, owner: int, idx: ShmIndex, verified: set[int]) -> Callable[[memoryview], None]:
        """The transport's check of ``owner``'s replica as it lands: every record's CRC."""

        def check(data: memoryview) -> None:
            bad = verify_records(idx, data, engine=self.engine)
            if bad is not None:
                raise IntegrityError(f"rank {self.rank}: the replica of rank {owner} step {idx.step}: {bad}")
            verified.add(owner)

        return check

    def _commit(self, writers: Mapping[int, tuple[Any, ShmIndex, bytes]], verified: Collection[int] = ()) -> None:
        """Check every record of each received replica (unless the transport's check did as
        it landed: ``verified``), then commit it (or abort it)."""
        committed = False
        for owner, (w, idx, raw) in writers.items():
            try:
                bad = None if owner in verified else verify_records(idx, w.view, engine=self.engine)
                if bad is not None:
                    w.abort()
                    self._count(bad_transfers=1)
                    log.warning(
                        "recoverkit: rank %d: the replica of rank %d step %d arrived damaged (%s); not kept, "
                        "the next round sends the newest again", self.rank, owner, idx.step, bad,
                    )  # fmt: skip
                    continue
                w.commit(raw)
            except BaseException:
                w.abort()
                raise
            self._drop_dead_timeline(owner, idx)
            self.held[owner] = idx.step
            self._count(received=1, bytes_received=idx.data_bytes)
            committed = True
        if committed and self.publish is not None:
            self.publish(dict(self.held))


def _nbytes(data: Any) -> int:
    """Bytes of a send (a buffer, or the transport's wrapper of one)."""
    return len(getattr(data, "data", data))
