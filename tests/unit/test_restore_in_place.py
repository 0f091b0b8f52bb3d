"""Restore from memory in place (issue 12): a step a tier holds in memory is verified, then
copied straight into the live tensors.

Real Checkpointers, real host snapshots in the staging pool, real bytes corrupted in pool
memory. What is checked: the restore is bit-exact (parameters, buffers, optimizer state,
plain tensors), keeps every live tensor object and its storage (optimizer state included,
which the copy path replaces), is all or nothing (a corrupted region or a target that does
not fit changes nothing), targets that cannot take the bytes in place (another dtype,
a strided view, non-tensor owners) get them through the copy path, and a fresh optimizer
without state gets its state tensors built new (see also test_restore_restarted.py). A tier
whose views are verified already (``views_verified``) is trusted; any other tier's views are
checked.
"""

from __future__ import annotations

import copy
import ctypes
import os

import pytest
import torch

from recoverkit import Checkpointer, CheckpointOptions, CheckpointReader, TierSpec
from recoverkit.config import StagingPolicy
from recoverkit.errors import CheckpointNotFoundError, IncompatibleCheckpointError, IntegrityError
from recoverkit.format.checksum import crc32c
from recoverkit.format.manifest import BlobRecord, ShardRecord
from recoverkit.restore.apply import apply_restored
from recoverkit.restore.in_place import CHUNK_BYTES, PendingTensor, Unit, verify
from recoverkit.restore.reader import in_place_reads, read_state
from recoverkit.storage.base import ReadableTier
from recoverkit.storage.discovery import CheckpointSkippedWarning
from tests.native.helpers import load_backend

HOST_ONLY = [TierSpec.host(keep=2), TierSpec.local(every_steps=None)]


def _opts(tiers=HOST_ONLY, **kw):
    return CheckpointOptions(tiers=tiers, staging=StagingPolicy(budget_bytes=64 << 20), **kw)


def _make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256), torch.nn.ReLU(), torch.nn.Linear(256, 8)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 64, generator=g)).square().mean().backward()
        opt.step()


def _tensors(state):
    """Every live tensor a restore writes, by name: (object, values cloned)."""
    model, opt = state["model"], state["optim"]
    out = {f"model/{k}": v for k, v in model.state_dict(keep_vars=True).items()}
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        for k, v in opt.state[p].items():
            out[f"optim/{i}/{k}"] = v
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = v
    return out


def _snapshot(state):
    return {k: (v, v.detach().clone(), v.data_ptr()) for k, v in _tensors(state).items()}


def _assert_restored(state, saved, *, same_objects=True):
    now = _tensors(state)
    assert set(now) == set(saved)
    for k, (obj, values, ptr) in saved.items():
        t = now[k]
        assert t.dtype == values.dtype and torch.equal(t.detach(), values), k
        if same_objects:
            assert t is obj and t.data_ptr() == ptr, f"{k}: not restored in place"


def _saved_and_moved_on(ckpt, state, step=3):
    """Save ``step`` (host snapshot only), remember it, train further."""
    _train(state["model"], state["optim"], 2)
    ckpt.save_async(step, state).wait()
    ckpt.wait()
    saved = _snapshot(state)
    _train(state["model"], state["optim"], 3, seed=7)
    with torch.no_grad():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                v.add_(1)
    return saved


def _corrupt_pool(ckpt, step, which=0):
    """Flip one byte of a staged shard of ``step`` in pool memory (largest shards first)."""
    snap = ckpt.tiers["host"].snapshot(step)
    entries = sorted(snap.entries, key=lambda e: -e[2])
    _, off, n, _ = entries[which]
    byte = ctypes.c_ubyte.from_address(snap.address(off) + n // 2)
    byte.value ^= 0x5A


# --------------------------------------------------------------------------- in place
def test_restore_from_host_memory_is_bit_exact_and_in_place(root):
    model, opt = _make()
    state = {"model": model, "optim": opt, "scale": torch.arange(10, dtype=torch.float64)}
    with Checkpointer(root, options=_opts()) as ckpt:
        saved = _saved_and_moved_on(ckpt, state)
        groups = [list(g["params"]) for g in opt.param_groups]
        with in_place_reads():
            assert ckpt.restore(state) == 3
        _assert_restored(state, saved)
        # the optimizer still refers to the module's own parameters, its state to live tensors
        assert [list(g["params"]) for g in opt.param_groups] == groups
        assert all(p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters()))
        # and training goes on from there exactly as from a fresh copy of the saved state
        twin_model, twin_opt = _make()
        twin_model.load_state_dict(model.state_dict())
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        _train(model, opt, 2, seed=9)
        _train(twin_model, twin_opt, 2, seed=9)
        for a, b in zip(model.parameters(), twin_model.parameters()):
            assert torch.equal(a, b)


def test_the_copy_path_replaces_optimizer_state_the_in_place_one_does_not(root):
    """What in place means: the same restore without it gives new optimizer state tensors."""
    model, opt = _make()
    state = {"model": model, "optim": opt}
    with Checkpointer(root, options=_opts()) as ckpt:
        saved = _saved_and_moved_on(ckpt, state)
        CheckpointReader(root, tiers=list(ckpt.tiers.values()), in_place=False).restore(state)
        _assert_restored(state, saved, same_objects=False)
        moved = [k for k, (obj, _, _) in saved.items() if _tensors(state)[k] is not obj]
        assert moved and all(k.startswith("optim/") for k in moved)


def test_a_parameter_entry_and_tied_weights_stay_the_same_objects(root):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(32, 16)
    head = torch.nn.Linear(16, 32, bias=False)
    head.weight = emb.weight  # tied: saved once, restored into the one tensor
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    free = torch.nn.Parameter(torch.randn(5, 3))
    state = {"model": model, "optim": opt, "free": free}
    with Checkpointer(root, options=_opts()) as ckpt:
        opt.zero_grad()
        model["head"](model["emb"](torch.arange(4))).sum().backward()
        opt.step()
        ckpt.save_async(1, state).wait()
        ckpt.wait()
        saved = {k: v.detach().clone() for k, v in _tensors(state).items()}
        ids = {k: id(v) for k, v in _tensors(state).items()}
        with torch.no_grad():
            emb.weight.mul_(3)
            free.zero_()
        with in_place_reads():
            ckpt.restore(state)
        assert state["free"] is free and head.weight is emb.weight
        for k, v in _tensors(state).items():
            assert id(v) == ids[k] and torch.equal(v.detach(), saved[k]), k


def test_empty_tensors_packed_next_to_small_ones_do_not_hide_them(root):
    """An empty shard may share its pool offset with the next small one; both restore."""
    names = ["a", "e0", "b", "e1", "c", "e2"]
    state = {n: (torch.empty(0) if n.startswith("e") else torch.arange(3.0) + ord(n)) for n in names}
    with Checkpointer(root, options=_opts(capture_rng=False)) as ckpt:
        ckpt.save_async(1, state).wait()
        ckpt.wait()
        saved = {n: (t, t.clone()) for n, t in state.items()}
        for n in ("a", "b", "c"):
            state[n].zero_()
        with in_place_reads():
            ckpt.restore(state)
    for n, (obj, values) in saved.items():
        assert state[n] is obj and torch.equal(obj, values), n


# --------------------------------------------------------------------------- all or nothing
def test_a_corrupted_region_changes_nothing(root):
    model, opt = _make()
    state = {"model": model, "optim": opt}
    with Checkpointer(root, options=_opts()) as ckpt:
        _saved_and_moved_on(ckpt, state)
        before = _snapshot(state)
        _corrupt_pool(ckpt, 3)
        host = ckpt.tiers["host"]
        with pytest.raises(IntegrityError, match="fail their checksum: .* has crc 0x"):
            read_state(host, 3, host.manifest(3), in_place=True)
        with in_place_reads(), pytest.warns(CheckpointSkippedWarning, match="has crc"):
            with pytest.raises(CheckpointNotFoundError):
                ckpt.restore(state)
        _assert_restored(state, before)  # every byte and every object as before


def test_a_corrupted_newest_step_falls_back_to_the_previous_one_in_place(root):
    model, opt = _make()
    state = {"model": model, "optim": opt}
    with Checkpointer(root, options=_opts()) as ckpt:
        saved = _saved_and_moved_on(ckpt, state, step=3)
        _saved_and_moved_on(ckpt, state, step=4)
        _corrupt_pool(ckpt, 4, which=1)
        with in_place_reads(), pytest.warns(CheckpointSkippedWarning, match="host snapshot of step 4"):
            assert ckpt.restore(state) == 3
        _assert_restored(state, saved)


def test_a_target_that_does_not_fit_changes_nothing(root):
    model, opt = _make()
    state = {"model": model, "optim": opt, "scale": torch.zeros(4)}
    with Checkpointer(root, options=_opts()) as ckpt:
        _saved_and_moved_on(ckpt, state)
        state["scale"] = torch.zeros(5)  # checked after the model's bytes were verified
        before = _snapshot(state)
        with in_place_reads(), pytest.raises(IncompatibleCheckpointError, match="'scale'"):
            ckpt.restore(state)
        _assert_restored(state, before)


# --------------------------------------------------------------------------- copy path
def test_targets_that_cannot_take_the_bytes_in_place_get_them_copied(root):
    model, opt = _make()
    state = {"model": model, "optim": opt, "view": torch.arange(12.0).reshape(3, 4)}
    with Checkpointer(root, options=_opts()) as ckpt:
        saved = _saved_and_moved_on(ckpt, state)
        # a fresh optimizer (no state yet), and a strided (transposed) target
        fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
        backing = torch.zeros(4, 3)
        target = {"model": model, "optim": fresh, "view": backing.t()}
        with in_place_reads():
            ckpt.restore(target)
        assert torch.equal(backing.t(), saved["view"][1])
        live = _tensors({"model": model, "optim": fresh})
        for k, (_, values, _) in saved.items():
            if k != "view":
                assert torch.equal(live[k].detach(), values), k
        for a, b in zip(fresh.param_groups[0]["params"], model.parameters()):
            assert a is b


def test_optimizer_state_of_another_dtype_goes_through_the_copy_path(root):
    model, opt = _make()
    state = {"model": model, "optim": opt}
    with Checkpointer(root, options=_opts()) as ckpt:
        saved = _saved_and_moved_on(ckpt, state)
        for st in opt.state.values():  # live moments in float64: the saved float32 ones cannot land as they are
            st["exp_avg"] = st["exp_avg"].double()
        with in_place_reads():
            ckpt.restore(state)
        live = _tensors(state)
        for k, (_, values, _) in saved.items():
            assert torch.equal(live[k].detach(), values), k  # torch casts them to the parameter's dtype


def test_non_tensor_owners_and_random_streams_get_new_tensors(root):
    """A plain dict value and the random streams have no live tensor to write into."""
    model, opt = _make()
    state = {"model": model, "optim": opt, "extra": {"w": torch.ones(3), "pair": (torch.zeros(2), 1)}}
    with Checkpointer(root, options=_opts()) as ckpt:
        at_save = torch.get_rng_state()
        ckpt.save_async(1, state).wait()
        ckpt.wait()
        old = state["extra"]
        torch.rand(3)  # the stream moves on
        with in_place_reads():
            ckpt.restore(state)
        extra = state["extra"]
        assert extra is not old and type(extra["w"]) is torch.Tensor and torch.equal(extra["w"], torch.ones(3))
        assert isinstance(extra["pair"], tuple) and torch.equal(extra["pair"][0], torch.zeros(2))
        assert extra["w"].data_ptr() != old["w"].data_ptr()
        assert torch.equal(torch.get_rng_state(), at_save)  # the saved stream, from a new tensor


def test_apply_restored_takes_a_tree_read_in_place_directly(root):
    model, opt = _make()
    state = {"model": model, "optim": opt}
    with Checkpointer(root, options=_opts()) as ckpt:
        saved = _saved_and_moved_on(ckpt, state)
        host = ckpt.tiers["host"]
        tree = read_state(host, 3, host.manifest(3), in_place=True)
        pending = [v for v in tree["model"].values() if isinstance(v, PendingTensor)]
        assert pending and all(p.pieces for p in pending)
        apply_restored(state, tree, restore_rng=True)
        _assert_restored(state, saved)


# --------------------------------------------------------------------------- packs, tiers
class FileBytesTier(ReadableTier):
    """A tier that serves a committed local step from bytes held in memory (as a tier of
    bytes fetched from a peer does): ``memory_view`` slices the segment files' bytes."""

    name = "file-bytes"

    def __init__(self, local):
        self.local = local
        self.bytes: dict[str, bytes] = {}

    def steps(self):
        return self.local.steps()

    def manifest(self, step):
        return self.local.manifest(step)

    def read(self, step, requests):
        self.local.read(step, requests)

    def memory_view(self, step, rec):
        path = os.path.join(self.local.step_path(step), rec.file)
        data = self.bytes.get(path)
        if data is None:
            with open(path, "rb") as f:
                data = self.bytes[path] = f.read()
        if rec.offset < 0 or rec.offset + rec.nbytes > len(data):
            raise ValueError(f"{rec.file}: [{rec.offset}, +{rec.nbytes}) outside {len(data)} bytes")
        return memoryview(data)[rec.offset : rec.offset + rec.nbytes]


def test_packed_small_tensors_are_verified_through_their_pack_and_land_in_place(root):
    torch.manual_seed(0)
    small = {f"t{i}": torch.randn(3) for i in range(40)}
    big = torch.randn(512, 64)
    state = {"small": torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in small.items()}), "big": big}
    with Checkpointer(root, options=CheckpointOptions()) as ckpt:
        ckpt.save(1, state)
        local = ckpt.tiers["local"]
        manifest = local.manifest(1)
    assert any(s.pack is not None for t in manifest.tensors.values() for s in t.shards)
    saved = {k: v.detach().clone() for k, v in _tensors_plain(state).items()}
    ids = {k: id(v) for k, v in _tensors_plain(state).items()}
    with torch.no_grad():
        for v in _tensors_plain(state).values():
            v.zero_()
    tier = FileBytesTier(local)
    apply_restored(state, read_state(tier, 1, manifest, in_place=True), restore_rng=False)
    for k, v in _tensors_plain(state).items():
        assert id(v) == ids[k] and torch.equal(v.detach(), saved[k]), k

    # one flipped byte in a pack: the whole pack is refused, nothing applied
    seg = next(iter(tier.bytes))
    pack = next(s.pack for t in manifest.tensors.values() for s in t.shards if s.pack is not None)
    data = bytearray(tier.bytes[seg])
    data[pack.offset + 1] ^= 0xFF
    tier.bytes[seg] = bytes(data)
    with pytest.raises(IntegrityError, match="pack at"):
        read_state(tier, 1, manifest, in_place=True)


def _damaged_bytes(root):
    """A saved step whose bytes in memory have one byte of the big tensor flipped: (the
    local tier, the manifest, those bytes by path, the saved tensor)."""
    big = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    with Checkpointer(root, options=CheckpointOptions()) as ckpt:
        ckpt.save(1, {"big": big})
        local = ckpt.tiers["local"]
        manifest = local.manifest(1)
    shard = manifest.tensors["big"].shards[0]
    path = os.path.join(local.step_path(1), shard.file)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[shard.offset + 4 * 10] ^= 0x01  # the low bit of element 10
    return local, manifest, {path: bytes(data)}, big


class VerifiedBytesTier(FileBytesTier):
    """Promises its views were checked already (as a tier that verified them on fetch)."""

    views_verified = True


def test_a_tier_with_verified_views_is_trusted_and_any_other_is_checked(root):
    local, manifest, damaged, big = _damaged_bytes(root)

    def tier(cls, flag=None):
        t = cls(local)
        t.bytes = dict(damaged)
        if flag is not None:
            t.views_verified = flag
        return t

    # the flag as a class attribute: no CRC pass of its own, the bytes are used as served
    tree = read_state(tier(VerifiedBytesTier), 1, manifest, in_place=True)
    assert isinstance(tree["big"], PendingTensor)
    target = {"big": torch.zeros(64, 64)}
    apply_restored(target, tree, restore_rng=False)
    assert (target["big"] != big).nonzero().tolist() == [[0, 10]]  # the tier's promise made these count
    # the flag as an instance attribute works the same
    assert isinstance(read_state(tier(FileBytesTier, True), 1, manifest, in_place=True)["big"], PendingTensor)
    # without the flag (or with anything but True) the damaged view is refused, nothing applied
    for flag in (None, False, 1, "yes"):
        target = {"big": torch.zeros(64, 64)}
        with pytest.raises(IntegrityError, match="'big' (region|pack) at .* has crc"):
            apply_restored(target, read_state(tier(FileBytesTier, flag), 1, manifest, in_place=True), restore_rng=False)
        assert not target["big"].any()
    # and the undamaged bytes restore through the check
    clean = FileBytesTier(local)
    target = {"big": torch.zeros(64, 64)}
    apply_restored(target, read_state(clean, 1, manifest, in_place=True), restore_rng=False)
    assert torch.equal(target["big"], big)


def test_verify_skips_units_marked_verified_and_checks_the_rest():
    data = memoryview(b"123456789")
    verify([Unit(data, 0, "trusted", verified=True)])  # a wrong CRC, never computed
    with pytest.raises(IntegrityError, match="1 region\\(s\\).*'x'"):
        verify([Unit(data, 0, "trusted", verified=True), Unit(data, 0, "'x'")])
    assert ReadableTier.views_verified is False


def test_a_tier_serving_a_view_of_the_wrong_size_is_a_fault_of_the_step(root):
    big = torch.randn(256, 16)
    with Checkpointer(root, options=CheckpointOptions()) as ckpt:
        ckpt.save(1, {"big": big})
        local = ckpt.tiers["local"]

    class Short(FileBytesTier):
        def memory_view(self, step, rec):
            return super().memory_view(step, rec)[:-1]

    with pytest.raises(IntegrityError, match="memory view holds"):
        read_state(Short(local), 1, local.manifest(1), in_place=True)


def test_a_disk_tier_under_in_place_reads_takes_the_copy_path(root):
    model, opt = _make()
    state = {"model": model, "optim": opt}
    with Checkpointer(root, options=CheckpointOptions(tiers=[TierSpec.local()])) as ckpt:
        _train(model, opt, 2)
        ckpt.save(1, state)
        saved = _snapshot(state)
        _train(model, opt, 2, seed=5)
        tree = read_state(ckpt.tiers["local"], 1, ckpt.manifest(1), in_place=True)
        assert not [v for v in tree["model"].values() if isinstance(v, PendingTensor)]
        with in_place_reads():
            assert ckpt.restore(state) == 1
        _assert_restored(state, saved, same_objects=False)


def _tensors_plain(state):
    out = {f"small/{k}": v for k, v in state["small"].items()}
    out["big"] = state["big"]
    return out


def test_host_tier_memory_view_serves_only_staged_regions(root):
    model, opt = _make()
    state = {"model": model, "optim": opt}
    with Checkpointer(root, options=_opts()) as ckpt:
        _saved_and_moved_on(ckpt, state)
        host = ckpt.tiers["host"]
        m = host.manifest(3)
        shard = next(s for t in m.tensors.values() for s in t.shards if s.nbytes > 64)
        view = host.memory_view(3, shard)
        assert view.readonly and view.nbytes == shard.nbytes and crc32c(view) == shard.crc32c
        blob = m.blob_for(0)
        assert crc32c(host.memory_view(3, blob)) == blob.crc32c
        wider = ShardRecord(0, shard.file, shard.offset, shard.nbytes + 1, 0, shard.offsets, shard.shape)
        inside = ShardRecord(0, shard.file, shard.offset + 4, shard.nbytes - 4, 0, shard.offsets, shard.shape)
        for bad in (wider, inside, BlobRecord(0, blob.file, 0, blob.nbytes + 1, 0)):
            with pytest.raises(ValueError, match="host snapshot of step 3"):
                host.memory_view(3, bad)
        with pytest.raises(CheckpointNotFoundError):
            host.memory_view(99, shard)
        assert ckpt.tiers["local"].memory_view(3, shard) is None  # a disk tier: the copy path


# --------------------------------------------------------------------------- verify
@pytest.mark.parametrize("backend", ["native", "python"])
def test_verify_splits_large_regions_across_threads_and_names_a_bad_one(backend):
    engine = load_backend(backend)
    big = bytes(range(256)) * ((3 * CHUNK_BYTES + 1000) // 256)
    small = [os.urandom(100 + i) for i in range(50)]
    units = [Unit(memoryview(big), crc32c(big), "big")] + [Unit(memoryview(s), crc32c(s), f"s{i}") for i, s in enumerate(small)]
    verify(units, threads=2, engine=engine)
    verify(units, threads=1, engine=engine)
    damaged = bytearray(big)
    damaged[2 * CHUNK_BYTES + 7] ^= 1
    bad = [Unit(memoryview(bytes(damaged)), crc32c(big), "'w' region at 0")] + units[1:]
    with pytest.raises(IntegrityError, match="1 region\\(s\\).*'w' region at 0"):
        verify(bad, threads=2, engine=engine)


@pytest.mark.gpu
def test_a_cuda_target_takes_the_bytes_from_host_memory(root):
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 256, device="cuda")).sum().backward()
    opt.step()
    state = {"model": model, "optim": opt}
    with Checkpointer(root, options=_opts()) as ckpt:
        ckpt.save_async(1, state).wait()
        ckpt.wait()
        saved = {k: (v, v.detach().clone(), v.data_ptr()) for k, v in _tensors(state).items()}
        with torch.no_grad():
            for v in _tensors(state).values():
                v.add_(1)
        with in_place_reads():
            ckpt.restore(state)
        _assert_restored(state, saved)
