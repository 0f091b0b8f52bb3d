"""Save and restore whole training states exactly."""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from recoverkit import (
    Checkpointer,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CheckpointOptions,
    IncompatibleCheckpointError,
    RetentionPolicy,
)
from tests.models import Trainer, params_equal


def test_resume_is_bit_identical_to_uninterrupted_run(root):
    reference = Trainer(seed=7)
    ref_losses = [reference.train_step() for _ in range(12)]

    first = Trainer(seed=7)
    with Checkpointer(root) as ckpt:
        losses = [first.train_step() for _ in range(5)]
        ckpt.save(first.step, first.state())
        # the crashed process keeps training a little; none of this may leak into the resume
        first.train_step()
        torch.rand(100)

    resumed = Trainer(seed=12345)  # fresh objects, different init and RNG
    state = resumed.state()
    with Checkpointer(root) as ckpt:
        assert ckpt.restore(state) == 5
    resumed.step = state["step"]
    assert resumed.step == 5
    losses += [resumed.train_step() for _ in range(7)]

    assert losses == ref_losses  # exact float equality, step by step
    assert params_equal(resumed.model, reference.model)
    ref_opt, res_opt = reference.optimizer.state_dict(), resumed.optimizer.state_dict()
    for pid, s in ref_opt["state"].items():
        for k, v in s.items():
            assert torch.equal(v, res_opt["state"][pid][k]), (pid, k)
    assert resumed.scheduler.state_dict()["last_epoch"] == reference.scheduler.state_dict()["last_epoch"]
    assert resumed.model.head.weight is resumed.model.embed.weight  # still tied


def test_tied_weights_saved_once(root):
    trainer = Trainer()
    with Checkpointer(root) as ckpt:
        ckpt.save(1, {"model": trainer.model})
        manifest = ckpt.manifest(1)
    tied = [k for k, t in manifest.tensors.items() if t.alias_of is not None]
    assert tied == ["model/head.weight"]
    assert manifest.tensors["model/head.weight"].alias_of == "model/embed.weight"


def _all_dtypes():
    out = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
           torch.complex128, torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32,
           torch.int64, torch.uint16, torch.uint32, torch.uint64]
    out += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                        "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, n)]
    return out


def _random_tensor(dtype, shape, gen):
    raw = torch.randint(0, 256, (int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size(),),
                        dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", _all_dtypes(), ids=str)
def test_every_dtype_round_trips_bit_exact(root, dtype):
    gen = torch.Generator().manual_seed(0)
    base = _random_tensor(dtype, (6, 10), gen)
    state = {
        "t": base.clone(),
        "view": base[:, 1:7:2],  # non-contiguous view
        "scalar": _random_tensor(dtype, (), gen),
        "empty": torch.empty((0, 3), dtype=dtype),
    }
    expected = {k: v.clone() for k, v in state.items()}
    with Checkpointer(root) as ckpt:
        ckpt.save(3, state)
        target = {k: torch.zeros_like(v) for k, v in expected.items()}
        assert ckpt.restore(target) == 3
    for k, v in expected.items():
        got = target[k]
        assert got.dtype == v.dtype and got.shape == v.shape, k
        assert torch.equal(got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8),
    st.binary(max_size=8),
    st.builds(lambda n, s: torch.arange(n, dtype=torch.float32).mul_(s).reshape(-1),
              st.integers(0, 20), st.floats(-4, 4, allow_nan=False)),
)
_tree = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers(-3, 3)), inner, max_size=4),
    ),
    max_leaves=15,
)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, float):
        return isinstance(b, float) and (math.isnan(a) and math.isnan(b) or
                                         a == b and math.copysign(1, a) == math.copysign(1, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=_tree)
@example(tree={"\x00": torch.tensor([]), "\\x00": torch.ones(2)})  # a NUL in a key (a manifest refuses it in a tensor's name)
def test_random_state_trees_round_trip(tmp_path_factory, tree):
    root = str(tmp_path_factory.mktemp("h"))
    with Checkpointer(root, options=CheckpointOptions(capture_rng=False)) as ckpt:
        ckpt.save(1, {"tree": tree})
        target = {"tree": None}
        ckpt.restore(target)
    assert _same(tree, target["tree"])


def test_rng_streams_are_restored(root):
    with Checkpointer(root) as ckpt:
        random.seed(1)
        np.random.seed(2)
        torch.manual_seed(3)
        ckpt.save(1, {})
        expected = (random.random(), np.random.rand(), torch.rand(3))
        random.seed(9)
        np.random.seed(9)
        torch.manual_seed(9)
        ckpt.restore({})
        got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_latest_steps_and_retention(root):
    model = torch.nn.Linear(3, 3)
    opts = CheckpointOptions(retention=RetentionPolicy(keep_last=2, keep_every=4))
    with Checkpointer(root, options=opts) as ckpt:
        assert ckpt.latest() is None and ckpt.steps() == []
        for step in range(1, 10):
            ckpt.save(step, {"model": model})
        assert ckpt.steps() == [4, 8, 9]
        assert ckpt.latest() == 9
    with open(os.path.join(root, "latest")) as f:
        assert f.read().strip() == "step-000000009"


def test_restore_with_nothing_saved_names_the_root(root):
    with Checkpointer(root) as ckpt, pytest.raises(CheckpointNotFoundError, match="no valid checkpoint"):
        ckpt.restore({"model": torch.nn.Linear(2, 2)})


def test_restore_of_a_missing_step_is_not_found(root):
    with Checkpointer(root) as ckpt:
        ckpt.save(1, {"x": 1})
        with pytest.raises(CheckpointNotFoundError, match="step 7"):
            ckpt.restore({"x": 0}, step=7)


def test_shape_mismatch_leaves_target_untouched(root):
    with Checkpointer(root) as ckpt:
        ckpt.save(1, {"model": torch.nn.Linear(4, 4), "opt_steps": 3})
        target = torch.nn.Linear(4, 5)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        state = {"model": target, "opt_steps": 0}
        with pytest.raises(IncompatibleCheckpointError):
            ckpt.restore(state)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    assert state["opt_steps"] == 0


def test_missing_key_in_target_is_incompatible(root):
    with Checkpointer(root) as ckpt:
        ckpt.save(1, {"a": 1, "b": 2})
        with pytest.raises(IncompatibleCheckpointError, match="b"):
            ckpt.restore({"a": 0})


def test_second_writer_on_same_root_is_fenced(root):
    with Checkpointer(root):
        with pytest.raises(CheckpointLockedError, match="another writer"):
            Checkpointer(root)
    Checkpointer(root).close()  # free again once the first is closed


def test_objects_without_pickle_free_encoding_need_allow_pickle(root):
    class Custom:
        pass

    with Checkpointer(root) as ckpt:
        with pytest.raises(TypeError, match="allow_pickle"):
            ckpt.save(1, {"obj": Custom()})
        assert ckpt.steps() == []
        assert [n for n in os.listdir(root) if n.startswith(".tmp")] == []
