"""Replica placement: which ranks hold copies of each rank's in-memory snapshot.

Where it sits: below the peer-replica tier (:mod:`recoverkit.staging.replica`), which gathers
every rank's node name once and calls :func:`place_replicas`; a pure function, so every rank
computes the same placement from the same list without another exchange.

The rule: a node loss must never take a rank together with all of its replicas, so every
holder of a rank's snapshot lives on another node. Holders are spread evenly by a ring over
the nodes: the owner with local index ``i`` on the ``j``-th node of the ring gets, as its
``t``-th holder, the rank with local index ``i`` (modulo that node's rank count) on the
``(j + t)``-th node. With groups (say racks, ``node -> group``), the ring interleaves the
groups (one node of each group in turn) and each owner prefers holders on nodes of other
groups, so a rack loss takes no rank with its replicas either while other racks exist.

Example:
    >>> nodes = ["a", "a", "b", "b"]        # ranks 0, 1 on node a; 2, 3 on node b
    >>> place_replicas(nodes, k=1)
    {0: [2], 1: [3], 2: [0], 3: [1]}
    >>> place_replicas(["a", "b", "c"], k=2)
    {0: [1, 2], 1: [2, 0], 2: [0, 1]}
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

__all__ = ["holders_of", "owners_of", "place_replicas"]

log = logging.getLogger("recoverkit")


def _ring(nodes: Sequence[str], groups: Mapping[str, str] | None) -> list[str]:
    """The distinct nodes in ring order: first appearance by rank; with groups, interleaved
    (one node of each group in turn, groups in order of first appearance)."""
    order = list(dict.fromkeys(nodes))
    if not groups:
        return order
    by_group: dict[str, list[str]] = {}
    for n in order:
        by_group.setdefault(str(groups.get(n, n)), []).append(n)
    columns = list(by_group.values())
    ring: list[str] = []
    for i in range(max(len(c) for c in columns)):
        ring += [c[i] for c in columns if i < len(c)]
    return ring


def place_replicas(
    nodes: Sequence[str], k: int = 1, groups: Mapping[str, str] | None = None
) -> dict[int, list[int]]:
    """The holder ranks of every owner rank: ``{owner: [holder, ...]}``, first choice first.

    Args:
        nodes: each rank's node name (index = rank).
        k: replicas per rank (each on a different node, never the owner's).
        groups: optional ``node -> group`` (e.g. rack); holders on nodes of another group
            come first. Nodes not named form a group of their own.

    With fewer than ``k`` other nodes an owner gets one holder on each node there is (a
    warning says so); on a single node nobody gets any.

    Raises:
        ValueError: ``k`` is negative, or a node name is not a non-empty string.

    Example:
        >>> place_replicas(["n0", "n0", "n1"], k=1)   # uneven nodes
        {0: [2], 1: [2], 2: [0]}
        >>> place_replicas(["a", "b", "c", "d"], k=1, groups={"a": "r0", "b": "r0", "c": "r1", "d": "r1"})
        {0: [2], 1: [3], 2: [1], 3: [0]}
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    for r, n in enumerate(nodes):
        if not isinstance(n, str) or not n:
            raise ValueError(f"rank {r}: its node name must be a non-empty string, got {n!r}")
    ring = _ring(nodes, groups)
    ranks_of: dict[str, list[int]] = {n: [] for n in ring}
    for r, n in enumerate(nodes):
        ranks_of[n].append(r)
    group = {n: str(groups.get(n, n)) if groups else n for n in ring}
    others = len(ring) - 1
    if k and others < k:
        why = "a single node: no rank gets a replica" if others == 0 else f"only {others} other node(s)"
        log.warning("recoverkit: %d replica(s) per rank asked for, %s", k, why)
    out: dict[int, list[int]] = {}
    for owner, node in enumerate(nodes):
        j = ring.index(node)
        local = ranks_of[node].index(owner)
        candidates = [ring[(j + t) % len(ring)] for t in range(1, len(ring))]
        candidates.sort(key=lambda n: group[n] == group[node])  # stable: ring order kept
        out[owner] = [
            ranks_of[n][local % len(ranks_of[n])] for n in candidates[: min(k, others)]
        ]
    return out


def holders_of(placement: Mapping[int, Sequence[int]], owner: int) -> list[int]:
    """The ranks holding ``owner``'s replicas."""
    return list(placement.get(owner, ()))


def owners_of(placement: Mapping[int, Sequence[int]], holder: int) -> list[int]:
    """The owners whose replicas ``holder`` holds, ascending."""
    return sorted(o for o, hs in placement.items() if holder in hs)
