"""The public API agrees with itself: one tier policy for save() and save_async(), one
answer to "which steps exist, where" from steps(), latest(), restore, the reader and
``recoverkit ls``, and protect() refuses a Checkpointer that contradicts its other arguments."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os

import pytest
import torch
from click.testing import CliRunner

import recoverkit
from recoverkit import Checkpointer, CheckpointOptions, CheckpointReader
from recoverkit.config import ProtectOptions, StagingPolicy, TierSpec
from recoverkit.errors import ConfigError
from recoverkit.staging.handle import SaveHandle


def _opts(
    url: str | None, *, local_every: int = 1, persistent_every: int = 2, host_keep: int = 0
) -> CheckpointOptions:
    return CheckpointOptions(
        capture_rng=False,
        tiers=[
            TierSpec.host(keep=host_keep),
            TierSpec.local(every_steps=local_every),
            *([TierSpec.persistent(url, every_steps=persistent_every)] if url else []),
        ],
        staging=StagingPolicy(budget_bytes=16 << 20),
    )


def _state(v: float) -> dict[str, object]:
    return {"w": torch.full((3, 5), v), "step": int(v)}


def _held(ckpt: Checkpointer) -> dict[str, list[int]]:
    """Steps on each disk tier (host memory, which save_async alone fills, left out)."""
    return {name: tier.steps() for name, tier in ckpt.tiers.items() if name != "host"}


# ------------------------------------------------------------------ 1. one tier policy
def test_blocking_save_commits_to_every_tier_the_policy_names(tmp_path):
    pytest.importorskip("tensorstore")
    url = "file://" + str(tmp_path / "zarr")
    with Checkpointer(str(tmp_path / "local"), options=_opts(url)) as ckpt:
        results = {s: ckpt.save(s, _state(float(s))) for s in (1, 2, 3, 4)}
        assert {s: r.committed_to for s, r in results.items()} == {
            1: ("local",),
            2: ("local", "persistent"),
            3: ("local",),
            4: ("local", "persistent"),
        }
        assert results[2].paths == {
            "local": ckpt.tier.step_path(2),
            "persistent": ckpt.tiers["persistent"].describe(2),
        }
        assert results[2].path == ckpt.tier.step_path(2)  # the fastest tier it went to
        assert _held(ckpt) == {"local": [2, 3, 4], "persistent": [2, 4]}  # keep_last=3 on each tier
    back = _state(0.0)
    assert CheckpointReader(persistent_url=url).restore(back) == 4
    assert torch.equal(back["w"], torch.full((3, 5), 4.0)) and back["step"] == 4


def test_save_and_save_async_put_the_same_steps_on_the_same_tiers(tmp_path):
    pytest.importorskip("tensorstore")
    held = {}
    for mode in ("save", "save_async"):
        url = "file://" + str(tmp_path / mode / "zarr")
        opts = _opts(url, local_every=2, persistent_every=3)
        with Checkpointer(str(tmp_path / mode / "local"), options=opts) as ckpt:
            for s in range(1, 7):
                if mode == "save":
                    ckpt.save(s, _state(float(s)))
                else:
                    assert ckpt.save_async(s, _state(float(s))).wait(60)
            held[mode] = _held(ckpt)
    assert held["save"] == held["save_async"] == {"local": [2, 4, 6], "persistent": [3, 6]}


def test_a_blocking_save_the_policy_sends_nowhere_says_so(tmp_path):
    with Checkpointer(str(tmp_path / "local"), options=_opts(None, local_every=0)) as ckpt:
        result = ckpt.save(1, _state(1.0))
        assert result.committed_to == () and result.path == "" and result.paths == {}
        assert ckpt.steps() == [] and ckpt.latest() is None


def test_retention_runs_on_every_tier_a_blocking_save_commits_to(tmp_path):
    pytest.importorskip("tensorstore")
    url = "file://" + str(tmp_path / "zarr")
    opts = dataclasses.replace(
        _opts(url, persistent_every=1), retention=recoverkit.RetentionPolicy(keep_last=2)
    )
    with Checkpointer(str(tmp_path / "local"), options=opts) as ckpt:
        for s in (1, 2):
            assert ckpt.save(s, _state(float(s))).deleted_steps == ()
        assert ckpt.save(3, _state(3.0)).deleted_steps == (1,)
        assert _held(ckpt) == {"local": [2, 3], "persistent": [2, 3]}


# ------------------------------------------------------------------ 2. one view of the steps
def _ls(root: str, url: str) -> dict[int, list[str]]:
    from recoverkit.cli.ls import ls

    out = CliRunner().invoke(ls, [root, "--persistent", url, "--json"])
    assert out.exit_code == 0, out.output
    return {s["step"]: sorted(s["tiers"]) for s in json.loads(out.output)["steps"]}


def test_steps_latest_restore_reader_and_ls_agree(tmp_path):
    pytest.importorskip("tensorstore")
    root, url = str(tmp_path / "local"), "file://" + str(tmp_path / "zarr")
    opts = _opts(url, local_every=2, persistent_every=1)
    with Checkpointer(root, options=opts) as ckpt:
        for s in (1, 2, 3):
            assert ckpt.save_async(s, _state(float(s))).wait(60)
        assert _held(ckpt) == {"local": [2], "persistent": [1, 2, 3]}
        live = ckpt.steps()
        assert live == [1, 2, 3] and ckpt.latest() == live[-1] == 3
    with Checkpointer(root, options=opts) as ckpt:  # a new process's view
        assert ckpt.steps() == live and ckpt.latest() == 3
        back = _state(0.0)
        assert (
            ckpt.restore(back, step=1) == 1 and back["step"] == 1
        )  # held by the persistent tier only
        assert ckpt.manifest(1).step == 1
    assert CheckpointReader(root, persistent_url=url).steps() == live
    assert _ls(root, url) == {1: ["persistent"], 2: ["local", "persistent"], 3: ["persistent"]}


def test_steps_include_what_restore_would_use_from_host_memory(tmp_path):
    """A step kept only in host memory is restorable, so steps() and latest() list it."""
    with Checkpointer(
        str(tmp_path / "local"), options=_opts(None, local_every=2, host_keep=1)
    ) as ckpt:
        for s in (1, 2, 3):
            assert ckpt.save_async(s, _state(float(s))).wait(60)
        assert ckpt.tier.steps() == [2]
        assert ckpt.steps() == [2, 3] and ckpt.latest() == 3
        back = _state(0.0)
        assert ckpt.restore(back) == 3
        assert ckpt.manifest(2).step == 2  # manifests come from a durable tier
    with Checkpointer(str(tmp_path / "local"), options=_opts(None, local_every=2)) as ckpt:
        assert ckpt.steps() == [2]  # host memory died with the process


# ------------------------------------------------------------------ 3. protect's arguments
def _model() -> torch.nn.Module:
    return torch.nn.Linear(2, 2)


def test_protect_refuses_a_checkpointer_with_another_root(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "a"))
    try:
        with pytest.raises(ValueError) as info:
            recoverkit.protect(
                str(tmp_path / "b"), model=_model(), loader=range(2), checkpointer=ckpt
            )
        assert str(tmp_path / "a") in str(info.value) and str(tmp_path / "b") in str(info.value)
    finally:
        ckpt.close()


def test_protect_refuses_a_checkpointer_with_other_options(tmp_path):
    root = str(tmp_path / "a")
    ckpt = Checkpointer(root, options=CheckpointOptions(capture_rng=False))
    try:
        with pytest.raises(ValueError, match="options") as info:
            recoverkit.protect(
                root,
                model=_model(),
                loader=range(2),
                checkpointer=ckpt,
                options=CheckpointOptions(capture_rng=True),
            )
        assert "capture_rng=False" in str(info.value) and "capture_rng=True" in str(info.value)
    finally:
        ckpt.close()


def test_protect_takes_a_checkpointer_that_agrees_or_alone(tmp_path):
    root = str(tmp_path / "a")
    opts = CheckpointOptions(capture_rng=False)
    for kwargs in ({"root": root + os.sep, "options": CheckpointOptions(capture_rng=False)}, {}):
        ckpt = Checkpointer(root, options=opts)
        with recoverkit.protect(
            model=_model(), loader=range(3), save_every=1, checkpointer=ckpt, **kwargs
        ) as run:
            assert run.ckpt is ckpt
            for _ in run:
                pass
        assert not ckpt._locks  # protect closed it (and released the run lock)
    with pytest.raises(ValueError, match="root"):
        recoverkit.protect(model=_model(), loader=range(3))


def test_protect_keywords_are_sugar_over_protect_options(tmp_path):
    params = inspect.signature(recoverkit.protect).parameters
    defaults = ProtectOptions()
    for f in dataclasses.fields(ProtectOptions):
        assert params[f.name].default == getattr(defaults, f.name), f.name  # one default, one place
    with recoverkit.protect(
        str(tmp_path / "a"), model=_model(), loader=range(3), save_every=2, grace_s=5.0
    ) as run:
        assert run.options == ProtectOptions(save_every=2, grace_s=5.0)
        for _ in run:
            pass
    with pytest.raises(ConfigError, match="save_every"):
        recoverkit.protect(str(tmp_path / "a"), model=_model(), save_every=0)
    with pytest.raises(ValueError, match="on_failed_saves"):
        ProtectOptions(on_failed_saves="ignore")


# ------------------------------------------------------------------ 4. the handle is public
@pytest.mark.parametrize("obj", [SaveHandle, ProtectOptions, Checkpointer.save, Checkpointer.steps])
def test_the_documented_examples_run(obj):
    import doctest

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    module = inspect.getmodule(obj)
    tests = doctest.DocTestFinder(recurse=False).find(obj, module=module, globs=dict(vars(module)))
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_save_async_returns_the_public_save_handle(tmp_path):
    assert recoverkit.SaveHandle is SaveHandle
    assert "Example" in (SaveHandle.__doc__ or "")
    with Checkpointer(str(tmp_path / "a")) as ckpt:
        handle = ckpt.save_async(1, _state(1.0))
        assert (
            isinstance(handle, recoverkit.SaveHandle)
            and handle.wait(60)
            and handle.committed_to == ["local"]
        )
