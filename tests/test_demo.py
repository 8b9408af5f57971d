"""The main job: its held-out split, and its smoke variant `kd-nnp demo demo=quick` end to end,
offline, twice (the rerun reuses every cache; ~1 min on 2 cores, so it stays in `make test`:
it is the only test of the whole pipeline in one run)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest


def test_split_holds_out_whole_molecules_across_databases():
    """Training crystals (test.db + mech.db) share neither SMILES nor formula with held-out ones."""
    from kd_nnp.demo import _molecule_keys, split_crystals

    ev, tr = split_crystals("test", 100, 8, None, 0, eval_max_atoms=60, train_dbs=["test", "mech"])
    assert len(ev) == 8 and all(len(a) <= 60 for _, a in ev)
    assert all(len(a) <= 100 for _, a in tr)
    held = set().union(*(_molecule_keys(a) for _, a in ev))
    assert not any(_molecule_keys(a) & held for _, a in tr)
    codes = [c for c, _ in tr]
    assert len(codes) == len(set(codes)) and not set(codes) & {c for c, _ in ev}
    # mech.db adds crystals that test.db alone does not have
    _, tr_test = split_crystals("test", 100, 8, None, 0, eval_max_atoms=60)
    assert len(tr) > len(tr_test)
    # deterministic for a seed; n_train takes a prefix of the same order
    ev2, tr2 = split_crystals("test", 100, 8, 5, 0, eval_max_atoms=60, train_dbs=["test", "mech"])
    assert [c for c, _ in ev2] == [c for c, _ in ev] and [c for c, _ in tr2] == codes[:5]


def test_split_logs_each_skipped_crystal_once(caplog):
    """D18: the evaluation and training passes read test.db twice; a skipped crystal is
    reported once (it was logged twice, 0.6 s apart, in the demo's train.log)."""
    import logging

    from kd_nnp.demo import split_crystals

    caplog.set_level(logging.INFO, logger="kd_nnp.demo")
    split_crystals("test", 100, 8, None, 0, eval_max_atoms=60, train_dbs=["test", "mech"])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert lines and len(lines) == len(set(lines))


def test_demo_default_teacher_and_prerelax_teacher(monkeypatch, tmp_path):
    """The demo distils CHGNet + D3 (chosen by measurement, docs/demo.md) from frames whose
    X-ray positions SO3LR pre-relaxed; `demo.prerelax_teacher=null` pre-relaxes with the
    teacher itself, and the store recipe records the pre-relaxing teacher."""
    from hydra import compose, initialize_config_dir

    import kd_nnp.training.crystal_store as cs
    from kd_nnp.demo import build_store
    from kd_nnp.training.crystal_store import prerelax_teacher

    conf = os.path.join(os.path.dirname(__file__), "..", "conf")
    with initialize_config_dir(os.path.abspath(conf), version_base=None):
        cfg = compose("demo")
        same = compose("demo", overrides=["teacher=so3lr"])
        own = compose("demo", overrides=["demo.prerelax_teacher=null"])
    assert cfg.teacher.name == cfg.demo.teacher == cfg.data.label_set == "chgnet_d3"
    assert prerelax_teacher(cfg) == "so3lr"
    assert same.data.label_set == "so3lr" and prerelax_teacher(same) == "so3lr"
    assert prerelax_teacher(own) == "chgnet_d3"
    seen = []
    monkeypatch.setattr(cs, "build_crystal_store", lambda *a, teacher, **k: seen.append(teacher))
    build_store(cfg, [], tmp_path)
    build_store(own, [], tmp_path)
    assert seen == ["so3lr", "chgnet_d3"]


@pytest.mark.teacher("so3lr", "chgnet_d3")  # the demo's pre-relaxing and default teachers
def test_quick_demo_runs_end_to_end(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "kd_nnp.cli", "demo", "demo=quick",
           f"paths.output_dir={tmp_path}"]  # fmt: skip
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    out = tmp_path / "demo-quick"  # conf/demo/quick.yaml
    result = json.loads((out / "demo_result.json").read_text())
    methods = {row["method"] for row in result["summary"]}
    assert {"CHGNet (pretrained)", "teacher (chgnet_d3)", "student (distilled)"} <= methods
    for key in ("table", "loss_curves", "student"):
        assert os.path.exists(result["paths"][key]), key
    assert (out / "relax" / "parity_volume.png").exists()
    crystals = json.loads((out / "crystals.json").read_text())
    assert not set(crystals["eval"]) & set(crystals["train"])
    assert "results" in r.stdout and "outputs:" in r.stdout
    assert "volume distance to the teacher" in r.stdout
    assert "pre-relaxed by so3lr" in r.stdout
    # demo.overlap_baselines: CHGNet and the teacher relaxed during training, nothing twice
    assert "baseline_wait" in result["times_s"]
    recs = [json.loads(x) for x in (out / "relax" / "relax.jsonl").read_text().splitlines()]
    pairs = [(x["method"], x["id"]) for x in recs]
    assert len(pairs) == len(set(pairs)) == 3 * len(crystals["eval"])
    assert result["to_teacher"]["student (distilled)"]["reference"] == "teacher (chgnet_d3)"
    # the forgetting check (conf/demo/quick.yaml: 5 built-in structures, no perturbed copies,
    # + the shared MPtrj frames when present): the trained MLP moved the student
    fg = result["forgetting"]["summary"]
    assert fg["n"] >= 5 and fg["n_relaxed"] == 5 and result["forgetting"]["n_errors"] == 0
    for key in ("energy_mae_ev_atom", "force_mae_ev_a", "vol_change_mae_pct"):
        assert math.isfinite(fg[key]) and fg[key] > 0, key
    assert fg["energy_mae_ev_atom"] < 1.0  # eV/atom: moved, not broken
    assert "forgetting (student vs pretrained CHGNet" in r.stdout
    # the lattice-energy column: every method, every held-out crystal, finite and bound
    lat = result["lattice"]
    assert lat["reference"] == "teacher (chgnet_d3)" and not lat["failures"], lat["failures"]
    assert {row["method"] for row in lat["summary"]} == methods
    for crystal in crystals["eval"]:
        values = lat["per_crystal_kj_mol"][crystal]
        for m in methods:
            assert values[m] is not None and -400 < values[m] < 0, (crystal, m, values)
    teacher_row = next(r for r in lat["summary"] if r["method"] == "teacher (chgnet_d3)")
    assert teacher_row["mae"] == 0.0 and teacher_row["n"] == len(crystals["eval"])
    assert "E_latt mean" in r.stdout and "lattice energy per crystal" in r.stdout
    assert os.path.exists(result["paths"]["lattice_table"])
    assert not (out / "lattice" / "relax").exists()  # the benchmark's relaxed crystals are used
    # rerun: every stage reuses its cache (no relabelling, no retraining, no re-relaxing)
    gas_lines = (out / "lattice" / "gas.jsonl").read_text()
    r2 = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r2.returncode == 0, r2.stderr[-4000:]
    again = json.loads((out / "demo_result.json").read_text())
    assert again["times_s"]["train"] < 0.5 * result["times_s"]["train"] + 5
    assert (out / "lattice" / "gas.jsonl").read_text() == gas_lines
    assert again["lattice"]["per_crystal_kj_mol"] == lat["per_crystal_kj_mol"]


def test_baseline_relaxations_run_in_a_background_process(tmp_path, caplog):
    """`demo.overlap_baselines`: the baselines relax in another process (own file) while the
    student trains; their records are merged into the benchmark's file, which then relaxes
    nothing twice. A background process that fails is reported, and the benchmark redoes its
    work."""
    from kd_nnp.demo import merge_relax_records, start_baseline_relaxations, wait_for_baselines
    from kd_nnp.evaluation.relax import run_relax_benchmark
    from kd_nnp.evaluation.settings import RelaxSettings
    from kd_nnp.evaluation.structures import load_dataset
    from kd_nnp.utils.jsonl import read_jsonl

    crystals = [(c.id, c.atoms) for c in load_dataset("pyxtal:test", limit=2, max_atoms=40)]
    settings = RelaxSettings(fmax=0.01)
    base = {"baseline": "test_eval_relax:scaled_calc"}
    student = {"student": "test_eval_relax:scaled_calc"}
    kw = dict(workers=1, references=False, progress=False)
    proc = start_baseline_relaxations(crystals, base, tmp_path / "bg", settings)
    assert proc.pid != os.getpid()
    run_relax_benchmark(crystals, student, tmp_path / "relax", settings, report=False, **kw)
    wait_for_baselines(proc)
    assert proc.exitcode == 0
    bg = (tmp_path / "bg" / "relax.jsonl").read_text().splitlines()
    assert len(bg) == 2 and all(json.loads(r)["status"] == "ok" for r in bg)
    dst = tmp_path / "relax" / "relax.jsonl"
    assert merge_relax_records(tmp_path / "bg" / "relax.jsonl", dst) == 2
    assert merge_relax_records(tmp_path / "bg" / "relax.jsonl", dst) == 0  # idempotent
    merged = dst.read_text().splitlines()
    df = run_relax_benchmark(crystals, {**base, **student}, tmp_path / "relax", settings, **kw)
    assert dst.read_text().splitlines() == merged and len(merged) == 4  # nothing relaxed twice
    assert sorted(df["method"]) == ["baseline", "baseline", "student", "student"]

    bad = start_baseline_relaxations(crystals, {"x": "no_such_module_xyz:factory"},
                                     tmp_path / "b", settings)  # fmt: skip
    with caplog.at_level("WARNING", logger="kd_nnp.demo"):
        wait_for_baselines(bad)
    assert bad.exitcode != 0 and "exited with code" in caplog.text
    assert not read_jsonl(tmp_path / "b" / "relax.jsonl")
