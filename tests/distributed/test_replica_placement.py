"""Replica placement (a pure function): holders on other nodes, spread evenly, groups preferred."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from recoverkit.distributed.placement import owners_of, place_replicas


def _check_other_nodes(nodes, placement):
    for owner, holders in placement.items():
        assert len(set(holders)) == len(holders), (owner, holders)
        assert all(nodes[h] != nodes[owner] for h in holders), (owner, holders)
        assert len({nodes[h] for h in holders}) == len(holders), "two holders on one node"


def test_two_nodes_one_replica_pairs_same_local_index():
    nodes = ["a", "a", "b", "b"]
    p = place_replicas(nodes, k=1)
    assert p == {0: [2], 1: [3], 2: [0], 3: [1]}
    _check_other_nodes(nodes, p)
    assert owners_of(p, 2) == [0] and owners_of(p, 0) == [2]


@pytest.mark.parametrize("n_nodes,per_node,k", [(3, 2, 1), (4, 2, 2), (4, 4, 3), (8, 1, 3)])
def test_even_nodes_every_rank_holds_exactly_k(n_nodes, per_node, k):
    nodes = [f"n{r // per_node}" for r in range(n_nodes * per_node)]
    p = place_replicas(nodes, k=k)
    _check_other_nodes(nodes, p)
    assert all(len(h) == k for h in p.values())
    load = Counter(h for hs in p.values() for h in hs)
    assert set(load.values()) == {k} and len(load) == len(nodes)  # perfectly even


def test_interleaved_node_names_follow_first_appearance():
    nodes = ["a", "b", "a", "b"]  # ranks alternate nodes
    p = place_replicas(nodes, k=1)
    assert p == {0: [1], 1: [0], 2: [3], 3: [2]}


def test_uneven_nodes_stay_off_the_owner_node_and_spread():
    nodes = ["a", "a", "a", "b"]
    p = place_replicas(nodes, k=1)
    _check_other_nodes(nodes, p)
    assert p[0] == p[1] == p[2] == [3] and p[3] == [0]
    nodes = ["a", "a", "b", "b", "b", "c"]
    p = place_replicas(nodes, k=2)
    _check_other_nodes(nodes, p)
    assert all(len(h) == 2 for h in p.values())


def test_fewer_other_nodes_than_k_gives_what_exists_with_a_warning(caplog):
    nodes = ["a", "a", "b", "b"]
    with caplog.at_level(logging.WARNING, logger="recoverkit"):
        p = place_replicas(nodes, k=3)
    assert p == {0: [2], 1: [3], 2: [0], 3: [1]}
    assert "only 1 other node" in caplog.text


def test_one_node_gets_no_replicas_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="recoverkit"):
        p = place_replicas(["solo"] * 3, k=1)
    assert p == {0: [], 1: [], 2: []}
    assert "single node" in caplog.text
    assert place_replicas(["solo"], k=0) == {0: []}


def test_groups_put_holders_in_another_group_first():
    nodes = ["a", "b", "c", "d"]  # racks: a, b in r0; c, d in r1
    groups = {"a": "r0", "b": "r0", "c": "r1", "d": "r1"}
    p = place_replicas(nodes, k=1, groups=groups)
    for owner, (h,) in p.items():
        assert groups[nodes[h]] != groups[nodes[owner]], (owner, h)
    load = Counter(h for hs in p.values() for h in hs)
    assert set(load.values()) == {1}  # still even
    # k=2: one holder in the other rack first, then one in its own rack (another node)
    p2 = place_replicas(nodes, k=2, groups=groups)
    _check_other_nodes(nodes, p2)
    for owner, hs in p2.items():
        assert groups[nodes[hs[0]]] != groups[nodes[owner]]


def test_without_groups_racks_are_not_considered():
    nodes = ["a", "b", "c", "d"]
    assert place_replicas(nodes, k=1) == {0: [1], 1: [2], 2: [3], 3: [0]}


def test_every_rank_computes_the_same_placement():
    nodes = ["x", "y", "x", "z", "y", "x"]
    assert place_replicas(list(nodes), k=2) == place_replicas(tuple(nodes), k=2)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_k_is_refused(bad):
    with pytest.raises(ValueError, match="k must be"):
        place_replicas(["a", "b"], k=bad)


def test_bad_node_name_is_refused():
    with pytest.raises(ValueError, match="rank 1"):
        place_replicas(["a", ""], k=1)
