"""Admit a process that joins a running elastic job: agreed at a step boundary, in process.

Where it sits: between the membership (:mod:`recoverkit.distributed.regroup`) and the
trainer (:class:`~recoverkit.elastic.trainer.ElasticTrainer`), which calls the member side at
every step boundary; the joiner calls :func:`join`, then builds its trainer, which receives
its state from the survivors (:mod:`.grow`). The keys live under the job's regroup namespace
in the store the workers already share, so the joiner needs nothing but that store.

Why not torchrun's rendezvous: torchrun's elastic agent restarts *every* worker of the job
when a new agent waits at its rendezvous (``SimpleElasticAgent._invoke_run``: a healthy
group with ``rdzv_handler.num_nodes_waiting() > 0`` -> ``_restart_workers``; torch 2.13).
So a newcomer must not go through it to grow in process: it is a process the user starts
(or a spare started with the job and kept waiting), with ``MASTER_ADDR``/``MASTER_PORT`` of
the job's store, which :func:`~recoverkit.distributed.regroup.job_store` connects to when no
group exists. A new torchrun *agent* joining the rendezvous takes the restart path instead:
every worker restarts and restores from memory at the new world size
(tests/distributed/test_memory_restore_resize.py).

The flow::

    joiner: join(store)
      ns = recoverkit/regroup/<epoch>        the job's namespace (the store's epoch counter)
      L  = add(<ns>/launch_ranks, 1) - 1      a fresh launch rank (see below)
      set  <ns>/joiners/<L>                   {"pid", "host"} (validated by the members)
      wait <ns>/joiners/<L>/admit             {"generation": G, "members", "joiners", "at"}
      set  <ns>/g<G>/grow/ack/<L>
      wait <ns>/g<G>/grow/decided             not in it: RegroupError("excluded")
      init_process_group(PrefixStore(<ns>/g<G>/grow/pg)), dense ranks in launch-rank order

    every member, at every step boundary of generation N (G = N + 1):
      read_proposal    check <ns>/g<G>/grow/proposal                     (one store call)
      absent:  pending: read <ns>/launch_ranks; new launch ranks -> their records
               propose: compare_set {"at": steps_done + 1, "joiners", "next"} (first wins)
      at == steps_done (the trainer first all-gathers the positions on the old group):
        admit: rank 0 sets the joiners' admit records; every member waits for their acks
               (form_timeout_s), compare_set decided = members + acked (first wins)
               nobody acked: generation G of the same members, the group kept
               else: drop the old group, form G's (bounded by form_timeout_s, then
               the group's timeout set to pg_timeout_s)
               G did not form: FormationFailed carries generation G of the old members;
               the trainer re-forms from it (a regroup to G + 1, the joiners dropped)

Why the proposal names the *next* boundary: all members are within one step of each other
(a rank cannot finish a step's reduction before every rank entered it), so a member at
boundary ``d`` may have a peer still finishing step ``d - 1`` or already waiting in step
``d``'s reduction for it, having passed boundary ``d`` before the proposal existed. Nobody
can pass boundary ``d + 1`` before the proposer finished step ``d``, which it starts only
after writing the proposal: at ``d + 1`` every member has seen it. Agreement on *when* is
thus the store's first-writer-wins plus the step's own collectives, with no extra
collective per step; the one extra collective, at the admission boundary itself, checks it.

Launch ranks: a joiner gets a *fresh* one (the launch world's size, then counting up), never
a lost rank's. A launch rank names one process for the life of the job (its heartbeat
counter, its regroup keys); a lost rank may be frozen rather than dead and come back, and a
reused number would let its beats stand for the newcomer's. Nothing depends on the numbers
but the order of the dense ranks (newcomers come last); the data split is by dense rank.

Bounds: :func:`join` waits ``timeout_s`` for admission (then withdraws), the members wait
``form_timeout_s`` for acks and for the new group. A joiner that dies before its ack is left
out; after the ack and before the group formed, the formation fails within
``form_timeout_s`` and the members re-form without it; after, the state transfer fails and
the trainer's recovery drops it like any lost rank. Every record read from the store is
hostile: sizes capped, JSON checked for type and range before anything is done with it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ..distributed.regroup import (
    LAUNCH_RANKS,
    MAX_VALUE_BYTES,
    MAX_WORLD,
    NAMESPACE,
    Heartbeat,
    Membership,
    _check_int,
    _read_count,
    _read_decision,
    _store_call,
    retire,
)
from ..errors import RegroupError

__all__ = [
    "Proposal",
    "Admitted",
    "FormationFailed",
    "join",
    "read_proposal",
    "pending",
    "propose",
    "admit",
]

_POLL_S = 0.01
#: the most joiners one proposal admits
MAX_JOINERS = 64
_MAX_RECORD = 4096


@dataclass(frozen=True)
class Proposal:
    """An agreed admission: at the boundary where ``steps_done == at``, ``joiners`` (launch
    ranks) are admitted; afterwards the next joiner considered has launch rank ``next``."""

    at: int
    joiners: tuple[int, ...]
    next: int


@dataclass(frozen=True)
class Admitted:
    """What :func:`admit` did on this member.

    Attributes:
        membership: the new generation (same members when nobody joined).
        joined: launch ranks admitted; ``dropped``: proposed ones that did not ack in time.
        phases_s: ``acks`` (waiting for the joiners and the decision), ``teardown``,
            ``init`` (the new group's rendezvous).
    """

    membership: Membership
    joined: tuple[int, ...]
    dropped: tuple[int, ...]
    phases_s: tuple[tuple[str, float], ...]


class FormationFailed(RegroupError):
    """The new group did not form (a joiner or a member died meanwhile). ``fallback`` is the
    generation of the old members to re-form from with :func:`~recoverkit.distributed.regroup.regroup`
    (the old group is already gone)."""

    def __init__(self, message: str, *, fallback: Membership) -> None:
        super().__init__(message, reason="timeout")
        self.fallback = fallback


def _prefix(ns: str, generation: int) -> str:
    return f"{ns}/g{generation}/grow"


def _load(store: Any, key: str, what: str) -> Any:
    raw = _store_call(f"read {what}", store.get, key)
    if not isinstance(raw, bytes) or not 0 < len(raw) <= MAX_VALUE_BYTES:
        raise RegroupError(
            f"{what} ({key}): a record of {len(raw) if isinstance(raw, bytes) else '?'} bytes",
            reason="invalid",
        )
    try:
        return json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RegroupError(f"{what} ({key}): not JSON ({e})", reason="invalid") from e


def _ranks(value: Any, what: str, *, most: int = MAX_WORLD) -> tuple[int, ...]:
    """A sorted list of distinct launch ranks."""
    if not isinstance(value, list) or len(value) > most:
        raise RegroupError(
            f"{what}: expected a list of at most {most} launch ranks, got {str(value)[:80]}",
            reason="invalid",
        )
    ranks = tuple(_check_int(r, f"{what}: a launch rank", 0, MAX_WORLD - 1) for r in value)
    if list(ranks) != sorted(set(ranks)):
        raise RegroupError(
            f"{what}: {list(ranks)[:16]} is not sorted and distinct", reason="invalid"
        )
    return ranks


def _wait_key(store: Any, key: str, deadline: float) -> bool:
    while not _store_call("wait", store.check, [key]):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _form(
    store: Any,
    prefix: str,
    members: tuple[int, ...],
    me: int,
    backend: str,
    form_timeout_s: float,
    pg_timeout_s: float,
) -> None:
    """The new default group; its rendezvous bounded by ``form_timeout_s``, its collectives by ``pg_timeout_s``."""
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"{prefix}/pg", store),
        rank=members.index(me),
        world_size=len(members),
        timeout=timedelta(seconds=form_timeout_s),
    )
    try:
        from torch.distributed.distributed_c10d import _set_pg_timeout  # private, torch >= 2.3

        _set_pg_timeout(timedelta(seconds=pg_timeout_s))
    except (ImportError, AttributeError, RuntimeError, ValueError):  # the rendezvous bound stays
        pass


# ---------------------------------------------------------------------- the joiner


def join(
    store: Any,
    *,
    timeout_s: float,
    form_timeout_s: float = 10.0,
    pg_timeout_s: float = 30.0,
    backend: str = "gloo",
) -> Membership:
    """Joins the running elastic job whose store is ``store``; returns the membership that admitted it.

    Called by a process started outside torchrun's rendezvous (module doc), before it builds
    its :class:`~recoverkit.elastic.trainer.ElasticTrainer` (which then receives the model,
    optimizer and position from the survivors): build the model first, so the survivors do
    not wait for it.

    Args:
        store: the job's store (:func:`~recoverkit.distributed.regroup.job_store` with
            ``MASTER_ADDR``/``MASTER_PORT`` of the job).
        timeout_s: how long to wait to be admitted (then the record is withdrawn).
        form_timeout_s: the members' bound on acks and the new group's rendezvous
            (``ElasticOptions.admit_timeout_s`` of the job).
        pg_timeout_s: the new group's collective timeout (the job's ``pg_timeout_s``).

    Raises:
        RegroupError: ``"invalid"`` (no elastic job in the store, or a malformed record),
            ``"timeout"`` (not admitted within ``timeout_s``, or the group did not form),
            ``"excluded"`` (the members decided without this process), ``"store_lost"``.

    Example:
        >>> model, opt = build()                                          # doctest: +SKIP
        >>> store = job_store(timeout_s=30)       # MASTER_ADDR, MASTER_PORT of the job
        >>> membership = join(store, timeout_s=120)
        >>> hb = Heartbeat(store, membership).start()
        >>> trainer = ElasticTrainer(model, opt, sampler, loss_fn, store=store,
        ...                          membership=membership, heartbeat=hb, seed=0)
    """
    start = time.monotonic()
    epoch = _store_call("read the epoch", _read_count, store, f"{NAMESPACE}/epoch", "regroup epoch")
    if epoch < 1:
        raise RegroupError(
            "join: the store holds no elastic job (no regroup epoch)", reason="invalid"
        )
    ns = f"{NAMESPACE}/{epoch}"
    counter = f"{ns}/{LAUNCH_RANKS}"
    if not _store_call("check the launch ranks", store.check, [counter]):
        raise RegroupError(
            f"join: the job under {ns} hands out no launch ranks ({counter} is absent)",
            reason="invalid",
        )
    me = _check_int(
        _store_call("take a launch rank", store.add, counter, 1) - 1,
        "join: launch rank",
        1,
        MAX_WORLD - 1,
    )
    record = f"{ns}/joiners/{me}"
    _store_call(
        "announce",
        store.set,
        record,
        json.dumps({"pid": os.getpid(), "host": socket.gethostname()[:255]}),
    )
    if not _wait_key(store, f"{record}/admit", start + timeout_s):
        _store_call("withdraw", store.set, f"{record}/withdrawn", "1")
        raise RegroupError(
            f"join: launch rank {me} was not admitted within {timeout_s} s; withdrawn",
            reason="timeout",
        )
    doc = _load(store, f"{record}/admit", "the admit record")
    if not isinstance(doc, dict) or set(doc) != {"generation", "members", "joiners", "at"}:
        raise RegroupError(f"join: the admit record is not one ({str(doc)[:80]})", reason="invalid")
    gen = _check_int(doc["generation"], "join: generation", 1, 2**62)
    _check_int(doc["at"], "join: the admission step", 0, 2**62)
    old = _ranks(doc["members"], "join: the members")
    joiners = _ranks(doc["joiners"], "join: the joiners", most=MAX_JOINERS)
    if not old or me not in joiners or set(old) & set(joiners):
        raise RegroupError(
            f"join: the admit record does not admit launch rank {me} ({str(doc)[:120]})",
            reason="invalid",
        )
    prefix = _prefix(ns, gen)
    _store_call("ack", store.set, f"{prefix}/ack/{me}", "1")
    if not _wait_key(store, f"{prefix}/decided", time.monotonic() + 2 * form_timeout_s + 1.0):
        raise RegroupError(
            f"join: generation {gen} was not decided within {2 * form_timeout_s + 1.0} s",
            reason="timeout",
        )
    members = _read_decision(store, f"{prefix}/decided", tuple(sorted(old + joiners)))
    if me not in members:
        raise RegroupError(
            f"join: generation {gen} was agreed without launch rank {me} (late ack)",
            reason="excluded",
        )
    agreed = time.monotonic()
    try:
        _form(store, prefix, members, me, backend, form_timeout_s, pg_timeout_s)
    except Exception as e:  # noqa: BLE001 - a member died meanwhile, or the store did
        raise RegroupError(
            f"join: generation {gen} (members {list(members)[:16]}) did not form: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}",
            reason="timeout",
        ) from e
    return Membership(
        namespace=ns,
        generation=gen,
        members=members,
        launch_rank=me,
        previous=old,
        formed_in_s=time.monotonic() - start,
        phases_s=(("admission", agreed - start), ("init", time.monotonic() - agreed)),
    )


# ---------------------------------------------------------------------- the members


def read_proposal(store: Any, membership: Membership) -> Proposal | None:
    """The admission proposed in ``membership``'s generation, if any (one store call when none)."""
    key = f"{_prefix(membership.namespace, membership.generation + 1)}/proposal"
    if not _store_call("check the proposal", store.check, [key]):
        return None
    doc = _load(store, key, "the grow proposal")
    if not isinstance(doc, dict) or set(doc) != {"at", "joiners", "next"}:
        raise RegroupError(f"{key}: not a proposal ({str(doc)[:80]})", reason="invalid")
    at = _check_int(doc["at"], f"{key}: at", 0, 2**62)
    joiners = _ranks(doc["joiners"], f"{key}: joiners", most=MAX_JOINERS)
    nxt = _check_int(doc["next"], f"{key}: next", 0, MAX_WORLD)
    if not joiners or set(joiners) & set(membership.members) or nxt <= joiners[-1]:
        raise RegroupError(
            f"{key}: joiners {list(joiners)[:16]} and next {nxt} do not fit members {list(membership.members)[:16]}",
            reason="invalid",
        )
    return Proposal(at=at, joiners=joiners, next=nxt)


def _valid_record(store: Any, key: str) -> bool:
    """A joiner's announcement: ``{"pid": int, "host": str}``, small (hostile input)."""
    try:
        raw = _store_call("read a joiner", store.get, key)
        if not isinstance(raw, bytes) or not 0 < len(raw) <= _MAX_RECORD:
            return False
        doc = json.loads(raw.decode("ascii"))
    except (RegroupError, UnicodeDecodeError, ValueError):
        return False
    return (
        isinstance(doc, dict)
        and set(doc) == {"pid", "host"}
        and type(doc["pid"]) is int
        and 0 < doc["pid"] < 2**31
        and isinstance(doc["host"], str)
        and len(doc["host"]) <= 255
    )


def pending(
    store: Any,
    membership: Membership,
    start: int,
    first_seen: dict[int, float],
    *,
    patience_s: float,
) -> tuple[list[int], int, list[int]]:
    """Joiners announced from launch rank ``start`` on: ``(valid, next, refused)``.

    One store call when nobody joined. A launch rank taken whose record is not there yet is
    waited for ``patience_s`` (from ``first_seen``, kept by the caller), then skipped; a
    malformed record or a withdrawn joiner is refused. ``next``: the first launch rank not
    looked at (the scan stops at one still awaited).
    """
    ns = membership.namespace
    counter = f"{ns}/{LAUNCH_RANKS}"
    count = _read_count(store, counter, "the launch rank counter")
    if count <= start:
        return [], start, []
    valid: list[int] = []
    refused: list[int] = []
    nxt = start
    now = time.monotonic()
    for rank in range(start, min(count, start + MAX_JOINERS, MAX_WORLD)):
        key = f"{ns}/joiners/{rank}"
        if _store_call("check a joiner", store.check, [f"{key}/withdrawn"]):
            refused.append(rank)
        elif _store_call("check a joiner", store.check, [key]):
            (valid if _valid_record(store, key) else refused).append(rank)
        elif now - first_seen.setdefault(rank, now) < patience_s:
            break  # it took its launch rank a moment ago: its record follows
        else:
            refused.append(rank)
        first_seen.pop(rank, None)
        nxt = rank + 1
    return valid, nxt, refused


def propose(store: Any, membership: Membership, proposal: Proposal) -> Proposal:
    """Proposes ``proposal``; returns the one agreed (the first proposer's)."""
    key = f"{_prefix(membership.namespace, membership.generation + 1)}/proposal"
    doc = json.dumps({"at": proposal.at, "joiners": list(proposal.joiners), "next": proposal.next})
    _store_call("propose", store.compare_set, key, "", doc)
    agreed = read_proposal(store, membership)
    if agreed is None:  # pragma: no cover - the key was just set
        raise RegroupError(f"{key}: the proposal vanished", reason="invalid")
    return agreed


def admit(
    store: Any,
    membership: Membership,
    proposal: Proposal,
    *,
    form_timeout_s: float,
    pg_timeout_s: float,
    heartbeat: Heartbeat | None = None,
    backend: str = "gloo",
) -> Admitted:
    """Admits ``proposal``'s joiners that answer (module doc); every member calls it at the
    agreed boundary, after checking on the old group that all are there.

    Raises:
        FormationFailed: the new group did not form; re-form from ``error.fallback``.
        RegroupError: the store is gone, or a record is malformed.
    """
    start = time.monotonic()
    ns, me, old = membership.namespace, membership.launch_rank, membership.members
    gen = membership.generation + 1
    prefix = _prefix(ns, gen)
    if membership.rank == 0:
        record = json.dumps(
            {
                "generation": gen,
                "members": list(old),
                "joiners": list(proposal.joiners),
                "at": proposal.at,
            }
        )
        for rank in proposal.joiners:
            _store_call("admit", store.set, f"{ns}/joiners/{rank}/admit", record)
    decided = f"{prefix}/decided"
    deadline = start + form_timeout_s
    while not _store_call("check the decision", store.check, [decided]):
        acked = [
            r
            for r in proposal.joiners
            if _store_call("check an ack", store.check, [f"{prefix}/ack/{r}"])
        ]
        if len(acked) == len(proposal.joiners) or time.monotonic() >= deadline:
            _store_call(
                "decide", store.compare_set, decided, "", json.dumps(sorted(old + tuple(acked)))
            )
            break
        time.sleep(_POLL_S)
    members = _read_decision(store, decided, tuple(sorted(old + proposal.joiners)))
    if not set(old) <= set(members):
        raise RegroupError(
            f"{decided}: {list(members)[:16]} leaves out members of {list(old)[:16]}",
            reason="invalid",
        )
    joined = tuple(r for r in members if r not in old)
    dropped = tuple(r for r in proposal.joiners if r not in joined)
    agreed = time.monotonic()
    if not joined:  # nobody answered: the same members in generation ``gen``, the group kept
        new = Membership(
            namespace=ns,
            generation=gen,
            members=old,
            launch_rank=me,
            previous=old,
            formed_in_s=agreed - start,
            phases_s=(("acks", agreed - start),),
        )
        if heartbeat is not None:
            heartbeat.watch(new)
        return Admitted(new, (), dropped, new.phases_s)
    # every member passed the boundary's all-gather: the old group is idle, dropped at once
    box = [dist.group.WORLD]
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001, S110 - its state is dropped all the same
        pass
    retire(box)
    torn = time.monotonic()
    try:
        _form(store, prefix, members, me, backend, form_timeout_s, pg_timeout_s)
    except Exception as e:  # noqa: BLE001 - a joiner or a member died meanwhile
        fallback = Membership(
            namespace=ns, generation=gen, members=old, launch_rank=me, previous=old
        )
        if heartbeat is not None:
            heartbeat.watch(fallback)
        raise FormationFailed(
            f"generation {gen} (members {list(members)[:16]}, joining {list(joined)}) did not form within "
            f"{form_timeout_s} s: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
            fallback=fallback,
        ) from e
    done = time.monotonic()
    phases = (("acks", agreed - start), ("teardown", torn - agreed), ("init", done - torn))
    new = Membership(
        namespace=ns,
        generation=gen,
        members=members,
        launch_rank=me,
        previous=old,
        formed_in_s=done - start,
        phases_s=phases,
    )
    if heartbeat is not None:
        heartbeat.watch(new)
    return Admitted(new, joined, dropped, phases)
