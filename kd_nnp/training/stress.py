"""Stress conventions shared by the labels, the predictions and the Jacobians.

One eV/A^3 -> GPa constant (chgnet's digits), Voigt order (xx, yy, zz, yz, xz, xy) as ASE,
and the molecule-rigid ("molecular") stress of ``data.stress_mode=molecular``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress
from torch import Tensor

EV_PER_A3_TO_GPA = 160.21766208  # chgnet's conversion factor, kept digit for digit
# Voigt order of ase.stress (xx, yy, zz, yz, xz, xy)
VOIGT_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def full_to_voigt(s: Tensor) -> Tensor:
    """(..., 3, 3) -> (..., 6) in ASE's Voigt order: the torch (autograd) twin of
    :func:`ase.stress.full_3x3_to_voigt_6_stress` for the predictions."""
    return torch.stack([s[..., i, j] for i, j in VOIGT_PAIRS], dim=-1)


def molecule_offsets(atoms: Any) -> np.ndarray:
    """(N, 3) position of each atom relative to the geometric centre of its molecule, with
    molecules unwrapped across the cell (the centre the demo's rigid strains use).

    Raises ValueError for a covalent network that percolates through the cell."""
    from kd_nnp.data.molecules import molecule_centres

    _, pos, centres = molecule_centres(atoms)
    return pos - centres


def molecular_stress(stress: np.ndarray, forces: np.ndarray, offsets: np.ndarray,
                     volume: float) -> np.ndarray:  # fmt: skip
    """Molecule-rigid stress from a calculator's stress and forces (same units as ``stress``
    per eV/A^3: ASE's sign, Voigt (6,) in, Voigt (6,) out, symmetrised):
    ``sigma_mol = sigma + offsets^T F / V``, the derivative of the energy (per volume) along
    strains that move molecules rigidly (:func:`compute_features` with ``strain_offsets``)."""
    full = voigt_6_to_full_3x3_stress(np.asarray(stress, dtype=float))
    extra = np.asarray(offsets, dtype=float).T @ np.asarray(forces, dtype=float) / volume
    return full_3x3_to_voigt_6_stress(full + 0.5 * (extra + extra.T))
