"""`recoverkit gc` (dry run, --yes, the run lock) and `recoverkit bench`."""

from __future__ import annotations

import json
import os

from recoverkit import Checkpointer
from recoverkit.cli.common import EXIT_LOCKED, EXIT_NOT_FOUND
from recoverkit.storage.local import LocalTier
from tests.cli.helpers import assert_user_error, cli, cli_json, train_and_save


def _steps(root: str) -> list[int]:
    return sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step-"))


def test_gc_dry_run_deletes_nothing(tmp_path):
    root = str(tmp_path / "ckpt")
    train_and_save(root, steps=(1, 2, 3, 4, 5, 6))
    doc = cli_json("gc", root, "--keep-last", "2", "--keep-every", "3")
    assert doc["dry_run"] and doc["deleted"] == []
    assert [d["step"] for d in doc["delete"]] == [4, 2, 1]
    assert [k["step"] for k in doc["keep"]] == [6, 5, 3]
    assert _steps(root) == [1, 2, 3, 4, 5, 6]
    p = cli("gc", root, "--keep-last", "2")
    assert p.returncode == 0 and "would delete" in p.stdout and "nothing deleted" in p.stdout
    assert _steps(root) == [1, 2, 3, 4, 5, 6]


def test_gc_yes_deletes_by_rule_and_keeps_the_newest(tmp_path):
    root = str(tmp_path / "ckpt")
    train_and_save(root, steps=(1, 2, 3, 4, 5, 6))
    doc = cli_json("gc", root, "--keep-last", "2", "--keep-every", "3", "--yes")
    assert not doc["dry_run"] and doc["deleted"] == [4, 2, 1]
    assert _steps(root) == [3, 5, 6]
    assert not [n for n in os.listdir(root) if n.startswith(".trash-")]
    doc = cli_json("gc", root, "--keep-last", "1", "--yes")
    assert _steps(root) == [6]  # the newest committed step is never deleted
    assert cli_json("verify", root)["ok"]


def test_gc_keeps_the_newest_valid_step_when_the_newest_is_damaged(tmp_path):
    root = str(tmp_path / "ckpt")
    train_and_save(root, steps=(1, 2, 3))
    os.truncate(os.path.join(root, "step-000000003", "rank-00000.seg"), 10)
    doc = cli_json("gc", root, "--keep-last", "1", "--yes")
    assert doc["deleted"] == [1]
    assert _steps(root) == [2, 3]  # 3 is the newest, 2 the newest a restart can use


def _rot(root: str, step: int) -> None:
    """Flip one byte inside a tensor shard of ``step`` (its manifest stays valid)."""
    tier = LocalTier(root)
    rec = next(s for t in tier.manifest(step).tensors.values() for s in t.shards if s.nbytes > 0)
    with open(os.path.join(tier.step_path(step), rec.file), "r+b") as f:
        f.seek(rec.offset)
        byte = f.read(1)
        f.seek(rec.offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_gc_never_deletes_the_newest_step_whose_data_passes_a_crc_pass(tmp_path):
    # the reproduction: 20 and 30 rotten (manifests intact), --keep-last 2
    root = str(tmp_path / "ckpt")
    train_and_save(root, steps=(10, 20, 30))
    _rot(root, 20)
    _rot(root, 30)
    doc = cli_json("gc", root, "--keep-last", "2", "--yes")
    assert doc["deleted"] == []
    assert _steps(root) == [10, 20, 30]  # 10 is what a restart uses; 20 and 30 are evidence
    assert [(d["step"], d["delete"]) for d in doc["damaged"]] == [(30, False), (20, False)]
    assert all("crc32c" in d["reason"] for d in doc["damaged"])
    assert [k["step"] for k in doc["keep"]] == [30, 20, 10]


def test_gc_does_not_count_damaged_steps_among_the_last_n(tmp_path):
    root = str(tmp_path / "ckpt")
    train_and_save(root, steps=(1, 2, 3, 4))
    _rot(root, 4)
    p = cli("gc", root, "--keep-last", "2")  # dry run: says what is damaged
    assert p.returncode == 0 and "DAMAGED" in p.stdout and "1 damaged step(s)" in p.stdout, p.stdout
    doc = cli_json("gc", root, "--keep-last", "2", "--yes")
    assert doc["deleted"] == [1]  # 3 and 2 are the last 2 good ones; 4 does not count
    assert _steps(root) == [2, 3, 4]
    doc = cli_json("gc", root, "--keep-last", "1", "--delete-damaged", "--yes")
    assert doc["deleted"] == [4, 2]
    assert _steps(root) == [3]
    assert cli_json("verify", root)["ok"]


def test_gc_help_says_what_happens_to_damaged_steps():
    p = cli("gc", "--help")
    assert p.returncode == 0 and "--delete-damaged" in p.stdout and "evidence" in p.stdout


def test_gc_yes_refuses_while_a_live_trainer_holds_the_lock(tmp_path):
    root = str(tmp_path / "ckpt")
    train_and_save(root, steps=(1, 2, 3))
    with Checkpointer(root):  # this process is the live writer
        p = cli("gc", root, "--keep-last", "1", "--yes")
        assert_user_error(p, EXIT_LOCKED, "another writer holds this checkpoint root", f"pid {os.getpid()}")
        assert _steps(root) == [1, 2, 3]
        doc = json.loads(cli("gc", root, "--keep-last", "1", "--json").stdout)  # dry runs still work
        assert f"pid {os.getpid()}" in doc["lock"] and [d["step"] for d in doc["delete"]] == [2, 1]
    assert cli_json("gc", root, "--keep-last", "1", "--yes")["deleted"] == [2, 1]


def test_bench_runs_a_module_of_the_source_tree(tmp_path):
    listed = cli("bench", "--list")
    assert listed.returncode == 0 and "bench_save" in listed.stdout.split()
    p = cli("bench", "save", "--help", cwd=str(tmp_path))  # 'save' finds bench_save, from anywhere
    assert p.returncode == 0 and "--size-mib" in p.stdout
    p = cli("bench", "bench_save", "--no-such-option")
    assert p.returncode == 2 and "--no-such-option" in p.stderr  # the benchmark's own exit code


def test_bench_says_clearly_when_benchmarks_are_missing(tmp_path):
    assert_user_error(cli("bench", "nope"), EXIT_NOT_FOUND, "no benchmark 'nope'", "bench_save")
    p = cli("bench", "--source", str(tmp_path), "bench_save")  # our options go before NAME
    assert_user_error(p, EXIT_NOT_FOUND, "not importable", "source tree")
