"""Every user error: one clear line on stderr, its documented exit code, no traceback."""

from __future__ import annotations

import json
import os

import pytest
import torch

from recoverkit import Checkpointer, CheckpointOptions
from recoverkit.cli.common import (
    EXIT_FAULT,
    EXIT_INCOMPATIBLE,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
)
from tests.cli.helpers import assert_user_error, cli, train_and_save

COMMANDS = ["ls", "inspect", "verify", "gc", "restore"]


def _args(cmd: str, path: str, tmp_path) -> list[str]:
    extra = {"gc": ["--keep-last", "1"], "restore": ["--to", str(tmp_path / "out.pt"), "--format", "torch"]}
    return [cmd, path, *extra.get(cmd, [])]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("saved") / "ckpt")
    train_and_save(root, steps=(1, 2))
    return root


@pytest.mark.parametrize("cmd", COMMANDS)
def test_missing_root_is_not_found(cmd, tmp_path):
    p = cli(*_args(cmd, str(tmp_path / "nowhere"), tmp_path))
    assert_user_error(p, EXIT_NOT_FOUND, "nowhere", "no such file or directory")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_directory_without_steps_is_not_a_checkpoint(cmd, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    (empty / "step-abc").mkdir()
    assert_user_error(cli(*_args(cmd, str(empty), tmp_path)), EXIT_NOT_FOUND, "not a checkpoint root")


def test_plain_file_is_not_a_checkpoint(tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(b"x")
    assert_user_error(cli("inspect", str(f)), EXIT_NOT_FOUND, "not a checkpoint")


def test_missing_step_is_not_found(saved):
    assert_user_error(cli("inspect", saved, "--step", "7"), EXIT_NOT_FOUND, "no committed step 7")
    assert_user_error(cli("verify", saved, "--step", "7"), EXIT_NOT_FOUND, "no committed step 7")


def _rewrite_manifest(root: str, step: int, edit) -> None:
    path = os.path.join(root, f"step-{step:09d}", "manifest.json")
    body = json.loads(open(path).read())
    edit(body)
    with open(path, "w") as f:
        json.dump(body, f)


def test_corrupt_manifest_is_a_verification_failure(tmp_path):
    root = str(tmp_path / "ckpt")
    train_and_save(root, steps=(1,))
    _rewrite_manifest(root, 1, lambda b: b.update(run_id="tampered"))
    step_dir = os.path.join(root, "step-000000001")
    assert_user_error(cli("inspect", step_dir), EXIT_FAULT, "checksum mismatch")
    assert_user_error(cli("restore", root, "--to", str(tmp_path / "o.pt"), "--format", "torch"), EXIT_FAULT,
                      "checksum mismatch")


@pytest.mark.parametrize("edit,needle", [
    (lambda b: b.update(format="orbax"), "not a recoverkit manifest"),
    (lambda b: b.update(version=99), "format version 99"),
])
def test_foreign_or_newer_format_is_incompatible(tmp_path, edit, needle):
    root = str(tmp_path / "ckpt")
    train_and_save(root, steps=(1,))
    _rewrite_manifest(root, 1, edit)
    assert_user_error(cli("inspect", os.path.join(root, "step-000000001")), EXIT_INCOMPATIBLE, needle)
    assert_user_error(cli("restore", root, "--step", "1", "--to", str(tmp_path / "o"), "--format", "dcp"),
                      EXIT_INCOMPATIBLE, needle)


def test_usage_errors_exit_2(saved, tmp_path):
    p = cli("restore", saved, "--to", str(tmp_path / "x"), "--format", "onnx")
    assert p.returncode == EXIT_USAGE and "Traceback" not in p.stderr and "onnx" in p.stderr
    p = cli("restore", saved, "--to", str(tmp_path / "x"), "--format", "torch", "--world-size", "2")
    assert_user_error(p, EXIT_USAGE, "--world-size applies to --format recoverkit only")
    p = cli("inspect", saved, "--step", "soon")
    assert p.returncode == EXIT_USAGE and "neither a step number nor 'latest'" in p.stderr
    p = cli("gc", saved)
    assert p.returncode == EXIT_USAGE and "--keep-last" in p.stderr


def test_existing_output_needs_force(saved, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    p = cli("restore", saved, "--to", str(out), "--format", "safetensors")
    assert_user_error(p, EXIT_USAGE, "already exists", "--force")
    assert out.read_bytes() == b"precious"
    assert cli("restore", saved, "--to", str(out), "--format", "safetensors", "--force").returncode == 0
    assert out.read_bytes() != b"precious"


class Opaque:
    """Not encodable without pickle."""

    def __init__(self) -> None:
        self.x = 1


def test_pickled_state_needs_allow_pickle(tmp_path):
    root = str(tmp_path / "ckpt")
    with Checkpointer(root, options=CheckpointOptions(allow_pickle=True)) as ckpt:
        ckpt.save(1, {"w": torch.ones(2), "obj": Opaque()})
    p = cli("restore", root, "--to", str(tmp_path / "o.pt"), "--format", "torch")
    assert_user_error(p, EXIT_INCOMPATIBLE, "--allow-pickle")
    assert not os.path.exists(tmp_path / "o.pt")
    # inspect shows it without unpickling
    p = cli("inspect", root)
    assert p.returncode == 0 and "pickled objects, not decoded" in p.stdout


def test_dtype_safetensors_cannot_hold_is_incompatible(tmp_path):
    root = str(tmp_path / "ckpt")
    with Checkpointer(root) as ckpt:
        ckpt.save(1, {"z": torch.ones(3, dtype=torch.complex128)})
    p = cli("restore", root, "--to", str(tmp_path / "o.safetensors"), "--format", "safetensors")
    assert_user_error(p, EXIT_INCOMPATIBLE, "complex128", "'z'")


@pytest.mark.parametrize("cmd", ["ls", "inspect", "verify", "restore", "gc", "bench"])
def test_every_command_has_help_with_examples_and_exit_codes(cmd):
    p = cli(cmd, "--help")
    assert p.returncode == 0
    assert "Examples:" in p.stdout and "Exit codes:" in p.stdout and "not found" in p.stdout
