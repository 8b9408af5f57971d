"""Relaunching a job or sweep into an existing folder (D3) and failed jobs' logs (D7)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import run_kd_nnp

from kd_nnp.utils.provenance import JobConfigMismatch, check_job_config, config_differences


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_kd_nnp(args, cwd)


def _tiny(store) -> list[str]:
    """One quick energy-only epoch on the labelled test store."""
    return [f"data.store={store}", "data.label_set=toy_teacher", "data.n_val=5",
            "data.batch_size=5", "data.grouped=false", "loss.r_sf=0",
            "model.compute_forces=false", "trainer.max_epochs=1",
            "validate_before_training=false", "trainer.enable_progress_bar=false"]  # fmt: skip


def test_config_differences_rules():
    old = {"model": {"lr": 0.01}, "data": {"store": "a"}, "threads": 1, "gone": 3}
    same = {"model": {"lr": 0.01}, "data": {"store": "a"}, "threads": 2, "new": {"k": 5}}
    # runtime settings, keys the code dropped, and new keys at their default do not count
    assert config_differences(old, same, overrides=["model.lr=0.01"]) == {}
    # a new key set on the command line does (also through its group)
    assert config_differences(old, same, overrides=["new.k=5"]) == {"new.k": ("<absent>", 5)}
    assert config_differences(old, same, overrides=["+new=x"]) == {"new.k": ("<absent>", 5)}
    changed = {"model": {"lr": 0.02}, "data": {"store": "b"}}
    assert config_differences(old, changed) == {
        "data.store": ("a", "b"),
        "model.lr": (0.01, 0.02),
    }


def test_check_job_config_records_once_and_refuses_another(tmp_path):
    cfg = {"model": {"lr": 0.01}, "trainer": {"max_epochs": 3}}
    assert check_job_config(tmp_path, cfg) == "new"
    first = (tmp_path / "config.yaml").read_text()
    assert yaml.safe_load(first) == cfg and json.loads((tmp_path / "job.json").read_text())
    assert check_job_config(tmp_path, cfg) == "same"
    with pytest.raises(JobConfigMismatch, match=r"trainer.max_epochs: 3 -> 5.*new hydra.run.dir"):
        check_job_config(tmp_path, {"model": {"lr": 0.01}, "trainer": {"max_epochs": 5}})
    assert (tmp_path / "config.yaml").read_text() == first


def test_d3_relaunch_with_other_inputs_is_refused(labelled_store, tmp_path):
    """D3: a relaunch into a finished job's folder with another lr (or store, epochs, ...)
    was skipped as 'already done' (rc 0) while Hydra replaced .hydra/config.yaml."""
    run = tmp_path / "run"
    args = ["train", *_tiny(labelled_store), "model.optimizer.lr=0.003", f"hydra.run.dir={run}"]
    r = _cli(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    done = (run / "metrics.json").stat().st_mtime
    hydra_cfg = (run / ".hydra" / "config.yaml").read_text()
    # D18: progress while the data is built (was: minutes of silence)
    log_text = (run / "train.log").read_text()
    assert "data: reading" in log_text and "data ready in" in log_text
    job_cfg = (run / "config.yaml").read_text()

    again = _cli(args, tmp_path)  # the same job: skipped
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "metrics.json").stat().st_mtime == done

    other = _cli([*args[:-1], "model.optimizer.lr=0.01", args[-1]], tmp_path)
    assert other.returncode == 1
    msg = other.stderr.strip().splitlines()[-1]
    assert msg.startswith("kd-nnp train: error:") and "model.optimizer.lr: 0.003 -> 0.01" in msg, (
        msg
    )
    assert "new hydra.run.dir" in msg
    assert (run / "metrics.json").stat().st_mtime == done
    # the folder's provenance still describes the job whose results it holds
    assert (run / ".hydra" / "config.yaml").read_text() == hydra_cfg
    assert "lr: 0.003" in hydra_cfg
    assert (run / "config.yaml").read_text() == job_cfg
    assert "model.optimizer.lr: 0.003 -> 0.01" in (run / "train.log").read_text().splitlines()[-1]


def test_d7_failed_sweep_job_logs_its_exception(labelled_store, tmp_path):
    """D7: a failed sweep job's exception never reached its train.log (kd-nnp report's
    failed.csv showed an unrelated line); a relaunch on another store is refused per job."""
    sweep = tmp_path / "sweep"
    r = _cli(["train", "-m", *_tiny(labelled_store), "data.n_train=6,1000",
              f"hydra.sweep.dir={sweep}"], tmp_path)  # fmt: skip
    assert r.returncode != 0
    ok, bad = sorted(sweep.glob("*data.n_train=6*")), sorted(sweep.glob("*data.n_train=1000*"))
    assert len(ok) == 1 and len(bad) == 1 and (ok[0] / "metrics.json").exists()
    tail = (bad[0] / "train.log").read_text().strip().splitlines()[-3:]
    assert any("n_train=1000 but only" in line for line in tail), tail
    assert any("Error" in line for line in tail), tail
    # relaunching the sweep on another store (not part of the job folder names): each job is
    # refused, its results kept
    import shutil

    other = shutil.copytree(labelled_store, tmp_path / "other_store")
    done = (ok[0] / "metrics.json").stat().st_mtime
    r2 = _cli(["train", "-m", *_tiny(labelled_store), "data.n_train=6", f"data.store={other}",
               f"hydra.sweep.dir={sweep}"], tmp_path)  # fmt: skip
    assert r2.returncode != 0
    last = (ok[0] / "train.log").read_text().splitlines()[-1]
    assert f"data.store: '{labelled_store}' -> '{other}'" in last, last
    assert (ok[0] / "metrics.json").stat().st_mtime == done


def test_bad_trainer_config_fails_at_once_in_one_line(tmp_path, monkeypatch, capsys):
    """A trainer/callback config its target refuses used to surface after the whole data read
    and feature build, as Hydra's InstantiationException traceback; now it is refused before
    the store is opened (this store does not exist) with one line naming the block."""
    from kd_nnp.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    store = f"data.store={tmp_path / 'no_store'}"
    assert main(["train", store, "trainer.accelerator=nonsense", "hydra.run.dir=run1"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("kd-nnp train: error: trainer: lightning.Trainer refused this config:")
    assert "accelerator='nonsense'" in last and "no_store" not in last
    early = ["+callbacks.early._target_=lightning.pytorch.callbacks.EarlyStopping",
             "+callbacks.early.monitor=x", "+callbacks.early.bogus=1"]  # fmt: skip
    assert main(["train", store, *early, "hydra.run.dir=run2"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: callbacks.early: lightning.pytorch.callbacks.EarlyStopping refused this " \
        "config: TypeError" in last  # fmt: skip
