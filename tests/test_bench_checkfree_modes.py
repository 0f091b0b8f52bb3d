"""bench_checkfree's optional modes: the exact per-step snapshot, random re-initialisation, and
``--merge`` adding modes to a published result.

The snapshot mode restores a lost stage's model and AdamW from an in-memory copy taken every step:
the restored stage must equal the one that never failed bit for bit (checked on the simulator's
parameters and optimizer state), and the benchmark's loss-vs-step curve must equal the
failure-free one bit for bit. The smoke run (``--smoke``: a 4-stage decoder, 24 steps, seeded
failures) is checked for structure and for the clock's accounting (the replica overhead and the
exact recovery charged from the published figures); timings are never asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.bench_helpers import REPO, numbers


def _sim():
    from bench._llama import ModelSpec, corpus
    from bench.bench_checkfree import SEED, SIZES, Sim

    z = SIZES[True]
    spec = ModelSpec(**z["spec"])
    from bench._llama import Batches

    batches = Batches(corpus(z["corpus_bytes"]), spec.seq_len, z["micro_batch"], SEED)
    return Sim(spec, seed=SEED, lr=z["lr"], warmup=z["warmup"], swap=False), batches, z["micro_batches"]


def test_snapshot_restore_is_bit_exact():
    torch.set_num_threads(1)
    a, batches, mb = _sim()
    b, _, _ = _sim()
    for step in range(6):
        mbs = [batches.train(step, m) for m in range(mb)]
        if step == 3:  # stage 1 of b is lost before step 3: a new stage loaded from the last snapshot
            did = b.restore_snapshot(1)
            assert "snapshot" in did
        la, lb = a.train_step(step, mbs), b.train_step(step, mbs)
        assert la == lb, step
        b.take_snapshot()
    for sa, sb in zip(a.stages, b.stages):
        for (na, ta), (nb, tb) in zip(sa.state_dict().items(), sb.state_dict().items()):
            assert na == nb and torch.equal(ta, tb), na
    for oa, ob in zip(a.opts, b.opts):
        sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for k in sa:
            for key in sa[k]:
                assert torch.equal(torch.as_tensor(sa[k][key]), torch.as_tensor(sb[k][key])), (k, key)
    # no snapshot yet: a clear error, not a silent random stage
    c, _, _ = _sim()
    with pytest.raises(RuntimeError, match="no snapshot of stage 2"):
        c.restore_snapshot(2)


def _run(out, tmp_path, modes, *extra):
    cmd = [sys.executable, "-m", "bench.bench_checkfree", "--smoke", "--modes", modes, "--out-dir", str(out),
           "--workdir", str(tmp_path), "--name", "checkfree_modes", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "checkfree_modes.json").read_text())


@pytest.mark.slow
def test_snapshot_and_random_modes_smoke(tmp_path):
    out = tmp_path / "out"
    r = _run(out, tmp_path, "no-failure,snapshot,random")
    assert r["modes"] == ["no-failure", "snapshot", "random"]
    assert all(math.isfinite(x) for x in numbers(r))
    assert (out / "checkfree_modes.md").read_text().startswith("### checkfree_modes")
    tm = r["timing"]
    assert tm["replica_overhead"] >= 0 and tm["replica_recover_s"] > 0
    assert "replica" in tm["sources"]["replica_overhead"] and tm["sources"]["replica_recover_s"]
    for rate, pr in r["per_rate"].items():
        runs, s = pr["runs"], pr["summary"]
        assert set(s) == set(runs) == {"no-failure", "snapshot", "random"}, rate
        ref = [(p["step"], p["val"]) for p in runs["no-failure"]["curve"]]
        snap = runs["snapshot"]
        # exact recovery: the computed loss-vs-step curve is the failure-free one, bit for bit
        assert [(p["step"], p["val"]) for p in snap["curve"]] == ref
        assert s["snapshot"]["bit_identical_to_ref"] is True
        assert s["snapshot"]["failures"] >= 2 and s["snapshot"]["edge_failures"] >= 1, s["snapshot"]
        assert s["snapshot"]["restarts"] == 0 and s["snapshot"]["lost_steps"] == 0
        assert s["snapshot"]["recoveries"] == snap["exact_recoveries_total"] >= 1
        assert snap["recoveries_total"] == 0 and snap["replica_steps_total"] == snap["iteration_total"]
        assert all("per-step snapshot" in f["action"] for f in snap["failures"]), snap["failures"]
        # the clock: every step charged step_s x (1 + the replica overhead), each recovery the replica's
        want = (snap["iteration_total"] * tm["step_s"] * (1 + tm["replica_overhead"])
                + snap["exact_recoveries_total"] * tm["replica_recover_s"])
        assert math.isclose(s["snapshot"]["sim_seconds"], want, rel_tol=1e-9), (s["snapshot"]["sim_seconds"], want)
        # random re-initialisation met the same failures and is not exact
        rnd = runs["random"]
        assert [f["iteration"] for f in rnd["failures"]] == [f["iteration"] for f in snap["failures"]]
        assert all(f["action"] == "re-initialised at random; lr x 1.1" for f in rnd["failures"]), rnd["failures"]
        assert [p["val"] for p in rnd["curve"]] != [p["val"] for p in runs["no-failure"]["curve"]]

    # --merge adds another mode to the published result of the same run, keeping the old ones
    before = r["per_rate"]
    m = _run(out, tmp_path, "no-failure,uniform", "--merge")
    assert m["modes"] == ["no-failure", "snapshot", "uniform", "random"]
    for rate, pr in m["per_rate"].items():
        assert set(pr["runs"]) == {"no-failure", "snapshot", "random", "uniform"}, rate
        assert pr["runs"]["snapshot"]["curve"][-1]["val"] == before[rate]["runs"]["snapshot"]["curve"][-1]["val"]
        assert pr["summary"]["snapshot"]["bit_identical_to_ref"] is True
    assert "| snapshot (per-step replica" in (out / "checkfree_modes.md").read_text()


def test_restart_is_charged_torchruns_job_restart_where_measured(tmp_path):
    """checkpoint-restart's restart: the real pipeline's job restart (torchrun restarting every
    worker) plus this model's restore where published, else the in-process restart; a hostile
    figure (negative, NaN, a string, a bool) is not charged."""
    from bench._checkfree_clock import charged, clock, pipeline_figures

    measured = {"step_s": 0.2, "save_s": 0.05, "restore_s": 0.04, "stage_bytes": 1e6, "reps": 3.0}
    base = {"summary": {"step_s": 0.01, "detection_s": 0.05, "relaunch_s": 1.0, "fetch_s": 0.02}}

    def timing(restart):
        (tmp_path / "checkfree_pipeline.json").write_text(json.dumps({**base, "restart": restart}))
        return charged(measured, (str(tmp_path),), 4, 128)

    tm = timing({"job_ready_s": 5.0})
    assert tm.job_relaunch_s == 5.0 and math.isclose(tm.restart_s, 5.04)
    assert math.isclose(tm.inprocess_restart_s, 0.05 + 1.0 + 0.04)
    assert "torchrun" in tm.sources["job_relaunch_s"]
    point = {"iteration": 10, "saves": 2, "restarts": 1, "recoveries": 0}
    assert math.isclose(clock(point, tm), 10 * 0.2 + 2 * 0.05 + 5.04)
    for bad in (-1.0, float("nan"), "5", True, None):
        tm = timing({"job_ready_s": bad})
        assert tm.job_relaunch_s is None and math.isclose(tm.restart_s, tm.inprocess_restart_s), bad
    (tmp_path / "checkfree_pipeline.json").write_text(json.dumps({**base, "restart": [5.0]}))
    got = pipeline_figures((str(tmp_path),))
    assert got is not None and got[0]["job_relaunch_s"] is None
    # the in-process rollback measured on the real pipeline: its detection + regroup, this restore
    rollback = {"detection_s": 0.06, "regroup_s": 1.2}
    (tmp_path / "checkfree_pipeline.json").write_text(json.dumps({**base, "rollback": rollback}))
    tm = charged(measured, (str(tmp_path),), 4, 128)
    assert math.isclose(tm.inprocess_restart_s, 0.06 + 1.2 + 0.04) and "rollback" in tm.sources["rollback_ready_s"]
    for bad in (-1.0, float("nan"), "1", True, None):
        (tmp_path / "checkfree_pipeline.json").write_text(json.dumps({**base, "rollback": {**rollback, "regroup_s": bad}}))
        tm = charged(measured, (str(tmp_path),), 4, 128)
        assert tm.rollback_ready_s is None and math.isclose(tm.inprocess_restart_s, 0.05 + 1.0 + 0.04), bad


def test_checkfree_fallback_rebuilds_interior_stages_and_rolls_back_for_the_edges(tmp_path):
    """checkfree-fallback: an interior stage lost is rebuilt by CheckFree (no rollback), an edge
    stage lost rolls every stage back to the newest save; the clock charges both, the rollback
    at the in-process rollback's time where the real pipeline's job restart is published (the
    pipeline rolls back in process; checkpoint-restart is charged torchrun's restart)."""
    out = tmp_path / "out"
    r = _run(out, tmp_path, "no-failure,checkfree-fallback", "--failure-seed", "5")
    assert r["failure_seed"] == 5
    tm = r["timing"]
    for rate, pr in r["per_rate"].items():
        run_ = pr["runs"]["checkfree-fallback"]
        assert run_["ckpt_every"] == pr["ckpt_every_fallback"] >= 1
        edge = [f for f in run_["failures"] if set(f["stages"]) & {0, r["stages"] - 1}]
        inner = [f for f in run_["failures"] if f not in edge]
        assert edge and inner, (rate, run_["failures"])  # the seed gives both kinds
        assert all(f["action"].startswith("rolled back to step") for f in edge), edge
        assert all(f["action"].startswith("average of") for f in inner), inner
        assert run_["restarts_total"] >= 1 and run_["recoveries_total"] >= 1 and run_["saves_total"] >= 1
        rollback = tm["inprocess_restart_s"] if tm["job_relaunch_s"] is not None else tm["restart_s"]
        want = (run_["iteration_total"] * tm["step_s"] + run_["saves_total"] * tm["save_s"]
                + run_["restarts_total"] * rollback + run_["recoveries_total"] * tm["recover_s"])
        assert math.isclose(pr["summary"]["checkfree-fallback"]["sim_seconds"], want, rel_tol=1e-9)
    # a merge keeps to the same failure schedule
    proc = subprocess.run([sys.executable, "-m", "bench.bench_checkfree", "--smoke", "--modes", "no-failure,random",
                           "--out-dir", str(out), "--workdir", str(tmp_path), "--name", "checkfree_modes", "--merge"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "failure seed" in proc.stderr, proc.stderr[-2000:]


def test_lr_scale_reaches_every_rebuilt_stage_and_is_recorded(tmp_path):
    """--lr-scale sets a rebuilt stage's learning-rate factor (the default is CheckFreeOptions's,
    the paper's 1.1): every rebuild logs the factor it gave its fresh optimizer, the result
    records it and the table names it; runs of the default record nothing, as before."""
    out = tmp_path / "out"
    r = _run(out, tmp_path, "no-failure,checkfree", "--lr-scale", "1.7")
    assert r["sizes"]["lr_scale"] == 1.7
    actions = [f["action"] for pr in r["per_rate"].values() for f in pr["runs"]["checkfree"]["failures"]]
    assert actions and all(a.endswith("; lr x 1.7") for a in actions), actions
    assert "a rebuilt stage's rate 1.7 x the base" in (out / "checkfree_modes.md").read_text()
    r = _run(out, tmp_path, "no-failure,checkfree")
    assert "lr_scale" not in r["sizes"]
    actions = [f["action"] for pr in r["per_rate"].values() for f in pr["runs"]["checkfree"]["failures"]]
    assert actions and all(a.endswith("; lr x 1.1") for a in actions), actions


def test_distill_steps_fit_the_rebuilt_stage_and_are_charged(tmp_path):
    """--distill-steps N: a rebuilt interior stage is fitted to the lost stage's last-step
    input -> output pairs (its log names the fit, the error falling; a rebuild before any step
    completed has no pairs and is not fitted); the clock charges N fitting steps a recovery at
    distill_step_s, the share of a pipeline step (m of its m + S - 1 slots) that one stage's
    forward and backward over the m micro-batches takes; the table names it. Without the option
    nothing is fitted or charged."""
    import dataclasses
    import re

    from bench._checkfree_clock import Timing, clock

    out = tmp_path / "out"
    r = _run(out, tmp_path, "no-failure,checkfree", "--distill-steps", "5")
    z, t = r["sizes"], r["timing"]
    assert z["distill_steps"] == 5
    m, stages = z["micro_batches"], r["stages"]
    assert math.isclose(t["distill_step_s"], t["step_s"] * m / (m + stages - 1))
    tm = Timing(**{f.name: t[f.name] for f in dataclasses.fields(Timing)})
    fitted_any = False
    for pr in r["per_rate"].values():
        run = pr["runs"]["checkfree"]
        fitted = [f for f in run["failures"] if "fitted" in f["action"]]
        fitted_any = fitted_any or bool(fitted)
        for f in fitted:
            first, last = re.search(r"mse (\S+) -> (\S+)\)", f["action"]).groups()
            assert float(last) < float(first), f["action"]
        assert not [f for f in run["failures"] if f["iteration"] == 0 and "fitted" in f["action"]]
        point = run["curve"][-1]
        assert point["distill_steps"] == 5 * len({f["iteration"] for f in fitted})
        assert math.isclose(point["t"] - clock({**point, "distill_steps": 0}, tm),
                            point["distill_steps"] * t["distill_step_s"])
    assert fitted_any
    assert "then fitted in 5 steps" in (out / "checkfree_modes.md").read_text()
    r = _run(out, tmp_path, "no-failure,checkfree")
    assert "distill_steps" not in r["sizes"]
    for pr in r["per_rate"].values():
        run = pr["runs"]["checkfree"]
        assert not [f for f in run["failures"] if "fitted" in f["action"]]
        assert run["curve"][-1]["distill_steps"] == 0


def test_stages_give_a_deeper_model_judged_against_its_own_seed_noise(tmp_path):
    """--stages N trains a pipeline of N one-block stages (failures drawn over N stages), and
    --noise-seeds with it publishes checkfree_s<N>_noise.json, which that run's final loss is
    judged against; a noise file of the default sizes is not."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.bench_checkfree", "--smoke", "--stages", "5",
                           "--noise-seeds", "2", "--out-dir", str(out), "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "checkfree_noise.json").exists()
    noise = json.loads((out / "checkfree_s5_noise.json").read_text())
    assert noise["sizes"]["spec"]["stages"] == 5
    r = _run(out, tmp_path, "no-failure,checkfree", "--stages", "5")
    assert r["stages"] == 5 and len(r["params_per_stage"]) == 5
    assert r["reference"]["seeds"]["source"].endswith("checkfree_s5_noise.json")
    assert "5 stages x 1 block" in (out / "checkfree_modes.md").read_text()
    r = _run(out, tmp_path, "no-failure,checkfree")
    assert r["stages"] == 4 and r["reference"]["seeds"] is None  # the 5-stage noise is not of this run
    proc = subprocess.run([sys.executable, "-m", "bench.bench_checkfree", "--smoke", "--stages", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--stages must be in [4, 16]" in proc.stderr


def test_noise_seeds_give_the_seed_to_seed_spread_every_result_is_judged_against(tmp_path):
    """--noise-seeds trains the failure-free run with other seeds (initialisation, data order)
    and publishes its final losses; a result of the same sizes and corpus then reports the
    seed-to-seed std and each method's final-loss difference in those stds. A file of other
    sizes, or with hostile values, is not used."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.bench_checkfree", "--smoke", "--noise-seeds", "2",
                           "--out-dir", str(out), "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = json.loads((out / "checkfree_noise.json").read_text())
    assert sorted(noise["finals"]) == ["1235", "1236"] and len(set(noise["finals"].values())) == 2
    r = _run(out, tmp_path, "no-failure,checkfree")
    seeds = r["reference"]["seeds"]
    vals = [r["reference"]["final_val"], *noise["finals"].values()]
    m = sum(vals) / 3
    assert seeds["seeds"] == 3 and math.isclose(seeds["std"], math.sqrt(sum((v - m) ** 2 for v in vals) / 2))
    for pr in r["per_rate"].values():
        row = pr["summary"]["checkfree"]
        assert math.isclose(row["final_val_seed_sigmas"], row["final_val_minus_ref"] / seeds["std"])
    assert "seed-to-seed stds" in (out / "checkfree_modes.md").read_text()
    from bench._checkfree_summary import seed_spread

    for bad in ({**noise, "sizes": {"steps": 1}}, {**noise, "finals": {"1": "x", "2": float("nan")}}):
        (out / "checkfree_noise.json").write_text(json.dumps(bad))
        assert seed_spread((str(out),), r) is None
