"""What the teacher registry and the load-time check share: the errors and the
:class:`Teacher` (a named ASE calculator with settings and provenance).

Both :mod:`kd_nnp.teachers.registry` and :mod:`kd_nnp.teachers.check` import this module;
neither imports the other's internals (the registry calls the check, never the reverse).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms

from kd_nnp.data.store import Labels
from kd_nnp.errors import KdNnpError
from kd_nnp.utils.provenance import stable_hash

PIP_EXTRA = "pip install 'kd_nnp[teachers]'"


class TeacherImportError(KdNnpError, ImportError):
    """The package a teacher needs is not installed (message names the pip extra)."""


class TeacherCheckError(KdNnpError, RuntimeError):
    """A teacher failed its load-time check (message gives the reason)."""


class CalculatorSpecError(KdNnpError, ValueError):
    """A calculator spec (``chgnet``, ``student:PATH``, ``teacher:NAME``, ``module:factory``)
    names nothing that can be built; the message says what is wrong and what to write."""


class StudentFileError(CalculatorSpecError, FileNotFoundError):
    """``student:PATH`` names a file that does not exist or is not a CHGNet model."""


@dataclass(frozen=True)
class GasPhase:
    """How a calculator computes an isolated molecule (gas-phase frames, ``phase=gas``).

    ``periodic``: True if the molecule is computed in its periodic box, which is then exact
    only when every atom is at least ``clearance`` (A) from every image atom (the
    calculator's interaction range); False if it is computed without periodic boundary
    conditions (the box is ignored, stress from the virial of the forces). ``clearance`` None:
    the range is unknown (a ``module:factory`` calculator). ``note`` says where it comes from."""

    periodic: bool
    clearance: float | None
    note: str = ""


@dataclass
class Teacher:
    """A named ASE calculator with its settings, version and load-time check report;
    ``gas`` says how it computes gas-phase frames (:func:`~kd_nnp.teachers.calculators.gas_phase`)."""

    name: str
    settings: dict[str, Any]
    version: str
    calculator: Any
    check_report: dict[str, Any] | None = None
    gas: GasPhase | None = None

    def provenance(self) -> dict[str, Any]:
        core = {"name": self.name, "version": self.version, "settings": self.settings}
        return dict(core, hash=stable_hash(core), check=self.check_report)

    def compute(self, atoms: Atoms, *, gas: bool = False) -> Labels:
        """Energy (eV), forces (eV/A), stress (ASE Voigt, eV/A^3) of ``atoms``; ``gas``: an
        isolated molecule in its box (a frame with ``phase=gas``), computed as :attr:`gas` says
        (:func:`kd_nnp.data.sources.molecules.gas_labels`; a box too small raises)."""
        if gas:
            from kd_nnp.data.sources.molecules import gas_labels

            g = self.gas or GasPhase(True, None, "unknown range")
            return gas_labels(atoms, self.calculator, g.periodic, g.clearance, self.name)
        a = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        a.calc = self.calculator
        energy = float(a.get_potential_energy())
        forces = np.array(a.get_forces(), dtype=float)
        stress = np.array(a.get_stress(voigt=True), dtype=float)
        return Labels(energy, forces, stress)
