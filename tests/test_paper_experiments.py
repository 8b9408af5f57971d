"""The paper's experiment configs (sweeps, ratios) and the per-job evaluation of students."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kd_nnp.utils.paths import conf_dir

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = "NAPHTA15"  # 36 atoms, no molecule of the labelled_store's crystals


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose(
            "train", overrides=["data.store=STORE", *overrides], return_hydra_config=True
        )


def _sweep_jobs(params) -> list[dict[str, str]]:
    """Expand ``hydra.sweeper.params`` the way Hydra's basic sweeper does."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    keys = [o.get_key_element() for o in parsed]
    values = [
        list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        for o in parsed
    ]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def _ratios(cfg) -> tuple[float, float, float, float]:
    return (cfg.loss.r_he, cfg.loss.r_hf, cfg.loss.r_se, cfg.loss.r_sf)


def _check_paper_preset(cfg) -> None:
    assert cfg.model.optimizer.lr == 0.01 and cfg.model.optimizer._target_ == "torch.optim.Adam"
    assert cfg.data.batch_size == 32 and cfg.student.freeze == "mlp"
    assert cfg.evaluate is not None and cfg.evaluate.dataset == "pyxtal:test"
    assert set(cfg.evaluate.baselines) == {"CHGNet (pretrained)", "teacher"}
    assert cfg.evaluate.references is False


def test_paper_fig4_config():
    cfg = _compose(["experiment=paper_fig4"])
    _check_paper_preset(cfg)
    assert cfg.trainer.max_epochs == 100
    jobs = _sweep_jobs(cfg.hydra.sweeper.params)
    assert len(jobs) == 2 * 5 * 5
    assert {j["loss"] for j in jobs} == {"hard_only", "soft_only"}
    assert {j["data.n_train"] for j in jobs} == {"10", "100", "500", "1000", "5000"}
    assert {j["seed"] for j in jobs} == {str(s) for s in range(5)}
    hard = _compose(["experiment=paper_fig4", "loss=hard_only", "data.n_train=500", "seed=3"])
    assert _ratios(hard) == (1.0, 1.0, 0.0, 0.0) and hard.data.n_train == 500
    assert hard.seed == 3 and hard.data.seed == 3
    soft = _compose(["experiment=paper_fig4", "loss=soft_only"])
    assert _ratios(soft) == (0.0, 0.0, 1.0, 1.0)
    assert "paper_fig4" in cfg.hydra.sweep.dir


def test_paper_table1_config():
    cfg = _compose(["experiment=paper_table1"])
    _check_paper_preset(cfg)
    jobs = _sweep_jobs(cfg.hydra.sweeper.params)
    assert len(jobs) == 5**4
    grid = {"0.1", "0.5", "1", "2", "10"}
    assert {j["loss.r_he"] for j in jobs} == grid and {j["loss.r_hf"] for j in jobs} == grid
    for job in (jobs[0], jobs[-1], jobs[len(jobs) // 3]):
        c = _compose(["experiment=paper_table1", *(f"{k}={v}" for k, v in job.items())])
        assert _ratios(c) == (float(job["loss.r_he"]), float(job["loss.r_hf"]), 1.0, 1.0)
        assert c.loss.r_hs == 0.0 and c.loss.r_ss == 0.0
        assert c.data.n_train == int(job["data.n_train"]) and c.seed == int(job["seed"])


def test_paper_fig6_config():
    cfg = _compose(["experiment=paper_fig6"])
    _check_paper_preset(cfg)
    jobs = _sweep_jobs(cfg.hydra.sweeper.params)
    assert [j["loss.r_he"] for j in jobs] == ["0.1", "0.5", "1", "2", "10"]
    assert cfg.trainer.max_epochs == 200 and cfg.data.n_train == 1000 and cfg.seed == 0
    assert cfg.validate_before_training  # epoch 0 = the pretrained model (crossover start)
    c = _compose(["experiment=paper_fig6", "loss.r_he=0.5"])
    assert _ratios(c) == (0.5, 1.0, 1.0, 1.0)
    assert c.callbacks.loss_crossover._target_.endswith("LossCrossover")


def test_paper_table2_config():
    cfg = _compose(["experiment=paper_table2"])
    _check_paper_preset(cfg)
    assert _ratios(cfg) == (0.0, 0.0, 1.0, 1.0)
    jobs = _sweep_jobs(cfg.hydra.sweeper.params)
    assert len(jobs) == 5 and {j["data.n_train"] for j in jobs} == {"5000"}
    el = cfg.evaluate.elastic
    assert el is not None and list(el.strains) == [0.005, 0.01]
    assert el.fmax == cfg.evaluate.fmax and el.workers == cfg.evaluate.workers


def test_wandb_logger_groups_by_sweep_and_tags_the_job():
    cfg = _compose(
        ["experiment=paper_table1", "logger=wandb", "loss.r_he=0.5", "data.n_train=100", "seed=2"]
    )
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)  # the ${hydra:...} resolver of a running job
    try:
        wb = OmegaConf.to_container(cfg.logger.wandb, resolve=True)
    finally:
        HydraConfig.instance().cfg = None
    assert wb["offline"] is True and wb["group"] == cfg.hydra.sweep.dir
    assert wb["job_type"] == "paper_table1"
    for tag in ("r_he=0.5", "r_hf=1.0", "r_se=1.0", "n_train=100", "seed=2", "loss=mixed"):
        assert tag in wb["tags"], (tag, wb["tags"])


def test_evaluate_group_on_any_run():
    cfg = _compose(["+evaluate=relax", "teacher=gfn2"])
    assert cfg.evaluate.baselines.teacher == "teacher:gfn2"
    assert cfg.evaluate.elastic is None
    assert _compose([]).evaluate is None


def test_n_train_above_pool_is_a_clear_error(labelled_store):
    from kd_nnp.training.data import FramesDataModule

    dm = FramesDataModule(
        str(labelled_store), label_set="toy_teacher", n_train=5000, n_val=5, grouped=False
    )
    with pytest.raises(ValueError, match="n_train=5000 but only 15 training frames"):
        dm.setup("fit")


def test_evaluate_refuses_bad_settings(tmp_path):
    from kd_nnp.evaluation.job import codes_from_split, evaluate_student

    student = tmp_path / "student.pt"
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['fmx'\]"):
        evaluate_student(OmegaConf.create({"fmx": 0.1}), student, tmp_path)
    split = tmp_path / "crystals.json"
    split.write_text(json.dumps({"eval": [HELD_OUT], "train": ["UREAXX02"]}))
    assert codes_from_split(split) == [HELD_OUT]
    with pytest.raises(ValueError, match="codes or split_from, not both"):
        evaluate_student(
            OmegaConf.create({"codes": ["X"], "split_from": str(split)}), student, tmp_path
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        codes_from_split(tmp_path / "nope.json")
    split.write_text(json.dumps({"train": ["UREAXX02"]}))
    with pytest.raises(ValueError, match="no non-empty 'eval' list"):
        codes_from_split(split)
    with pytest.raises(KeyError, match="NOTACODE"):
        evaluate_student(OmegaConf.create({"codes": ["NOTACODE"]}), student, tmp_path)


@pytest.mark.slow  # ~70 s: a 2-job sweep with relaxations (default suite near its 15-min limit)
def test_paper_sweep_with_evaluation_reuses_baselines(labelled_store, tmp_path):
    """Two jobs of experiment=paper_fig4 (shrunk), each evaluating its student on one held-out
    crystal (demo-style split file); pretrained CHGNet is relaxed once, by the first job."""
    split = tmp_path / "crystals.json"
    split.write_text(json.dumps({"eval": [HELD_OUT], "train": ["OXALAC11", "UREAXX02"]}))
    sweep = tmp_path / "sweep"
    args = [
        "train", "-m", "experiment=paper_fig4",
        f"data.store={labelled_store}", "data.label_set=toy_teacher", "data.n_val=5",
        "data.batch_size=10", "data.grouped=false", "data.n_train=10", "seed=0,1",
        "loss=soft_only", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "validate_before_training=false",
        f"evaluate.split_from={split}", "evaluate.max_atoms=null", "evaluate.fmax=0.3",
        "evaluate.max_steps=20", "evaluate.stress_tol_gpa=5", "~evaluate.baselines.teacher",
        "evaluate.forgetting={prototypes:[Si,NH4Cl],n_perturbed:1}",  # the check, small
        f"paths.output_dir={tmp_path / 'out'}", f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.num}_seed${seed}",  # the overrides: a too long name
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="1")
    r = subprocess.run(
        [sys.executable, "-m", "kd_nnp.cli", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    jobs = sorted(sweep.glob("*/metrics.json"))
    assert [p.parent.name for p in jobs] == ["0_seed0", "1_seed1"]
    evals = [json.loads(p.read_text())["evaluation"] for p in jobs]
    baseline_dirs = set()
    for job, ev in zip(jobs, evals, strict=True):
        assert set(ev) == {"dataset", "crystals", "settings", "summary", "per_crystal", "baselines",
                           "forgetting"}  # fmt: skip
        assert ev["dataset"] == "pyxtal:test" and ev["crystals"] == [HELD_OUT]
        assert ev["settings"]["split_from"] == str(split)
        assert ev["settings"]["fmax"] == 0.3 and ev["settings"]["max_steps"] == 20
        s = ev["summary"]
        assert s["method"] == "student" and s["n_covered"] == 1
        for key in ("n_failures", "vol_mae_pct", "vol_mean_pct", "density_mae", "rmsd15_mean",
                    "rmsd15_matched_mean"):  # fmt: skip
            assert key in s, key
        assert isinstance(s["vol_mae_pct"], float) and s["vol_mae_pct"] > 0
        (pc,) = ev["per_crystal"]
        assert set(pc) == {"id", "vol_err_pct", "density_err", "rmsd15", "failure", "converged"}
        assert pc["id"] == HELD_OUT and abs(pc["vol_err_pct"]) == pytest.approx(s["vol_mae_pct"])
        assert list(ev["baselines"]) == ["CHGNet (pretrained)"]
        assert ev["baselines"]["CHGNet (pretrained)"]["n_covered"] == 1
        assert ev["settings"]["student_spec"] == f"student:{job.parent / 'student.pt'}"
        assert (job.parent / "eval" / "relax.jsonl").read_text().count("\n") == 1
        assert (job.parent / "eval" / "table.md").exists()
        baseline_dirs.add(ev["settings"]["baseline_dir"])
        text = json.dumps(ev)
        assert "NaN" not in text and "Infinity" not in text
    # one shared baseline folder, relaxed once: both jobs report the same CHGNet numbers and
    # the second job appended nothing to the cached results
    (bdir,) = baseline_dirs
    bdir = Path(bdir)
    assert bdir.parent == (tmp_path / "out" / "baselines").resolve()
    lines = (bdir / "relax.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["method"] == "chgnet"
    assert len((bdir / "run.json").read_text().splitlines()) == 2  # visited by both jobs
    assert evals[0]["baselines"] == evals[1]["baselines"]
    # the students differ (two seeds of one epoch), the pretrained reference does not
    assert evals[0]["summary"]["vol_mae_pct"] != evals[1]["summary"]["vol_mae_pct"]
    # the forgetting check (default on): the student moved away from pretrained CHGNet, whose
    # reference results were computed once (by the first job) in the shared baseline root
    fg = [ev["forgetting"] for ev in evals]
    for f in fg:
        assert f["summary"]["energy_mae_ev_atom"] > 0 and f["summary"]["n_relaxed"] == 2
        assert f["n_errors"] == 0 and set(f["vol_change_pct"]) == {"Si", "NH4Cl"}
        assert Path(f["path"]).is_file()
    assert fg[0]["reference"] == fg[1]["reference"] and fg[0]["summary"] != fg[1]["summary"]
    (ref,) = (tmp_path / "out" / "baselines").glob("forgetting-*/points.jsonl")
    assert {json.loads(x)["method"] for x in ref.read_text().splitlines()} == {"chgnet"}
    assert Path(fg[0]["reference_dir"]) == ref.parent.resolve()


# ------------------------------------------------------------------ Table 2 (elastic)
def half_linear_calc():
    """The known-answer elastic model of test_eval_elastic with half its stiffness."""
    from test_eval_elastic import C_KNOWN, LinearElasticCalc

    return LinearElasticCalc(0.5 * C_KNOWN)


@pytest.mark.shared_data
def test_elastic_comparison_table2_layout_and_cached_baselines(shared_data, tmp_path):
    import numpy as np
    from test_eval_elastic import C_KNOWN

    from kd_nnp.evaluation.elastic import load_reference_tensors, moduli_from_stiffness
    from kd_nnp.evaluation.job import elastic_comparison

    kw = dict(
        baselines={"linear": "test_eval_elastic:linear_calc"},
        baseline_root=tmp_path / "baselines",
        shared_dir=shared_data,
        compounds=["urea"],
        strains=(0.01,),
    )
    res = elastic_comparison(
        {"KD": "test_paper_experiments:half_linear_calc"}, tmp_path / "a", **kw
    )
    assert res["columns"] == ["Mean model", "PFP", "linear", "KD"]
    assert res["counts"]["KD"] == {"n": 1, "excluded": 0}
    exp = load_reference_tensors(shared_data / "elastic" / "stiffness_tensors_rev.csv")
    exp = exp[exp["method"] == "Exp"].set_index("compound_key")
    for col, c in (("KD", 0.5 * C_KNOWN), ("linear", C_KNOWN)):
        want = moduli_from_stiffness(c)
        for m in ("E_RH", "K_V", "G_R"):
            assert res["mae"][col][m] == pytest.approx(abs(want[m] - exp.loc["urea", m]), rel=2e-3)
    assert res["mae"]["Mean model"]["E_RH"] == 0.0  # one compound: its own mean
    assert np.isfinite(res["mae"]["PFP"]["E_RH"])
    md = (tmp_path / "a" / "elastic.md").read_text()
    header = next(line for line in md.splitlines() if "Mean model" in line)
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "",
        "Mean model",
        "PFP",
        "linear",
        "KD",
    ]
    # a second student reuses the cached baseline results
    bdir = Path(res["settings"]["baseline_dir"])
    assert bdir.parent == (tmp_path / "baselines").resolve()
    assert len((bdir / "elastic.jsonl").read_text().splitlines()) == 1
    res2 = elastic_comparison(
        {"KD2": "test_paper_experiments:half_linear_calc"}, tmp_path / "b", **kw
    )
    assert res2["settings"]["baseline_dir"] == str(bdir)
    assert len((bdir / "elastic.jsonl").read_text().splitlines()) == 1
    assert res2["mae"]["linear"] == res["mae"]["linear"]


def test_table2_entry_point_without_shared_data(tmp_path, capsys):
    from kd_nnp.cli.evaluate import main as evaluate_main
    from kd_nnp.evaluation.table2 import best_student

    def main(argv):
        return evaluate_main(["table2", *argv])

    (tmp_path / "empty").mkdir()
    student = tmp_path / "student.pt"
    student.write_bytes(b"not read")
    args = ["--student", str(student), "--out", str(tmp_path / "t2"), "--shared-dir"]
    assert main([*args, str(tmp_path / "empty")]) == 2
    assert "elastic reference data not found" in capsys.readouterr().err
    # --sweep picks the job with the lowest held-out volume MAE
    for name, mae in (("0_a", 5.0), ("1_b", 2.5), ("2_c", None)):
        job = tmp_path / "sweep" / name
        job.mkdir(parents=True)
        (job / "student.pt").write_bytes(b"x")
        ev = {"summary": {"vol_mae_pct": mae}} if mae is not None else None
        (job / "metrics.json").write_text(json.dumps({"evaluation": ev}))
    path, metrics = best_student(tmp_path / "sweep")
    assert path == tmp_path / "sweep" / "1_b" / "student.pt"
    with pytest.raises(ValueError, match="none of 0 finished job"):
        best_student(tmp_path / "empty")


@pytest.mark.shared_data
def test_x23_heldout_split_shares_no_molecule_with_training(shared_data):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prepare_x23", REPO / "experiments" / "paper" / "prepare_x23.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    split = mod.heldout_split(shared_data / "x23_vdwdf2", "test", max_atoms=60)
    assert len(split["train"]) == 25 and "21_urea" in split["train"]
    for code in ("UREAXX02", "NAPHTA15", "FORMAM", "CYANAM01", "OXALAC11"):
        assert code not in split["eval"] and "training crystal" in split["excluded"][code]
    assert "OXALAC02" in split["excluded"]  # no H atoms resolved (and CO2's formula)
    assert len(split["eval"]) >= 8 and "BIPHEN" in split["eval"]
