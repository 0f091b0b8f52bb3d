"""Property: however a re-signed manifest is mutated, restore and verify stay safe and agree.

Hypothesis replaces, deletes and inserts JSON values at random places of the newest step's
manifest (step 2 of a real two-step checkpoint), re-signs it, and runs
``Checkpointer.restore`` and ``recoverkit verify`` in child processes with a timeout and an
address-space limit (``tests/faults/hostile.py``). Whatever the mutation:

* no death by signal, no hang, bounded memory, no traceback;
* restore returns step 2 with exactly step 2's values (a harmless mutation), or step 1
  with exactly step 1's values and a warning, or raises a recoverkit incompatibility with
  the live objects untouched -- never other values, never a raw builtin error;
* verify exits 0 or 1 with step 1 ok, and agrees with restore: a step restore had to skip
  is not reported ok, and a step verify reports ok is the one restore returns.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.faults.hostile import TAG, Base, Case, Runner, assert_survived, build_base, sign

_INTS = st.one_of(st.integers(-3, 70_000),
                  st.sampled_from([2**31, 2**32 - 1, 2**32, 2**63, -(2**63), 1 << 40, 10**400]))
_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([12288.0, 0.5, -0.0]))
_TEXTS = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["rank-00000.seg", "../rank-00000.seg", "/dev/zero", "rank-00000.seg\x00", "rank-00001.seg",
                     "float32", "int32", "uint8", "float64", "model/weight", "model/bias", "__rng__/torch",
                     "0x00000000", "recoverkit", "step-000000001", ""]),
)
_LEAVES = st.one_of(st.none(), st.booleans(), _INTS, _FLOATS, _TEXTS)
_VALUES = st.recursive(_LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXTS, inner, max_size=3),
                       max_leaves=6)
_KEYS = st.one_of(_TEXTS, st.sampled_from(["alias_of", "held", "shards", "offsets", "crc32c", "nbytes", "file",
                                           "checksum", "pickled", "world_size", "files"]))

Path = tuple[Any, ...]


def _paths(node: Any, prefix: Path = ()) -> Iterator[Path]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _at(node: Any, path: Path) -> Any:
    for p in path:
        node = node[p]
    return node


def mutate(body: Any, data: st.DataObject) -> tuple[Any, list[str]]:
    """Apply 1-3 random edits to ``body``; return it and a description of each."""
    done = []
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = data.draw(st.sampled_from(list(_paths(body))), label="path")
        op = data.draw(st.sampled_from(["replace", "delete", "insert"]), label="op")
        node = _at(body, path)
        if op == "delete" and path:
            parent = _at(body, path[:-1])
            del parent[path[-1]]
        elif op == "insert" and isinstance(node, dict):
            key, value = data.draw(_KEYS, label="key"), data.draw(_VALUES, label="value")
            node[key] = value
            path += (key,)
        elif op == "insert" and isinstance(node, list):
            i, value = data.draw(st.integers(0, len(node)), label="index"), data.draw(_VALUES, label="value")
            node.insert(i, value)
            path += (i,)
        else:
            op, value = "replace", data.draw(_VALUES, label="value")
            if path:
                _at(body, path[:-1])[path[-1]] = value
            else:
                body = value
        done.append(f"{op} {list(path)!r}")
    return body, done


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return build_base(str(tmp_path_factory.mktemp("hostile-props-base")))


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    r = Runner("native")
    yield r
    r.close()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("hostile-props"))


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],  # no shrinking: each failure lists its edits
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_manifest_is_restored_or_skipped_and_verify_agrees(base: Base, runner: Runner, scratch: str,
                                                                   data: st.DataObject) -> None:
    where = tempfile.mkdtemp(dir=scratch)
    try:
        c = Case(base, os.path.join(where, "case"))
        body, edits = mutate(c.load(), data)
        text = json.dumps(sign(body) if isinstance(body, dict) else body, indent=1)
        c.write_raw(text.encode("utf-8"))
        note = f"edits: {edits}\nmanifest: {text[:3000]}"

        o = runner.restore(c.root, c.ref, cwd=c.dir)
        assert_survived(o)
        assert "manifest checksum mismatch" not in str(o.result), f"the mutation was not re-signed: {o}\n{note}"
        r = o.result
        if r["error"] is not None:
            assert r["error"]["type"] in ("IncompatibleCheckpointError", "PickleNotAllowedError"), f"{o}\n{note}"
            assert r["holds"] == ["initial"], f"live objects changed before the error: {o}\n{note}"
        elif r["step"] == 2:
            assert r["holds"] == ["2"] and r["tag"] == TAG.format(2), f"step 2 came back with other values: {o}\n{note}"
        else:
            assert r["step"] == 1 and r["holds"] == ["1"], f"{o}\n{note}"
            assert any("step-000000002" in w for w in r["warnings"]), f"step 2 skipped silently: {o}\n{note}"

        v = runner.cli("verify", c.root, "--json", cwd=c.dir)
        assert_survived(v)
        assert v.returncode in (0, 1), f"{v}\n{note}"
        try:
            ok = {s["step"]: s["ok"] for s in json.loads(v.stdout)["steps"]}
        except (ValueError, KeyError, TypeError):
            raise AssertionError(f"verify printed no report: {v}\n{note}") from None
        assert ok.get(1) is True, f"{v}\n{note}"
        assert v.returncode == (0 if all(ok.values()) else 1), f"{v}\n{note}"
        if r["error"] is None and r["step"] == 1:
            assert ok.get(2) is not True, f"restore skipped step 2 but verify calls it ok: {o}\n{v}\n{note}"
        if ok.get(2) is True and r["error"] is None:
            assert r["step"] == 2, f"verify calls step 2 ok but restore skipped it: {o}\n{v}\n{note}"
    finally:
        shutil.rmtree(where, ignore_errors=True)
