"""Replay frames (issue 11, forgetting): ``data.replay_store`` adds pretrained-CHGNet-labelled
inorganic frames to the training frames only, as a third target (``Batch.replay``, loss ratios
``r_re``, ``r_rf``, ``r_rs``), never aligned, never validated, outside ``n_train`` and the
reference fits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kd_nnp.errors import KdNnpError

pytestmark = pytest.mark.filterwarnings("ignore")

KW = {"label_set": "toy", "n_val": 3, "grouped": False, "batch_size": 4}


@pytest.fixture(scope="module")
def replay_store(tmp_path_factory):
    """4 replay frames (Si, NaCl; 2 strained + rattled copies each, 8 atoms) labelled by
    pretrained CHGNet (label set ``chgnet``), as ``kd-nnp data inorganic`` + ``kd-nnp label
    teacher=chgnet`` make them."""
    from kd_nnp.data.sources.inorganic import replay_frames
    from kd_nnp.data.store import FrameStore
    from kd_nnp.teachers.label import label_store

    root = tmp_path_factory.mktemp("replay") / "replay"
    FrameStore(root, create=True).add_frames(replay_frames(2, seed=1, prototypes=["Si", "NaCl"]))
    rep = label_store(root, "chgnet", progress=False, check=False)
    assert (rep.n_ok, rep.n_failed) == (4, 0)
    return root


def _dm(store, **kw):
    from kd_nnp.training.data import FramesDataModule

    dm = FramesDataModule(str(store), **{**KW, **kw})
    dm.setup("fit")
    return dm


def _epoch_ids(loader) -> list[list[str]]:
    return [b.frame_ids for b in loader]


def test_without_replay_the_batches_are_as_before(urea_store):
    """No replay store, replay ratios 0: the training loader draws the training frames alone in
    the order the seeded loader always drew them, every replay mask is False, and the loss and
    its terms are the hard and soft ones only."""
    from kd_nnp.training.loss import DistillationLoss, masked_mae
    from kd_nnp.training.module import DistillationModule

    dm = _dm(urea_store)
    assert dm.replay_samples == [] and dm.summary["replay"] is None
    assert dm.summary["n_replay"] == 0 and dm.summary["n_train"] == 8
    assert all(v == 0 for k, v in dm.summary["available"].items() if k.startswith("replay_"))
    # the order of the pre-replay loader: the seeded shuffle of the training frames alone
    from torch.utils.data import DataLoader

    order = DataLoader(range(8), batch_size=4, shuffle=True,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    want = [[dm.train_samples[int(i)].frame_id for i in idx] for idx in order]
    assert _epoch_ids(dm.train_dataloader()) == want
    module = DistillationModule(
        loss=DistillationLoss(r_he=0.5, r_hf=0.1, r_se=1, r_sf=1), compute_forces=True
    )
    assert module.loss_fn.ratios["r_re"] == module.loss_fn.ratios["r_rf"] == 0
    for batch in dm.train_dataloader():
        rep = batch.replay
        assert not (rep.energy_mask.any() or rep.forces_mask.any() or rep.stress_mask.any())
        pred = module(batch)
        result = module.loss_fn(pred, batch)
        assert set(result.maes) == {
            f"mae_{t}_{q}" for t in ("hard", "soft") for q in ("energy", "forces")
        }
        expected = sum(
            r * masked_mae(pred.get(q), *batch.targets(t).label(q))[0]
            for (t, q, r) in (("hard", "energy", 0.5), ("hard", "forces", 0.1),
                              ("soft", "energy", 1.0), ("soft", "forces", 1.0))
        )  # fmt: skip
        assert result.total.item() == expected.item()


def test_replay_frames_train_only_outside_n_train_split_and_alignment(urea_store, replay_store):
    plain = _dm(urea_store, n_train=6)
    dm = _dm(urea_store, n_train=6, replay_store=str(replay_store))
    replay_ids = {s.frame_id for s in dm.replay_samples}
    assert len(replay_ids) == 4 and all(i.startswith("replay:") for i in replay_ids)
    # the split, n_train and the alignment are those of the run without replay
    assert [s.frame_id for s in dm.train_samples] == [s.frame_id for s in plain.train_samples]
    assert [s.frame_id for s in dm.val_samples] == [s.frame_id for s in plain.val_samples]
    assert dm.summary["n_train"] == 6 and dm.summary["n_replay"] == 4
    assert dm.summary["reference"] == plain.summary["reference"]
    for a, b in zip(plain.train_samples + plain.val_samples, dm.train_samples + dm.val_samples):
        assert (a.soft_energy, a.hard_energy) == (b.soft_energy, b.hard_energy)
    assert all(s.soft is None and s.hard is None and s.replay for s in dm.replay_samples)
    assert dm.summary["replay"]["store"] == str(replay_store)
    assert dm.summary["replay"]["label_set"] == "chgnet"
    assert dm.summary["replay"]["n_frames"] == 4
    assert dm.available()[("replay", "energy")] == 4 and dm.available()[("soft", "energy")] == 6
    # validation never sees a replay frame; one training epoch holds each frame once, shuffled
    val = [i for ids in _epoch_ids(dm.val_dataloader()) for i in ids]
    assert not set(val) & replay_ids
    batches = list(dm.train_dataloader())
    seen = [i for b in batches for i in b.frame_ids]
    assert sorted(seen) == sorted(replay_ids | {s.frame_id for s in dm.train_samples})
    assert any(set(b.frame_ids) & replay_ids and set(b.frame_ids) - replay_ids for b in batches)
    for b in batches:
        is_replay = torch.tensor([i in replay_ids for i in b.frame_ids])
        atom_replay = torch.repeat_interleave(is_replay, b.n_atoms)
        assert torch.equal(b.replay.energy_mask, is_replay)
        assert torch.equal(b.replay.forces_mask, atom_replay)
        assert not (b.soft.energy_mask & is_replay).any()
        assert not (b.hard.energy_mask & is_replay).any()
        assert not (b.soft.forces_mask & atom_replay).any()

    # data.replay_n: a seeded subset, nested for one seed
    def subset(n: int) -> set[str]:
        sub = _dm(urea_store, replay_store=str(replay_store), replay_n=n)
        assert sub.summary["replay"]["replay_n"] == n
        return {s.frame_id for s in sub.replay_samples}

    two, three = subset(2), subset(3)
    assert len(two) == 2 and two < three < replay_ids


def test_pretrained_student_fits_its_own_replay_labels(urea_store, replay_store):
    """At initialisation the student is pretrained CHGNet: its replay energy MAE on
    CHGNet-labelled replay frames is ~0 on the full and the cached path (no alignment, energy
    per atom), and so are the replay forces."""
    from kd_nnp.training.cache.attach import attach_feature_cache
    from kd_nnp.training.data import collate
    from kd_nnp.training.loss import DistillationLoss
    from kd_nnp.training.module import DistillationModule

    dm = _dm(urea_store, replay_store=str(replay_store))
    loss = DistillationLoss(r_se=1, r_sf=0, r_re=1, r_rf=1)

    def maes(module):
        items = [{"sample": s, "graph": None, "features": None} for s in dm.replay_samples]
        if dm.feature_loader is not None:
            for it in items:
                it["features"] = dm.feature_loader(it["sample"], None)
        batch = collate(items)
        assert (batch.features is not None) == (module.backend == "cached")
        result = module.loss_fn(module(batch), batch)
        assert result.counts["mae_replay_energy"] == 4
        assert result.counts["mae_replay_forces"] == 3 * sum(s.n_atoms for s in dm.replay_samples)
        return {k: float(v) for k, v in result.maes.items()}

    full = maes(DistillationModule(loss=loss, backend="full"))
    cached_module = DistillationModule(loss=loss, backend="cached")
    attach_feature_cache(dm, cached_module, prebuild=False)
    cached = maes(cached_module)
    for m in (full, cached):
        assert set(m) == {"mae_replay_energy", "mae_replay_forces"}
        assert m["mae_replay_energy"] < 1e-4, m
        assert m["mae_replay_forces"] < 1e-4, m
    # the labels are pretrained CHGNet's, not the organic frames' soft scale: a real check
    assert max(abs(s.replay.energy / s.n_atoms) for s in dm.replay_samples) > 1.0
    # data.stress_mode=molecular: replay frames keep chgnet's affine stress in a mixed batch
    mol = _dm(urea_store, replay_store=str(replay_store), stress_mode="molecular")
    samples = mol.train_samples[:1] + mol.replay_samples
    batch = collate([{"sample": s, "graph": None, "features": None} for s in samples])
    module = DistillationModule(loss=DistillationLoss(r_se=1, r_ss=1, r_re=1, r_rs=1))
    result = module.loss_fn(module(batch), batch)
    assert result.counts["mae_replay_stress"] == 4 * 6
    assert float(result.maes["mae_replay_stress"]) < 1e-4  # GPa


def test_bad_replay_configurations_are_refused(urea_store, replay_store, tmp_path):
    from kd_nnp.data.sources.inorganic import replay_frames
    from kd_nnp.data.store import FrameStore
    from kd_nnp.training.loss import DistillationLoss, LossConfigError, check_replay_settings

    with pytest.raises(LossConfigError, match=r"loss.r_re=1 but data.replay_store is not set"):
        check_replay_settings({"r_se": 1, "r_re": 1}, None)
    with pytest.raises(LossConfigError, match=r"loss.r_rf=0.5 but data.replay_store"):
        check_replay_settings({"r_rf": 0.5}, "")
    with pytest.raises(LossConfigError, match=r"data.replay_store=S but loss.r_re, loss.r_rf"):
        check_replay_settings({"r_se": 1, "r_re": 0, "r_rf": 0}, "S")
    check_replay_settings({"r_se": 1}, None)  # neither: fine
    check_replay_settings({"r_re": 0.1}, "S")  # both: fine
    # a replay ratio with no replay frame in the data (check_available, after setup)
    with pytest.raises(LossConfigError, match=r"r_re=1.0 but no training frame has replay energy"):
        DistillationLoss(r_se=1, r_re=1).check_available(_dm(urea_store).available())
    unlabelled = tmp_path / "unlabelled"
    FrameStore(unlabelled, create=True).add_frames(replay_frames(1, prototypes=["Si"]))
    empty = tmp_path / "empty"
    FrameStore(empty, create=True)
    cases = [
        (unlabelled, {}, r"data.replay_store=.*unlabelled.*no label set 'chgnet'"),
        (empty, {}, r"data.replay_store=.*empty holds no frames"),
        (tmp_path / "nosuch", {}, r"data.replay_store=.*nosuch.*not a kd_nnp frames store"),
        (replay_store, {"replay_label_set": "so3lr"}, r"replay_label_set=so3lr.*no label set"),
        (replay_store, {"replay_n": 5}, r"data.replay_n=5 but .* only 4 usable"),
        (replay_store, {"replay_n": 0}, r"data.replay_n must be >= 1"),
        (urea_store, {"replay_label_set": "toy"}, r"shares 11 frame id\(s\) with data.store"),
    ]
    for store, kw, match in cases:
        with pytest.raises(KdNnpError, match=match):
            _dm(urea_store, replay_store=str(store), **kw)
    with pytest.raises(KdNnpError, match=r"data.replay_n=2 but data.replay_store is not set"):
        _dm(urea_store, replay_n=2)


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from kd_nnp.utils.paths import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_tiny_training_with_replay(urea_store, replay_store, tmp_path):
    """``kd-nnp train``'s body (run_training) with replay on the cached backend, replay energy
    and (subsampled) forces: the metrics hold the replay MAEs (training only), the data summary
    the replay frames; a relaunch with other replay frames or settings is another job."""
    from kd_nnp.data.sources.inorganic import replay_frames
    from kd_nnp.data.store import FrameStore
    from kd_nnp.training.loss import LossConfigError
    from kd_nnp.training.train import run_training
    from kd_nnp.utils.provenance import JobConfigMismatch

    replay = tmp_path / "replay"
    shutil.copytree(replay_store, replay)
    common = [f"data.store={urea_store}", "data.label_set=toy", "data.n_val=3",
              "data.batch_size=4", "data.grouped=false", "loss=soft_only", "loss.r_sf=0",
              "data.force_atoms=2", "model.backend=cached", "trainer.max_epochs=2",
              "trainer.enable_progress_bar=false", "~callbacks", "~logger",
              f"paths.output_dir={tmp_path}"]  # fmt: skip
    extra = [f"data.replay_store={replay}", "loss.r_re=1", "loss.r_rf=0.1"]
    run = tmp_path / "run"
    # a replay store with every replay ratio 0: refused before anything is written
    with pytest.raises(LossConfigError, match="data.replay_store=.* are all 0"):
        run_training(_compose(common + extra[:1]), run, overrides=extra[:1])
    assert not run.exists()
    metrics = run_training(_compose(common + extra), run, overrides=extra)
    train = [h for h in metrics["history"] if h["split"] == "train"]
    val = [h for h in metrics["history"] if h["split"] == "val"]
    assert len(train) == 2 and val
    assert all("mae_replay_energy" in h and "mae_replay_forces" in h for h in train)
    assert not any(k.startswith("mae_replay") for h in val for k in h)
    assert all(h["mae_replay_energy"] >= 0 and h["mae_replay_forces"] >= 0 for h in train)
    assert metrics["n_train"] == 8 and metrics["n_val"] == 3
    assert metrics["ratios"]["r_re"] == 1.0 and metrics["replay"]["n_frames"] == 4
    summary = json.loads((run / "data_summary.json").read_text())
    assert summary["replay"]["store"] == str(replay) and summary["replay"]["label_set"] == "chgnet"
    assert summary["n_replay"] == 4 and summary["n_train"] == 8
    assert summary["feature_cache"]["frames"] == 8 + 3 + 4
    # relaunch: other replay settings, or other frames behind the same path, are another job
    with pytest.raises(JobConfigMismatch, match="data.replay_n"):
        run_training(_compose(common + extra + ["data.replay_n=2"]), run,
                     overrides=[*extra, "data.replay_n=2"])  # fmt: skip
    FrameStore(replay).add_frames(replay_frames(1, seed=3, prototypes=["Si"]))
    with pytest.raises(JobConfigMismatch, match="data_replay"):
        run_training(_compose(common + extra), run, overrides=extra)


def test_every_loss_preset_lists_every_ratio():
    """The replay ratios exist (0) in every loss preset, so ``loss.r_re=1`` works with each."""
    from kd_nnp.training.loss import RATIOS

    for name in ("soft_only", "hard_only", "mixed"):
        cfg = _compose([f"loss={name}"])
        assert set(RATIOS) <= set(cfg.loss), name
        assert cfg.loss.r_re == cfg.loss.r_rf == cfg.loss.r_rs == 0.0
    assert _compose([])["data"]["replay_store"] is None
    assert _compose([])["data"]["replay_label_set"] == "chgnet"
    assert _compose([])["data"]["replay_n"] is None
