"""`kd-nnp data generate`: random packings of pyxtal's molecules relaxed by a teacher.

Tiny settings (2 molecules, 2 space groups, a few relaxation steps) with pretrained CHGNet as
the cheap teacher (it keeps molecules whole, unlike EMT, which strips H off C).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kd_nnp.data.molecules import graph_key, molecules_of_crystal
from kd_nnp.data.sources import generate as gen
from kd_nnp.data.sources.generate import (
    GenerateSettings,
    build_generate_store,
    pyxtal_molecules,
    read_generate_log,
)
from kd_nnp.data.store import FrameStore, StoreError
from kd_nnp.errors import SettingsError
from kd_nnp.utils.paths import REPO_ROOT

MOLS = ["FORMAM", "UREAXX02"]
TINY = GenerateSettings(
    databases=("test",),
    packings=2,
    space_groups=(14, 2),
    space_group_weights=(1.0, 1.0),
    relax_steps=6,
    keep_every=3,
    seed=0,
)


@pytest.fixture(scope="module")
def calc():
    from kd_nnp.teachers.calculators import make_chgnet

    return make_chgnet()


@pytest.fixture(scope="module")
def built(tmp_path_factory, calc):
    out = tmp_path_factory.mktemp("gen") / "store"
    rep = build_generate_store(
        str(out), TINY, calculator=calc, calculator_name="chgnet", molecules=MOLS
    )
    return out, rep


def _frames(path):
    return {f.frame_id: f for f in FrameStore(path).iter_frames()}


def test_molecules_are_distinct_whole_and_counted():
    skipped: Counter = Counter()
    mols = pyxtal_molecules(replace(TINY, databases=("test", "mech")), skipped)
    ids = [m.mol_id for m in mols]
    assert len(ids) == len(set(ids)) > 50
    sources = {m.source: m for m in mols}
    assert {"FORMAM", "UREAXX02"} <= set(sources)
    assert sources["FORMAM"].mol_id.startswith("CH3NO-")
    assert sources["UREAXX02"].mol_id.startswith("CH4N2O-")
    # the same molecule from several crystals (polymorphs, repeated entries) is kept once
    assert skipped["molecule already taken"] > 0 and skipped["several kinds of molecule"] > 0
    for m in mols[:10]:  # one connected molecule, its id reproduced from its geometry
        assert graph_key(m.symbols, m.positions) == m.mol_id
        assert len(m.symbols) <= TINY.max_molecule_atoms


def test_collection_molecules_join_the_crystals_once():
    skipped: Counter = Counter()
    mols = pyxtal_molecules(replace(TINY, databases=("test", "collection")), skipped)
    by_source = {m.source: m for m in mols}
    assert "collection:Glucose" in by_source and "collection:tetracene" in by_source
    # water has no carbon; aspirin and benzene are already molecules of test.db
    assert "collection:H2O" not in by_source and skipped["not organic"] >= 1
    assert "collection:aspirin" not in by_source and "collection:benzene" not in by_source
    assert by_source["collection:Glucose"].mol_id.startswith("C6H12O6-")


def test_smiles_csv_needs_a_smiles_column_and_rdkit(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,smi\nurea,NC(N)=O\n")
    with pytest.raises(SettingsError, match="'smiles' column"):
        gen.smiles_molecules(str(bad))
    with pytest.raises(SettingsError, match="no such file"):
        gen.smiles_molecules(str(tmp_path / "none.csv"))
    good = tmp_path / "good.csv"
    good.write_text("name,smiles\nurea,NC(N)=O\nacetic,CC(=O)O\n")
    import importlib.util

    if importlib.util.find_spec("rdkit") is None:
        with pytest.raises(SettingsError, match="pip install rdkit"):
            gen.smiles_molecules(str(good))
        return
    mols = gen.smiles_molecules(str(good))
    assert [m.mol_id.split("-")[0] for m in mols] == ["CH4N2O", "C2H4O2"]
    assert [m.source for m in mols] == ["urea", "acetic"]


def test_generated_store_frames_labels_groups(built, calc):
    out, rep = built
    assert rep.n_molecules == 2 and rep.accepted + sum(rep.rejected.values()) == 4
    assert rep.accepted >= 3, rep.summary()
    frames = _frames(out)
    assert len(frames) == rep.frames > 0
    fs = FrameStore(out)
    assert fs.label_names() == ["chgnet"]
    ls = fs.labels("chgnet")
    labels = ls.load()
    assert set(labels) == set(frames)
    mol_ids = {m.mol_id for m in pyxtal_molecules(TINY) if m.source in MOLS}
    assert {f.group_id for f in frames.values()} <= mol_ids
    finals = Counter()
    for fid, f in frames.items():
        assert f.source == "generate" and f.hard is None
        assert fid.startswith(f"gen:{f.group_id}/p{f.info['packing']}/s{f.info['step']}")
        assert f.info["spg_num"] in (14, 2) and f.info["molecule_source"] in MOLS
        assert f.info["mol_keys"] == f.group_id  # the training leakage guard reads it
        # whole molecules, Z of them, all the group's molecule
        assert Counter(k for k, _, _ in molecules_of_crystal(f.atoms)) == Counter(
            {f.group_id: f.info["Z"]}
        )
        lab = labels[fid]
        assert lab.forces.shape == (len(f.atoms), 3) and lab.stress.shape == (6,)
        assert np.isfinite(lab.energy)
        finals[(f.group_id, f.info["packing"])] += bool(f.info["final"])
        if f.info["final"]:
            assert f.info["step"] == f.info["n_steps"] <= TINY.relax_steps
            assert f.info["residual_stress_gpa"] == pytest.approx(
                np.abs(lab.stress).max() * 160.21766208
            )
        else:
            assert f.info["step"] % TINY.keep_every == 0
    assert set(finals.values()) == {1} and len(finals) == rep.accepted
    # pyxtal's loose packings were shrunk (molecule-rigidly, still whole: checked above)
    rho = [(f.info["density_pyxtal"], f.info["density0"]) for f in frames.values()]
    assert all(d0 >= dp - 1e-9 and d0 <= TINY.start_density + 1e-9 for dp, d0 in rho)
    assert any(d0 > dp + 0.05 for dp, d0 in rho)
    # the labels are the calculator's results at exactly the stored geometry
    fid = sorted(frames)[1]
    a = frames[fid].atoms.copy()
    a.calc = calc
    assert a.get_potential_energy() == pytest.approx(labels[fid].energy, abs=1e-4)
    np.testing.assert_allclose(a.get_forces(), labels[fid].forces, atol=1e-4)
    np.testing.assert_allclose(a.get_stress(), labels[fid].stress, atol=1e-5)
    # provenance says which calculator labelled them; the recipe is stored
    assert ls.provenance["name"] == "chgnet" and ls.provenance["source"] == "generate"
    recipe = json.loads((out / "generate.json").read_text())
    assert recipe["settings"]["seed"] == 0 and recipe["calculator"] == "chgnet"
    recs = read_generate_log(str(out))
    assert len(recs) == 4 and all(r["status"] in ("ok", "rejected") for r in recs)
    assert sum(r.get("frames", 0) for r in recs) == len(frames)


def test_same_seed_same_crystals_other_seed_others(built, calc, tmp_path):
    out, _ = built
    s = replace(TINY, relax_steps=0, packings=1)
    a = build_generate_store(
        str(tmp_path / "a"), s, calculator=calc, calculator_name="chgnet", molecules=MOLS
    )
    b = build_generate_store(
        str(tmp_path / "b"),
        replace(s, seed=1),
        calculator=calc,
        calculator_name="chgnet",
        molecules=MOLS,
    )
    assert a.accepted == b.accepted == 2
    fa, fb, ref = _frames(tmp_path / "a"), _frames(tmp_path / "b"), _frames(out)
    for fid, f in fa.items():  # step 0 of packing 0: the same crystal as in the full run
        np.testing.assert_allclose(f.atoms.positions, ref[fid].atoms.positions, atol=1e-8)
        np.testing.assert_allclose(f.atoms.cell.array, ref[fid].atoms.cell.array, atol=1e-8)
    assert any(
        fid not in fb or not np.allclose(f.atoms.cell.array, fb[fid].atoms.cell.array)
        for fid, f in fa.items()
    )


def test_shards_merged_give_the_unsharded_store(calc, tmp_path):
    from kd_nnp.data.sources.merge import merge_stores

    s = replace(TINY, relax_steps=0, packings=1)
    kw = dict(calculator=calc, calculator_name="chgnet", molecules=MOLS)
    whole = build_generate_store(str(tmp_path / "whole"), s, **kw)
    parts = [build_generate_store(str(tmp_path / f"s{k}"), s, shard=(k, 2), **kw) for k in (0, 1)]
    assert [p.n_molecules for p in parts] == [1, 1] and whole.n_molecules == 2
    rep = merge_stores(tmp_path / "merged", [tmp_path / "s0", tmp_path / "s1"])
    ref, got = _frames(tmp_path / "whole"), _frames(tmp_path / "merged")
    assert sorted(got) == sorted(ref) and rep.frames_written == len(ref)
    for fid, f in ref.items():
        np.testing.assert_allclose(got[fid].atoms.positions, f.atoms.positions, atol=1e-10)
        assert got[fid].group_id == f.group_id
    labels = FrameStore(tmp_path / "merged").labels("chgnet").load()
    want = FrameStore(tmp_path / "whole").labels("chgnet").load()
    assert {k: v.energy for k, v in labels.items()} == {k: v.energy for k, v in want.items()}
    with pytest.raises(SettingsError, match="shard must be K/N"):
        build_generate_store(str(tmp_path / "bad"), s, shard=(2, 2), **kw)


def test_generated_label_set_is_named_as_kd_nnp_label_names_it(calc, tmp_path):
    """Regression: generate named a `pkg.mod:factory` teacher's label set `pkg.mod_factory`,
    `kd-nnp label` and training look for `pkg_mod_factory`: one label_set_name for both now."""
    from kd_nnp.data.store import label_set_name
    from kd_nnp.teachers.label import resolve_label_set

    s = replace(TINY, relax_steps=0, packings=1)
    spec = "my_pkg.calcs:teacher"
    build_generate_store(
        str(tmp_path / "g"), s, calculator=calc, calculator_name=spec, molecules=MOLS[:1]
    )
    store = FrameStore(tmp_path / "g")
    assert store.label_names() == [label_set_name(spec)] == ["my_pkg_calcs_teacher"]
    assert resolve_label_set(store, spec) == "my_pkg_calcs_teacher"


def test_resume_continues_and_a_rerun_adds_nothing(built, calc, tmp_path):
    out, full = built
    path = tmp_path / "part"
    kw = dict(calculator=calc, calculator_name="chgnet", molecules=MOLS)
    first = build_generate_store(str(path), TINY, limit=1, **kw)
    assert first.n_molecules == 1
    n_first = len(FrameStore(path))
    # a kill in the middle of writing the log leaves a cut line: ignored
    with open(path / "generate.jsonl", "a") as fh:
        fh.write('{"molecule": "CH4N2O-x", "pack')
    rest = build_generate_store(str(path), TINY, **kw)
    assert rest.done_before == 2 and rest.accepted + sum(rest.rejected.values()) == 2
    ref = _frames(out)
    got = _frames(path)
    assert set(got) == set(ref) and len(got) > n_first
    for fid in ref:
        np.testing.assert_allclose(got[fid].atoms.positions, ref[fid].atoms.positions, atol=1e-6)
    again = build_generate_store(str(path), TINY, **kw)
    assert again.done_before == 4 and again.accepted == 0 and again.frames == 0
    assert len(FrameStore(path)) == len(ref)
    assert len(read_generate_log(str(path))) == 4


def test_frames_without_labels_are_labelled_at_the_next_start(built, calc, tmp_path):
    out, _ = built
    import shutil

    path = tmp_path / "copy"
    shutil.copytree(out, path)
    (path / "labels" / "chgnet.db").unlink()  # as if killed between the two transactions
    rep = build_generate_store(
        str(path), TINY, calculator=calc, calculator_name="chgnet", molecules=MOLS
    )
    assert rep.relabelled == len(FrameStore(path)) and rep.accepted == 0
    ref = FrameStore(out).labels("chgnet").load()
    got = FrameStore(path).labels("chgnet").load()
    assert set(got) == set(ref)
    for fid in ref:
        assert got[fid].energy == pytest.approx(ref[fid].energy, abs=1e-4)


def test_workers_give_the_same_store(built, calc, tmp_path):
    import functools

    from kd_nnp.teachers.calculators import make_chgnet

    out, _ = built
    path = tmp_path / "w2"
    kw = dict(calculator_name="chgnet", molecules=["FORMAM"], progress=False)
    with pytest.raises(SettingsError, match="builder"):
        build_generate_store(str(path), TINY, calculator=calc, workers=2, **kw)
    rep = build_generate_store(
        str(path), TINY, calculator=functools.partial(make_chgnet), workers=2, **kw
    )
    ref = {i: f for i, f in _frames(out).items() if f.info["molecule_source"] == "FORMAM"}
    got = _frames(path)
    assert rep.accepted >= 1 and set(got) == set(ref)
    lab_ref = FrameStore(out).labels("chgnet").load(list(ref))
    lab_got = FrameStore(path).labels("chgnet").load()
    for fid in ref:
        np.testing.assert_allclose(got[fid].atoms.positions, ref[fid].atoms.positions, atol=1e-5)
        assert lab_got[fid].energy == pytest.approx(lab_ref[fid].energy, abs=1e-4)


def test_other_settings_refused(built, calc, tmp_path):
    out, _ = built
    with pytest.raises(StoreError, match=r"seed: 0 -> 1"):
        build_generate_store(
            str(out),
            replace(TINY, seed=1),
            calculator=calc,
            calculator_name="chgnet",
            molecules=MOLS,
        )
    with pytest.raises(StoreError, match="calculator: 'chgnet' -> 'other'"):
        build_generate_store(
            str(out), TINY, calculator=calc, calculator_name="other", molecules=MOLS
        )
    # a store made before `cell_factor` existed was relaxed with exp_cell_factor 1: the new
    # default is another recipe, --cell-factor 1 resumes it (nothing left to do here)
    old = tmp_path / "old"
    shutil.copytree(out, old)
    recipe = json.loads((old / "generate.json").read_text())
    del recipe["settings"]["cell_factor"]  # (its frames were made with 0.0: only the record counts)
    (old / "generate.json").write_text(json.dumps(recipe))
    with pytest.raises(StoreError, match=r"cell_factor: 1.0 -> 0.0"):
        build_generate_store(
            str(old), TINY, calculator=calc, calculator_name="chgnet", molecules=MOLS
        )
    rep = build_generate_store(str(old), replace(TINY, cell_factor=1.0), calculator=calc,
                               calculator_name="chgnet", molecules=MOLS)  # fmt: skip
    assert rep.accepted == 0 and len(FrameStore(old)) == len(FrameStore(out))


def test_rejections_are_counted_by_cause(calc, tmp_path, monkeypatch):
    dense = replace(TINY, density_range=(3.0, 4.0), packings=1)
    rep = build_generate_store(
        str(tmp_path / "d"), dense, calculator=calc, calculator_name="chgnet", molecules=MOLS
    )
    assert rep.accepted == 0 and rep.rejected == Counter({"density": 2})
    assert len(FrameStore(tmp_path / "d")) == 0
    recs = read_generate_log(str(tmp_path / "d"))
    assert [r["cause"] for r in recs] == ["density", "density"]
    assert all(r["spg_num"] in (14, 2) for r in recs)
    # a relaxed cell outside the sane range is dropped with its whole trajectory
    loose = replace(TINY, relaxed_density_range=(3.0, 4.0), packings=1, relax_steps=1)
    rep = build_generate_store(
        str(tmp_path / "r"), loose, calculator=calc, calculator_name="chgnet", molecules=MOLS
    )
    assert rep.rejected == Counter({"density after relaxation": 2})
    assert len(FrameStore(tmp_path / "r")) == 0
    # a packing equal to an earlier one of the molecule is dropped (StructureMatcher)
    real = gen.make_packing

    def same_crystal(mol, k, settings, info=None):
        return real(mol, 0, settings, info)

    monkeypatch.setattr(gen, "make_packing", same_crystal)
    rep = build_generate_store(
        str(tmp_path / "dup"),
        replace(TINY, relax_steps=1),
        calculator=calc,
        calculator_name="chgnet",
        molecules=["FORMAM"],
    )
    assert rep.accepted == 1 and rep.rejected == Counter({"duplicate": 1})


def test_compress_keeps_molecules_whole_and_stops_at_the_target():
    s = replace(TINY, start_density=0.0)
    mol = next(m for m in pyxtal_molecules(TINY) if m.source == "UREAXX02")
    atoms, info = gen.make_packing(mol, 0, s)
    assert info["density0"] == info["density_pyxtal"]
    dense = gen.compress(atoms, mol, info["Z"], 1.3)
    assert info["density_pyxtal"] < gen.density(dense) <= 1.3 + 1e-9
    assert Counter(k for k, _, _ in molecules_of_crystal(dense)) == Counter({mol.mol_id: info["Z"]})
    # the molecules moved rigidly: their internal geometry is unchanged
    d0 = sorted(
        np.round(np.linalg.norm(np.diff(m[2], axis=0), axis=1), 6).tolist()
        for m in molecules_of_crystal(atoms)
    )
    d1 = sorted(
        np.round(np.linalg.norm(np.diff(m[2], axis=0), axis=1), 6).tolist()
        for m in molecules_of_crystal(dense)
    )
    assert d0 == d1


def test_settings_are_checked():
    with pytest.raises(SettingsError, match="same length"):
        replace(TINY, space_group_weights=(1.0,)).check()
    with pytest.raises(SettingsError, match="231"):
        replace(TINY, space_groups=(14, 231)).check()
    with pytest.raises(SettingsError, match="optimizer"):
        replace(TINY, optimizer="BFGS").check()
    with pytest.raises(StoreError, match="NOSUCH"):
        build_generate_store(
            "/nonexistent/x", TINY, calculator=object(), calculator_name="x", molecules=["NOSUCH"]
        )


def _cli_args(out: Path, *extra: str) -> list[str]:
    return [
        "data",
        "generate",
        "--out",
        str(out),
        "--teacher",
        "chgnet",
        "--databases",
        "test",
        "--molecules",
        *MOLS,
        "--packings",
        "2",
        "--space-groups",
        "14,2",
        "--space-group-weights",
        "1,1",
        "--relax-steps",
        "6",
        "--keep-every",
        "3",
        *extra,
    ]


def test_cli_generates_and_refuses_bad_settings(built, tmp_path, capsys):
    from kd_nnp.cli import main

    out, _ = built
    assert main(_cli_args(tmp_path / "cli", "--limit", "1")) == 0
    printed = capsys.readouterr().out
    assert "generate: 1 molecules" in printed and "crystals/h" in printed
    ref = _frames(out)
    got = _frames(tmp_path / "cli")
    assert got and set(got) <= set(ref)
    assert FrameStore(tmp_path / "cli").label_names() == ["chgnet"]
    rc = main(_cli_args(tmp_path / "bad", "--space-group-weights", "1"))
    assert rc != 0
    err = capsys.readouterr().err
    assert "same length" in err and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_cli_killed_by_sigkill_resumes(built, tmp_path):
    """kill -9 in the middle of a run: the rerun finishes it with the same frames."""
    out, _ = built
    path = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "kd_nnp.cli", *_cli_args(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (path / "generate.jsonl").is_file() and read_generate_log(str(path)):
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(read_generate_log(str(path)))
    assert 1 <= done < 4
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert set(_frames(path)) == set(_frames(out))
    assert len(read_generate_log(str(path))) == 4
    assert set(FrameStore(path).labels("chgnet").load()) == set(_frames(out))


def test_relaxation_does_not_blow_the_cell_up(calc):
    """Regression (issue 15): with ``exp_cell_factor=1`` FIRE strained the cell by up to its
    0.2 maxstep per step, so a compressed packing expanded by 20-40 % within 10 steps
    (so3lr: benzene 1.20 -> 0.94 g/cm^3) and the corpus sampled loose crystals."""
    mol = next(m for m in pyxtal_molecules(TINY) if m.source == "UREAXX02")
    atoms, info = gen.make_packing(mol, 0, TINY)
    s = replace(TINY, relax_steps=10, keep_every=1)
    rho = [gen.density(a) for _, a, _ in gen.relax_trajectory(atoms, calc, s)]
    assert rho[0] == pytest.approx(info["density0"])
    assert min(rho) > 0.9 * rho[0], rho
    with pytest.raises(SettingsError, match="cell_factor"):
        replace(TINY, cell_factor=-1.0).check()
