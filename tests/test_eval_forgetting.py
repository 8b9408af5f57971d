"""The forgetting check (`kd-nnp evaluate forgetting`, kd_nnp.evaluation.forgetting) on tiny
sets: known-answer students built from pretrained CHGNet itself (the same weights: every
difference exactly 0; CHGNet plus a known energy shift and pressure term: known MAEs)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from ase import units

from kd_nnp.errors import KdNnpError
from kd_nnp.evaluation.forgetting import (
    REFERENCE_LABEL,
    builtin_structures,
    forgetting_set,
    perturbed_copy,
    run_forgetting,
)
from kd_nnp.evaluation.settings import ForgettingSettings

SHIFT_EV_ATOM = 0.01
PRESSURE_GPA = 1.0


class ShiftedCHGNet:
    """Pretrained CHGNet plus ``SHIFT_EV_ATOM`` per atom and ``PRESSURE_GPA * V``: energy
    differences are known per structure, the stress differs by p on the diagonal, forces not."""

    def __new__(cls):  # an ASE calculator, built from the inference calculator
        from kd_nnp.teachers.calculators import InferenceCHGNetCalculator

        class _Shifted(InferenceCHGNetCalculator):
            def calculate(self, atoms=None, properties=None, system_changes=None):
                from ase.calculators.calculator import all_changes

                super().calculate(atoms, properties, system_changes or all_changes)
                p = PRESSURE_GPA * units.GPa
                extra = SHIFT_EV_ATOM * len(self.atoms) + p * self.atoms.get_volume()
                self.results["energy"] += extra
                self.results["free_energy"] += extra
                self.results["stress"] = self.results["stress"] + p * np.array([1, 1, 1, 0, 0, 0])

        return _Shifted()


def shifted_chgnet():
    return ShiftedCHGNet()


@pytest.fixture(scope="module")
def same_student(tmp_path_factory):
    """Pretrained CHGNet written as a student model file (what `kd-nnp export` writes)."""
    import torch
    from chgnet.model import CHGNet

    path = tmp_path_factory.mktemp("forget") / "same.pt"
    model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
    torch.save({"model": model.as_dict()}, path)
    return path


TINY = ForgettingSettings(prototypes=("Si", "NH4Cl"), n_perturbed=1, mptrj=False)


def test_builtin_set_is_deterministic_and_small():
    built = builtin_structures()
    assert {"Si", "GaAs", "NaCl", "SrTiO3", "CsPbBr3", "TiO2-rutile", "MAPbI3"} <= set(built)
    assert {g for _, g in built.values()} == {"inorganic", "hybrid"}
    assert all(len(a) <= 12 and a.pbc.all() for a, _ in built.values())
    ma, _ = built["MAPbI3"]
    assert sorted(ma.get_chemical_symbols()) == sorted(["Pb", "C", "N", *"III", *"HHHHHH"])
    d = ma.get_all_distances(mic=True)
    sym = ma.get_chemical_symbols()
    c, n = sym.index("C"), sym.index("N")
    assert d[c, n] == pytest.approx(1.47, abs=1e-3)
    s = ForgettingSettings()
    a1 = perturbed_copy(built["Cu"][0], "Cu", 0, s)
    a2 = perturbed_copy(built["Cu"][0], "Cu", 0, s)
    a3 = perturbed_copy(built["Cu"][0], "Cu", 1, s)
    assert len(a1) >= 8 and np.array_equal(a1.positions, a2.positions)
    assert not np.allclose(a1.positions, a3.positions)
    strain = np.linalg.solve(built["Cu"][0].repeat((2, 2, 2)).cell.array, a1.cell.array)
    assert np.abs(strain - np.eye(3)).max() <= s.strain + 1e-12
    fs = forgetting_set(TINY)
    assert [x.id for x in fs.structures] == ["Si", "Si/perturbed-0", "NH4Cl", "NH4Cl/perturbed-0"]
    assert fs.relax_ids == ["Si", "NH4Cl"] and not fs.dft
    with pytest.raises(KdNnpError, match=r"unknown built-in structure\(s\) \['Xx'\]"):
        forgetting_set(ForgettingSettings(prototypes=("Si", "Xx")))
    with pytest.raises(KdNnpError, match="has no mptrj_sample"):
        forgetting_set(ForgettingSettings(prototypes=("Si",), shared_dir="/nonexistent/dir"))


def test_known_answer_students(same_student, tmp_path):
    """The same weights: all differences exactly 0. CHGNet + 0.01 eV/atom + p V: the energy
    MAE is 0.01 + p V/N averaged, stress MAE p/2 (3 of 6 components), forces 0, and a
    positive pressure shrinks every relaxed cell."""
    calcs = {"same": f"student:{same_student}", "shifted": "test_eval_forgetting:shifted_chgnet"}
    res = run_forgetting(calcs, tmp_path / "out", TINY)
    same, shifted = res["methods"]["same"], res["methods"]["shifted"]
    for key in ("energy_mae_ev_atom", "force_mae_ev_a", "stress_mae_gpa", "vol_change_mae_pct"):
        assert same[key] == 0.0, key
    assert same["n"] == 4 and same["n_relaxed"] == 2 and same["n_relax_unconverged"] == 0
    fs = forgetting_set(TINY)
    p = PRESSURE_GPA * units.GPa
    want = np.mean([SHIFT_EV_ATOM + p * s.atoms.get_volume() / len(s.atoms) for s in fs.structures])
    assert shifted["energy_mae_ev_atom"] == pytest.approx(want, rel=1e-5)
    assert shifted["energy_mean_ev_atom"] == pytest.approx(want, rel=1e-5)
    assert shifted["force_mae_ev_a"] == pytest.approx(0.0, abs=1e-5)
    assert shifted["stress_mae_gpa"] == pytest.approx(PRESSURE_GPA / 2, abs=1e-4)
    dv = {r["id"]: r["vol_change_pct"] for r in res["per_structure"] if r["method"] == "shifted"
          and "vol_change_pct" in r}  # fmt: skip
    assert set(dv) == {"Si", "NH4Cl"} and all(v < -0.1 for v in dv.values())
    assert shifted["vol_change_mae_pct"] == pytest.approx(np.mean([-v for v in dv.values()]))
    assert "builtin_energy_mae_ev_atom" in shifted and "mptrj_n" not in shifted
    assert res["reference_summary"]["n"] == 4 and not res["errors"]
    on_disk = json.loads((tmp_path / "out" / "forgetting.json").read_text())
    assert on_disk["methods"]["shifted"]["stress_mae_gpa"] == shifted["stress_mae_gpa"]
    md = (tmp_path / "out" / "forgetting.md").read_text()
    assert "| shifted " in md and REFERENCE_LABEL in md and "NH4Cl/perturbed-0" in md
    # resume: nothing recomputed (the JSON lines keep their length)
    n_points = (tmp_path / "out" / "points.jsonl").read_text().count("\n")
    assert n_points == 3 * 4
    again = run_forgetting(calcs, tmp_path / "out", TINY)
    assert (tmp_path / "out" / "points.jsonl").read_text().count("\n") == n_points
    assert again["methods"] == res["methods"]


def test_cli_and_shared_reference(same_student, tmp_path, capsys):
    """`kd-nnp evaluate forgetting` prints the table; job_forgetting computes the reference
    once in the shared folder and reuses it for a second student."""
    from kd_nnp.cli.evaluate import main
    from kd_nnp.evaluation.forgetting import job_forgetting

    args = ["forgetting", "--calc", f"student:{same_student}=same", "--out",
            str(tmp_path / "cli"), "--prototypes", "Si", "--n-perturbed", "0", "--no-mptrj",
            "--max-steps", "20", "--quiet"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "E MAE vs CHGNet (eV/atom)" in printed and "| same " in printed
    res = json.loads((tmp_path / "cli" / "forgetting.json").read_text())
    assert res["methods"]["same"]["energy_mae_ev_atom"] == 0.0
    assert res["settings"]["max_steps"] == 20 and res["structures"] == ["Si"]

    s = ForgettingSettings(prototypes=("Si",), n_perturbed=0, mptrj=False, max_steps=20)
    root = tmp_path / "baselines"
    a = job_forgetting(f"student:{same_student}", tmp_path / "a", root, s)
    b = job_forgetting("test_eval_forgetting:shifted_chgnet", tmp_path / "b", root, s)
    assert a["reference_dir"] == b["reference_dir"]
    ref_lines = (tmp_path / "baselines").glob("forgetting-*/points.jsonl")
    (ref,) = list(ref_lines)
    assert [json.loads(x)["method"] for x in ref.read_text().splitlines()] == ["chgnet"]
    assert a["summary"]["energy_mae_ev_atom"] == 0.0 and a["vol_change_pct"] == {"Si": 0.0}
    assert b["summary"]["energy_mae_ev_atom"] > SHIFT_EV_ATOM and b["vol_change_pct"]["Si"] < 0
    assert b["n_errors"] == 0


@pytest.mark.shared_data
def test_mptrj_frames_vs_dft(same_student, shared_data, tmp_path):
    """The shared MPtrj frames join the set; both models' errors vs DFT equal a direct
    computation with the inference calculator."""
    from ase.io import read

    from kd_nnp.evaluation.forgetting import mptrj_sample_file
    from kd_nnp.teachers.calculators import InferenceCHGNetCalculator

    s = ForgettingSettings(prototypes=("Si",), n_perturbed=0, relax=False,
                           shared_dir=str(shared_data))  # fmt: skip
    res = run_forgetting({"same": f"student:{same_student}"}, tmp_path, s)
    frames = read(str(mptrj_sample_file(s)), ":")
    calc = InferenceCHGNetCalculator()
    de, df, n = [], [], 0
    for a in frames:
        dft_e, dft_f = a.info["corrected_total_energy"], a.get_forces()
        b = a.copy()
        b.calc = calc
        de.append(abs(b.get_potential_energy() - dft_e) / len(a))
        df.append(np.abs(b.get_forces() - dft_f).sum())
        n += 3 * len(a)
    ref = res["reference_summary"]
    assert ref["n_mptrj"] == len(frames) == 9 and res["relaxed"] == []
    assert ref["mptrj_energy_mae_dft_ev_atom"] == pytest.approx(np.mean(de), rel=1e-4)
    assert ref["mptrj_force_mae_dft_ev_a"] == pytest.approx(sum(df) / n, rel=1e-3, abs=1e-6)
    same = res["methods"]["same"]
    assert same["mptrj_energy_mae_dft_ev_atom"] == ref["mptrj_energy_mae_dft_ev_atom"]
    assert same["mptrj_n"] == 9 and same["mptrj_energy_mae_ev_atom"] == 0.0
    assert math.isfinite(ref["mptrj_energy_mae_dft_ev_atom"])


def test_evaluate_forgetting_setting():
    """`evaluate.forgetting`: true -> defaults (the default), false/null -> off, a mapping ->
    its keys; anything else, or an unknown key, is a SettingsError naming it."""
    from kd_nnp.errors import SettingsError
    from kd_nnp.evaluation.settings import EvalJobSettings

    assert EvalJobSettings().forgetting == ForgettingSettings()
    assert EvalJobSettings.from_config({}).forgetting == ForgettingSettings()
    assert EvalJobSettings.from_config({"forgetting": True}).forgetting == ForgettingSettings()
    assert EvalJobSettings.from_config({"forgetting": False}).forgetting is None
    assert EvalJobSettings.from_config({"forgetting": None}).forgetting is None
    got = EvalJobSettings.from_config({"forgetting": {"prototypes": "Si,NaCl", "n_perturbed": 0}})
    assert got.forgetting == ForgettingSettings(prototypes=("Si", "NaCl"), n_perturbed=0)
    with pytest.raises(SettingsError, match=r"evaluate.forgetting: unknown .*\['n_perturb'\]"):
        EvalJobSettings.from_config({"forgetting": {"n_perturb": 0}})
    with pytest.raises(SettingsError, match="evaluate.forgetting=3: use true, false"):
        EvalJobSettings.from_config({"forgetting": 3})
    with pytest.raises(SettingsError, match="forgetting: n_perturbed, strain, rattle_std"):
        ForgettingSettings(n_perturbed=-1).check()
