"""`kd-nnp report`: sweep aggregation (Fig. 4 / Table 1 / Fig. 6), CLI and the notebook.

A real 2x2 sweep (rHE x N_train, 2 epochs) is trained once for the module; hand-made job
folders with known evaluation numbers check the statistics against hand-computed values.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import assert_md_tables_well_formed, unescaped_pipes

from kd_nnp.cli.report import main as report_main
from kd_nnp.reports import fig6, load, tables
from kd_nnp.reports.write import auto_kinds
from kd_nnp.utils.markdown import md_table

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="1")


@pytest.fixture(scope="module")
def real_sweep(labelled_store, tmp_path_factory) -> Path:
    """`kd-nnp train -m` over rHE in {0.1, 10} x N_train in {6, 12}, 2 epochs each."""
    tmp = tmp_path_factory.mktemp("report_sweep")
    sweep = tmp / "sweep"
    r = subprocess.run(
        [sys.executable, "-m", "kd_nnp.cli", "train", "-m",
         f"data.store={labelled_store}", "data.label_set=toy_teacher",
         "data.n_val=5", "data.grouped=false", "data.batch_size=6",
         "data.n_train=6,12", "loss=mixed", "loss.r_he=0.1,10",
         "trainer.max_epochs=2", "hydra.sweep.dir=" + str(sweep)],
        cwd=tmp, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(list(sweep.glob("*/metrics.json"))) == 4
    return sweep


def _png_ok(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path


# ----------------------------------------------------------------------------- real sweep
@pytest.mark.slow  # the real 2-job sweep fixture costs ~50 s: make test-full (suite < 15 min)
def test_real_sweep_loads_and_reports(real_sweep, tmp_path, capsys):
    sweep = load.load_sweep(real_sweep)
    assert sweep.n_finished == 4 and sweep.n_failed == 0
    jobs = sweep.jobs
    assert set(zip(jobs["r_he"], jobs["n_train"])) == {(0.1, 6), (0.1, 12), (10, 6), (10, 12)}
    assert (jobs["r_se"] == 1).all() and (jobs["loss_kind"] == "hard+soft").all()
    assert sweep.dims == []  # run paths and duplicated sub-configs are not sweep dimensions
    assert not sweep.has_evaluation
    # the table holds exactly what the jobs wrote
    for _, row in jobs.iterrows():
        job = real_sweep / row["job"]
        metrics = json.loads((job / "metrics.json").read_text())
        assert row["val/mae_soft_energy"] == pytest.approx(metrics["final"]["val/mae_soft_energy"])
        assert row["train/mae_hard_forces"] == pytest.approx(
            metrics["final"]["train/mae_hard_forces"]
        )
        cross = json.loads((job / "crossover.json").read_text())["crossover_epoch"]
        for split, col in (("val", "crossover_epoch"), ("train", "crossover_epoch_train")):
            expected = cross[split]
            assert (math.isnan(row[col]) and expected is None) or row[col] == expected
    assert auto_kinds(sweep) == ["fig4", "table1", "fig6"]

    out = tmp_path / "rep"
    assert report_main([str(real_sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 finished, 0 failed/unfinished" in printed
    for name in ("fig4.png", "fig5.png", "fig6.png"):
        _png_ok(out / name)
    # no evaluation: Fig. 4 falls back on the validation energy MAEs, and says so
    f4 = pd.read_csv(out / "fig4.csv")
    assert len(f4) == 4 and (f4["n_jobs"] == 1).all()
    merged = f4.merge(jobs, on=["r_he", "n_train"])
    np.testing.assert_allclose(merged["val/mae_soft_energy_mean"], merged["val/mae_soft_energy"])
    np.testing.assert_allclose(merged["val/mae_hard_energy_mean"], merged["val/mae_hard_energy"])
    assert f4["val/mae_soft_energy_std"].isna().all()  # one seed: no standard deviation
    md = (out / "report.md").read_text()
    assert "finished jobs: 4" in md and "no job has an evaluation" in md
    assert "val/mae_soft_energy" in (out / "fig4.md").read_text()
    t1 = pd.read_csv(out / "table1.csv")
    assert sorted(t1["r_he"]) == [0.1, 10]
    for _, r in t1.iterrows():
        g = jobs[jobs["r_he"] == r["r_he"]]
        best = g.loc[g["val/mae_soft_energy"].idxmin()]
        assert r["best_mean"] == pytest.approx(best["val/mae_soft_energy"])
        assert r["best_n_train"] == best["n_train"]
    cross = pd.read_csv(out / "crossover.csv")
    assert len(cross) == 4 and set(cross["r_he"]) == {0.1, 10}


@pytest.mark.slow  # the real 2-job sweep fixture costs ~50 s: make test-full (suite < 15 min)
def test_partial_sweep_lists_the_unfinished_job(real_sweep, tmp_path):
    part = tmp_path / "partial"
    shutil.copytree(real_sweep, part, ignore=shutil.ignore_patterns("*.pt", "*.ckpt", "report"))
    victim = sorted(part.glob("2_*"))[0]
    (victim / "metrics.json").unlink()
    out = tmp_path / "rep"
    assert report_main([str(part), "--out", str(out)]) == 0
    failed = pd.read_csv(out / "failed.csv")
    assert list(failed["job"]) == [victim.name]
    assert failed["reason"].iloc[0].startswith("train.log: ")  # the last log lines
    assert len(pd.read_csv(out / "jobs.csv")) == 3
    md = (out / "report.md").read_text()
    assert "finished jobs: 3" in md and "failed/unfinished jobs (no metrics.json): 1" in md


def test_bad_input_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "no_such_sweep"
    assert report_main([str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "some_folder").mkdir(parents=True)
    assert report_main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no job folders" in err and str(empty) in err
    # through the `kd-nnp` entry point
    r = subprocess.run(
        [sys.executable, "-m", "kd_nnp.cli", "report", str(missing)],
        env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "sweep directory not found" in r.stderr
    assert str(missing) in r.stderr


# ----------------------------------------------------------------------------- hand-made
SOFT = {"r_he": 0.0, "r_hf": 0.0, "r_se": 1.0, "r_sf": 1.0, "r_hs": 0.0, "r_ss": 0.0}
HARD = {"r_he": 1.0, "r_hf": 1.0, "r_se": 0.0, "r_sf": 0.0, "r_hs": 0.0, "r_ss": 0.0}
MIXED = {"r_he": 0.1, "r_hf": 1.0, "r_se": 1.0, "r_sf": 1.0, "r_hs": 0.0, "r_ss": 0.0}
BASELINES = {
    "chgnet": {"vol_mae_pct": 13.65, "vol_mean_pct": 13.1, "density_mae": 0.2, "n_failures": 0},
    "teacher:so3lr": {"vol_mae_pct": 1.5, "vol_mean_pct": -0.5, "density_mae": 0.03},
}
NAN = float("nan")
# (ratios, n_train) -> [(seed, vol_mae_pct, vol_mean_pct, n_failures)]
VOLUMES = {
    ("soft", 10): [(0, 3.0, 2.0, 0), (1, 4.0, 3.0, 1), (2, 5.0, -1.0, 0)],
    ("soft", 100): [(0, 2.0, 1.0, 0), (1, 3.0, -2.0, 0), (2, NAN, None, 2)],
    ("hard", 10): [(0, 6.0, 6.0, 0), (1, 8.0, 8.0, 0)],
    ("hard", 100): [(0, 9.0, 9.0, 0), (1, 11.0, 11.0, 0)],
    ("mixed", 10): [(0, 5.0, 5.0, 0)],
    ("mixed", 100): [(0, 4.0, 4.0, 0)],
}
RATIOS = {"soft": SOFT, "hard": HARD, "mixed": MIXED}


def _history(cross_at: int | None) -> list[dict]:
    rows = []
    for ep in range(4):
        soft = 0.05 / (ep + 1)
        hard = 0.01 + (0.1 if cross_at is not None and ep >= cross_at else 0.0)
        rows.append({"split": "val", "epoch": ep, "mae_hard_energy": hard,
                     "mae_soft_energy": soft, "mae_hard_forces": 0.1, "mae_soft_forces": 0.12})  # fmt: skip
    return rows


def _write_job(root: Path, num: int, ratios: dict, n_train: int, seed: int, **kw) -> Path:
    job = root / f"{num}_n={n_train},seed={seed}"
    (job / ".hydra").mkdir(parents=True)
    config = {
        "seed": seed,
        "data": {"n_train": n_train, "seed": 0, "store": "/somewhere"},
        "loss": dict(ratios),
        "student": {"freeze": kw.get("freeze", "mlp")},
        "logger": {"csv": {"save_dir": str(job)}},
        "callbacks": {"loss_crossover": {"output_dir": str(job)}},
    }
    import yaml

    (job / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = {
        "ratios": ratios,
        "n_train": n_train,
        "n_val": 5,
        "seed": seed,
        "epochs": 3,
        "final": {"val/mae_soft_energy": 0.01 * (num + 1), "val/mae_hard_energy": 0.02},
        "history": _history(kw.get("cross_at")),
        "student": str(job / "student.pt"),
        "time_s": {"data": 1.0, "fit": 2.0},
    }
    if "crossover" in kw:
        metrics["crossover_epoch"] = kw["crossover"]
    if "volume" in kw:
        vol_mae, vol_mean, n_fail = kw["volume"]
        metrics["evaluation"] = {
            "dataset": "pyxtal:test",
            "crystals": ["A", "B", "C"],
            "settings": {"fmax": 0.03},
            "summary": {
                "n_covered": 3,
                "n_failures": n_fail,
                "vol_mae_pct": vol_mae,
                "vol_mean_pct": vol_mean,
                "density_mae": 0.05,
                "rmsd15_mean": 0.3,
                "rmsd15_matched_mean": 15.0,
            },  # fmt: skip
            "per_crystal": [],
            "baselines": BASELINES,
        }
    if "forgetting" in kw:  # (energy MAE eV/atom, force MAE eV/A, mean |dV| %) vs CHGNet
        e, f, dv = kw["forgetting"]
        metrics.setdefault("evaluation", {})["forgetting"] = {
            "summary": {"energy_mae_ev_atom": e, "force_mae_ev_a": f, "vol_change_mae_pct": dv}
        }
    (job / "metrics.json").write_text(json.dumps(metrics))
    return job


@pytest.fixture()
def handmade(tmp_path) -> Path:
    root = tmp_path / "hand"
    num = 0
    for (kind, n_train), runs in VOLUMES.items():
        for seed, vol_mae, vol_mean, n_fail in runs:
            extra: dict = {"crossover": {"val": 1 if kind == "mixed" else None, "train": None}}
            if kind == "mixed" and n_train == 100:
                extra = {"crossover": 2}  # a bare int (older metrics.json)
            if kind == "hard" and seed == 1 and n_train == 10:
                extra = {"cross_at": 2}  # not recorded: recomputed from the history
            _write_job(root, num, RATIOS[kind], n_train, seed,
                       volume=(vol_mae, vol_mean, n_fail), **extra)  # fmt: skip
            num += 1
    # a failed job (log says why) and one that never got further than its config
    bad = root / f"{num}_loss=soft_only,seed=9"
    (bad / ".hydra").mkdir(parents=True)
    (bad / ".hydra" / "overrides.yaml").write_text("- loss=soft_only\n- seed=9\n")
    (bad / "train.log").write_text(
        "[INFO] - starting\n\nTraceback (most recent call last):\nRuntimeError: boom\n"
    )
    unfinished = root / f"{num + 1}_loss=hard_only,seed=9"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("seed: 9\n")
    (root / "notes").mkdir()  # not a job folder: ignored
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    return root


def _row(df: pd.DataFrame, ratios: dict, n_train: int | None = None) -> pd.Series:
    m = np.all([np.isclose(df[k], v) for k, v in ratios.items()], axis=0)
    if n_train is not None:
        m &= df["n_train"] == n_train
    sub = df[m]
    assert len(sub) == 1, sub
    return sub.iloc[0]


def test_handmade_statistics(handmade):
    sweep = load.load_sweep(handmade)
    assert sweep.n_finished == 12 and sweep.n_failed == 2
    assert sweep.has_evaluation and sweep.dims == []
    failed = sweep.failed.set_index("job")
    assert "RuntimeError: boom" in failed.loc["12_loss=soft_only,seed=9", "reason"]
    assert failed.loc["12_loss=soft_only,seed=9", "overrides"] == "loss=soft_only seed=9"
    assert "no log" in failed.loc["13_loss=hard_only,seed=9", "reason"]

    kinds = dict(zip(sweep.jobs["setting"], sweep.jobs["loss_kind"]))
    assert kinds == {
        "soft only (rSE=1, rSF=1)": "soft only",
        "hard only (rHE=1, rHF=1)": "hard only",
        "hard+soft (rHE=0.1, rHF=1, rSE=1, rSF=1)": "hard+soft",
    }
    f4 = tables.fig4_table(sweep)
    assert len(f4) == 6
    r = _row(f4, SOFT, 10)
    assert (r["vol_mae_pct_mean"], r["vol_mae_pct_std"], r["vol_mae_pct_n"]) == (4.0, 1.0, 3)
    assert r["vol_mean_pct_mean"] == pytest.approx(4 / 3)
    assert r["vol_mean_pct_std"] == pytest.approx(math.sqrt(13 / 3))
    assert r["n_failures_sum"] == 1 and r["seeds"] == "0;1;2"
    r = _row(f4, SOFT, 100)  # seed 2 has NaN / null: left out, not propagated
    assert r["vol_mae_pct_mean"] == 2.5 and r["vol_mae_pct_n"] == 2 and r["n_jobs"] == 3
    assert r["vol_mae_pct_std"] == pytest.approx(math.sqrt(0.5))
    assert r["vol_mean_pct_mean"] == -0.5 and r["n_failures_sum"] == 2
    r = _row(f4, HARD, 100)
    assert r["vol_mae_pct_mean"] == 10.0 and r["vol_mae_pct_std"] == pytest.approx(math.sqrt(2))
    r = _row(f4, MIXED, 10)
    assert r["vol_mae_pct_mean"] == 5.0 and math.isnan(r["vol_mae_pct_std"])

    t1 = tables.table1(sweep)
    assert len(t1) == 3 and (t1["metric"] == "vol_mae_pct").all()
    r = _row(t1, SOFT)
    assert (r["best_mean"], r["best_n_train"], r["best_n"]) == (2.5, 100, 2)
    assert r["best_std"] == pytest.approx(math.sqrt(0.5)) and r["n_train_values"] == "10;100"
    r = _row(t1, HARD)
    assert (r["best_mean"], r["best_n_train"]) == (7.0, 10)
    assert r["best_std"] == pytest.approx(math.sqrt(2))
    r = _row(t1, MIXED)
    assert (r["best_mean"], r["best_n_train"]) == (4.0, 100)
    # Table 1 order: by rHE then rHF (soft only first, as in the paper)
    assert list(t1["r_he"]) == [0.0, 0.1, 1.0]

    b = sweep.baselines.set_index("label")
    assert b.loc["chgnet", "vol_mae_pct"] == 13.65 and b.loc["chgnet", "n_jobs"] == 12
    assert b.loc["teacher:so3lr", "vol_mean_pct"] == -0.5
    assert math.isnan(b.loc["teacher:so3lr", "n_failures"])

    cross = tables.crossover_table(sweep)
    mixed = cross[np.isclose(cross["r_he"], 0.1)].set_index("n_train")
    assert mixed.loc[10, "crossover_epoch"] == 1 and mixed.loc[100, "crossover_epoch"] == 2
    hard = cross[np.isclose(cross["r_he"], 1.0) & (cross["n_train"] == 10)].set_index("seed")
    assert hard.loc[1, "crossover_epoch"] == 2  # recomputed from the history
    assert math.isnan(hard.loc[0, "crossover_epoch"])

    sel = fig6.fig6_selection(sweep)  # rows: setting without rHF; largest N, lowest seed
    assert list(sel["row"]) == ["rSE=1, rSF=1", "rHE=0.1, rSE=1, rSF=1", "rHE=1"]
    assert (sel["n_train"] == 100).all() and (sel["seed"] == 0).all()
    sel10 = fig6.fig6_selection(sweep, n_train=10)
    assert (sel10["n_train"] == 10).all()


def test_handmade_cli_report(handmade, tmp_path, capsys):
    out = tmp_path / "rep"
    assert report_main([str(handmade), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "12 finished, 2 failed/unfinished" in printed
    assert "RuntimeError: boom" in printed  # failed jobs are printed with their reason
    for name in ("fig4.png", "fig5.png", "fig6.png"):
        _png_ok(out / name)
    f4 = pd.read_csv(out / "fig4.csv")
    assert _row(f4, HARD, 10)["vol_mae_pct_mean"] == 7.0
    t1 = pd.read_csv(out / "table1.csv")
    assert _row(t1, SOFT)["best_n_train"] == 100
    t1md = (out / "table1.md").read_text()
    assert ["0", "0", "1", "1", "2.5 (0.71)", "100"] in [r[:6] for r in _md_rows(t1md)]
    for md_file in out.glob("*.md"):  # D11: no row of any table is split by a `|`
        assert_md_tables_well_formed(md_file.read_text())
    fig4md = (out / "fig4.md").read_text()
    assert "cell volume error" in fig4md and "13.65" in fig4md  # baselines listed
    assert pd.read_csv(out / "baselines.csv")["label"].tolist() == ["chgnet", "teacher:so3lr"]
    assert len(pd.read_csv(out / "jobs.csv")) == 12
    assert len(pd.read_csv(out / "failed.csv")) == 2
    md = (out / "report.md").read_text()
    assert "finished jobs: 12" in md and "failed/unfinished jobs (no metrics.json): 2" in md
    assert "evaluated jobs: 11 of 12" in md  # one job's volume error is NaN
    for link in ("fig4.png", "fig5.png", "fig6.png", "table1.md", "crossover.csv", "jobs.csv"):
        assert f"({link})" in md
    # default output folder, and a forced single kind
    assert report_main([str(handmade), "--kind", "fig4"]) == 0
    default = handmade / "report"
    assert (default / "fig4.png").exists() and not (default / "table1.csv").exists()
    assert not (default / "fig6.png").exists()
    # the report folder inside the sweep is not mistaken for a job
    assert load.load_sweep(handmade).n_finished == 12


def test_other_swept_keys_are_separate_settings(tmp_path):
    root = tmp_path / "freeze"
    for i, (freeze, seed) in enumerate([("mlp", 0), ("mlp", 1), ("readout", 0), ("readout", 1)]):
        vol = 2.0 + i
        _write_job(root, i, SOFT, 50, seed, freeze=freeze, volume=(vol, vol, 0))
    sweep = load.load_sweep(root)
    assert sweep.dims == ["student.freeze"]
    f4 = tables.fig4_table(sweep).set_index("student.freeze")
    assert f4.loc["mlp", "vol_mae_pct_mean"] == 2.5 and f4.loc["readout", "vol_mae_pct_mean"] == 4.5
    assert f4.loc["mlp", "setting"] == "soft only (rSE=1, rSF=1, student.freeze=mlp)"
    assert auto_kinds(sweep) == ["table1", "fig6"]  # N_train does not vary: no Fig. 4


def test_all_jobs_unfinished_exit_1(tmp_path, capsys):
    root = tmp_path / "s"
    (root / "0_seed=0" / ".hydra").mkdir(parents=True)
    assert report_main([str(root), "--kind", "all"]) == 1
    assert "no finished job" in capsys.readouterr().err
    assert "finished jobs: 0" in (root / "report" / "report.md").read_text()


# ----------------------------------------------------------------------------- notebook
@pytest.mark.slow  # the real 2-job sweep fixture costs ~50 s: make test-full (suite < 15 min)
def test_notebook_runs_on_the_real_sweep(real_sweep, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    monkeypatch.setenv("KD_NNP_SWEEP_DIR", str(real_sweep))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs
    )
    assert "4 finished, 0 failed" in text
    assert "val/mae_soft_energy" in text  # the jobs table is shown
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # Fig. 4, 5 and 6 redrawn


# ----------------------------------------------------------------------------- markdown
def _md_rows(text: str) -> list[list[str]]:
    """The stripped cells of every table row (header and rule included)."""
    return [
        [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        for line in text.splitlines()
        if line.startswith("|")
    ]


def test_markdown_escapes_pipes_in_headers_and_cells():
    """D11: a ``|sigma|`` header or a ``a | b`` cell must not split a GitHub table row."""
    df = pd.DataFrame({"stress": [0.5, np.nan], "reason": ["train.log: a | b", None], "n": [1, 2]})
    text = md_table(df, [("stress", "max |sigma| GPa"), "reason", ("n", "n|jobs")])
    assert assert_md_tables_well_formed(text) == 1
    header, rule, first, second = text.splitlines()
    assert unescaped_pipes(header) == 4 and r"max \|sigma\| GPa" in header
    assert r"a \| b" in first and "0.5" in first
    assert second.replace(" ", "") == "|||2|"  # NaN and None print empty
    # already escaped text is not escaped twice
    assert md_table(pd.DataFrame({"a": [r"x \| y"]})).splitlines()[2].count("\\|") == 1


def test_forgetting_columns_and_section(tmp_path):
    """Jobs carrying the forgetting check: per-job columns in jobs.csv / report.md and a
    per-setting table (mean, std over seeds) in report.md and forgetting.csv."""
    root = tmp_path / "forget"
    values = {0: (0.01, 0.1, 1.0), 1: (0.03, 0.3, 3.0), 2: (0.02, None, 2.0)}
    for seed, fg in values.items():
        _write_job(root, seed, SOFT, 10, seed, volume=(4.0, 1.0, 0), forgetting=fg)
    _write_job(root, 3, HARD, 10, 0, volume=(6.0, 6.0, 0))  # evaluated, no forgetting block
    sweep = load.load_sweep(root)
    assert sweep.has_forgetting
    jobs = sweep.jobs.set_index("job")
    assert jobs.loc["1_n=10,seed=1", "forget_e_mae_ev_atom"] == 0.03
    assert jobs.loc["2_n=10,seed=2", "forget_dv_mae_pct"] == 2.0
    assert math.isnan(jobs.loc["2_n=10,seed=2", "forget_f_mae_ev_a"])
    assert math.isnan(jobs.loc["3_n=10,seed=0", "forget_e_mae_ev_atom"])
    out = tmp_path / "rep"
    assert report_main([str(root), "--out", str(out)]) == 0
    t = pd.read_csv(out / "forgetting.csv")
    r = _row(t, SOFT, 10)
    assert r["forget_e_mae_ev_atom_mean"] == pytest.approx(0.02)
    assert r["forget_e_mae_ev_atom_std"] == pytest.approx(0.01)
    assert r["forget_f_mae_ev_a_mean"] == pytest.approx(0.2) and r["forget_f_mae_ev_a_n"] == 2
    assert r["forget_dv_mae_pct_mean"] == pytest.approx(2.0)
    assert _row(t, HARD, 10)["forget_e_mae_ev_atom_n"] == 0
    md = (out / "report.md").read_text()
    assert "## Forgetting: distance from pretrained CHGNet" in md
    assert "0.02 (0.01)" in md and "forget_dv_mae_pct" in md
    assert_md_tables_well_formed(md)
    assert "forget_e_mae_ev_atom" in pd.read_csv(out / "jobs.csv").columns
    # no job with the check: no section, no file
    plain = tmp_path / "plain"
    _write_job(plain, 0, SOFT, 10, 0, volume=(4.0, 1.0, 0))
    assert not load.load_sweep(plain).has_forgetting
    assert report_main([str(plain), "--out", str(tmp_path / "rep2")]) == 0
    assert "Forgetting" not in (tmp_path / "rep2" / "report.md").read_text()
    assert not (tmp_path / "rep2" / "forgetting.csv").exists()
