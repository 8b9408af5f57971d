"""RMSD15 (COMPACK-style cluster comparison) on real test.db crystals."""

from __future__ import annotations

import numpy as np
import pytest

from kd_nnp.evaluation.rmsd15 import kabsch, rmsd15
from kd_nnp.evaluation.structures import load_dataset


@pytest.fixture(scope="module")
def crystals():
    # FORMAM: 1 molecule type, Z=4; KONTIQ: gallic acid + water (2 types)
    return {c.id: c.atoms for c in load_dataset("pyxtal:test", codes=["FORMAM", "KONTIQ"])}


def _rg(x: np.ndarray) -> float:
    return float(np.sqrt(((x - x.mean(axis=0)) ** 2).sum(axis=1).mean()))


def test_kabsch_recovers_rotation():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(10, 3))
    q_, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rot = q_ * np.sign(np.linalg.det(q_))
    q = p @ rot.T + np.array([1.0, -2.0, 0.5])
    r, t = kabsch(p, q)
    assert np.allclose(p @ r.T + t, q, atol=1e-10)


@pytest.mark.parametrize("code", ["FORMAM", "KONTIQ"])
def test_identical_structures_give_zero(crystals, code):
    res = rmsd15(crystals[code], crystals[code])
    assert res.n_matched == 15
    assert res.rmsd < 1e-8


@pytest.mark.parametrize("code", ["FORMAM", "KONTIQ"])
def test_rigid_motion_and_reordered_atoms_give_zero(crystals, code):
    a = crystals[code]
    b = a.copy()
    b.rotate(33, "x", rotate_cell=True)
    b.rotate(-71, "z", rotate_cell=True)
    b.translate([1.3, -2.2, 0.7])
    b.wrap()
    res = rmsd15(a, b)
    assert res.n_matched == 15 and res.rmsd < 1e-6
    perm = np.random.default_rng(1).permutation(len(a))
    res = rmsd15(a, b[perm])
    assert res.n_matched == 15 and res.rmsd < 1e-6


@pytest.mark.parametrize("scale", [1.02, 0.97])
def test_isotropic_strain_gives_expected_value(crystals, scale):
    """Scaling everything by s: the best superposition is the identity rotation with
    centroids overlaid, so RMSD = |s - 1| x radius of gyration of the matched atoms."""
    a = crystals["FORMAM"]
    b = a.copy()
    b.set_cell(a.cell * scale, scale_atoms=True)
    res = rmsd15(a, b)
    assert res.n_matched == 15
    expected = abs(scale - 1.0) * _rg(res.ref_coords)
    assert expected > 0.05
    assert res.rmsd == pytest.approx(expected, rel=1e-6)
    # the same order shortcut gives the same answer
    res2 = rmsd15(a, b, assume_same_order=True)
    assert res2.rmsd == pytest.approx(expected, rel=1e-6)


def test_reordered_strained_structure_matches(crystals):
    a = crystals["KONTIQ"]
    b = a.copy()
    b.set_cell(a.cell * 1.02, scale_atoms=True)
    perm = np.random.default_rng(2).permutation(len(a))
    res = rmsd15(a, b[perm])
    ref = rmsd15(a, b, assume_same_order=True)
    assert res.n_matched == 15
    assert res.rmsd == pytest.approx(ref.rmsd, rel=1e-6)


def test_shear_strain_is_nonzero_and_counted(crystals):
    """A 10 % shear moves far molecules more than 1 A: fewer than 15 match or RMSD grows."""
    a = crystals["FORMAM"]
    b = a.copy()
    cell = a.cell.array.copy()
    f = np.eye(3)
    f[0, 1] = 0.10
    b.set_cell(cell @ f.T, scale_atoms=True)
    res = rmsd15(a, b)
    assert res.rmsd > 0.1
    assert 1 <= res.n_matched <= 15


def test_hydrogens_excluded(crystals):
    """Moving only H atoms leaves RMSD15 at zero (non-H atoms only)."""
    a = crystals["FORMAM"]
    b = a.copy()
    h = b.numbers == 1
    b.positions[h] += 0.05
    assert rmsd15(a, b).rmsd < 1e-8


def test_a_defect_in_rmsd15_is_raised_not_recorded_as_a_missing_value(monkeypatch):
    """Regression: add_rmsd15 caught every exception, so a broken import inside RMSD15 (it
    happened when the molecule finder moved) silently left every crystal without RMSD15.
    Only structures RMSD15 cannot compare (ValueError) are recorded per crystal."""
    from ase import Atoms

    from kd_nnp.evaluation import rmsd15 as mod
    from kd_nnp.evaluation.protocol import add_rmsd15

    def broken(*a, **k):
        raise ImportError("cannot import name 'bond_cutoffs'")

    monkeypatch.setattr(mod, "rmsd15", broken)
    a = Atoms("H2", [[0, 0, 0], [0, 0, 0.74]], cell=[8, 8, 8], pbc=True)
    with pytest.raises(ImportError):
        add_rmsd15({}, a, a)

    def cannot(*a, **k):
        raise ValueError("no molecules with heavy atoms found")

    monkeypatch.setattr(mod, "rmsd15", cannot)
    rec: dict = {}
    add_rmsd15(rec, a, a)
    assert rec["rmsd15"] is None and "no molecules" in rec["rmsd15_error"]
