"""Sweep tables: Fig. 4 (metric vs N_train per loss setting), Table 1 (best N_train per setting),
crossover epochs and per-job histories. Statistics over seeds use every finite value and the
sample standard deviation (``ddof=1``; NaN for a single value), as the paper's error bars.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from kd_nnp.reports.load import CURVE_KEYS, RATIOS, Sweep


def _setting_cols(sweep: Sweep) -> list[str]:
    return ["setting", "loss_kind", *RATIOS, *sweep.dims]


def _sorted_settings(df: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in (*RATIOS, "setting") if c in df]
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


def _stats(values: pd.Series) -> tuple[float, float, int]:
    v = pd.to_numeric(values, errors="coerce").astype(float)
    v = v[np.isfinite(v)]
    if not len(v):
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, int(len(v))


def fig4_table(sweep: Sweep, metrics: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Per (loss setting, n_train): mean, std and count over seeds of each metric."""
    metrics = metrics or sweep.metrics()[0]
    scols = _setting_cols(sweep)
    cols = [*scols, "n_train", "n_jobs", "seeds"]
    for m in metrics:
        cols += [f"{m}_mean", f"{m}_std", f"{m}_n"]
    cols += ["n_failures_sum"]
    if not len(sweep.jobs):
        return pd.DataFrame(columns=cols)
    out = []
    jobs = sweep.jobs.copy()
    for _, g in jobs.groupby([*scols, "n_train"], sort=False, dropna=False):
        first = g.iloc[0]
        r: dict[str, Any] = {c: first[c] for c in scols}
        r["n_train"] = first["n_train"]
        r["n_jobs"] = len(g)
        r["seeds"] = ";".join(f"{s:g}" for s in sorted(g["seed"].dropna().unique()))
        for m in metrics:
            r[f"{m}_mean"], r[f"{m}_std"], r[f"{m}_n"] = _stats(g[m])
        nf = pd.to_numeric(g["n_failures"], errors="coerce")
        r["n_failures_sum"] = float(nf.sum()) if nf.notna().any() else math.nan
        out.append(r)
    df = pd.DataFrame(out, columns=cols)
    keys = [c for c in (*RATIOS, *sweep.dims, "n_train") if c in df]
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


def table1(sweep: Sweep, metric: str | None = None) -> pd.DataFrame:
    """Per loss setting: the lowest seed-mean ``metric`` over n_train and where it occurs."""
    metric = metric or sweep.primary_metric()
    scols = _setting_cols(sweep)
    cols = [*scols, "metric", "best_mean", "best_std", "best_n", "best_n_train", "n_train_values"]
    f4 = fig4_table(sweep, (metric,))
    if not len(f4):
        return pd.DataFrame(columns=cols)
    out = []
    for _, g in f4.groupby(scols, sort=False, dropna=False):
        first = g.iloc[0]
        r: dict[str, Any] = {c: first[c] for c in scols}
        r["metric"] = metric
        means = g[f"{metric}_mean"].astype(float)
        finite = g[np.isfinite(means)]
        if len(finite):
            best = finite.loc[finite[f"{metric}_mean"].astype(float).idxmin()]
            r["best_mean"] = float(best[f"{metric}_mean"])
            r["best_std"] = float(best[f"{metric}_std"])
            r["best_n"] = int(best[f"{metric}_n"])
            r["best_n_train"] = float(best["n_train"])
        else:
            r.update(best_mean=math.nan, best_std=math.nan, best_n=0, best_n_train=math.nan)
        r["n_train_values"] = ";".join(f"{n:g}" for n in sorted(g["n_train"].dropna().unique()))
        out.append(r)
    return _sorted_settings(pd.DataFrame(out, columns=cols))


def crossover_table(sweep: Sweep) -> pd.DataFrame:
    """One row per finished job: ratios, n_train, seed and the val/train crossover epochs."""
    cols = [
        "job",
        *RATIOS,
        *sweep.dims,
        "n_train",
        "seed",
        "crossover_epoch",
        "crossover_epoch_train",
    ]
    if not len(sweep.jobs):
        return pd.DataFrame(columns=cols)
    df = sweep.jobs[cols].copy()
    keys = [c for c in (*RATIOS, *sweep.dims, "n_train", "seed") if c in df]
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


def history_frame(sweep: Sweep, job: str) -> pd.DataFrame:
    """A job's per-epoch history (split, epoch, mae_*) as a DataFrame sorted by epoch."""
    rows = sweep.histories.get(job) or []
    df = pd.DataFrame(rows)
    if not len(df):
        return pd.DataFrame(columns=["split", "epoch", *CURVE_KEYS])
    if "split" not in df:
        df["split"] = "val"
    return df.sort_values(["split", "epoch"], kind="stable").reset_index(drop=True)
