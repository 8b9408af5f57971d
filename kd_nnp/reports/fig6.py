"""Fig. 6 job selection: one job per row (a loss setting without rHF) for its loss curves."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kd_nnp.reports.load import RATIO_LABELS, RATIOS, Sweep


def fig6_selection(
    sweep: Sweep, r_hf: float | None = None, n_train: float | None = None
) -> pd.DataFrame:
    """One job per row of Fig. 6 (all ratios but r_hf, plus extra dims), for its loss curves.

    Within a row: the job with r_hf = ``r_hf`` (default: the one closest to 1 on a log scale),
    then n_train = ``n_train`` (default: the largest), then the lowest seed.
    """
    cols = ["row", *[c for c in sweep.jobs.columns if c != "row"]]
    if not len(sweep.jobs):
        return pd.DataFrame(columns=cols)
    jobs = sweep.jobs.copy()
    jobs["row"] = [_row_label(r, sweep.dims) for _, r in jobs.iterrows()]
    picked = []
    for _, g in jobs.groupby("row", sort=False):
        g = g.copy()
        if r_hf is not None and (np.isclose(g["r_hf"], r_hf)).any():
            g = g[np.isclose(g["r_hf"], r_hf)]
        else:
            dist = np.abs(np.log10(np.clip(g["r_hf"].astype(float).fillna(0), 1e-12, None)))
            g = g[dist == dist.min()]
        if n_train is not None and (np.isclose(g["n_train"], n_train)).any():
            g = g[np.isclose(g["n_train"], n_train)]
        else:
            g = g[g["n_train"] == g["n_train"].max()] if g["n_train"].notna().any() else g
        picked.append(g.sort_values("seed", kind="stable").iloc[0])
    df = pd.DataFrame(picked)
    keys = [c for c in (*RATIOS, *sweep.dims) if c in df]
    return df.sort_values(keys, kind="stable").reset_index(drop=True)[cols]


def _row_label(row: pd.Series, dims: list[str]) -> str:
    """Fig. 6 row label: the setting without r_hf (the rows are r_he values in the paper)."""
    parts = [
        f"{RATIO_LABELS[k]}={row[k]:g}"
        for k in RATIOS
        if k != "r_hf" and np.isfinite(row[k]) and row[k] != 0
    ]
    parts += [f"{k}={row[k]}" for k in dims]
    return ", ".join(parts) or "all ratios 0"


def fig6_rows(sweep: Sweep) -> pd.DataFrame:
    """The jobs with a ``row`` column (Fig. 6 row label), for the per-row metric-vs-N panels."""
    jobs = sweep.jobs.copy()
    jobs["row"] = [_row_label(r, sweep.dims) for _, r in jobs.iterrows()] if len(jobs) else []
    return jobs
