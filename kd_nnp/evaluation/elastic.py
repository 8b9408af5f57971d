"""Elastic benchmark: relax, stiffness tensor from finite strains, moduli vs experiment.

Moduli follow the paper's Experimental section (and its public code, takuyhaa/
NNP-Modulus-MolecularCrystal ``utility.py``): from C (GPa, Voigt 6x6) and S = C^-1,

- K_V = sum_{i,j<=3} C_ij / 9;  K_R = 1 / sum_{i,j<=3} S_ij
- G_V = [(C11+C22+C33) - (C12+C23+C31) + 3 (C44+C55+C66)] / 15
- G_R = 15 / [4 (S11+S22+S33) - 4 (S12+S23+S31) + 3 (S44+S55+S66)]
- E_X = 9 K_X G_X / (3 K_X + G_X) (i.e. 1/E = 1/(3G) + 1/(9K)) for X = V, R
- Hill: K_H = (K_V+K_R)/2, G_H = (G_V+G_R)/2, E_H = (E_V+E_R)/2;
  RH (mean of Reuss and Hill): K_RH = (K_R+K_H)/2, G_RH, E_RH likewise
- Poisson ratio nu = (1 - 3 G_H / (3 K_H + G_H)) / 2 (Hill averages)
- anisotropy A = sqrt(ln(K_V/K_R)^2 + 5 ln(G_V/G_R)^2)

A crystal whose K_V, K_R, G_V, G_R, E_V or E_R is negative (or not finite) is excluded from
the MAE and counted. The stiffness tensor comes from symmetric +/- normal and shear strains
(ions relaxed at fixed strained cell) fitted by pymatgen's
``ElasticTensor.from_independent_strains`` (linear fit of stress vs strain per component).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ase import Atoms, units
from ase.calculators.calculator import Calculator

from kd_nnp.evaluation.protocol import compare_structures, relax_structure
from kd_nnp.evaluation.report import md_table
from kd_nnp.evaluation.runner import (
    Structure,
    atoms_from_dict,
    get_calc,
    label_calculators,
    latest,
    run_jobs,
)
from kd_nnp.evaluation.settings import ElasticSettings
from kd_nnp.evaluation.structures import read_cif
from kd_nnp.utils.paths import shared_data_dir
from kd_nnp.utils.provenance import environment_record

log = logging.getLogger(__name__)

MODULI = (
    "E_V", "E_R", "E_H", "E_RH", "K_V", "K_R", "K_H", "K_RH",
    "G_V", "G_R", "G_H", "G_RH", "nu", "A",
)  # fmt: skip
RESULTS_FILE = "elastic.jsonl"


# ------------------------------------------------------------------ moduli
def moduli_from_stiffness(c: np.ndarray) -> dict[str, float]:
    """Averaged moduli (GPa), Poisson ratio and anisotropy of a 6x6 Voigt stiffness (GPa)."""
    c = np.asarray(c, dtype=np.float64)
    if c.shape != (6, 6):
        raise ValueError(f"stiffness must be 6x6, got {c.shape}")
    s = np.linalg.inv(c)
    k_v = c[:3, :3].sum() / 9.0
    k_r = 1.0 / s[:3, :3].sum()
    g_v = (np.trace(c[:3, :3]) - (c[0, 1] + c[1, 2] + c[2, 0]) + 3 * np.trace(c[3:, 3:])) / 15.0
    g_r = 15.0 / (
        4 * np.trace(s[:3, :3]) - 4 * (s[0, 1] + s[1, 2] + s[2, 0]) + 3 * np.trace(s[3:, 3:])
    )

    def young(k: float, g: float) -> float:
        return 9.0 * k * g / (3.0 * k + g)

    e_v, e_r = young(k_v, g_v), young(k_r, g_r)
    k_h, g_h, e_h = (k_v + k_r) / 2, (g_v + g_r) / 2, (e_v + e_r) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        aniso = math.sqrt(np.log(k_v / k_r) ** 2 + 5 * np.log(g_v / g_r) ** 2)
    return {
        "E_V": e_v, "E_R": e_r, "E_H": e_h, "E_RH": (e_r + e_h) / 2,
        "K_V": k_v, "K_R": k_r, "K_H": k_h, "K_RH": (k_r + k_h) / 2,
        "G_V": g_v, "G_R": g_r, "G_H": g_h, "G_RH": (g_r + g_h) / 2,
        "nu": 0.5 * (1.0 - 3.0 * g_h / (3.0 * k_h + g_h)),
        "A": aniso,
    }  # fmt: skip


def has_negative_moduli(m: dict[str, float]) -> bool:
    """True when a Voigt/Reuss modulus is negative or not finite (paper: excluded)."""
    keys = ("K_V", "K_R", "G_V", "G_R", "E_V", "E_R")
    return any(not np.isfinite(m[k]) or m[k] <= 0 for k in keys)


# ------------------------------------------------------------------ fitting
def strained_copy(atoms: Atoms, voigt_strain: Sequence[float]) -> Atoms:
    """``atoms`` deformed by a (pymatgen, engineering-shear) Voigt strain, atoms scaled."""
    from pymatgen.analysis.elasticity.strain import Strain

    strain = Strain.from_voigt(list(voigt_strain))
    defo = np.asarray(strain.get_deformation_matrix())
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ defo.T, scale_atoms=True)
    return out


def fit_stiffness(
    atoms: Atoms,
    calc: Calculator,
    strains: Sequence[float] = (0.005, 0.01),
    *,
    ion_fmax: float = 0.01,
    max_steps: int = 500,
    relax_ions: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Stiffness tensor (GPa, 6x6 Voigt) of a relaxed structure by finite strains.

    For each of the 6 Voigt components and each magnitude ``e`` in ``strains``, the cell
    is strained by ``+e`` and ``-e``, ions are relaxed (LBFGS, ``ion_fmax``), and the
    stresses are fitted with ``ElasticTensor.from_independent_strains`` (stress positive in
    tension, ASE's sign). Returns the symmetrised tensor and fit details.
    """
    from ase.optimize import LBFGS
    from pymatgen.analysis.elasticity import ElasticTensor
    from pymatgen.analysis.elasticity.strain import Strain
    from pymatgen.analysis.elasticity.stress import Stress

    ref = atoms.copy()
    ref.calc = calc
    eq = Stress(ref.get_stress(voigt=False) / units.GPa)
    pm_strains, pm_stresses = [], []
    steps, unconverged = 0, 0
    for comp in range(6):
        for mag in strains:
            for sign in (1.0, -1.0):
                vs = np.zeros(6)
                vs[comp] = sign * mag
                a = strained_copy(atoms, vs)
                a.calc = calc
                if relax_ions:
                    opt = LBFGS(a, logfile=None)
                    ok = opt.run(fmax=ion_fmax, steps=max_steps)
                    steps += opt.nsteps
                    unconverged += int(not ok)
                pm_strains.append(Strain.from_voigt(list(vs)))
                pm_stresses.append(Stress(a.get_stress(voigt=False) / units.GPa))
    et = ElasticTensor.from_independent_strains(pm_strains, pm_stresses, eq_stress=eq, vasp=False)
    c = np.asarray(et.voigt, dtype=np.float64)
    asym = float(np.abs(c - c.T).max())
    c = 0.5 * (c + c.T)
    return c, {
        "ion_steps": steps,
        "n_strained": len(pm_strains),
        "n_ion_unconverged": unconverged,
        "asymmetry_gpa": asym,
        "eq_stress_gpa": float(np.abs(np.asarray(eq)).max()),
    }


# ------------------------------------------------------------------ reference data
def load_reference_tensors(csv_path: str | Path) -> pd.DataFrame:
    """Reference tensors per compound from ``stiffness_tensors_rev.csv``.

    Returns one row per (compound, method) with ``method`` in ``Exp`` (element-wise mean of
    all experimental sources of the compound; ``n_sources`` says how many) and ``NNP``
    (PFP), ``C`` the 6x6 array, and the moduli. Compound names are stripped and compared
    case-insensitively (``compound_key``)."""
    path = Path(csv_path)
    df = pd.read_csv(path)
    cols = [f"C{i}{j}" for i in range(1, 7) for j in range(1, 7)]
    missing = [c for c in ["Compound", "Method", *cols] if c not in df]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    df["compound_key"] = df["Compound"].astype(str).str.strip().str.lower()
    rows = []
    for (key, method), g in df.groupby(["compound_key", "Method"], sort=True):
        if method not in ("Exp", "NNP"):
            continue
        mats = g[cols].to_numpy(dtype=float).reshape(-1, 6, 6)
        c = mats.mean(axis=0)
        row: dict[str, Any] = {
            "compound_key": key,
            "compound": str(g["Compound"].iloc[0]).strip(),
            "method": "Exp" if method == "Exp" else "PFP",
            "n_sources": len(g),
            "sources": ";".join(map(str, g["subname"])),
            "C": c,
        }
        try:
            m = moduli_from_stiffness(c)
            row.update(m)
            row["negative"] = has_negative_moduli(m)
        except np.linalg.LinAlgError:
            row["negative"] = True
        rows.append(row)
    return pd.DataFrame(rows)


def shared_structures(
    shared_dir: Path, *, all_files: bool = False, compounds: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Structures of the shared elastic set: ``[{id, compound, file}]`` (first listed file
    of each compound unless ``all_files``); one file used by several compounds (the
    resorcinol polymorphs) is listed for each."""
    mapping = shared_dir / "elastic" / "elastic44_mapping.csv"
    folder = shared_dir / "elastic" / "structures"
    if not mapping.is_file():
        raise FileNotFoundError(f"elastic mapping not found: {mapping}")
    m = pd.read_csv(mapping)
    out = []
    wanted = {c.strip().lower() for c in compounds} if compounds else None
    for row in m.itertuples():
        files = [f for f in str(row.structure_files).split(";") if f and f != "nan"]
        name = str(row.compound).strip()
        if not files or (wanted is not None and name.lower() not in wanted):
            continue
        for f in files if all_files else files[:1]:
            path = folder / f
            if not path.is_file():
                raise FileNotFoundError(f"{mapping}: structure file {f} of {name} not in {folder}")
            out.append({"id": Path(f).stem, "compound": name, "file": path})
    return out


# ------------------------------------------------------------------ worker
def _elastic_task(item: dict[str, Any]) -> dict[str, Any]:
    exp = atoms_from_dict(item["atoms"])
    calc = get_calc(item["spec"], item.get("fingerprint"))
    p = ElasticSettings(**{**item["settings"], "strains": tuple(item["settings"]["strains"])})
    t0 = time.perf_counter()
    relaxed, info = relax_structure(exp, calc, p.relax())
    rec: dict[str, Any] = {"status": "ok", **info, **compare_structures(exp, relaxed)}
    rec["relax_wall_s"] = rec.pop("wall_s")
    bad = [
        name
        for name, flag in (
            ("volume runaway", rec["aborted_volume_runaway"]),
            ("volume blown up", rec["volume_blown_up"]),
            ("molecule broken", rec["molecule_broken"]),
            ("molecules merged", rec["molecule_merged"]),
        )
        if flag
    ]
    if bad:  # no stiffness of a structure that is no longer the crystal
        rec.update(status="skipped", error="relaxation failed: " + ", ".join(bad))
        rec["wall_s"] = time.perf_counter() - t0
        return rec
    c, fit = fit_stiffness(relaxed, calc, p.strains, ion_fmax=p.ion_fmax)
    rec.update(fit)
    rec["C"] = np.round(c, 5).tolist()
    try:
        m = moduli_from_stiffness(c)
        rec.update(m)
        rec["negative_moduli"] = has_negative_moduli(m)
    except np.linalg.LinAlgError as exc:
        rec["negative_moduli"] = True
        rec["moduli_error"] = str(exc)
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def run_elastic_benchmark(
    calculators: dict[str, str] | Sequence[str],
    out_dir: str | Path,
    settings: ElasticSettings | None = None,
    *,
    structures: str | Path | Sequence[tuple[str, Atoms]] | None = None,
    shared: bool = False,
    shared_dir: str | Path | None = None,
    all_files: bool = False,
    compounds: Sequence[str] | None = None,
    limit: int | None = None,
    max_atoms: int | None = None,
    workers: int = 2,
    progress: bool = True,
) -> pd.DataFrame:
    """Relax + stiffness for each (calculator, structure); with ``shared`` compare the
    moduli with experiment (Table 2 layout) and write ``elastic.md``/``.csv``/``.png``.

    Results stream to ``out_dir/elastic.jsonl`` and resume like the relaxation benchmark
    (same runner: a record is reused only for the same calculator fingerprint and
    ``settings``, so a student retrained at the same path is computed again).
    """
    settings = settings or ElasticSettings()
    calculators = label_calculators(calculators)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref_csv: Path | None = None
    items: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []  # unreadable CIFs: listed in elastic.md, not fatal

    def add(item: dict[str, Any]) -> None:
        try:
            items.append({**item, "atoms": read_cif(item["file"])})
        except ValueError as exc:
            log.warning("skipped %s: %s", item["file"], exc)
            skipped.append((str(item["file"]), str(exc)))

    if shared:
        sd = Path(shared_dir) if shared_dir else shared_data_dir(required=True)
        assert sd is not None
        ref_csv = sd / "elastic" / "stiffness_tensors_rev.csv"
        for s in shared_structures(sd, all_files=all_files, compounds=compounds):
            add(s)
    elif isinstance(structures, str | Path):
        path = Path(structures)
        files = [path] if path.is_file() else sorted(path.glob("*.cif"))
        if not files:
            raise FileNotFoundError(f"no CIF files in {path}")
        for f in files:
            add({"id": f.stem, "compound": None, "file": f})
    elif structures is not None:
        for sid, atoms in structures:
            items.append({"id": str(sid), "compound": None, "file": None, "atoms": atoms})
    else:
        raise ValueError("give structures=... or shared=True")
    if max_atoms is not None:
        items = [it for it in items if len(it["atoms"]) <= max_atoms]
    if limit is not None:
        items = items[:limit]
    params = settings.protocol()
    with (out / "run.json").open("a") as fh:
        fh.write(
            json.dumps(
                {
                    "settings": {
                        "calculators": calculators,
                        "params": params,
                        "structures": [it["id"] for it in items],
                    },
                    "environment": environment_record(),
                },
                default=str,
            )
            + "\n"
        )
    unique = {it["id"]: it for it in items}
    records = run_jobs(
        _elastic_task,
        calculators,
        [Structure(sid, it["atoms"], {}) for sid, it in unique.items()],
        out / RESULTS_FILE,
        params,
        workers=workers,
        progress=progress,
        desc="elastic",
    )
    by_pair = latest(records)
    rows = []
    for it in items:  # one row per (method, compound-structure)
        for label in calculators:
            r = by_pair.get((label, it["id"]))
            if r is not None:
                row = {k: v for k, v in r.items() if k != "settings"}
                rows.append({**row, "compound": it["compound"]})
    df = pd.DataFrame(rows)
    refs = load_reference_tensors(ref_csv) if ref_csv is not None else None
    write_elastic_report(df, refs, out, list(calculators), skipped=skipped)
    df.attrs["skipped"] = skipped
    return df


# ------------------------------------------------------------------ report
def mae_table(
    df: pd.DataFrame, refs: pd.DataFrame, methods: Sequence[str]
) -> tuple[pd.DataFrame, dict[str, dict[str, int]]]:
    """MAE vs experiment in the paper's Table 2 layout (rows: moduli; columns: Mean model,
    PFP, methods). Per method only compounds with an experimental tensor, a finished run
    and no negative modulus count (for PFP: no negative PFP modulus); the mean model
    predicts the mean experimental value over the compounds evaluated."""
    exp = refs[(refs["method"] == "Exp") & ~refs["negative"]].set_index("compound_key")
    pfp = refs[(refs["method"] == "PFP") & ~refs["negative"]].set_index("compound_key")
    keys = []
    if len(df):
        keys = sorted({str(c).strip().lower() for c in df["compound"].dropna()})
    keys_exp = [k for k in keys if k in exp.index]
    counts: dict[str, dict[str, int]] = {}
    table: dict[str, dict[str, float]] = {}
    mean_vals = exp.loc[keys_exp, list(MODULI)].astype(float)
    table["Mean model"] = {
        m: float((mean_vals[m] - mean_vals[m].mean()).abs().mean()) for m in MODULI
    }
    counts["Mean model"] = {"n": len(keys_exp), "excluded": 0}
    pk = [k for k in keys_exp if k in pfp.index]
    table["PFP"] = {
        m: float((pfp.loc[pk, m].astype(float) - exp.loc[pk, m].astype(float)).abs().mean())
        for m in MODULI
    }
    counts["PFP"] = {"n": len(pk), "excluded": len(keys_exp) - len(pk)}
    for method in methods:
        g = df[(df["method"] == method)] if len(df) else df
        vals: dict[str, list[float]] = {m: [] for m in MODULI}
        n, excluded = 0, 0
        seen = set()
        for r in g.itertuples():
            key = str(r.compound).strip().lower()
            if key not in exp.index or key in seen:
                continue
            seen.add(key)
            if getattr(r, "status", "error") != "ok" or bool(getattr(r, "negative_moduli", True)):
                excluded += 1
                continue
            n += 1
            for m in MODULI:
                vals[m].append(abs(float(getattr(r, m)) - float(exp.loc[key, m])))
        table[method] = {m: float(np.mean(v)) if v else math.nan for m, v in vals.items()}
        counts[method] = {"n": n, "excluded": excluded}
    return pd.DataFrame(table).loc[list(MODULI)], counts


def write_elastic_report(
    df: pd.DataFrame,
    refs: pd.DataFrame | None,
    out_dir: Path,
    methods: Sequence[str],
    *,
    skipped: Sequence[tuple[str, str]] = (),
) -> None:
    """``elastic.csv`` (per structure), ``elastic.md`` (moduli; Table 2 MAE when reference
    data is given; ``skipped``: unreadable structure files and why) and ``parity_E_RH.png``."""
    out = Path(out_dir)
    keep = [
        c
        for c in (
            "method",
            "compound",
            "id",
            "natoms",
            "status",
            "converged",
            "vol_err_pct",
            "rmsd15",
            "negative_moduli",
            *MODULI,
            "wall_s",
        )
        if c in df
    ]
    per = df[keep] if len(df) else df
    per.to_csv(out / "elastic.csv", index=False)
    md = ["# Elastic benchmark", ""]
    if refs is not None:
        tab, counts = mae_table(df, refs, methods)
        tab.to_csv(out / "elastic_mae.csv")
        md.append(
            "MAE vs experiment (GPa; nu and A dimensionless), paper Table 2 layout. "
            "Experimental tensor = element-wise mean of all experimental sources of a "
            "compound. n = compounds covered; excluded = negative moduli or failed."
        )
        md.append("")
        view = tab.map(lambda v: "" if not np.isfinite(v) else f"{v:.2f}")
        view.loc["n (excluded)"] = [f"{counts[c]['n']} ({counts[c]['excluded']})" for c in tab]
        view = view.reset_index(names="")
        md += [md_table(view, [(c, str(c)) for c in view.columns]), ""]
        _parity_moduli(df, refs, out / "parity_E_RH.png")
    md += ["## Per structure", ""]
    if len(per):
        md.append(md_table(per, [(c, c) for c in keep]))
    fails = df[df.get("status", pd.Series(dtype=str)) != "ok"] if len(df) else df
    md += ["", f"failed runs: {len(fails)}"]
    md += [f"- {r.method} {r.id}: {str(r.error).splitlines()[0]}" for r in fails.itertuples()]
    if skipped:
        md += ["", f"unreadable structure files (skipped): {len(skipped)}"]
        md += [f"- {f}: {why}" for f, why in skipped]
    (out / "elastic.md").write_text("\n".join(md) + "\n")


def _parity_moduli(df: pd.DataFrame, refs: pd.DataFrame, path: Path, key: str = "E_RH") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exp = refs[refs["method"] == "Exp"].set_index("compound_key")
    fig, ax = plt.subplots(figsize=(4, 4))
    hi = 1.0
    if len(df) and key in df:
        for method, g in df[df["status"] == "ok"].groupby("method"):
            xs, ys = [], []
            for r in g.itertuples():
                k = str(r.compound).strip().lower()
                if k in exp.index and not r.negative_moduli:
                    xs.append(float(exp.loc[k, key]))
                    ys.append(float(getattr(r, key)))
            if xs:
                ax.scatter(xs, ys, label=f"{method} (n={len(xs)})", s=18)
                hi = max(hi, max(xs), max(ys))
    ax.plot([0, hi * 1.05], [0, hi * 1.05], "k--", lw=0.8)
    ax.set_xlabel(f"experimental {key} (GPa)")
    ax.set_ylabel(f"predicted {key} (GPa)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
