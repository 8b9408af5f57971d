"""Data-parallel training (``trainer=ddp_cpu``: 2 CPU processes, gloo) against one process.

Defects this caught (kd_nnp/training/ddp.py): the extra rank was started as
``python -m kd_nnp.cli <overrides>`` without the verb (Lightning re-runs ``sys.argv``) and died;
validation frames were padded by Lightning's sampler (a repeated frame skewed val MAEs); a
rank without a label of some kind skipped the metric sync the other rank entered (hang);
every rank wrote the curves, the export and metrics.json; a sweep's second job in the same
process found the first job's dead process group.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import run_kd_nnp


def _skip_without_gloo() -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")


def _cli(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return run_kd_nnp(args, cwd, timeout=timeout)


def _common(store: Path) -> list[str]:
    # 8 training frames, 3 validation frames (uneven over 2 ranks), no shuffling: with a
    # global batch of 4 both runs take the same frames in each optimizer step
    return [f"data.store={store}", "data.label_set=toy", "data.n_val=3", "data.grouped=false",
            "data.shuffle=false", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
            "model.backend=cached", "loss.r_he=1", "loss.r_hf=1"]  # fmt: skip


def _mlp(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)["model"]["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("mlp.")}


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process(urea_store, tmp_path):
    _skip_without_gloo()
    t0 = time.perf_counter()
    single = tmp_path / "single"
    r = _cli(["train", *_common(urea_store), "data.batch_size=4", f"hydra.run.dir={single}"],
             tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    t_single = time.perf_counter() - t0

    # a sweep of two data-parallel jobs in one process: job 0 is the single run's twin (2 ranks
    # x 2 frames), job 1 (another lr) needs the ranks and process group of job 0 gone
    sweep = tmp_path / "sweep"
    r = _cli(["train", "-m", *_common(urea_store), "trainer=ddp_cpu", "data.batch_size=2",
              "model.optimizer.lr=0.01,0.003", f"hydra.sweep.dir={sweep}"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    print(
        f"single process {t_single:.0f} s, DDP sweep of 2 jobs {time.perf_counter() - t0 - t_single:.0f} s"
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name[:2] for p in jobs] == ["0_", "1_"], jobs
    twin = jobs[0]

    one, two = (json.loads((d / "metrics.json").read_text()) for d in (single, twin))
    # the same optimizer steps
    steps = [torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
             for d in (single, twin)]  # fmt: skip
    assert steps == [4, 4]
    assert (one["n_train"], one["n_val"], one["epochs"]) == (two["n_train"], two["n_val"], 2)
    assert (one["n_train"], one["n_val"]) == (8, 3)
    # epoch MAEs reduced over both ranks, every validation frame once (rank 1's only frame
    # has no hard label: its hard MAEs come from rank 0 alone). The losses too: the loss
    # formula on the epoch MAEs (a frame-weighted mean of per-batch losses differed after
    # training, rank 1's batch having no hard term)
    rows1 = {(r["split"], r["epoch"]): r for r in one["history"]}
    rows2 = {(r["split"], r["epoch"]): r for r in two["history"]}
    assert set(rows1) == set(rows2) == {("val", 0), ("val", 1), ("train", 1), ("val", 2),
                                        ("train", 2)}  # fmt: skip
    for key, row in rows1.items():
        assert set(row) == set(rows2[key]), key
        for name, value in row.items():
            if name.startswith("mae_") or name == "loss":
                assert rows2[key][name] == pytest.approx(value, rel=1e-4, abs=1e-7), (key, name)
    assert rows1[("val", 2)]["mae_hard_energy"] != rows1[("val", 0)]["mae_hard_energy"]
    for name, value in one["final"].items():
        assert two["final"][name] == pytest.approx(value, rel=1e-4, abs=1e-7), name
    # the same trained student, exported once
    w1, w2 = _mlp(single / "student.pt"), _mlp(twin / "student.pt")
    assert w1.keys() == w2.keys() and w1
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    other = _mlp(jobs[1] / "student.pt")  # lr 0.003: another student
    assert any(not torch.allclose(other[k], w2[k]) for k in w2)

    # no duplicate or stray files: the twin holds the single run's files, the extra rank's
    # log, and Hydra's sweep files; one metrics.csv with one row per epoch and split
    for job in jobs:
        extra = _files(job) - _files(single)
        assert extra == {"train.rank1.log"}, extra
        assert not _files(single) - _files(job)
        assert not [f for f in _files(job) if "tmp" in f or "version_" in f]
        log1 = (job / "train.rank1.log").read_text()
        assert "data ready in" in log1 and "job failed" not in log1
        assert (job / "train.log").read_text().count("data ready in") == 1
        assert json.loads((job / "metrics.json").read_text())["epochs"] == 2
    assert sorted(p.name for p in sweep.iterdir()) == sorted(
        [*(p.name for p in jobs), "multirun.yaml"]
    )
    # Lightning's CSV log, written by rank 0 only: the same rows as the single run's
    import csv

    def csv_rows(run: Path) -> list[dict[str, str]]:
        with open(run / "logs" / "metrics.csv") as fh:
            return list(csv.DictReader(fh))

    a, b = csv_rows(single), csv_rows(twin)
    assert len(a) == len(b) and len(a) >= 5 and a[0].keys() == b[0].keys()
    for ra, rb in zip(a, b, strict=True):
        assert (ra["epoch"], ra["step"]) == (rb["epoch"], rb["step"])
        for k in ra:
            if k.startswith(("val/mae", "train/")) and ra[k]:
                assert float(rb[k]) == pytest.approx(float(ra[k]), rel=1e-4, abs=1e-7), k


def test_unpadded_sampler_splits_each_frame_once():
    from kd_nnp.training.ddp import UnpaddedSampler

    data = list(range(5))
    parts = [list(UnpaddedSampler(data, 2, r)) for r in range(2)]
    assert parts == [[0, 2, 4], [1, 3]]
    assert [len(UnpaddedSampler(data, 2, r)) for r in range(2)] == [3, 2]
    assert list(UnpaddedSampler([0], 2, 1)) == []
    with pytest.raises(ValueError, match="rank"):
        UnpaddedSampler(data, 2, 2)


def test_datamodule_samplers_under_two_ranks():
    """Under 2 ranks the data module sets the samplers: Lightning's own would shuffle the
    training frames even with ``data.shuffle=false`` and pad the validation frames (a repeated
    frame weighs twice in the validation MAEs)."""
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    from kd_nnp.training.data import FramesDataModule
    from kd_nnp.training.ddp import UnpaddedSampler

    def indices(shuffle: bool, rank: int) -> tuple[list[int], list[int]]:
        dm = FramesDataModule(store="unused", shuffle=shuffle, batch_size=2, seed=3)
        dm.train_samples, dm.val_samples = list(range(7)), list(range(3))
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        train, val = dm.train_dataloader(), dm.val_dataloader()
        assert isinstance(train.sampler, DistributedSampler)  # kept by Lightning
        assert isinstance(val.sampler, UnpaddedSampler)
        return list(train.sampler), list(val.sampler)

    assert indices(False, 0) == ([0, 2, 4, 6], [0, 2])
    assert indices(False, 1) == ([1, 3, 5, 0], [1])  # training padded: same steps per rank
    shuffled = [indices(True, r)[0] for r in (0, 1)]
    assert shuffled[0] != [0, 2, 4, 6] and set(shuffled[0] + shuffled[1]) == set(range(7))
    assert indices(True, 0)[0] == shuffled[0]  # seeded
    # one process: no sampler of ours, the loader's own shuffling
    dm = FramesDataModule(store="unused", shuffle=False, batch_size=2)
    dm.train_samples = list(range(7))
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0)
    assert list(dm.train_dataloader().sampler) == list(range(7))
