"""``kd-nnp evaluate relax|teachers|elastic|table2|forgetting|lattice|frames|cv``: the benchmarks
from the command line (``teachers``: the teacher bake-off, :mod:`kd_nnp.evaluation.bakeoff`;
``frames``: errors against a store's labels on every atom, :mod:`kd_nnp.evaluation.frames`).

``cv`` (leave-molecule-out cross-validation, :mod:`kd_nnp.evaluation.cv`) is a Hydra verb:
``kd-nnp evaluate cv cv.folds=5 teacher=so3lr ...`` composes ``conf/evaluate/cv.yaml``.

Every protocol option is generated from the settings dataclasses of
:mod:`kd_nnp.evaluation.settings` (help text included): nothing here spells them again.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kd_nnp.evaluation.settings import (
    BakeoffSettings,
    ElasticJobSettings,
    ElasticSettings,
    EvalJobSettings,
    ForgettingSettings,
    LatticeSettings,
    RelaxSettings,
)
from kd_nnp.utils.settings import add_options, from_args
from kd_nnp.utils.threads import set_threads

# the crystal selection of `evaluate relax` (fields of the per-job evaluate block)
_RELAX_SELECTION = ("dataset", "limit", "max_atoms", "codes", "workers", "references")
# the crystal selection of `evaluate lattice` (no test.db reference cells: they hold no energy)
_LATTICE_SELECTION = tuple(k for k in _RELAX_SELECTION if k != "references")
# the structure selection of `evaluate elastic|table2`
_ELASTIC_SELECTION = ("shared_dir", "compounds", "all_files", "max_atoms", "workers")


def _exclude(cls: type, keep: tuple[str, ...]) -> tuple[str, ...]:
    import dataclasses

    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in keep)


def _add_crystal_options(
    p: argparse.ArgumentParser,
    selection: tuple[str, ...],
    defaults: dict[str, object],
    *,
    calc_help: str | None = None,
) -> None:
    """``--calc``, the crystal selection (fields of the per-job evaluate block), the relaxation
    protocol, ``--out`` and ``--quiet``: what `evaluate relax`, `lattice` and `teachers` share
    (``calc_help``: ``--calc`` is optional, more calculators beside the verb's own)."""
    p.add_argument(
        "--calc",
        action="append",
        required=calc_help is None,
        default=[],
        help=calc_help
        or "calculator spec (repeatable): chgnet, student:PATH, teacher:NAME, module:factory",
    )
    add_options(p, EvalJobSettings, exclude=_exclude(EvalJobSettings, selection), defaults=defaults)
    add_options(p, RelaxSettings)
    p.add_argument("--out", required=True, type=Path, help="output folder (resumable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _relax_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("relax", help="relax experimental crystals and compare with experiment")
    _add_crystal_options(p, _RELAX_SELECTION, {"workers": 2, "references": True})
    p.add_argument(
        "--report-only",
        action="store_true",
        help="only rebuild tables/plots from OUT/relax.jsonl (no new relaxations)",
    )


LATTICE_HELP = """lattice energies E_latt = (E_crystal - sum_k count_k E_gas_k) / sum_k count_k
(kJ/mol per molecule): each crystal relaxed with the relaxation protocol (into OUT/relax, or
--relax-dir: a relaxation benchmark folder of the same crystals and calculators is reused),
each distinct molecule of the experimental cell relaxed alone in a periodic box with
--clearance A to its images. Table: one column per method, the spread between methods and
MAE / signed mean against --reference (default: the first teacher:NAME). Resumable."""


def _lattice_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lattice", help="lattice energies (relaxed crystal vs gas-phase molecules)",
                       description=LATTICE_HELP)  # fmt: skip
    _add_crystal_options(p, _LATTICE_SELECTION, {"workers": 2})
    add_options(p, LatticeSettings)
    p.add_argument(
        "--relax-dir",
        type=Path,
        default=None,
        help="folder of the crystal relaxations (default OUT/relax; an existing "
        "`evaluate relax` folder is reused)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="only rebuild the tables from what is on disk (no new relaxations)",
    )


TEACHERS_HELP = """the teacher bake-off: relax the crystals with several teachers (default:
every built-in teacher; --teachers so3lr,chgnet_d3) and pretrained CHGNet (the baseline row;
--no-chgnet), then rank them on volume error vs experiment (MAE, signed mean, median,
bootstrap 95 % interval), RMSD15 and seconds per step, with --lattice also lattice energies of
the same relaxations. Writes the relaxation benchmark's files (OUT/relax.jsonl, resumable)
and OUT/ranking.md, ranking.csv. A teacher whose package is missing is an error naming the
extra, unless --skip-missing (then it is listed). Read the signed mean against
room-temperature cells: docs/data.md."""


def _teachers_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teachers", help="teacher bake-off: rank teachers on volume, RMSD15, "
                       "speed", description=TEACHERS_HELP)  # fmt: skip
    _add_crystal_options(
        p,
        _LATTICE_SELECTION,
        {"workers": 1},
        calc_help="more calculator specs to rank beside the teachers (repeatable), e.g. "
        "student:PATH",
    )
    add_options(p, BakeoffSettings)
    add_options(p, LatticeSettings)
    p.add_argument(
        "--report-only",
        action="store_true",
        help="only rebuild the ranking from OUT/relax.jsonl (no new relaxations)",
    )


def _teachers(args: argparse.Namespace) -> int:
    from kd_nnp.evaluation.bakeoff import RANKING_MD, run_bakeoff

    sel = from_args(EvalJobSettings, args)
    table = run_bakeoff(
        sel.dataset,
        args.out,
        from_args(BakeoffSettings, args),
        from_args(RelaxSettings, args),
        from_args(LatticeSettings, args),
        extra=list(args.calc),
        workers=sel.workers,
        limit=sel.limit,
        max_atoms=sel.max_atoms,
        codes=sel.codes,
        progress=not args.quiet,
        run=not args.report_only,
    )
    print((args.out / RANKING_MD).read_text())
    for f, why in table.attrs.get("skipped", []):
        print(f"skipped {f}: {why}")
    print(f"wrote {args.out}/ranking.md, ranking.csv, relax.jsonl, table.md")
    return 0


def _add_elastic_options(p: argparse.ArgumentParser, *, workers: int) -> None:
    add_options(
        p,
        ElasticJobSettings,
        exclude=_exclude(ElasticJobSettings, _ELASTIC_SELECTION),
        defaults={"workers": workers},
    )
    add_options(p, ElasticSettings)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _elastic_job(args: argparse.Namespace) -> ElasticJobSettings:
    sel = {k: getattr(args, k) for k in _ELASTIC_SELECTION}
    return ElasticJobSettings.from_config(
        {**sel, **{k: v for k, v in vars(args).items() if k in _ELASTIC_PROTOCOL}},
        where="command line",
    )


_ELASTIC_PROTOCOL = tuple(_exclude(ElasticSettings, ()))


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
    p.add_argument("--out", required=True, type=Path, help="output folder (resumable)")
    _add_elastic_options(p, workers=2)


TABLE2_HELP = """the paper's Table 2 for a distilled student: elastic moduli (Voigt / Reuss /
Hill / RH averages of E, K, G; Poisson ratio; anisotropy) of the shared elastic set, MAE vs
experiment, in the paper's column layout: the mean model, PFP (reference tensors),
pretrained CHGNet, the teacher used here and the student(s). --sweep takes the student of the
sweep's job with the lowest held-out volume MAE. Pretrained CHGNet and the teacher are
computed once per settings in --baseline-root (shared with the sweep jobs' evaluate blocks);
everything resumes after a kill. Needs the shared elastic data; exits 2 when absent."""


def _table2_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("table2", help="the paper's Table 2 (elastic moduli) of a student",
                       description=TABLE2_HELP)  # fmt: skip
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--student",
        action="append",
        help="student model file, or LABEL=PATH (repeatable)",
    )
    src.add_argument("--sweep", type=Path, help="sweep folder: use its best evaluated student")
    p.add_argument("--out", required=True, type=Path, help="output folder (resumable)")
    p.add_argument("--teacher", default="so3lr", help="teacher column (kd_nnp teacher name)")
    p.add_argument("--no-teacher", action="store_true", help="no teacher column")
    p.add_argument("--no-chgnet", action="store_true", help="no pretrained CHGNet column")
    p.add_argument(
        "--baseline-root",
        type=Path,
        default=Path("outputs/baselines"),
        help="cache of baseline results shared with sweeps (default outputs/baselines)",
    )
    _add_elastic_options(p, workers=1)


FORGETTING_HELP = """the forgetting check: energy, force and stress MAE of each calculator vs
pretrained CHGNet (the reference, always computed) on built-in inorganic and hybrid crystals
(+ strained/rattled copies) and the shared MPtrj frames (also vs their DFT labels), and the
relaxed-volume change vs pretrained CHGNet. Writes OUT/forgetting.json and OUT/forgetting.md;
resumes after a kill."""


def _forgetting_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forgetting", help="how far students moved from pretrained CHGNet "
                       "outside organic crystals", description=FORGETTING_HELP)  # fmt: skip
    p.add_argument("--calc", action="append", required=True,
                   help="calculator spec (repeatable), e.g. student:PATH")  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="output folder (resumable)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (1 thread each)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_options(p, ForgettingSettings)


def _forgetting(args: argparse.Namespace) -> int:
    from kd_nnp.evaluation.forgetting import TABLE_FILE, run_forgetting

    settings = from_args(ForgettingSettings, args)
    run_forgetting(list(args.calc), args.out, settings, workers=args.workers,
                   progress=not args.quiet)  # fmt: skip
    print((args.out / TABLE_FILE).read_text().split("\n## Per structure")[0])
    print(f"wrote {args.out}/forgetting.json, forgetting.md")
    return 0


FRAMES_HELP = """Errors of calculators against a store's teacher labels, frame by frame:
forces on every atom (training's force MAEs cover only the data.force_atoms cached atoms),
stress, molecular stress, and energies with each crystal's mean offset removed. --run RUN_DIR
--part val selects the validation crystals of a training run (molecules it never trained
on). Writes OUT/per_frame.csv, summary.csv, summary.md, summary.json."""


def _frames_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("frames", help="errors vs a store's labels on every atom",
                       description=FRAMES_HELP)  # fmt: skip
    p.add_argument("--calc", action="append", required=True,
                   help="calculator spec (repeatable), e.g. chgnet, student:PATH")  # fmt: skip
    p.add_argument("--store", required=True, type=Path, help="frame store folder")
    p.add_argument("--labels", required=True, help="label set of the store (the teacher's)")
    p.add_argument("--run", type=Path, default=None,
                   help="training run folder: select its crystals (data_summary.json)")  # fmt: skip
    p.add_argument("--part", choices=("val", "train", "all"), default="val",
                   help="which crystals of --run (default val); all: every frame")  # fmt: skip
    p.add_argument("--groups", default=None, help="comma-separated crystals (store groups)")
    p.add_argument("--max-frames", type=int, default=None,
                   help="evenly spaced subset of at most this many frames")  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _frames(args: argparse.Namespace) -> int:
    from kd_nnp.evaluation.frames import run_frame_errors

    groups = [g for g in args.groups.split(",") if g] if args.groups else None
    if args.run is None and groups is None and args.part != "all":
        print("kd-nnp evaluate frames: give --run RUN_DIR, --groups, or --part all",
              file=sys.stderr)  # fmt: skip
        return 2
    run_frame_errors(list(args.calc), args.store, args.labels, args.out, run_dir=args.run,
                     part=args.part, groups=groups, max_frames=args.max_frames,
                     progress=not args.quiet)  # fmt: skip
    print((args.out / "summary.md").read_text())
    print(f"wrote {args.out}/per_frame.csv, summary.csv, summary.md, summary.json")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kd-nnp evaluate", description=__doc__)
    sub = p.add_subparsers(dest="bench", required=True)
    _relax_parser(sub)
    _teachers_parser(sub)
    _elastic_parser(sub)
    _table2_parser(sub)
    _forgetting_parser(sub)
    _lattice_parser(sub)
    _frames_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["cv"]:  # a Hydra verb: conf/evaluate/cv.yaml + overrides (docs/evaluation.md)
        from kd_nnp.evaluation.cv import run_cv
        from kd_nnp.utils.hydra_cli import run_hydra

        return run_hydra("evaluate/cv", run_cv, argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_threads()
    if args.bench == "relax":
        return _relax(args)
    if args.bench == "teachers":
        return _teachers(args)
    if args.bench == "forgetting":
        return _forgetting(args)
    if args.bench == "lattice":
        return _lattice(args)
    if args.bench == "frames":
        return _frames(args)
    if args.bench == "table2":
        from kd_nnp.evaluation.table2 import run_table2

        return run_table2(args, _elastic_job(args))
    from kd_nnp.evaluation.elastic import run_elastic_benchmark

    job = _elastic_job(args)
    res = run_elastic_benchmark(
        list(args.calc),
        args.out,
        job.protocol,
        structures=args.structures,
        shared=args.shared,
        shared_dir=job.shared_dir,
        all_files=job.all_files,
        compounds=job.compounds,
        limit=args.limit,
        max_atoms=job.max_atoms,
        workers=job.workers,
        progress=not args.quiet,
    )
    print((args.out / "elastic.md").read_text())
    return 0 if res is not None else 1


def _relax(args: argparse.Namespace) -> int:
    from kd_nnp.evaluation.relax import run_relax_benchmark
    from kd_nnp.evaluation.stats import summarize

    settings = from_args(RelaxSettings, args)
    sel = from_args(EvalJobSettings, args)
    df = run_relax_benchmark(
        sel.dataset,
        list(args.calc),
        args.out,
        settings,
        workers=sel.workers,
        limit=sel.limit,
        max_atoms=sel.max_atoms,
        codes=sel.codes,
        references=sel.references,
        progress=not args.quiet,
        run=not args.report_only,
    )
    _print_summary(summarize(df))
    for f, why in df.attrs.get("skipped", []):
        print(f"skipped {f}: {why}")
    print(f"\nwrote {args.out}/table.md, table.csv, summary.csv, parity_*.png")
    return 0


def _lattice(args: argparse.Namespace) -> int:
    from kd_nnp.evaluation.lattice import run_lattice_benchmark

    sel = from_args(EvalJobSettings, args)
    df = run_lattice_benchmark(
        sel.dataset,
        list(args.calc),
        args.out,
        from_args(RelaxSettings, args),
        from_args(LatticeSettings, args),
        relax_dir=args.relax_dir,
        workers=sel.workers,
        limit=sel.limit,
        max_atoms=sel.max_atoms,
        codes=sel.codes,
        progress=not args.quiet,
        run=not args.report_only,
    )
    print((args.out / "table.md").read_text())
    for f, why in df.attrs.get("skipped", []):
        print(f"skipped {f}: {why}")
    print(f"wrote {args.out}/lattice.jsonl, table.md, table.csv, summary.csv")
    return 0


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
