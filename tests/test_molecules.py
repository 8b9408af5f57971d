"""The one molecule finder (kd_nnp.data.molecules): kinds and counts per crystal, isolation."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from kd_nnp.data.molecules import (
    distinct_molecules,
    graph_key,
    image_clearance,
    isolate,
    molecule_labels,
)
from kd_nnp.data.sources.pyxtal_db import checked_crystals


@pytest.fixture(scope="module")
def crystals():
    return dict(checked_crystals("test", max_atoms=60))


def test_distinct_molecules_of_a_one_component_crystal(crystals):
    code, atoms = next(iter(crystals.items()))
    kinds = distinct_molecules(atoms)
    assert len(kinds) == 1, code
    (k,) = kinds
    assert k.count * len(k.symbols) == len(atoms)
    labels, _ = molecule_labels(atoms)
    assert k.count == len(np.unique(labels))
    # whole: the molecule taken from the crystal has the same graph in a big box
    assert graph_key(k.symbols, k.positions) == k.key
    boxed = isolate(k.symbols, k.positions, clearance=8.0)
    assert len(distinct_molecules(boxed)) == 1


def test_distinct_molecules_counts_each_kind():
    water, nh3 = molecule("H2O"), molecule("NH3")
    pos = np.vstack([water.positions, water.positions + [6, 0, 0], nh3.positions + [0, 6, 0]])
    syms = water.get_chemical_symbols() * 2 + nh3.get_chemical_symbols()
    cell = Atoms(syms, pos + 2.0, cell=[12.0] * 3, pbc=True)
    kinds = {
        k.symbols.count("O") and "water" or "ammonia": k.count for k in distinct_molecules(cell)
    }
    assert kinds == {"water": 2, "ammonia": 1}


def test_isolate_gives_the_asked_clearance():
    benzene = molecule("C6H6")
    for clearance in (6.0, 12.5):
        boxed = isolate(benzene.get_chemical_symbols(), benzene.positions, clearance)
        assert image_clearance(boxed) >= clearance
        assert image_clearance(boxed) < clearance + 1.0  # not wastefully large
        assert np.allclose(boxed.get_all_distances(), benzene.get_all_distances())
    assert image_clearance(Atoms("H2", [[0, 0, 0], [0, 0, 0.74]])) == float("inf")


def test_isolate_refuses_what_is_not_one_molecule():
    two = Atoms("H2H2", [[0, 0, 0], [0, 0, 0.74], [5, 0, 0], [5, 0, 0.74]])
    with pytest.raises(ValueError, match="not one bonded molecule"):
        isolate(two.get_chemical_symbols(), two.positions, 6.0)


def test_image_clearance_in_a_skewed_cell():
    # one atom in a strongly sheared cell: the nearest image is not along a cell vector
    a = Atoms("C", [[0, 0, 0]], cell=[[10, 0, 0], [9.5, 3, 0], [0, 0, 10]], pbc=True)
    expected = min(
        np.linalg.norm(i * a.cell[0] + j * a.cell[1] + k * a.cell[2])
        for i in range(-2, 3)
        for j in range(-2, 3)
        for k in range(-2, 3)
        if (i, j, k) != (0, 0, 0)
    )
    assert image_clearance(a) == pytest.approx(expected)
