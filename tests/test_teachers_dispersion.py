"""Dispersion added once (kd_nnp.teachers.dispersion) and the SevenNet + D3 teacher."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import Calculator
from conftest import requires_teacher

from kd_nnp.teachers.calculators import build_teacher_calculator
from kd_nnp.teachers.dispersion import DispersionSum, add_dispersion, dispersion_calculator
from kd_nnp.teachers.registry import load_teacher


def _crystal() -> Atoms:
    from kd_nnp.data.sources.pyxtal_db import checked_crystals

    (_, atoms), *_ = checked_crystals("test", codes=["UREAXX02"])
    return atoms


class _Harmonic(Calculator):
    """E = k sum |r - r0|^2 (no cell dependence): a base whose stress is zero."""

    implemented_properties = ["energy", "forces", "stress"]

    def __init__(self, r0: np.ndarray, k: float = 0.3) -> None:
        super().__init__()
        self.r0, self.k = r0, k

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        super().calculate(atoms, properties, system_changes or [])
        d = self.atoms.positions - self.r0
        self.results = {
            "energy": self.k * float((d**2).sum()),
            "forces": -2 * self.k * d,
            "stress": np.zeros(6),
        }


@requires_teacher("dftd3")
def test_sum_is_base_plus_dispersion_with_voigt_stress():
    atoms = _crystal()
    r0 = atoms.positions + 0.01
    calc = add_dispersion(_Harmonic(r0), "d3", "PBE", "d3bj")
    atoms.calc = calc
    e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    d3 = atoms.copy()
    d3.calc = dispersion_calculator("d3", "PBE", "d3bj")
    base_e = 0.3 * float(((atoms.positions - r0) ** 2).sum())
    assert e == pytest.approx(base_e + d3.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(f, -0.6 * (atoms.positions - r0) + d3.get_forces(), atol=1e-10)
    assert s.shape == (6,)
    np.testing.assert_allclose(s, d3.get_stress(), atol=1e-12)
    # dispersion binds: E rises when the cell expands, so sigma = (1/V) dE/d(strain) > 0 (ASE)
    assert d3.get_potential_energy() < 0 and s[:3].mean() > 0
    # stress = (1/V) dE/d(strain): finite difference of the summed energy
    eps = 1e-4
    for k, (i, j) in enumerate([(0, 0), (1, 1), (2, 2)]):
        es = []
        for sign in (1, -1):
            a = atoms.copy()
            strain = np.eye(3)
            strain[i, j] += sign * eps
            a.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            a.calc = add_dispersion(_Harmonic(a.positions.copy()), "d3", "PBE", "d3bj")
            es.append(a.get_potential_energy())
        fd = (es[0] - es[1]) / (2 * eps) / atoms.get_volume()
        assert s[k] == pytest.approx(fd, rel=2e-3, abs=1e-6)


@requires_teacher("dftd3")
def test_molecule_without_pbc_is_isolated_and_a_bad_part_is_refused():
    benzene = molecule("C6H6")
    benzene.calc = dispersion_calculator("d3")
    e_free = benzene.get_potential_energy()
    boxed = benzene.copy()
    boxed.center(vacuum=40.0)
    boxed.pbc = True
    boxed.calc = dispersion_calculator("d3")
    assert boxed.get_potential_energy() == pytest.approx(e_free, abs=1e-5)

    class BadStress(_Harmonic):
        def calculate(self, *a, **k):
            super().calculate(*a, **k)
            self.results["stress"] = np.zeros((3, 3))

    crystal = _crystal()
    crystal.calc = DispersionSum(BadStress(crystal.positions), dispersion_calculator("d3"))
    with pytest.raises(ValueError, match="not Voigt"):
        crystal.get_stress()


@requires_teacher("chgnet_d3")
def test_chgnet_d3_is_chgnet_plus_d3():
    atoms = _crystal()
    atoms.calc = build_teacher_calculator("chgnet_d3")
    both = atoms.get_potential_energy(), atoms.get_stress()
    parts = []
    for calc in (build_teacher_calculator("chgnet"), dispersion_calculator("d3", "PBE", "d3bj")):
        a = atoms.copy()
        a.calc = calc
        parts.append((a.get_potential_energy(), a.get_stress()))
    assert both[0] == pytest.approx(parts[0][0] + parts[1][0], abs=1e-5)
    np.testing.assert_allclose(both[1], parts[0][1] + parts[1][1], atol=1e-6)


@requires_teacher("sevennet_d3")
def test_sevennet_d3_passes_the_load_time_check_and_binds():
    teacher = load_teacher("sevennet_d3")  # finite-difference check of forces and stress
    prov = teacher.provenance()
    assert "sevenn==" in prov["version"] and prov["settings"]["model"] == "7net-0"
    atoms = _crystal()
    atoms.calc = teacher.calculator
    e = atoms.get_potential_energy()
    a = atoms.copy()
    a.calc = dispersion_calculator("d3", "PBE", "d3bj")
    assert np.isfinite(e) and a.get_potential_energy() < -0.5  # urea cell: D3 ~ -1 eV


@requires_teacher("chgnet_d3")
def test_a_sum_shows_its_parts_cutoffs():
    """Regression: with ase's SumCalculator replaced by DispersionSum, the lattice benchmark's
    isolation check no longer found CHGNet's atom-graph cutoff inside chgnet_d3."""
    from kd_nnp.evaluation.lattice import calculator_cutoff

    assert calculator_cutoff(build_teacher_calculator("chgnet_d3")) == (6.0, "atom-graph cutoff")
