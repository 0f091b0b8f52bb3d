"""A heartbeat through the job's store: who is alive, and a regroup answered within a beat.

Where it sits: beside :mod:`.regroup`, which uses its verdicts to close a membership early
(a live member acknowledges a started regroup within a beat) and which :func:`wait_alive`
lets a caller wait for a collective by, so a frozen peer raises after ``miss_s`` instead of
the group's timeout. See :mod:`.regroup`'s module doc for the detection figures.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, PeerLostError, PeerTimeoutError, RegroupError
from .store_io import _read_count

if TYPE_CHECKING:
    from .regroup import Membership

__all__ = ["Heartbeat", "wait_alive"]


class Heartbeat:
    """A thread that beats for this rank in the store, watches the others, and answers regroups.

    Each beat (every ``interval_s``) it bumps this rank's counter, reads the other members'
    counters, and looks whether a regroup of the next generation has started (its join count
    is above 0); if so it acknowledges, once, that this process is alive (``alive/<rank>``),
    even while the training thread is still blocked in a collective. :func:`regroup` waits
    for the members that acknowledged and closes the membership without the others after
    ``ack_s``: a dead process never acknowledges, so the survivors agree within a few beats
    instead of a long join window. A member is also *dead* once this thread has read its
    counter unchanged over ``miss_s`` (on this process's monotonic clock: the nodes' clocks
    need not agree). Both verdicts rest on reads, never on the time since the last one: a
    watching thread starved on a loaded host (it read nothing meanwhile) sees nobody dead,
    and :func:`regroup` keeps waiting for a member whose counter this thread saw move after
    the regroup started (that beat's own check acknowledges it).

    The thread uses its own connection to the store (``store.clone()``), so the training
    loop's store calls never delay a beat; every store call fails within the store's timeout
    (at once when its host is gone: then ``store_error`` is set and the thread ends), and
    ``stop`` joins the thread within ``miss_s``.

    Example:
        >>> hb = Heartbeat(store, membership, interval_s=0.1, miss_s=1.0).start()  # doctest: +SKIP
        >>> if hb.lost():                                   # a rank died between collectives
        ...     membership = regroup(store, membership, timeout_s=30, heartbeat=hb)
    """

    def __init__(
        self,
        store: Any,
        membership: Membership,
        *,
        interval_s: float = 0.1,
        miss_s: float = 1.0,
        ack_s: float | None = None,
    ) -> None:
        if not 0 < interval_s < miss_s:
            raise ConfigError(f"Heartbeat: need 0 < interval_s < miss_s, got {interval_s} and {miss_s}")
        self.ack_s = 3 * interval_s if ack_s is None else ack_s
        if not interval_s < self.ack_s:
            raise ConfigError(f"Heartbeat: need ack_s > interval_s, got {self.ack_s} and {interval_s}")
        self._store = store.clone() if hasattr(store, "clone") else store
        self.interval_s, self.miss_s = interval_s, miss_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # launch rank -> (counter, read that saw it change, latest read, read before that change):
        # the start times of this thread's reads
        self._seen: dict[int, tuple[int, float, float, float]] = {}
        self._dead_since: float | None = None
        self._acked = False
        self.store_error: BaseException | None = None
        self.watch(membership)

    def watch(self, membership: Membership) -> None:
        """Beats and watches under ``membership`` (:func:`regroup` calls it with the new one)."""
        with self._lock:
            self._prefix = f"{membership.namespace}/hb"
            self._next = f"{membership.namespace}/g{membership.generation + 1}"
            self._me = membership.launch_rank
            now = time.monotonic()
            self._seen = {r: (-1, now, now, now) for r in membership.members if r != self._me}
            self._acked = False

    def start(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name="recoverkit-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.miss_s + 1.0)

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._beat()
            except Exception as e:  # noqa: BLE001 - the store is gone: report it, stop beating
                self.store_error = e
                return
            self._stop.wait(self.interval_s)

    def _beat(self) -> None:
        with self._lock:
            prefix, nxt, me, acked = self._prefix, self._next, self._me, self._acked
            others = list(self._seen)
        self._store.add(f"{prefix}/{me}", 1)
        if not acked and self._count(f"{nxt}/count", "join count") > 0:
            self._store.set(f"{nxt}/alive/{me}", "1")
            with self._lock:
                if self._next == nxt:
                    self._acked = True
                    if self._dead_since is None:
                        self._dead_since = time.monotonic()
        for r in others:
            now = time.monotonic()  # before the read: the counter is at least this fresh
            count = self._count(f"{prefix}/{r}", f"heartbeat of rank {r}")
            with self._lock:
                if r not in self._seen:
                    continue
                last, since, read, _ = self._seen[r]
                if count >= 0 and count != last:
                    self._seen[r] = (count, now, now, read)
                else:
                    self._seen[r] = (last, since, now, self._seen[r][3])
                    if now - since > self.miss_s and self._dead_since is None:
                        self._dead_since = now

    def _count(self, key: str, what: str) -> int:
        """A counter; -1 when its value is malformed (an unreadable beat is no beat)."""
        try:
            return _read_count(self._store, key, what)
        except RegroupError:
            return -1

    def dead(self) -> set[int]:
        """Launch ranks whose counter this thread read unchanged over more than ``miss_s``.

        Measured between this thread's reads, not up to now: when the thread itself was
        starved (it read nothing for a while), nobody is dead until its next reads say so.
        """
        with self._lock:
            dead = {r for r, (_, since, read, _) in self._seen.items() if read - since > self.miss_s}
            if dead and self._dead_since is None:
                self._dead_since = time.monotonic()
            return dead

    def beat_since(self, rank: int, t: float) -> bool:
        """True when this thread saw ``rank``'s counter move between two of its reads that
        both started after ``t`` (``time.monotonic()``): that beat began after ``t``."""
        with self._lock:
            seen = self._seen.get(rank)
            return seen is not None and seen[3] >= t

    def lost(self) -> bool:
        """True once a watched member is dead, another survivor started a regroup, or the store is gone."""
        with self._lock:
            started = self._acked
        return started or self.store_error is not None or bool(self.dead())

    @property
    def lost_at(self) -> float | None:
        """``time.monotonic()`` when the thread first saw a dead member or a started regroup,
        in any generation (None: never)."""
        with self._lock:
            return self._dead_since


def wait_alive(work: Any, heartbeat: Heartbeat, *, timeout_s: float) -> None:
    """Waits for a collective's ``work`` while watching the heartbeat: a peer lost is seen in ``miss_s``.

    A collective on a frozen or unreachable peer (no socket closed) otherwise ends only at the
    group's timeout. This waits in slices of ``heartbeat.interval_s`` (gloo's ``wait(timeout)``
    can be called again after a slice runs out) and raises as soon as the heartbeat sees a
    member dead, a regroup started by another survivor, or the store gone. Then call
    :func:`regroup`: it does not wait for the stuck collective (the old group is dropped on
    a background thread). The tensors of an abandoned
    collective are undefined afterwards: do not reuse their contents.

    Raises:
        PeerLostError: the collective failed (a peer's connection closed or gloo's timeout
            ran out: the error is chained), or the heartbeat saw a member dead or a regroup
            started.
        PeerTimeoutError: ``timeout_s`` passed with every member beating (a slow collective).

    Example:
        >>> work = dist.all_reduce(grad, async_op=True)                 # doctest: +SKIP
        >>> try:
        ...     wait_alive(work, hb, timeout_s=600)
        ... except PeerLostError:
        ...     membership = regroup(store, membership, timeout_s=30, heartbeat=hb)
    """
    slice_s = timedelta(seconds=heartbeat.interval_s)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            work.wait(timeout=slice_s)
            return
        except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError / DistError for both
            if work.is_completed():  # the collective itself failed, not the slice
                raise PeerLostError(f"a collective failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from e
        if heartbeat.lost():
            dead = heartbeat.dead()
            raise PeerLostError(
                f"launch ranks {sorted(dead)} stopped beating for {heartbeat.miss_s} s" if dead
                else f"the store is gone ({heartbeat.store_error})" if heartbeat.store_error is not None
                else "another survivor started a regroup",
                peer=min(dead) if dead else None,
            )
        if time.monotonic() >= deadline:
            raise PeerTimeoutError(f"a collective did not finish within {timeout_s} s, every member beating")
