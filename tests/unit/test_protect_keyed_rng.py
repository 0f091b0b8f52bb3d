"""``protect(keyed_rng=True)``: the loop body's random streams are keyed to the batch.

What must hold: the dropout mask of a batch is the same whatever ran before it (a fresh
run, a run resumed from a checkpoint, a run whose loss guard rejected an earlier batch);
different batches get different masks; the outer generator (saved with the checkpoint) is
not advanced by draws inside the body; and with ``keyed_rng=False`` nothing changes.
"""

from __future__ import annotations

import pytest
import torch

import recoverkit
from recoverkit.config import ProtectOptions
from recoverkit.errors import ConfigError

N = 6


def _masks(root, *, keyed=True, seed=0, max_steps=None, reject=(), draw=True):
    """Runs the loop over ``range(N)``; returns {batch: dropout mask drawn in its body}."""
    model = torch.nn.Linear(4, 4)
    drop = torch.nn.Dropout(0.5)
    out = {}
    with recoverkit.protect(
        str(root), model=model, loader=list(range(N)), save_every=1, max_steps=max_steps, keyed_rng=keyed, seed=seed
    ) as run:
        for batch in run:
            if draw:
                out[batch] = drop(torch.ones(64))
            if batch in reject and not run.guard(float("nan")):
                continue
    return out


def test_a_batch_draws_the_same_numbers_fresh_and_resumed(tmp_path):
    whole = _masks(tmp_path / "a")
    first = _masks(tmp_path / "b", max_steps=3)
    rest = _masks(tmp_path / "b")  # resumes at step 3 from the checkpoint
    assert sorted(first) == [0, 1, 2] and sorted(rest) == [3, 4, 5]
    for b in range(N):
        assert torch.equal(whole[b], (first | rest)[b]), b
    # different batches, different masks; a different seed, different masks
    assert not torch.equal(whole[0], whole[1])
    other = _masks(tmp_path / "c", seed=1)
    assert not torch.equal(whole[0], other[0])


def test_a_rejected_batch_does_not_shift_the_streams_of_the_next(tmp_path):
    clean = _masks(tmp_path / "a")
    rejected = _masks(tmp_path / "b", reject=(2,))
    for b in range(N):
        assert torch.equal(clean[b], rejected[b]), b


def test_the_outer_stream_is_not_advanced_by_the_body(tmp_path):
    torch.manual_seed(123)
    _masks(tmp_path / "a")
    after_keyed = torch.rand(4)
    torch.manual_seed(123)
    _masks(tmp_path / "b", draw=False)
    assert torch.equal(after_keyed, torch.rand(4))


def test_without_keyed_rng_the_body_draws_from_the_outer_stream(tmp_path):
    torch.manual_seed(5)
    plain = _masks(tmp_path / "a", keyed=False)
    torch.manual_seed(5)
    again = _masks(tmp_path / "b", keyed=False)
    assert all(torch.equal(plain[b], again[b]) for b in range(N))  # the outer stream, reproducible
    keyed = _masks(tmp_path / "c")
    assert not torch.equal(plain[0], keyed[0])


def test_the_key_names_the_batch_and_the_rank(tmp_path):
    keys = []
    with recoverkit.protect(str(tmp_path), model=torch.nn.Linear(2, 2), loader=list(range(3)), epochs=2, keyed_rng=True) as run:
        assert run.rng_key is None
        for _ in run:
            keys.append(run.rng_key)
    assert run.rng_key is None
    assert keys == [("protect", e, i, 0) for e in range(2) for i in range(3)]


@pytest.mark.parametrize("bad", [{"keyed_rng": 1}, {"seed": 1.5}, {"seed": 1 << 130}, {"seed": True}])
def test_bad_options_are_named(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        ProtectOptions(**bad)
