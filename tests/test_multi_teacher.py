"""Multi-teacher soft targets (issue 13): ``data.label_set={A: wA, B: wB}``.

Each set's energies are aligned per element on their own, the soft target is the weighted mean
of the aligned energies, forces and stresses, and only frames every set labels get a soft label.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_kd_nnp

SHIFT = {1: -1.3, 6: 2.1, 7: -0.7, 8: 4.4}  # per-element zero of the second teacher (eV)


def _second_set(store_root: Path, name: str = "toy2", drop: int = 0) -> None:
    """Add label set ``name``: another teacher on another energy zero (per element, plus a
    frame-dependent part), forces x 0.5 and stress x 2 of set 'toy'; the last ``drop`` frames
    unlabelled."""
    from kd_nnp.data.store import FrameStore, Labels

    store = FrameStore(store_root)
    toy = store.labels("toy").load()
    frames = sorted(store.iter_frames(), key=lambda f: f.frame_id)
    rows = []
    for k, fr in enumerate(frames[: len(frames) - drop]):
        lab = toy[fr.frame_id]
        energy = lab.energy + sum(SHIFT[int(z)] for z in fr.atoms.numbers) + 0.05 * k
        rows.append((fr, Labels(energy, lab.forces * 0.5, lab.stress * 2.0), None, 0.0))
    store.labels(name, create=True).write(rows)


@pytest.fixture
def two_teacher_store(urea_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(urea_store, root)
    _second_set(root)
    return root


def _dm(store, label_set, **kw):
    from kd_nnp.training.data import FramesDataModule

    dm = FramesDataModule(
        str(store), label_set=label_set, n_val=3, grouped=False, batch_size=11, **kw
    )
    dm.setup("fit")
    return dm


def _soft(dm):
    """{frame_id: (soft energy per frame, forces, stress)} over train + validation."""
    return {
        s.frame_id: (s.soft_energy, s.soft.forces, s.soft.stress)
        for s in dm.train_samples + dm.val_samples
        if s.soft is not None
    }


def test_weight_zero_is_the_one_teacher_run(two_teacher_store):
    one = _dm(two_teacher_store, "toy")
    two = _dm(two_teacher_store, {"toy": 1.0, "toy2": 0.0})
    a, b = _soft(one), _soft(two)
    assert a.keys() == b.keys() and len(a) == 11
    for fid in a:
        assert a[fid][0] == b[fid][0]
        np.testing.assert_array_equal(a[fid][1], b[fid][1])
        np.testing.assert_array_equal(a[fid][2], b[fid][2])
    assert two.summary["label_weights"] == {"toy": 1.0}
    assert two.summary["label_set"] == {"toy": 1.0, "toy2": 0.0}


def test_weighted_mean_of_per_set_aligned_targets(two_teacher_store):
    """{toy: 3, toy2: 1}: energies = 0.75 x toy's aligned + 0.25 x toy2's aligned (each set
    re-referenced on its own: toy2's per-element zero is removed), forces and stress the same
    weighted means of the raw labels."""
    a = _soft(_dm(two_teacher_store, "toy"))
    b = _soft(_dm(two_teacher_store, "toy2"))
    mixed_dm = _dm(two_teacher_store, {"toy": 3, "toy2": 1})
    mixed = _soft(mixed_dm)
    assert mixed.keys() == a.keys()
    # toy2 differs from toy by 0.05 eV x frame index after alignment, so the mixture is not
    # either set: the energies are checked against the weighted mean
    assert max(abs(a[f][0] - b[f][0]) for f in a) > 0.1
    for fid in a:
        assert mixed[fid][0] == pytest.approx(0.75 * a[fid][0] + 0.25 * b[fid][0], abs=1e-6)
        np.testing.assert_allclose(mixed[fid][1], 0.75 * a[fid][1] + 0.25 * b[fid][1])
        np.testing.assert_allclose(mixed[fid][2], 0.75 * a[fid][2] + 0.25 * b[fid][2])
    refs = mixed_dm.summary["reference"]
    assert set(refs) == {"toy", "toy2"} and refs["toy"]["weight"] == 3.0
    # the batch the losses see carries the mixture (energy per atom)
    from kd_nnp.training.data import collate

    s = mixed_dm.train_samples[0]
    batch = collate([{"sample": s, "graph": None, "features": None}])
    assert batch.soft.energy[0].item() == pytest.approx(mixed[s.frame_id][0] / 16, rel=1e-6)
    assert torch.allclose(batch.soft.forces, torch.as_tensor(mixed[s.frame_id][1]).float())


def test_frames_missing_from_one_set_get_no_soft_label(urea_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(urea_store, root)
    _second_set(root, drop=3)
    dm = _dm(root, {"toy": 1, "toy2": 1})
    assert dm.summary["skipped"]["incomplete_label_sets"] == 3
    assert len(_soft(dm)) == 8  # the 3 frames keep their hard labels (usable, no soft label)
    assert dm.available()[("soft", "energy")] == sum(s.soft is not None for s in dm.train_samples)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"toy": -1, "toy2": 1}, "weight of 'toy' must be finite and >= 0"),
        ({"toy": 0, "toy2": 0}, "every weight is 0"),
        ({"toy": "half"}, "weight of 'toy' is not a number"),
        (["toy", "toy2"], "a label-set name or a mapping"),
    ],
)
def test_bad_weights_are_refused(two_teacher_store, spec, match):
    with pytest.raises(ValueError, match=match):
        _dm(two_teacher_store, spec)


def test_unknown_set_names_the_sets_the_store_has(two_teacher_store):
    with pytest.raises(Exception, match="toy2"):
        _dm(two_teacher_store, {"toy": 1, "nosuch": 1})


@pytest.mark.slow  # ~30 s: two CLI trainings; test_weight_zero_is_the_one_teacher_run checks the targets
def test_cli_two_teachers_with_weight_zero_equal_one_teacher(two_teacher_store, tmp_path):
    """The same training job with ``data.label_set=toy`` and ``data.label_set={toy:1,toy2:0}``:
    identical loss histories and students."""
    common = [f"data.store={two_teacher_store}", "data.n_val=3", "data.batch_size=4",
              "data.grouped=false", "trainer.max_epochs=2", "loss=soft_only", "loss.r_sf=0.1",
              f"paths.output_dir={tmp_path}"]  # fmt: skip
    runs = {}
    for tag, spec in (("one", "toy"), ("two", "{toy:1,toy2:0}")):
        run = tmp_path / tag
        r = run_kd_nnp(["train", *common, f"data.label_set={spec}", f"hydra.run.dir={run}"],
                       tmp_path, full_error=True)  # fmt: skip
        assert r.returncode == 0, r.stderr[-4000:]
        runs[tag] = json.loads((run / "metrics.json").read_text())
    hist = {t: [(h["split"], h["epoch"], h["loss"]) for h in m["history"]] for t, m in runs.items()}
    assert hist["one"] == hist["two"] and len(hist["one"]) >= 4
    summary = json.loads((tmp_path / "two" / "data_summary.json").read_text())
    assert summary["label_weights"] == {"toy": 1.0}
    from chgnet.model import CHGNet

    s1 = CHGNet.from_file(str(tmp_path / "one" / "student.pt")).state_dict()
    s2 = CHGNet.from_file(str(tmp_path / "two" / "student.pt")).state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
