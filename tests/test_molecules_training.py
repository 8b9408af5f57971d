"""Issue 14: gas-phase molecules next to their crystals teach the student lattice energies.

Tiny data: three small pyxtal crystals (formamide, urea, oxalic acid), a few strained copies
each, teacher CHGNet + D3(BJ) (its dispersion binds the crystals more than pretrained CHGNet,
so there is a lattice energy to learn). Two students are trained alike (cached backend,
energy only) on the crystal frames alone and on the crystal frames plus the molecules of
``kd-nnp data molecules``; the one that saw the molecules must reproduce the teacher's lattice
energy ``E_crystal / Z - E_molecule`` of the training crystals better.
"""

from __future__ import annotations

import shutil
from functools import partial

import numpy as np
import pytest
import torch
from conftest import requires_teacher

from kd_nnp.data.sources.molecules import MoleculesSettings, build_molecules_store
from kd_nnp.data.sources.perturb import PerturbSettings, make_perturbations
from kd_nnp.data.sources.pyxtal_db import pyxtal_crystals
from kd_nnp.data.store import FrameStore

CODES = ["FORMAM", "UREAXX02", "OXALAC11"]


def _train(store: str, epochs: int = 150):
    import lightning as L

    from kd_nnp.training.cache.attach import attach_feature_cache
    from kd_nnp.training.data import FramesDataModule
    from kd_nnp.training.loss import DistillationLoss
    from kd_nnp.training.module import DistillationModule

    dm = FramesDataModule(
        store, label_set="chgnet_d3", n_val=0, batch_size=64, seed=0, reference="student"
    )
    dm.setup("fit")
    module = DistillationModule(
        loss=DistillationLoss(r_he=0, r_hf=0, r_se=1, r_sf=0),
        optimizer=partial(torch.optim.Adam, lr=0.003),
        compute_forces=False,
        compute_stress=False,
        backend="cached",
    )
    attach_feature_cache(dm, module)
    torch.manual_seed(0)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return dm, module.student.eval()


def _lattice_energies(store: FrameStore, energy) -> dict[str, float]:
    """Crystal code -> E_crystal / Z - E_molecule (eV/molecule) with ``energy(frame)``."""
    frames = {f.frame_id: f for f in store.iter_frames()}
    out = {}
    for f in frames.values():
        if f.info.get("gas_frame") == "relaxed":
            crystal = frames[f.info["crystal_frame"]]
            out[crystal.group_id] = energy(crystal) / f.info["count_in_cell"] - energy(f)
    return out


@pytest.mark.slow
@requires_teacher("chgnet_d3")
def test_student_with_molecules_learns_the_teachers_lattice_energy(tmp_path):
    from kd_nnp.teachers.calculators import InferenceCHGNetCalculator, gas_phase, student_clearance
    from kd_nnp.teachers.label import label_store
    from kd_nnp.teachers.registry import load_teacher

    teacher = load_teacher("chgnet_d3", check=False)
    gas = gas_phase("chgnet_d3", teacher.calculator)
    assert not gas.periodic  # D3 of an isolated molecule, without periodic boundaries
    parents = pyxtal_crystals("test", codes=CODES)
    crystals = tmp_path / "crystals"
    fs = FrameStore(crystals, create=True)
    s = PerturbSettings(n_strain=4, n_rattle=1, prerelax_steps=0, volume_range=(-0.05, 0.15))
    fs.add_frames(make_perturbations(parents, s))
    label_store(crystals, "chgnet_d3", check=False, progress=False)
    both = tmp_path / "both"
    shutil.copytree(crystals, both)
    rep = build_molecules_store(
        str(both),
        MoleculesSettings(relax_steps=100, fmax=0.05, n_perturbed=3, rattle_std=0.04),
        calculator=teacher.calculator,
        calculator_name="chgnet_d3",
        label_name="chgnet_d3",
        periodic=gas.periodic,
        teacher_clearance=gas.clearance,
        student_clearance=student_clearance(),
        provenance=teacher.provenance(),
    )
    assert rep.accepted == 3 and rep.frames == 12
    # the crystals' label set is the one the molecules were added to (same teacher hash)
    soft = FrameStore(both).labels("chgnet_d3").load()
    assert len(soft) == len(FrameStore(both)) == 3 * 6 + 12

    def teacher_energy(f):
        return soft[f.frame_id].energy

    target = _lattice_energies(FrameStore(both), teacher_energy)
    assert sorted(target) == sorted(CODES)

    def student_energy(model):
        calc = InferenceCHGNetCalculator(model=model)

        def energy(f):
            a = f.atoms.copy()
            a.calc = calc
            return float(a.get_potential_energy())

        return energy

    from kd_nnp.teachers.calculators import load_chgnet

    pretrained = _lattice_energies(FrameStore(both), student_energy(load_chgnet()))
    dm_with, with_mol = _train(str(both))
    # one per-element reference over crystals and molecules: every training frame aligned
    assert dm_with.reference.n_frames == len(dm_with.train_samples) == 30
    assert not dm_with.unaligned
    _, without = _train(str(crystals))
    learned_with = _lattice_energies(FrameStore(both), student_energy(with_mol))
    learned_without = _lattice_energies(FrameStore(both), student_energy(without))

    def mae(d):
        return float(np.mean([abs(d[k] - target[k]) for k in target]))

    print(
        "lattice energy (eV/molecule) teacher", target, "pretrained", pretrained,
        "student without molecules", learned_without, "with", learned_with,
        "MAE pretrained / without / with:", mae(pretrained), mae(learned_without), mae(learned_with),
    )  # fmt: skip
    assert mae(pretrained) > 0.05  # there is something to learn
    assert mae(learned_with) < 0.5 * mae(learned_without)
    assert mae(learned_with) < 0.5 * mae(pretrained)
