"""Relaxation benchmark report: Markdown and CSV tables, parity plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kd_nnp.evaluation.stats import summarize
from kd_nnp.utils import markdown

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
    ("vol_std_mean_pct", "V std %"),
    ("n_volume_uncertain", "uncertain"),
    ("spearman_vol_std_abs_err", "rho(std, |V err|)"),
    ("rmsd15_mean", "RMSD15 A"),
    ("rmsd15_matched_mean", "matched/15"),
    ("steps_mean", "steps"),
    ("wall_s_mean", "s/crystal"),
    ("stress_max_gpa_max", "max |sigma| GPa"),
]


def md_table(df: pd.DataFrame, cols: Sequence[tuple[str, str]] | None = None) -> str:
    """The benchmark's Markdown tables: :func:`kd_nnp.utils.markdown.md_table`, 3 digits."""
    return markdown.md_table(df, cols, "{:.3g}")


def write_report(
    df: pd.DataFrame, out_dir: str | Path, *, skipped: Sequence[tuple[str, str]] = ()
) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv`` (per crystal), ``summary.csv`` and parity plots
    ``parity_volume.png`` / ``parity_density.png`` into ``out_dir``; ``skipped`` (file,
    reason) are the structures that could not be read, listed in ``table.md``."""
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
    if "vol_std_mean_pct" in summ:
        md += ["", "Committee students: `V std %` is the mean volume uncertainty (std over the "
               "heads, `kd_nnp.evaluation.protocol.committee_volume_spread`), `uncertain` the "
               "crystals above the threshold, `rho(std, |V err|)` the Spearman rank "
               "correlation of uncertainty and actual |volume error|."]  # fmt: skip
    md += ["", md_table(summ, _MD_SUMMARY), ""]
    fails = df[df["failure"] != ""]
    md += ["## Failures", ""]
    if len(fails):
        md.append(md_table(fails, [("method", "method"), ("id", "crystal"), ("failure", "reason")]))
    else:
        md.append("none")
    if skipped:
        md += ["", "## Skipped structures (unreadable)", ""]
        md.append(md_table(pd.DataFrame(list(skipped), columns=["file", "reason"])))
    md += ["", "## Per crystal", ""]
    per = df[~df["reference"]] if "reference" in df else df
    md.append(
        md_table(
            per,
            [
                ("method", "method"),
                ("id", "crystal"),
                ("natoms", "atoms"),
                ("vol_err_pct", "V err %"),
                ("volume_std_pct", "V std %"),
                ("volume_uncertain", "uncertain"),
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


PARITY_COLUMNS = 3


def parity_plot(df: pd.DataFrame, xcol: str, ycol: str, label: str, path: Path) -> None:
    """Predicted vs experimental, one panel per method in a grid of at most
    ``PARITY_COLUMNS`` columns; axis limits padded to hold every point; crystals with a
    ``failure`` (not converged, broken molecules, blown-up volume) drawn as red crosses and
    counted in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(df["method"])) if len(df) else []
    n = max(len(methods), 1)
    ncols = min(n, PARITY_COLUMNS)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.6 * nrows), squeeze=False)
    vals = pd.concat([df[xcol], df[ycol]]).astype(float) if len(df) else pd.Series(dtype=float)
    vals = vals[np.isfinite(vals)]
    if len(vals):
        lo, hi = float(vals.min()), float(vals.max())
        pad = 0.06 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1.0)
        lo, hi = lo - pad, hi + pad
    else:
        lo, hi = 0.0, 1.0
    flat = axes.ravel()
    for ax in flat[n:]:
        ax.set_visible(False)
    for ax, method in zip(flat, methods or ["(no data)"], strict=False):
        g = df[df["method"] == method] if methods else df
        if len(g):
            failed = (
                g["failure"].fillna("").astype(str) != ""
                if "failure" in g
                else pd.Series(False, index=g.index)
            )
            x, y = g[xcol].astype(float), g[ycol].astype(float)
            good = ~failed
            ax.scatter(x[good], y[good], s=14, alpha=0.8, marker="o", label=f"ok ({good.sum()})")
            if failed.any():
                ax.scatter(
                    x[failed], y[failed], s=30, marker="x", color="red",
                    label=f"failed ({failed.sum()})",
                )  # fmt: skip
            mae = np.mean(np.abs(y / x - 1.0)) * 100
            ax.set_title(f"{method}\nn={len(g)}  MAPE={mae:.1f}%", fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel(f"experimental {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
