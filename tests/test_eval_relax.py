"""Relaxation benchmark: calculators, relaxation protocol, sanity flags, resumable runner."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes

from kd_nnp.data.molecules import connectivity_change
from kd_nnp.evaluation.protocol import compare_structures, relax_structure
from kd_nnp.evaluation.relax import run_relax_benchmark
from kd_nnp.evaluation.rmsd15 import rmsd15
from kd_nnp.evaluation.settings import RelaxSettings
from kd_nnp.evaluation.stats import paired_volume_distance, summarize
from kd_nnp.evaluation.structures import (
    load_dataset,
    pyxtal_reference_cells,
)
from kd_nnp.teachers.calculators import make_calculator, method_label
from kd_nnp.utils.jsonl import read_jsonl

VOLUME_FACTOR = 1.05


class ScaledCrystalCalc(Calculator):
    """Cheap known-answer model: the crystal it first sees (per composition) is stable at
    ``VOLUME_FACTOR`` x its volume, isotropically scaled, molecules rigid. Cell energy is
    isotropic linear elasticity (K = 10, G = 5 GPa) around the scaled cell; atoms are tied
    harmonically to their scaled fractional positions."""

    implemented_properties = ("energy", "free_energy", "forces", "stress")

    def __init__(self, fail_above: int | None = None) -> None:
        super().__init__()
        self.refs: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.fail_above = fail_above

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        if self.fail_above is not None and len(a) > self.fail_above:
            raise RuntimeError("deliberate failure for a large crystal")
        key = tuple(a.numbers)
        if key not in self.refs:
            s = VOLUME_FACTOR ** (1 / 3)
            self.refs[key] = (a.cell.array * s, a.get_scaled_positions(wrap=False))
        h0, frac0 = self.refs[key]
        h = a.cell.array
        f = np.linalg.solve(h0, h).T  # h = h0 @ f.T
        eps = 0.5 * (f + f.T) - np.eye(3)
        k, g = 10 * units.GPa, 5 * units.GPa
        lam = k - 2 * g / 3
        sig = lam * np.trace(eps) * np.eye(3) + 2 * g * eps
        v0 = abs(np.linalg.det(h0))
        d = a.positions - frac0 @ h
        kk = 5.0
        self.results = {
            "energy": 0.5 * v0 * float((sig * eps).sum()) + 0.5 * kk * float((d**2).sum()),
            "forces": -kk * d,
            "stress": np.array([sig[0, 0], sig[1, 1], sig[2, 2], sig[1, 2], sig[0, 2], sig[0, 1]]),
        }
        self.results["free_energy"] = self.results["energy"]


def scaled_calc() -> Calculator:
    return ScaledCrystalCalc()


def failing_calc() -> Calculator:
    return ScaledCrystalCalc(fail_above=30)


@pytest.fixture(scope="module")
def formam() -> Atoms:
    return load_dataset("pyxtal:test", codes=["FORMAM"])[0].atoms


# ------------------------------------------------------------------ datasets
def test_load_dataset_filters():
    first = load_dataset("pyxtal:test", limit=3)
    assert [c.id for c in first] == ["FORMAM", "KONTIQ", first[2].id] and len(first) == 3
    small = load_dataset("pyxtal:test", max_atoms=30, limit=5)
    assert small and all(len(c.atoms) <= 30 for c in small)
    with pytest.raises(KeyError, match="NOPE"):
        load_dataset("pyxtal:test", codes=["NOPE"])


def test_pyxtal_cells_without_their_h_are_left_out_and_listed():
    """OXALAC02 (C8O16 for C2H2O4: H not resolved) reached every `evaluate relax` on
    pyxtal:test (SO3LR relaxed it 'cleanly' to -18 %); the demo and the stores already left it
    out. Now the benchmark's loader does too, and says so."""
    skipped: list = []
    got = load_dataset("pyxtal:test", codes=["OXALAC02", "FORMAM", "DBZCOR"], skipped=skipped)
    assert [c.id for c in got] == ["FORMAM"]
    assert [s[0] for s in skipped] == ["pyxtal:test:DBZCOR", "pyxtal:test:OXALAC02"]
    assert "missing H: formula C2H2O4 but the sites are C8O16" in skipped[1][1]
    assert len(load_dataset("pyxtal:test")) == 98  # of 100 rows


def test_cif_folder_and_bad_cif(tmp_path, formam):
    formam.write(tmp_path / "formam.cif")
    got = load_dataset(str(tmp_path))
    assert got[0].id == "formam" and len(got[0].atoms) == len(formam)
    (tmp_path / "broken.cif").write_text("data_x\n_cell_length_a 5\n")
    with pytest.raises(ValueError, match="broken.cif"):
        load_dataset(f"cifs:{tmp_path}")


def test_pyxtal_reference_cells():
    # MERQUY has Z' = 0.5: ASE reads its stored CIFs with half the atoms (whole cells
    # must be compared, not volumes per atom)
    recs = pyxtal_reference_cells("pyxtal:test", ["FORMAM", "KONTIQ", "MERQUY"])
    assert len(recs) == 15
    ok = [r for r in recs if r["status"] == "ok"]
    assert len(ok) >= 12
    for r in ok:
        assert abs(r["vol_err_pct"]) < 20, r
        # density and volume errors are consistent
        assert r["density_pred"] / r["density_exp"] == pytest.approx(
            r["volume_exp"] / r["volume_pred"], rel=1e-9
        )


# ------------------------------------------------------------------ calculators
def test_method_labels_and_bad_specs(tmp_path):
    assert method_label("chgnet") == "CHGNet"
    assert method_label("student:out/run3/model.pt") == "student(model)"
    assert method_label("teacher:so3lr") == "teacher(so3lr)"
    with pytest.raises(ValueError, match="unknown calculator"):
        make_calculator("nonsense")
    with pytest.raises(FileNotFoundError):
        make_calculator(f"student:{tmp_path / 'missing.pt'}")
    with pytest.raises(ValueError, match="cannot import"):
        make_calculator("no_such_module_xyz:factory")
    calc = make_calculator("test_eval_relax:scaled_calc")
    assert isinstance(calc, ScaledCrystalCalc)


def test_student_label_may_hold_equals_signs(tmp_path):
    # 'PATH=LABEL' splits at the first '=' that leaves an existing file: a label with '='
    # (a sweep's override) used to be split at the last '=' and read as a missing path
    run = tmp_path / "lr=0.01"
    run.mkdir()
    (run / "student.pt").write_bytes(b"x")
    f = run / "student.pt"
    assert method_label(f"student:{f}=r_se=1") == "r_se=1"
    assert method_label(f"student:{f}=soft") == "soft"
    assert method_label(f"student:{f}") == "student(lr=0.01)"
    with pytest.raises(FileNotFoundError):
        make_calculator(f"student:{tmp_path / 'missing.pt'}=a=b")


def test_inference_calculator_matches_chgnet(formam, tmp_path):
    """The first-order CHGNet calculator equals chgnet's CHGNetCalculator, and a student
    file written as torch.save({'model': model.as_dict()}) loads through student:PATH."""
    import torch
    from chgnet.model import CHGNet

    a = formam.copy()
    a.rattle(0.03, seed=3)
    a.set_cell(a.cell * 1.01, scale_atoms=True)
    ref = make_calculator("chgnet.model.dynamics:CHGNetCalculator")
    model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
    path = tmp_path / "student.pt"
    torch.save({"model": model.as_dict()}, path)
    for calc in (make_calculator("chgnet"), make_calculator(f"student:{path}")):
        x, y = a.copy(), a.copy()
        x.calc, y.calc = calc, ref
        assert x.get_potential_energy() == pytest.approx(y.get_potential_energy(), abs=1e-4)
        np.testing.assert_allclose(x.get_forces(), y.get_forces(), atol=1e-4)
        np.testing.assert_allclose(x.get_stress(), y.get_stress(), atol=1e-6)
        assert np.abs(x.get_stress()).max() > 1e-4  # the comparison is not trivial


# ------------------------------------------------------------------ relaxation
def test_relax_reaches_stress_threshold_known_answer(formam):
    relaxed, info = relax_structure(
        formam, ScaledCrystalCalc(), RelaxSettings(fmax=0.01, stress_tol_gpa=0.005)
    )
    assert info["converged"], info
    assert info["stress_max_gpa"] < 0.005
    cmp = compare_structures(formam, relaxed)
    assert cmp["vol_err_pct"] == pytest.approx(5.0, abs=0.1)
    assert not cmp["molecule_broken"] and not cmp["molecule_merged"]


def test_relax_with_chgnet_meets_stress_tol(formam):
    """CHGNet on formamide: default protocol converges with residual stress < tol; the ASE
    default exp_cell_factor (= N atoms) is documented to leave more stress behind."""
    relaxed, info = relax_structure(formam, make_calculator("chgnet"), RelaxSettings(max_steps=400))
    assert info["converged"], info
    assert info["stress_max_gpa"] < 0.01
    assert info["fmax_final"] < 0.03
    assert relaxed.get_volume() > formam.get_volume()  # CHGNet overestimates volumes


def test_not_converged_is_reported(formam):
    _, info = relax_structure(formam, make_calculator("chgnet"), RelaxSettings(max_steps=3))
    assert not info["converged"] and info["steps"] == 3


def test_connectivity_flags(formam):
    assert not any(
        connectivity_change(formam, formam)[k] for k in ("molecule_broken", "molecule_merged")
    )
    broken = formam.copy()
    h = np.flatnonzero(broken.numbers == 1)[0]
    broken.positions[h] += 1.5 * np.array([1.0, 0, 0])  # tear one H off
    flags = connectivity_change(formam, broken)
    assert flags["molecule_broken"] and flags["bonds_broken"] >= 1
    squeezed = formam.copy()
    squeezed.set_cell(formam.cell * 0.6, scale_atoms=False)  # molecules overlap
    assert connectivity_change(formam, squeezed)["molecule_merged"]


# ------------------------------------------------------------------ the runner
def test_benchmark_known_answer_resume_and_report(tmp_path):
    out = tmp_path / "run"
    kw = dict(limit=2, max_atoms=40, workers=1, progress=False, settings=RelaxSettings(fmax=0.01))
    df = run_relax_benchmark("pyxtal:test", {"scaled": "test_eval_relax:scaled_calc"}, out, **kw)
    mine = df[df["method"] == "scaled"]
    assert len(mine) == 2 and (mine["status"] == "ok").all()
    np.testing.assert_allclose(mine["vol_err_pct"], 5.0, atol=0.1)
    assert (mine["rmsd15_matched"] == 15).all()
    # isotropic 5 % volume: RMSD15 = (1.05^(1/3) - 1) x radius of gyration of the cluster
    exp = load_dataset("pyxtal:test", codes=[mine["id"].iloc[0]])[0].atoms
    b = exp.copy()
    b.set_cell(exp.cell * VOLUME_FACTOR ** (1 / 3), scale_atoms=True)
    assert mine["rmsd15"].iloc[0] == pytest.approx(rmsd15(exp, b).rmsd, abs=0.01)
    # reference rows from test.db are in the same table
    assert {"DFTB-D3 (test.db)", "GULP (test.db)"} <= set(df["method"])
    for f in ("table.md", "table.csv", "summary.csv", "parity_volume.png", "parity_density.png"):
        assert (out / f).stat().st_size > 0
    summ = summarize(df).set_index("method")
    assert summ.loc["scaled", "n_covered"] == 2
    assert summ.loc["scaled", "vol_mae_pct"] == pytest.approx(5.0, abs=0.1)
    # resume: drop the last record (as if killed), add a truncated line; only it is rerun
    lines = (out / "relax.jsonl").read_text().splitlines()
    (out / "relax.jsonl").write_text(lines[0] + "\n" + lines[1][:50])
    run_relax_benchmark("pyxtal:test", {"scaled": "test_eval_relax:scaled_calc"}, out, **kw)
    recs = read_jsonl(out / "relax.jsonl")
    assert sorted(r["id"] for r in recs) == sorted(mine["id"])
    assert json.loads(lines[0]) == recs[0]
    # report-only over a larger selection: the crystal never run is listed as missing
    kw3 = {**kw, "limit": 3}
    df3 = run_relax_benchmark(
        "pyxtal:test", {"scaled": "test_eval_relax:scaled_calc"}, out, run=False, **kw3
    )
    mine3 = df3[df3["method"] == "scaled"]
    assert len(mine3) == 3 and (mine3["status"] == "missing").sum() == 1
    assert len(read_jsonl(out / "relax.jsonl")) == 2
    assert summarize(df3).set_index("method").loc["scaled", "n_errors"] == 1


def test_failures_are_counted_not_dropped(tmp_path):
    out = tmp_path / "fail"
    df = run_relax_benchmark(
        "pyxtal:test",
        {"flaky": "test_eval_relax:failing_calc"},
        out,
        limit=2,
        workers=2,
        progress=False,
        references=False,
        settings=RelaxSettings(fmax=0.01),
    )
    assert len(df) == 2
    summ = summarize(df).set_index("method")
    assert summ.loc["flaky", "n_errors"] == 1 and summ.loc["flaky", "n_covered"] == 1
    table = (out / "table.md").read_text()
    assert "KONTIQ" in table and "deliberate failure" in table
    assert isinstance(df, pd.DataFrame)


def test_cli_relax(tmp_path, capsys):
    from kd_nnp.cli import main

    out = tmp_path / "cli"
    rc = main(
        [
            "evaluate", "relax", "--calc", "test_eval_relax:scaled_calc", "--dataset",
            "pyxtal:test", "--limit", "1", "--max-atoms", "30", "--workers", "1",
            "--fmax", "0.01", "--out", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "test_eval_relax.scaled_calc" in printed and "DFTB-D3 (test.db)" in printed
    df = pd.read_csv(out / "table.csv")
    assert len(df[df["method"] == "test_eval_relax.scaled_calc"]) == 1
    assert (out / "parity_volume.png").is_file()


def test_student_results_are_not_reused_after_retraining(tmp_path):
    """A retrained student at the same path must be relaxed again (content fingerprint)."""
    from kd_nnp.evaluation.runner import is_done
    from kd_nnp.teachers.calculators import spec_fingerprint

    student = tmp_path / "student.pt"
    student.write_bytes(b"weights v1")
    params = {"fmax": 0.03}
    fp1 = spec_fingerprint(f"student:{student}")
    rec = {
        "method": "student",
        "spec": f"student:{student}",
        "spec_fingerprint": fp1,
        "settings": params,
    }
    assert is_done(rec, {"student": fp1}, params)
    student.write_bytes(b"weights v2")
    fp2 = spec_fingerprint(f"student:{student}")
    assert fp2 != fp1 and not is_done(rec, {"student": fp2}, params)
    # other settings, or a record of another calculator, are not reused either
    assert not is_done(rec, {"student": fp1}, {"fmax": 0.05})
    assert spec_fingerprint("chgnet") == "chgnet"
    old = {"method": "CHGNet", "spec": "chgnet", "settings": params}  # written before fingerprints
    assert is_done(old, {"CHGNet": "chgnet"}, params)


def test_paired_volume_distance_to_teacher():
    """mean |dV_student - dV_teacher| over crystals both relaxed (the demo's distillation figure)."""
    rows = [
        ("teacher", "A", "ok", -1.0), ("teacher", "B", "ok", 2.0), ("teacher", "C", "ok", 0.5),
        ("student", "A", "ok", 3.0), ("student", "B", "ok", 1.0), ("student", "C", "error", 9.0),
        ("chgnet", "A", "ok", 20.0),
    ]  # fmt: skip
    df = pd.DataFrame(rows, columns=["method", "id", "status", "vol_err_pct"])
    d = paired_volume_distance(df, "student", "teacher")
    assert d["n"] == 2  # C failed for the student: not paired
    assert d["mean_abs_pct"] == pytest.approx((4.0 + 1.0) / 2)
    assert d["mean_pct"] == pytest.approx((4.0 - 1.0) / 2)
    assert d["per_crystal_pct"] == {"A": pytest.approx(4.0), "B": pytest.approx(-1.0)}
    # the MAE against experiment would be 2.0 for the student: a different number
    assert paired_volume_distance(df, "chgnet", "teacher")["mean_abs_pct"] == pytest.approx(21.0)
    assert paired_volume_distance(df, "nobody", "teacher")["n"] == 0
