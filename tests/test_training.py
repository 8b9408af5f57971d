"""Training core end to end: datamodule, module, soft != hard, a tiny real run via the CLI."""

from __future__ import annotations

import functools
import json
import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_kd_nnp

from kd_nnp.training.data import FramesDataModule, FramesDataset, collate
from kd_nnp.training.loss import DistillationLoss
from kd_nnp.training.module import DistillationModule
from kd_nnp.training.split import split_frames

REPO = Path(__file__).resolve().parents[1]


def _dm(store, **kw) -> FramesDataModule:
    kw.setdefault("batch_size", 4)
    kw.setdefault("grouped", False)
    kw.setdefault("seed", 0)
    kw.setdefault("n_val", 5)
    dm = FramesDataModule(str(store), label_set="toy_teacher", **kw)
    dm.setup("fit")
    return dm


def test_grouped_split_and_nested_subsets():
    fids = [f"g{g}/f{i}" for g in range(6) for i in range(5)]
    gids = [f.split("/")[0] for f in fids]
    pool, val = split_frames(fids, gids, n_val=10, seed=3)
    assert len(val) == 10 and not {f.split("/")[0] for f in val} & {f.split("/")[0] for f in pool}
    pool2, val2 = split_frames(fids, gids, n_val=10, seed=3)
    assert (pool, val) == (pool2, val2)
    # nested: the first n of the pool for the same seed are the n_train subsets
    assert pool[:5] == pool2[:5]
    other, _ = split_frames(fids, gids, n_val=10, seed=4)
    assert other != pool
    # the store's write order (parallel writers) does not change the split
    order = np.random.default_rng(1).permutation(len(fids))
    shuffled = split_frames([fids[i] for i in order], [gids[i] for i in order], n_val=10, seed=3)
    assert shuffled == (pool, val)
    flat = split_frames(fids, gids, n_val=7, seed=3, grouped=False)
    assert split_frames(fids[::-1], gids[::-1], n_val=7, seed=3, grouped=False) == flat
    with pytest.raises(ValueError, match="at least 2 groups"):
        split_frames(["a", "b"], ["g", "g"], n_val=1)


def test_datamodule_reads_soft_and_hard_separately(labelled_store):
    dm = _dm(labelled_store, grouped=True)
    assert len(dm.train_samples) == 15 and len(dm.val_samples) == 5
    val_groups, train_groups = dm.summary["val_groups"], dm.summary["train_groups"]
    assert not set(val_groups) & set(train_groups)
    # the soft labels are the teacher's, not the hard ones (the chgnet-KD reader bug)
    batch = next(iter(dm.train_dataloader()))
    both = batch.hard.energy_mask & batch.soft.energy_mask
    assert both.any()
    assert not torch.allclose(batch.hard.energy[both], batch.soft.energy[both], atol=1e-3)
    assert not torch.allclose(batch.hard.forces, batch.soft.forces, atol=1e-4)
    # teacher-only frames (OXALAC02) carry soft labels and no hard ones
    all_train = [s for s in dm.train_samples + dm.val_samples if s.frame_id.startswith("OXALAC02")]
    assert all(s.hard is None and s.soft is not None for s in all_train)
    # alignment removed the fake per-element zero (thousands of eV) of the soft energies
    ref = dm.reference
    assert ref.method == "student" and ref.rmse_before > 100 and ref.rmse_after < 0.05
    assert dm.available()[("hard", "energy")] < dm.available()[("soft", "energy")]
    # the held-out crystal's stoichiometry is no combination of the 3 training ones here:
    # its soft energies cannot be aligned and are masked, not given a made-up offset
    val_ids = {s.frame_id for s in dm.val_samples}
    assert dm.unaligned and set(dm.unaligned) <= val_ids
    assert all(s.soft_energy is None for s in dm.val_samples if s.frame_id in dm.unaligned)


# a vdW-DF2-like hard scale: per-element offsets (eV/atom) away from CHGNet's own zero
HARD_ZERO = {1: 0.41, 6: 0.93, 7: 0.27, 8: 1.35}


def _shifted_hard_store(labelled_store, root: Path) -> tuple[Path, dict[str, float]]:
    """A copy of the labelled store whose hard energies (= pretrained CHGNet) carry HARD_ZERO."""
    import shutil

    from kd_nnp.data.store import FrameStore

    src = FrameStore(labelled_store)
    frames, original = [], {}
    for fr in src.iter_frames():
        if fr.hard is not None:
            original[fr.frame_id] = fr.hard.energy
            fr.hard.energy += sum(HARD_ZERO[int(z)] for z in fr.atoms.numbers)
        frames.append(fr)
    dst = FrameStore(root, create=True)
    dst.add_frames(frames)
    (root / "labels").mkdir(exist_ok=True)
    shutil.copy(Path(labelled_store) / "labels" / "toy_teacher.db", root / "labels")
    return root, original


def test_hard_reference_alignment(labelled_store, tmp_path):
    store, original = _shifted_hard_store(labelled_store, tmp_path / "shifted")
    # default: hard energies untouched (MPtrj-PBE labels are on CHGNet's own scale)
    dm0 = _dm(store)
    assert dm0.hard_reference.method == "none" and dm0.summary["hard_energy_unaligned_frames"] == []
    batch = collate([FramesDataset(dm0.train_samples)[i] for i in range(len(dm0.train_samples))])
    for k, s in enumerate(dm0.train_samples):
        if s.hard is not None:
            assert batch.hard.energy_mask[k]
            assert batch.hard.energy[k].item() == pytest.approx(s.hard.energy / s.n_atoms)
            assert s.hard.energy != pytest.approx(original[s.frame_id], abs=0.1)

    # hard_reference=student: the known per-element offset is removed exactly (the hard labels
    # here are the pretrained student's own energies)
    dm = _dm(store, hard_reference="student", grouped=True)
    ref = dm.hard_reference
    assert ref.method == "student" and ref.rmse_before > 0.3 and ref.rmse_after < 1e-4
    assert (
        dm.summary["hard_reference"]["shifts"] and dm.summary["hard_reference"]["rmse_after"] < 1e-4
    )
    aligned = [s for s in dm.train_samples + dm.val_samples if s.hard_energy is not None]
    assert len(aligned) >= len([s for s in dm.train_samples if s.hard is not None])
    for s in aligned:
        assert s.hard_energy == pytest.approx(original[s.frame_id], abs=1e-3)
    # energy differences within one composition are untouched
    a = [s for s in aligned if s.frame_id.startswith("UREAXX02")]
    assert a[0].hard_energy - a[1].hard_energy == pytest.approx(
        a[0].hard.energy - a[1].hard.energy, abs=1e-6
    )
    # the held-out crystal's composition is outside the training span (3 training
    # compositions): its hard energies are masked and listed, never given an arbitrary offset
    masked = dm.summary["hard_energy_unaligned_frames"]
    assert masked and set(masked) <= {s.frame_id for s in dm.val_samples}
    vb = collate([FramesDataset(dm.val_samples)[i] for i in range(len(dm.val_samples))])
    for k, s in enumerate(dm.val_samples):
        if s.frame_id in masked:
            assert not vb.hard.energy_mask[k] and vb.hard.forces_mask.any()
        elif s.hard is not None:
            assert vb.hard.energy[k].item() == pytest.approx(
                original[s.frame_id] / s.n_atoms, abs=1e-4
            )
    # the soft alignment onto hard energies uses the aligned ones
    dm_h = _dm(store, hard_reference="student", reference="hard")
    dm_h0 = _dm(labelled_store, reference="hard")
    for s, s0 in zip(dm_h.train_samples, dm_h0.train_samples):
        assert s.frame_id == s0.frame_id
        if s.soft_energy is not None:
            assert s.soft_energy == pytest.approx(s0.soft_energy, abs=1e-3)
    with pytest.raises(ValueError, match="hard_reference"):
        FramesDataModule(str(store), hard_reference="hard")


def test_batch_moves_labels_and_graphs(labelled_store):
    """Lightning's batch transfer (``transfer_batch_to_device``) moves the frozen Batch: labels,
    masks and graphs go to the device ("meta" stands in for a GPU here)."""
    dm = _dm(labelled_store, stress_mode="molecular")
    batch = next(iter(dm.val_dataloader()))
    module = DistillationModule(loss=DistillationLoss(r_se=1, r_sf=1))
    moved = module.transfer_batch_to_device(batch, torch.device("meta"), 0)
    for t in (moved.hard, moved.soft):
        assert {getattr(t, f).device.type for f in t.__dataclass_fields__} == {"meta"}
    assert moved.graphs[0].lattice.device.type == "meta"
    assert moved.mol_offsets.device.type == "meta" and moved.volumes.device.type == "meta"
    assert batch.hard.energy.device.type == "cpu" and moved.frame_ids == batch.frame_ids


def test_soft_and_hard_reach_the_loss_separately(labelled_store):
    dm = _dm(labelled_store)
    module = DistillationModule(loss=DistillationLoss(r_he=1, r_hf=1, r_se=1, r_sf=1))
    batch = next(iter(dm.val_dataloader()))
    pred = module(batch)
    terms = module.loss_fn(pred, batch).maes
    assert terms["mae_hard_energy"].item() < 1e-4  # hard labels are the pretrained CHGNet's
    assert terms["mae_soft_energy"].item() > 10 * terms["mae_hard_energy"].item()
    assert terms["mae_soft_forces"].item() > terms["mae_hard_forces"].item()


def test_module_step_updates_only_mlp_and_lowers_soft_loss(labelled_store):
    torch.manual_seed(0)
    dm = _dm(labelled_store, batch_size=15)
    module = DistillationModule(
        loss=DistillationLoss(r_he=0, r_hf=0, r_se=1, r_sf=1),
        optimizer=functools.partial(torch.optim.Adam, lr=1e-4),
    )
    opt = module.configure_optimizers()
    batch = next(iter(dm.train_dataloader()))
    frozen = {
        k: v.clone() for k, v in module.student.state_dict().items() if not k.startswith("mlp.")
    }
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # residuals are small (CHGNet vs CHGNet+D3 after alignment): 0.0103 -> 0.0089 measured
    assert losses[-1] < 0.92 * losses[0], losses
    for k, v in module.student.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_configuration_error_before_training(labelled_store):
    dm = _dm(labelled_store)
    loss = DistillationLoss(r_he=0, r_hf=0, r_se=1, r_sf=1, r_hs=1)
    dm_avail = dict(dm.available())
    dm_avail[("hard", "stress")] = 0
    with pytest.raises(ValueError, match="r_hs=1.0 but no training frame has hard stress"):
        loss.check_available(dm_avail)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_kd_nnp(args, cwd, full_error=True)


def _tiny_data(store) -> list[str]:
    """The data overrides of the tiny CLI runs on the labelled test store."""
    return [f"data.store={store}", "data.label_set=toy_teacher", "data.n_val=5",
            "data.batch_size=5", "data.grouped=false"]  # fmt: skip


def test_tiny_training_run_cli(labelled_store, tmp_path, chgnet_model):
    r = _cli(
        [
            "train",
            *_tiny_data(labelled_store),
            "trainer.max_epochs=4",
            "loss=soft_only",
            "loss.r_sf=0.2",
            "model.optimizer.lr=0.003",
            f"paths.output_dir={tmp_path}",
            "hydra.run.dir=" + str(tmp_path / "run"),
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    hist = [h for h in metrics["history"] if h["split"] == "val"]
    assert hist[0]["epoch"] == 0 and hist[-1]["epoch"] == 4
    # the soft loss the MLP is trained on goes down (5 validation frames of another split
    # need not follow within 4 epochs: only the training objective is asserted)
    train = [h for h in metrics["history"] if h["split"] == "train"]
    assert [h["epoch"] for h in train] == [1, 2, 3, 4]
    assert train[-1]["loss"] < 0.9 * train[0]["loss"], train
    assert train[-1]["mae_soft_energy"] < train[0]["mae_soft_energy"], train
    for name in ("config.yaml", "provenance.json", "data_summary.json", "loss_curves.png",
                 "crossover.json", "logs/metrics.csv", "student.pt"):  # fmt: skip
        assert (run / name).exists(), name
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["packages"]["chgnet"] and "git_commit" in prov
    # the exported student is a plain CHGNet model file with the backbone untouched
    from chgnet.model import CHGNet

    student = CHGNet.from_file(str(run / "student.pt"))
    ref = chgnet_model.state_dict()
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, ref[k])}
    assert changed and all(k.startswith("mlp.") for k in changed)
    # a second launch of the same job is skipped (resumable sweeps; another config is refused:
    # tests/test_train_relaunch.py)
    mtime = (run / "metrics.json").stat().st_mtime
    r2 = _cli(["train", *_tiny_data(labelled_store), "trainer.max_epochs=4", "loss=soft_only",
               "loss.r_sf=0.2", "model.optimizer.lr=0.003", f"paths.output_dir={tmp_path}",
               "hydra.run.dir=" + str(run)], tmp_path)  # fmt: skip
    assert r2.returncode == 0 and (run / "metrics.json").stat().st_mtime == mtime


@pytest.mark.slow  # ~25 s; a CLI multirun also runs in test_train_relaunch.py::test_d7 (default)
def test_tiny_multirun_sweep(labelled_store, tmp_path):
    r = _cli(
        [
            "train", "-m",
            f"data.store={labelled_store}",
            "data.label_set=toy_teacher",
            "data.n_val=5",
            "data.n_train=6,12",
            "trainer.max_epochs=1",
            "loss=mixed",
            "loss.r_he=0.1,10",
            "validate_before_training=false",
            "hydra.sweep.dir=" + str(tmp_path / "sweep"),
        ],
        tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    jobs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(jobs) == 4
    seen = {
        (json.loads(j.read_text())["ratios"]["r_he"], json.loads(j.read_text())["n_train"])
        for j in jobs
    }
    assert seen == {(0.1, 6), (0.1, 12), (10.0, 6), (10.0, 12)}


def test_force_subsets_reach_the_loss_cached_equals_full(labelled_store):
    """data.force_atoms: only M atoms per frame carry force labels in the batch, and the cached
    backend (subsampled Jacobians + stress) gives the full backend's loss on the same batch."""
    from kd_nnp.training.cache.attach import attach_feature_cache

    dm = _dm(labelled_store, force_atoms=3)
    for s in dm.train_samples + dm.val_samples:
        assert s.force_index is not None and len(s.force_index) == 3
    again = _dm(labelled_store, force_atoms=3, seed=1)  # another split: same atoms per frame
    first = {s.frame_id: s.force_index.tolist() for s in dm.train_samples + dm.val_samples}
    for s in again.train_samples + again.val_samples:
        assert s.force_index.tolist() == first[s.frame_id]
    loss = DistillationLoss(r_he=0, r_hf=0, r_se=1, r_sf=1, r_ss=0.1)
    full = DistillationModule(loss=loss, backend="full")
    batch = next(iter(dm.val_dataloader()))
    for t in ("soft", "hard"):
        per_frame = torch.split(batch.targets(t).forces_mask, batch.n_atoms.tolist())
        labelled = [
            bool(getattr(s, t) is not None and getattr(s, t).forces is not None)
            for s in dm.val_samples[: len(per_frame)]
        ]
        assert [int(m.sum()) for m in per_frame] == [3 if ok else 0 for ok in labelled]
    out_full = full.loss_fn(full(batch), batch)
    loss_full, terms_full = out_full.total, out_full.maes

    cached = DistillationModule(loss=loss, backend="cached")
    attach_feature_cache(dm, cached, prebuild=False)
    cbatch = next(iter(dm.val_dataloader()))
    assert cbatch.features is not None and cbatch.graphs is None
    out_cached = cached.loss_fn(cached(cbatch), cbatch)
    loss_cached, terms_cached = out_cached.total, out_cached.maes
    assert float(loss_cached) == pytest.approx(float(loss_full), rel=2e-4)
    for k in ("mae_soft_forces", "mae_soft_stress", "mae_soft_energy"):
        assert float(terms_cached[k]) == pytest.approx(float(terms_full[k]), rel=2e-4, abs=1e-6)
    # a label on an atom whose forces were not cached is refused, never trained towards 0
    cbatch.soft.forces_mask[:] = True
    with pytest.raises(RuntimeError, match="force_atoms disagree"):
        cached(cbatch)


def test_cached_forces_stress_run_cli_parallel_build(labelled_store, tmp_path):
    """kd-nnp train with subsampled soft forces + soft stress, cached, 2 build workers."""
    run = tmp_path / "run"
    r = _cli(
        [
            "train",
            *_tiny_data(labelled_store),
            "data.force_atoms=2",
            "trainer.max_epochs=3",
            "loss=soft_only",
            "loss.r_sf=0.5",
            "loss.r_ss=0.05",
            "model.backend=cached",
            "model.optimizer.lr=0.003",
            "feature_workers=2",
            f"paths.output_dir={tmp_path}",
            "hydra.run.dir=" + str(run),
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((run / "data_summary.json").read_text())
    fc = summary["feature_cache"]
    assert fc["cached"] == 20 and fc["built"] == 20 and fc["force_atoms"] == 2 and fc["stress"]
    metrics = json.loads((run / "metrics.json").read_text())
    train = [h for h in metrics["history"] if h["split"] == "train"]
    assert "mae_soft_forces" in train[0] and "mae_soft_stress" in train[0]
    assert train[-1]["loss"] < train[0]["loss"], train


def test_feature_device_is_checked(labelled_store):
    """feature_device: 'auto' builds where torch can; an unusable device is a clear error."""
    import torch

    from kd_nnp.training.cache.attach import attach_feature_cache

    dm = _dm(labelled_store, force_atoms=2)
    module = DistillationModule(loss=DistillationLoss(r_se=1, r_sf=1), backend="cached")
    stats = attach_feature_cache(dm, module, prebuild=False, device="auto")
    assert stats["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="feature_device must be cpu, cuda or auto"):
        attach_feature_cache(dm, module, prebuild=False, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            attach_feature_cache(dm, module, prebuild=False, device="cuda")


def test_molecular_stress_labels_and_backends_agree(labelled_store):
    """data.stress_mode=molecular: stress targets are sigma + offsets^T F / V of the labels, and
    the cached (molecule-rigid strain Jacobian) and full (chgnet + correction) backends give
    the same loss."""
    from kd_nnp.training.cache.attach import attach_feature_cache
    from kd_nnp.training.stress import EV_PER_A3_TO_GPA, molecular_stress

    dm = _dm(labelled_store, force_atoms=3, stress_mode="molecular")
    s0 = dm.val_samples[0]
    assert s0.mol_offsets.shape == (s0.n_atoms, 3) and s0.volume > 0
    loss = DistillationLoss(r_he=0, r_hf=0, r_se=1, r_sf=0.1, r_ss=0.1)
    full = DistillationModule(loss=loss, backend="full")
    batch = next(iter(dm.val_dataloader()))
    want = molecular_stress(s0.soft.stress, s0.soft.forces, s0.mol_offsets, s0.volume)
    assert torch.allclose(batch.soft.stress[0], torch.tensor(want * EV_PER_A3_TO_GPA).float(),
                          rtol=1e-5, atol=1e-5)  # fmt: skip
    affine = torch.tensor(s0.soft.stress * EV_PER_A3_TO_GPA).float()
    assert float((batch.soft.stress[0] - affine).abs().max()) > 0.05
    out_full = full.loss_fn(full(batch), batch)
    loss_full, terms_full = out_full.total, out_full.maes
    cached = DistillationModule(loss=loss, backend="cached")
    attach_feature_cache(dm, cached, prebuild=False)
    cbatch = next(iter(dm.val_dataloader()))
    out_cached = cached.loss_fn(cached(cbatch), cbatch)
    loss_cached, terms_cached = out_cached.total, out_cached.maes
    assert float(terms_cached["mae_soft_stress"]) == pytest.approx(
        float(terms_full["mae_soft_stress"]), rel=1e-3, abs=1e-4
    )
    assert float(loss_cached) == pytest.approx(float(loss_full), rel=1e-3)
    with pytest.raises(ValueError, match="stress_mode must be affine or molecular"):
        _dm(labelled_store, stress_mode="rigid")


def test_masked_or_empty_validation_is_reported(labelled_store, caplog):
    """D14: a validation split whose energies are all masked (compositions outside the span of
    the training ones) or an empty one (n_val=0) is named in a warning and in the summary,
    instead of a silently blank validation report."""
    caplog.set_level(logging.WARNING)
    dm = _dm(labelled_store, grouped=True, use_hard=False)
    val = dm.summary["validation"]
    assert val["n_frames"] == 5 and val["soft_energy_masked"] == 5
    assert val["energy_labelled"] == 0 and val["problems"]
    assert "every validation energy is masked (5 of 5 frames" in caplog.text
    assert "outside the span of the training compositions" in caplog.text
    # with hard labels the hard energies stay (no hard alignment): no problem to report
    caplog.clear()
    dm_h = _dm(labelled_store, grouped=True)
    assert dm_h.summary["validation"]["energy_labelled"] > 0
    assert "every validation energy is masked" not in caplog.text
    # no validation frames at all
    caplog.clear()
    dm0 = _dm(labelled_store, n_val=0)
    assert dm0.summary["validation"]["n_frames"] == 0 and dm0.summary["validation"]["problems"]
    assert "no validation frames (data.n_val=0)" in caplog.text


def test_preparation_logs_progress(labelled_store, tmp_path, caplog):
    """D18: building the graph cache, fitting the reference and building the feature cache
    log i/n, rate and ETA (every 10 %), and the reference fit logs its start and end."""
    from kd_nnp.training.cache.attach import attach_feature_cache

    caplog.set_level(logging.INFO)
    dm = _dm(labelled_store, graph_cache=str(tmp_path / "graphs"))
    text = caplog.text
    assert "graph cache: 2/20 (10 %)" in text and "graph cache: 20/20 (100 %)" in text
    assert "ETA" in text
    assert "pretrained student energies: 15/15 (100 %)" in text
    assert "soft energy reference (student): fitting on 15 frames" in text
    assert "soft energy reference (student): done" in text
    caplog.clear()
    module = DistillationModule(
        loss=DistillationLoss(r_se=1, r_sf=0), compute_forces=False, backend="cached"
    )
    attach_feature_cache(dm, module)
    assert "feature cache: 20/20 (100 %)" in caplog.text


def test_full_backend_memory_is_checked_before_training(labelled_store, monkeypatch, caplog):
    """D20: backend=full with forces needs ~BYTES_PER_ATOM per atom of a batch; the largest
    batch's estimate is compared with the available memory before training: a warning when
    it does not fit, KdNnpError when it exceeds it by more than OVERCOMMIT_FACTOR (unless
    model.allow_memory_overcommit)."""
    import lightning as L

    from kd_nnp.errors import KdNnpError
    from kd_nnp.training import memory_check as mc

    dm = _dm(labelled_store, batch_size=4)
    sizes = sorted(s.n_atoms for s in dm.train_samples)
    assert dm.max_batch_atoms() >= sum(sizes[-4:])
    module = DistillationModule(loss=DistillationLoss(r_se=1, r_sf=1), backend="full")
    need = mc.BYTES_PER_ATOM_FULL_FORCES * dm.max_batch_atoms()
    caplog.set_level(logging.WARNING)
    caplog.clear()  # the data module's INFO lines (progress) when another test set INFO
    report = mc.check_full_backend_memory(dm, module, available=10 * need)
    assert report["estimate_bytes"] == need and not caplog.text
    mc.check_full_backend_memory(dm, module, available=int(need / 1.2))
    assert "largest batch" in caplog.text and "may not fit" in caplog.text
    with pytest.raises(KdNnpError, match="allow_memory_overcommit"):
        mc.check_full_backend_memory(dm, module, available=need // 4)
    # stress keeps a larger graph (measured 15.2 vs 9.2 MB per atom on 52-100-atom frames)
    with_stress = DistillationModule(loss=DistillationLoss(r_se=1, r_sf=1, r_ss=1), backend="full")
    stress_need = mc.BYTES_PER_ATOM_FULL_STRESS * dm.max_batch_atoms()
    assert stress_need > need
    assert (
        mc.check_full_backend_memory(dm, with_stress, available=10 * stress_need)["estimate_bytes"]
        == stress_need
    )
    # energy-only or cached training is not concerned
    energy_only = DistillationModule(loss=DistillationLoss(r_se=1, r_sf=0), compute_forces=False)
    assert mc.check_full_backend_memory(dm, energy_only, available=1) is None
    # the module runs the check when Lightning sets it up, before the first step
    monkeypatch.setattr(mc, "available_memory_bytes", lambda: need // 4)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, inference_mode=False)  # fmt: skip
    with pytest.raises(KdNnpError, match="estimated"):
        trainer.fit(module, datamodule=dm)
    overcommit = DistillationModule(
        loss=DistillationLoss(r_se=1, r_sf=1), backend="full", allow_memory_overcommit=True
    )
    caplog.clear()
    assert mc.check_full_backend_memory(dm, overcommit)["estimate_bytes"] == need
    assert "allow_memory_overcommit" in caplog.text
    assert dm.summary["memory"]["max_batch_atoms"] == dm.max_batch_atoms()
    # train can run the check early (before the caches are built); the hook does not repeat it
    caplog.clear()
    overcommit.check_memory(dm)
    assert caplog.text.count("may not fit") == 1
    overcommit.check_memory(dm)
    assert caplog.text.count("may not fit") == 1


def test_val_loss_does_not_depend_on_batching(labelled_store):
    """val/loss was the frame-weighted mean of batch losses: a batch without hard labels
    scored 0 on the hard terms, so the value changed with data.batch_size (and with which
    frames fell together). It is now the loss formula on the epoch MAEs."""
    import lightning as L

    out = []
    for bs in (3, 8):
        torch.manual_seed(0)
        dm = _dm(labelled_store, batch_size=bs, n_val=8)
        hard = [s.hard is not None and s.hard.energy is not None for s in dm.val_samples]
        assert any(hard) and not all(hard)  # OXALAC02's frames have no hard labels
        module = DistillationModule(
            loss=DistillationLoss(r_he=2.0, r_hf=0, r_se=1.0, r_sf=0),
            optimizer=functools.partial(torch.optim.Adam, lr=1e-4),
            compute_forces=False,
            compute_stress=False,
        )
        trainer = L.Trainer(
            accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
        )  # fmt: skip
        (res,) = trainer.validate(module, datamodule=dm, verbose=False)
        want = 2.0 * res["val/mae_hard_energy"] + res["val/mae_soft_energy"]
        assert res["val/loss"] == pytest.approx(want, rel=1e-6)
        out.append(res)
    assert out[0]["val/loss"] == pytest.approx(out[1]["val/loss"], rel=1e-5)
    assert out[0]["val/mae_hard_energy"] == pytest.approx(out[1]["val/mae_hard_energy"], rel=1e-5)
