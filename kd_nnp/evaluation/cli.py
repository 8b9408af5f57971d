"""``kd-nnp evaluate relax|elastic``: the benchmarks from the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kd_nnp.utils.threads import set_threads


def _relax_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("relax", help="relax experimental crystals and compare with experiment")
    p.add_argument(
        "--calc",
        action="append",
        required=True,
        help="calculator spec (repeatable): chgnet, student:PATH, teacher:NAME, module:factory",
    )
    p.add_argument(
        "--dataset",
        default="pyxtal:test",
        help="pyxtal:test (default), pyxtal:mech, a CIF folder or cifs:DIR",
    )
    p.add_argument("--limit", type=int, default=None, help="first N crystals (after filters)")
    p.add_argument("--max-atoms", type=int, default=None, help="skip crystals with more atoms")
    p.add_argument("--codes", default=None, help="comma-separated crystal ids / CSD codes")
    p.add_argument("--workers", type=int, default=2, help="worker processes (1 thread each)")
    p.add_argument("--out", required=True, type=Path, help="output folder (resumable)")
    p.add_argument("--fmax", type=float, default=0.03, help="force threshold, eV/A")
    p.add_argument("--max-steps", type=int, default=2000, help="max LBFGS steps in total")
    p.add_argument(
        "--stress-tol",
        type=float,
        default=0.01,
        help="residual stress threshold max|sigma_ij|, GPa",
    )
    p.add_argument(
        "--exp-cell-factor",
        type=float,
        default=None,
        help="FrechetCellFilter exp_cell_factor (default: min(1, tol*V/fmax))",
    )
    p.add_argument("--no-rmsd", action="store_true", help="skip RMSD15")
    p.add_argument(
        "--no-references",
        action="store_true",
        help="do not add test.db's stored DFTB/ANI/GULP/CHARMM cells",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="only rebuild tables/plots from OUT/relax.jsonl (no new relaxations)",
    )


def _elastic_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("elastic", help="relax, fit stiffness tensors, compare moduli")
    p.add_argument("--calc", action="append", required=True, help="calculator spec (repeatable)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--structures", type=Path, help="folder of CIFs (or one CIF)")
    src.add_argument(
        "--shared",
        action="store_true",
        help="the 15 compounds in $KD_NNP_SHARED_DATA/elastic (or ../shared/data)",
    )
    p.add_argument("--limit", type=int, default=None, help="first N structures")
    p.add_argument("--out", required=True, type=Path)
    add_elastic_options(p, workers=2)


def add_elastic_options(p: argparse.ArgumentParser, *, workers: int) -> None:
    """Options shared by ``kd-nnp evaluate elastic`` and ``python -m kd_nnp.evaluation.table2``
    (read back with :func:`elastic_options`)."""
    p.add_argument(
        "--shared-dir",
        type=Path,
        default=None,
        help="shared data folder (default: kd_nnp.utils.paths.shared_data_dir())",
    )
    p.add_argument(
        "--all-files",
        action="store_true",
        help="shared data: every structure file of a compound, not only the first",
    )
    p.add_argument("--compounds", default=None, help="comma-separated compound names (shared)")
    p.add_argument("--max-atoms", type=int, default=None)
    p.add_argument("--strains", default="0.005,0.01", help="strain magnitudes (+/- each)")
    p.add_argument("--workers", type=int, default=workers)
    p.add_argument("--fmax", type=float, default=0.03)
    p.add_argument(
        "--ion-fmax",
        type=float,
        default=0.01,
        help="force threshold of the fixed-cell ion relaxations at each strain",
    )
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--stress-tol", type=float, default=0.01)
    p.add_argument("--quiet", action="store_true")


def elastic_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of the elastic benchmark from :func:`add_elastic_options`."""
    return {
        "shared_dir": args.shared_dir,
        "all_files": args.all_files,
        "compounds": [c for c in args.compounds.split(",") if c] if args.compounds else None,
        "max_atoms": args.max_atoms,
        "strains": [float(x) for x in args.strains.split(",") if x],
        "workers": args.workers,
        "fmax": args.fmax,
        "ion_fmax": args.ion_fmax,
        "max_steps": args.max_steps,
        "stress_tol_gpa": args.stress_tol,
        "progress": not args.quiet,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kd-nnp evaluate", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    _relax_parser(sub)
    _elastic_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_threads()
    codes = [c for c in args.codes.split(",") if c] if getattr(args, "codes", None) else None
    if args.bench == "relax":
        from kd_nnp.evaluation.relax import run_relax_benchmark, summarize

        df = run_relax_benchmark(
            args.dataset,
            list(args.calc),
            args.out,
            workers=args.workers,
            fmax=args.fmax,
            max_steps=args.max_steps,
            stress_tol_gpa=args.stress_tol,
            exp_cell_factor=args.exp_cell_factor,
            limit=args.limit,
            max_atoms=args.max_atoms,
            codes=codes,
            rmsd=not args.no_rmsd,
            references=not args.no_references,
            progress=not args.quiet,
            run=not args.report_only,
        )
        _print_summary(summarize(df))
        print(f"\nwrote {args.out}/table.md, table.csv, summary.csv, parity_*.png")
        return 0
    from kd_nnp.evaluation.elastic import run_elastic_benchmark

    res = run_elastic_benchmark(
        list(args.calc),
        args.out,
        structures=args.structures,
        shared=args.shared,
        limit=args.limit,
        **elastic_options(args),
    )
    print((args.out / "elastic.md").read_text())
    return 0 if res is not None else 1


def _print_summary(summ: object) -> None:
    import pandas as pd

    assert isinstance(summ, pd.DataFrame)
    cols = [
        c
        for c in (
            "method",
            "n_covered",
            "n_failures",
            "vol_mae_pct",
            "vol_mean_pct",
            "density_mae",
            "rmsd15_mean",
            "wall_s_mean",
        )
        if c in summ
    ]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(summ[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
