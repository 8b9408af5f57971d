"""``kd-nnp data SUBCOMMAND``: build and inspect frames stores.

    kd-nnp data pyxtal --db test --out stores/pyxtal [--codes UREAXX02 FORMAM] [--max-atoms 100]
    kd-nnp data perturb --from stores/pyxtal --out stores/perturbed --n-strain 8 --n-rattle 4 \\
        --seed 0 [--volume-range=-0.08,0.2] [--prerelax-teacher so3lr]
    kd-nnp data generate --out stores/generated --teacher so3lr --packings 4 --seed 0 \\
        [--molecules FORMAM UREAXX02] [--limit 10] [--shard 0/8] [--relax-steps 150] [--workers 2]
    kd-nnp data merge stores/gen-0 stores/gen-1 stores/demo --out stores/corpus
    kd-nnp data molecules --store stores/perturbed --teacher so3lr --n-perturbed 3 [--workers 2]
    kd-nnp data inorganic --out stores/replay --n-perturbed 4 --seed 1
    kd-nnp data files ../shared/data/x23_vdwdf2 --out stores/x23 --source-name x23
    kd-nnp data mptrj --json MPtrj_2022.9_full.json --out stores/mptrj --include organic,complex
    kd-nnp data mptrj --download --out stores/mptrj        # figshare, online only
    kd-nnp data cod --ids Sampled_COD_Organic.csv --out cod_cifs
    kd-nnp data info stores/pyxtal
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from kd_nnp.data.sources.generate import GenerateSettings
from kd_nnp.data.sources.molecules import MoleculesSettings
from kd_nnp.data.sources.perturb import PerturbSettings
from kd_nnp.data.store import FrameStore
from kd_nnp.errors import KdNnpError, SettingsError
from kd_nnp.utils.settings import add_options, from_args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kd-nnp data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--threads", type=int, default=None, help="torch/BLAS threads (default 1)")
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("mptrj", help="stream MPtrj (JSON or FFAST extxyz) into a store")
    g = m.add_mutually_exclusive_group(required=True)
    g.add_argument("--json", type=Path, help="MPtrj_2022.9_full.json (or an MPtrj .extxyz)")
    g.add_argument("--download", action="store_true", help="download from figshare first")
    m.add_argument("--download-dir", type=Path, default=Path("downloads"))
    m.add_argument("--figshare-api", default=None, help="figshare API URL (tests, mirrors)")
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--include", default="organic", help="classes: organic,complex,inorganic")
    m.add_argument("--limit", type=int, default=None)

    f = sub.add_parser("files", help="extxyz / traj / ASE db / CIF files or folders")
    f.add_argument("paths", nargs="+", type=Path)
    f.add_argument("--out", required=True, type=Path)
    f.add_argument("--source-name", default="files")

    x = sub.add_parser("pyxtal", help="CSD organic crystals shipped with pyxtal")
    x.add_argument("--db", default="test", choices=["test", "mech"])
    x.add_argument("--out", required=True, type=Path)
    x.add_argument("--codes", nargs="*", default=None)
    x.add_argument("--max-atoms", type=int, default=None)
    x.add_argument("--limit", type=int, default=None)

    q = sub.add_parser("perturb", help="strained / rattled / MD frames from a store's crystals")
    q.add_argument("--from", dest="src", required=True, type=Path)
    q.add_argument("--out", required=True, type=Path)
    add_options(q, PerturbSettings)
    q.add_argument(
        "--prerelax-teacher",
        default=None,
        help="teacher (name or module:factory) that pre-relaxes parents and drives MD",
    )
    q.add_argument("--codes", nargs="*", default=None, help="only these parents")
    q.add_argument("--limit", type=int, default=None)

    gen = sub.add_parser(
        "generate", help="random packings of pyxtal's molecules relaxed by a teacher"
    )
    gen.add_argument("--out", required=True, type=Path)
    gen.add_argument(
        "--teacher",
        default="so3lr",
        help="teacher (name or module:factory) that relaxes and labels the crystals",
    )
    gen.add_argument(
        "--label-name", default=None, help="label-set name (default: the teacher's, file-safe)"
    )
    add_options(gen, GenerateSettings)
    gen.add_argument(
        "--molecules", nargs="*", default=None, help="only these molecules (CSD code or id)"
    )
    gen.add_argument("--limit", type=int, default=None, help="only the first N molecules")
    gen.add_argument(
        "--shard",
        type=_shard,
        default=None,
        metavar="K/N",
        help="molecules K, K+N, K+2N, ... (K = 0..N-1; one store per shard, then `data merge`)",
    )
    gen.add_argument(
        "--workers", type=int, default=1, help="relaxation processes (one thread each)"
    )

    mol = sub.add_parser(
        "molecules", help="isolated molecules of a store's crystals, relaxed and labelled"
    )
    mol.add_argument(
        "--store", "--from", dest="store", required=True, type=Path,
        help="store of crystals; the gas-phase frames are added to it",
    )  # fmt: skip
    mol.add_argument(
        "--teacher",
        default="so3lr",
        help="teacher (name or module:factory) that relaxes and labels the molecules",
    )
    mol.add_argument(
        "--label-name", default=None, help="label-set name (default: what `kd-nnp label` uses)"
    )
    add_options(mol, MoleculesSettings)
    mol.add_argument(
        "--codes", nargs="*", default=None, help="only these crystals (group/frame id)"
    )
    mol.add_argument("--limit", type=int, default=None, help="only the first N crystals")
    mol.add_argument("--workers", type=int, default=1, help="processes (one thread each)")
    ino = sub.add_parser(
        "inorganic", help="replay frames: strained/rattled built-in inorganic/hybrid crystals"
    )
    ino.add_argument("--out", required=True, type=Path)
    ino.add_argument("--n-perturbed", type=int, default=4, help="copies per structure")
    ino.add_argument("--seed", type=int, default=1, help="seed (the forgetting check uses 0)")
    ino.add_argument("--strain", type=float, default=0.03, help="max |strain component|")
    ino.add_argument("--rattle-std", type=float, default=0.05, help="position noise, A")
    ino.add_argument("--prototypes", nargs="*", default=None, help="only these structures")

    c = sub.add_parser("cod", help="download COD CIFs by id (online)")
    c.add_argument("--ids", required=True, type=Path)
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--base-url", default=None)
    c.add_argument("--limit", type=int, default=None)
    c.add_argument("--retry", action="store_true", help="re-fetch ids rejected before")

    mg = sub.add_parser("merge", help="one store from several (frames and label sets)")
    mg.add_argument("sources", nargs="+", type=Path, help="source stores")
    mg.add_argument("--out", required=True, type=Path)

    i = sub.add_parser("info", help="counts per source/group and label sets")
    i.add_argument("store", type=Path)
    return p


def _shard(text: str) -> tuple[int, int]:
    from kd_nnp.utils.shard import parse_shard

    try:
        return parse_shard(text)
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def store_info(path: str | Path) -> str:
    import sqlite3

    fs = FrameStore(path)
    if not fs.frames_path.exists():
        return "\n".join(
            [f"store {fs.root}: 0 frames"] + [f"  labels {n}" for n in fs.label_names()]
        )
    con = sqlite3.connect(f"file:{fs.frames_path}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT a.value, b.value FROM text_key_values a JOIN text_key_values b "
            "ON a.id = b.id WHERE a.key='source' AND b.key='group_id'"
        ).fetchall()
        n_labelled = con.execute(
            "SELECT COUNT(*) FROM systems WHERE energy IS NOT NULL"
        ).fetchone()[0]
    except sqlite3.OperationalError:
        rows, n_labelled = [], 0
    finally:
        con.close()
    per_source = Counter(s for s, _ in rows)
    groups: dict[str, set[str]] = {}
    for s, g in rows:
        groups.setdefault(s, set()).add(g)
    lines = [f"store {fs.root}: {len(rows)} frames, {n_labelled} with hard labels"]
    for s, n in sorted(per_source.items()):
        lines.append(f"  source {s}: {n} frames in {len(groups[s])} groups")
    for name in fs.label_names():
        ls = fs.labels(name)
        st = Counter(ls.status().values())
        prov = ls.provenance
        lines.append(
            f"  labels {name}: {st.get('ok', 0)} ok, {st.get('failed', 0)} failed "
            f"(teacher {prov.get('name')} {prov.get('version')}, hash {prov.get('hash')})"
        )
    return "\n".join(lines)


def _teacher_calculator(name: str) -> Any:
    """The calculator of teacher ``name`` without its load-time check (a worker's builder)."""
    from kd_nnp.teachers.registry import load_teacher

    return load_teacher(name, check=False).calculator


def _run_molecules(args: argparse.Namespace) -> None:
    from kd_nnp.data.sources.molecules import build_molecules_store
    from kd_nnp.teachers.calculators import check_spec, student_clearance
    from kd_nnp.teachers.label import label_set_name
    from kd_nnp.teachers.registry import load_teacher

    settings = from_args(MoleculesSettings, args)  # bad settings fail before the teacher
    settings.check()
    FrameStore(args.store)  # not a store: fail before the teacher
    check_spec(f"teacher:{args.teacher}")
    teacher = load_teacher(args.teacher)  # checked once, here
    gas = teacher.gas
    calculator: Any = teacher.calculator
    if args.workers > 1:  # each worker builds its own (the check was done above)
        calculator = functools.partial(_teacher_calculator, args.teacher)
    rep = build_molecules_store(
        str(args.store),
        settings,
        calculator=calculator,
        calculator_name=args.teacher,
        label_name=args.label_name or label_set_name(args.teacher),
        periodic=gas.periodic,
        teacher_clearance=gas.clearance if gas.periodic else 0.0,
        student_clearance=student_clearance(),
        provenance=teacher.provenance(),
        codes=args.codes,
        limit=args.limit,
        workers=args.workers,
    )
    print(f"molecules ({args.teacher}, {gas.note}): {rep.summary()}; store {args.store}")


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "mptrj":
        from kd_nnp.data.classify import parse_classes
        from kd_nnp.data.sources.mptrj import build_mptrj_store, download_mptrj

        src = args.json
        if args.download:
            src = download_mptrj(args.download_dir, api_url=args.figshare_api)
        stats = build_mptrj_store(
            src, args.out, include=parse_classes(args.include), limit=args.limit
        )
        print(f"MPtrj {src}: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
    elif args.cmd == "files":
        from kd_nnp.data.sources.files import build_files_store

        rep = build_files_store(args.paths, args.out, source_name=args.source_name)
        print(rep.summary())
        for path, idx, why in rep.skipped[:20]:
            print(f"  skipped {path} [{idx}]: {why}")
    elif args.cmd == "pyxtal":
        from kd_nnp.data.sources.pyxtal_db import build_pyxtal_store

        n, skipped = build_pyxtal_store(
            str(args.out), args.db, args.codes, args.max_atoms, args.limit
        )
        print(f"pyxtal {args.db}.db: {n} crystals written to {args.out}, {len(skipped)} skipped")
        for code, why in skipped:
            print(f"  skipped {code}: {why}")
    elif args.cmd == "perturb":
        from kd_nnp.data.sources.perturb import build_perturb_store

        calculator = None
        if args.prerelax_teacher is not None:
            from kd_nnp.teachers.calculators import check_spec

            name = args.prerelax_teacher
            check_spec(f"teacher:{name}")  # fail now, not after reading the store

            def calculator() -> Any:  # built only when a parent is left to do
                from kd_nnp.teachers.registry import load_teacher

                return load_teacher(name).calculator

        n_par, n_fr = build_perturb_store(
            str(args.src),
            str(args.out),
            from_args(PerturbSettings, args),
            calculator=calculator,
            calculator_name=args.prerelax_teacher,
            codes=args.codes,
            limit=args.limit,
        )
        print(f"perturb: {n_par} parents processed, {n_fr} frames written to {args.out}")
    elif args.cmd == "generate":
        from kd_nnp.data.sources.generate import build_generate_store
        from kd_nnp.teachers.calculators import check_spec

        settings = from_args(GenerateSettings, args)  # bad settings fail before the teacher
        check_spec(f"teacher:{args.teacher}")
        from kd_nnp.teachers.registry import load_teacher

        teacher = load_teacher(args.teacher)  # checked once, here
        calculator: Any = teacher.calculator
        if args.workers > 1:  # each worker builds its own (the check was done above)
            calculator = functools.partial(_teacher_calculator, args.teacher)
        rep = build_generate_store(
            str(args.out),
            settings,
            calculator=calculator,
            calculator_name=args.teacher,
            provenance=teacher.provenance(),
            label_name=args.label_name,
            molecules=args.molecules,
            limit=args.limit,
            shard=args.shard,
            workers=args.workers,
        )
        print(f"generate: {rep.summary()}; store {args.out}")
    elif args.cmd == "merge":
        from kd_nnp.data.sources.merge import merge_stores

        rep = merge_stores(args.out, args.sources)
        print(f"merge: {rep.summary()}; store {args.out}")
    elif args.cmd == "molecules":
        _run_molecules(args)
    elif args.cmd == "inorganic":
        from kd_nnp.data.sources.inorganic import build_replay_store

        n = build_replay_store(args.out, args.n_perturbed, seed=args.seed, strain=args.strain,
                               rattle_std=args.rattle_std, prototypes=args.prototypes)  # fmt: skip
        print(f"inorganic: {n} replay frames written to {args.out}; label them with pretrained "
              f"CHGNet: kd-nnp label store={args.out} teacher=chgnet")  # fmt: skip
    elif args.cmd == "cod":
        from kd_nnp.data.sources.cod import COD_BASE_URL, download_cod, read_cod_ids

        ids = read_cod_ids(args.ids)[: args.limit]
        res = download_cod(ids, args.out, base_url=args.base_url or COD_BASE_URL, retry=args.retry)
        st = Counter(r.status for r in res)
        print(f"COD: {dict(st)}; report {args.out / 'cod_report.csv'}")
    elif args.cmd == "info":
        print(store_info(args.store))
    return 0


def main(argv: list[str] | None = None) -> int:
    from kd_nnp.utils.threads import set_threads

    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    set_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (KdNnpError, ValueError, FileNotFoundError) as exc:
        print(f"kd-nnp data {args.cmd}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
