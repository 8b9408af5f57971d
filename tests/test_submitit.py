"""A 2-job sweep through hydra-submitit-launcher's local executor
(``hydra/launcher=submitit_local``): SLURM's code path (pickled Hydra job, one process per
job, submitit's folders and results) without the scheduler; then the same sweep relaunched:
finished jobs are skipped."""

from __future__ import annotations

import json
import pickle
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_kd_nnp


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_kd_nnp(args, cwd)


@pytest.mark.slow
def test_submitit_local_sweep_of_two_jobs(urea_store, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher")
    pytest.importorskip("submitit")
    sweep = tmp_path / "sweep"
    args = ["train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20",
            f"data.store={urea_store}", "data.label_set=toy", "data.n_val=3",
            "data.grouped=false", "data.batch_size=4", "loss.r_sf=0",
            "model.compute_forces=false", "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false", "model.optimizer.lr=0.01,0.003",
            f"hydra.sweep.dir={sweep}"]  # fmt: skip
    t0 = time.perf_counter()
    r = _cli(args, tmp_path)
    print(f"submitit_local sweep of 2 jobs: {time.perf_counter() - t0:.0f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"], jobs
    lrs = []
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert (metrics["n_train"], metrics["n_val"], metrics["epochs"]) == (8, 3, 1)
        assert metrics["final"]["val/loss"] > 0 and (job / "student.pt").stat().st_size > 1e5
        lrs.append(yaml.safe_load((job / "config.yaml").read_text())["model"]["optimizer"]["lr"])
        assert "data ready in" in (job / "train.log").read_text()
    assert lrs == [0.01, 0.003]
    # submitit's own folders: one per job (and the empty unformatted '%j' it makes), with
    # the job's stdout/stderr and its pickled call and result: Hydra's objective, val/loss
    runs = sorted(p for p in (sweep / ".submitit").iterdir() if p.name != "%j")
    assert len(runs) == 2, runs
    objectives = []
    for run in runs:
        names = {p.name for p in run.iterdir()}
        jid = run.name
        assert {f"{jid}_0_log.out", f"{jid}_0_log.err", f"{jid}_0_result.pkl",
                f"{jid}_submitted.pkl"} <= names, names  # fmt: skip
        # the job ran in submitit's own process, which finished it
        assert "Job completed successfully" in (run / f"{jid}_0_log.out").read_text()
        with open(run / f"{jid}_0_result.pkl", "rb") as fh:
            status, ret = pickle.load(fh)
        assert status == "success"
        objectives.append(ret.return_value)
    finals = [json.loads((j / "metrics.json").read_text())["final"]["val/loss"] for j in jobs]
    assert sorted(objectives) == pytest.approx(sorted(finals))

    # relaunching the sweep: both jobs are found done and skipped (results untouched)
    stamps = [(j / "metrics.json").stat().st_mtime for j in jobs]
    r2 = _cli(args, tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert [(j / "metrics.json").stat().st_mtime for j in jobs] == stamps
    assert all("job already done, skipping" in (j / "train.log").read_text() for j in jobs)
