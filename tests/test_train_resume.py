"""kd-nnp train resumed after a kill (D4) and the exported checkpoint (D16), in process."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from kd_nnp.training.crossover import crossover_epochs

KILL_AT: dict[str, int | None] = {"epoch": None}


class Killed(RuntimeError):
    pass


class KillAtEpoch(L.Callback):
    """Dies at the start of training epoch ``KILL_AT['epoch']`` (0-based) like a kill -9: no
    checkpoint is written on the way out (last.ckpt holds the epochs before)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if KILL_AT["epoch"] is not None and trainer.current_epoch == KILL_AT["epoch"]:
            raise Killed(f"killed at epoch {trainer.current_epoch}")


def _cfg(store, run: Path, *extra: str):
    from hydra import compose, initialize_config_dir

    from kd_nnp.utils.paths import conf_dir

    overrides = [
        f"data.store={store}", "data.label_set=toy_teacher", "data.n_val=5",
        "data.batch_size=5", "data.grouped=false",
        # energies only: hard (= pretrained CHGNet) and soft, so MAE_H,E and MAE_S,E cross
        "loss=mixed", "loss.r_he=0.1", "loss.r_hf=0", "loss.r_sf=0", "model.compute_forces=false",
        "model.optimizer.lr=0.01", "trainer.max_epochs=4", "trainer.enable_progress_bar=false",
        f"callbacks.model_checkpoint.dirpath={run}/checkpoints",
        f"callbacks.last_checkpoint.dirpath={run}/checkpoints",
        f"callbacks.loss_crossover.output_dir={run}", f"logger.csv.save_dir={run}",
        "+callbacks.kill._target_=test_train_resume.KillAtEpoch", *extra,
    ]  # fmt: skip
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("train", overrides=overrides)


def _epochs(history, split):
    return [r["epoch"] for r in history if r["split"] == split]


@pytest.fixture(scope="module")
def uninterrupted(labelled_store, tmp_path_factory):
    from kd_nnp.training.train import run_training

    run = tmp_path_factory.mktemp("whole")
    KILL_AT["epoch"] = None
    return run, run_training(_cfg(labelled_store, run), run)


def test_d4_resume_after_kill_keeps_the_history(labelled_store, tmp_path, uninterrupted):
    """D4: a run resumed from last.ckpt after a kill lost the epochs before the kill (history,
    loss_history.csv, crossover, metrics.csv)."""
    from kd_nnp.training.train import run_training

    whole_dir, whole = uninterrupted
    run = tmp_path / "run"
    cfg = _cfg(labelled_store, run)
    KILL_AT["epoch"] = 2
    try:
        with pytest.raises(Killed):
            run_training(cfg, run)
    finally:
        KILL_AT["epoch"] = None
    assert not (run / "metrics.json").exists()
    # last.ckpt is the epoch before the kill (not the last epoch that improved val/loss)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
    metrics = run_training(cfg, run)  # the relaunch resumes

    hist = metrics["history"]
    assert _epochs(hist, "val") == [0, 1, 2, 3, 4]
    assert _epochs(hist, "train") == [1, 2, 3, 4]
    # the epochs before the kill are the uninterrupted run's, exactly
    key = lambda r: (r["epoch"], r["split"])  # noqa: E731
    before = sorted((r for r in whole["history"] if r["epoch"] <= 2), key=key)
    assert sorted((r for r in hist if r["epoch"] <= 2), key=key) == before
    # the crossover is computed over all epochs, as in the uninterrupted run
    assert metrics["crossover_epoch"] == crossover_epochs(hist)
    assert metrics["crossover_epoch"] == whole["crossover_epoch"]
    assert (
        json.loads((run / "crossover.json").read_text())["crossover_epoch"]
        == (metrics["crossover_epoch"])
    )
    with open(run / "loss_history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["split"], int(r["epoch"])) for r in rows) == sorted(
        (r["split"], r["epoch"]) for r in hist
    )
    # Lightning's CSV log keeps the rows of the epochs before the kill (0-based epochs)
    with open(run / "logs" / "metrics.csv") as fh:
        logged = {int(r["epoch"]) for r in csv.DictReader(fh) if r.get("val/loss")}
    assert logged == {0, 1, 2, 3}
    assert not list((run / "logs").glob("*.before-resume"))


def test_d16_default_exports_the_last_epoch(labelled_store, tmp_path, uninterrupted):
    """D16: the default exported the val-best checkpoint (which can be an untrained epoch);
    docs/training.md: the last epoch is exported unless export_best=true."""
    from chgnet.model import CHGNet

    from kd_nnp.training.train import run_training

    whole_dir, whole = uninterrupted
    assert whole["exported"] == "last"
    last = torch.load(whole_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    student = CHGNet.from_file(str(whole_dir / "student.pt")).state_dict()
    for k, v in student.items():
        if k.startswith("mlp."):
            assert torch.equal(v, last[f"student.{k}"]), k
    # the monitored-best checkpoint of this run is another epoch, so the choice matters here
    best = torch.load(whole["best_checkpoint"], weights_only=False)
    assert best["epoch"] < whole["epochs"] - 1
    # export_best=true: the best checkpoint is exported
    run = tmp_path / "best"
    m = run_training(_cfg(labelled_store, run, "export_best=true", "trainer.max_epochs=2"), run)
    assert m["exported"] == "best"
    b = torch.load(m["best_checkpoint"], weights_only=False)["state_dict"]
    s = CHGNet.from_file(str(run / "student.pt")).state_dict()
    assert all(torch.equal(v, b[f"student.{k}"]) for k, v in s.items() if k.startswith("mlp."))
