"""`kd-nnp data molecules`: isolated molecules of a store's crystals as gas-phase frames.

Pretrained CHGNet is the cheap teacher (periodic, range = its 6 A atom-graph cutoff); EMT,
which strips H off C, is the teacher under which a molecule falls apart.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT
from conftest import requires_teacher

from kd_nnp.data.molecules import distinct_molecules, graph_key, image_clearance, isolate
from kd_nnp.data.sources.molecules import (
    AUTO_MARGIN,
    MoleculesSettings,
    box_clearance,
    build_molecules_store,
    crystal_frames,
    gas_labels,
    read_molecules_log,
)
from kd_nnp.data.sources.pyxtal_db import build_pyxtal_store, pyxtal_crystals
from kd_nnp.data.store import Frame, FrameStore, StoreError
from kd_nnp.errors import KdNnpError, SettingsError

TINY = MoleculesSettings(relax_steps=40, fmax=0.05, n_perturbed=2, rattle_std=0.05, seed=0)


@pytest.fixture(scope="module")
def calc():
    from kd_nnp.teachers.calculators import make_chgnet

    return make_chgnet()


def _build(path, calc, settings=TINY, **kw):
    args = dict(
        calculator=calc,
        calculator_name="chgnet",
        label_name="chgnet",
        periodic=True,
        teacher_clearance=6.0,
        student_clearance=6.0,
    )
    args.update(kw)
    return build_molecules_store(str(path), settings, **args)


@pytest.fixture(scope="module")
def built(tmp_path_factory, calc):
    store = tmp_path_factory.mktemp("mol") / "store"
    build_pyxtal_store(str(store), "test", ["FORMAM", "UREAXX02"], None, None)
    rep = _build(store, calc)
    return store, rep


def test_gas_frames_are_isolated_relaxed_labelled_and_grouped(built, calc):
    store, rep = built
    assert rep.n_crystals == 2 and rep.n_molecules == 2 and rep.accepted == 2
    assert rep.frames == 6 and rep.clearance == pytest.approx(6.0 + AUTO_MARGIN)
    fs = FrameStore(store)
    frames = {f.frame_id: f for f in fs.iter_frames()}
    gas = {k: f for k, f in frames.items() if f.info.get("phase") == "gas"}
    assert sorted(gas) == sorted(
        f"pyxtal-test:{c}/mol0/{s}"
        for c in ("FORMAM", "UREAXX02")
        for s in ("relaxed", "rattle0", "rattle1")
    )
    labels = fs.labels("chgnet").load()
    assert set(labels) == set(gas)  # crystals untouched, every gas frame labelled
    for fid, f in gas.items():
        crystal = frames[f.info["crystal_frame"]]
        kind = distinct_molecules(crystal.atoms)[0]
        assert f.group_id == crystal.group_id and f.source == "molecules"
        assert (
            f.info["mol_key"]
            == kind.key
            == graph_key(f.atoms.get_chemical_symbols(), f.atoms.positions)
        )
        assert (
            f.info["count_in_cell"] == kind.count == 4 - 2 * ("UREA" in fid)
        )  # Z: 4 formamide, 2 urea
        assert f.info["image_clearance"] == pytest.approx(image_clearance(f.atoms))
        assert f.info["image_clearance"] >= 6.0
        assert np.allclose(f.atoms.cell.array, np.eye(3) * f.atoms.cell[0, 0])  # cubic box
        # labels are the teacher's on that frame (single point reproduces them)
        ref = gas_labels(f.atoms, calc, True, 6.0)
        assert labels[fid].energy == pytest.approx(ref.energy, abs=2e-4)
        np.testing.assert_allclose(labels[fid].forces, ref.forces, atol=2e-3)
    relaxed = gas["pyxtal-test:FORMAM/mol0/relaxed"]
    for f in gas.values():  # converged = below fmax within the step budget, recorded as such
        if f.info["gas_frame"] == "relaxed":
            assert f.info["relax_converged"] == (f.info["relax_fmax"] < TINY.fmax)
            assert f.info["relax_steps"] <= TINY.relax_steps
    assert gas["pyxtal-test:UREAXX02/mol0/relaxed"].info["relax_converged"]
    assert rep.not_converged == sum(
        not f.info["relax_converged"] for f in gas.values() if f.info["gas_frame"] == "relaxed"
    )
    rattled = gas["pyxtal-test:FORMAM/mol0/rattle0"]
    assert 0.02 < np.abs(rattled.atoms.positions - relaxed.atoms.positions).std() < 0.1
    # the relaxed molecule is lower in energy than the molecule cut from the crystal
    assert labels[relaxed.frame_id].energy < labels[rattled.frame_id].energy
    log = read_molecules_log(str(store))
    assert [r["status"] for r in log] == ["ok", "ok"] and all(r["frames"] == 3 for r in log)


def test_rerun_resumes_and_other_recipe_is_refused(built, calc):
    store, _ = built
    n = len(FrameStore(store))
    rep = _build(store, calc)
    assert rep.done_before == 2 and rep.accepted == 0 and len(FrameStore(store)) == n
    with pytest.raises(StoreError, match="n_perturbed: 2 -> 3"):
        _build(store, calc, replace(TINY, n_perturbed=3))


def test_unlabelled_frames_after_a_kill_are_labelled(tmp_path, built, calc):
    import shutil

    store, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    from ase.db import connect

    db = connect(str(copy / "labels" / "chgnet.db"))  # lose one molecule's labels
    db.delete([r.id for r in db.select() if "UREAXX02" in r.frame_id])
    assert len(FrameStore(copy).labels("chgnet").load()) == 3
    rep = _build(copy, calc)
    assert rep.relabelled == 3 and rep.accepted == 0
    assert len(FrameStore(copy).labels("chgnet").load()) == 6


def test_molecule_that_falls_apart_is_rejected_and_counted(tmp_path):
    store = tmp_path / "s"
    build_pyxtal_store(str(store), "test", ["FORMAM"], None, None)
    rep = _build(
        store, EMT(), replace(TINY, relax_steps=150), calculator_name="emt", label_name="emt"
    )
    assert rep.accepted == 0 and rep.rejected == Counter({"molecule changed in relaxation": 1})
    assert [f.source for f in FrameStore(store).iter_frames()] == ["pyxtal_test"]
    assert read_molecules_log(str(store))[0]["cause"] == "molecule changed in relaxation"


def test_reference_crystal_of_each_group():
    box = Atoms("H2", [[0, 0, 0], [0, 0, 0.74]], cell=[5, 5, 5], pbc=True)

    def fr(fid, group, **info):
        return Frame(fid, box, group, "x", None, info)

    frames = [
        fr("a/strain0", "a", parent_id="a", perturbation="strain"),
        fr("a/parent", "a", parent_id="a", perturbation="parent"),
        fr("b", "b"),  # an experimental crystal
        fr("b/mol0/relaxed", "b", phase="gas"),
        fr("c/rattle0", "c", parent_id="c", perturbation="rattle"),
    ]
    skipped: Counter = Counter()
    assert [f.frame_id for f in crystal_frames(frames, skipped)] == ["a/parent", "b"]
    assert skipped == Counter({"group without a reference crystal": 1})


def test_box_clearance_is_checked():
    s = MoleculesSettings()
    assert box_clearance(s, 12.0, 6.0) == (12.0, 12.0 + AUTO_MARGIN)
    assert box_clearance(s, 0.0, 6.0) == (6.0, 6.0 + AUTO_MARGIN)  # teacher without PBC
    assert box_clearance(replace(s, clearance=20.0), 12.0, 6.0) == (12.0, 20.0)
    with pytest.raises(
        SettingsError, match="clearance 10 A is smaller than the interaction range 12"
    ):
        box_clearance(replace(s, clearance=10.0), 12.0, 6.0)
    with pytest.raises(SettingsError, match="range is unknown"):
        box_clearance(s, None, 6.0)
    assert box_clearance(replace(s, clearance=9.0), None, 6.0) == (9.0, 9.0)


def test_isolated_stress_equals_periodic_stress_in_an_isolated_box(calc):
    _, crystal = pyxtal_crystals("test", codes=["UREAXX02"])[0]
    m = distinct_molecules(crystal)[0]
    box = isolate(m.symbols, m.positions, 7.0)
    box.positions += np.random.default_rng(0).normal(scale=0.05, size=box.positions.shape)
    periodic = gas_labels(box, calc, True, 6.0)
    free = gas_labels(box, calc, False)
    assert np.abs(periodic.stress).max() > 1e-4  # rattled: a real virial, not zero
    np.testing.assert_allclose(free.stress, periodic.stress, atol=2e-5)
    assert free.energy == pytest.approx(periodic.energy, abs=2e-4)
    small = isolate(m.symbols, m.positions, 4.0)
    with pytest.raises(KdNnpError, match="below its interaction range 6"):
        gas_labels(small, calc, True, 6.0, "chgnet")


def test_teachers_gas_phase(calc):
    from kd_nnp.teachers.base import Teacher
    from kd_nnp.teachers.calculators import gas_phase, student_clearance

    assert student_clearance() == 6.0
    g = gas_phase("chgnet", calc)
    assert g.periodic and g.clearance == 6.0
    assert not gas_phase("gfn2", None).periodic and not gas_phase("chgnet_d3", None).periodic
    assert gas_phase("pkg.mod:factory", None).clearance is None

    class FakeSO3LR:
        r_max, r_max_lr = 4.5, 12.0

    assert gas_phase("so3lr", FakeSO3LR()).clearance == 12.0
    # labelling a gas frame (phase=gas) checks the box against the teacher's range
    _, crystal = pyxtal_crystals("test", codes=["UREAXX02"])[0]
    m = distinct_molecules(crystal)[0]
    t = Teacher("chgnet", {}, "x", calc, gas=g)
    with pytest.raises(KdNnpError, match="image clearance"):
        t.compute(isolate(m.symbols, m.positions, 4.0), gas=True)
    box = isolate(m.symbols, m.positions, 8.0)
    assert t.compute(box, gas=True).energy == pytest.approx(t.compute(box).energy, abs=1e-6)


def test_molecules_of_a_generated_store_and_generate_resumes_beside_them(tmp_path, calc):
    """Regression: `data generate`'s resume read every frame id of its store as one of its own,
    so molecules added by `data molecules` broke it (and its single-point relabelling would have
    computed them as periodic crystals). Now each verb keeps to its own frames; the crystal of
    a generated group is its final (teacher-relaxed) frame."""
    from kd_nnp.data.sources.generate import GenerateSettings, build_generate_store

    store = tmp_path / "g"
    s = GenerateSettings(
        databases=("test",),
        packings=1,
        space_groups=(14,),
        space_group_weights=(1.0,),
        relax_steps=2,
        keep_every=1,
    )
    kw = dict(calculator=calc, calculator_name="chgnet", molecules=["FORMAM"])
    first = build_generate_store(str(store), s, **kw)
    assert first.accepted == 1
    rep = _build(store, calc)
    frames = {f.frame_id: f for f in FrameStore(store).iter_frames()}
    gas = [f for f in frames.values() if f.info.get("phase") == "gas"]
    assert gas and all(f.info["crystal_frame"].startswith("gen:") for f in gas)
    assert frames[gas[0].info["crystal_frame"]].info["final"]
    again = build_generate_store(str(store), s, **kw)  # crashed before the fix
    assert again.done_before == 1 and again.accepted == 0
    assert rep.frames == len(gas) > 0


def test_demo_molecules_option_adds_labelled_gas_frames(tmp_path):
    """``demo.molecules = N`` in the demo's frames step: each training crystal's molecules with
    N rattled copies, labelled in the label set the demo's labelling step then completes."""
    from omegaconf import OmegaConf

    from kd_nnp.demo import build_store
    from kd_nnp.teachers.label import label_store

    cfg = OmegaConf.create(
        {
            "demo": {
                "teacher": "chgnet",
                "seed": 0,
                "molecules": 1,
                "frames": {
                    "n_strain": 1,
                    "n_rattle": 0,
                    "volume_range": [0.0, 0.0],
                    "shear": 0.0,
                    "rattle_std": 0.0,
                    "prerelax_steps": 0,
                },  # fmt: skip
            }
        }
    )
    crystals = pyxtal_crystals("test", codes=["UREAXX02"])
    store_dir = build_store(cfg, crystals, tmp_path, workers=1)
    fs = FrameStore(store_dir)
    frames = {f.frame_id: f for f in fs.iter_frames()}
    gas = sorted(k for k, f in frames.items() if f.info.get("phase") == "gas")
    assert gas == ["UREAXX02/parent/mol0/rattle0", "UREAXX02/parent/mol0/relaxed"]
    assert {frames[k].group_id for k in gas} == {"UREAXX02"}
    assert set(fs.labels("chgnet").load()) == set(gas)
    rep = label_store(store_dir, "chgnet", check=False, progress=False)
    assert rep.n_done_before == 2 and rep.n_ok == 2  # the crystal frames, the molecules kept
    # `kd-nnp label` with another set computes gas frames as the teacher does (gas=True)
    label_store(store_dir, "chgnet", name="again", check=False, progress=False)
    first, second = fs.labels("chgnet").load(), fs.labels("again").load()
    for k in gas:
        assert second[k].energy == pytest.approx(first[k].energy, abs=2e-4)
    again = build_store(cfg, crystals, tmp_path, workers=1)  # rerun: nothing new
    assert again == store_dir and len(FrameStore(store_dir)) == 4


def _benzene(clearance: float) -> Atoms:
    _, crystal = pyxtal_crystals("test", codes=["BENZEN"])[0]
    m = distinct_molecules(crystal)[0]
    return isolate(m.symbols, m.positions, clearance)


@requires_teacher("so3lr")
def test_so3lr_in_a_box_beyond_its_long_range_cutoff_is_isolated():
    from kd_nnp.teachers.calculators import build_teacher_calculator, gas_phase

    calc = build_teacher_calculator("so3lr")
    g = gas_phase("so3lr", calc)
    assert g.periodic and g.clearance == 12.0
    box = _benzene(12.0)
    e_box = gas_labels(box, calc, True, g.clearance).energy
    assert e_box == pytest.approx(gas_labels(box, calc, False).energy, abs=1e-3)
    # closer images interact (the table in docs/data.md: -16.5 meV at 6 A)
    assert abs(gas_labels(_benzene(6.0), calc, True).energy - e_box) > 5e-3


@requires_teacher("gfn2")
def test_gfn2_gas_frames_are_computed_without_pbc():
    from kd_nnp.teachers.calculators import build_teacher_calculator, gas_phase

    calc = build_teacher_calculator("gfn2")
    assert not gas_phase("gfn2", calc).periodic
    free = gas_labels(_benzene(8.0), calc, False)
    big = gas_labels(_benzene(30.0), calc, True)  # Ewald images of a 30 A box: ~0.06 meV
    assert free.energy == pytest.approx(big.energy, abs=3e-4)
    assert abs(gas_labels(_benzene(6.0), calc, True).energy - free.energy) > 1e-3


@pytest.mark.slow
def test_cli_with_workers_killed_by_sigkill_resumes(built, tmp_path):
    """`kd-nnp data molecules --workers 2`, kill -9 after the first molecule, rerun: every
    molecule written once, labelled, logged; the same frames as the in-process run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from kd_nnp.utils.paths import REPO_ROOT

    ref_store, _ = built
    path = tmp_path / "s"
    build_pyxtal_store(str(path), "test", ["FORMAM", "UREAXX02", "OXALAC11"], None, None)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "kd_nnp.cli", "data", "molecules", "--from", str(path),
           "--teacher", "chgnet", "--relax-steps", "40", "--fmax", "0.05", "--n-perturbed", "2",
           "--rattle-std", "0.05", "--workers", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 400
    while time.time() < deadline and not read_molecules_log(str(path)):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1 <= len(read_molecules_log(str(path))) < 3
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert "3 crystals, 3 molecules" in summary and "done before" in summary, summary
    log = read_molecules_log(str(path))
    assert sorted(r["crystal_frame"] for r in log) == sorted(
        f"pyxtal-test:{c}" for c in ("FORMAM", "UREAXX02", "OXALAC11")
    )
    fs = FrameStore(path)
    gas = {f.frame_id: f for f in fs.iter_frames() if f.info.get("phase") == "gas"}
    assert len(gas) == 9 and set(fs.labels("chgnet").load()) == set(gas)
    ref = {f.frame_id: f for f in FrameStore(ref_store).iter_frames()}
    for fid in ("pyxtal-test:FORMAM/mol0/relaxed", "pyxtal-test:UREAXX02/mol0/rattle1"):
        np.testing.assert_allclose(gas[fid].atoms.positions, ref[fid].atoms.positions, atol=1e-3)


def test_salt_with_monatomic_ions_is_skipped_and_counted(tmp_path):
    """XAFQON (a hydrochloride hydrate) gave a one-atom Cl 'molecule' whose gas frames stopped
    the demo's training (CHGNet has no graph for a lone atom); such salts are now skipped,
    counted, and nothing is computed for them (EMT would break any molecule it relaxed)."""
    store = tmp_path / "s"
    build_pyxtal_store(str(store), "test", ["XAFQON"], None, None)
    rep = _build(store, EMT(), calculator_name="emt", label_name="emt")
    assert rep.skipped == Counter({"salt with monatomic ions": 1})
    assert rep.accepted == 0 and not rep.rejected
    assert [f.source for f in FrameStore(store).iter_frames()] == ["pyxtal_test"]


def test_lone_atom_frame_is_refused_by_name_when_graphed(tmp_path):
    from kd_nnp.training.cache.graphs import GraphCache

    lone = Atoms("Cl", [[5, 5, 5]], cell=[30, 30, 30], pbc=True)
    with pytest.raises(KdNnpError, match=r"frame 'X/parent/mol2/relaxed' \(Cl1, 1 atoms\): CHGNet "
                       "cannot build its graph: .*isolated atom"):  # fmt: skip
        GraphCache(tmp_path / "g").get(lone, graph_id="X/parent/mol2/relaxed")
