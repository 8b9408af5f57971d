"""``kd-nnp demo`` (``make demo``): the main job, end to end, offline, on embedded data.

1. training frames from pyxtal's shipped organic crystals (pre-relaxed by
   ``demo.prerelax_teacher``, SO3LR, then strained and rattled, seeded), no molecule shared
   with the evaluation crystals;
2. soft labels from the default teacher (``chgnet_d3``: CHGNet + D3(BJ), chosen by measurement,
   docs/demo.md), cached in the store;
3. soft-only distillation of CHGNet's MLP (recipe in ``conf/demo.yaml``, see docs/demo.md);
4. relaxation benchmark on held-out experimental crystals of ``test.db`` for pretrained
   CHGNet, the teacher (both in a background process during step 3 with
   ``demo.overlap_baselines``) and the distilled student, and their lattice energies (the relaxed
   crystals of the benchmark vs the relaxed gas-phase molecules, ``kd-nnp evaluate lattice``);
5. a printed table and PNGs (parity plots, loss curves with the crossover), paths printed.

Each stage writes under ``demo.out`` and is skipped or resumed when its output exists.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd_nnp.training.crystal_store import prerelax_teacher

log = logging.getLogger(__name__)


def _molecule_keys(atoms: Any) -> set[str]:
    """Keys that identify a crystal's molecule: its SMILES and its molecular formula."""
    keys = {str(atoms.info[k]) for k in ("mol_smi", "mol_formula") if atoms.info.get(k)}
    return keys or {atoms.get_chemical_formula(empirical=True)}


def _usable(db: str, max_atoms: int, logged: set[tuple[str, str]]) -> list[tuple[str, Any]]:
    """Checked crystals of ``db``; each skipped one is logged once per ``logged`` set."""
    from kd_nnp.data.sources.pyxtal_db import checked_crystals

    skipped: list[tuple[str, str]] = []
    out = checked_crystals(db, max_atoms=max_atoms, skipped=skipped)
    for code, issue in skipped:  # e.g. H atoms not resolved in the X-ray structure
        if (db, code) not in logged:
            logged.add((db, code))
            log.info("skipping %s/%s: %s", db, code, issue)
    return out


def split_crystals(
    db: str,
    max_atoms: int,
    n_eval: int,
    n_train: int | None,
    seed: int,
    *,
    eval_max_atoms: int | None = None,
    train_dbs: list[str] | None = None,
) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """Held-out evaluation crystals and training crystals with no molecule in common.

    ``n_eval`` molecules of ``db`` (crystals with at most ``eval_max_atoms`` atoms) are drawn
    with ``seed``; one experimental crystal of each is held out. Training crystals come from
    ``train_dbs`` (default: ``db``) with at most ``max_atoms`` atoms; any crystal sharing the
    SMILES *or the molecular formula* of a held-out molecule is excluded (stricter than
    SMILES alone: the two databases spell SMILES differently). ``n_train=None``: all of them.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    logged: set[tuple[str, str]] = set()
    by_mol: dict[str, list[tuple[str, Any]]] = {}
    for code, atoms in _usable(db, eval_max_atoms or max_atoms, logged):
        key = str(atoms.info.get("mol_smi") or atoms.get_chemical_formula(empirical=True))
        by_mol.setdefault(key, []).append((code, atoms))
    keys = sorted(by_mol)
    rng.shuffle(keys)
    if len(keys) < n_eval + 1:
        raise ValueError(
            f"only {len(keys)} distinct molecules with <= {eval_max_atoms or max_atoms} atoms "
            f"in {db}.db, {n_eval} needed for evaluation"
        )
    eval_set = [by_mol[k][0] for k in keys[:n_eval]]
    held_keys = set().union(*(_molecule_keys(a) for _, a in eval_set)) if eval_set else set()
    held_codes = {c for c, _ in eval_set}
    pool: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for tdb in train_dbs or [db]:
        for code, atoms in _usable(tdb, max_atoms, logged):
            if code in seen or code in held_codes or _molecule_keys(atoms) & held_keys:
                continue
            seen.add(code)
            pool.append((code, atoms))
    order = rng.permutation(len(pool))
    train_set = [pool[i] for i in order]
    if n_train is not None:
        train_set = train_set[: int(n_train)]
    if not train_set:
        raise ValueError(f"no training crystal left in {train_dbs or [db]} after the hold-out")
    return eval_set, train_set


def write_molecule_list(path: Path, crystals: list[Any]) -> list[str]:
    """The molecule keys of ``crystals`` as ``{"molecules": [...]}``: the training config's
    ``data.exclude_molecules`` (conf/demo.yaml) reads it, so no frame of a held-out molecule
    (a generated packing mixed into the store, say) reaches training."""
    from kd_nnp.data.molecules import molecule_keys

    keys = sorted(set().union(*(molecule_keys(a) for a in crystals))) if crystals else []
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"molecules": keys}, indent=1))
    tmp.replace(path)
    return keys


def build_store(
    cfg: DictConfig, train_crystals: list[tuple[str, Any]], out: Path, workers: int = 1
) -> Path:
    """The demo's training store ``out/store``: teacher-pre-relaxed, strained and rattled frames
    of each training crystal (:mod:`kd_nnp.training.crystal_store`) and, with
    ``demo.molecules`` set, their isolated molecules (:func:`add_molecules`)."""
    from kd_nnp.training.crystal_store import build_crystal_store

    store_dir = build_crystal_store(
        out / "store",
        train_crystals,
        OmegaConf.to_container(cfg.demo.frames, resolve=True),
        seed=int(cfg.demo.seed),
        teacher=prerelax_teacher(cfg),
        workers=workers,
    )
    n_mol = cfg.demo.get("molecules")
    if n_mol is not None:
        add_molecules(store_dir, str(cfg.demo.teacher), int(n_mol), int(cfg.demo.seed), workers)
    return store_dir


def add_molecules(store_dir: Path, teacher: str, n_perturbed: int, seed: int, workers: int) -> Any:
    """``demo.molecules`` = N: the isolated molecules of every training crystal (relaxed by the
    teacher, N rattled copies, labelled) added to the store beside their crystals
    (``kd-nnp data molecules``; resumable, skipped when done)."""
    import functools

    from kd_nnp.data.sources.molecules import MoleculesSettings, build_molecules_store
    from kd_nnp.teachers.calculators import build_teacher_calculator, student_clearance
    from kd_nnp.teachers.label import label_set_name
    from kd_nnp.teachers.registry import load_teacher

    t = load_teacher(teacher)
    rep = build_molecules_store(
        str(store_dir),
        MoleculesSettings(n_perturbed=n_perturbed, seed=seed),
        calculator=(
            functools.partial(build_teacher_calculator, teacher) if workers > 1 else t.calculator
        ),
        calculator_name=teacher,
        label_name=label_set_name(teacher),
        periodic=t.gas.periodic,
        teacher_clearance=t.gas.clearance if t.gas.periodic else 0.0,
        student_clearance=student_clearance(),
        provenance=t.provenance(),
        workers=workers,
    )
    print(f"      molecules: {rep.summary()}")
    return rep


def lattice_result(ldf: Any) -> dict[str, Any]:
    """The lattice energies of the held-out crystals for demo_result.json: the reference (the
    teacher), per-method summary, per-crystal values (None: failed) and the Markdown table."""
    import math

    from kd_nnp.evaluation.lattice import per_crystal_table, summarize_lattice
    from kd_nnp.utils.markdown import md_table

    reference = ldf.attrs.get("reference")
    wide = per_crystal_table(ldf)
    summ = summarize_lattice(ldf, reference)

    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return {
        "reference": reference,
        "summary": [{k: clean(v) for k, v in row.items()} for row in summ.to_dict("records")],
        "per_crystal_kj_mol": {
            str(cid): {str(m): clean(float(v)) for m, v in row.items()}
            for cid, row in wide.iterrows()
        },
        "failures": {
            f"{r['method']}/{r['id']}": r["error"]
            for r in ldf.to_dict("records")
            if r.get("status") != "ok"
        },
        "table_md": md_table(wide.reset_index(), None, "{:.1f}"),
    }


def heldout_table(summary: Any, lat: dict[str, Any]) -> str:
    """One row per method: the volume figures of the relaxation benchmark and the lattice
    energy columns (mean E_latt, MAE and signed mean vs the teacher)."""
    import pandas as pd

    from kd_nnp.utils.markdown import md_table

    lsum = pd.DataFrame(lat["summary"]).set_index("method") if lat["summary"] else None
    rows = []
    for r in summary.to_dict("records"):
        row = {k: r.get(k) for k in ("method", "vol_mae_pct", "vol_mean_pct", "rmsd15_mean")}
        row["fail"] = r.get("n_failures")
        if lsum is not None and r["method"] in lsum.index:
            lr = lsum.loc[r["method"]]
            row.update(e_latt=lr.get("mean"), e_mae=lr.get("mae"), e_diff=lr.get("mean_diff"),
                       e_fail=lr.get("failures"))  # fmt: skip
        rows.append(row)
    cols = [("method", "method"), ("vol_mae_pct", "V MAE %"), ("vol_mean_pct", "V mean %"),
            ("rmsd15_mean", "RMSD15 A"), ("fail", "fail"), ("e_latt", "E_latt mean"),
            ("e_mae", "E_latt MAE vs teacher"), ("e_diff", "E_latt mean diff"),
            ("e_fail", "E_latt fail")]  # fmt: skip
    return md_table(pd.DataFrame(rows), cols, "{:.2f}")


def _watch_parent(parent: int) -> None:
    """Exit this (background) process when its parent is gone (killed -9): an orphan would
    keep appending to the relaxation records while a rerun writes them too."""
    import os
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _relax_baselines(eval_set: list, baselines: dict[str, str], out_dir: str, relax: Any,
                     parent: int) -> None:  # fmt: skip
    """Background process of :func:`start_baseline_relaxations`: one worker, one thread."""
    import os

    from kd_nnp.evaluation.relax import run_relax_benchmark
    from kd_nnp.utils.threads import set_threads

    _watch_parent(parent)
    os.nice(19)  # only the cycles the training leaves idle (its epochs run in one process)
    set_threads(1)
    run_relax_benchmark(eval_set, baselines, out_dir, relax, workers=1, references=False,
                        progress=False, report=False)  # fmt: skip


def start_baseline_relaxations(eval_set: list, baselines: dict[str, str], out_dir: Path,
                               relax: Any) -> Any:  # fmt: skip
    """Relax the held-out crystals with the baselines (pretrained CHGNet, the teacher) in one
    background process at the lowest priority while the student trains
    (``demo.overlap_baselines``): the epochs run in one process, so on 2 cores the other core
    is idle for minutes. The records go to ``out_dir/relax.jsonl`` (a folder of their own:
    one writer per file); :func:`merge_relax_records` then hands them to the benchmark, which
    finds them done (same calculators and protocol: same numbers)."""
    import multiprocessing as mp
    import os

    proc = mp.get_context("spawn").Process(
        target=_relax_baselines,
        args=(eval_set, baselines, str(out_dir), relax, os.getpid()),
        name="kd-nnp-demo-baselines",
    )
    proc.start()
    log.info("baseline relaxations (%s) started in process %s", ", ".join(baselines), proc.pid)
    return proc


def wait_for_baselines(proc: Any) -> None:
    """Join the background baseline relaxations; a failed process is logged and its missing
    relaxations are run by the foreground benchmark (resume), never dropped."""
    if proc.is_alive():
        print("      waiting for the baseline relaxations started during training ...")
    proc.join()
    if proc.exitcode != 0:
        log.warning(
            "the background baseline relaxations exited with code %s; the benchmark relaxes "
            "what they left undone",
            proc.exitcode,
        )


def merge_relax_records(src: Path, dst: Path) -> int:
    """Append to ``dst`` the records of ``src`` whose (method, crystal) ``dst`` lacks (the
    background baselines into the benchmark's file, after the background process ended);
    returns how many. The benchmark still checks each record's calculator and protocol."""
    from kd_nnp.utils.jsonl import open_append, read_jsonl

    have = {(r.get("method"), r.get("id")) for r in read_jsonl(dst)}
    new = [r for r in read_jsonl(src) if (r.get("method"), r.get("id")) not in have]
    if new:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open_append(dst) as fh:
            for r in new:
                fh.write(json.dumps(r, default=str) + "\n")
    return len(new)


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    from kd_nnp.evaluation.lattice import run_lattice_benchmark
    from kd_nnp.evaluation.relax import run_relax_benchmark
    from kd_nnp.evaluation.settings import LatticeSettings, RelaxSettings
    from kd_nnp.teachers.label import label_store
    from kd_nnp.training.train import run_training
    from kd_nnp.utils.settings import from_mapping
    from kd_nnp.utils.threads import set_threads

    set_threads(cfg.get("threads"))
    out = Path(cfg.demo.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    c = cfg.demo.crystals

    t = time.perf_counter()
    eval_set, train_set = split_crystals(
        c.db,
        c.max_atoms,
        c.n_eval,
        c.n_train,
        cfg.demo.seed,
        eval_max_atoms=c.get("eval_max_atoms"),
        train_dbs=list(c.get("train_dbs") or [c.db]),
    )
    (out / "crystals.json").write_text(
        json.dumps({"eval": [k for k, _ in eval_set], "train": [k for k, _ in train_set]}, indent=2)
    )
    write_molecule_list(out / "heldout_molecules.json", [a for _, a in eval_set])
    print(
        f"[1/5] crystals: {len(train_set)} for training, {len(eval_set)} held out "
        f"(training crystals pre-relaxed by {prerelax_teacher(cfg)})"
    )
    store_dir = build_store(cfg, train_set, out, workers=int(cfg.demo.workers))
    times["frames"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[2/5] labelling {store_dir} with {cfg.demo.teacher}")
    rep = label_store(store_dir, cfg.demo.teacher, workers=int(cfg.demo.workers))
    times["label"] = time.perf_counter() - t
    print(f"      {rep}")

    relax = from_mapping(RelaxSettings, cfg.demo.relax, where="demo.relax")
    baselines = {
        "CHGNet (pretrained)": "chgnet",
        f"teacher ({cfg.demo.teacher})": f"teacher:{cfg.demo.teacher}",
    }
    t = time.perf_counter()
    print("[3/5] distillation (soft targets only)")
    background = None
    if cfg.demo.get("overlap_baselines", False):
        background = start_baseline_relaxations(eval_set, baselines, out / "relax_baselines", relax)
    try:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        metrics = run_training(cfg, run_dir)
    except BaseException:
        if background is not None:
            background.terminate()
        raise
    times["train"] = time.perf_counter() - t
    student = Path(metrics["student"])

    t = time.perf_counter()
    print(f"[4/5] relaxation benchmark on {len(eval_set)} held-out crystals")
    methods = {**baselines, "student (distilled)": f"student:{student}"}
    if background is not None:  # the student now, beside what the baselines have left
        student_only = {"student (distilled)": methods["student (distilled)"]}
        run_relax_benchmark(eval_set, student_only, out / "relax", relax,
                            workers=int(cfg.demo.workers), references=False,
                            report=False)  # fmt: skip
        t_wait = time.perf_counter()
        wait_for_baselines(background)
        times["baseline_wait"] = time.perf_counter() - t_wait
        merge_relax_records(out / "relax_baselines" / "relax.jsonl", out / "relax" / "relax.jsonl")
    df = run_relax_benchmark(
        eval_set, methods, out / "relax", relax, workers=int(cfg.demo.workers), references=False
    )
    times["relax"] = time.perf_counter() - t
    t = time.perf_counter()
    # lattice energies: the crystals relaxed above (out/relax is reused, nothing is relaxed
    # twice) and each distinct molecule relaxed alone in a box
    lattice = from_mapping(LatticeSettings, cfg.demo.get("lattice"), where="demo.lattice")
    ldf = run_lattice_benchmark(
        eval_set,
        methods,
        out / "lattice",
        relax,
        lattice,
        relax_dir=out / "relax",
        workers=int(cfg.demo.workers),
    )
    times["lattice"] = time.perf_counter() - t

    from kd_nnp.evaluation.stats import paired_volume_distance, summarize

    summary = summarize(df)
    teacher_label = f"teacher ({cfg.demo.teacher})"
    to_teacher = {
        label: paired_volume_distance(df, label, teacher_label)
        for label in ("student (distilled)", "CHGNet (pretrained)")
    }
    table = (
        (out / "relax" / "table.md").read_text()
        if (out / "relax" / "table.md").exists()
        else summary.to_string()
    )
    lat = lattice_result(ldf)
    print("[5/5] results\n")
    print(table)
    print(
        "\nheld-out summary (lattice energy E_latt in kJ/mol per molecule; MAE vs the teacher):\n"
    )
    print(heldout_table(summary, lat))
    print("\nlattice energy per crystal (kJ/mol; empty: failed, see lattice/table.md):\n")
    print(lat["table_md"])
    print(f"\nvolume distance to the teacher, crystal by crystal (mean |dV - dV_{teacher_label}|):")
    for label, d in to_teacher.items():
        print(f"  {label:<22} {d['mean_abs_pct']:.2f} % over {d['n']} crystals")
    result = {
        "times_s": times,
        "total_s": sum(times.values()),
        "summary": json.loads(summary.to_json(orient="records")),
        "to_teacher": to_teacher,
        "lattice": {k: v for k, v in lat.items() if k != "table_md"},
        "crossover_epoch": metrics.get("crossover_epoch"),
        "paths": {
            "table": str(out / "relax" / "table.md"),
            "relax_dir": str(out / "relax"),
            "lattice_table": str(out / "lattice" / "table.md"),
            "loss_curves": str(run_dir / "loss_curves.png"),
            "student": str(student),
        },
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2, default=str))
    print(
        "\ntimes (s):",
        {k: round(v, 1) for k, v in times.items()},
        f"total {result['total_s']:.0f} s",
    )
    print("outputs:")
    for k, v in result["paths"].items():
        print(f"  {k:<12} {v}")
    for png in sorted((out / "relax").glob("*.png")):
        print(f"  {'plot':<12} {png}")
    _forgetting(cfg, out, student, result)
    return result


def _forgetting(cfg: DictConfig, out: Path, student: Path, result: dict[str, Any]) -> None:
    """The forgetting check of the student (``demo.forgetting``: true, false or a mapping of
    ForgettingSettings keys): one printed line, ``result["forgetting"]`` in demo_result.json."""
    from kd_nnp.evaluation.forgetting import job_forgetting
    from kd_nnp.evaluation.settings import forgetting_from_config

    settings = forgetting_from_config(cfg.demo.get("forgetting", True), "demo.forgetting")
    if settings is None:
        return
    t = time.perf_counter()
    fg = job_forgetting(f"student:{student}", out / "forgetting", out / "baselines", settings)
    result["times_s"]["forgetting"] = time.perf_counter() - t
    result["forgetting"] = fg
    s = {k: float("nan") if v is None else v for k, v in fg["summary"].items()}
    print(
        f"\nforgetting (student vs pretrained CHGNet on {s['n']} inorganic/hybrid/MPtrj "
        f"structures): energy MAE {s['energy_mae_ev_atom']:.4f} eV/atom, force MAE "
        f"{s['force_mae_ev_a']:.4f} eV/A, mean |relaxed-volume change| "
        f"{s['vol_change_mae_pct']:.2f} % over {s['n_relaxed']} crystals "
        f"({Path(fg['path']).with_suffix('.md')})"
    )
    (out / "demo_result.json").write_text(json.dumps(result, indent=2, default=str))
