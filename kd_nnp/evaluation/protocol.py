"""Relaxation protocol: relax one crystal with any ASE calculator and compare it with
experiment (volume, density, cell, connectivity, RMSD15).

Protocol (paper): LBFGS on a ``FrechetCellFilter``, fmax 0.03 eV/A, at most 2000 steps. The
filter's cell "forces" are ``-V sigma / exp_cell_factor``; with ASE's default
``exp_cell_factor = N_atoms`` a converged fmax of 0.03 eV/A still allows
``|sigma| ~ 0.03 N / V`` (~0.5 GPa for organic crystals), which biases the volume. Here
``exp_cell_factor = 1`` (cell forces = V sigma, in eV), and convergence also requires
``max |sigma_ij| < stress_tol``: if LBFGS converged with more stress left (small cells),
it restarts (fresh Hessian) with fmax lowered to ``0.8 stress_tol V``, which implies the
stress criterion. A factor below 1 would also imply it but makes LBFGS's 0.2 max step a
log-strain step of 0.2/factor (urea blew up to 7.5 x its volume). See docs/evaluation.md.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator

from kd_nnp.data.molecules import connectivity_change, molecule_centres
from kd_nnp.evaluation.settings import RelaxSettings
from kd_nnp.evaluation.structures import density_g_cm3

VOLUME_SPREAD_STRAIN = 0.01  # relative volume step of the committee's bulk-modulus estimate
BLOWN_UP_FACTOR = 1.5  # flag: relaxed volume > 1.5 x experimental (or < 1/1.5)
ABORT_FACTOR = 3.0  # stop relaxing a crystal whose volume went beyond 3 x (or below 1/3)


class _VolumeRunaway(RuntimeError):
    pass


def relax_structure(
    atoms: Atoms,
    calc: Calculator,
    settings: RelaxSettings | None = None,
    *,
    max_rounds: int = 5,
    relax_cell: bool = True,
) -> tuple[Atoms, dict[str, Any]]:
    """Relax ``atoms`` (a copy) with LBFGS (+ ``FrechetCellFilter`` if ``relax_cell``).

    Converged means: max atomic force < ``fmax`` and (cell relaxation) max |sigma_ij| <
    ``stress_tol_gpa``, within ``max_steps`` LBFGS steps in total over all rounds
    (``settings``, default :class:`RelaxSettings`). ``exp_cell_factor=None`` uses 1.0 (not
    ASE's default N_atoms). When LBFGS converged
    but stress above the threshold remains, LBFGS restarts (fresh Hessian) with the
    threshold lowered to ``0.8 * stress_tol * V / exp_cell_factor``, which guarantees it.
    """
    from ase.filters import FrechetCellFilter
    from ase.optimize import LBFGS

    s = settings or RelaxSettings()
    fmax, max_steps, stress_tol_gpa = s.fmax, s.max_steps, s.stress_tol_gpa
    exp_cell_factor = s.exp_cell_factor
    a = atoms.copy()
    a.calc = calc
    v0 = a.get_volume()
    tol = stress_tol_gpa * units.GPa  # eV/A^3
    ecf = 1.0 if exp_cell_factor is None else float(exp_cell_factor)
    steps = 0
    rounds = 0
    round_fmax: list[float] = []
    f_round = fmax
    aborted = False
    t0 = time.perf_counter()
    while steps < max_steps and rounds < max_rounds:
        rounds += 1
        round_fmax.append(f_round)
        target: Any = FrechetCellFilter(a, exp_cell_factor=ecf) if relax_cell else a
        opt = LBFGS(target, logfile=None)

        def _guard(atoms_: Atoms = a) -> None:
            ratio = atoms_.get_volume() / v0
            if ratio > ABORT_FACTOR or ratio < 1.0 / ABORT_FACTOR:
                raise _VolumeRunaway(f"volume ratio {ratio:.2f}")

        if relax_cell:
            opt.attach(_guard, interval=1)
        try:
            opt_ok = opt.run(fmax=f_round, steps=max_steps - steps)
        except _VolumeRunaway:
            aborted, opt_ok = True, False
        steps += opt.nsteps
        if not opt_ok:
            break
        f_ok = _max_force(a) < fmax
        s_ok = (not relax_cell) or float(np.abs(a.get_stress(voigt=False)).max()) < tol
        if f_ok and s_ok:
            break
        # the filter converged but stress is left: a cell-force threshold below
        # stress_tol * V / exp_cell_factor guarantees max |sigma_ij| < stress_tol
        f_round = min(f_round, 0.8 * tol * a.get_volume() / ecf)
    wall = time.perf_counter() - t0
    fmax_final = _max_force(a)
    # an isolated molecule without periodic boundary conditions has no cell and no stress
    stress = a.get_stress(voigt=False) / units.GPa if a.pbc.any() else None
    smax = float(np.abs(stress).max()) if stress is not None else math.nan
    converged = (
        not aborted
        and fmax_final < fmax
        and (not relax_cell or smax < stress_tol_gpa)
        and steps <= max_steps
    )
    info = {
        "converged": bool(converged),
        "aborted_volume_runaway": aborted,
        "steps": int(steps),
        "rounds": rounds,
        "exp_cell_factor": ecf,
        "round_fmax": round_fmax,
        "wall_s": wall,
        "s_per_step": wall / max(steps, 1),
        "fmax_final": float(fmax_final),
        "stress_max_gpa": smax if stress is not None else None,
        "pressure_gpa": float(-np.trace(stress) / 3.0) if stress is not None else None,
        "stress_gpa": stress.round(6).tolist() if stress is not None else None,
        "energy": float(a.get_potential_energy()),
    }
    return a, info


def _max_force(a: Atoms) -> float:
    f = a.get_forces()
    return float(np.sqrt((f**2).sum(axis=1)).max()) if len(f) else 0.0


def compare_structures(exp: Atoms, pred: Atoms) -> dict[str, Any]:
    """Errors of a relaxed crystal vs its experimental structure (same atom order)."""
    v_e, v_p = exp.get_volume(), pred.get_volume()
    rho_e, rho_p = density_g_cm3(exp), density_g_cm3(pred)
    par_e, par_p = exp.cell.cellpar(), pred.cell.cellpar()
    out: dict[str, Any] = {
        "volume_exp": v_e,
        "volume_pred": v_p,
        "vol_err_pct": 100.0 * (v_p / v_e - 1.0),
        "abs_vol_err_pct": abs(100.0 * (v_p / v_e - 1.0)),
        "density_exp": rho_e,
        "density_pred": rho_p,
        "density_err": rho_p - rho_e,
    }
    for k, name in enumerate(("a", "b", "c")):
        out[f"{name}_exp"] = par_e[k]
        out[f"{name}_pred"] = par_p[k]
        out[f"{name}_err_pct"] = 100.0 * (par_p[k] / par_e[k] - 1.0)
    for k, name in enumerate(("alpha", "beta", "gamma")):
        out[f"{name}_exp"] = par_e[3 + k]
        out[f"{name}_pred"] = par_p[3 + k]
        out[f"{name}_err_deg"] = par_p[3 + k] - par_e[3 + k]
    ratio = v_p / v_e
    out["volume_blown_up"] = bool(ratio > BLOWN_UP_FACTOR or ratio < 1.0 / BLOWN_UP_FACTOR)
    out.update(connectivity_change(exp, pred))
    return out


def add_rmsd15(rec: dict[str, Any], exp: Atoms, pred: Atoms) -> None:
    """Fill ``rmsd15`` / ``rmsd15_matched`` of a record. A structure RMSD15 cannot compare
    (ValueError: no molecules with heavy atoms, a covalent network) is recorded per crystal
    (``rmsd15_error``); anything else is a defect and is raised, not hidden in the table."""
    from kd_nnp.evaluation.rmsd15 import rmsd15

    try:
        res = rmsd15(exp, pred, assume_same_order=True)
        rec["rmsd15"] = res.rmsd
        rec["rmsd15_matched"] = res.n_matched
    except ValueError as exc:  # recorded per crystal
        rec["rmsd15"] = None
        rec["rmsd15_matched"] = 0
        rec["rmsd15_error"] = f"{type(exc).__name__}: {exc}"


def failure_reasons(rec: dict[str, Any]) -> list[str]:
    """Why a record counts as a failure (empty list: success)."""
    if rec.get("status") != "ok":
        return [f"error: {str(rec.get('error', '?')).splitlines()[0]}"]
    out = []
    if not rec.get("converged", False):
        out.append("not converged")
    if rec.get("molecule_broken"):
        out.append("molecule broken")
    if rec.get("molecule_merged"):
        out.append("molecules merged")
    if rec.get("volume_blown_up"):
        out.append("volume blown up")
    return out


def committee_volume_spread(pred: Atoms, calc: Any) -> dict[str, Any]:
    """Volume uncertainty of a crystal relaxed with a committee (``calc``: a
    :class:`~kd_nnp.teachers.committee.CommitteeCalculator`), from three single points.

    Each head k has a residual pressure ``P_k`` at the committee's relaxed cell; relaxing with
    that head alone would change the volume by ``dV_k / V = P_k / B`` to first order (B: the
    bulk modulus). ``P_k`` is the *molecular* pressure (molecules moved rigidly with the
    cell: ASE stress plus ``sum_i o_i . F_ki / (3V)``, ``o_i`` the offset of atom i from its
    molecule's centre), and B is the committee mean's, ``-dP/dlnV`` by central differences
    at volumes ``(1 +- VOLUME_SPREAD_STRAIN) V`` with rigid molecules: the response of a
    molecular crystal's cell, which the covalent bonds would stiffen if stretched with it.
    Returns ``volume_std_pct`` (100 x std over heads of ``dV_k / V``, None when B <= 0),
    ``head_volume_shift_pct``, ``pressure_std_gpa``, ``bulk_modulus_gpa``,
    ``committee_size``.
    """
    from ase import units

    _, pos, centres = molecule_centres(pred)
    offsets = pos - centres
    pressures = {}
    for step in (-1, 0, 1):
        scale = (1.0 + step * VOLUME_SPREAD_STRAIN) ** (1.0 / 3.0)
        a = pred.copy()
        a.set_cell(pred.cell.array * scale, scale_atoms=False)
        a.positions = centres * scale + offsets
        a.calc = calc
        calc.calculate(a, ["energy", "forces", "stress", "stresses", "forces_std"])
        res = calc.results
        trace = res["stresses"][:, :3].sum(axis=1)  # (K,) eV/A^3
        rigid = np.einsum("ij,kij->k", offsets, res["head_forces"]) / a.get_volume()
        pressures[step] = -(trace + rigid) / 3.0
    p0 = pressures[0]
    bulk = -(pressures[1].mean() - pressures[-1].mean()) / (2.0 * VOLUME_SPREAD_STRAIN)
    shifts = 100.0 * p0 / bulk if bulk > 0 else None
    return {
        "committee_size": int(len(p0)),
        "bulk_modulus_gpa": float(bulk / units.GPa),
        "pressure_std_gpa": float(p0.std() / units.GPa),
        "head_volume_shift_pct": None if shifts is None else [float(x) for x in shifts],
        "volume_std_pct": None if shifts is None else float(shifts.std()),
    }
