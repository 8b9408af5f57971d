"""Write the report of a training sweep: tables and figures (Fig. 4-6, Table 1), see
:mod:`kd_nnp.cli.report` for the verb."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kd_nnp.reports.load import FORGETTING_KEYS, RATIOS, Sweep
from kd_nnp.reports.tables import crossover_table, fig4_table, table1
from kd_nnp.utils.markdown import md_table

KINDS = ("fig4", "table1", "fig6")
MAX_MD_ROWS = 60


def auto_kinds(sweep: Sweep) -> list[str]:
    """What the sweep supports: fig4 if N_train varies, table1 if settings vary, fig6 if
    any job has a hard and soft energy history."""
    jobs = sweep.jobs
    kinds = []
    if len(jobs) and jobs["n_train"].nunique(dropna=True) > 1:
        kinds.append("fig4")
    if len(jobs) and jobs["setting"].nunique(dropna=True) > 1:
        kinds.append("table1")
    if any(
        any("mae_hard_energy" in r and "mae_soft_energy" in r for r in h)
        for h in sweep.histories.values()
    ):
        kinds.append("fig6")
    return kinds


def _values(series: pd.Series) -> str:
    vals = sorted(series.dropna().unique(), key=lambda v: (str(type(v)), v))
    return ", ".join(f"{v:g}" if isinstance(v, float | int | np.number) else str(v) for v in vals)


def _varies(sweep: Sweep) -> list[str]:
    jobs = sweep.jobs
    out = []
    for col in (*RATIOS, *sweep.dims, "n_train", "seed", "data_seed"):
        if col in jobs and jobs[col].nunique(dropna=True) > 1:
            out.append(f"`{col}` in {{{_values(jobs[col])}}}")
    return out


def _best_cell(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return ""
    return f"{mean:.3g} ({std:.2g})" if np.isfinite(std) else f"{mean:.3g}"


def _write_fig4(sweep: Sweep, out: Path) -> tuple[str, list[Path]]:
    from kd_nnp.reports import figures

    metrics, note = sweep.metrics()
    t = fig4_table(sweep, metrics)
    t.to_csv(out / "fig4.csv", index=False)
    view = t[["setting", "n_train", "n_jobs", "seeds"]].copy()
    for m in metrics:
        view[f"{m} mean (std)"] = [_best_cell(a, b) for a, b in zip(t[f"{m}_mean"], t[f"{m}_std"])]
        view[f"{m} n"] = t[f"{m}_n"]
    if sweep.has_evaluation:
        view["failures"] = t["n_failures_sum"]
    text = [f"# Fig. 4: metric vs N_train per loss setting\n\n{note}; mean (std) over seeds.\n"]
    text.append(md_table(view))
    if sweep.has_evaluation and len(sweep.baselines):
        text += ["\n\nBaselines (dashed lines):\n", md_table(sweep.baselines)]
    body = "\n".join(text) + "\n"
    (out / "fig4.md").write_text(body)
    fig = figures.fig4(sweep)
    paths = [out / "fig4.csv", out / "fig4.md", figures.save(fig, out / "fig4.png")]
    if len(sweep.baselines):
        sweep.baselines.to_csv(out / "baselines.csv", index=False)
        paths.append(out / "baselines.csv")
    return body, paths


def _write_table1(sweep: Sweep, out: Path) -> tuple[str, list[Path]]:
    from kd_nnp.reports import figures

    _, note = sweep.metrics()
    t = table1(sweep)
    t.to_csv(out / "table1.csv", index=False)
    cols = ["r_he", "r_hf"]
    cols += [c for c in (*RATIOS, *sweep.dims) if c not in cols and t[c].nunique(dropna=False) > 1]
    view = t[cols].copy()
    metric = t["metric"].iloc[0] if len(t) else sweep.primary_metric()
    view[f"best {metric} (std)"] = [_best_cell(a, b) for a, b in zip(t["best_mean"], t["best_std"])]
    view["optimal N_train"] = t["best_n_train"]
    view["seeds"] = t["best_n"]
    view["N_train tried"] = t["n_train_values"]
    body = (
        "# Table 1: best seed-mean metric per loss setting and the N_train where it occurs\n\n"
        f"{note}.\n\n{md_table(view)}\n"
    )
    (out / "table1.md").write_text(body)
    fig = figures.fig5(sweep)
    return body, [out / "table1.csv", out / "table1.md", figures.save(fig, out / "fig5.png")]


def _write_fig6(
    sweep: Sweep, out: Path, r_hf: float | None, n_train: float | None
) -> tuple[str, list[Path]]:
    from kd_nnp.reports import figures

    c = crossover_table(sweep)
    c.to_csv(out / "crossover.csv", index=False)
    fig = figures.fig6(sweep, r_hf=r_hf, n_train=n_train)
    n_val = int(np.isfinite(c["crossover_epoch"].astype(float)).sum()) if len(c) else 0
    body = f"Crossover (first epoch with MAE_H,E > MAE_S,E, val split) in {n_val} of {len(c)} jobs."
    return body, [out / "crossover.csv", figures.save(fig, out / "fig6.png")]


FORGETTING_NOTE = (
    "Per loss setting and N_train, mean (std) over seeds of the forgetting check "
    "(`kd-nnp evaluate forgetting`, docs/evaluation.md): `forget_e_mae_ev_atom` energy MAE "
    "(eV/atom) and `forget_f_mae_ev_a` force MAE (eV/A) vs pretrained CHGNet on inorganic and "
    "hybrid structures (+ MPtrj frames), `forget_dv_mae_pct` mean |relaxed-volume change| (%) "
    "vs pretrained CHGNet. Larger = the student moved further from the base model."
)


def _write_forgetting(sweep: Sweep, out: Path) -> tuple[str, list[Path]]:
    metrics = tuple(FORGETTING_KEYS)
    t = fig4_table(sweep, metrics)
    t.to_csv(out / "forgetting.csv", index=False)
    view = t[["setting", "n_train", "n_jobs"]].copy()
    for m in metrics:
        view[f"{m} mean (std)"] = [_best_cell(a, b) for a, b in zip(t[f"{m}_mean"], t[f"{m}_std"])]
    body = f"{FORGETTING_NOTE} [forgetting.csv](forgetting.csv)\n\n{md_table(view)}"
    return body, [out / "forgetting.csv"]


def write_report(
    sweep: Sweep,
    out: Path,
    kinds: list[str],
    fig6_r_hf: float | None = None,
    fig6_n_train: float | None = None,
) -> list[Path]:
    """Write the tables, figures and ``report.md`` for ``kinds``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    sweep.jobs.to_csv(out / "jobs.csv", index=False)
    sweep.failed.to_csv(out / "failed.csv", index=False)
    written += [out / "jobs.csv", out / "failed.csv"]
    _, note = sweep.metrics()
    md = [
        "# Sweep report",
        "",
        f"Sweep directory: `{sweep.root}`",
        "",
        f"- finished jobs: {sweep.n_finished}",
        f"- failed/unfinished jobs (no metrics.json): {sweep.n_failed} ([failed.csv](failed.csv))",
        f"- what varies: {'; '.join(_varies(sweep)) or 'nothing (one setting)'}",
        f"- metric: {note}",
    ]
    datasets = sweep.jobs["eval_dataset"].dropna().unique() if len(sweep.jobs) else []
    if len(datasets):
        n_eval = int(sweep.jobs["vol_mae_pct"].notna().sum())
        md.append(
            f"- evaluated jobs: {n_eval} of {sweep.n_finished} (dataset: {_values(pd.Series(datasets))})"
        )
    md += [f"- warning: {w}" for w in sweep.warnings]
    md += ["", "## Jobs", "", "One row per finished job: [jobs.csv](jobs.csv).", ""]
    if sweep.n_finished and sweep.n_finished <= MAX_MD_ROWS:
        metrics, _ = sweep.metrics()
        cols = ["job", *RATIOS, *sweep.dims, "n_train", "seed", "epochs", *metrics]
        cols += ["crossover_epoch"]
        if sweep.has_forgetting:
            cols += list(FORGETTING_KEYS)
        md.append(md_table(sweep.jobs, cols))
    if sweep.has_forgetting:
        body, paths = _write_forgetting(sweep, out)
        written += paths
        md += ["", "## Forgetting: distance from pretrained CHGNet outside organic crystals", "",
               body]  # fmt: skip
    if sweep.n_failed:
        md += ["", "## Failed / unfinished jobs", "", md_table(sweep.failed, ["job", "reason"])]
    if sweep.n_finished:
        if "fig4" in kinds:
            body, paths = _write_fig4(sweep, out)
            written += paths
            md += ["", "## Fig. 4 style", "", "![fig4](fig4.png)", "", "[fig4.csv](fig4.csv), "
                   "[fig4.md](fig4.md)", "", body.split("\n", 2)[2]]  # fmt: skip
        if "table1" in kinds:
            body, paths = _write_table1(sweep, out)
            written += paths
            md += ["", "## Table 1 style and Fig. 5", "", "![fig5](fig5.png)", "",
                   "[table1.csv](table1.csv), [table1.md](table1.md)", "",
                   body.split("\n", 2)[2]]  # fmt: skip
        if "fig6" in kinds:
            body, paths = _write_fig6(sweep, out, fig6_r_hf, fig6_n_train)
            written += paths
            md += ["", "## Fig. 6 style: loss curves and crossover", "", "![fig6](fig6.png)",
                   "", f"[crossover.csv](crossover.csv). {body}"]  # fmt: skip
    (out / "report.md").write_text("\n".join(md).rstrip() + "\n")
    written.append(out / "report.md")
    return written
