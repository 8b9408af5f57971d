"""Relaxation benchmark: relax experimental crystals with any ASE calculator, compare with
experiment (volume, density, cell, RMSD15), stream per-crystal JSON lines, resume.

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

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
from ase import Atoms, units
from ase.calculators.calculator import Calculator

from kd_nnp.evaluation.structures import (
    Crystal,
    connectivity_change,
    density_g_cm3,
    load_dataset,
    pyxtal_reference_cells,
)
from kd_nnp.teachers.calculators import make_calculator, method_label
from kd_nnp.utils.parallel import run_tasks
from kd_nnp.utils.provenance import environment_record

log = logging.getLogger(__name__)

RESULTS_FILE = "relax.jsonl"
BLOWN_UP_FACTOR = 1.5  # flag: relaxed volume > 1.5 x experimental (or < 1/1.5)
ABORT_FACTOR = 3.0  # stop relaxing a crystal whose volume went beyond 3 x (or below 1/3)


class _VolumeRunaway(RuntimeError):
    pass


def relax_structure(
    atoms: Atoms,
    calc: Calculator,
    *,
    fmax: float = 0.03,
    max_steps: int = 2000,
    stress_tol_gpa: float = 0.01,
    exp_cell_factor: float | None = None,
    max_rounds: int = 5,
    relax_cell: bool = True,
) -> tuple[Atoms, dict[str, Any]]:
    """Relax ``atoms`` (a copy) with LBFGS (+ ``FrechetCellFilter`` if ``relax_cell``).

    Converged means: max atomic force < ``fmax`` and (cell relaxation) max |sigma_ij| <
    ``stress_tol_gpa``, within ``max_steps`` LBFGS steps in total over all rounds.
    ``exp_cell_factor=None`` uses 1.0 (not ASE's default N_atoms). When LBFGS converged
    but stress above the threshold remains, LBFGS restarts (fresh Hessian) with the
    threshold lowered to ``0.8 * stress_tol * V / exp_cell_factor``, which guarantees it.
    """
    from ase.filters import FrechetCellFilter
    from ase.optimize import LBFGS

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
    stress = a.get_stress(voigt=False) / units.GPa
    smax = float(np.abs(stress).max())
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
        "stress_max_gpa": smax,
        "pressure_gpa": float(-np.trace(stress) / 3.0),
        "stress_gpa": stress.round(6).tolist(),
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
    """Fill ``rmsd15`` / ``rmsd15_matched`` of a record (errors recorded, not raised)."""
    from kd_nnp.evaluation.rmsd15 import rmsd15

    try:
        res = rmsd15(exp, pred, assume_same_order=True)
        rec["rmsd15"] = res.rmsd
        rec["rmsd15_matched"] = res.n_matched
    except Exception as exc:  # noqa: BLE001 - recorded per crystal
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


# ------------------------------------------------------------------ worker side
_CALCS: dict[str, Calculator] = {}


def _get_calc(spec: str) -> Calculator:
    if spec not in _CALCS:
        _CALCS[spec] = make_calculator(spec)
    return _CALCS[spec]


def _atoms_to_dict(atoms: Atoms) -> dict[str, Any]:
    return {
        "numbers": atoms.numbers.tolist(),
        "positions": atoms.positions.tolist(),
        "cell": atoms.cell.array.tolist(),
    }


def _atoms_from_dict(d: dict[str, Any]) -> Atoms:
    return Atoms(numbers=d["numbers"], positions=d["positions"], cell=d["cell"], pbc=True)


def _relax_task(item: dict[str, Any]) -> dict[str, Any]:
    """One (calculator, crystal) relaxation in a worker process."""
    import warnings

    # FrechetCellFilter's matrix log: scipy warns at ~1e-13 relative error on every step
    warnings.filterwarnings("ignore", message="logm result may be inaccurate")
    exp = _atoms_from_dict(item["atoms"])
    calc = _get_calc(item["spec"])
    pred, info = relax_structure(exp, calc, **item["params"])
    rec: dict[str, Any] = {"status": "ok", **info, **compare_structures(exp, pred)}
    if item.get("rmsd", True):
        add_rmsd15(rec, exp, pred)
    rec["final_cell"] = np.round(pred.cell.array, 6).tolist()
    rec["final_positions"] = np.round(pred.positions, 5).tolist()
    return rec


# ------------------------------------------------------------------ driver
def spec_fingerprint(spec: str) -> str:
    """What a calculator spec computes: for ``student:PATH`` the spec plus the file's content
    hash, so a retrained student at the same path never reuses the old student's results."""
    if spec.startswith("student:"):
        import hashlib

        path = Path(spec.split(":", 1)[1])
        if path.is_file():
            return f"{spec}#{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    return spec


def _is_done(rec: dict[str, Any], fingerprints: dict[str, str], params: dict[str, Any]) -> bool:
    fp = fingerprints.get(rec.get("method", ""))
    if fp is None or rec.get("spec_fingerprint", rec.get("spec")) != fp:
        return False
    return rec.get("settings", params) == params


def _as_crystals(
    structures: str | Sequence[tuple[str, Atoms]] | Sequence[Crystal], **filters: Any
) -> tuple[list[Crystal], str | None]:
    if isinstance(structures, str):
        return load_dataset(structures, **filters), structures
    out = []
    for s in structures:
        if isinstance(s, Crystal):
            out.append(s)
        else:
            cid, atoms = s
            out.append(Crystal(str(cid), atoms, "api"))
    ids = [c.id for c in out]
    if len(set(ids)) != len(ids):
        raise ValueError("structure ids must be unique")
    return out, None


def read_results(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines results file (a truncated last line from a kill is skipped)."""
    records = []
    if not path.is_file():
        return records
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: unreadable line skipped (interrupted write?)", path, lineno)
    return records


def open_append(path: Path) -> TextIO:
    """Open a JSON-lines file for appending, first ending a line cut short by a kill."""
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as fh:
            fh.seek(-1, 2)
            if fh.read(1) != b"\n":
                with path.open("a") as fa:
                    fa.write("\n")
    return path.open("a")


def run_relax_benchmark(
    structures: str | Sequence[tuple[str, Atoms]] | Sequence[Crystal],
    calculators: dict[str, str] | Sequence[str],
    out_dir: str | Path,
    *,
    workers: int = 2,
    fmax: float = 0.03,
    max_steps: int = 2000,
    stress_tol_gpa: float = 0.01,
    exp_cell_factor: float | None = None,
    limit: int | None = None,
    max_atoms: int | None = None,
    codes: Sequence[str] | None = None,
    rmsd: bool = True,
    references: bool = True,
    progress: bool = True,
    report: bool = True,
    run: bool = True,
) -> pd.DataFrame:
    """Relax every crystal with every calculator; return one row per (method, crystal).

    ``structures``: a dataset spec (``pyxtal:test``, a CIF folder; filtered by ``limit``,
    ``max_atoms``, ``codes``) or ``[(id, Atoms), ...]``. ``calculators``: ``{label: spec}``
    or a list of specs (labels from :func:`method_label`). Results stream to
    ``out_dir/relax.jsonl``; (method, crystal) pairs already there are skipped (resume).
    With ``references`` the relaxed cells stored in pyxtal's test.db are added as
    reference rows. With ``report`` the tables and parity plots are written too;
    ``run=False`` only reports what the JSON lines already hold (missing pairs are listed
    as ``status == "missing"`` failures, never dropped).
    """
    crystals, dataset = _as_crystals(structures, limit=limit, max_atoms=max_atoms, codes=codes)
    if not isinstance(calculators, dict):
        calculators = {method_label(spec): spec for spec in calculators}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = {
        "fmax": fmax,
        "max_steps": max_steps,
        "stress_tol_gpa": stress_tol_gpa,
        "exp_cell_factor": exp_cell_factor,
    }
    settings = {
        "dataset": dataset,
        "crystals": [c.id for c in crystals],
        "calculators": calculators,
        "params": params,
        "workers": workers,
    }
    with (out / "run.json").open("a") as fh:
        fh.write(json.dumps({"settings": settings, "environment": environment_record()}) + "\n")

    path = out / RESULTS_FILE
    fingerprints = {label: spec_fingerprint(spec) for label, spec in calculators.items()}
    on_disk = read_results(path)
    existing = [r for r in on_disk if not run or _is_done(r, fingerprints, params)]
    stale = len(on_disk) - len(existing)
    if stale:
        log.info("%d results in %s are from other calculators/settings: ignored", stale, path)
    done = {(r["method"], r["id"]) for r in existing}
    tasks = []
    for label, spec in calculators.items() if run else ():
        for c in crystals:
            if (label, c.id) in done:
                continue
            item = {
                "spec": spec,
                "atoms": _atoms_to_dict(c.atoms),
                "params": params,
                "rmsd": rmsd,
            }
            tasks.append(
                ((label, spec, c.id, c.source, len(c.atoms), c.atoms.get_chemical_formula()), item)
            )
    if existing:
        log.info("resuming: %d results already in %s, %d to run", len(existing), path, len(tasks))
    # longest first keeps workers busy at the end of a run
    tasks.sort(key=lambda t: -t[0][4])
    with open_append(path) as fh:
        for res in run_tasks(
            _relax_task,
            tasks,
            n_workers=workers,
            threads_per_worker=1,
            desc="relax",
            progress=progress,
        ):
            label, spec, cid, source, natoms, formula = res.key
            rec = {
                "method": label,
                "spec": spec,
                "spec_fingerprint": fingerprints[label],
                "id": cid,
                "source": source,
                "natoms": natoms,
                "formula": formula,
                "settings": params,
            }
            if res.ok:
                rec.update(res.value)
            else:
                rec.update(status="error", converged=False, error=res.error, wall_s=res.seconds)
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            existing.append(rec)

    wanted = {c.id for c in crystals}
    exp_by_id = {c.id: c.atoms for c in crystals}
    latest = {(r["method"], r["id"]): r for r in existing}  # the last record of each pair
    records = [r for r in latest.values() if r["id"] in wanted and r["method"] in calculators]
    have = {(r["method"], r["id"]) for r in records}
    for label, spec in calculators.items():
        for c in crystals:
            if (label, c.id) not in have:
                records.append(
                    {
                        "method": label,
                        "spec": spec,
                        "id": c.id,
                        "status": "missing",
                        "error": "no result in the JSON lines",
                        "converged": False,
                    }
                )
    if rmsd:
        _fill_missing_rmsd(records, exp_by_id)
    if references and dataset is not None:
        records += pyxtal_reference_cells(dataset, [c.id for c in crystals])
    df = records_to_frame(records)
    if report:
        write_report(df, out)
    return df


def _fill_missing_rmsd(records: list[dict[str, Any]], exp_by_id: dict[str, Atoms]) -> None:
    """RMSD15 for records written without it (e.g. by an older run), from stored finals."""
    for rec in records:
        if rec.get("status") != "ok" or "rmsd15" in rec or "final_positions" not in rec:
            continue
        exp = exp_by_id[rec["id"]]
        pred = Atoms(
            numbers=exp.numbers, positions=rec["final_positions"], cell=rec["final_cell"], pbc=True
        )
        add_rmsd15(rec, exp, pred)


DROP_COLUMNS = (
    "final_cell",
    "final_positions",
    "stress_gpa",
    "settings",
    "round_fmax",
    "exp_cell_factors",
)


def records_to_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in records:
        row = {k: v for k, v in r.items() if k not in DROP_COLUMNS}
        row.setdefault("reference", False)
        row["failure"] = "; ".join(failure_reasons(r))
        rows.append(row)
    df = pd.DataFrame(rows)
    if "reference" in df:
        df["reference"] = df["reference"].fillna(False).astype(bool)
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method: how many crystals, failures, and error statistics.

    Error statistics cover the crystals whose relaxation finished (``status == ok``,
    converged or not; ``n_covered`` says how many); failures (errors, not converged,
    broken/merged molecules, blown-up volume) are counted in ``n_failures``."""
    rows = []
    for method, g in df.groupby("method", sort=False):
        ok = g[g["status"] == "ok"]
        row: dict[str, Any] = {
            "method": method,
            "reference": bool(g["reference"].iloc[0]) if "reference" in g else False,
            "n_crystals": len(g),
            "n_covered": len(ok),
            "n_errors": int((g["status"] != "ok").sum()),
            "n_failures": int((g["failure"] != "").sum()),
            "n_not_converged": int((ok.get("converged", pd.Series(dtype=bool)) == False).sum()),  # noqa: E712
        }
        for flag in ("molecule_broken", "molecule_merged", "volume_blown_up"):
            row[f"n_{flag}"] = int(ok[flag].fillna(False).astype(bool).sum()) if flag in ok else 0
        v = ok["vol_err_pct"].astype(float) if len(ok) else pd.Series(dtype=float)
        row["vol_mean_pct"] = v.mean()
        row["vol_mae_pct"] = v.abs().mean()
        row["vol_median_pct"] = v.median()
        row["vol_median_abs_pct"] = v.abs().median()
        row["density_mae"] = ok["density_err"].astype(float).abs().mean() if len(ok) else math.nan
        row["density_mean"] = ok["density_err"].astype(float).mean() if len(ok) else math.nan
        for name in ("a", "b", "c"):
            col = f"{name}_err_pct"
            row[f"{name}_mae_pct"] = ok[col].astype(float).abs().mean() if col in ok else math.nan
        for name in ("alpha", "beta", "gamma"):
            col = f"{name}_err_deg"
            row[f"{name}_mae_deg"] = ok[col].astype(float).abs().mean() if col in ok else math.nan
        if "rmsd15" in ok:
            r = pd.to_numeric(ok["rmsd15"], errors="coerce")
            row["rmsd15_mean"] = r.mean()
            row["rmsd15_median"] = r.median()
            row["n_rmsd15"] = int(r.notna().sum())
            m = pd.to_numeric(ok.get("rmsd15_matched"), errors="coerce")
            row["rmsd15_matched_mean"] = m.mean()
        for col in ("steps", "wall_s", "stress_max_gpa"):
            row[f"{col}_mean"] = ok[col].astype(float).mean() if col in ok else math.nan
        if "stress_max_gpa" in ok:
            row["stress_max_gpa_max"] = ok["stress_max_gpa"].astype(float).max()
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out = out.sort_values(["reference", "method"], kind="stable").reset_index(drop=True)
    return out


def paired_volume_distance(df: pd.DataFrame, method: str, reference: str) -> dict[str, Any]:
    """How far ``method`` sits from ``reference`` crystal by crystal: mean |dV_m - dV_ref| (%).

    ``dV`` is each method's volume error against experiment; only crystals that both
    relaxed (``status == ok``) count (``n``). A student that copies its teacher scores 0
    whatever the teacher's own error; this is the distillation's own figure of merit.
    """
    ok = df[df["status"] == "ok"]
    a = ok[ok["method"] == method].set_index("id")["vol_err_pct"].astype(float)
    b = ok[ok["method"] == reference].set_index("id")["vol_err_pct"].astype(float)
    both = a.index.intersection(b.index)
    diff = (a[both] - b[both]).sort_index()
    return {
        "method": method,
        "reference": reference,
        "n": int(len(both)),
        "mean_abs_pct": float(diff.abs().mean()) if len(both) else math.nan,
        "mean_pct": float(diff.mean()) if len(both) else math.nan,
        "per_crystal_pct": {str(k): float(v) for k, v in diff.items()},
    }


_MD_SUMMARY = [
    ("method", "method"),
    ("n_covered", "n"),
    ("n_failures", "fail"),
    ("vol_mae_pct", "V MAE %"),
    ("vol_mean_pct", "V mean %"),
    ("vol_median_pct", "V med %"),
    ("density_mae", "rho MAE g/cm3"),
    ("a_mae_pct", "a %"),
    ("b_mae_pct", "b %"),
    ("c_mae_pct", "c %"),
    ("alpha_mae_deg", "alpha deg"),
    ("beta_mae_deg", "beta deg"),
    ("gamma_mae_deg", "gamma deg"),
    ("rmsd15_mean", "RMSD15 A"),
    ("rmsd15_matched_mean", "matched/15"),
    ("steps_mean", "steps"),
    ("wall_s_mean", "s/crystal"),
    ("stress_max_gpa_max", "max |sigma| GPa"),
]


def _md_table(df: pd.DataFrame, cols: Sequence[tuple[str, str]], floatfmt: str = "{:.3g}") -> str:
    cols = [(c, h) for c, h in cols if c in df]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = []
        for c, _ in cols:
            v = r[c]
            if isinstance(v, float | np.floating):
                cells.append("" if not np.isfinite(v) else floatfmt.format(v))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv`` (per crystal), ``summary.csv`` and parity plots
    ``parity_volume.png`` / ``parity_density.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summ = summarize(df)
    paths = {
        "table_csv": out / "table.csv",
        "summary_csv": out / "summary.csv",
        "table_md": out / "table.md",
    }
    df.to_csv(paths["table_csv"], index=False)
    summ.to_csv(paths["summary_csv"], index=False)
    md = ["# Relaxation benchmark", ""]
    md.append(
        "Errors are predicted minus experimental; statistics cover the `n` crystals whose "
        "relaxation finished (converged or not). `fail` counts errors, non-converged runs, "
        "broken/merged molecules and blown-up volumes (listed below). Rows marked "
        "*(test.db)* are the relaxed cells stored in pyxtal's test.db (volume and density only)."
    )
    md += ["", _md_table(summ, _MD_SUMMARY), ""]
    fails = df[df["failure"] != ""]
    md += ["## Failures", ""]
    if len(fails):
        md += ["| method | crystal | reason |", "|---|---|---|"]
        md += [f"| {r.method} | {r.id} | {r.failure} |" for r in fails.itertuples()]
    else:
        md.append("none")
    md += ["", "## Per crystal", ""]
    per = df[~df["reference"]] if "reference" in df else df
    md.append(
        _md_table(
            per,
            [
                ("method", "method"),
                ("id", "crystal"),
                ("natoms", "atoms"),
                ("vol_err_pct", "V err %"),
                ("density_err", "rho err"),
                ("rmsd15", "RMSD15"),
                ("rmsd15_matched", "matched"),
                ("steps", "steps"),
                ("wall_s", "s"),
                ("stress_max_gpa", "|sigma| GPa"),
                ("converged", "conv"),
                ("failure", "flags"),
            ],
        )
    )
    paths["table_md"].write_text("\n".join(md) + "\n")
    ok = df[df["status"] == "ok"] if len(df) else df
    for quantity, (xcol, ycol, unit) in {
        "volume": ("volume_exp", "volume_pred", "A^3"),
        "density": ("density_exp", "density_pred", "g/cm^3"),
    }.items():
        p = out / f"parity_{quantity}.png"
        parity_plot(ok, xcol, ycol, f"{quantity} ({unit})", p)
        paths[f"parity_{quantity}"] = p
    return paths


def parity_plot(df: pd.DataFrame, xcol: str, ycol: str, label: str, path: Path) -> None:
    """Predicted vs experimental, one panel per method, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(df["method"])) if len(df) else []
    n = max(len(methods), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.5), squeeze=False)
    if len(df):
        vals = pd.concat([df[xcol], df[ycol]]).astype(float)
        lo, hi = np.nanmin(vals), np.nanmax(vals)
        pad = 0.05 * (hi - lo + 1e-9)
        lo, hi = lo - pad, hi + pad
    else:
        lo, hi = 0.0, 1.0
    for ax, method in zip(axes[0], methods or ["(no data)"]):
        g = df[df["method"] == method] if methods else df
        if len(g):
            x, y = g[xcol].astype(float), g[ycol].astype(float)
            ax.scatter(x, y, s=14, alpha=0.8)
            mae = np.mean(np.abs(y / x - 1.0)) * 100
            ax.set_title(f"{method}\nn={len(g)}  MAPE={mae:.1f}%", fontsize=9)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel(f"experimental {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
