"""Statistics of relaxation results: per-method summary, paired distance to a reference."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd


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
        row.update(volume_uncertainty(ok))
        for col in ("steps", "wall_s", "stress_max_gpa"):
            row[f"{col}_mean"] = ok[col].astype(float).mean() if col in ok else math.nan
        if "stress_max_gpa" in ok:
            row["stress_max_gpa_max"] = ok["stress_max_gpa"].astype(float).max()
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out = out.sort_values(["reference", "method"], kind="stable").reset_index(drop=True)
    return out


def volume_uncertainty(ok: pd.DataFrame) -> dict[str, Any]:
    """A committee's volume uncertainty against its actual error (empty without one): the
    mean ``volume_std_pct``, how many crystals are flagged (``volume_uncertain``) and the
    Spearman rank correlation of ``volume_std_pct`` with ``|vol_err_pct|`` (NaN below 3
    crystals or for constant values)."""
    if "volume_std_pct" not in ok:
        return {}
    std = pd.to_numeric(ok["volume_std_pct"], errors="coerce")
    have = std.notna()
    if not have.any():
        return {}
    err = ok["vol_err_pct"].astype(float).abs()
    rho = math.nan
    if int(have.sum()) >= 3 and std[have].nunique() > 1 and err[have].nunique() > 1:
        from scipy.stats import spearmanr

        rho = float(spearmanr(std[have], err[have]).statistic)
    flags = ok["volume_uncertain"] if "volume_uncertain" in ok else pd.Series(dtype=bool)
    return {
        "vol_std_mean_pct": float(std[have].mean()),
        "n_vol_std": int(have.sum()),
        "n_volume_uncertain": int(flags.fillna(False).astype(bool).sum()),
        "spearman_vol_std_abs_err": rho,
    }


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


def bootstrap_ci(
    values: Any, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95, absolute: bool = True
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (of ``|values|`` with
    ``absolute``: the interval of an MAE), resampling the values (crystals) with replacement
    ``n_boot`` times with a seeded generator. NaN for no values."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if absolute:
        v = np.abs(v)
    if not len(v):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(int(n_boot), len(v)))].mean(axis=1)
    tail = 0.5 * (1.0 - level)
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)
