"""The forgetting check: how far a distilled student moved from pretrained CHGNet outside
organic molecular crystals (``kd-nnp evaluate forgetting``, and every evaluated job).

Only CHGNet's readout MLP trains, but it is shared by every element: fitting organic crystals
can silently make the model worse on what it was pretrained for (MPtrj: mostly inorganic).
The check compares each student with pretrained CHGNet (the reference, computed automatically)
on a set of structures outside the organic domain:

- the **built-in set** (:func:`kd_nnp.data.sources.inorganic.builtin_structures`, offline
  and deterministic): 14 small inorganic and hybrid crystals built from ideal prototypes
  plus ``n_perturbed`` strained + rattled copies of each (seeded, supercells of >= 8 atoms
  so that forces are not fixed by symmetry);
- the **MPtrj frames** of the shared data (``mptrj_sample/*.extxyz``, real DFT labels) when
  present: there both models are also compared with DFT.

Metrics per calculator vs the reference (all structures, and per subset ``builtin`` /
``mptrj``): energy MAE (eV/atom), force MAE (eV/A, per component), stress MAE (GPa, per Voigt
component); for each unperturbed built-in structure, relaxed (LBFGS + FrechetCellFilter,
:func:`kd_nnp.evaluation.protocol.relax_structure` with a fixed small step budget) by both
models: the relaxed-volume change ``100 (V_calc / V_reference - 1)`` (%). On MPtrj frames:
the energy and force MAE of each model vs DFT.

Results stream to ``OUT/points.jsonl`` (single points) and ``OUT/relax.jsonl``
(:func:`kd_nnp.evaluation.runner.run_jobs`: resumable, keyed by calculator fingerprint and
settings); the reference may live in a shared cache folder (``reference_dir``, used by the
per-job evaluation so that pretrained CHGNet is computed once per settings). Writes
``OUT/forgetting.json`` and ``OUT/forgetting.md``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units

from kd_nnp.data.sources.inorganic import builtin_structures
from kd_nnp.data.sources.inorganic import perturbed_copy as _perturbed
from kd_nnp.errors import KdNnpError
from kd_nnp.evaluation.runner import (
    Structure,
    atoms_from_dict,
    get_calc,
    label_calculators,
    latest,
    run_jobs,
    shared_cache,
)
from kd_nnp.evaluation.settings import ForgettingSettings
from kd_nnp.utils.jsonl import nan_to_none
from kd_nnp.utils.provenance import environment_record, stable_hash

log = logging.getLogger(__name__)

REFERENCE_SPEC = "chgnet"
REFERENCE_LABEL = "CHGNet (pretrained)"
POINTS_FILE = "points.jsonl"
RELAX_FILE = "relax.jsonl"
RESULT_FILE = "forgetting.json"
TABLE_FILE = "forgetting.md"
SUBSETS = ("builtin", "mptrj")


# ------------------------------------------------------------------ the structures
def perturbed_copy(atoms: Atoms, name: str, index: int, settings: ForgettingSettings) -> Atoms:
    """The ``index``-th strained + rattled copy of a built-in structure for these settings
    (:func:`kd_nnp.data.sources.inorganic.perturbed_copy`)."""
    return _perturbed(atoms, name, index, seed=settings.seed, strain=settings.strain,
                      rattle_std=settings.rattle_std)  # fmt: skip


@dataclass
class ForgettingSet:
    """The structures of one check and the DFT labels of its MPtrj frames."""

    structures: list[Structure]
    dft: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> energy, forces
    relax_ids: list[str] = field(default_factory=list)
    mptrj_file: str | None = None
    note: str = ""


def mptrj_sample_file(settings: ForgettingSettings) -> Path | None:
    """The shared MPtrj sample (``mptrj_sample/*.extxyz``); None when no shared data folder is
    found (a fresh clone), an error when ``shared_dir`` names a folder without it."""
    from kd_nnp.utils.paths import shared_data_dir

    sd = Path(settings.shared_dir).expanduser() if settings.shared_dir else shared_data_dir()
    if sd is None:
        return None
    files = sorted((sd / "mptrj_sample").glob("*.extxyz"))
    if not files and settings.shared_dir:  # asked for explicitly: no silent fallback
        raise KdNnpError(
            f"forgetting: shared_dir={settings.shared_dir} has no mptrj_sample/*.extxyz "
            "(give the shared data folder, or --no-mptrj)"
        )
    return files[0] if files else None


def forgetting_set(settings: ForgettingSettings) -> ForgettingSet:
    """The built-in structures (unperturbed + perturbed copies) and, when ``settings.mptrj``
    and the shared data is present, the MPtrj frames with their DFT labels."""
    from kd_nnp.data.classify import CLASSES
    from kd_nnp.data.sources.mptrj import iter_mptrj_extxyz

    builtin = builtin_structures()
    names = list(settings.prototypes) if settings.prototypes else list(builtin)
    unknown = [n for n in names if n not in builtin]
    if unknown:
        raise KdNnpError(
            f"forgetting: unknown built-in structure(s) {unknown}; known: {sorted(builtin)}"
        )
    structures: list[Structure] = []
    for name in names:
        atoms, group = builtin[name]
        meta = {"subset": "builtin", "group": group, "prototype": name}
        structures.append(
            Structure(
                name, atoms, {**meta, "kind": "prototype", "formula": atoms.get_chemical_formula()}
            )  # fmt: skip
        )
        for i in range(settings.n_perturbed):
            pa = perturbed_copy(atoms, name, i, settings)
            structures.append(
                Structure(
                    f"{name}/perturbed-{i}",
                    pa,
                    {**meta, "kind": "perturbed", "formula": pa.get_chemical_formula()},
                )  # fmt: skip
            )
    out = ForgettingSet(structures, relax_ids=names if settings.relax else [])
    if settings.mptrj:
        path = mptrj_sample_file(settings)
        if path is None:
            out.note = "no shared MPtrj sample found: built-in structures only"
            log.info("forgetting: %s", out.note)
        else:
            out.mptrj_file = str(path)
            for frame in iter_mptrj_extxyz(path, include=CLASSES):
                fid = frame.frame_id
                hard = frame.hard
                assert hard is not None and hard.energy is not None and hard.forces is not None
                structures.append(
                    Structure(fid, frame.atoms, {"subset": "mptrj", "group": "mptrj",
                              "kind": "mptrj", "formula": frame.atoms.get_chemical_formula()})
                )  # fmt: skip
                out.dft[fid] = {"energy": hard.energy, "forces": hard.forces}
    return out


# ------------------------------------------------------------------ worker tasks
def _point_task(item: dict[str, Any]) -> dict[str, Any]:
    a = atoms_from_dict(item["atoms"])
    a.calc = get_calc(item["spec"], item.get("fingerprint"))
    return {
        "status": "ok",
        "energy": float(a.get_potential_energy()),
        "forces": np.round(a.get_forces(), 6).tolist(),
        "stress_gpa": np.round(a.get_stress(voigt=True) / units.GPa, 6).tolist(),
    }


def _relax_task(item: dict[str, Any]) -> dict[str, Any]:
    import warnings

    from kd_nnp.evaluation.protocol import relax_structure
    from kd_nnp.evaluation.settings import RelaxSettings

    warnings.filterwarnings("ignore", message="logm result may be inaccurate")
    start = atoms_from_dict(item["atoms"])
    calc = get_calc(item["spec"], item.get("fingerprint"))
    pred, info = relax_structure(start, calc, RelaxSettings(**item["relax"]))
    keep = ("converged", "aborted_volume_runaway", "steps", "wall_s", "fmax_final",
            "stress_max_gpa")  # fmt: skip
    return {
        "status": "ok",
        **{k: info[k] for k in keep},
        "volume_start": float(start.get_volume()),
        "volume": float(pred.get_volume()),
        "energy_per_atom": info["energy"] / len(pred),
    }


def _run(
    calculators: Mapping[str, str],
    fset: ForgettingSet,
    out: Path,
    settings: ForgettingSettings,
    *,
    workers: int,
    progress: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    key = _settings_key(fset, settings)
    points = run_jobs(_point_task, calculators, fset.structures, out / POINTS_FILE, key,
                      workers=workers, progress=progress, desc="forgetting: points")  # fmt: skip
    relax: list[dict[str, Any]] = []
    if fset.relax_ids:
        wanted = set(fset.relax_ids)
        relax = run_jobs(
            _relax_task,
            calculators,
            [s for s in fset.structures if s.id in wanted],
            out / RELAX_FILE,
            key,
            payload={"relax": _relax_kwargs(settings)},
            workers=workers,
            progress=progress,
            desc="forgetting: relax",
        )
    return points, relax


def _relax_kwargs(settings: ForgettingSettings) -> dict[str, Any]:
    r = settings.relax_settings()
    return {"fmax": r.fmax, "max_steps": r.max_steps, "stress_tol_gpa": r.stress_tol_gpa,
            "rmsd": False}  # fmt: skip


def _settings_key(fset: ForgettingSet, settings: ForgettingSettings) -> dict[str, Any]:
    """What the records depend on: the protocol (the structure list is part of it)."""
    proto = settings.protocol()
    proto.pop("shared_dir", None)
    return {"protocol": proto, "structures": [s.id for s in fset.structures]}


# ------------------------------------------------------------------ the check
def run_forgetting(
    calculators: Mapping[str, str] | Sequence[str],
    out_dir: str | Path,
    settings: ForgettingSettings | None = None,
    *,
    reference_dir: str | Path | None = None,
    workers: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """The forgetting check of ``calculators`` (``{label: spec}`` or specs) vs pretrained
    CHGNet (see module doc). The reference is computed in ``out_dir`` or, with
    ``reference_dir``, in that shared cache folder (once per settings, under a file lock).
    Returns the content of ``forgetting.json`` (NaN -> null)."""
    settings = settings or ForgettingSettings()
    calcs = label_calculators(calculators)
    calcs = {k: v for k, v in calcs.items() if v != REFERENCE_SPEC}
    if REFERENCE_LABEL in calcs:
        raise KdNnpError(f"forgetting: the label {REFERENCE_LABEL!r} is the reference's")
    if not calcs:
        raise KdNnpError("forgetting: no calculator to compare with pretrained CHGNet")
    fset = forgetting_set(settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_kw = dict(workers=workers, progress=progress)
    if reference_dir is not None:
        rdir = Path(reference_dir)
        with shared_cache(rdir, _settings_key(fset, settings), POINTS_FILE):
            ref_points, ref_relax = _run({REFERENCE_SPEC: REFERENCE_SPEC}, fset, rdir,
                                         settings, **run_kw)  # fmt: skip
        points, relax = _run(calcs, fset, out, settings, **run_kw)
        points += [{**r, "method": REFERENCE_LABEL} for r in ref_points]
        relax += [{**r, "method": REFERENCE_LABEL} for r in ref_relax]
    else:
        points, relax = _run({REFERENCE_LABEL: REFERENCE_SPEC, **calcs}, fset, out, settings,
                             **run_kw)  # fmt: skip
    result = forgetting_metrics(points, relax, fset, list(calcs))
    result["settings"] = {
        **settings.protocol(),
        "calculators": calcs,
        "reference_spec": REFERENCE_SPEC,
        "reference_dir": str(Path(reference_dir).resolve()) if reference_dir else None,
        "mptrj_file": fset.mptrj_file,
        "note": fset.note,
    }
    result = nan_to_none(result)
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2))
    (out / TABLE_FILE).write_text(forgetting_markdown(result))
    with (out / "run.json").open("a") as fh:
        fh.write(json.dumps({"settings": result["settings"], "environment": environment_record()})
                 + "\n")  # fmt: skip
    return result


def _mae(a: Any, b: Any) -> float:
    return float(np.mean(np.abs(np.asarray(a, float) - np.asarray(b, float))))


def _mean(values: list[float]) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else math.nan


def _pooled(rows: list[dict[str, Any]], key: str, weight: str) -> float:
    """Per-component MAE pooled over structures (each structure weighted by its components)."""
    num = sum(r[key] * r[weight] for r in rows)
    den = sum(r[weight] for r in rows)
    return float(num / den) if den else math.nan


def forgetting_metrics(
    points: list[dict[str, Any]],
    relax: list[dict[str, Any]],
    fset: ForgettingSet,
    methods: list[str],
) -> dict[str, Any]:
    """Per-structure differences and per-method summaries from the runner's records."""
    by_point = latest(points)
    by_relax = latest(relax)
    meta = {s.id: (s.meta, len(s.atoms)) for s in fset.structures}

    def ok(rec: dict[str, Any] | None) -> bool:
        return rec is not None and rec.get("status") == "ok"

    per_structure: list[dict[str, Any]] = []
    errors: list[str] = []
    for method in [REFERENCE_LABEL, *methods]:
        for sid, (m, n) in meta.items():
            rec = by_point.get((method, sid))
            ref = by_point.get((REFERENCE_LABEL, sid))
            row: dict[str, Any] = {"method": method, "id": sid, "subset": m["subset"],
                                   "group": m["group"], "kind": m["kind"], "natoms": n}  # fmt: skip
            if not ok(rec):
                errors.append(f"{method} / {sid}: {(rec or {}).get('error', 'no result')}")
                per_structure.append(row)
                continue
            assert rec is not None
            if method != REFERENCE_LABEL and ok(ref):
                assert ref is not None
                row["de_ev_atom"] = (rec["energy"] - ref["energy"]) / n
                row["f_mae"] = _mae(rec["forces"], ref["forces"])
                row["s_mae_gpa"] = _mae(rec["stress_gpa"], ref["stress_gpa"])
            if sid in fset.dft:
                dft = fset.dft[sid]
                row["de_dft_ev_atom"] = (rec["energy"] - dft["energy"]) / n
                row["f_mae_dft"] = _mae(rec["forces"], dft["forces"])
            rr, rref = by_relax.get((method, sid)), by_relax.get((REFERENCE_LABEL, sid))
            if sid in fset.relax_ids:
                if ok(rr):
                    assert rr is not None
                    row["volume"] = rr["volume"]
                    row["relax_converged"] = bool(rr["converged"])
                    row["relax_steps"] = rr["steps"]
                    if method != REFERENCE_LABEL and ok(rref):
                        assert rref is not None
                        row["vol_change_pct"] = 100.0 * (rr["volume"] / rref["volume"] - 1.0)
                        row["relax_converged"] = bool(rr["converged"] and rref["converged"])
                else:
                    errors.append(f"{method} / relax {sid}: {(rr or {}).get('error', 'no result')}")
            per_structure.append(row)

    summaries: dict[str, dict[str, Any]] = {}
    for method in [REFERENCE_LABEL, *methods]:
        rows = [r for r in per_structure if r["method"] == method]
        s: dict[str, Any] = {"method": method}
        if method != REFERENCE_LABEL:
            s.update(_vs_reference(rows, ""))
            for subset in SUBSETS:
                sub = [r for r in rows if r["subset"] == subset]
                if sub:
                    s.update(_vs_reference(sub, f"{subset}_"))
            vols = [r for r in rows if "vol_change_pct" in r]
            dv = [r["vol_change_pct"] for r in vols]
            s["n_relaxed"] = len(vols)
            s["n_relax_unconverged"] = sum(not r["relax_converged"] for r in vols)
            s["vol_change_mean_pct"] = _mean(dv)
            s["vol_change_mae_pct"] = _mean([abs(x) for x in dv])
            s["vol_change_max_abs_pct"] = max((abs(x) for x in dv), default=math.nan)
        else:
            s["n"] = sum((method, r["id"]) in by_point and ok(by_point[(method, r["id"])])
                         for r in rows)  # fmt: skip
            vols = [r for r in rows if "volume" in r]
            s["n_relaxed"] = len(vols)
            s["n_relax_unconverged"] = sum(not r["relax_converged"] for r in vols)
        dft = [r for r in rows if "de_dft_ev_atom" in r]
        s["n_mptrj"] = len(dft)
        s["mptrj_energy_mae_dft_ev_atom"] = _mean([abs(r["de_dft_ev_atom"]) for r in dft])
        s["mptrj_force_mae_dft_ev_a"] = _pooled(
            [{**r, "w": 3 * r["natoms"]} for r in dft], "f_mae_dft", "w"
        )
        summaries[method] = s
    return {
        "reference": REFERENCE_LABEL,
        "methods": {m: summaries[m] for m in methods},
        "reference_summary": summaries[REFERENCE_LABEL],
        "structures": [s.id for s in fset.structures],
        "relaxed": list(fset.relax_ids),
        "errors": errors,
        "per_structure": per_structure,
    }


def _vs_reference(rows: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    done = [r for r in rows if "de_ev_atom" in r]
    weighted = [{**r, "wf": 3 * r["natoms"], "ws": 6} for r in done]
    return {
        f"{prefix}n": len(done),
        f"{prefix}energy_mae_ev_atom": _mean([abs(r["de_ev_atom"]) for r in done]),
        f"{prefix}energy_mean_ev_atom": _mean([r["de_ev_atom"] for r in done]),
        f"{prefix}force_mae_ev_a": _pooled(weighted, "f_mae", "wf"),
        f"{prefix}stress_mae_gpa": _pooled(weighted, "s_mae_gpa", "ws"),
    }


# ------------------------------------------------------------------ the table
SUMMARY_COLUMNS = (
    ("method", "method"),
    ("n", "structures"),
    ("energy_mae_ev_atom", "E MAE vs CHGNet (eV/atom)"),
    ("force_mae_ev_a", "F MAE vs CHGNet (eV/A)"),
    ("stress_mae_gpa", "stress MAE vs CHGNet (GPa)"),
    ("builtin_energy_mae_ev_atom", "E MAE built-in (eV/atom)"),
    ("mptrj_energy_mae_ev_atom", "E MAE MPtrj (eV/atom)"),
    ("vol_change_mae_pct", "mean abs dV vs CHGNet (%)"),
    ("vol_change_max_abs_pct", "max abs dV (%)"),
    ("mptrj_energy_mae_dft_ev_atom", "E MAE vs DFT (eV/atom)"),
    ("mptrj_force_mae_dft_ev_a", "F MAE vs DFT (eV/A)"),
)


def summary_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per method (the reference last) with :data:`SUMMARY_COLUMNS`' keys."""
    rows = [dict(v) for v in result["methods"].values()]
    rows.append(dict(result["reference_summary"]))
    return rows


def forgetting_markdown(result: Mapping[str, Any]) -> str:
    import pandas as pd

    from kd_nnp.utils.markdown import md_table

    s = result.get("settings", {})
    summ = pd.DataFrame(summary_rows(result))
    for k, _ in SUMMARY_COLUMNS:
        if k not in summ:
            summ[k] = math.nan
    summ = summ.astype({k: float for k, _ in SUMMARY_COLUMNS[1:]})
    text = [
        "# Forgetting check: distance from pretrained CHGNet outside organic crystals",
        "",
        f"Reference: {result['reference']} (`{s.get('reference_spec', REFERENCE_SPEC)}`). "
        f"{len(result['structures'])} structures ({len(result['relaxed'])} relaxed by every "
        f"model, at most {s.get('max_steps')} LBFGS steps, fmax {s.get('fmax')} eV/A); "
        f"MPtrj frames: {s.get('mptrj_file') or 'none'}. dV = relaxed volume vs the "
        "reference's relaxed volume. Energies per atom, force and stress MAE per component.",
        "",
        md_table(summ, list(SUMMARY_COLUMNS), floatfmt="{:.4f}"),
    ]
    per = pd.DataFrame([r for r in result["per_structure"] if r["method"] != result["reference"]])
    if len(per):
        cols = [("method", "method"), ("id", "structure"), ("group", "group"),
                ("natoms", "atoms"), ("de_ev_atom", "dE (eV/atom)"), ("f_mae", "F MAE (eV/A)"),
                ("s_mae_gpa", "stress MAE (GPa)"), ("vol_change_pct", "dV (%)"),
                ("relax_converged", "relaxations converged")]  # fmt: skip
        for k, _ in cols:
            if k not in per:
                per[k] = None
        text += ["", "## Per structure", "", md_table(per, cols, floatfmt="{:.4f}")]
    if result.get("errors"):
        text += ["", "## Errors", ""] + [f"- {e}" for e in result["errors"]]
    return "\n".join(text) + "\n"


def reference_dir(baseline_root: str | Path, settings: ForgettingSettings) -> Path:
    """The shared cache folder of the reference for these settings."""
    fset = forgetting_set(settings)
    return Path(baseline_root) / f"forgetting-{stable_hash(_settings_key(fset, settings))}"


JOB_LABEL = "student"


def job_forgetting(
    student_spec: str,
    out_dir: str | Path,
    baseline_root: str | Path,
    settings: ForgettingSettings | None = None,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """The forgetting check of one trained student (the per-job evaluation): the reference
    is computed once per settings in ``baseline_root/forgetting-<hash>``. Returns the
    student's summary, the reference's, the relaxed-volume change per structure and where
    the full result is (``out_dir/forgetting.json``)."""
    settings = settings or ForgettingSettings()
    ref_dir = reference_dir(baseline_root, settings)
    res = run_forgetting({JOB_LABEL: student_spec}, out_dir, settings, reference_dir=ref_dir,
                         progress=progress)  # fmt: skip
    per = [r for r in res["per_structure"] if r["method"] == JOB_LABEL]
    return {
        "summary": res["methods"][JOB_LABEL],
        "reference": res["reference_summary"],
        "vol_change_pct": {
            r["id"]: r.get("vol_change_pct") for r in per if r["id"] in res["relaxed"]
        },  # fmt: skip
        "n_errors": len(res["errors"]),
        "path": str((Path(out_dir) / RESULT_FILE).resolve()),
        "reference_dir": str(ref_dir.resolve()),
    }
