"""Issue 15's leakage guard: ``data.exclude_molecules`` drops every frame of a held-out
molecule before the split (counted, recorded, part of the relaunch fingerprint)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from kd_nnp.data.molecules import MOL_KEYS_INFO, molecule_keys, read_molecule_keys
from kd_nnp.errors import KdNnpError

CODES = ("FORMAM", "UREAXX02", "OXALAC11")


@pytest.fixture(scope="module")
def three_molecule_store(tmp_path_factory, small_crystals):
    """3 frames per crystal of 3 molecules, fake soft labels; FORMAM's frames record their
    molecule keys at source time, the others leave them to be computed from the atoms."""
    from kd_nnp.data.store import Frame, FrameStore, Labels

    root = tmp_path_factory.mktemp("guard_store")
    store = FrameStore(root, create=True)
    frames, soft = [], []
    for code in CODES:
        atoms = small_crystals[code]
        keys = molecule_keys(atoms)
        for k, strain in enumerate((-0.02, 0.0, 0.03)):
            a = atoms.copy()
            a.set_cell(a.cell * (1 + strain), scale_atoms=True)
            info = {"strain": strain}
            if code == "FORMAM":
                info[MOL_KEYS_INFO] = ";".join(keys)
            fr = Frame(f"{code}/s{k}", a, code, "test", None, info)
            frames.append(fr)
            lab = Labels(-5.0 * len(a) + strain, np.zeros((len(a), 3)), np.zeros(6))
            soft.append((fr, lab, None, 0.0))
    store.add_frames(frames)
    store.labels("fake", create=True).write(soft)
    return root


def _dm(store, exclude):
    from kd_nnp.training.data import FramesDataModule

    dm = FramesDataModule(
        str(store), label_set="fake", n_val=1, reference="none", exclude_molecules=exclude
    )
    dm.setup("fit")
    return dm


def test_molecule_keys_of_a_crystal(small_crystals):
    """One key per kind of molecule (Hill formula + graph hash), the same for a strained copy;
    OXALAC02 lacks its H atoms (X-ray), so it is another molecule to the bond graph."""
    keys = {c: molecule_keys(a) for c, a in small_crystals.items()}
    assert all(len(k) == 1 for k in keys.values())
    assert keys["OXALAC11"][0].startswith("C2H2O4-") and keys["OXALAC02"][0].startswith("C2O4-")
    assert keys["FORMAM"][0].startswith("CH3NO-") and len({k[0] for k in keys.values()}) == 4
    a = small_crystals["UREAXX02"].copy()
    a.set_cell(a.cell * 1.03, scale_atoms=True)
    assert molecule_keys(a) == keys["UREAXX02"]


def test_excluded_molecule_frames_dropped(three_molecule_store, small_crystals, tmp_path):
    urea = molecule_keys(small_crystals["UREAXX02"])
    form = molecule_keys(small_crystals["FORMAM"])
    full = _dm(three_molecule_store, None)
    ids = lambda dm: {s.frame_id for s in dm.train_samples + dm.val_samples}  # noqa: E731
    assert len(ids(full)) == 9 and full.summary["excluded"] is None
    # computed from the atoms (urea records no keys)
    dm = _dm(three_molecule_store, urea)
    assert ids(dm) == ids(full) - {f"UREAXX02/s{k}" for k in range(3)}
    assert dm.summary["skipped"]["excluded_molecule"] == 3
    ex = dm.summary["excluded"]
    assert ex["n_frames"] == 3 and ex["n_molecules"] == 1 and ex["groups"] == ["UREAXX02"]
    assert dm.summary["n_frames_store"] == 9
    # the kept frames are untouched: same labels as without the guard
    soft = {s.frame_id: s.soft.energy for s in full.train_samples + full.val_samples}
    assert all(s.soft.energy == soft[s.frame_id] for s in dm.train_samples + dm.val_samples)
    # recorded keys (FORMAM), from a JSON file; a key of no frame drops nothing more
    path = tmp_path / "held.json"
    path.write_text(json.dumps({"molecules": [*form, "C9H9-nothing"]}))
    dm = _dm(three_molecule_store, str(path))
    assert {s.frame_id.split("/")[0] for s in dm.train_samples + dm.val_samples} == {
        "UREAXX02",
        "OXALAC11",
    }
    assert dm.summary["excluded"]["n_frames"] == 3 and dm.summary["excluded"]["source"] == str(path)


def test_molecule_list_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"molecules": [1, 2]}')
    with pytest.raises(KdNnpError, match="bad.json: expected a list of molecule keys"):
        read_molecule_keys(str(bad))
    with pytest.raises(KdNnpError, match="missing.txt: no such file"):
        read_molecule_keys(str(tmp_path / "missing.txt"))
    txt = tmp_path / "keys.txt"
    txt.write_text("B-2  # comment\n\nA-1\nB-2\n")
    assert read_molecule_keys(str(txt)) == ["A-1", "B-2"]


def test_exclusion_contents_are_part_of_the_job(tmp_path):
    """The same file name with other molecules is another job: a relaunch is refused."""
    from kd_nnp.training.train import run_training
    from kd_nnp.utils.provenance import JobConfigMismatch

    keys = tmp_path / "held.txt"
    keys.write_text("A-1\n")
    cfg = OmegaConf.create(
        {"seed": 0, "data": {"store": "s", "exclude_molecules": str(keys)}, "skip_if_done": True}
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"done": 1}')  # a finished job: only the check runs
    assert run_training(cfg, run) == {"done": 1}
    assert run_training(cfg, run) == {"done": 1}  # same molecules: same job
    keys.write_text("A-1\nB-2\n")
    with pytest.raises(JobConfigMismatch, match="data_excluded_molecules"):
        run_training(cfg, run)


def test_perturbed_frames_record_their_molecules(small_crystals):
    from kd_nnp.data.sources.perturb import make_perturbations

    atoms = small_crystals["OXALAC11"]
    frames = make_perturbations([("OXALAC11", atoms)], n_strain=2, n_rattle=1, seed=0)
    assert len(frames) >= 3
    assert {f.info[MOL_KEYS_INFO] for f in frames} == {";".join(molecule_keys(atoms))}


class _PullOneAtom:
    """A 'teacher' whose pre-relaxation drags atom 0 out of its molecule (a bond graph change,
    as SO3LR's pre-relaxation did to TETBBZ's C-Br bonds)."""

    def __init__(self):
        from ase.calculators.calculator import Calculator, all_changes

        class Pull(Calculator):
            implemented_properties = ("energy", "forces")

            def calculate(self, atoms=None, properties=None, system_changes=all_changes):
                super().calculate(atoms, properties, system_changes)
                f = np.zeros((len(self.atoms), 3))
                f[0] = [2.0, 0.0, 0.0]
                self.results = {"energy": -2.0 * self.atoms.positions[0, 0], "forces": f}

        self.calc = Pull()


def test_molecule_keys_come_from_the_parent_not_the_prerelaxed_copy(small_crystals):
    from kd_nnp.data.sources.perturb import make_perturbations

    atoms = small_crystals["UREAXX02"]
    frames = make_perturbations(
        [("UREAXX02", atoms)], n_strain=1, n_rattle=0, seed=0,
        prerelax_calc=_PullOneAtom().calc, prerelax_steps=10,
    )  # fmt: skip
    parent = next(f for f in frames if f.frame_id.endswith("/parent"))
    moved = np.linalg.norm(parent.atoms.positions[0] - atoms.positions[0])
    assert moved > 1.0  # the pre-relaxation broke a bond ...
    assert molecule_keys(parent.atoms) != molecule_keys(atoms)  # ... so its keys changed ...
    # ... but the frames still name the experimental crystal's molecule
    assert {f.info[MOL_KEYS_INFO] for f in frames} == {";".join(molecule_keys(atoms))}
