"""``kd-nnp demo`` (``make demo``): the main job, end to end, offline, on embedded data.

1. training frames from pyxtal's shipped organic crystals (teacher-pre-relaxed, strained and
   rattled, seeded), no molecule shared with the evaluation crystals;
2. soft labels from the default teacher (``so3lr``), cached in the store;
3. soft-only distillation of CHGNet's MLP (recipe in ``conf/demo.yaml``, see docs/demo.md);
4. relaxation benchmark on held-out experimental crystals of ``test.db`` for pretrained
   CHGNet, the teacher and the distilled student;
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
    """The demo's training store ``out/store`` (:mod:`kd_nnp.training.crystal_store`)."""
    from kd_nnp.training.crystal_store import build_crystal_store

    return build_crystal_store(
        out / "store",
        train_crystals,
        OmegaConf.to_container(cfg.demo.frames, resolve=True),
        seed=int(cfg.demo.seed),
        teacher=str(cfg.demo.teacher),
        workers=workers,
    )


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    from kd_nnp.evaluation.relax import run_relax_benchmark
    from kd_nnp.evaluation.settings import RelaxSettings
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
    print(f"[1/5] crystals: {len(train_set)} for training, {len(eval_set)} held out")
    store_dir = build_store(cfg, train_set, out, workers=int(cfg.demo.workers))
    times["frames"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[2/5] labelling {store_dir} with {cfg.demo.teacher}")
    rep = label_store(store_dir, cfg.demo.teacher, workers=int(cfg.demo.workers))
    times["label"] = time.perf_counter() - t
    print(f"      {rep}")

    t = time.perf_counter()
    print("[3/5] distillation (soft targets only)")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    metrics = run_training(cfg, run_dir)
    times["train"] = time.perf_counter() - t
    student = Path(metrics["student"])

    t = time.perf_counter()
    print(f"[4/5] relaxation benchmark on {len(eval_set)} held-out crystals")
    relax = from_mapping(RelaxSettings, cfg.demo.relax, where="demo.relax")
    df = run_relax_benchmark(
        eval_set,
        {
            "CHGNet (pretrained)": "chgnet",
            f"teacher ({cfg.demo.teacher})": f"teacher:{cfg.demo.teacher}",
            "student (distilled)": f"student:{student}",
        },
        out / "relax",
        relax,
        workers=int(cfg.demo.workers),
        references=False,
    )
    times["relax"] = time.perf_counter() - t

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
    print("[5/5] results\n")
    print(table)
    print(f"\nvolume distance to the teacher, crystal by crystal (mean |dV - dV_{teacher_label}|):")
    for label, d in to_teacher.items():
        print(f"  {label:<22} {d['mean_abs_pct']:.2f} % over {d['n']} crystals")
    result = {
        "times_s": times,
        "total_s": sum(times.values()),
        "summary": json.loads(summary.to_json(orient="records")),
        "to_teacher": to_teacher,
        "crossover_epoch": metrics.get("crossover_epoch"),
        "paths": {
            "table": str(out / "relax" / "table.md"),
            "relax_dir": str(out / "relax"),
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
    return result
