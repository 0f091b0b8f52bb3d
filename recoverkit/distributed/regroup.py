"""Re-form the process group of the survivors of a lost rank, in process.

Where it sits: a training loop whose collective failed (a peer's process or node died) calls
:func:`regroup` on every surviving rank instead of exiting. The survivors agree on who is
alive through the key-value store the workers already share, tear down the old default group
and form a new one of the survivors with dense ranks, and go on; redistribution of the lost
rank's state (recovery/) then runs over the new group. Where re-forming is impossible,
:class:`~recoverkit.errors.RegroupError` says so and the caller falls back to the restart path
(torchrun restarts the workers, which restore from memory).

The flow, per survivor::

    collective raises (peer reset / gloo timeout), wait_alive raises, or Heartbeat.lost()
      -> regroup(store, membership)
           destroy the old default group (dropped on a background thread: never blocks)
           join:   set  <ns>/g<N>/join/<launch rank>, add <ns>/g<N>/count
           wait:   every old member joined; or, with a Heartbeat, the missing ones did not
                   acknowledge within ack_s (their heartbeat threads answer a started regroup
                   with <ns>/g<N>/alive/<launch rank>) or their beats stopped; without one,
                   join_window_s; all bounded by timeout_s
           decide: compare_set <ns>/g<N>/decided "" -> sorted joined ranks (first writer wins;
                   every survivor reads the same list back and validates it)
           form:   init_process_group(store=PrefixStore(<ns>/g<N>/pg, store), dense ranks)
      -> Membership(generation N, members, rank, world_size, rank_map)

Detection (measured with gloo on one host, torch 2.13): a SIGKILLed peer resets its sockets,
and every survivor's pending collective raises within tens of milliseconds (the survivors
that were not talking to the dead rank see their neighbours' groups close). A peer that is
frozen, or whose node drops off the network without closing its sockets, is seen by a plain
collective only when gloo's timeout (the group's ``timeout``) expires. :class:`Heartbeat`
sees it after ``miss_s`` whatever the collectives do, and :func:`wait_alive` waits for a
collective's work in slices so that the loss raises then. Tearing down does not wait for the
stuck collective either: in torch 2.13, ``destroy_process_group``, ``_abort_process_group``
and ``ProcessGroup.shutdown`` + destroy all return only when a pending gloo collective's own
timeout expires (the group's destructor joins gloo's worker thread). So :func:`regroup`
destroys the default group's bookkeeping itself, which is immediate, and drops the group on a
background thread (:func:`retire`): after a failed collective that is immediate too, and it
closes the group's sockets, so that survivors still blocked in a collective with this process
fail at once (the cascade that makes SIGKILL detection take milliseconds on every survivor);
with a collective stuck on a frozen peer, only that thread waits. A survivor's heartbeat also sees that
another survivor started a regroup, and :func:`wait_alive` then raises within a beat.
The heartbeat also lets :func:`regroup` agree fast: survivors cannot tell a dead
member from a late one, but a live member's heartbeat thread acknowledges a started regroup
within a beat, so the membership closes after ``ack_s`` (a few beats) instead of a blind
``join_window_s``.

Where the store lives under torchrun (torch 2.13): with the default
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0`` the workers are clients
(``TORCHELASTIC_USE_AGENT_STORE=True``) of a TCPStore hosted by the agent of node rank 0;
with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` the worker of global rank 0 hosts it (on
``MASTER_ADDR:MASTER_PORT``). Either way it lives on node rank 0: when that node is the lost
one, the store is gone and :func:`regroup` raises ``RegroupError(reason="store_lost")`` as
soon as a store call fails. torchrun's agent on a surviving node does not restart its workers
when another node's agent vanishes (it restarts on a failed local worker or on a node
*waiting to join*); after its workers exit it waits in its exit barrier for the lost agent,
``exit_barrier_timeout`` (300 s, not settable from the command line), then exits. Unless the
lost agent hosted the c10d *rendezvous* store (the agent that bound ``--rdzv-endpoint``, or the
one given ``--rdzv-conf is_host=1``): then, within about a second (its cached rendezvous
state expires), the surviving agent's ``num_nodes_waiting`` raises
RendezvousConnectionError, and it ends its own workers and exits non-zero. In-process
re-forming therefore needs the rendezvous host and the store host to survive: put both on
one node (node rank 0) or outside the workers' nodes.

Compared with torchft (read, not copied): its Manager asks a separate lighthouse service for a
quorum each step and, when the quorum id changes, reconfigures a *wrapper* process group
(not the default group) over ``PrefixStore(<store>/torchft/<quorum id>/<rank>)``, dropping the
old backend's reference rather than joining it (its gloo ``shutdown`` is a TODO); errors are
latched and the step's commit is voted away. Here the quorum is agreed through the store
torchrun already provides, the default group itself is re-formed (so code that uses
``torch.distributed`` without a group argument keeps working), and the lost node hosting the
store is a clear error instead of a lighthouse to run. Users hit the same gloo limits:
pytorch/pytorch#130345 asks for a gloo ``shutdown`` for faster recovery, pytorch/gloo#388
(gloo abort) is still open, and pytorch/gloo#520 is a lazy-init connect that ignores its
timeout after a peer dies (this module does not use ``TORCH_GLOO_LAZY_INIT``).

Growing back is the other direction (:mod:`recoverkit.elastic.admit`): a process started
outside torchrun's rendezvous takes a fresh launch rank from ``<ns>/launch_ranks`` (opened at
the launch world's size by :meth:`Membership.initial`), and the members admit it at an agreed
step boundary into a generation whose ``previous`` does not hold it (:attr:`Membership.joined`).
A new torchrun *agent* instead makes torchrun restart every worker (the restart path).

Every value read from the store is hostile: sizes are capped, integers and membership lists
are validated against the previous generation before they are used.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..errors import ConfigError, RegroupError
from .heartbeat import Heartbeat, wait_alive
from .store_io import _check_int, _read_count, _store_call

__all__ = ["Membership", "Heartbeat", "regroup", "wait_alive", "retire", "job_store", "NAMESPACE", "LAUNCH_RANKS"]

#: the root of every key this module writes
NAMESPACE = "recoverkit/regroup"
#: the largest record read from the store (a membership list of MAX_WORLD ranks fits)
MAX_VALUE_BYTES = 1 << 20
#: the largest world a membership may name
MAX_WORLD = 1 << 16
#: under a job's namespace: the next launch rank to hand out (starts at the launch world size;
#: a process joining later takes one with ``add``, :func:`recoverkit.elastic.admit.join`)
LAUNCH_RANKS = "launch_ranks"
_POLL_S = 0.01


@dataclass(frozen=True)
class Membership:
    """Who is in the job's default process group, generation by generation.

    Ranks are named by their *launch rank* (the global rank at generation 0, stable across
    regroups); ``members[i]`` is the launch rank of the process whose rank is ``i`` in this
    generation.

    Attributes:
        namespace: the store prefix this job's regroups use (agreed at generation 0).
        generation: 0 for the world as launched, +1 per regroup.
        members: launch ranks alive in this generation, sorted; index = rank.
        launch_rank: this process's launch rank.
        previous: ``members`` of the generation before (equal to ``members`` at 0).
        formed_in_s: seconds :func:`regroup` took to form this generation (0.0 at generation 0).
        phases_s: where those seconds went: ``teardown`` (destroying the old group),
            ``agree`` (join, wait, decision), ``init`` (the new group's rendezvous).
    """

    namespace: str
    generation: int
    members: tuple[int, ...]
    launch_rank: int
    previous: tuple[int, ...]
    formed_in_s: float = 0.0
    phases_s: tuple[tuple[str, float], ...] = ()

    @property
    def rank(self) -> int:
        """This process's rank in this generation's default group."""
        return self.members.index(self.launch_rank)

    @property
    def world_size(self) -> int:
        return len(self.members)

    @property
    def rank_map(self) -> dict[int, int]:
        """Rank in the previous generation -> rank in this one, for every survivor."""
        return {self.previous.index(r): i for i, r in enumerate(self.members) if r in self.previous}

    @property
    def lost(self) -> tuple[int, ...]:
        """Launch ranks of the previous generation that are not in this one."""
        return tuple(r for r in self.previous if r not in self.members)

    @property
    def joined(self) -> tuple[int, ...]:
        """Launch ranks admitted in this generation (:mod:`recoverkit.elastic.admit`): members
        that were not in the previous one."""
        return tuple(r for r in self.members if r not in self.previous)

    @classmethod
    def initial(cls, store: Any) -> Membership:
        """Generation 0: the current default group, under a namespace no earlier attempt used.

        Collective: every rank calls it once, while the group is healthy. Rank 0 takes a fresh
        epoch from the store with an atomic ``add`` and broadcasts it, because the store may
        outlive earlier attempts of the job (torchrun's agent store keeps its keys across
        restarts) and torchrun's restart count differs between nodes.

        Example:
            >>> dist.init_process_group("gloo")                       # doctest: +SKIP
            >>> store = job_store(timeout_s=30)                       # doctest: +SKIP
            >>> membership = Membership.initial(store)                # doctest: +SKIP
        """
        import torch
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        epoch = torch.zeros(1, dtype=torch.int64)
        if rank == 0:
            epoch[0] = _store_call("take an epoch", store.add, f"{NAMESPACE}/epoch", 1)
            # the launch ranks of joiners count on from the launch world (elastic/admit)
            _store_call("open the launch ranks", store.add, f"{NAMESPACE}/{int(epoch[0])}/{LAUNCH_RANKS}", world)
        dist.broadcast(epoch, 0)
        e = _check_int(int(epoch.item()), "regroup epoch", 1, 2**62)
        members = tuple(range(world))
        return cls(namespace=f"{NAMESPACE}/{e}", generation=0, members=members, launch_rank=rank, previous=members)


def job_store(*, timeout_s: float) -> Any:
    """The store torchrun's workers share: the default group's own TCPStore, unwrapped.

    Call it while the default group exists, and keep the result for the life of the job:
    with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` the store's server lives in global rank 0's
    default group, and :func:`regroup` destroying that group would end the server for
    everyone if nothing else held it. Without a default group, a new client of
    ``MASTER_ADDR:MASTER_PORT`` whose calls fail after ``timeout_s``. (The default group's
    store is reached through ``distributed_c10d._get_default_store``, private in torch 2.13
    but unchanged for years; the PrefixStores around it are public.)
    """
    import torch.distributed as dist

    if dist.is_initialized():
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()
        for _ in range(16):  # the group's PrefixStores around the shared TCPStore
            if not isinstance(store, dist.PrefixStore):
                break
            store = store.underlying_store
        return store
    host = os.environ.get("MASTER_ADDR", "")
    port_text = os.environ.get("MASTER_PORT", "")
    if not host or not port_text.isdigit():
        raise ConfigError("job_store needs a default process group, or MASTER_ADDR and MASTER_PORT (set by torchrun)")
    port = _check_int(int(port_text), "MASTER_PORT", 1, 65535)
    return _store_call(
        "connect", lambda: dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    )


def retire(objects: list[Any]) -> None:
    """Empties ``objects`` on a background thread, so that a destructor that waits never blocks the caller.

    A process group whose collective is stuck on a frozen peer waits out the group's timeout
    when its last reference goes (gloo joins its worker thread; measured: the GIL is free
    meanwhile). :func:`regroup` retires the old default group this way; retire what else
    holds it the same way (the old ``DistributedDataParallel`` wrapper, subgroups), and hold
    no other reference: the list must be the last one.

    Example:
        >>> old = [ddp_model]; del ddp_model            # doctest: +SKIP
        >>> retire(old)
    """

    def drop() -> None:
        objects.clear()

    threading.Thread(target=drop, name="recoverkit-retire", daemon=True).start()


def _read_decision(store: Any, key: str, previous: tuple[int, ...]) -> tuple[int, ...]:
    raw = _store_call("read the decision", store.get, key)
    if not isinstance(raw, bytes) or not 0 < len(raw) <= MAX_VALUE_BYTES:
        raise RegroupError(f"{key}: a record of {len(raw) if isinstance(raw, bytes) else '?'} bytes", reason="invalid")
    try:
        value = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RegroupError(f"{key}: not a JSON list ({e})", reason="invalid") from e
    if not isinstance(value, list) or not 0 < len(value) <= len(previous):
        raise RegroupError(f"{key}: expected a list of 1..{len(previous)} ranks, got {str(value)[:80]}", reason="invalid")
    members = tuple(_check_int(r, f"{key}: a rank", 0, MAX_WORLD - 1) for r in value)
    if list(members) != sorted(set(members)) or not set(members) <= set(previous):
        raise RegroupError(f"{key}: {list(members)[:16]} is not a sorted subset of {list(previous)[:16]}", reason="invalid")
    return members


def regroup(
    store: Any,
    membership: Membership,
    *,
    timeout_s: float,
    join_window_s: float = 2.0,
    heartbeat: Heartbeat | None = None,
    backend: str = "gloo",
    pg_timeout_s: float | None = None,
) -> Membership:
    """Re-forms the default process group from the survivors; returns the new membership.

    Called by every survivor after a failed collective (or :meth:`Heartbeat.lost`). Returns
    once the new default group exists (dense ranks 0..n-1 in launch-rank order); raises
    :class:`RegroupError` when the store is gone (``reason="store_lost"``), when this process
    arrived after the others had agreed without it (``"excluded"``), when no new group formed
    within ``timeout_s`` (``"timeout"``), or on a malformed record (``"invalid"``).

    Args:
        store: the store every worker shares (:func:`job_store`), not the old group's.
        membership: the current generation (:meth:`Membership.initial` or the last regroup).
        timeout_s: bound on the agreement (the new group's rendezvous is bounded by
            ``pg_timeout_s``); the old group's teardown never blocks (see :func:`retire`).
        join_window_s: without a heartbeat, how long a survivor waits for old members that
            have not joined, counted from its own arrival. With one, it waits for the members
            whose heartbeat acknowledged the regroup (until ``timeout_s``), and for the others
            ``heartbeat.ack_s`` (or until their beats stop for ``heartbeat.miss_s``), unless
            the heartbeat saw one beat after the regroup started (it acknowledges then).
        heartbeat: a running :class:`Heartbeat`; it is switched to the new generation.
        backend: the new group's backend.
        pg_timeout_s: the new group's collective timeout (default: ``timeout_s``).

    Example:
        >>> try:                                                        # doctest: +SKIP
        ...     dist.all_reduce(t)
        ... except RuntimeError:
        ...     membership = regroup(store, membership, timeout_s=30, heartbeat=hb)
    """
    import torch.distributed as dist

    if not 0 < join_window_s <= timeout_s:
        raise ConfigError(f"regroup: need 0 < join_window_s <= timeout_s, got {join_window_s} and {timeout_s}")
    start = time.monotonic()
    if dist.is_initialized():
        # Destroy the default group's bookkeeping here, and drop the group itself on a
        # background thread: its destructor joins gloo's worker thread, which is immediate
        # after a failed collective (and closes its sockets, so the survivors still blocked
        # in a collective with this process fail at once), but waits out the group's timeout
        # when a collective is stuck on a frozen peer.
        box = [dist.group.WORLD]
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001, S110 - a broken group: its state is dropped all the same
            pass
        retire(box)
    arrived = time.monotonic()
    deadline = arrived + timeout_s
    gen = membership.generation + 1
    ns = f"{membership.namespace}/g{gen}"
    me, previous = membership.launch_rank, membership.members
    _store_call("join", store.set, f"{ns}/join/{me}", "1")
    _store_call("count", store.add, f"{ns}/count", 1)
    counted = time.monotonic()  # a beat that starts after this sees the regroup and acknowledges
    decided_key = f"{ns}/decided"

    def present(kind: str, ranks: set[int]) -> set[int]:
        return {r for r in ranks if _store_call("check", store.check, [f"{ns}/{kind}/{r}"])}

    joined: tuple[int, set[int]] = (-1, set())  # (join count, joined ranks): looked up when the count moves
    while True:
        if _store_call("check the decision", store.check, [decided_key]):
            break
        count = _store_call("count", _read_count, store, f"{ns}/count", "join count")
        now = time.monotonic()
        waited = now - arrived
        if count >= len(previous) or now >= deadline:
            close = True
        elif heartbeat is None:
            close = waited >= join_window_s
        else:
            # wait for the members alive (acknowledged, or seen beating since the regroup
            # started: that beat acknowledges it); not for the dead
            if joined[0] != count:
                joined = (count, present("join", set(previous)))
            missing = set(previous) - joined[1]
            unacked = missing - present("alive", missing)
            dead = heartbeat.dead()
            close = all(
                r in dead or (r in unacked and waited >= heartbeat.ack_s and not heartbeat.beat_since(r, counted))
                for r in missing
            )
        if close:
            proposal = json.dumps(sorted(present("join", set(previous))))
            _store_call("decide", store.compare_set, decided_key, "", proposal)
            break
        time.sleep(_POLL_S)
    members = _read_decision(store, decided_key, previous)
    agreed = time.monotonic()
    if me not in members:
        raise RegroupError(
            f"generation {gen} was agreed without launch rank {me} (members {list(members)[:16]}): "
            "it arrived after the others closed; fall back to the restart path",
            reason="excluded",
        )
    pg_timeout = timedelta(seconds=pg_timeout_s if pg_timeout_s is not None else timeout_s)
    try:
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"{ns}/pg", store),
            rank=members.index(me),
            world_size=len(members),
            timeout=pg_timeout,
        )
    except Exception as e:  # noqa: BLE001 - a member died meanwhile, or the store did
        raise RegroupError(
            f"generation {gen} (members {list(members)[:16]}) did not form: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}",
            reason="timeout",
        ) from e
    new = Membership(
        namespace=membership.namespace,
        generation=gen,
        members=members,
        launch_rank=me,
        previous=previous,
        formed_in_s=time.monotonic() - start,
        phases_s=(("teardown", arrived - start), ("agree", agreed - arrived), ("init", time.monotonic() - agreed)),
    )
    if heartbeat is not None:
        heartbeat.watch(new)
    return new
