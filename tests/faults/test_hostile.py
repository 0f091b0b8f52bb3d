"""Hostile and damaged checkpoints against every entry point that reads one.

Each attack edits the newest step (2) of a real checkpoint -- its manifest edited and
re-signed, its blob rewritten with a matching CRC, or a file replaced by a FIFO or a
symlink -- while step 1 stays good. Every (attack, entry point) pair is one test that runs
the entry point in a child process with a timeout and an address-space limit
(``tests/faults/hostile.py``) and asserts: no death by signal, no hang, bounded memory, no
traceback, nothing from outside the root in any output, and

* ``Checkpointer.restore`` (native and pure-Python engines): step 2 is skipped with a
  warning and the live objects hold exactly step 1's values;
* ``recoverkit verify ROOT``: exit 1, step 2 reported not ok, step 1 ok;
* ``recoverkit ls ROOT --verify``: exit 1, step 2 damaged or corrupt, step 1 verified;
* ``recoverkit inspect ROOT --step 2`` and ``recoverkit restore ROOT --step 2 --to ...``
  (torch, safetensors, dcp, ``--world-size 2``): one ``recoverkit: error:`` line, exit 1.

Attacks on root-level files (``latest``, ``.lock``) leave both steps intact: readers must
work normally. Planted ``.lock`` symlinks and leftover ``.tmp-*``/``.trash-*`` symlinks get
their own tests below.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from tests.faults.hostile import (
    CANARY_TAG,
    MANIFEST,
    SEG,
    TAG,
    Base,
    Case,
    Runner,
    assert_no_canary_in,
    assert_one_line_error,
    assert_survived,
    build_base,
    crc,
    sign,
)

Attack = Callable[[Case], None]
STEP_ATTACKS: dict[str, Attack] = {}


def attack(name: str) -> Callable[[Attack], Attack]:
    def register(fn: Attack) -> Attack:
        STEP_ATTACKS[name] = fn
        return fn
    return register


def edit(name: str, change: Callable[[Case, dict[str, Any]], None]) -> None:
    """An attack that edits step 2's manifest with ``change(case, body)`` and re-signs it."""
    def run(c: Case) -> None:
        body = c.load()
        change(c, body)
        c.store(body)
    STEP_ATTACKS[name] = run


def weight(c: Case, b: dict[str, Any]) -> dict[str, Any]:
    return c.shard(b, "model/weight")


def setw(**fields: Any) -> Callable[[Case, dict[str, Any]], None]:
    return lambda c, b: weight(c, b).update(fields)


# ------------------------------------------------------------- shard geometry (issue #1)
def _scalar_4mb(c: Case, b: dict[str, Any]) -> None:
    data = bytes(range(256)) * (4 << 12)
    off = c.append(b, data)
    c.shard(b, "optim/state/0/step").update(offset=off, nbytes=len(data), crc32c=crc(data))


def _bias_scalars(positions: list[int]) -> Callable[[Case, dict[str, Any]], None]:
    """model/bias ([3]) as shards of shape [] at ``offsets: [k]``."""
    def change(c: Case, b: dict[str, Any]) -> None:
        s = c.shard(b, "model/bias")
        b["tensors"]["model/bias"]["shards"] = [
            {**s, "offset": s["offset"] + 4 * i, "nbytes": 4, "crc32c": crc(c.read(s["offset"] + 4 * i, 4)),
             "offsets": [k], "shape": []}
            for i, k in enumerate(positions)
        ]
    return change


def _overlap_uncovered(c: Case, b: dict[str, Any]) -> None:
    w = weight(c, b)  # [3, 4]: rows 0-1 and row 0 again; row 2 never written, 48 bytes in all
    b["tensors"]["model/weight"]["shards"] = [
        {**w, "nbytes": 32, "crc32c": crc(c.read(w["offset"], 32)), "offsets": [0, 0], "shape": [2, 4]},
        {**w, "nbytes": 16, "crc32c": crc(c.read(w["offset"], 16)), "offsets": [0, 0], "shape": [1, 4]},
    ]


def _nbytes(n: int) -> Callable[[Case, dict[str, Any]], None]:
    return lambda c, b: weight(c, b).update(nbytes=n, crc32c=crc(c.read(weight(c, b)["offset"], n)))


edit("scalar-with-4mb-region", _scalar_4mb)
edit("scalar-shards-in-1d", _bias_scalars([0, 1, 2]))
edit("scalar-shard-heap-offset", _bias_scalars([0, 1, 8]))  # 20 bytes past a 12-byte buffer: heap corruption
edit("scalar-shard-far-offset", _bias_scalars([0, 1, 1 << 20]))
edit("offsets-rank-differs", setw(offsets=[0]))
edit("shard-rank-differs", lambda c, b: weight(c, b).update(offsets=[0], shape=[12]))
edit("shard-outside-shape", setw(offsets=[1, 0]))
edit("shard-negative-offset", setw(offsets=[-1, 0]))
edit("overlap-leaves-hole", _overlap_uncovered)
edit("nbytes-short", _nbytes(44))
edit("nbytes-long", _nbytes(52))
edit("region-past-eof", lambda c, b: c.shard(b, "model/bias").update(offset=b["files"][SEG] + 4096))
edit("files-size-larger", lambda c, b: b["files"].update({SEG: b["files"][SEG] + 4096}))


# ------------------------------------------------------------- reads outside the root (#3)
def _elsewhere(where: Callable[[Case], tuple[str, str]], what: str) -> Attack:
    """Point the weight shard or the blob at ``name`` (listed in ``files``), a canary copy
    of the segment at ``path`` whose CRCs match."""
    def run(c: Case) -> None:
        b = c.load()
        path, name = where(c)
        crcs = c.canary_copy(path, b)
        rec = weight(c, b) if what == "shard" else b["blobs"][0]
        rec.update(file=name, crc32c=crcs["weight" if what == "shard" else "blob"])
        b["files"][name] = os.path.getsize(path)
        c.store(b)
    return run


def _dotdot(c: Case) -> tuple[str, str]:
    return os.path.join(c.dir, "work", "x"), "../../x"


def _absolute(c: Case) -> tuple[str, str]:
    path = os.path.join(c.outside, "abs.seg")
    return path, path


for _what in ("shard", "blob"):
    STEP_ATTACKS[f"{_what}-file-dotdot"] = _elsewhere(_dotdot, _what)
    STEP_ATTACKS[f"{_what}-file-absolute"] = _elsewhere(_absolute, _what)


@attack("shard-file-not-listed")
def _not_listed(c: Case) -> None:
    b = c.load()
    crcs = c.canary_copy(c.path("rank-00001.seg"), b)  # planted next to the real segment
    weight(c, b).update(file="rank-00001.seg", crc32c=crcs["weight"])
    c.store(b)


def _nul_name(c: Case, b: dict[str, Any]) -> None:
    weight(c, b)["file"] = SEG + "\x00x"  # a C string ends at the NUL: the real segment
    b["files"][SEG + "\x00x"] = b["files"][SEG]


edit("shard-file-nul", _nul_name)


@attack("segment-symlink-outside")
def _segment_symlink(c: Case) -> None:
    b = c.load()
    target = os.path.join(c.outside, "copy.seg")
    crcs = c.canary_copy(target, b)
    c.replace(c.path(SEG), lambda p: os.symlink(target, p))
    weight(c, b)["crc32c"] = crcs["weight"]
    b["blobs"][0]["crc32c"] = crcs["blob"]
    c.store(b)


# ------------------------------------------------------------- CRC values (#4)
edit("crc-minus-1", setw(crc32c=-1))
edit("crc-2pow32-plus-crc", lambda c, b: weight(c, b).update(crc32c=weight(c, b)["crc32c"] + 2**32))
edit("crc-string-zero", setw(crc32c="0"))
edit("crc-string-digits", lambda c, b: weight(c, b).update(crc32c=str(weight(c, b)["crc32c"])))
edit("crc-float", lambda c, b: weight(c, b).update(crc32c=float(weight(c, b)["crc32c"])))
edit("blob-crc-minus-1", lambda c, b: b["blobs"][0].update(crc32c=-1))


# ------------------------------------------------------------- memory bombs (#5)
edit("blob-claims-3gib", lambda c, b: b["blobs"][0].update(nbytes=3 << 30))
edit("blob-claims-8gib", lambda c, b: b["blobs"][0].update(nbytes=8 << 30))
edit("world-size-10e12", lambda c, b: b.update(world_size=10**12))


@attack("segment-is-dev-zero-huge")
def _dev_zero(c: Case) -> None:
    b = c.load()
    side = 1 << 19  # float32 [2**19, 2**19]: 1 TiB, consistent everywhere but in the file
    w = weight(c, b)
    w.update(nbytes=4 * side * side, shape=[side, side])
    b["tensors"]["model/weight"]["shape"] = [side, side]
    b["files"][SEG] = w["offset"] + w["nbytes"]
    c.replace(c.path(SEG), lambda p: os.symlink("/dev/zero", p))
    c.store(b)


STEP_ATTACKS["manifest-is-dev-zero"] = lambda c: c.replace(c.path(MANIFEST), lambda p: os.symlink("/dev/zero", p))


# ------------------------------------------------------------- special files (#6)
STEP_ATTACKS["manifest-is-fifo"] = lambda c: c.replace(c.path(MANIFEST), os.mkfifo)
STEP_ATTACKS["segment-is-fifo"] = lambda c: c.replace(c.path(SEG), os.mkfifo)


# ------------------------------------------------------------- damaged fields (#7)
def _raw(c: Case, text: str) -> None:
    c.write_raw(text.encode("utf-8"))


@attack("duplicate-keys")
def _duplicate_keys(c: Case) -> None:
    text = json.dumps(sign(c.load()), indent=1)  # the last "world_size" wins and is signed
    assert text.count('"world_size": 1,') == 1
    _raw(c, text.replace('"world_size": 1,', '"world_size": 1000000000000, "world_size": 1,'))


@attack("deep-nesting")
def _deep(c: Case) -> None:
    """user_meta nested 100,000 lists deep, correctly signed (the CRC is over the text)."""
    deep = "[" * 100_000 + "]" * 100_000
    body = {**c.load(), "user_meta": "@DEEP@"}
    body.pop("checksum")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).replace('"@DEEP@"', deep)
    body["checksum"] = f"0x{crc(canonical.encode()):08x}"
    _raw(c, json.dumps(body, indent=1).replace('"@DEEP@"', deep))


edit("step-string", lambda c, b: b.update(step="2"))
edit("world-size-string", lambda c, b: b.update(world_size="1"))
edit("pickled-string", lambda c, b: b.update(pickled="false"))
edit("offset-string", lambda c, b: weight(c, b).update(offset=str(weight(c, b)["offset"])))
edit("offset-float", lambda c, b: weight(c, b).update(offset=float(weight(c, b)["offset"])))
edit("offsets-bools", setw(offsets=[False, False]))
edit("rank-bool", setw(rank=False))
edit("shape-string", lambda c, b: b["tensors"]["model/weight"].update(shape="34"))
edit("created-nan", lambda c, b: b.update(created_unix=float("nan")))
edit("created-infinity", lambda c, b: b.update(created_unix=float("inf")))
edit("nbytes-infinity", setw(nbytes=float("inf")))
edit("nbytes-nan", setw(nbytes=float("nan")))
edit("huge-int-offset", setw(offset=10**400))
edit("huge-int-file-size", lambda c, b: b["files"].update({SEG: 10**400}))
edit("huge-int-shape", lambda c, b: b["tensors"]["model/weight"].update(shape=[10**400, 4]))
edit("tensors-is-list", lambda c, b: b.update(tensors=[]))
edit("blobs-is-dict", lambda c, b: b.update(blobs={"0": b["blobs"][0]}))
edit("blobs-empty", lambda c, b: b.update(blobs=[]))
edit("files-is-list", lambda c, b: b.update(files=[[SEG, b["files"][SEG]]]))
edit("files-is-null", lambda c, b: b.update(files=None))
edit("tensor-is-string", lambda c, b: b["tensors"].update({"model/weight": "oops"}))
edit("shards-is-dict", lambda c, b: b["tensors"]["model/weight"].update(shards={"0": weight(c, b)}))
edit("user-meta-is-list", lambda c, b: b.update(user_meta=[1, 2, 3]))


def _alias(pairs: dict[str, str]) -> Callable[[Case, dict[str, Any]], None]:
    def change(c: Case, b: dict[str, Any]) -> None:
        for key, target in pairs.items():
            rec = b["tensors"][key]
            b["tensors"][key] = {"dtype": rec["dtype"], "shape": rec["shape"], "alias_of": target}
    return change


edit("alias-cycle", _alias({"model/weight": "model/bias", "model/bias": "model/weight"}))
edit("alias-self", _alias({"model/weight": "model/weight"}))
edit("alias-missing", _alias({"model/weight": "model/nope"}))


# ------------------------------------------------------------- damaged blobs (valid CRC)
def blob(name: str, make: Callable[[Case, dict[str, Any]], bytes]) -> None:
    def run(c: Case) -> None:
        b = c.load()
        c.rewrite_blob(b, make(c, b))
        c.store(b)
    STEP_ATTACKS[name] = run


def _tree(change: Callable[[dict[str, Any]], None]) -> Callable[[Case, dict[str, Any]], bytes]:
    def make(c: Case, b: dict[str, Any]) -> bytes:
        tree = c.blob_tree(b)
        change(tree["root"])
        return json.dumps(tree, separators=(",", ":")).encode()
    return make


blob("blob-garbage-json", lambda c, b: b"{this is not JSON " + bytes(range(256)))
blob("blob-not-utf8", lambda c, b: b"\xff\xfe\xfd" * 100)
blob("blob-is-list", lambda c, b: b"[1, 2, 3]")
blob("blob-without-root", lambda c, b: b'{"codec": "recoverkit-json", "version": 1}')
blob("blob-nan", lambda c, b: b'{"codec": "recoverkit-json", "version": 1, "root": {"extra": NaN}}')
blob("blob-deep-nesting", lambda c, b: b'{"codec":"recoverkit-json","version":1,"root":' + b"[" * 5000 + b"]" * 5000 + b"}")
blob("blob-odict-not-list", _tree(lambda r: r.update(model={"$odict": 5})))
blob("blob-unknown-tensor-key", _tree(lambda r: r["model"]["$odict"][0].__setitem__(1, {"$tensor": "model/nope"})))
blob("blob-bytes-not-string", _tree(lambda r: r.update(extra={"$bytes": 12345})))
blob("blob-ndarray-huge-shape", _tree(lambda r: r.update(extra={"$ndarray": ["<f4", [10**12, 10**12], ""]})))


# ------------------------------------------------------------- root-level attacks
def _step_dir_symlink(c: Case) -> None:
    """``step-000000003`` is a symlink to a directory outside the root holding a step that
    verifies (its CRCs match its canary bytes)."""
    import shutil

    target = os.path.join(c.outside, "step3")
    shutil.copytree(c.step_dir(2), target)
    b = c.load()
    crcs = c.canary_copy(os.path.join(target, SEG), b)
    weight(c, b)["crc32c"], b["blobs"][0]["crc32c"], b["step"] = crcs["weight"], crcs["blob"], 3
    os.unlink(os.path.join(target, MANIFEST))
    with open(os.path.join(target, MANIFEST), "w") as f:
        json.dump(sign(b), f)
    os.symlink(target, os.path.join(c.root, "step-000000003"))


ROOT_ATTACKS: dict[str, Attack] = {
    "latest-is-fifo": lambda c: c.replace(os.path.join(c.root, "latest"), os.mkfifo),
    "lock-is-fifo": lambda c: c.replace(os.path.join(c.root, ".lock"), os.mkfifo),
    "step-dir-symlink-outside": _step_dir_symlink,
}
#: a step whose manifest.json is not a regular file may be "not a step" (never listed)
#: rather than a damaged one: both refuse it without opening it
MAY_VANISH = {"manifest-is-fifo", "manifest-is-dev-zero"}

ENTRIES = ["restore", "restore-python", "verify", "ls", "inspect", "torch", "safetensors", "dcp", "reshard"]
EXPORTS = {"torch": ["--format", "torch"], "safetensors": ["--format", "safetensors"], "dcp": ["--format", "dcp"],
           "reshard": ["--world-size", "2"]}


# ------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return build_base(str(tmp_path_factory.mktemp("hostile-base")))


@pytest.fixture(scope="module")
def runners() -> Any:
    made: dict[str, Runner] = {}

    def get(engine: str = "native") -> Runner:
        if engine not in made:
            made[engine] = Runner(engine)
        return made[engine]

    yield get
    for r in made.values():
        r.close()


@pytest.fixture
def case(base: Base, tmp_path: Any) -> Case:
    return Case(base, str(tmp_path / "case"))


def _json(o: Any) -> Any:
    try:
        return json.loads(o.stdout)
    except ValueError:
        raise AssertionError(f"stdout is not one JSON document: {o}") from None


def run_entry(runners: Any, c: Case, entry: str, *, step: int | None) -> Any:
    """Run ``entry`` against the case's root; ``step`` is passed to inspect and exports."""
    if entry.startswith("restore"):
        return runners("python" if entry == "restore-python" else "native").restore(c.root, c.ref, cwd=c.dir)
    r = runners()
    pick = ["--step", str(step)] if step is not None else []
    if entry == "verify":
        return r.cli("verify", c.root, "--json", cwd=c.dir)
    if entry == "ls":
        return r.cli("ls", c.root, "--verify", "--json", cwd=c.dir)
    if entry == "inspect":  # tables decode the object state; --json shows it raw
        return r.cli("inspect", c.root, *pick, "--shards", *([] if step else ["--json"]), cwd=c.dir)
    return r.cli("restore", c.root, *pick, "--to", os.path.join(c.out, entry), *EXPORTS[entry], "--json", cwd=c.dir)


def states(doc: Any) -> dict[int, str]:
    return {s["step"]: s["tiers"]["local"]["state"] for s in doc["steps"]}


# ------------------------------------------------------------- the matrix
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name", sorted(STEP_ATTACKS))
def test_damaged_newest_step(runners: Any, case: Case, name: str, entry: str) -> None:
    STEP_ATTACKS[name](case)
    o = run_entry(runners, case, entry, step=2)
    assert_survived(o)
    assert_no_canary_in([case.out])
    assert "manifest checksum mismatch" not in f"{o.stdout}{o.stderr}{o.result}", f"attack not re-signed: {o}"
    vanish = name in MAY_VANISH
    if entry.startswith("restore"):
        r = o.result
        assert r.get("error") is None, f"an error escaped instead of falling back to step 1: {o}"
        assert r["step"] == 1 and r["holds"] == ["1"] and r["tag"] == TAG.format(1), f"not step 1's values: {o}"
        assert not r["canary"]
        warned = any("CheckpointSkippedWarning" in w and "step-000000002" in w for w in r["warnings"])
        assert warned or vanish, f"step 2 skipped without a warning: {o}"
    elif entry == "verify":
        ok = {s["step"]: s["ok"] for s in _json(o)["steps"]}
        if vanish and ok == {1: True}:
            assert o.returncode == 0, str(o)
        else:
            assert o.returncode == 1 and ok == {1: True, 2: False}, f"verify verdicts {ok}: {o}"
    elif entry == "ls":
        found = states(_json(o))
        if vanish and found == {1: "verified"}:
            assert o.returncode == 0, str(o)
        else:
            assert o.returncode == 1, f"ls --verify must fail: {o}"
            assert found.get(1) == "verified" and found.get(2) in ("damaged", "corrupt"), f"ls states {found}: {o}"
    else:
        assert_one_line_error(o, (1, 3) if vanish else (1,))


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name", sorted(ROOT_ATTACKS))
def test_special_file_in_root(runners: Any, case: Case, name: str, entry: str) -> None:
    """``latest`` and ``.lock`` as FIFOs, a step directory that is a symlink out of the root:
    nothing blocks, nothing outside is read; readers work on the intact steps 1 and 2."""
    ROOT_ATTACKS[name](case)
    o = run_entry(runners, case, entry, step=None)
    assert_survived(o)
    assert_no_canary_in([case.out])
    if entry.startswith("restore"):
        r = o.result
        if name == "lock-is-fifo":  # a non-regular .lock: nobody can take the root's lock
            assert r["error"] and r["error"]["recoverkit"] and ".lock" in r["error"]["message"], str(o)
            assert r["holds"] == ["initial"], f"live objects changed: {o}"
        else:
            assert r.get("error") is None and r["step"] == 2 and r["holds"] == ["2"] and not r["canary"], str(o)
        return
    doc = _json(o)
    if entry in ("verify", "ls"):
        # steps 1 and 2 check out; anything else listed (the symlinked step) must not
        found = ({s["step"]: s["ok"] for s in doc["steps"]} if entry == "verify"
                 else {s: v == "verified" for s, v in states(doc).items()})
        assert found.get(1) is True and found.get(2) is True and not any(v for k, v in found.items() if k > 2), str(o)
        assert o.returncode == (0 if len(found) == 2 else 1), str(o)
        return
    assert o.returncode == 0 and doc["step"] == 2, str(o)
    if entry == "torch":
        got = torch.load(os.path.join(case.out, "torch"), weights_only=True)
        want = torch.load(case.ref, weights_only=True)["2"]["model/weight"]
        assert torch.equal(got["model"]["weight"], want) and got["extra"]["tag"] == TAG.format(2)


# ------------------------------------------------------------- all or nothing (#8)
@pytest.mark.parametrize("engine", ["native", "python"])
def test_bad_rng_entry_changes_nothing(runners: Any, case: Case, engine: str) -> None:
    """A random state that cannot be loaded (valid CRC) is found before any live object
    changes: restore falls back to step 1, or raises a recoverkit error with the model and
    optimizer untouched -- never step 2's weights with the error."""
    b = case.load()
    tree = case.blob_tree(b)
    tree["root"]["__rng__"]["python"] = {"$tuple": [3, {"$tuple": [1, 2, 3]}, None]}
    case.rewrite_blob(b, json.dumps(tree, separators=(",", ":")).encode())
    case.store(b)
    o = runners(engine).restore(case.root, case.ref, cwd=case.dir)
    assert_survived(o)
    r = o.result
    if r["error"] is None:
        assert r["step"] == 1 and r["holds"] == ["1"], f"not step 1's values: {o}"
    else:
        assert r["error"]["recoverkit"], f"raw error: {o}"
        assert r["holds"] == ["initial"], f"the live objects changed before the error: {o}"


# ------------------------------------------------------------- planted symlinks (#9, lower)
VICTIM = b"precious bytes that are not ours\n"


def _victim(c: Case) -> str:
    path = os.path.join(c.outside, "victim.txt")
    with open(path, "wb") as f:
        f.write(VICTIM)
    os.chmod(path, 0o644)
    return path


def _unchanged(path: str) -> None:
    with open(path, "rb") as f:
        assert f.read() == VICTIM, f"{path} was changed through a planted symlink"


def test_lock_symlink_checkpointer(runners: Any, case: Case) -> None:
    victim = _victim(case)
    case.replace(os.path.join(case.root, ".lock"), lambda p: os.symlink(victim, p))
    o = runners().restore(case.root, case.ref, cwd=case.dir)
    assert_survived(o)
    _unchanged(victim)
    err = o.result["error"]
    assert err is None or err["recoverkit"], f"raw error from Checkpointer(root): {o}"
    assert os.path.islink(os.path.join(case.root, ".lock")), "the planted link was replaced, not refused"


def test_lock_symlink_gc(runners: Any, case: Case) -> None:
    victim = _victim(case)
    case.replace(os.path.join(case.root, ".lock"), lambda p: os.symlink(victim, p))
    o = runners().cli("gc", case.root, "--keep-last", "1", "--yes", cwd=case.dir)
    assert_survived(o)
    _unchanged(victim)
    if o.returncode != 0:
        assert_one_line_error(o, (1, 5, 6))


def test_lock_symlink_in_restore_target(runners: Any, case: Case) -> None:
    victim = _victim(case)
    target = os.path.join(case.out, "resharded")
    os.makedirs(target)
    os.symlink(victim, os.path.join(target, ".lock"))
    o = runners().cli("restore", case.root, "--to", target, "--world-size", "2", "--force", cwd=case.dir)
    assert_survived(o)
    _unchanged(victim)
    if o.returncode != 0:
        assert_one_line_error(o, (1, 2, 5, 6))


def _leftover_links(c: Case) -> tuple[list[str], dict[str, bytes]]:
    """``.tmp-*``/``.trash-*`` symlinks to a directory and a file outside the root."""
    d = os.path.join(c.outside, "dir")
    os.makedirs(d)
    f = os.path.join(c.outside, "file.bin")
    for path in (os.path.join(d, "inner.bin"), f):
        with open(path, "wb") as out:
            out.write(VICTIM)
    links = []
    for name, target in ((".tmp-step-000000003-deadbeef", d), (".trash-step-000000001-cafebabe", f),
                         (".tmp-step-000000004-0badf00d", f), (".trash-step-000000005-feedface", d)):
        links.append(os.path.join(c.root, name))
        os.symlink(target, links[-1])
    return links, {os.path.join(d, "inner.bin"): VICTIM, f: VICTIM}


def _links_gone_targets_kept(links: list[str], targets: dict[str, bytes]) -> None:
    assert not [p for p in links if os.path.lexists(p)], "leftover symlinks were not removed"
    for path, data in targets.items():
        with open(path, "rb") as f:
            assert f.read() == data, f"{path} (a leftover link's target) was touched"


def test_leftover_symlinks_at_startup(runners: Any, case: Case) -> None:
    links, targets = _leftover_links(case)
    o = runners().restore(case.root, case.ref, cwd=case.dir)
    assert_survived(o)
    assert o.result["error"] is None and o.result["step"] == 2 and o.result["holds"] == ["2"], str(o)
    _links_gone_targets_kept(links, targets)


def test_leftover_symlinks_gc(runners: Any, case: Case) -> None:
    links, targets = _leftover_links(case)
    o = runners().cli("gc", case.root, "--keep-last", "2", "--yes", cwd=case.dir)
    assert_survived(o)
    assert o.returncode == 0, str(o)
    _links_gone_targets_kept(links, targets)


def test_resigned_manifest_is_accepted(runners: Any, case: Case) -> None:
    """The attacks re-sign the way readers check: an edit that changes nothing that matters
    (user_meta) is restored and verifies, so every refusal above is the reader's own."""
    b = case.load()
    b["user_meta"] = {"edited": True}
    case.store(b)
    o = runners().restore(case.root, case.ref, cwd=case.dir)
    assert_survived(o)
    assert o.result["error"] is None and o.result["step"] == 2 and o.result["holds"] == ["2"], str(o)
    v = runners().cli("verify", case.root, "--json", cwd=case.dir)
    assert v.returncode == 0 and _json(v)["ok"], str(v)


def test_canary_copy_really_verifies(base: Base, tmp_path: Any) -> None:
    """The attacks' canary copies carry CRCs that match, so only a path check stops them."""
    c = Case(base, str(tmp_path / "c"))
    b = c.load()
    path = os.path.join(c.outside, "x.seg")
    crcs = c.canary_copy(path, b)
    with open(path, "rb") as f:
        data = f.read()
    w, bl = weight(c, b), b["blobs"][0]
    assert crc(data[w["offset"]:w["offset"] + w["nbytes"]]) == crcs["weight"]
    assert np.frombuffer(data[w["offset"]:w["offset"] + 8], "<f4").tolist() == [31337.0, 31337.0]
    assert CANARY_TAG.encode() in data[bl["offset"]:bl["offset"] + bl["nbytes"]]
