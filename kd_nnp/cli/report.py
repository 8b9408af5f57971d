"""``kd-nnp report SWEEP_DIR``: tables and figures of a training sweep (Fig. 4-6, Table 1).

Writes into ``SWEEP_DIR/report/`` (or ``--out``): ``jobs.csv`` (one row per finished job),
``failed.csv`` (jobs without ``metrics.json``), ``report.md`` linking everything, and by what
varies in the sweep (or ``--kind``): ``fig4.{md,csv,png}`` (N_train varies), ``table1.{md,csv}``
+ ``fig5.png`` (several loss settings), ``fig6.png`` + ``crossover.csv`` (loss histories).

Exit status: 0 = report written, 1 = written but no job has finished, 2 = bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kd_nnp.reports.load import SweepError, load_sweep
from kd_nnp.reports.write import KINDS, auto_kinds, write_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kd-nnp report",
        description="Aggregate a `kd-nnp train -m` sweep directory into tables and figures.",
    )
    p.add_argument("sweep_dir", type=Path, help="the sweep directory (hydra.sweep.dir)")
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default SWEEP_DIR/report)"
    )
    p.add_argument(
        "--kind",
        action="append",
        choices=("auto", "all", *KINDS),
        default=None,
        help="what to produce (repeatable); default auto: fig4 when N_train varies, table1 "
        "(+fig5) when several loss settings exist, fig6 when loss histories exist",
    )
    p.add_argument("--fig6-r-hf", type=float, default=None, help="rHF of the Fig. 6 loss curves")
    p.add_argument(
        "--fig6-n-train", type=float, default=None, help="N_train of the Fig. 6 loss curves"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sweep = load_sweep(args.sweep_dir)
    except SweepError as exc:
        print(f"kd-nnp report: {exc}", file=sys.stderr)
        return 2
    for w in sweep.warnings:
        print(f"kd-nnp report: warning: {w}", file=sys.stderr)
    requested = args.kind or ["auto"]
    if "all" in requested:
        kinds = list(KINDS)
    else:
        kinds = [k for k in requested if k in KINDS]
        if "auto" in requested:
            kinds += [k for k in auto_kinds(sweep) if k not in kinds]
    out = args.out or sweep.root / "report"
    written = write_report(sweep, out, kinds, args.fig6_r_hf, args.fig6_n_train)
    print(f"{sweep.root}: {sweep.n_finished} finished, {sweep.n_failed} failed/unfinished")
    for _, r in sweep.failed.iterrows():
        print(f"  failed/unfinished: {r['job']}: {r['reason']}")
    print(f"report ({', '.join(kinds) or 'jobs table only'}): {out / 'report.md'}")
    for p in written:
        print(f"  {p}")
    if not sweep.n_finished:
        print(f"kd-nnp report: no finished job (metrics.json) in {sweep.root}", file=sys.stderr)
        return 1
    return 0
