"""Elastic benchmark: moduli formulas (hand-computed), finite-strain fitting, Table 2."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from ase import units
from ase.calculators.calculator import Calculator, all_changes

from kd_nnp.evaluation.elastic import (
    MODULI,
    fit_stiffness,
    has_negative_moduli,
    load_reference_tensors,
    mae_table,
    moduli_from_stiffness,
    run_elastic_benchmark,
    shared_structures,
)
from kd_nnp.evaluation.settings import ElasticSettings
from kd_nnp.evaluation.structures import load_dataset
from kd_nnp.utils.paths import shared_data_dir


def cubic(c11: float, c12: float, c44: float) -> np.ndarray:
    c = np.zeros((6, 6))
    c[:3, :3] = c12
    np.fill_diagonal(c[:3, :3], c11)
    np.fill_diagonal(c[3:, 3:], c44)
    return c


# a stiffness with every symmetry broken a little, used as the known answer of the fit
C_KNOWN = np.array(
    [
        [14.0, 6.0, 5.0, 0.3, 0.0, 0.2],
        [6.0, 12.0, 4.0, 0.0, 0.4, 0.0],
        [5.0, 4.0, 18.0, 0.1, 0.0, 0.0],
        [0.3, 0.0, 0.1, 4.0, 0.0, 0.2],
        [0.0, 0.4, 0.0, 0.0, 3.0, 0.0],
        [0.2, 0.0, 0.0, 0.2, 0.0, 5.0],
    ]
)


class LinearElasticCalc(Calculator):
    """Known-answer model: stress = C_KNOWN : (Green strain w.r.t. the first cell seen),
    engineering shear in Voigt notation; atoms tied to their fractional positions."""

    implemented_properties = ("energy", "free_energy", "forces", "stress")

    def __init__(self, c_gpa: np.ndarray = C_KNOWN) -> None:
        super().__init__()
        self.c = np.asarray(c_gpa) * units.GPa
        self.refs: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        key = tuple(a.numbers)
        if key not in self.refs:
            self.refs[key] = (a.cell.array.copy(), a.get_scaled_positions(wrap=False))
        h0, frac0 = self.refs[key]
        f = np.linalg.solve(h0, a.cell.array).T
        e = 0.5 * (f.T @ f - np.eye(3))
        ev = np.array([e[0, 0], e[1, 1], e[2, 2], 2 * e[1, 2], 2 * e[0, 2], 2 * e[0, 1]])
        sv = self.c @ ev
        d = a.positions - frac0 @ a.cell.array
        self.results = {
            "energy": 0.5 * a.get_volume() * float(ev @ sv) + 2.5 * float((d**2).sum()),
            "forces": -5.0 * d,
            "stress": sv,
        }
        self.results["free_energy"] = self.results["energy"]


def linear_calc() -> Calculator:
    return LinearElasticCalc()


def test_isotropic_moduli_by_hand():
    lam, mu = 6.0, 4.0
    m = moduli_from_stiffness(cubic(lam + 2 * mu, lam, mu))
    k = lam + 2 * mu / 3
    e = mu * (3 * lam + 2 * mu) / (lam + mu)
    for s in ("V", "R", "H", "RH"):
        assert m[f"K_{s}"] == pytest.approx(k)
        assert m[f"G_{s}"] == pytest.approx(mu)
        assert m[f"E_{s}"] == pytest.approx(e)
    assert m["nu"] == pytest.approx(lam / (2 * (lam + mu)))
    assert m["A"] == pytest.approx(0.0, abs=1e-12)
    assert not has_negative_moduli(m)


def test_cubic_moduli_by_hand():
    # C11 = 10, C12 = 4, C44 = 2 (GPa): hand-computed from the paper's formulas
    m = moduli_from_stiffness(cubic(10.0, 4.0, 2.0))
    k = 6.0  # (C11 + 2 C12) / 3, Voigt = Reuss for cubic
    g_v = (3 * 10 - 3 * 4 + 3 * 3 * 2) / 15  # 2.4
    g_r = 5 * (10 - 4) * 2 / (4 * 2 + 3 * (10 - 4))  # 60 / 26
    e_v = 9 * k * g_v / (3 * k + g_v)  # 129.6 / 20.4
    e_r = 9 * k * g_r / (3 * k + g_r)
    assert g_v == pytest.approx(2.4) and g_r == pytest.approx(60 / 26)
    assert m["K_V"] == pytest.approx(k) and m["K_R"] == pytest.approx(k)
    assert m["G_V"] == pytest.approx(2.4) and m["G_R"] == pytest.approx(60 / 26)
    assert m["E_V"] == pytest.approx(129.6 / 20.4) and m["E_R"] == pytest.approx(e_r)
    assert m["E_H"] == pytest.approx((e_v + e_r) / 2)
    assert m["E_RH"] == pytest.approx((e_r + (e_v + e_r) / 2) / 2)
    g_h = (2.4 + 60 / 26) / 2
    assert m["G_H"] == pytest.approx(g_h) and m["G_RH"] == pytest.approx((60 / 26 + g_h) / 2)
    assert m["nu"] == pytest.approx(0.5 * (1 - 3 * g_h / (3 * k + g_h)))
    assert m["A"] == pytest.approx(math.sqrt(5) * math.log(2.4 / (60 / 26)))
    assert m["A"] == pytest.approx(0.08770, abs=1e-5)


def test_negative_moduli_flagged():
    assert has_negative_moduli(moduli_from_stiffness(cubic(10.0, 4.0, -2.0)))
    assert not has_negative_moduli(moduli_from_stiffness(C_KNOWN))


def test_fit_recovers_known_stiffness():
    atoms = load_dataset("pyxtal:test", codes=["FORMAM"])[0].atoms  # monoclinic cell
    calc = LinearElasticCalc()
    c, info = fit_stiffness(atoms, calc, strains=(0.005, 0.01))
    np.testing.assert_allclose(c, C_KNOWN, atol=2e-3 * np.abs(C_KNOWN).max())
    assert info["n_strained"] == 24 and info["n_ion_unconverged"] == 0


SHARED = shared_data_dir()
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared data not available")


@pytest.mark.shared_data
@needs_shared
def test_reference_tensors_mean_of_sources():
    csv = SHARED / "elastic" / "stiffness_tensors_rev.csv"
    refs = load_reference_tensors(csv)
    raw = pd.read_csv(csv)
    raw = raw[(raw["Compound"].str.strip() == "anthracene") & (raw["Method"] == "Exp")]
    row = refs[(refs["compound_key"] == "anthracene") & (refs["method"] == "Exp")].iloc[0]
    assert row["n_sources"] == len(raw) == 4
    assert row["C"][0, 0] == pytest.approx(raw["C11"].mean())
    assert ((refs["compound_key"] == "urea") & (refs["method"] == "PFP")).sum() == 1


@pytest.mark.shared_data
@needs_shared
def test_shared_structures_mapping():
    items = shared_structures(SHARED)
    assert len({it["compound"] for it in items}) == 15
    assert all(it["file"].is_file() for it in items)


@pytest.mark.shared_data
@needs_shared
def test_elastic_benchmark_table2(tmp_path):
    """End to end on two shared compounds with the known-answer calculator: the MAE table
    equals |moduli(C_KNOWN) - mean experimental moduli| averaged over the compounds."""
    df = run_elastic_benchmark(
        {"linear": "test_eval_elastic:linear_calc"},
        tmp_path,
        shared=True,
        compounds=["urea", "pyrazine"],
        workers=1,
        progress=False,
        settings=ElasticSettings(strains=(0.01,)),
    )
    assert len(df) == 2 and (df["status"] == "ok").all()
    refs = load_reference_tensors(SHARED / "elastic" / "stiffness_tensors_rev.csv")
    tab, counts = mae_table(df, refs, ["linear"])
    known = moduli_from_stiffness(C_KNOWN)
    exp = refs[refs["method"] == "Exp"].set_index("compound_key")
    for m in ("E_RH", "K_V", "G_R", "nu"):
        want = np.mean([abs(known[m] - exp.loc[k, m]) for k in ("urea", "pyrazine")])
        assert tab.loc[m, "linear"] == pytest.approx(want, rel=2e-3)
    assert counts["linear"] == {"n": 2, "excluded": 0}
    assert list(tab.index) == list(MODULI) and {"Mean model", "PFP"} <= set(tab.columns)
    md = (tmp_path / "elastic.md").read_text()
    assert "E_RH" in md and (tmp_path / "parity_E_RH.png").is_file()


@pytest.mark.slow
@pytest.mark.shared_data
@needs_shared
def test_chgnet_urea_elastic(tmp_path):
    df = run_elastic_benchmark(
        ["chgnet"], tmp_path, shared=True, compounds=["urea"], workers=1, progress=False
    )
    r = df.iloc[0]
    assert r["status"] == "ok" and r["converged"]
    assert 1.0 < r["E_RH"] < 100.0


def test_cli_elastic_on_cif_folder(tmp_path, capsys):
    from kd_nnp.cli import main

    atoms = load_dataset("pyxtal:test", codes=["FORMAM"])[0].atoms
    (tmp_path / "cifs").mkdir()
    atoms.write(tmp_path / "cifs" / "formam.cif")
    (tmp_path / "cifs" / "broken.cif").write_text("data_broken\n_cell_length_a 5\n")
    rc = main(
        [
            "evaluate", "elastic", "--calc", "test_eval_elastic:linear_calc", "--structures",
            str(tmp_path / "cifs"), "--out", str(tmp_path / "out"), "--workers", "1",
            "--strains", "0.01", "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    df = pd.read_csv(tmp_path / "out" / "elastic.csv")
    known = moduli_from_stiffness(C_KNOWN)
    assert df.loc[0, "E_RH"] == pytest.approx(known["E_RH"], rel=2e-3)
    out = capsys.readouterr().out
    assert "formam" in out
    # an unreadable CIF is skipped and listed, the others are computed (as in `evaluate relax`)
    assert "unreadable structure files (skipped): 1" in out and "broken.cif" in out


class ExpandingCalc(Calculator):
    """Constant -1 GPa stress and no forces: the cell expands without limit."""

    implemented_properties = ("energy", "free_energy", "forces", "stress")

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        v = self.atoms.get_volume()
        self.results = {
            "energy": -units.GPa * v,
            "free_energy": -units.GPa * v,
            "forces": np.zeros((len(self.atoms), 3)),
            "stress": -units.GPa * np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]),
        }


def expanding_calc() -> Calculator:
    return ExpandingCalc()


def test_runaway_relaxation_is_skipped_and_listed(tmp_path):
    atoms = load_dataset("pyxtal:test", codes=["FORMAM"])[0].atoms
    df = run_elastic_benchmark(
        {"boom": "test_eval_elastic:expanding_calc"},
        tmp_path,
        structures=[("formam", atoms)],
        workers=1,
        progress=False,
    )
    r = df.iloc[0]
    assert r["status"] == "skipped" and "volume runaway" in r["error"]
    assert r["steps"] < 200  # stopped early, not after 2000 steps
    assert "volume runaway" in (tmp_path / "elastic.md").read_text()


def test_retrained_student_moduli_are_recomputed(tmp_path):
    """A student retrained at the same path (new weights, same file name) gets new moduli; the
    same file with the same settings is reused. (Elastic reused any (method, id) on disk.)"""
    import torch
    from chgnet.model import CHGNet

    atoms = load_dataset("pyxtal:test", codes=["FORMAM"])[0].atoms
    student = tmp_path / "run" / "student.pt"
    student.parent.mkdir()
    model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
    torch.save({"model": model.as_dict()}, student)
    settings = ElasticSettings(strains=(0.01,), fmax=0.5, ion_fmax=0.5, max_steps=5)
    kw = dict(structures=[("formam", atoms)], workers=1, progress=False)
    out = tmp_path / "elastic"
    calcs = {"student": f"student:{student}"}
    first = run_elastic_benchmark(calcs, out, settings, **kw).iloc[0]
    assert first["status"] == "ok"
    with torch.no_grad():  # "retrain": other weights at the same path
        for p in model.mlp.parameters():
            p.mul_(1.02)
    torch.save({"model": model.as_dict()}, student)
    second = run_elastic_benchmark(calcs, out, settings, **kw).iloc[0]
    assert second["status"] == "ok" and second["E_RH"] != pytest.approx(first["E_RH"])
    lines = (out / "elastic.jsonl").read_text().splitlines()
    assert len(lines) == 2
    third = run_elastic_benchmark(calcs, out, settings, **kw).iloc[0]  # same file: reused
    assert third["E_RH"] == second["E_RH"]
    assert len((out / "elastic.jsonl").read_text().splitlines()) == 2
