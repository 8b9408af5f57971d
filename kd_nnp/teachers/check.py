"""Load-time check of a teacher on a tiny molecular crystal.

The teacher must return a finite energy, forces of shape (N, 3) and a 6-component stress;
its forces must match central finite differences of its energy, and its stress must match
the finite-difference strain derivative ``(1/V) dE/d(strain)`` (ASE convention). This
catches teachers without stress (zero stress), stress in GPa instead of eV/A^3 (x160),
the opposite sign convention, and energies that are not the integral of the forces.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from ase import Atoms

from kd_nnp.teachers.base import TeacherCheckError

CHECK_CRYSTAL = ("test", "UREAXX02")  # urea, 16 atoms, X-ray cell: large forces and stress


def check_crystal() -> Atoms:
    """Urea (pyxtal test.db UREAXX02), deterministically rattled by 0.02 A."""
    from kd_nnp.data.sources.pyxtal_db import pyxtal_crystals

    _, atoms = pyxtal_crystals(CHECK_CRYSTAL[0], codes=[CHECK_CRYSTAL[1]])[0]
    atoms.info = {}
    rng = np.random.default_rng(0)
    atoms.positions = atoms.positions + rng.normal(scale=0.02, size=atoms.positions.shape)
    return atoms


def _energy(teacher: Any, atoms: Atoms) -> float:
    a = atoms.copy()
    a.calc = teacher.calculator
    return float(a.get_potential_energy())


def check_teacher(
    teacher: Any,
    atoms: Atoms | None = None,
    *,
    n_force: int = 3,
    dx: float = 0.01,
    deps: float = 1e-3,
    force_tol: tuple[float, float] = (0.1, 0.1),
    stress_tol: tuple[float, float] = (2e-3, 0.1),
) -> dict[str, Any]:
    """Check ``teacher`` (has ``.name``, ``.calculator``, ``.compute``); return a report.

    Tolerances are (absolute, relative): forces eV/A, stress eV/A^3. They leave room for
    float32 models (SO3LR's energy of ~-2600 eV has a resolution of ~3e-4 eV).
    Raises :class:`~kd_nnp.teachers.base.TeacherCheckError` with the reason.
    """
    t0 = time.perf_counter()
    atoms = check_crystal() if atoms is None else atoms
    name = getattr(teacher, "name", "?")

    def fail(msg: str) -> TeacherCheckError:
        return TeacherCheckError(f"teacher {name!r} refused: {msg}")

    try:
        lab = teacher.compute(atoms)
    except Exception as exc:  # noqa: BLE001 - any failure is a refusal with the reason
        raise fail(
            f"it cannot compute energy, forces and stress ({type(exc).__name__}: {exc})"
        ) from exc
    n = len(atoms)
    if lab.energy is None or not np.isfinite(lab.energy):
        raise fail(f"energy is {lab.energy}")
    if lab.forces is None or lab.forces.shape != (n, 3) or not np.all(np.isfinite(lab.forces)):
        raise fail(f"forces are missing, non-finite or of wrong shape (expected ({n}, 3))")
    if lab.stress is None or lab.stress.shape != (6,) or not np.all(np.isfinite(lab.stress)):
        raise fail("stress is missing or non-finite")

    # forces: the largest components (a sign or factor error cannot hide in the noise)
    order = np.argsort(-np.abs(lab.forces).ravel())[:n_force]
    force_rows = []
    for flat in order:
        i, c = divmod(int(flat), 3)
        e = []
        for sgn in (1, -1):
            a = atoms.copy()
            a.positions[i, c] += sgn * dx
            e.append(_energy(teacher, a))
        fd = -(e[0] - e[1]) / (2 * dx)
        f = float(lab.forces[i, c])
        force_rows.append((i, c, f, fd))
        if abs(f - fd) > force_tol[0] + force_tol[1] * abs(fd):
            raise fail(
                f"force on atom {i} component {'xyz'[c]} is {f:.4f} eV/A but the finite "
                f"difference of its energy gives {fd:.4f} eV/A"
            )

    # stress: xx, zz and the largest shear, as ASE's numerical stress does it
    vol = atoms.get_volume()
    cell = atoms.cell.array.copy()
    voigt = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    shear = 3 + int(np.argmax(np.abs(lab.stress[3:])))
    stress_rows = []
    for k in (0, 2, shear):
        i, j = voigt[k]
        e = []
        for sgn in (1, -1):
            x = np.eye(3)
            if i == j:
                x[i, i] += sgn * deps
            else:
                x[i, j] += sgn * deps
                x[j, i] += sgn * deps
            a = atoms.copy()
            a.set_cell(cell @ x, scale_atoms=True)
            e.append(_energy(teacher, a))
        fd = (e[0] - e[1]) / ((2 if i == j else 4) * deps * vol)
        s = float(lab.stress[k])
        stress_rows.append((k, s, fd))
        if abs(s - fd) > stress_tol[0] + stress_tol[1] * abs(fd):
            raise fail(
                f"stress component {'xx yy zz yz xz xy'.split()[k]} is {s:.5f} but the "
                f"finite-difference strain derivative (1/V) dE/de gives {fd:.5f} eV/A^3 "
                "(zero stress? GPa instead of eV/A^3? opposite sign convention?)"
            )
    return {
        "crystal": "/".join(CHECK_CRYSTAL),
        "n_atoms": n,
        "energy": lab.energy,
        "force_checks": [list(map(float, r)) for r in force_rows],
        "stress_checks": [list(map(float, r)) for r in stress_rows],
        "seconds": time.perf_counter() - t0,
    }
