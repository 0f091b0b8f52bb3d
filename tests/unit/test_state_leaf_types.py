"""What a tensor leaf is: Parameters come back as Parameters, unstorable tensors are refused
by key, and tuple subclasses such as torch.Size keep their type through a real save."""

from __future__ import annotations

import warnings

import pytest
import torch

from recoverkit import Checkpointer
from recoverkit.errors import EncodeError, IntegrityError
from recoverkit.state import TensorLeaf, decode, encode, rebuild_container, unflatten
from recoverkit.state.flatten import flatten


def _round_trip(tree):
    """flatten -> encode -> decode -> unflatten with fresh tensors, as a restore does."""
    skeleton, refs = flatten(tree, prefix="m")
    tensors = {}
    for r in refs:
        tensors[r.key] = tensors[r.alias_of] if r.alias_of else r.tensor.detach().clone()
    return unflatten(decode(encode(skeleton)), tensors)


def test_parameters_come_back_as_parameters_with_their_flag():
    p = torch.nn.Parameter(torch.arange(3.0))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    skeleton, _ = flatten({"p": p, "frozen": frozen, "plain": torch.ones(1)}, prefix="m")
    assert skeleton["p"] == TensorLeaf("m/p", parameter=True, requires_grad=True)
    assert repr(skeleton["plain"]) == "TensorLeaf(key='m/plain')"
    back = _round_trip({"p": p, "tied": p, "frozen": frozen, "plain": torch.ones(1)})
    assert type(back["p"]) is torch.nn.Parameter and back["p"].requires_grad
    assert back["tied"] is back["p"]  # one tensor, one Parameter
    assert type(back["frozen"]) is torch.nn.Parameter and not back["frozen"].requires_grad
    assert type(back["plain"]) is torch.Tensor and not back["plain"].requires_grad
    assert torch.equal(back["p"].detach(), p.detach())


def test_a_parameter_flag_that_cannot_hold_is_damage():
    leaf = TensorLeaf("m/steps", parameter=True, requires_grad=True)
    with pytest.raises(IntegrityError, match="'m/steps' .*torch.int64"):
        unflatten({"s": leaf}, {"m/steps": torch.arange(3)})


def _unstorable():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested, CSR and quantized tensors warn on creation
        return [
            ("sparse", torch.eye(3).to_sparse(), "layout torch.sparse_coo"),
            ("sparse_csr", torch.eye(3).to_sparse_csr(), "layout torch.sparse_csr"),
            ("meta", torch.empty(4, device="meta"), "meta tensor"),
            ("nested", torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested tensor"),
            (
                "quantized",
                torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8),
                "quantized",
            ),
        ]


@pytest.mark.parametrize(
    ("kind", "tensor", "why"), _unstorable(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_unstorable_tensors_are_refused_by_key(kind, tensor, why):
    with pytest.raises(EncodeError, match=f"tensor 'm/layers/0/{kind}' .*{why}"):
        flatten({"layers": [{kind: tensor}]}, prefix="m")


def test_unstorable_tensors_are_refused_before_a_save_starts(tmp_path):
    with Checkpointer(str(tmp_path / "root")) as ckpt:
        with pytest.raises(EncodeError, match="tensor 'extra/grad' .*sparse"):
            ckpt.save(1, {"extra": {"grad": torch.eye(2).to_sparse()}})
        assert ckpt.latest() is None


def test_rebuild_container_keeps_the_container_type():
    assert type(rebuild_container(torch.Size([1]), [3])) is torch.Size
    sd = torch.nn.BatchNorm1d(2).state_dict()
    back = rebuild_container(sd, [(k, 0) for k in sd])
    assert type(back) is type(sd) and back._metadata == sd._metadata


def test_a_top_level_parameter_without_a_target_keeps_type_and_flag(tmp_path):
    p = torch.nn.Parameter(torch.arange(4.0))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    with Checkpointer(str(tmp_path / "root")) as ckpt:
        ckpt.save(1, {"p": p, "frozen": frozen, "n": 3})
    state = {"p": None, "frozen": None, "n": 0}
    with Checkpointer(str(tmp_path / "root")) as ckpt:
        assert ckpt.restore(state) == 1
    assert type(state["p"]) is torch.nn.Parameter and state["p"].requires_grad
    assert torch.equal(state["p"].detach(), p.detach())
    assert type(state["frozen"]) is torch.nn.Parameter and not state["frozen"].requires_grad
    assert state["n"] == 3


def test_torch_size_comes_back_as_torch_size(tmp_path):
    with Checkpointer(str(tmp_path / "root")) as ckpt:
        ckpt.save(1, {"shape": torch.Size([2, 3]), "meta": {"shapes": [torch.Size([4])]}})
    state = {"shape": None, "meta": None}
    with Checkpointer(str(tmp_path / "root")) as ckpt:
        ckpt.restore(state)
    assert type(state["shape"]) is torch.Size and state["shape"] == (2, 3)
    assert type(state["meta"]["shapes"][0]) is torch.Size
