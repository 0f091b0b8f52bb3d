"""Random streams keyed to the logical sample: stable seeds, the same draws on any rank or in
any process, the outer stream untouched, and a dropout model whose outputs do not depend on
which rank runs which micro-batch."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from recoverkit.state.global_batch import GlobalBatchSampler
from recoverkit.state.keyed_rng import keyed_generator, keyed_rng, keyed_seed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _documented(seed, *key):
    """The derivation exactly as the docstring states it, written out independently."""
    h = hashlib.blake2b(digest_size=8, person=b"recoverkit.key.1")
    for part in (seed, *key):
        if isinstance(part, str):
            raw = part.encode()
            h.update(b"s" + len(raw).to_bytes(8, "little") + raw)
        else:
            h.update(b"i" + int(part).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little")


def test_keyed_seed_is_the_documented_derivation_and_pinned():
    for seed, key in [(0, ()), (0, (1, 2)), (12345, ("dropout", 7)), (-1, (2**100,)), (7, (0, 0, 0))]:
        assert keyed_seed(seed, *key) == _documented(seed, *key)
    # pinned values: a change of the derivation breaks every saved run's streams
    assert keyed_seed(0) == 16537265949083701960
    assert keyed_seed(0, 1, 2) == 5547827239289060443
    assert keyed_seed(12345, "dropout", 7) == 15197573443240435715
    assert keyed_seed(-1, 2**100) == 3463279051064151786


def test_keyed_seed_separates_keys():
    seen = {keyed_seed(0, *k) for k in [(), (0,), (0, 0), (1, 2), (2, 1), (1, 2, 0), ("1", 2), ("", 1, 2)]}
    assert len(seen) == 8
    assert keyed_seed(0, 1) != keyed_seed(1, 0) != keyed_seed(1)
    assert all(0 <= s < 2**64 for s in seen)
    # integer scalars of NumPy and torch are the same key as the int
    assert keyed_seed(3, np.int64(5), torch.tensor(6)) == keyed_seed(3, 5, 6)


@pytest.mark.parametrize(
    "seed, key, error",
    [
        (0, (True,), TypeError),
        (0, (1.0,), TypeError),
        (0, (None,), TypeError),
        ("0", (), TypeError),
        (0, (2**127,), ValueError),
        (-(2**127) - 1, (), ValueError),
    ],
)
def test_keyed_seed_refuses_what_is_not_a_key(seed, key, error):
    with pytest.raises(error, match="keyed_seed"):
        keyed_seed(seed, *key)


def test_keyed_generator_draws_by_key():
    a = torch.rand(16, generator=keyed_generator(5, 1, 2))
    b = torch.rand(16, generator=keyed_generator(5, 1, 2))
    c = torch.rand(16, generator=keyed_generator(5, 1, 3))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert keyed_generator(5, 1, 2).initial_seed() == keyed_seed(5, 1, 2)


def _masks(key):
    drop = torch.nn.Dropout(0.5)
    with keyed_rng(11, *key):
        return drop(torch.ones(64)), torch.randn(8)


def test_same_key_same_draws_whatever_the_outer_stream():
    torch.manual_seed(1)
    torch.rand(100)
    a = _masks((3, 4))
    torch.manual_seed(999)
    b = _masks((3, 4))
    c = _masks((3, 5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_outer_stream_is_untouched_also_on_error():
    torch.manual_seed(42)
    expected = torch.rand(20)
    torch.manual_seed(42)
    first = torch.rand(10)
    with keyed_rng(0, 1):
        torch.rand(1000)
    with pytest.raises(RuntimeError, match="inside"), keyed_rng(0, 2):
        torch.rand(7)
        raise RuntimeError("inside")
    with keyed_rng(0, 3):  # nested blocks restore the outer keyed stream
        outer_a = torch.rand(3)
        with keyed_rng(0, 4):
            torch.rand(50)
        outer_b = torch.rand(3)
    with keyed_rng(0, 3):
        assert torch.equal(torch.rand(6), torch.cat([outer_a, outer_b]))
    assert torch.equal(torch.cat([first, torch.rand(10)]), expected)


def test_keyed_rng_devices_must_be_cuda():
    with pytest.raises(ValueError, match="CUDA devices only"), keyed_rng(0, devices=["cpu"]):
        pass


def test_same_key_same_masks_in_another_process():
    """Two processes with different histories and hash seeds draw the same keyed masks."""
    code = textwrap.dedent(
        """
        import sys, torch
        from recoverkit.state.keyed_rng import keyed_rng, keyed_seed
        torch.manual_seed(int(sys.argv[1])); torch.rand(int(sys.argv[1]))
        drop = torch.nn.Dropout(0.5)
        with keyed_rng(11, 3, 4):
            m = drop(torch.ones(64))
        print(keyed_seed(11, 3, 4), "".join("1" if v else "0" for v in m.tolist()))
        """
    )
    outs = []
    for arg, hashseed in (("5", "1"), ("77", "2")):
        env = {**os.environ, "PYTHONHASHSEED": hashseed, "PYTHONPATH": REPO}
        r = subprocess.run(
            [sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=120, env=env
        )
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.split())
    here = _masks((3, 4))[0]
    assert outs[0] == outs[1]
    assert outs[0][0] == str(keyed_seed(11, 3, 4))
    assert outs[0][1] == "".join("1" if v else "0" for v in here.tolist())


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(6, 16, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(16, 1, generator=g, dtype=torch.float64))
        self.drop = torch.nn.Dropout(0.4)

    def forward(self, x):
        return self.drop(torch.tanh(x @ self.a)) @ self.b


def _outputs_by_micro_batch(world_size, keyed):
    """Each simulated rank has its own outer stream (as real ranks do) and runs its share."""
    net = _Net().train()
    x = torch.randn(48, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sampler = GlobalBatchSampler(48, global_batch=24, micro_batch=4, seed=3)
    out = {}
    for rank in range(world_size):
        torch.manual_seed(1000 + rank)
        for step in range(sampler.steps_per_epoch):
            for mb in sampler.assign(step, rank, world_size):
                rows = x[list(mb.samples)]
                if keyed:
                    with keyed_rng(3, *mb.key):
                        out[mb.key] = net(rows)
                else:
                    out[mb.key] = net(rows)
    return out


def test_dropout_model_gives_the_same_outputs_whatever_the_rank_assignment():
    ref = _outputs_by_micro_batch(1, keyed=True)
    assert len(ref) == 12
    for world in (2, 3, 4, 5, 12, 13):
        got = _outputs_by_micro_batch(world, keyed=True)
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), (world, k)
    # without the keyed streams the same run depends on the assignment
    plain = [_outputs_by_micro_batch(w, keyed=False) for w in (1, 4)]
    assert any(not torch.equal(plain[0][k], plain[1][k]) for k in ref)


@pytest.mark.gpu
def test_cuda_streams_are_keyed_and_restored():
    drop = torch.nn.Dropout(0.5)
    x = torch.ones(256, device="cuda")
    torch.cuda.manual_seed_all(5)
    before = torch.cuda.get_rng_state()
    with keyed_rng(1, 2):
        a = drop(x)
    assert torch.equal(before, torch.cuda.get_rng_state())
    torch.cuda.manual_seed_all(6)
    with keyed_rng(1, 2):
        b = drop(x)
    with keyed_rng(1, 2, devices=[]):  # CUDA left alone: not keyed
        torch.cuda.manual_seed_all(7)
        c = drop(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_documented_examples_run():
    import doctest

    import recoverkit.state.global_batch as gb
    import recoverkit.state.keyed_rng as kr

    for module in (kr, gb):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_a_cpu_only_process_gets_no_cuda_context():
    """keyed_rng on a GPU machine must not create a CUDA context for a CPU-only rank."""
    code = (
        "import torch\nfrom recoverkit.state.keyed_rng import keyed_rng\n"
        "with keyed_rng(0, 1):\n    torch.rand(2)\nprint(torch.cuda.is_initialized())"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False"]
