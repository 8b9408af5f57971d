"""Lattice energies (kd_nnp.evaluation.lattice, `kd-nnp evaluate lattice`): the arithmetic with
known answers, the isolation rules, failures as errors, the runner's resume, real vdW-DF2 X23
crystal and gas frames, and a small real run with pretrained CHGNet."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.neighborlist import neighbor_list
from conftest import assert_md_tables_well_formed, requires_shared_data, requires_teacher

from kd_nnp.data.molecules import distinct_molecules, image_clearance, molecule_labels
from kd_nnp.errors import KdNnpError
from kd_nnp.evaluation.lattice import (
    EV_TO_KJ_MOL,
    check_clearance,
    combine,
    gas_box,
    gas_failure,
    lattice_energy,
    per_crystal_table,
    run_lattice_benchmark,
    summarize_lattice,
)
from kd_nnp.evaluation.settings import LatticeSettings, RelaxSettings
from kd_nnp.evaluation.structures import Crystal, load_dataset
from kd_nnp.teachers.calculators import calculator_cutoff, gas_phase
from kd_nnp.utils.jsonl import read_jsonl

EPS = 0.5  # eV: the toy model's binding energy per molecule
E_ATOM = {1: -1.0, 6: -7.0, 7: -8.0, 8: -9.0}  # eV: its per-element energies
CODES = ["UREAXX02", "OXALAC11"]  # 16 and 16 atoms: the smallest crystals of test.db


class BoundMoleculesCalc(Calculator):
    """Known-answer model: E = sum_i E_ATOM[Z_i] - EPS x (molecules with an atom of another
    molecule, or of a periodic image of itself, within R). Piecewise constant: forces and
    stress are zero, every relaxation stops at once, and E_latt = -EPS eV = -48.24 kJ/mol for
    any molecular crystal whose molecules touch (a multi-component one too). ``dissociate``:
    in the gas phase atoms 0 and 1 repel each other (the molecule falls apart). ``eps``: another
    binding energy (E_latt = -eps eV)."""

    implemented_properties = ("energy", "free_energy", "forces", "stress")
    R = 4.0

    def __init__(self, dissociate: bool = False, eps: float = EPS) -> None:
        super().__init__()
        self.dissociate = dissociate
        self.eps = eps
        self.r_max = self.R

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        labels, _ = molecule_labels(a)
        i, j, s = neighbor_list("ijS", a, self.R)
        touching = (labels[i] != labels[j]) | np.any(s != 0, axis=1)
        bound = set(labels[i[touching]].tolist())
        e = sum(E_ATOM[int(z)] for z in a.numbers) - self.eps * len(bound)
        f = np.zeros((len(a), 3))
        if self.dissociate and not bound:  # exp(-r/1 A) repulsion of atoms 0 and 1
            d = a.positions[0] - a.positions[1]
            r = float(np.linalg.norm(d))
            e += 50.0 * np.exp(-r)
            f[0] = 50.0 * np.exp(-r) * d / r
            f[1] = -f[0]
        self.results = {"energy": e, "free_energy": e, "forces": f, "stress": np.zeros(6)}


def bound_calc() -> Calculator:
    return BoundMoleculesCalc()


def dissociating_calc() -> Calculator:
    return BoundMoleculesCalc(dissociate=True)


NO_RMSD = RelaxSettings(rmsd=False)


# ------------------------------------------------------------------ the arithmetic
def test_lattice_energy_arithmetic_known_answers():
    assert EV_TO_KJ_MOL == pytest.approx(96.485332, abs=1e-5)
    urea = load_dataset("pyxtal:test", codes=["UREAXX02"])[0].atoms
    (kind,) = distinct_molecules(urea)
    assert kind.count == 2 and len(kind.symbols) == 8
    # E_crystal/Z - E_gas: -20.0/2 - (-9.0) = -1 eV = -96.485 kJ/mol
    assert lattice_energy(-20.0, urea, {kind.key: -9.0}) == pytest.approx(-96.485332, abs=1e-5)
    # a two-component cell: 2 waters + 1 ammonia far apart
    water = [("O", (0, 0, 0)), ("H", (0.96, 0, 0)), ("H", (-0.24, 0.93, 0))]
    nh3 = [
        ("N", (0, 0, 0)),
        ("H", (1.01, 0, 0)),
        ("H", (-0.34, 0.95, 0)),
        ("H", (-0.34, -0.5, 0.8)),
    ]
    syms, pos = [], []
    for mol, shift in ((water, (1, 1, 1)), (water, (6, 1, 1)), (nh3, (1, 6, 6))):
        for s, p in mol:
            syms.append(s)
            pos.append(np.add(p, shift))
    cell = Atoms(syms, pos, cell=[11.0] * 3, pbc=True)
    kinds = {k.symbols.count("N"): k for k in distinct_molecules(cell)}
    assert kinds[0].count == 2 and kinds[1].count == 1
    e_gas = {kinds[0].key: -14.0, kinds[1].key: -19.5}
    # (E - 2 E_water - E_nh3) / 3 molecules: (-48.5 - (-28 - 19.5)) / 3 = -1/3 eV
    assert lattice_energy(-48.5, cell, e_gas) == pytest.approx(-EV_TO_KJ_MOL / 3)
    assert lattice_energy(-48.5, distinct_molecules(cell), e_gas) == pytest.approx(
        -EV_TO_KJ_MOL / 3
    )
    with pytest.raises(KeyError, match="no gas-phase energy"):
        lattice_energy(-48.5, cell, {kinds[0].key: -14.0})


def test_gas_box_keeps_its_clearance_in_any_orientation():
    urea = load_dataset("pyxtal:test", codes=["UREAXX02"])[0].atoms
    (kind,) = distinct_molecules(urea)
    box = gas_box(kind.symbols, kind.positions, 8.0)
    assert image_clearance(box) >= 8.0
    rng = np.random.default_rng(0)
    for _ in range(5):  # a relaxation may turn the molecule: the clearance holds
        turned = box.copy()
        turned.rotate(rng.uniform(0, 360), rng.normal(size=3), center="COM")
        assert image_clearance(turned) >= 8.0 - 1e-9


def test_lattice_options_are_generated_from_the_settings():
    from kd_nnp.cli.evaluate import parser

    args = parser().parse_args(["lattice", "--calc", "chgnet", "--out", "o"])
    assert args.clearance == LatticeSettings().clearance == 30.0 and args.reference is None
    assert args.workers == 2 and args.fmax == RelaxSettings().fmax and args.relax_dir is None
    assert not hasattr(args, "references")  # test.db's reference cells hold no energies
    args = parser().parse_args(
        ["lattice", "--calc", "chgnet", "--out", "o", "--clearance", "12", "--codes", "A,B",
         "--reference", "CHGNet", "--max-steps", "50"]
    )  # fmt: skip
    assert (args.clearance, args.codes, args.reference, args.max_steps) == (
        12.0, ("A", "B"), "CHGNet", 50,
    )  # fmt: skip
    with pytest.raises(KdNnpError, match="reference 'nope' is none of the methods"):
        run_lattice_benchmark(
            "pyxtal:test", {"toy": "test_eval_lattice:bound_calc"}, "unused",
            settings=LatticeSettings(reference="nope"), codes=CODES[:1], progress=False,
        )  # fmt: skip


def test_clearance_below_a_cutoff_is_refused():
    calcs = {"toy": "test_eval_lattice:bound_calc"}
    assert calculator_cutoff(BoundMoleculesCalc()) == (4.0, "r_max")
    # one reading of a calculator's range: a module:factory teacher's gas phase gets it too
    # (gas_phase had its own per-name table and gave any module:factory an unknown range)
    g = gas_phase("test_eval_lattice:bound_calc", BoundMoleculesCalc())
    assert g.periodic and g.clearance == 4.0
    cutoffs = check_clearance(6.0, calcs)  # pretrained CHGNet's atom graph: 6 A, from the model
    assert cutoffs == {"toy": 4.0, "CHGNet (pretrained)": 6.0}
    with pytest.raises(
        KdNnpError, match=r"below the atom-graph cutoff of 'CHGNet \(pretrained\)' \(6\.0"
    ):
        check_clearance(5.0, calcs)
    with pytest.raises(KdNnpError, match="clearance"):
        run_lattice_benchmark(
            "pyxtal:test", calcs, "unused", NO_RMSD, LatticeSettings(clearance=3.0),
            codes=CODES[:1], progress=False,
        )  # fmt: skip


# ------------------------------------------------------------------ the benchmark, known answer
def test_benchmark_known_answer_resume_and_report(tmp_path):
    out = tmp_path / "lat"
    calcs = {"toy": "test_eval_lattice:bound_calc", "toy2": "test_eval_lattice:bound_calc"}
    kw = dict(codes=CODES, workers=1, progress=False)
    df = run_lattice_benchmark("pyxtal:test", calcs, out, NO_RMSD, **kw)
    assert len(df) == 4 and (df["status"] == "ok").all(), df.get("error")
    np.testing.assert_allclose(df["e_latt_kj_mol"], -EPS * units.mol / units.kJ, rtol=1e-12)
    assert set(df["z"]) == {2} and (df["crystal_steps"] == 0).all() and (df["gas_steps"] == 0).all()
    assert (df["gas_one_molecule"]).all() and (df["clearance"] == 30.0).all()
    rec = json.loads((out / "lattice.jsonl").read_text().splitlines()[0])
    assert rec["crystal_energy_per_atom"] == pytest.approx(rec["crystal_energy"] / rec["natoms"])
    assert rec["gas"][0]["image_clearance_final"] >= 30.0
    assert rec["gas"][0]["isolation_cutoff"] == 6.0  # pretrained CHGNet's, the largest here
    # the table: one column per method, spread 0, MAE 0 against the reference
    wide = pd.read_csv(out / "table.csv", index_col="crystal")
    assert list(wide.columns) == ["toy", "toy2", "spread"] and set(wide.index) == set(CODES)
    np.testing.assert_allclose(wide["spread"], 0.0, atol=1e-9)
    summ = summarize_lattice(df, "toy").set_index("method")
    assert summ.loc["toy2", "mae"] == pytest.approx(0.0) and summ.loc["toy2", "n_paired"] == 2
    text = (out / "table.md").read_text()
    assert "-48.2" in text and assert_md_tables_well_formed(text) >= 3
    # resume: nothing is recomputed
    sizes = {f: len(read_jsonl(f)) for f in (out / "gas.jsonl", out / "relax" / "relax.jsonl")}
    assert sizes[out / "gas.jsonl"] == 4 and sizes[out / "relax" / "relax.jsonl"] == 4
    df2 = run_lattice_benchmark("pyxtal:test", calcs, out, NO_RMSD, **kw)
    assert {f: len(read_jsonl(f)) for f in sizes} == sizes
    assert df2["e_latt_kj_mol"].tolist() == df["e_latt_kj_mol"].tolist()
    # another clearance is another gas-phase protocol: the gas side is recomputed
    run_lattice_benchmark("pyxtal:test", calcs, out, NO_RMSD, LatticeSettings(clearance=12), **kw)
    assert len(read_jsonl(out / "gas.jsonl")) == 8
    # report-only with the first clearance reads its own gas records, not the latest ones
    df3 = run_lattice_benchmark("pyxtal:test", calcs, out, NO_RMSD, run=False, **kw)
    assert (df3["status"] == "ok").all() and (df3["clearance"] == 30.0).all()
    assert all(g["box_edge"] > 30.0 + 3.0 for gs in df3["gas"] for g in gs)


def test_failures_are_errors_with_a_reason(tmp_path):
    """A molecule that falls apart in the gas phase, a crystal relaxation that failed: status
    error and the reason, never a number."""
    calcs = {"split": "test_eval_lattice:dissociating_calc"}
    df = run_lattice_benchmark(
        "pyxtal:test", calcs, tmp_path / "x", RelaxSettings(rmsd=False, max_steps=15),
        codes=CODES[:1], progress=False,
    )  # fmt: skip
    (rec,) = df.to_dict("records")
    assert rec["status"] == "error" and "molecule fell apart" in rec["error"]
    assert "e_latt_kj_mol" not in rec or not np.isfinite(rec["e_latt_kj_mol"])
    assert rec["gas_one_molecule"] is False
    # crystal failures come from the relaxation benchmark's verdict
    atoms = load_dataset("pyxtal:test", codes=CODES[:1])[0].atoms
    kinds = {CODES[0]: distinct_molecules(atoms)}
    gas = {("m", f"{CODES[0]}#0"): {"status": "ok", "energy": -1.0, "converged": True,
                                   "one_molecule": True, "same_bond_graph": True}}  # fmt: skip
    for relax_rec, reason in [
        ({"status": "ok", "energy": -2.0, "failure": "molecule broken"}, "molecule broken"),
        ({"status": "ok", "energy": -2.0, "failure": "not converged"}, "not converged"),
        ({"status": "error", "failure": "error: boom"}, "boom"),
        (None, "no relaxation result"),
    ]:
        recs = combine(
            [Crystal(CODES[0], atoms, "t")], kinds, {"m": "chgnet"},
            relax_records={("m", CODES[0]): relax_rec} if relax_rec else {},
            gas_records=gas, clearance=30.0, relax_key={}, gas_key={},
        )  # fmt: skip
        assert recs[0]["status"] == "error" and reason in recs[0]["error"], recs[0]
    ok = {"status": "ok", "converged": True, "one_molecule": True, "same_bond_graph": True}
    assert gas_failure(ok) == ""
    assert gas_failure({**ok, "same_bond_graph": False}) == "bond graph changed"
    assert gas_failure({**ok, "converged": False}) == "not converged"
    # a relaxation that stretched the molecule a little below the requested clearance is fine;
    # below a calculator's cutoff it is not isolated any more
    assert gas_failure({**ok, "image_clearance_final": 29.8, "isolation_cutoff": 12.0}) == ""
    assert "< the cutoff 12.0" in gas_failure(
        {**ok, "image_clearance_final": 11.0, "isolation_cutoff": 12.0}
    )
    # per-crystal table: a failed value is empty, the spread covers the others
    df = pd.DataFrame(
        [
            {"method": "a", "id": "X", "status": "ok", "e_latt_kj_mol": -50.0},
            {"method": "b", "id": "X", "status": "ok", "e_latt_kj_mol": -70.0},
            {"method": "c", "id": "X", "status": "error", "error": "gas: not converged"},
        ]
    )
    wide = per_crystal_table(df)
    assert wide.loc["X", "spread"] == 20.0 and np.isnan(wide.loc["X", "c"])
    summ = summarize_lattice(df, "a").set_index("method")
    assert summ.loc["b", "mean_diff"] == -20.0 and summ.loc["c", "failures"] == 1


# ------------------------------------------------------------------ real DFT frames
#: X23 lattice energies (kJ/mol) from back-corrected sublimation enthalpies (Reilly &
#: Tkatchenko, J. Chem. Phys. 139, 024705 (2013)); vdW-DF2 is within a few kJ/mol of them
X23_REFERENCE = {"06_benzene": -50.6, "21_urea": -102.1, "02_acetic_acid": -72.8}
X23_Z = {"06_benzene": 4, "21_urea": 2, "02_acetic_acid": 4}


@requires_shared_data
@pytest.mark.parametrize("name", sorted(X23_REFERENCE))
def test_x23_vdwdf2_frames(shared_data, name):
    """Crystal and gas frames of one vdW-DF2 method: the molecule of the crystal frame is the
    gas frame's (same bond graph) with count Z, and E_latt from the lowest-energy crystal and
    gas frames lands within 10 kJ/mol of the X23 reference. The frames are hot (|F| up to
    ~1.5 eV/A on both sides), so the lowest energies sit above the minima on both sides
    (partly cancelling): 10 kJ/mol is that uncertainty, not vdW-DF2's accuracy; a wrong Z,
    unit or per-atom/per-cell mix-up is off by far more."""
    from ase.io import read

    frames = read(shared_data / "x23_vdwdf2" / f"{name}.traj", ":")
    gas = [a for a in frames if a.get_volume() > 5000]  # 25 A boxes
    crystals = [a for a in frames if a.get_volume() <= 5000]
    assert gas and crystals
    crystal = min(crystals, key=lambda a: a.get_potential_energy() / len(a))
    molecule = min(gas, key=lambda a: a.get_potential_energy())
    (kind,) = distinct_molecules(crystal)
    (gas_kind,) = distinct_molecules(molecule)
    assert kind.key == gas_kind.key and gas_kind.count == 1
    assert kind.count == X23_Z[name] == len(crystal) // len(molecule)
    e = lattice_energy(
        crystal.get_potential_energy(), crystal, {kind.key: molecule.get_potential_energy()}
    )
    by_hand = (
        crystal.get_potential_energy() / X23_Z[name] - molecule.get_potential_energy()
    ) * 96.485332
    assert e == pytest.approx(by_hand, rel=1e-6)
    assert abs(e - X23_REFERENCE[name]) < 10.0, (name, e)


# ------------------------------------------------------------------ a real run: CHGNet
def test_cli_lattice_with_chgnet(tmp_path, capsys):
    """A small real crystal (urea, 16 atoms) with pretrained CHGNet through the verb: finite,
    bound, resumable without recomputation, and --report-only rebuilds the tables."""
    from kd_nnp.cli import main

    out = tmp_path / "cli"
    argv = ["evaluate", "lattice", "--calc", "chgnet", "--dataset", "pyxtal:test",
            "--codes", CODES[0], "--workers", "1", "--no-rmsd", "--out", str(out),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "# Lattice energies" in printed and "no reference method" in printed
    recs = {r["id"]: r for r in read_jsonl(out / "lattice.jsonl")}
    assert set(recs) == {CODES[0]}
    for r in recs.values():
        assert r["status"] == "ok" and r["crystal_converged"] and r["gas_converged"]
        assert -200.0 < r["e_latt_kj_mol"] < -20.0, r  # bound, a molecular-crystal magnitude
        assert r["z"] == 2 and r["gas_one_molecule"]
    lines = {f: (out / f).read_text() for f in ("gas.jsonl", "relax/relax.jsonl")}
    assert main([*argv, "--report-only"]) == 0
    assert main(argv) == 0
    assert {f: (out / f).read_text() for f in lines} == lines  # nothing recomputed
    assert {r["id"]: r["e_latt_kj_mol"] for r in read_jsonl(out / "lattice.jsonl")} == {
        k: r["e_latt_kj_mol"] for k, r in recs.items()
    }


@requires_teacher("chgnet_d3")
def test_gas_phase_of_a_non_periodic_teacher_is_computed_without_pbc():
    """The + D3 teachers (like GFN2-xTB) compute an isolated molecule without periodic
    boundary conditions, as `kd-nnp label` and `data molecules` do (teachers.gas_phase)."""
    from ase.build import molecule

    from kd_nnp.evaluation.lattice import _gas_task, gas_box, gas_periodic
    from kd_nnp.evaluation.runner import atoms_to_dict, get_calc

    assert gas_periodic("chgnet", None) and gas_periodic("student:x.pt", None)
    assert not gas_periodic("teacher:chgnet_d3", get_calc("teacher:chgnet_d3"))
    water = molecule("H2O")
    box = gas_box(water.get_chemical_symbols(), water.positions, 8.0)
    item = {"atoms": atoms_to_dict(box), "spec": "teacher:chgnet_d3",
            "settings": {"fmax": 10.0, "max_steps": 1}}  # fmt: skip
    rec = _gas_task(item)
    free = box.copy()
    free.pbc = False
    free.calc = get_calc("teacher:chgnet_d3")
    assert rec["periodic"] is False
    assert rec["energy"] == pytest.approx(free.get_potential_energy(), abs=1e-6)
