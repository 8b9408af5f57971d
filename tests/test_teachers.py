"""Teacher registry and load-time check: good teachers pass, broken ones are refused."""

from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.units import GPa

from kd_nnp.data.store import Labels
from kd_nnp.teachers.base import CalculatorSpecError, TeacherCheckError, TeacherImportError
from kd_nnp.teachers.check import check_crystal
from kd_nnp.teachers.registry import load_teacher


class Broken(Calculator):
    """EMT with a deliberate mistake (``kind``)."""

    implemented_properties = ["energy", "forces", "stress"]

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.emt = EMT()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms.copy()
        a.calc = self.emt
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        if self.kind == "gpa":
            s = s / GPa  # stress in GPa instead of eV/A^3
        elif self.kind == "zero_stress":
            s = np.zeros(6)
        elif self.kind == "stress_sign":
            s = -s
        elif self.kind == "force_sign":
            f = -f
        elif self.kind == "nan":
            e = float("nan")
        self.results = {"energy": e, "forces": f, "stress": s}


def emt() -> EMT:
    return EMT()


def broken(kind: str) -> Broken:
    return Broken(kind)


def test_module_factory_teacher_passes_check():
    t = load_teacher("test_teachers:emt")
    assert t.name == "test_teachers:emt" and t.check_report["n_atoms"] == 16
    lab = t.compute(check_crystal())
    assert isinstance(lab, Labels) and lab.forces.shape == (16, 3) and lab.stress.shape == (6,)
    prov = t.provenance()
    assert set(prov) >= {"name", "version", "settings", "hash"}
    assert prov["hash"] == load_teacher("test_teachers:emt", check=False).provenance()["hash"]


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("gpa", "stress component"),
        ("zero_stress", "stress component"),
        ("stress_sign", "stress component"),
        ("force_sign", "force on atom"),
        ("nan", "energy is nan"),
    ],
)
def test_broken_teachers_refused(kind, match):
    with pytest.raises(TeacherCheckError, match=match):
        load_teacher("test_teachers:broken", kind=kind)
    # without the check it loads (the user asked for it)
    assert load_teacher("test_teachers:broken", check=False, kind=kind).settings == {"kind": kind}


def test_registry_errors():
    with pytest.raises(CalculatorSpecError, match="unknown teacher 'nope'"):
        load_teacher("nope")
    with pytest.raises(TeacherImportError, match="cannot import"):
        load_teacher("not_a_module_xyz:factory")
    with pytest.raises(TeacherImportError, match="no callable"):
        load_teacher("test_teachers:missing")


def test_missing_package_message_names_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tblite.ase", None)  # import of tblite.ase now fails
    with pytest.raises(TeacherImportError, match=r"gfn2.*tblite.*kd_nnp\[teachers\]"):
        load_teacher("gfn2", check=False)


@pytest.mark.teacher("so3lr")
def test_so3lr_loads_checks_and_labels():
    t = load_teacher("so3lr")
    assert t.settings["compute_stress"] is True and t.version.startswith("so3krates-torch==")
    lab = t.compute(check_crystal())
    assert np.isfinite(lab.energy) and np.abs(lab.stress).max() > 1e-3
    # SO3LR's energy zero is far from DFT/CHGNet's (about -165 eV/atom here)
    assert lab.energy / 16 < -100


@pytest.mark.teacher("gfn2", "chgnet_d3")
@pytest.mark.slow
def test_gfn2_and_chgnet_d3_check():
    for name in ("gfn2", "chgnet_d3"):
        assert load_teacher(name).check_report["stress_checks"]
