"""Figures of a sweep report (Fig. 4, 5 and 6 of Taniguchi 2025, from a :class:`Sweep`).

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot state): saved with
the Agg canvas, they work headless, in worker processes and inside notebooks alike. Each
function returns the figure; :func:`save` writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogFormatter, NullFormatter

from kd_nnp.reports.fig6 import fig6_rows, fig6_selection
from kd_nnp.reports.load import Sweep
from kd_nnp.reports.tables import fig4_table, history_frame, table1

LABELS = {
    "vol_mae_pct": "volume MAE (%)",
    "vol_mean_pct": "mean volume error (%)",
    "density_mae": "density MAE (g/cm³)",
    "rmsd15_mean": "RMSD15 (Å)",
    "val/mae_soft_energy": "val MAE_S,E (eV/atom)",
    "val/mae_hard_energy": "val MAE_H,E (eV/atom)",
}
BASELINE_COLORS = ("navy", "orange", "grey", "green", "purple")
KIND_MARKERS = {"hard only": "s", "soft only": "o", "hard+soft": "^", "none": "x"}


def save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` (PNG by suffix) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _scale(values: Any) -> tuple[str, dict[str, Any]]:
    """'log' when every value is > 0, 'symlog' (0 shown) when some are 0, else 'linear'."""
    v = np.asarray([x for x in np.asarray(values, dtype=float) if np.isfinite(x)])
    if not len(v) or (v < 0).any():
        return "linear", {}
    if (v > 0).all():
        return "log", {}
    pos = v[v > 0]
    if not len(pos):
        return "linear", {}
    return "symlog", {"linthresh": float(pos.min()), "linscale": 0.5}


def _set_scale(ax: Any, values: Any, ticks: bool = False, axis: str = "x") -> None:
    """Log-type axis; with ``ticks`` the (few) distinct values are the labelled ticks."""
    name, kw = _scale(values)
    getattr(ax, f"set_{axis}scale")(name, **kw)
    v = sorted({float(x) for x in np.asarray(values, dtype=float) if np.isfinite(x)})
    if ticks and 0 < len(v) <= 12:
        ax_ = ax.xaxis if axis == "x" else ax.yaxis
        ax_.set_ticks(v)
        ax_.set_major_formatter(FormatStrFormatter("%g"))
        ax_.set_minor_formatter(NullFormatter())


def _empty(ax: Any, text: str = "no finite value") -> None:
    if not ax.has_data():
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def _baselines(ax: Any, sweep: Sweep, metric: str) -> None:
    if metric not in sweep.baselines:
        return
    for i, (_, b) in enumerate(sweep.baselines.iterrows()):
        value = b[metric]
        if np.isfinite(value):
            ax.axhline(
                value,
                ls="--",
                lw=1.2,
                color=BASELINE_COLORS[i % len(BASELINE_COLORS)],
                label=f"{b['label']} ({value:.3g})",
            )


def _errorbars(ax: Any, table: pd.DataFrame, metric: str, group: str, label_fmt: str) -> None:
    for key, g in table.groupby(group, sort=False):
        g = g.sort_values("n_train")
        ok = np.isfinite(g[f"{metric}_mean"].astype(float))
        if not ok.any():
            continue
        g = g[ok]
        kind = g["loss_kind"].iloc[0] if "loss_kind" in g else "none"
        ax.errorbar(
            g["n_train"].astype(float),
            g[f"{metric}_mean"].astype(float),
            yerr=g[f"{metric}_std"].astype(float).fillna(0.0),
            marker=KIND_MARKERS.get(kind, "o"),
            ms=4,
            capsize=3,
            label=label_fmt.format(key),
        )


def fig4(sweep: Sweep) -> Figure:
    """Metric vs N_train, mean ± std over seeds, one line per loss setting (Fig. 4a style).

    With evaluations: volume MAE and signed mean volume error, with the baselines (pretrained
    CHGNet, teacher, ...) as dashed lines. Without: the validation energy MAEs, said in the
    title.
    """
    metrics, note = sweep.metrics()
    panels = metrics[:2]
    table = fig4_table(sweep, tuple(panels))
    fig = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, metric in zip(axes, panels):
        _errorbars(ax, table, metric, "setting", "{}")
        if sweep.has_evaluation:
            _baselines(ax, sweep, metric)
        if metric == "vol_mean_pct":
            ax.axhline(0.0, color="k", lw=0.6)
        _set_scale(ax, table["n_train"], ticks=True)
        _empty(ax)
        ax.set_xlabel("N_train")
        ax.set_ylabel(LABELS.get(metric, metric))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"Fig. 4 style: mean ± std over seeds; {note}", fontsize=9)
    return fig


def fig5(sweep: Sweep) -> Figure:
    """Best seed-mean metric (a) and the N_train where it occurs (b) over (rHE, rHF)."""
    t = table1(sweep)
    metric = t["metric"].iloc[0] if len(t) else sweep.primary_metric()
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    x, y = t["r_he"].astype(float), t["r_hf"].astype(float)
    for ax, col, title in (
        (axes[0], "best_mean", f"(a) best {LABELS.get(metric, metric)}"),
        (axes[1], "best_n_train", "(b) N_train of the best"),
    ):
        c = t[col].astype(float)
        ok = np.isfinite(c)
        if ok.any():
            cpos = c[ok]
            norm = (
                LogNorm(cpos.min(), cpos.max())
                if col == "best_n_train" and (cpos > 0).all() and cpos.max() > cpos.min()
                else Normalize(cpos.min(), cpos.max() if cpos.max() > cpos.min() else None)
            )
            sc = ax.scatter(x[ok], y[ok], c=cpos, cmap="viridis", norm=norm, s=120, ec="k")
            fig.colorbar(sc, ax=ax)
            for xi, yi, ci in zip(x[ok], y[ok], cpos):
                ax.annotate(
                    f"{ci:.3g}", (xi, yi), fontsize=7, xytext=(6, 6), textcoords="offset points"
                )
        if (~ok).any():
            ax.scatter(x[~ok], y[~ok], marker="x", color="grey", label="no finite value")
            ax.legend(fontsize=7)
        _set_scale(ax, x, ticks=True)
        _empty(ax)
        _set_scale(ax, y, ticks=True, axis="y")
        ax.set_xlabel("rHE")
        ax.set_ylabel("rHF")
        ax.set_title(title, fontsize=9)
    _, note = sweep.metrics()
    fig.suptitle(f"Fig. 5 style: {note}", fontsize=9)
    return fig


def _curves(ax: Any, hist: pd.DataFrame, qty: str, cross: dict[str, float]) -> None:
    colors = {"hard": "tab:blue", "soft": "tab:orange"}
    styles = {"val": "-", "train": "--", "test": ":"}
    values: list[float] = []
    for split, h in hist.groupby("split", sort=False):
        for tgt in ("hard", "soft"):
            key = f"mae_{tgt}_{qty}"
            if key not in h:
                continue
            pts = h[["epoch", key]].dropna()
            if not len(pts):
                continue
            values += list(pts[key].astype(float))
            ax.plot(
                pts["epoch"],
                pts[key],
                styles.get(str(split), "-"),
                color=colors[tgt],
                marker="o",
                ms=3,
                label=f"MAE {tgt[0].upper()},{qty[0].upper()} ({split})",
            )
    if values and (np.asarray(values) > 0).all():
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    if qty == "energy":
        for split, ep in cross.items():
            if np.isfinite(ep):
                ax.axvline(
                    ep,
                    color="grey",
                    ls=styles.get(split, "-"),
                    lw=1,
                    label=f"crossover ({split}) @ {ep:g}",
                )
    ax.set_xlabel("epoch (0 = pretrained)")
    ax.set_ylabel(f"MAE ({'eV/atom' if qty == 'energy' else 'eV/Å'})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def fig6(sweep: Sweep, r_hf: float | None = None, n_train: float | None = None) -> Figure:
    """One row per rHE (with the other ratios): metric vs N_train per rHF, and the energy and
    force MAE curves (hard vs soft) of one job with the crossover epoch marked (Fig. 6 style).

    The job of each row: rHF = ``r_hf`` (default closest to 1), N_train = ``n_train``
    (default the largest), lowest seed; its name is in the row title.
    """
    sel = fig6_selection(sweep, r_hf=r_hf, n_train=n_train)
    jobs = fig6_rows(sweep)
    metric = sweep.primary_metric()
    nrows = max(len(sel), 1)
    fig = Figure(figsize=(16, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, 3, squeeze=False)
    for i, (_, job) in enumerate(sel.iterrows()):
        ax_m, ax_e, ax_f = axes[i]
        sub = Sweep(
            sweep.root,
            jobs[jobs["row"] == job["row"]].drop(columns="row"),
            sweep.failed,
            sweep.histories,
            sweep.baselines,
            sweep.dims,
        )
        table = fig4_table(sub, (metric,))
        table["r_hf_label"] = [f"rHF={v:g}" for v in table["r_hf"]]
        _errorbars(ax_m, table, metric, "r_hf_label", "{}")
        if sweep.has_evaluation:
            _baselines(ax_m, sweep, metric)
        _set_scale(ax_m, table["n_train"], ticks=True)
        _empty(ax_m)
        ax_m.set_xlabel("N_train")
        ax_m.set_ylabel(LABELS.get(metric, metric))
        ax_m.set_title(job["row"], fontsize=9)
        if ax_m.get_legend_handles_labels()[0]:
            ax_m.legend(fontsize=7)
        hist = history_frame(sweep, job["job"])
        cross = {"val": job["crossover_epoch"], "train": job["crossover_epoch_train"]}
        _curves(ax_e, hist, "energy", cross)
        _curves(ax_f, hist, "forces", {})
        where = f"rHF={job['r_hf']:g}, N_train={job['n_train']:g}, seed={job['seed']:g}"
        ax_e.set_title(f"energy, job {job['job'].split('_', 1)[0]}: {where}", fontsize=9)
        ax_f.set_title("forces", fontsize=9)
        _empty(ax_e, "no history")
        _empty(ax_f, "no force MAE logged (energy-only run?)")
    if not len(sel):
        axes[0][0].text(0.5, 0.5, "no finished job", ha="center", transform=axes[0][0].transAxes)
    _, note = sweep.metrics()
    fig.suptitle(f"Fig. 6 style; left: {note}", fontsize=9)
    return fig
