"""The typed-JSON codec: exact round trips, useful errors, and no code run on decode."""

from __future__ import annotations

import base64
import collections
import json
import math
import pickle
import struct
from collections import OrderedDict
from decimal import Decimal
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from recoverkit.errors import (
    EncodeError,
    IntegrityError,
    PickleNotAllowedError,
)
from recoverkit.state import STORABLE_DTYPES, TensorLeaf, decode, encode


def same(a: Any, b: Any) -> bool:
    """Equal in type and value; floats by bit pattern, dicts in insertion order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if isinstance(a, (np.ndarray, np.generic)):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        if getattr(a, "_metadata", None) != getattr(b, "_metadata", None):
            return False
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb) for (ka, va), (kb, vb) in zip(a.items(), b.items())
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (set, frozenset)):
        return len(a) == len(b) and all(any(same(x, y) for y in b) for x in a)
    return bool(a == b)


def test_same_is_strict():
    assert not same(1, 1.0) and not same(True, 1) and not same((1,), [1])
    assert not same(0.0, -0.0) and same(math.nan, math.nan)
    assert not same({1: 2, 3: 4}, {3: 4, 1: 2}) and not same(np.float32(1), np.float64(1))
    assert not same(OrderedDict(a=1), {"a": 1})


# ----------------------------------------------------------------------------- strategies
_NP_DTYPES = [
    "u1",
    "<i2",
    ">i4",
    "<u4",
    "<i8",
    "<f2",
    "<f4",
    ">f8",
    "<c8",
    "<c16",
    "?",
    "<M8[ns]",
    "<m8[s]",
    "|S3",
    "<U2",
]
hashables = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from(["$tuple", "$x", "a/b", "1"]),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=4,
)
leaves = (
    hashables
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.complex_numbers(allow_nan=True, allow_infinity=True)
    | st.binary(max_size=16).map(bytearray)
    | hnp.arrays(
        st.sampled_from(_NP_DTYPES),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3),
    )
    | st.sampled_from(_NP_DTYPES).flatmap(lambda d: hnp.from_dtype(np.dtype(d)))
    | st.sampled_from(list(STORABLE_DTYPES))
    | st.lists(st.integers(0, 9), max_size=4).map(torch.Size)
    | st.sampled_from([torch.device("cpu"), torch.device("cuda", 1), torch.device("meta")])
    | st.builds(
        slice, st.none() | st.integers(), st.none() | st.integers(), st.none() | st.integers(1, 3)
    )
    | st.builds(range, st.integers(-5, 5), st.integers(-5, 5), st.sampled_from([1, 2, -1]))
    | st.text(max_size=6).map(TensorLeaf)
    | st.builds(TensorLeaf, st.text(max_size=6), st.just(True), st.booleans())
)
trees = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
        | st.dictionaries(hashables, inner, max_size=4)
        | st.dictionaries(st.text(max_size=4), inner, max_size=3).map(OrderedDict)
        | st.sets(hashables, max_size=4)
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_round_trip_is_exact(tree):
    blob = encode(tree)
    assert same(decode(blob), tree)
    assert blob.decode("utf-8")  # valid UTF-8 (ASCII in fact)
    assert encode(decode(blob)) == blob  # canonical: a decoded tree encodes to the same bytes


@pytest.mark.parametrize(
    "value",
    [
        -0.0, math.nan, -math.inf, struct.unpack(">d", bytes.fromhex("fff4000000000001"))[0],  # signalling NaN payload
        2**64, -(2**63) - 1, 10**2000, -(2**8192) + 1, complex(-0.0, math.nan),
        {1: "int key", "1": "str key"}, {"$tuple": 1}, {"a": {"$b": 2}}, OrderedDict(b=1, a=2),
        (1, (2, [3, {4}])), np.random.RandomState(3).get_state(), np.float32(-0.0), np.str_("x"),
        np.zeros((2, 0, 3), "<f4"), np.array(5, ">i8"), np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8", (2,))]),
        torch.float8_e5m2fnuz, torch.Size([]), slice(1, None, -1), range(0), b"", bytearray(b"\0"),
    ],
    ids=lambda v: type(v).__name__,
)  # fmt: skip
def test_edge_values_round_trip(value):
    assert same(decode(encode(value)), value)


def test_namedtuple_comes_back_as_tuple_and_metadata_is_kept():
    Point = collections.namedtuple("Point", "x y")
    assert same(decode(encode(Point(1, 2))), (1, 2))
    sd = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).state_dict()
    skeleton = OrderedDict((k, TensorLeaf(k)) for k in sd)
    skeleton._metadata = sd._metadata  # type: ignore[attr-defined]
    back = decode(encode(skeleton))
    assert type(back) is OrderedDict and back._metadata == sd._metadata and list(back) == list(sd)


def test_output_is_compact_json_with_a_header():
    doc = json.loads(encode({"lr": 0.1, "betas": (0.9, 0.99), "state": {0: {}}}))
    assert doc["codec"] == "recoverkit-json" and doc["version"] == 1
    assert doc["root"]["lr"] == 0.1  # str-keyed dicts stay plain objects
    assert doc["root"]["betas"] == {"$tuple": [0.9, 0.99]}
    assert doc["root"]["state"] == {"$dict": [[0, {}]]}


def test_unencodable_value_names_its_path():
    state = {"sched": {"lr_lambdas": [lambda epoch: 0.9**epoch]}}
    with pytest.raises(
        EncodeError,
        match=r"state\['sched'\]\['lr_lambdas'\]\[0\]: cannot encode <class 'function'>.*allow_pickle=True",
    ):
        encode(state)
    with pytest.raises(EncodeError, match=r"state\[1\]\[0\]: a tensor reached the codec"):
        encode([0, (torch.zeros(1),)])
    with pytest.raises(EncodeError, match="dtype object"):
        encode({"x": np.array([None])})
    with pytest.raises(EncodeError, match="cannot pickle"):  # a lambda cannot be pickled either
        encode([lambda: 0], allow_pickle=True)


def test_allow_pickle_round_trip():
    value = {"d": Decimal("1.25"), "q": collections.deque([1, 2]), "n": 3}
    blob = encode(value, allow_pickle=True)
    assert '"$pickle"' in blob.decode()
    assert decode(blob, allow_pickle=True) == value
    with pytest.raises(PickleNotAllowedError, match=r"state\['d'\]"):
        decode(blob)


class _CreatesFile:
    """Unpickling this calls open(path, 'w'): it creates a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_is_never_run_without_permission(tmp_path):
    marker = tmp_path / "pwned"
    blob = encode({"evil": _CreatesFile(str(marker))}, allow_pickle=True)
    with pytest.raises(PickleNotAllowedError):
        decode(blob)
    assert not marker.exists()
    # the payload is real: with permission it does run
    decode(blob, allow_pickle=True)["evil"].close()
    assert marker.exists()


def _doc(root: Any, **header: Any) -> bytes:
    return json.dumps({"codec": "recoverkit-json", "version": 1, "root": root, **header}).encode()


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (b"{not json", IntegrityError, "not valid JSON"),
        (b"\xff\xfe", IntegrityError, "not valid JSON"),
        (encode({"a": 1})[:-3], IntegrityError, "not valid JSON"),
        (b'{"codec":"recoverkit-json","version":1,"root":NaN}', IntegrityError, "not valid JSON"),
        (b"[1, 2]", IntegrityError, "no codec header"),
        (_doc(1, codec="other"), IntegrityError, "codec 'other'"),
        (_doc(1, version=2), IntegrityError, "version 2"),
        (_doc(1, version="1"), IntegrityError, "invalid codec version"),
        (_doc(1, extra=0), IntegrityError, "header has fields"),
        (_doc({"$nope": 1}), IntegrityError, r"unknown tag '\$nope'"),
        (_doc({"$tuple": [], "x": 1}), IntegrityError, "extra fields"),
        (_doc({"a": 1, "$tuple": []}), IntegrityError, "misplaced tag"),
        (
            b'{"codec":"recoverkit-json","version":1,"root":{"a":1,"a":2}}',
            IntegrityError,
            "duplicate",
        ),
        (_doc({"$bytes": "@@@"}), IntegrityError, "base64"),
        (_doc({"$tuple": 5}), IntegrityError, "sequence"),
        (_doc({"$dict": [[[1], 2]]}), IntegrityError, "unhashable"),
        (_doc({"$set": [[1]]}), IntegrityError, "unhashable"),
        (
            _doc({"$ndarray": ["<f4", [3], base64.b64encode(b"12345678").decode()]}),
            IntegrityError,
            "8 bytes",
        ),
        (
            _doc({"$ndarray": ["|O", [1], base64.b64encode(b"12345678").decode()]}),
            IntegrityError,
            "objects",
        ),
        (_doc({"$ndarray": ["not a dtype", [0], ""]}), IntegrityError, "numpy dtype"),
        (_doc({"$float": "7ff8"}), IntegrityError, "float"),
        (_doc({"$int": "zz"}), IntegrityError, "integer"),
        (_doc({"$dtype": "float99"}), IntegrityError, "float99"),
        (_doc({"$range": [0, 1, 0]}), IntegrityError, "range"),
        (_doc({"a": {"$tensor": 3}}), IntegrityError, r"state\['a'\]: malformed tensor key"),
    ],
)
def test_malformed_input_is_refused(data, error, match):
    with pytest.raises(error, match=match):
        decode(data)


def test_deep_nesting_is_an_error_not_a_crash():
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(IntegrityError):
        decode(b'{"codec":"recoverkit-json","version":1,"root":' + deep + b"}")


def test_decode_without_permission_never_calls_pickle(monkeypatch):
    """The decoder never reaches pickle: loads/find_class would raise if it did."""
    blob = encode({"x": np.arange(3), "y": (1, {2}), "z": torch.bfloat16})
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    assert same(decode(blob), {"x": np.arange(3), "y": (1, {2}), "z": torch.bfloat16})
