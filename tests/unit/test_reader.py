"""CheckpointReader: a read-only way in (no lock, no write of any kind, the CLI included),
retrying when a writer's retention deletes the step being read, and partial restore."""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
import warnings

import pytest
import torch
from click.testing import CliRunner

import recoverkit
from recoverkit import (
    Checkpointer,
    CheckpointNotFoundError,
    CheckpointOptions,
    CheckpointReader,
    IncompatibleCheckpointError,
    RetentionPolicy,
)
from recoverkit.errors import StorageError
from recoverkit.reading import ReadOnlyFS, RestoreResult, StepDeletedWarning
from recoverkit.storage.discovery import CheckpointSkippedWarning
from recoverkit.storage.fs import LocalFS
from recoverkit.storage.local import LocalTier

KEEP_ALL = CheckpointOptions(retention=RetentionPolicy(keep_last=None))
KEEP_ONE = CheckpointOptions(retention=RetentionPolicy(keep_last=1))


def _state(value: float, step: int = 0) -> dict:
    model = torch.nn.Linear(8, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return {"model": model, "w": torch.full((1024,), value), "step": step}


def _save(root: str, steps=(1, 2, 3), options=KEEP_ALL) -> None:
    with Checkpointer(root, options=options) as ckpt:
        for s in steps:
            ckpt.save(s, _state(float(s), s))


# ------------------------------------------------------------------ no writes, no lock
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_MUTATING_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "os.chown",
                    "os.utime", "os.link", "os.symlink", "shutil.rmtree", "os.chflags", "os.setxattr"}


class _Audit:
    """Every write-like file operation under ``root`` this process makes (a sys.audit hook:
    ``open`` with write flags, mkdir, rename, remove, ...). Audit hooks cannot be removed,
    so one hook serves every test and only records while a test has it armed."""

    armed: _Audit | None = None
    installed = False

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.seen: list[tuple[str, str]] = []

    @classmethod
    def _hook(cls, event: str, args: tuple) -> None:
        self = cls.armed
        if self is None or not (event == "open" or event in _MUTATING_EVENTS):
            return
        if event == "open":
            path, mode, flags = args
            if not (flags & _WRITE_FLAGS or (isinstance(mode, str) and set(mode) & set("wax+"))):
                return
        else:
            path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)):
            full = os.path.realpath(os.fsdecode(path))
            if full == self.root or full.startswith(self.root + os.sep):
                self.seen.append((event, full))

    def __enter__(self) -> _Audit:
        if not _Audit.installed:
            sys.addaudithook(_Audit._hook)
            _Audit.installed = True
        _Audit.armed = self
        return self

    def __exit__(self, *exc: object) -> None:
        _Audit.armed = None


def _tree(root: str) -> dict:
    """Every name under ``root`` with its kind, size, mode and modification time."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in [*dirs, *files, "."]:
            p = os.path.join(d, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mode, st.st_mtime_ns)
    return out


@pytest.fixture
def frozen_root(root):
    """Three committed steps, a trainer's save in flight (``.tmp-*``), every directory 0o555."""
    _save(root)
    os.makedirs(os.path.join(root, ".tmp-step-000000004-0123abcd"))
    dirs = [d for d, _, _ in os.walk(root)]
    for d in dirs:
        os.chmod(d, 0o555)
    yield root
    for d in dirs:
        os.chmod(d, 0o755)


def test_the_audit_sees_a_checkpointer_write(frozen_root):
    """The guard works: opening a root as a Checkpointer (even without the lock) writes."""
    with _Audit(frozen_root) as audit:
        Checkpointer(frozen_root, options=CheckpointOptions(lock=False)).close()
    assert audit.seen  # its writability probe


def test_a_reader_never_writes_creates_deletes_or_locks(frozen_root):
    before = _tree(frozen_root)
    with _Audit(frozen_root) as audit:
        reader = CheckpointReader(frozen_root)
        assert reader.steps() == [1, 2, 3]
        assert reader.latest() == 3
        assert reader.manifest(2).step == 2
        tree = reader.read(step=2)
        assert tree.step == 2 and torch.equal(tree["w"], torch.full((1024,), 2.0)) and tree["step"] == 2
        target = _state(0.0)
        assert reader.restore(target) == 3
        assert torch.equal(target["w"], torch.full((1024,), 3.0)) and target["step"] == 3
        partial = {"model": torch.nn.Linear(8, 4)}
        assert reader.restore(partial, step=1, strict=False) == 1
    assert audit.seen == []
    assert _tree(frozen_root) == before  # nothing created (no .lock), changed or deleted; .tmp-* left alone


def test_the_cli_read_commands_never_write(frozen_root, tmp_path):
    from recoverkit.cli import main

    before = _tree(frozen_root)
    runner = CliRunner()
    with _Audit(frozen_root) as audit:
        for args in (["ls", frozen_root], ["ls", frozen_root, "--verify"], ["inspect", frozen_root],
                     ["verify", frozen_root], ["inspect", os.path.join(frozen_root, "step-000000002")],
                     ["restore", frozen_root, "--to", str(tmp_path / "m.pt"), "--format", "torch", "--select", "model"]):
            result = runner.invoke(main, args, catch_exceptions=False)
            assert result.exit_code == 0, (args, result.output)
    assert audit.seen == []
    assert _tree(frozen_root) == before


def test_a_reader_works_while_a_trainer_holds_the_lock(root):
    with Checkpointer(root, options=KEEP_ALL) as trainer:
        trainer.save(1, _state(1.0, 1))
        reader = CheckpointReader(root)  # a second Checkpointer here would be CheckpointLockedError
        target = _state(0.0)
        assert reader.restore(target) == 1 and target["step"] == 1
        trainer.save(2, _state(2.0, 2))
        assert reader.restore(target) == 2 and target["step"] == 2


def test_the_readers_file_operations_refuse_every_mutation(root):
    _save(root, (1,))
    tier = LocalTier(root, fs=ReadOnlyFS(LocalFS()))
    for attempt in (lambda: tier.delete(1), lambda: tier.prepare(2),
                    lambda: tier.fs.write_file(os.path.join(root, "x"), b"x", new=True),
                    lambda: tier.fs.check_writable(root)):
        with pytest.raises(StorageError) as e:
            attempt()
        assert e.value.errno == errno.EROFS and "a reader never writes" in str(e.value)
    assert LocalTier(root).steps() == [1]


def test_a_reader_needs_somewhere_to_read():
    with pytest.raises(ValueError, match="root"):
        CheckpointReader()


def test_a_reader_of_a_missing_root_finds_nothing_and_creates_nothing(tmp_path):
    missing = str(tmp_path / "nothing-here")
    reader = CheckpointReader(missing)
    assert reader.steps() == [] and reader.latest() is None
    with pytest.raises(CheckpointNotFoundError):
        reader.restore({"w": torch.zeros(2)})
    assert not os.path.exists(missing)


def test_a_damaged_newest_step_is_skipped_and_left_in_place(root):
    _save(root)
    seg = os.path.join(root, "step-000000003", "rank-00000.seg")
    with open(seg, "r+b") as f:
        f.seek(os.path.getsize(seg) - 8)
        f.write(b"\xff" * 8)
    target = _state(0.0)
    with pytest.warns(CheckpointSkippedWarning, match="step-000000003"):
        assert CheckpointReader(root).restore(target) == 2
    assert target["step"] == 2
    assert LocalTier(root).steps() == [1, 2, 3]


def test_the_persistent_tier_alone(tmp_path):
    url = "file://" + str(tmp_path / "zarr")
    opts = CheckpointOptions(tiers=recoverkit.TierPolicy(persistent_url=url, persistent_every=1))
    with Checkpointer(str(tmp_path / "local"), options=opts) as ckpt:
        ckpt.save_async(5, _state(5.0, 5))
        ckpt.wait(120)
    reader = CheckpointReader(persistent_url=url)
    target = _state(0.0)
    assert reader.steps() == [5] and reader.restore(target) == 5 and target["step"] == 5


# --------------------------------------------------------- the step vanishes mid-read
class _TrainerOnRead(LocalFS):
    """The real file system; on the first read of ``on`` (a manifest or segment of step
    ``step``), a live trainer (a real Checkpointer with keep_last=1) saves the next step,
    and its retention deletes the step this reader is about to read."""

    def __init__(self, trainer: Checkpointer, step: int, on: str) -> None:
        super().__init__()
        self.trainer, self.step, self.on, self.fired = trainer, step, on, 0

    def _maybe(self, path: str) -> None:
        if not self.fired and f"step-{self.step:09d}" in path and path.endswith(self.on):
            self.fired += 1
            self.trainer.save(self.step + 1, _state(float(self.step + 1), self.step + 1))
            assert not os.path.exists(os.path.dirname(path))  # retention deleted it

    def read_file(self, path, **kw):
        self._maybe(path)
        return super().read_file(path, **kw)

    def read_segment(self, path, items):
        self._maybe(path)
        return super().read_segment(path, items)


@pytest.mark.parametrize("on", ["manifest.json", ".seg"])
def test_a_step_deleted_by_retention_mid_read_is_retried_on_the_newest_step(root, on):
    with Checkpointer(root, options=KEEP_ONE) as trainer:
        trainer.save(1, _state(1.0, 1))
        fs = _TrainerOnRead(trainer, 1, on)
        reader = CheckpointReader(root, fs=fs)
        target = _state(0.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = reader.restore(target)
        assert fs.fired == 1
        assert got == 2 and target["step"] == 2  # the whole state is step 2's
        assert torch.equal(target["w"], torch.full((1024,), 2.0))
        assert all(torch.equal(p, torch.full_like(p, 2.0)) for p in target["model"].parameters())
        kinds = [w.category for w in caught if issubclass(w.category, CheckpointSkippedWarning)]
        assert kinds == [StepDeletedWarning], [str(w.message) for w in caught]
        assert trainer.steps() == [2]  # nothing the reader did got in the trainer's way


def test_a_step_asked_for_by_number_that_vanishes_is_not_replaced(root):
    with Checkpointer(root, options=KEEP_ONE) as trainer:
        trainer.save(1, _state(1.0, 1))
        reader = CheckpointReader(root, fs=_TrainerOnRead(trainer, 1, ".seg"))
        with pytest.warns(StepDeletedWarning), pytest.raises(CheckpointNotFoundError, match="step 1"):
            reader.restore(_state(0.0), step=1)


def test_concurrent_deletes_in_threads_never_escape(root):
    """A trainer thread saving with keep_last=1 while this thread restores in a loop."""
    with Checkpointer(root, options=KEEP_ONE) as trainer:
        trainer.save(1, _state(1.0, 1))
        done = threading.Event()

        def train() -> None:
            try:
                for s in range(2, 60):
                    trainer.save(s, _state(float(s), s))
            finally:
                done.set()

        t = threading.Thread(target=train)
        t.start()
        reader = CheckpointReader(root)
        restores = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StepDeletedWarning)
            while not done.is_set() or restores == 0:
                target = _state(0.0)
                got = reader.restore(target)
                assert target["step"] == got and torch.equal(target["w"], torch.full((1024,), float(got)))
                restores += 1
        t.join(120)
        assert not t.is_alive()


# ---------------------------------------------------------------- partial restore
def _protected_root(root: str):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    with recoverkit.protect(root, model=model, optimizer=opt, loader=range(4), save_every=2) as run:
        for _ in run:
            model(torch.ones(1, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
    return model


def test_only_the_model_from_a_protect_root(root):
    model = _protected_root(root)
    saved = CheckpointReader(root).read(entries=["model", "__run__", "__data__", "optimizer"])
    assert set(saved) == {"model", "__run__", "__data__", "optimizer"}

    fresh = torch.nn.Linear(4, 4)
    with pytest.raises(IncompatibleCheckpointError, match="unexpected"):  # strict: today's behaviour
        CheckpointReader(root).restore({"model": fresh})
    assert not torch.equal(fresh.weight, model.weight)  # nothing changed

    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    got = CheckpointReader(root).restore({"model": fresh, "ema": torch.zeros(2)}, strict=False)
    assert isinstance(got, RestoreResult) and got == got.step == saved.step
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    assert got.missing_keys == ("ema",)
    assert set(got.unexpected_keys) == {"__data__", "__run__", "__rng__", "optimizer"}
    assert torch.equal(torch.rand(3), expected_draw)  # this process's random streams were left alone


def test_a_partial_restore_can_ask_for_the_random_streams(root):
    _protected_root(root)
    torch.manual_seed(7)
    after_training = CheckpointReader(root).read()["__rng__"]
    got = CheckpointReader(root).restore({"model": torch.nn.Linear(4, 4)}, strict=False, restore_rng=True)
    assert "__rng__" not in got.unexpected_keys
    assert torch.equal(torch.get_rng_state(), after_training["torch"])


def test_a_partial_restore_is_all_or_nothing_over_what_it_loads(root):
    _save(root, (1,))
    wrong = torch.nn.Linear(8, 5)  # does not fit the saved model
    w = torch.zeros(1024)
    before = [p.detach().clone() for p in wrong.parameters()]
    with pytest.raises(IncompatibleCheckpointError, match="model"):
        CheckpointReader(root).restore({"model": wrong, "w": w}, strict=False)
    assert torch.equal(w, torch.zeros(1024))  # the entry that fitted was not loaded either
    assert all(torch.equal(a, b) for a, b in zip(before, wrong.parameters()))


def test_a_partial_restore_that_matches_nothing_is_an_error(root):
    _save(root, (1,))
    with pytest.raises(IncompatibleCheckpointError, match="none of the entries"):
        CheckpointReader(root).restore({"ema": torch.zeros(2)}, strict=False)


def test_the_checkpointer_restores_partially_through_the_same_reader(root):
    _save(root, (1,))
    with Checkpointer(root) as ckpt:
        target = {"w": torch.zeros(1024), "step": None}
        got = ckpt.restore(target, strict=False)
        assert got == 1 and got.missing_keys == () and set(got.unexpected_keys) == {"model", "__rng__"}
        assert target["step"] == 1 and torch.equal(target["w"], torch.ones(1024))
        strict = _state(0.0)
        assert ckpt.restore(strict).unexpected_keys == ()


def test_partial_restore_reads_only_the_entries_asked_for(tmp_path):
    """Rot in the optimizer's bytes does not stop an evaluation job loading the model: the
    entries not asked for are never read (nor checksummed), so the newest step is used."""
    import warnings

    import recoverkit

    root = str(tmp_path / "ckpt")
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 8)).sum().backward()
    opt.step()
    with recoverkit.Checkpointer(root) as ckpt:
        ckpt.save(1, {"model": model, "optimizer": opt})
        with torch.no_grad():
            model.weight.add_(1)
        ckpt.save(2, {"model": model, "optimizer": opt})
        m = ckpt.manifest(2)
    shard = next(t.shards[0] for k, t in m.tensors.items() if k.startswith("optimizer/") and t.shards)
    seg = tmp_path / "ckpt" / "step-000000002" / shard.file
    data = bytearray(seg.read_bytes())
    data[shard.offset] ^= 0xFF
    seg.write_bytes(bytes(data))

    reader = recoverkit.CheckpointReader(root)
    fresh = torch.nn.Linear(8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no step skipped
        got = reader.restore({"model": fresh}, strict=False)
        tree = reader.read(entries=["model"])
    assert got == 2 and torch.equal(fresh.weight, model.weight)
    assert "optimizer" in got.unexpected_keys
    assert tree.step == 2 and list(tree) == ["model"]
    from recoverkit.storage.discovery import CheckpointSkippedWarning

    with pytest.warns(CheckpointSkippedWarning):  # a strict restore reads everything: step 2 is damaged
        assert reader.restore({"model": torch.nn.Linear(8, 8), "optimizer": torch.optim.Adam(fresh.parameters())}) == 1
