"""Peer replicas: each rank's shared-memory snapshot copied to ``k`` ranks on other nodes.

Where it sits: a snapshot tier (kind ``"replica"``) after the shared-memory tier in
``CheckpointOptions.tiers``. The shm tier writes this rank's staged save into
``store.slots(rank)``; the drain then offers the save here (``early``), which only notes
that the step exists and wakes the replication thread (:mod:`recoverkit.staging.replicator`):
the copy to the holders runs in the background on a process group of its own and never
holds up training. What this tier holds are *other* ranks' snapshots, so it lists no step
of its own (``steps() == []``): the memory restore (``recovery/memory``) finds replicas in
the shared memory of each node, and where they are through :meth:`ReplicaTier.holdings`.

Construction is collective (every rank, at the same point: the Checkpointer builds its tiers
together): each rank's node name (``RECOVERKIT_NODE``, default the host name) is gathered
once through the coordinator, every rank computes the same placement
(:func:`~recoverkit.distributed.placement.place_replicas`), and every rank builds the
transport's process group together.

Holdings: after each replica it commits, a holder publishes ``{owner: step}`` (the newest
replica of each owner it holds, committed) under its own key of the coordinator's store;
:meth:`ReplicaTier.holdings` reads every rank's key. A replica is never published before
its records' CRCs were checked and its index committed.

Slots: a send in flight keeps its own slot open (pinned), so with the shm tier's two slots
(one holding the newest complete snapshot) a slow replication would leave the shm tier no
slot for its next step; it gets a third by default when a replica tier is listed (fewer: a warning).

Example (every rank; tiers built by the Checkpointer from the tier list)::

    opts = CheckpointOptions(tiers=[TierSpec.shm(slots=3), TierSpec.replica(k=1), TierSpec.local(every_steps=50)])
    ckpt = Checkpointer(root, options=opts)
    ...
    ckpt.tier("replica").holdings()   # {owner: {holder: step}}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..distributed.coordinator import Coordinator
from ..distributed.placement import owners_of, place_replicas
from ..errors import CheckpointNotFoundError, ConfigError
from ..format.manifest import Manifest
from ..storage.base import Buffer, Region
from ..storage.shm import ShmStore, node_name
from .base import SnapshotTier
from .replicator import COUNTERS, Replicator

__all__ = ["DEFAULT_BUDGET_BYTES", "ReplicaTier", "build_replica_tier", "join_replication"]

log = logging.getLogger("recoverkit")

#: replica bytes a rank holds per owner when no budget is given: two slots of 2 GiB
DEFAULT_BUDGET_BYTES = 4 << 30


class ReplicaTier(SnapshotTier):
    """The replication of this rank's snapshots, and the replicas of others' held here.

    Built by :func:`join_replication` (collective). Attributes: ``placement`` (``{owner:
    [holder, ...]}``, the same on every rank), ``nodes`` (each rank's node), ``transport``
    (its own process group; None in a world of one), ``store`` (this node's replica slots).
    """

    name = "replica"
    #: offered each staged save right after the shm tier wrote it, before the disk commits
    early = True

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        nodes: Sequence[str],
        placement: Mapping[int, Sequence[int]],
        store: ShmStore,
        replicator: Replicator | None,
        transport: Any,
        read_holdings: Callable[[], dict[int, dict[int, int]]],
        timeout_s: float,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.nodes = list(nodes)
        self.placement = {o: list(h) for o, h in placement.items()}
        self.store = store
        self.transport = transport
        self.timeout_s = timeout_s
        self._replicator = replicator
        self._read_holdings = read_holdings
        self._closed = False
        self._stopped = False  # the thread ended (or never ran): the store may be cleared

    # ------------------------------------------------------------ the snapshot tier
    def offer(self, snap: Any) -> bool:
        """Note that ``snap.step`` is in this rank's shm slots; the thread sends it (or a
        newer one). Never owns the snapshot."""
        if self._replicator is not None and not self._closed:
            self._replicator.offered(int(snap.step))
        return False

    def withdraw(self, snap: Any) -> None:
        return None  # nothing of the pool is held

    def evict_one(self) -> bool:
        return False

    def close(self) -> None:
        """End the rounds with the stop handshake (bounded by the transport's timeout), then
        release the process group. Every rank calls it (Checkpointer.close)."""
        if self._closed:
            return
        self._closed = True
        done = self._stopped = True
        if self._replicator is not None:
            self._replicator.stop()
            done = self._replicator.join(self.timeout_s + 5.0)
            if not done:
                log.error(
                    "recoverkit: rank %d: the replication thread did not stop within %.0f s; left behind",
                    self.rank, self.timeout_s + 5.0,
                )  # fmt: skip
        if done and self.transport is not None:
            try:
                self.transport.close()
            except Exception as e:  # noqa: BLE001 - a broken group is gone anyway
                log.debug("recoverkit: rank %d: closing the replication transport: %s", self.rank, e)
        self._stopped = done
        if done:
            self.store.close()

    def discard(self) -> None:
        """The job ended normally: delete the replicas held here (and the job's directory
        on this node once nothing else is left in it)."""
        self.close()  # (the Checkpointer closed it already: then nothing to do)
        if not self._stopped:
            log.error("recoverkit: rank %d: replicas kept in shared memory (the replication never stopped)", self.rank)
            return
        for owner in self.owners():
            self.store.slots(owner, replica=True)
        self.store.clear()

    # ------------------------------------------------------------ what is held
    def holders(self, owner: int) -> list[int]:
        """The ranks placed to hold ``owner``'s replicas."""
        return list(self.placement.get(owner, ()))

    def owners(self) -> list[int]:
        """The ranks whose replicas this rank holds."""
        return owners_of(self.placement, self.rank)

    def holdings(self) -> dict[int, dict[int, int]]:
        """``{owner: {holder: step}}``: the newest replica each holder holds, committed, as
        published by the holders (every rank sees the same once published)."""
        return self._read_holdings()

    @property
    def stats(self) -> dict[str, Any]:
        """The replication's counters: rounds, announced, sent, bytes_sent, received,
        bytes_received, superseded, bad_transfers, refused, transport_errors; ``in_flight``
        (the round whose data exchange runs now, or None), ``error`` (what ended the thread),
        ``stopped``."""
        if self._replicator is None:  # nobody to replicate with
            return {**dict.fromkeys(COUNTERS, 0), "stopped": True, "error": None, "in_flight": None}
        return self._replicator.stats

    # ------------------------------------------------------------ not a source by itself
    def steps(self) -> list[int]:
        return []

    def manifest(self, step: int) -> Manifest:
        raise CheckpointNotFoundError(
            f"the replica tier holds other ranks' snapshots, restored through the memory restore (step {step})"
        )

    def read(self, step: int, requests: Sequence[tuple[Region, Buffer]]) -> None:
        raise CheckpointNotFoundError(
            f"the replica tier holds other ranks' snapshots, restored through the memory restore (step {step})"
        )

    def describe(self, step: int) -> str:
        return f"peer replicas of step {step}"


# ------------------------------------------------------------------ building it (collective)
def join_replication(
    root: str,
    *,
    coordinator: Coordinator,
    k: int = 1,
    groups: Mapping[str, str] | Sequence[Sequence[str]] | None = None,
    budget_bytes: int | None = None,
    run_id: str | None = None,
    shm_dir: str | None = None,
    node: str | None = None,
    timeout_s: float = 60.0,
    scope: str = "replica",
    engine: Any = None,
    on_arrival: Callable[[int, Any], None] | None = None,
    idle_s: float = 0.05,
) -> ReplicaTier:
    """Every rank, together: gather the nodes, place the replicas, build the transport and
    start replicating. Returns this rank's :class:`ReplicaTier`.

    Args:
        root: the checkpoint root (names the shared-memory job directory, as the shm tier's).
        coordinator: the job's coordinator (nodes gathered through it, holdings published in
            its store).
        k: replicas of each rank's snapshot, each on another node.
        groups: ``node -> group``, or lists of node names (e.g. racks): holders on nodes
            of other groups first.
        budget_bytes: the most replica bytes this rank holds, every owner and slot
            together (default :data:`DEFAULT_BUDGET_BYTES` per owner); a snapshot larger
            than one slot's share (budget / owners / slots) is not sent, with a warning on
            its owner.
        run_id: this run's id (only its snapshots are sent, only its replicas count as
            held); None: any.
        timeout_s: the transport's bound on every exchange (a dead peer ends replication
            within it) and on close.
        on_arrival: test seam of the transport (``on_arrival(peer, bytes)`` before its CRC check).
    """
    rank, world = coordinator.rank, coordinator.world_size
    node = node_name(node)
    publish, read = _holdings(coordinator, f"{scope}/holdings", rank, world)
    publish({})  # every key exists before the gather below completes
    nodes = _gather_nodes(coordinator, scope, node, timeout_s)
    placement = place_replicas(nodes, k=k, groups=_group_map(groups))
    owners = owners_of(placement, rank)
    budget = DEFAULT_BUDGET_BYTES * max(1, len(owners)) if budget_bytes is None else int(budget_bytes)
    replicas = ShmStore(root, shm_dir=shm_dir, node=node, budget_bytes=budget)
    own = ShmStore(root, shm_dir=shm_dir, node=node)  # reads this rank's own slots only
    transport = None
    if any(placement.values()):  # the same on every rank: all build the group, or none
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("peer replicas need torch.distributed initialised (init_process_group) on every rank")
        from ..distributed.transport import ProcessGroupTransport

        transport = ProcessGroupTransport(timeout_s=timeout_s, on_arrival=on_arrival)
    replicator = None
    if transport is not None and (placement[rank] or owners):
        replicator = Replicator(
            transport,
            rank=rank,
            world_size=world,
            holders=placement[rank],
            owners=owners,
            source=own.slots(rank),
            sink=lambda o: replicas.slots(o, replica=True),
            capacity=budget // (max(1, len(owners)) * replicas.nslots),
            publish=publish,
            idle_s=idle_s,
            engine=engine,
            run_id=run_id,
        )
        replicator.start()
    return ReplicaTier(
        rank=rank,
        world_size=world,
        nodes=nodes,
        placement=placement,
        store=replicas,
        replicator=replicator,
        transport=transport,
        read_holdings=read,
        timeout_s=timeout_s,
    )


def _group_map(groups: Mapping[str, str] | Sequence[Sequence[str]] | None) -> dict[str, str] | None:
    """``node -> group`` from either form (lists of nodes: group ``g<i>``)."""
    if not groups:
        return None
    if isinstance(groups, Mapping):
        return {str(n): str(g) for n, g in groups.items()}
    out: dict[str, str] = {}
    for i, members in enumerate(groups):
        if isinstance(members, str):
            raise ConfigError(f"groups must be lists of node names, got {groups!r}")
        for n in members:
            if out.setdefault(str(n), f"g{i}") != f"g{i}":
                raise ConfigError(f"node {n!r} is in two replica groups")
    return out


def _gather_nodes(coordinator: Coordinator, scope: str, node: str, timeout_s: float) -> list[str]:
    if coordinator.world_size == 1:
        return [node]
    got = coordinator.gather(f"{scope}/nodes", {"node": node}, timeout_s=timeout_s)
    payload = {"nodes": [g["node"] for g in got]} if got is not None else None
    try:
        nodes = coordinator.broadcast(f"{scope}/nodes_all", payload, timeout_s=timeout_s)["nodes"]
    finally:
        coordinator.finish(scope, gathers=["nodes"], broadcasts=["nodes_all"])
    if (
        not isinstance(nodes, list)
        or len(nodes) != coordinator.world_size
        or not all(isinstance(n, str) and n for n in nodes)
    ):
        raise ConfigError(f"the gathered node names are not one name per rank: {nodes!r}")
    return nodes


def _holdings(
    coordinator: Coordinator, prefix: str, rank: int, world: int
) -> tuple[Callable[[Mapping[int, int]], None], Callable[[], dict[int, dict[int, int]]]]:
    """(publish, read): this rank's holdings into the coordinator's store, everyone's out.

    A coordinator without a store (a world of one) keeps them in this process.
    """
    store = getattr(coordinator, "store", None)
    local: dict[int, dict[int, int]] = {}
    if store is None:

        def publish(held: Mapping[int, int]) -> None:
            local[rank] = {int(o): int(s) for o, s in held.items() if s >= 0}

        def read() -> dict[int, dict[int, int]]:
            return _invert(local)

        return publish, read
    base = f"{getattr(coordinator, 'prefix', 'recoverkit')}/{prefix}"

    def publish_store(held: Mapping[int, int]) -> None:
        body = {str(o): int(s) for o, s in held.items() if s >= 0}
        store.set(f"{base}/{rank}", json.dumps(body))

    def read_store() -> dict[int, dict[int, int]]:
        raw = store.multi_get([f"{base}/{r}" for r in range(world)])
        per_holder: dict[int, dict[int, int]] = {}
        for holder, value in enumerate(raw):
            try:
                body = json.loads(bytes(value).decode())
                per_holder[holder] = {
                    int(o): s for o, s in body.items() if type(s) is int and 0 <= int(o) < world
                }
            except (ValueError, AttributeError) as e:  # a value that is not ours: ignored
                log.warning("recoverkit: holdings of rank %d are unreadable: %s", holder, e)
        return _invert(per_holder)

    return publish_store, read_store


def _invert(per_holder: Mapping[int, Mapping[int, int]]) -> dict[int, dict[int, int]]:
    out: dict[int, dict[int, int]] = {}
    for holder, held in sorted(per_holder.items()):
        for owner, step in held.items():
            out.setdefault(owner, {})[holder] = step
    return out


def build_replica_tier(spec: Any, ctx: Any) -> ReplicaTier:
    """The registry's factory for kind ``"replica"`` (settings ``k``, ``groups``,
    ``budget_bytes``, default as for the shm tier: twice the staging pool's): joins the
    replication with the Checkpointer's context. The shared memory is the shm tier's (its
    ``shm_dir``); a tier list without one is refused."""
    s = dict(spec.settings)
    extra = sorted(set(s) - {"k", "groups", "budget_bytes"})
    if extra:
        raise ConfigError(f"tier {spec.name!r} (replica) has no setting {extra}; it takes ['k', 'groups', 'budget_bytes']")
    shm = [t for t in ctx.options.tiers if getattr(t, "kind", None) == "shm"]
    if not shm:
        raise ConfigError(f"tier {spec.name!r} (replica) replicates the shm tier's snapshots: list a TierSpec.shm() before it")
    if int(shm[0].settings.get("slots") or 3) < 3:  # unset: 3 with a replica tier
        log.warning(
            "recoverkit: tier %r: the shm tier has fewer than 3 slots; while a replication is in flight "
            "its slot is pinned, and the shm tier skips the steps that find no free slot (use TierSpec.shm(slots=3))",
            spec.name,
        )
    return join_replication(
        ctx.root,
        coordinator=ctx.coordinator,
        k=int(s.get("k", 1)),
        groups=s.get("groups"),
        budget_bytes=int(s.get("budget_bytes") or 2 * ctx.options.staging.budget_bytes),
        run_id=ctx.run_id,
        shm_dir=shm[0].settings.get("shm_dir"),
        timeout_s=float(ctx.options.commit_timeout_s),
        scope=f"{ctx.run_id}/{spec.name}",
        engine=ctx.engine,
    )
