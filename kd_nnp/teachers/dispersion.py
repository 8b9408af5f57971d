"""Dispersion added to a teacher: one summed calculator for every "+ D3" teacher.

Most universal potentials are fitted to PBE (or r2SCAN) energies, which miss the van der Waals
attraction that holds molecular crystals together (pretrained CHGNet overestimates organic
cell volumes by ~20 %). Grimme's DFT-D3 correction restores it. It is added once, by
:func:`add_dispersion`, for any base calculator:

- D3: ``dftd3.ase.DFTD3(method=..., damping=...)`` with the parameters of ``method`` (the
  functional the base model imitates: PBE for MPtrj-trained models, r2SCAN for r2SCAN heads);
  the three-body (ATM) term as dftd3's default (on); dftd3 ships its parameters.
- D4 (``dftd4``) was measured and left out: 7.6 s per energy/forces/stress call on a 16-atom
  urea cell (periodic, 1 thread) against 0.02 s for D3, too slow to label or relax with.
- Periodicity follows the structure: dftd3 reads ``atoms.pbc``, so a crystal is summed
  over lattice images and a molecule with ``pbc=False`` is treated as isolated.
- Energies and forces add; stresses add in ASE's Voigt form (6 components, eV/A^3, sign of
  ``sigma = (1/V) dE/d(strain)``); :class:`DispersionSum` refuses a part that returns another
  shape instead of broadcasting it into nonsense.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from kd_nnp.teachers.base import TeacherImportError

#: dispersion model -> (python module, distribution, ASE class name)
MODELS = {"d3": ("dftd3.ase", "dftd3", "DFTD3")}


class DispersionSum(Calculator):
    """``base`` + ``dispersion``: energy, free energy, forces and Voigt stress summed."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, base: Calculator, dispersion: Calculator, label: str = "") -> None:
        super().__init__()
        self.base = base
        self.dispersion = dispersion
        self.label_text = label

    @property
    def calcs(self) -> list[Calculator]:
        """The summed parts, as in ASE's ``SumCalculator`` (code that inspects a sum's parts,
        e.g. for their cutoffs, reads this)."""
        return [self.base, self.dispersion]

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = tuple(all_changes),
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        want = {"energy", "forces", "stress"} if "stress" in properties else {"energy", "forces"}
        results: dict[str, Any] = {}
        for part in (self.base, self.dispersion):
            a = self.atoms.copy()
            got = {
                "energy": float(part.get_property("energy", a)),
                "forces": np.asarray(part.get_property("forces", a), dtype=float),
            }
            if "stress" in want:
                s = np.asarray(part.get_property("stress", a), dtype=float)
                if s.shape != (6,):
                    raise ValueError(
                        f"{type(part).__name__} returned stress of shape {s.shape}, not Voigt (6,)"
                    )
                got["stress"] = s
            for k, v in got.items():
                results[k] = results[k] + v if k in results else np.array(v, dtype=float)
        results["energy"] = float(results["energy"])
        results["free_energy"] = results["energy"]
        self.results = results


def dispersion_calculator(model: str = "d3", method: str = "PBE", damping: str = "d3bj") -> Any:
    """The ASE calculator of a D3 correction (``damping``: d3bj, d3zero, ...)."""
    if model not in MODELS:
        raise ValueError(f"dispersion model must be one of {sorted(MODELS)}, not {model!r}")
    module, dist, cls = MODELS[model]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise TeacherImportError(
            f"dispersion {model.upper()} needs the package {dist!r} ({exc}); `pip install {dist}`"
        ) from exc
    return getattr(mod, cls)(method=method, damping=damping)


def add_dispersion(
    base: Calculator, model: str = "d3", method: str = "PBE", damping: str = "d3bj"
) -> DispersionSum:
    """``base`` plus a D3 correction with the parameters of functional ``method``."""
    label = f"{model.upper()}({method}, {damping})"
    return DispersionSum(base, dispersion_calculator(model, method, damping), label)
