"""flatten/unflatten (keys, aliases, real optimizer state) and the dtype byte views."""

from __future__ import annotations

import collections
from collections import OrderedDict

import pytest
import torch

from recoverkit.errors import EncodeError, IncompatibleCheckpointError
from recoverkit.state import (
    STORABLE_DTYPES,
    TensorLeaf,
    decode,
    dtype_from_name,
    dtype_name,
    encode,
    from_bytes,
    nbytes,
    to_bytes_view,
    unflatten,
)
from recoverkit.state.dtypes import _storage_bytes
from recoverkit.state.flatten import flatten


def _through_bytes(refs):
    """What the reader hands unflatten: fresh tensors from the saved bytes, aliases shared."""
    out = {}
    for r in refs:
        if r.alias_of is not None:
            out[r.key] = out[r.alias_of]
            continue
        t = r.tensor.detach().contiguous()
        raw = bytearray(to_bytes_view(t).numpy().tobytes())
        buf = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        out[r.key] = from_bytes(buf, dtype_from_name(dtype_name(t.dtype)), t.shape)
    return out


def _adamw_run(steps: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    return model, opt


def test_adamw_state_round_trips_through_the_codec():
    model, opt = _adamw_run(3)
    sd = opt.state_dict()
    skeleton, refs = flatten(sd, prefix="optimizer")
    keys = [r.key for r in refs]
    assert "optimizer/state/0/exp_avg" in keys and "optimizer/state/3/exp_avg_sq" in keys
    assert all(r.alias_of is None for r in refs)
    assert all(
        r.tensor is sd["state"][int(r.key.split("/")[2])][r.key.split("/")[3]] for r in refs
    )  # no copies
    back = unflatten(decode(encode(skeleton)), _through_bytes(refs))
    assert list(back["state"]) == [0, 1, 2, 3]  # int keys stay int
    assert back["param_groups"] == sd["param_groups"] and isinstance(
        back["param_groups"][0]["betas"], tuple
    )
    for i, st in sd["state"].items():
        assert st.keys() == back["state"][i].keys()
        for k, v in st.items():
            assert torch.equal(v, back["state"][i][k]) and v.dtype == back["state"][i][k].dtype
    # the restored state drives a fresh optimizer to exactly the same next step
    model2, opt2 = _adamw_run(0)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(back)
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_are_saved_once_and_come_back_tied():
    src = _Tied()
    skeleton, refs = flatten(src.state_dict(), prefix="model")
    aliases = [(r.key, r.alias_of) for r in refs if r.alias_of is not None]
    assert aliases == [("model/head.weight", "model/embed.weight")]
    assert len([r for r in refs if r.alias_of is None]) == 3  # embed.weight, body.weight, body.bias
    restored = unflatten(decode(encode(skeleton)), _through_bytes(refs))
    assert restored["head.weight"] is restored["embed.weight"]
    dst = _Tied()
    dst.load_state_dict(restored)
    assert dst.head.weight is dst.embed.weight and torch.equal(dst.embed.weight, src.embed.weight)


def test_keys_are_unique_and_aliases_need_the_same_view():
    base = torch.arange(8.0)
    empty_a, empty_b = torch.empty(0), torch.empty(0)
    tree = {
        1: base,
        "1": base[:4],
        "x": [base[4:], base[:4]],
        "e": (empty_a, empty_b, empty_a),
        "a/b": base,
    }
    tree["a"] = {"b": base.view(8)}  # same storage, offset, shape, stride: an alias
    _, refs = flatten(tree, prefix="p")
    got = [(r.key, r.alias_of) for r in refs]
    assert got == [
        ("p/1", None),
        ("p/1#1", None),  # a view at another shape: saved on its own
        ("p/x/0", None),
        ("p/x/1", "p/1#1"),
        ("p/e/0", None),
        ("p/e/1", None),  # another empty tensor is not the same tensor
        ("p/e/2", "p/e/0"),
        ("p/a/b", "p/1"),
        ("p/a/b#1", "p/1"),
    ]


def test_skeleton_keeps_container_types():
    Pair = collections.namedtuple("Pair", "a b")
    od = torch.nn.Linear(1, 1).state_dict()
    dd = collections.defaultdict(list, {"t": torch.ones(1)})
    tree = {
        "pair": Pair(torch.zeros(1), 2),
        "od": od,
        "dd": dd,
        "size": torch.Size([2]),
        "s": {1, 2},
    }
    skeleton, refs = flatten(tree)
    assert skeleton["pair"] == Pair(TensorLeaf("pair/0"), 2)
    assert type(skeleton["od"]) is OrderedDict and skeleton["od"]._metadata == od._metadata
    assert (
        type(skeleton["dd"]) is collections.defaultdict and skeleton["dd"].default_factory is list
    )
    assert type(skeleton["size"]) is torch.Size
    back = unflatten(skeleton, {r.key: r.tensor for r in refs})
    assert type(back["pair"]) is Pair and back["pair"].a is tree["pair"].a
    assert back["od"]._metadata == od._metadata and back["dd"]["t"] is dd["t"]


def test_unflatten_names_a_missing_tensor():
    skeleton, _ = flatten({"w": torch.zeros(1)}, prefix="model")
    with pytest.raises(IncompatibleCheckpointError, match="'model/w'"):
        unflatten(skeleton, {})


# --------------------------------------------------------------------------- dtypes
def test_every_storable_dtype_is_covered():
    names = {dtype_name(d) for d in STORABLE_DTYPES}
    for required in (
        "bool", "uint16", "uint32", "uint64", "bfloat16", "complex32", "float8_e4m3fn", "float8_e4m3fnuz",
        "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2", "bits8", "bits16",
    ):  # fmt: skip
        assert required in names
    for d in STORABLE_DTYPES:
        assert dtype_from_name(dtype_name(d)) is d and getattr(torch, dtype_name(d)) is d
    assert dtype_name(torch.half) == "float16" and dtype_from_name("half") is torch.float16


@pytest.mark.filterwarnings("ignore:.*quantize")
def test_unknown_and_quantized_dtypes():
    with pytest.raises(IncompatibleCheckpointError, match="'float99'"):
        dtype_from_name("float99")
    with pytest.raises(IncompatibleCheckpointError, match="quantized"):
        dtype_from_name("qint8")
    with pytest.raises(EncodeError, match="quantized.*not supported"):
        dtype_name(torch.qint8)
    q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)
    with pytest.raises(EncodeError):
        to_bytes_view(q)


@pytest.mark.parametrize("dtype", STORABLE_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", [(3, 5), (), (0, 4), (7,)], ids=str)
def test_bytes_round_trip_is_bit_exact(dtype, shape):
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(
        0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    t = raw.clone().view(dtype).reshape(shape)  # every bit pattern, without converting values
    view = to_bytes_view(t)
    assert (
        view.dtype == torch.uint8 and view.dim() == 1 and nbytes(t) == view.numel() == raw.numel()
    )
    assert torch.equal(view, raw)
    assert torch.equal(_storage_bytes(t), raw)  # the fallback path agrees
    if n:
        assert view.data_ptr() == t.data_ptr()  # a view, not a copy
    buf = view.clone()
    back = from_bytes(buf, dtype, shape)
    assert (
        back.dtype == dtype and tuple(back.shape) == shape and torch.equal(to_bytes_view(back), raw)
    )
    if n:
        assert back.data_ptr() == buf.data_ptr()  # reinterpreted in place


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2,
                                   torch.complex64, torch.int64, torch.uint32, torch.bool])  # fmt: skip
def test_values_survive_and_non_contiguous_needs_contiguous(dtype):
    src = (
        (torch.randn(4, 6) * 10).to(dtype)
        if not dtype.is_complex
        else torch.randn(4, 6, dtype=dtype)
    )
    view = src.t()[1:3]
    with pytest.raises(ValueError, match="contiguous"):
        to_bytes_view(view)
    dense = view.contiguous()
    back = from_bytes(to_bytes_view(dense).clone(), dtype, dense.shape)
    assert torch.equal(back.float() if dtype.is_floating_point and dtype.itemsize == 1 else back,
                       view.float() if dtype.is_floating_point and dtype.itemsize == 1 else view)  # fmt: skip


def test_view_preconditions():
    with pytest.raises(ValueError, match="conj"):
        to_bytes_view(torch.ones(2, dtype=torch.complex64).conj())
    with pytest.raises(ValueError, match="strided"):
        to_bytes_view(torch.eye(2).to_sparse())
    assert to_bytes_view(torch.ones(2, requires_grad=True)).numel() == 8
    with pytest.raises(ValueError, match="cannot hold"):
        from_bytes(torch.zeros(7, dtype=torch.uint8), torch.float32, (2,))
    with pytest.raises(ValueError, match="storage offset"):
        from_bytes(torch.zeros(9, dtype=torch.uint8)[1:], torch.float32, (2,))
    with pytest.raises(ValueError, match="1-D uint8"):
        from_bytes(torch.zeros(2, dtype=torch.int8), torch.int8, (2,))
    out = from_bytes(torch.zeros(0, dtype=torch.uint8), torch.float64, (0, 3))
    assert out.shape == (0, 3) and out.dtype == torch.float64


def test_saving_works_whatever_imported_the_flatten_module_first(tmp_path):
    """Importing the module ``recoverkit.state.flatten`` first (a restore path does) makes the
    package attribute ``flatten`` that module; nothing may look the function up through it."""
    import subprocess
    import sys

    code = (
        "import recoverkit.state.flatten, recoverkit.restore.in_place, torch, recoverkit\n"
        "with recoverkit.Checkpointer({!r}) as c:\n"
        "    c.save(1, {{'m': torch.nn.Linear(2, 2)}})\n"
        "    print(c.restore({{'m': torch.nn.Linear(2, 2)}}))\n"
    ).format(str(tmp_path / "ckpt"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "1", proc.stderr[-2000:]
