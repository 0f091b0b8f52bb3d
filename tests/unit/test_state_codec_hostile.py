"""The typed-JSON decoder against hostile blobs: one IntegrityError, bounded memory.

Every fault of an object blob must come out of ``decode`` as an ``IntegrityError`` with a
one-line message (``PickleNotAllowedError`` for a pickle without permission), never as a
ValueError/TypeError/OverflowError/MemoryError/RecursionError from numpy, torch or the
decoder itself, and without allocating more than the blob's own length justifies.
"""

from __future__ import annotations

import base64
import json
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recoverkit.errors import EncodeError, IntegrityError, PickleNotAllowedError
from recoverkit.state import TensorLeaf, decode, encode

from .test_state_codec import trees

HEADER = '{"codec":"recoverkit-json","version":1,"root":'


def doc(root_json: str) -> bytes:
    """A blob whose root is the JSON text ``root_json`` (written as is, duplicates and all)."""
    return (HEADER + root_json + "}").encode()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


BIG_HEX = "0x" + "f" * 4000  # 16000 bits: its decimal repr exceeds Python's digit limit

# (name, blob, what the message must say). Each of these escaped decode as a builtin
# error, allocated memory the blob does not hold, or was silently accepted before.
CASES = [
    ("float overflow literal", doc("1e999"), "not finite"),
    ("negative float overflow in a list", doc("[1,-1e999]"), r"state\[1\]: malformed number"),
    ("raw int beyond 64 bits", doc("18446744073709551616"), "beyond 64 bits"),
    ("duplicate header key", (HEADER + '1,"root":2}').encode(), "once each"),
    (
        "duplicate codec key",
        b'{"codec":"recoverkit-json","codec":"x","version":1,"root":1}',
        "once each",
    ),
    (
        "ndarray shape beyond any array",
        doc('{"$ndarray":["<f4",[0,1000000000000000000000000000000],""]}'),
        "too large",
    ),
    (
        "ndarray shape of 65 dims",
        doc('{"$ndarray":["<f4",[' + ",".join(["1"] * 65) + '],"AAAAAA=="]}'),
        "shape",
    ),
    (
        "ndarray shape product overflows",
        doc('{"$ndarray":["<f8",[4611686018427387904,0],""]}'),
        "too large",
    ),
    (
        "ndarray of zero-size strings",
        doc('{"$ndarray":["|S0",[1099511627776],""]}'),
        "no array has it",
    ),
    (
        "ndarray of subarray dtype",
        doc('{"$ndarray":["(2,)<f4",[1],"' + b64(bytes(8)) + '"]}'),
        "no array has it",
    ),
    (
        "npscalar of subarray dtype",
        doc('{"$npscalar":["(2,)<f4","' + b64(bytes(8)) + '"]}'),
        "no array has it",
    ),
    ("ndarray dtype as a mapping", doc('{"$ndarray":[{"names":["a"]},[0],""]}'), "numpy dtype"),
    ("zero-byte elements beyond the blob", doc('{"$ndarray":["|V0",[1000000000],""]}'), "ndarray"),
    ("torch.Size beyond int64", doc('{"$size":[9223372036854775808]}'), "torch.Size"),
    ("huge $int", doc('{"$int":"0x' + "1" * 3000 + '"}'), "hex digits"),
    ("$int with spaces and underscores", doc('{"$int":" 0x1_0 "}'), "integer"),
    ("$float with spaces", doc('{"$float":"7ff8 000000000000"}'), "float"),
    ("$range with a float", doc('{"$range":[0,1.5,1]}'), "range"),
    ("$set with a duplicate", doc('{"$set":[1,1]}'), "duplicate element"),
    ("$dict with a duplicate key", doc('{"$dict":[[1,"a"],[1,"b"]]}'), "duplicate key"),
    (
        "huge int key in a path",
        doc('{"$dict":[[{"$int":"' + BIG_HEX[:2050] + '"},{"$bytes":"@"}]]}'),
        "int of",
    ),
    ("unknown tag", doc('{"$nope":1}'), "unknown tag"),
    ("tags in the wrong order", doc('{"$metadata":{},"$odict":[]}'), "unknown tag"),
    ("unknown torch dtype", doc('{"$dtype":"float99"}'), "unknown torch dtype"),
    ("device string too long", doc('{"$device":"cpu' + "0" * 100 + '"}'), "device"),
    ("device index beyond int64", doc('{"$device":"cpu:99999999999999999999"}'), "device"),
    ("malformed parameter", doc('{"$param":["k",1]}'), "parameter"),
    ("version from the future", doc("1").replace(b'"version":1', b'"version":7'), "version 7"),
    ("another codec", doc("1").replace(b"recoverkit-json", b"msgpack-ish"), "msgpack"),
    ("no header", b"[1,2]", "no codec header"),
    ("not bytes", None, "not bytes"),
]


@pytest.mark.parametrize(("name", "data", "match"), CASES, ids=[c[0] for c in CASES])
def test_hostile_blob_is_one_integrity_error(name, data, match):
    with pytest.raises(IntegrityError, match=match) as info:
        decode(data)
    assert type(info.value) is IntegrityError
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_a_damaged_pickle_is_an_integrity_error_even_when_allowed():
    blob = doc('{"$pickle":"' + b64(b"\x80\x04not a pickle") + '"}')
    with pytest.raises(PickleNotAllowedError):
        decode(blob)
    with pytest.raises(IntegrityError, match="pickled value cannot be loaded"):
        decode(blob, allow_pickle=True)


def test_the_error_path_names_the_node_in_one_bounded_line():
    key = "k" * 5000
    blob = doc('{"' + key + '":[0,{"$dict":[[{"$int":"' + BIG_HEX[:2050] + '"},{"$bytes":"@"}]]}]}')
    with pytest.raises(IntegrityError) as info:
        decode(blob)
    text = str(info.value)
    assert text.startswith("state['kkkk") and "[1][<int of" in text and "malformed base64" in text
    assert len(text) < 300


def test_integers_past_the_limit_are_refused_on_both_sides():
    assert decode(encode(-(2**8192) + 1)) == -(2**8192) + 1
    with pytest.raises(EncodeError, match="8193 bits"):
        encode({"x": 2**8192})


def _peak_bytes(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
    except IntegrityError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def test_paths_cost_nothing_until_an_error_needs_one():
    """300 nested objects with 2,000-character keys: naming every node's path as it is
    visited held ~90 MB of path strings for a 600 kB blob."""
    depth, key = 300, "k" * 2000
    text = "".join(f'{{"{key}":' for _ in range(depth)) + '{"$bytes":"@"}' + "}" * depth
    blob = doc(text)
    peak = _peak_bytes(lambda: decode(blob))
    assert peak < 20 * len(blob), (peak, len(blob))


def test_shapes_never_size_an_allocation():
    """An array of zero-byte elements claims 10**8 of them in a 70-byte blob."""
    blob = doc('{"$ndarray":["|S0",[100000000],""]}')
    assert _peak_bytes(lambda: decode(blob)) < 1 << 20


def test_valid_zero_byte_arrays_and_parameters_still_round_trip():
    import numpy as np

    for value in (np.zeros(3, dtype=[]), np.zeros((2, 0), "<f4"), np.zeros(4, "V0")):
        back = decode(encode(value))
        assert back.dtype == value.dtype and back.shape == value.shape
    leaf = TensorLeaf("m/w", parameter=True, requires_grad=True)
    assert decode(encode({"w": leaf}))["w"] == leaf
    assert decode(encode(range(-(2**70), 2**70, 3))) == range(-(2**70), 2**70, 3)


# ------------------------------------------------------------------- property: mutations
NASTY = [
    "NaN", "-Infinity", "1e999", "-1e400", "18446744073709551616", '"\\ud800"', "[" * 3000, "{",
    '{"$int":"0x' + "f" * 2100 + '"}', '{"$int":""}', '{"$float":"zz"}', '{"$complex":[1,2]}',
    '{"$ndarray":["|S0",[1099511627776],""]}', '{"$ndarray":["<f4",[0,1e30],""]}',
    '{"$ndarray":["<f8",[4611686018427387904,0],""]}', '{"$ndarray":["(3,)<i2",[1],"AAAAAAAA"]}',
    '{"$ndarray":[["a","b"],[1],"AA=="]}', '{"$ndarray":["|O",[1],"AAAAAAAAAAA="]}',
    '{"$npscalar":["V99999999999",""]}', '{"$size":[9223372036854775808]}', '{"$size":[true]}',
    '{"$device":"cuda:-1"}', '{"$device":7}', '{"$dtype":"qint8"}', '{"$dtype":["float32"]}',
    '{"$pickle":"gASVAAAA"}', '{"$dict":[[[1],2]]}', '{"$dict":[[1,2],[1,3]]}', '{"$set":[1,1]}',
    '{"$set":[{"$slice":[1,2,3]}]}', '{"$odict":[],"$metadata":{"$nope":0}}', '{"a":1,"a":2}',
    '{"$range":[0,{"$int":"0x1"},0]}', '{"$param":["k",1]}', '{"$tensor":null}', '{"$bytes":"A"}',
    '{"$tuple":{"a":1}}', '{"$slice":[1]}', '{"$frozenset":[[1]]}', '{"$odict":[[1]]}', '"\\u0000"',
    '{"$odict":[[{"$int":"0x' + "a" * 2048 + '"},1]],"$metadata":null}', "-0", "1E+999999",
]  # fmt: skip
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3)
    | st.dictionaries(st.sampled_from(["$int", "$ndarray", "$tuple", "$set", "a", "$dict"]), c, max_size=2),
    max_leaves=6,
)  # fmt: skip


def _nodes(x: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(x, list):
        for i, v in enumerate(x):
            out += _nodes(v, path + (i,))
    elif isinstance(x, dict):
        for k, v in x.items():
            out += _nodes(v, path + (k,))
    return out


def _put(x: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    x[path[0]] = _put(x[path[0]], path[1:], value)
    return x


@st.composite
def mutated_blobs(draw: Any) -> bytes:
    blob = encode(draw(trees))
    kind = draw(st.sampled_from(["splice", "flip", "cut", "node", "node"]))
    if kind == "flip":
        i = draw(st.integers(0, len(blob) - 1))
        return blob[:i] + bytes([blob[i] ^ (1 << draw(st.integers(0, 7)))]) + blob[i + 1 :]
    if kind == "cut":
        i, j = sorted(draw(st.tuples(st.integers(0, len(blob)), st.integers(0, len(blob)))))
        return blob[:i] + blob[j:] + (blob[i:j] if draw(st.booleans()) else b"")
    if kind == "splice":
        i = draw(st.integers(0, len(blob)))
        return blob[:i] + draw(st.sampled_from(NASTY)).encode() + blob[i:]
    tree = json.loads(blob)
    where = draw(st.sampled_from(_nodes(tree)))
    if draw(st.booleans()):
        new_text = draw(st.sampled_from(NASTY))
        text = json.dumps(_put(tree, where, "\0MARK\0"), separators=(",", ":"))
        return text.replace('"\\u0000MARK\\u0000"', new_text, 1).encode()
    return json.dumps(_put(tree, where, draw(_json)), separators=(",", ":")).encode()


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated_blobs())
def test_mutated_blobs_decode_or_raise_integrity_error(blob):
    try:
        decode(blob)
    except (IntegrityError, PickleNotAllowedError) as e:
        assert "\n" not in str(e) and len(str(e)) < 600
