"""Cheap structural sanity checks for experimental (CIF / CSD) organic crystals."""

from __future__ import annotations

import re

import numpy as np
from ase import Atoms

from kd_nnp.data.classify import ORGANIC_ELEMENTS


def _elements(formula: str) -> set[str]:
    found = set(re.findall(r"([A-Z][a-z]?)", formula))
    return {"H" if el in {"D", "T"} else el for el in found}  # deuterated: sites say H


def structure_issue(
    atoms: Atoms, *, formula: str | None = None, bond_scale: float = 1.2
) -> str | None:
    """Why ``atoms`` is not a usable ordered organic crystal, or None.

    Flags: no atoms; an element of the chemical ``formula`` (when known, e.g. the CIF's
    ``_chemical_formula_sum`` or pyxtal's ``mol_formula``) missing from the sites, typically
    H not resolved in the X-ray structure; a hydrogen with two covalent neighbours or atoms
    closer than 0.5 A (disordered sites written out together, e.g. both half-occupied
    positions of a carboxylic H).
    """
    from ase.neighborlist import natural_cutoffs, neighbor_list

    if len(atoms) == 0:
        return "no atoms"
    symbols = atoms.get_chemical_symbols()
    if formula:
        missing = sorted(_elements(formula) - set(symbols))
        if missing:
            return (
                f"missing {','.join(missing)}: formula {formula} but the sites are "
                f"{atoms.get_chemical_formula()} (atoms not resolved?)"
            )
    i, j, d = neighbor_list("ijd", atoms, natural_cutoffs(atoms, mult=bond_scale))
    if len(d) and d.min() < 0.5:
        k = int(np.argmin(d))
        return (
            f"disorder: atoms {i[k]} ({symbols[i[k]]}) and {j[k]} ({symbols[j[k]]}) are only "
            f"{d[k]:.2f} A apart"
        )
    counts = np.bincount(i, minlength=len(atoms))
    for a in np.where(counts > 1)[0]:
        if symbols[a] == "H" and all(s in ORGANIC_ELEMENTS for s in symbols):
            nbrs = sorted(f"{symbols[b]}{b}@{dd:.2f}" for b, dd in zip(j[i == a], d[i == a]))
            return f"disorder: H atom {a} has {counts[a]} covalent neighbours ({', '.join(nbrs)})"
    return None
