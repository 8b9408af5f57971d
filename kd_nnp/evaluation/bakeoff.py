"""The teacher bake-off (``kd-nnp evaluate teachers``): relax one crystal set with several
teachers (and pretrained CHGNet as the baseline row) and rank them on volume, RMSD15 and speed.

The relaxations *are* the relaxation benchmark's (:func:`kd_nnp.evaluation.relax.run_relax_benchmark`:
``OUT/relax.jsonl``, resumable after ``kill -9``, keyed by calculator fingerprint and
protocol); the ranking is recomputed from those JSON lines every time
(:func:`rank_methods`), so ``--report-only`` rebuilds it without relaxing anything.

Per method (``ranking.md`` / ``ranking.csv``): ``n`` crystals relaxed cleanly (status ok and
no failure flag: not converged, broken or merged molecules, blown-up volume, errors, missing
results), ``failures`` (the others, listed by id), the volume error against experiment over
the clean crystals (MAE, signed mean, signed median, percentile-bootstrap 95 % interval of the
MAE, :func:`kd_nnp.evaluation.stats.bootstrap_ci`), the mean RMSD15, the median seconds per
LBFGS step and the mean seconds per crystal. A method that fails on the hard crystals would
look better on its own clean set, so the ranks are taken over the *common* set, the crystals
that every ranked method relaxed cleanly (``n_common``): ``rank_volume`` by the volume MAE on
it, ``rank_rmsd15`` by the mean RMSD15, ``rank_speed`` by the median seconds per step. With
``lattice`` the lattice energies of the same relaxations
(:func:`kd_nnp.evaluation.lattice.run_lattice_benchmark` into ``OUT/lattice``) add per method
their mean and, against the lattice reference method, MAE and signed mean (kJ/mol; pyxtal's
crystals carry no experimental lattice energy, so these columns compare methods, not rank
them).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kd_nnp.errors import KdNnpError
from kd_nnp.evaluation.settings import BakeoffSettings, LatticeSettings, RelaxSettings
from kd_nnp.evaluation.stats import bootstrap_ci
from kd_nnp.teachers.base import TeacherImportError
from kd_nnp.teachers.calculators import TEACHERS, check_spec, method_label
from kd_nnp.utils.markdown import md_table

log = logging.getLogger(__name__)

RANKING_MD = "ranking.md"
RANKING_CSV = "ranking.csv"
BASELINE_SPEC = "chgnet"
#: ranking columns and their headers in ranking.md
COLUMNS = (
    ("rank_volume", "rank V"),
    ("method", "method"),
    ("n", "n"),
    ("failures", "failures"),
    ("vol_mae_pct", "V MAE %"),
    ("vol_mae_ci", "95 % CI"),
    ("vol_mean_pct", "V signed mean %"),
    ("vol_median_pct", "V median %"),
    ("rmsd15_mean", "RMSD15 A"),
    ("s_per_step_median", "s/step"),
    ("s_per_crystal", "s/crystal"),
    ("n_common", "n common"),
    ("vol_mae_common_pct", "V MAE common %"),
    ("rank_rmsd15", "rank RMSD15"),
    ("rank_speed", "rank speed"),
    ("e_latt_mean", "E_latt mean kJ/mol"),
    ("e_latt_mae", "E_latt MAE vs ref"),
    ("e_latt_mean_diff", "E_latt signed vs ref"),
)


def default_teachers() -> tuple[str, ...]:
    """Every built-in teacher but plain ``chgnet`` (the baseline row)."""
    return tuple(n for n in TEACHERS if n != "chgnet")


def bakeoff_calculators(settings: BakeoffSettings) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """``({label: spec}, [(teacher, why missing)])`` of the bake-off: ``teacher:NAME`` for
    every teacher (default :func:`default_teachers`), then pretrained CHGNet. A teacher whose
    package is not installed is a :class:`KdNnpError` naming the extra to install, unless
    ``skip_missing`` (then it is left out and returned with the reason)."""
    settings.check()
    calcs: dict[str, str] = {}
    missing: list[tuple[str, str]] = []
    for name in settings.teachers or default_teachers():
        spec = f"teacher:{name}"
        try:
            check_spec(spec)
        except TeacherImportError as exc:
            if not settings.skip_missing:
                raise KdNnpError(
                    f"bake-off: {exc} (or leave it out: --teachers, or --skip-missing)"
                ) from exc
            missing.append((name, str(exc)))
            continue
        calcs[method_label(spec)] = spec
    if settings.chgnet:
        calcs[method_label(BASELINE_SPEC)] = BASELINE_SPEC
    if not calcs:
        raise KdNnpError(
            "bake-off: no calculator left to run " + "; ".join(f"{n}: {why}" for n, why in missing)
        )
    return calcs, missing


def _clean(df: pd.DataFrame) -> pd.DataFrame:
    """Rows relaxed cleanly: status ok and no failure flag."""
    fail = df["failure"].fillna("") if "failure" in df else pd.Series("", index=df.index)
    return df[(df["status"] == "ok") & (fail == "")]


def _seconds_per_step(g: pd.DataFrame) -> pd.Series:
    if "wall_s" not in g or "steps" not in g:
        return pd.Series(dtype=float)
    steps = pd.to_numeric(g["steps"], errors="coerce")
    wall = pd.to_numeric(g["wall_s"], errors="coerce")
    return (wall / steps)[steps > 0].dropna()


def _num(g: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(g[col], errors="coerce") if col in g else pd.Series(dtype=float)


def _mean(s: pd.Series) -> float:
    s = s.dropna()
    return float(s.mean()) if len(s) else math.nan


def rank_methods(
    df: pd.DataFrame,
    *,
    n_boot: int = BakeoffSettings.n_boot,
    lattice: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The ranking table of a relaxation benchmark frame (one row per method, reference rows
    of test.db left out; see the module docstring), sorted by ``rank_volume``. ``lattice``:
    :func:`kd_nnp.evaluation.lattice.summarize_lattice` rows merged in by method."""
    if "reference" in df:
        df = df[~df["reference"].fillna(False).astype(bool)]
    methods = list(dict.fromkeys(df["method"]))
    clean = _clean(df)
    ids_per = {m: set(clean.loc[clean["method"] == m, "id"]) for m in methods}
    common = set.intersection(*ids_per.values()) if ids_per else set()
    rows = []
    for m in methods:
        g = df[df["method"] == m]
        ok = clean[clean["method"] == m]
        v = _num(ok, "vol_err_pct").dropna()
        lo, hi = bootstrap_ci(v.to_numpy(), n_boot=n_boot)
        sps = _seconds_per_step(ok)
        oc = ok[ok["id"].isin(common)]
        failed = sorted(set(g["id"]) - ids_per[m])
        rows.append(
            {
                "method": m,
                "spec": str(g["spec"].iloc[0]) if "spec" in g else "",
                "n": len(ok),
                "failures": len(failed),
                "failed_ids": ",".join(failed),
                "vol_mae_pct": float(v.abs().mean()) if len(v) else math.nan,
                "vol_mae_ci_lo": lo,
                "vol_mae_ci_hi": hi,
                "vol_mean_pct": float(v.mean()) if len(v) else math.nan,
                "vol_median_pct": float(v.median()) if len(v) else math.nan,
                "rmsd15_mean": _mean(_num(ok, "rmsd15")),
                "s_per_step_median": float(sps.median()) if len(sps) else math.nan,
                "s_per_crystal": _mean(_num(ok, "wall_s")),
                "n_common": len(oc),
                "vol_mae_common_pct": _mean(_num(oc, "vol_err_pct").abs()),
                "rmsd15_common": _mean(_num(oc, "rmsd15")),
                "s_per_step_common": (
                    float(_seconds_per_step(oc).median()) if len(oc) else math.nan
                ),
            }
        )
    out = pd.DataFrame(rows)
    if not len(out):
        return out
    for col, key in (
        ("rank_volume", "vol_mae_common_pct"),
        ("rank_rmsd15", "rmsd15_common"),
        ("rank_speed", "s_per_step_common"),
    ):
        out[col] = out[key].rank(method="min", na_option="keep").astype("Int64")
    out["vol_mae_ci"] = [
        f"{a:.2f}-{b:.2f}" if np.isfinite(a) else "" for a, b in zip(out["vol_mae_ci_lo"],
                                                                     out["vol_mae_ci_hi"])
    ]  # fmt: skip
    if lattice is not None and len(lattice):
        lat = lattice.rename(
            columns={"n": "e_latt_n", "failures": "e_latt_failures", "mean": "e_latt_mean",
                     "median": "e_latt_median", "n_paired": "e_latt_n_paired",
                     "mae": "e_latt_mae", "mean_diff": "e_latt_mean_diff"}
        )  # fmt: skip
        out = out.merge(lat, on="method", how="left")
    # NaN ranks (nothing in common) last; ties keep the input order
    out = out.sort_values(["rank_volume", "vol_mae_pct"], na_position="last", kind="stable")
    return out.reset_index(drop=True)


def write_ranking(
    table: pd.DataFrame,
    out: Path,
    *,
    crystals: Sequence[str],
    dataset: str | None,
    protocol: dict[str, Any],
    missing: Sequence[tuple[str, str]] = (),
    lattice_reference: str | None = None,
) -> None:
    """``ranking.csv`` (every column) and ``ranking.md`` (the table, failures, missing
    teachers, how to read the signed errors)."""
    table.to_csv(out / RANKING_CSV, index=False)
    lines = [
        "# Teacher bake-off",
        "",
        f"{len(crystals)} crystals of {dataset or 'the given structures'}; relaxation protocol "
        f"{json.dumps(protocol)}. Volume errors are relaxed vs experimental cell, in %; the "
        "ranks are over the crystals every method relaxed cleanly (n common).",
        "",
        md_table(table, list(COLUMNS), floatfmt="{:.3g}"),
        "",
        "Experimental cells are mostly measured near room temperature, a few % larger than a "
        "0 K relaxation should give: a signed mean of about -2 to -5 % is what a perfect "
        "potential shows on such cells (docs/data.md, 'Reading signed volume errors').",
    ]
    if lattice_reference is not None and "e_latt_mae" in table:
        lines += ["", f"Lattice-energy MAE and signed mean are against {lattice_reference}."]
    failed = table[table["failures"] > 0]
    if len(failed):
        lines += ["", "## Failures", ""]
        lines += [f"- {r.method}: {r.failed_ids}" for r in failed.itertuples()]
    if missing:
        lines += ["", "## Teachers left out (not installed, --skip-missing)", ""]
        lines += [f"- {n}: {why}" for n, why in missing]
    (out / RANKING_MD).write_text("\n".join(lines) + "\n")


def run_bakeoff(
    dataset: str,
    out_dir: str | Path,
    settings: BakeoffSettings | None = None,
    relax: RelaxSettings | None = None,
    lattice: LatticeSettings | None = None,
    *,
    extra: Sequence[str] = (),
    workers: int = 1,
    limit: int | None = None,
    max_atoms: int | None = None,
    codes: Sequence[str] | None = None,
    progress: bool = True,
    run: bool = True,
) -> pd.DataFrame:
    """Relax the crystals of ``dataset`` (filtered like the relaxation benchmark) with the
    bake-off's calculators (:func:`bakeoff_calculators`, plus the ``extra`` calculator specs)
    into ``out_dir`` and return the ranking (:func:`rank_methods`), also written to
    ``ranking.md`` / ``ranking.csv``. ``run=False``: only rank what the JSON lines hold."""
    from kd_nnp.evaluation.relax import run_relax_benchmark
    from kd_nnp.evaluation.runner import label_calculators

    settings = settings or BakeoffSettings()
    relax = relax or RelaxSettings()
    calcs, missing = bakeoff_calculators(settings)
    for label, spec in label_calculators(list(extra)).items():
        if label in calcs and calcs[label] != spec:
            raise KdNnpError(
                f"bake-off: --calc {spec!r} has the label {label!r} of {calcs[label]!r}"
            )
        calcs[label] = spec
    for name, why in missing:
        log.warning("bake-off: left out %s: %s", name, why)
    out = Path(out_dir)
    df = run_relax_benchmark(
        dataset,
        calcs,
        out,
        relax,
        workers=workers,
        limit=limit,
        max_atoms=max_atoms,
        codes=codes,
        references=False,
        progress=progress,
        run=run,
    )
    lat_summary = None
    lat_ref = None
    if settings.lattice:
        from kd_nnp.evaluation.lattice import run_lattice_benchmark, summarize_lattice

        ldf = run_lattice_benchmark(
            dataset,
            calcs,
            out / "lattice",
            relax,
            lattice or LatticeSettings(),
            relax_dir=out,
            workers=workers,
            limit=limit,
            max_atoms=max_atoms,
            codes=codes,
            progress=progress,
            run=run,
        )
        lat_ref = ldf.attrs.get("reference")
        lat_summary = summarize_lattice(ldf, lat_ref)
    table = rank_methods(df, n_boot=settings.n_boot, lattice=lat_summary)
    crystals = list(dict.fromkeys(df["id"]))
    write_ranking(
        table,
        out,
        crystals=crystals,
        dataset=dataset,
        protocol=relax.protocol(),
        missing=missing,
        lattice_reference=lat_ref,
    )
    table.attrs["missing"] = missing
    table.attrs["skipped"] = df.attrs.get("skipped", [])
    return table
