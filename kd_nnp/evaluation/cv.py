"""Leave-molecule-out cross-validation of a distillation recipe (``kd-nnp evaluate cv``).

Every usable experimental crystal of pyxtal's databases (``cv.dbs``, at most ``cv.max_atoms``
atoms) is put in one of ``cv.folds`` folds; crystals that share any kind of molecule (graph
key, :func:`kd_nnp.data.molecules.graph_key`, molecular formula or SMILES) are one group and stay in one fold, so
no molecule is in two folds. Then, all under ``cv.out``:

1. ``store/``: the recipe's training frames (teacher-pre-relaxed, strained, rattled) of every
   crystal, built once (:mod:`kd_nnp.training.crystal_store`) and labelled once by the teacher
   and by every teacher of ``data.label_set`` (:func:`label_cv_store`);
   graphs and features are content-hashed caches, so every fold reuses them;
2. ``fold<k>/train``: a student trained with the recipe on the frames of the other folds:
   ``data.exclude_molecules`` = ``fold<k>/test_molecules.json`` drops every frame of a molecule
   of fold k (the training leakage guard) before the split;
3. ``fold<k>/relax``: fold k's crystals relaxed with that student; ``baselines/``: every crystal
   relaxed once with pretrained CHGNet, with the teacher and with every other teacher of
   ``data.label_set`` (protocol ``demo.relax``);
4. ``per_crystal.csv`` (fold, method, crystal, status, failure, volume error, RMSD15),
   ``summary.json`` (per method: n, failures, volume MAE / signed mean / median, RMSD15 mean,
   seeded bootstrap 95 % interval of the MAE; the student-teacher and CHGNet-teacher volume
   distances with their intervals, to the teacher (``to_teacher``) and to each teacher relaxed
   (``to_teachers``); per fold), ``summary.md``, ``parity_volume.png`` and
   ``hist_volume_error.png`` (one panel per method);
5. with ``cv.lattice`` (default true): ``lattice/``, the lattice energy of every crystal with
   every method (:func:`kd_nnp.evaluation.lattice.run_lattice_benchmark`, gas-phase box from
   ``demo.lattice``), computed from the relaxations above (``baselines/`` for CHGNet and the
   teacher, ``fold<k>/relax`` for fold k's student: nothing is relaxed twice) and each distinct
   molecule relaxed alone (``lattice/baselines/gas.jsonl``, ``lattice/fold<k>/gas.jsonl``);
   ``lattice/per_crystal.csv``, ``lattice/table.csv`` (crystals x methods and the spread) and
   a ``lattice`` block in ``summary.json`` / lines in ``summary.md`` (no experimental
   reference: the spread between the methods and their distance to the teacher).

Every step resumes after a kill (store, labels, training runs, relaxation JSON lines); the
fold assignment is recorded in ``folds.json`` and a relaunch that would draw other folds (other
crystals, K or seed) into the same folder is refused.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from kd_nnp.errors import KdNnpError

log = logging.getLogger(__name__)

STUDENT = "student (distilled)"
CHGNET = "CHGNet (pretrained)"
HYDRA_RUN_DIR = "${hydra:runtime.output_dir}"
BASELINES = "baselines"  # cv.out/baselines: CHGNet and the teacher on every crystal
LATTICE = "lattice"  # cv.out/lattice: the lattice energies
PER_CRYSTAL_COLUMNS = (
    "fold", "method", "id", "status", "failure", "converged", "vol_err_pct", "volume_exp",
    "volume_pred", "rmsd15", "steps", "wall_s",
)  # fmt: skip
LATTICE_COLUMNS = (
    "fold", "method", "id", "status", "error", "e_latt_kj_mol", "z", "crystal_energy",
    "gas_energy", "crystal_steps", "gas_steps",
)  # fmt: skip


def teacher_label(teacher: str) -> str:
    return f"teacher ({teacher})"


def baseline_calculators(teacher: str, label_teachers: Any = ()) -> dict[str, str]:
    """``{label: spec}`` of the methods relaxed on every crystal (``baselines/``): pretrained
    CHGNet, ``teacher`` and every other teacher the students learn from (``label_teachers``,
    :func:`label_set_teachers`)."""
    out = {CHGNET: "chgnet", teacher_label(teacher): f"teacher:{teacher}"}
    for name in label_teachers:
        out.setdefault(teacher_label(name), f"teacher:{name}")
    return out


def label_set_teachers(label_set: Any) -> tuple[list[str], list[str]]:
    """``(teachers, imported)`` of ``data.label_set``: the names of weight > 0
    (:func:`kd_nnp.training.data.parse_label_sets`) that name a teacher the CV can run
    (built in, or ``package.module:factory``) and, apart, those that name only a label set
    (e.g. labels imported from elsewhere): these must be in the store already and get no
    baseline relaxation."""
    from kd_nnp.teachers.calculators import TEACHERS
    from kd_nnp.training.data import parse_label_sets

    weights = parse_label_sets(label_set) or {}
    names = [n for n, w in weights.items() if w > 0]
    teachers = [n for n in names if n in TEACHERS or ":" in n]
    return teachers, [n for n in names if n not in teachers]


def teachers_to_label(teacher: str, label_teachers: list[str]) -> list[str]:
    """``teacher`` first, then the other teachers of ``data.label_set``, each once."""
    return list(dict.fromkeys([teacher, *label_teachers]))


def label_cv_store(store: Path, teacher: str, label_set: Any, workers: int) -> list[str]:
    """Label ``store`` with ``teacher`` (the reference) and with every other teacher of
    ``data.label_set`` (``label_set``), each resumably; a label set that names no runnable
    teacher must be in the store already. Returns the report lines."""
    from kd_nnp.data.store import FrameStore
    from kd_nnp.teachers.label import label_store, resolve_label_set

    teachers, imported = label_set_teachers(label_set)
    lines = []
    for name in teachers_to_label(teacher, teachers):
        lines.append(str(label_store(store, name, workers=workers)))
    if imported:
        fs = FrameStore(store)
        have = fs.label_names()
        missing = [n for n in imported if resolve_label_set(fs, n) not in have]
        if missing:
            raise KdNnpError(
                f"data.label_set names {missing}, which {'is' if len(missing) == 1 else 'are'} "
                f"not a teacher the CV can run (built in or package.module:factory) and not a "
                f"label set of {store} (it has {sorted(have)}): label it there first "
                "(`kd-nnp label store=... teacher=... name=...`)"
            )
    return lines


def fold_relax_dir(out: Path, fold: int) -> Path:
    """Where fold ``fold``'s crystals are relaxed with its student."""
    return out / f"fold{fold}" / "relax"


# ------------------------------------------------------------------------------- crystals
def cv_crystals(
    dbs: list[str], max_atoms: int | None, codes: list[str] | None = None
) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """``([(code, atoms)], [(code, why skipped)])``: the checked crystals of ``dbs`` (a code in
    two databases is kept once, from the first) made of molecules, optionally only ``codes``."""
    from kd_nnp.data.sources.pyxtal_db import checked_crystals

    out: list[tuple[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for db in dbs:
        for code, atoms in checked_crystals(db, max_atoms=max_atoms, skipped=skipped):
            if code not in seen and (codes is None or code in codes):
                seen.add(code)
                try:  # a covalent network has no molecules to keep out of training
                    crystal_molecules(atoms)
                except ValueError as exc:
                    skipped.append((code, f"no molecules ({exc})"))
                    continue
                out.append((code, atoms))
    if codes is not None:
        missing = [c for c in codes if c not in seen]
        if missing:
            bad = dict(skipped)
            why = "; ".join(f"{c}: {bad.get(c, f'not in {dbs} with <= {max_atoms} atoms')}"
                            for c in missing)  # fmt: skip
            raise KdNnpError(f"cv.codes: crystals not usable: {why}")
    return out, skipped


def crystal_molecules(atoms: Any) -> list[str]:
    """The identities of a crystal's molecules: graph keys, their molecular formulas (the
    same molecule from two X-ray structures can get two bond graphs; isomers are kept
    together too) and the SMILES when recorded."""
    from kd_nnp.data.molecules import molecule_keys

    keys = molecule_keys(atoms)
    formulas = sorted({"formula:" + k.rsplit("-", 1)[0] for k in keys})
    smi = atoms.info.get("mol_smi")
    return keys + formulas + ([f"smiles:{smi}"] if smi else [])


def molecule_groups(ids: list[list[str]]) -> list[list[int]]:
    """Groups of items (indices) that share any identity, transitively (union-find); groups in
    order of their first item, items in order."""
    parent = list(range(len(ids)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, keys in enumerate(ids):
        for k in keys:
            if k in owner:
                a, b = find(owner[k]), find(i)
                parent[max(a, b)] = min(a, b)
            else:
                owner[k] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(ids)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def assign_folds(groups: list[list[int]], k: int, seed: int) -> list[int]:
    """Fold of each group: groups in a seeded random order, then largest first (stable), each to
    the fold with the fewest items so far (the lowest index on ties). Deterministic."""
    if k < 2:
        raise KdNnpError(f"cv.folds must be >= 2, got {k}")
    if len(groups) < k:
        raise KdNnpError(f"cv.folds={k} but only {len(groups)} groups of molecules")
    order = np.random.default_rng(seed).permutation(len(groups))
    order = sorted(order, key=lambda g: -len(groups[g]))
    sizes = [0] * k
    fold = [0] * len(groups)
    for g in order:
        f = int(np.argmin(sizes))
        fold[g] = f
        sizes[f] += len(groups[g])
    return fold


def make_folds(crystals: list[tuple[str, Any]], k: int, seed: int) -> list[dict[str, Any]]:
    """``[{"fold", "crystals": [codes], "molecules": [graph keys]}]`` of ``k`` folds."""
    from kd_nnp.data.molecules import molecule_keys

    ids = [crystal_molecules(a) for _, a in crystals]
    groups = molecule_groups(ids)
    fold_of = assign_folds(groups, k, seed)
    folds = [{"fold": f, "crystals": [], "molecules": []} for f in range(k)]
    for g, f in zip(groups, fold_of):
        for i in g:
            folds[f]["crystals"].append(crystals[i][0])
            folds[f]["molecules"].extend(molecule_keys(crystals[i][1]))
    order = {c: i for i, (c, _) in enumerate(crystals)}
    for fd in folds:
        fd["crystals"].sort(key=order.__getitem__)
        fd["molecules"] = sorted(set(fd["molecules"]))
    return folds


def _record_folds(path: Path, record: dict[str, Any]) -> None:
    if path.exists():
        old = json.loads(path.read_text())
        if old != record:
            diff = [k for k in record if old.get(k) != record[k]]
            raise KdNnpError(
                f"{path} records folds drawn from other crystals or settings (differs in "
                f"{diff}); use another cv.out or delete that folder"
            )
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


# ------------------------------------------------------------------------------- training
def _replace_strings(obj: Any, old: str, new: str) -> Any:
    if isinstance(obj, dict):
        return {k: _replace_strings(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_strings(v, old, new) for v in obj]
    return obj.replace(old, new) if isinstance(obj, str) else obj


def fold_config(cfg: DictConfig, store: Path, exclude: Path, run_dir: Path) -> DictConfig:
    """The recipe of one fold: ``cfg``'s training config (``cv`` and ``demo`` blocks left out:
    they configure this job, not the run) writing into ``run_dir``, training on ``store`` less
    the molecules listed in ``exclude``."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw = _replace_strings(raw, HYDRA_RUN_DIR, str(run_dir))
    c = OmegaConf.create(raw)
    c.data.store = str(store)
    c.data.exclude_molecules = str(exclude)
    resolved = OmegaConf.to_container(c, resolve=True)
    for key in ("cv", "demo"):
        resolved.pop(key, None)
    return OmegaConf.create(resolved)


def _check_no_leak(run_dir: Path, test_crystals: list[str]) -> None:
    """The store's groups are the crystals: a fold's student must have seen none of its own."""
    summ = json.loads((run_dir / "data_summary.json").read_text())
    seen = set(summ["train_groups"]) | set(summ["val_groups"])
    leaked = sorted(seen & set(test_crystals))
    if leaked:
        raise KdNnpError(
            f"{run_dir}: trained on frames of its test crystals {leaked} (their molecule keys "
            "were not excluded); delete the run and the store and rerun"
        )


# ------------------------------------------------------------------------------- summary
def per_crystal_table(df: pd.DataFrame, fold_of: dict[str, int]) -> pd.DataFrame:
    out = df.copy()
    out["fold"] = out["id"].map(fold_of)
    for col in PER_CRYSTAL_COLUMNS:
        if col not in out:
            out[col] = np.nan
    return out[list(PER_CRYSTAL_COLUMNS)].sort_values(["fold", "method", "id"], kind="stable")


def _f(x: Any) -> float | None:
    x = float(x)
    return None if not np.isfinite(x) else x


def cv_summary(
    per_crystal: pd.DataFrame, teacher: str, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Per method: ``n`` (relaxations finished), ``n_crystals``, ``failures``, volume MAE,
    signed mean, median (%, over the finished ones), RMSD15 mean, bootstrap 95 % interval of the
    MAE; the student's and CHGNet's paired distance to the teacher with its interval; the
    student's MAE per fold. Computed from ``per_crystal`` alone (``per_crystal.csv``)."""
    from kd_nnp.evaluation.stats import bootstrap_ci, paired_volume_distance

    methods: dict[str, Any] = {}
    for method, g in per_crystal.groupby("method", sort=True):
        ok = g[g["status"] == "ok"]
        v = ok["vol_err_pct"].astype(float)
        r = pd.to_numeric(ok["rmsd15"], errors="coerce")
        lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed)
        methods[str(method)] = {
            "n": int(len(ok)),
            "n_crystals": int(len(g)),
            "failures": int((g["failure"].fillna("").astype(str) != "").sum()),
            "vol_mae_pct": _f(v.abs().mean()),
            "vol_mean_pct": _f(v.mean()),
            "vol_median_pct": _f(v.median()),
            "rmsd15_mean": _f(r.mean()),
            "vol_mae_ci95_pct": [_f(lo), _f(hi)],
        }

    def distances(reference: str) -> dict[str, Any]:
        res = {}
        for method in (STUDENT, CHGNET):
            d = paired_volume_distance(per_crystal, method, reference)
            diffs = list(d.pop("per_crystal_pct").values())
            lo, hi = bootstrap_ci(diffs, n_boot=n_boot, seed=seed)
            d = {k: (_f(v) if isinstance(v, float) else v) for k, v in d.items()}
            res[method] = {**d, "mean_abs_ci95_pct": [_f(lo), _f(hi)]}
        return res

    to_teacher = distances(teacher_label(teacher))
    # every teacher relaxed as a baseline (the reference and the label-set teachers)
    teachers = sorted(
        m for m in methods if m.startswith("teacher (") and m != teacher_label(teacher)
    )
    to_teachers = {teacher_label(teacher): to_teacher, **{t: distances(t) for t in teachers}}
    folds = []
    stud = per_crystal[per_crystal["method"] == STUDENT]
    for fold, g in stud.groupby("fold", sort=True):
        ok = g[g["status"] == "ok"]
        folds.append({
            "fold": int(fold),
            "n": int(len(ok)),
            "vol_mae_pct": _f(ok["vol_err_pct"].astype(float).abs().mean()),
        })  # fmt: skip
    return {
        "methods": methods,
        "to_teacher": to_teacher,
        "to_teachers": to_teachers,
        "student_per_fold": folds,
        "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "level": 0.95},
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    from kd_nnp.utils.markdown import md_table

    rows = []
    for m, s in summary["methods"].items():
        lo, hi = s["vol_mae_ci95_pct"]
        fmt = lambda x: "nan" if x is None else f"{x:.2f}"  # noqa: E731
        rows.append({
            "method": m, "n": s["n"], "failures": s["failures"],
            "volume MAE %": fmt(s["vol_mae_pct"]), "95 % interval": f"[{fmt(lo)}, {fmt(hi)}]",
            "signed mean %": fmt(s["vol_mean_pct"]), "median %": fmt(s["vol_median_pct"]),
            "RMSD15 (A)": fmt(s["rmsd15_mean"]),
        })  # fmt: skip
    lines = [md_table(pd.DataFrame(rows)), ""]
    for dists in summary["to_teachers"].values():
        for m, d in dists.items():
            lo, hi = d["mean_abs_ci95_pct"]
            if d["n"]:
                lines.append(
                    f"- {m} vs {d['reference']}: mean |dV - dV_teacher| = "
                    f"{d['mean_abs_pct']:.2f} % [{lo:.2f}, {hi:.2f}] over {d['n']} crystals"
                )
    return "\n".join(lines) + "\n"


def error_histogram(per_crystal: pd.DataFrame, path: Path) -> None:
    """Volume errors (%) of the finished relaxations, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = per_crystal[per_crystal["status"] == "ok"]
    methods = sorted(per_crystal["method"].unique())
    fig, axes = plt.subplots(1, len(methods), figsize=(3.8 * len(methods), 3.2), squeeze=False)
    v_all = ok["vol_err_pct"].astype(float)
    lo, hi = (float(v_all.min()), float(v_all.max())) if len(v_all) else (-1.0, 1.0)
    bins = np.linspace(min(lo, -1.0), max(hi, 1.0), 25)
    for ax, m in zip(axes[0], methods):
        v = ok[ok["method"] == m]["vol_err_pct"].astype(float)
        ax.hist(v, bins=bins, color="C0", alpha=0.8)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(f"{m}\nn={len(v)}  MAE={v.abs().mean():.2f} %", fontsize=9)
        ax.set_xlabel("volume error vs experiment (%)")
        ax.set_ylabel("crystals")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------------- lattice
def cv_lattice(
    out: Path,
    crystals: list[tuple[str, Any]],
    folds: list[dict[str, Any]],
    students: dict[int, str],
    baselines: dict[str, str],
    relax: Any,
    settings: Any,
    *,
    teacher: str,
    workers: int = 1,
    progress: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Lattice energies of the CV's crystals from its own relaxations: one row per (method,
    crystal), :data:`LATTICE_COLUMNS` (``out/lattice/per_crystal.csv``; crystals x methods in
    ``out/lattice/table.csv``) and the ``lattice`` block of ``summary.json``
    (:func:`lattice_summary` of those rows, plus the ``clearance``).

    ``students``: fold -> the student's calculator spec, ``baselines``: ``{label: spec}``,
    both exactly as the relaxations were run with (``fold<k>/relax``, ``baselines/``), as is
    ``relax`` (:class:`~kd_nnp.evaluation.settings.RelaxSettings`): the lattice benchmark
    reuses those records (same crystals, calculator fingerprints and protocol) and relaxes no
    crystal again. Fold k's student is used for fold k's crystals only. Each method relaxes the
    distinct molecules of its crystals alone in a box (``settings``:
    :class:`~kd_nnp.evaluation.settings.LatticeSettings`; its ``reference`` is not used, the CV
    compares with the teacher): ``out/lattice/fold<k>/gas.jsonl`` (one per student
    fingerprint) and ``out/lattice/baselines/gas.jsonl``, resumable after a kill."""
    import dataclasses

    from kd_nnp.evaluation.lattice import run_lattice_benchmark

    settings = dataclasses.replace(settings, reference=None)
    by_code = dict(crystals)
    fold_of = {c: fd["fold"] for fd in folds for c in fd["crystals"]}
    lat = out / LATTICE
    frames = []
    for fd in folds:
        k = fd["fold"]
        frames.append(
            run_lattice_benchmark(
                [(c, by_code[c]) for c in fd["crystals"]],
                {STUDENT: students[k]},
                lat / f"fold{k}",
                relax,
                settings,
                relax_dir=fold_relax_dir(out, k),
                workers=workers,
                progress=progress,
            )
        )
    frames.append(
        run_lattice_benchmark(
            crystals,
            baselines,
            lat / BASELINES,
            relax,
            settings,
            relax_dir=out / BASELINES,
            workers=workers,
            progress=progress,
        )
    )
    per = lattice_rows(pd.concat(frames, ignore_index=True), fold_of)
    per.to_csv(lat / "per_crystal.csv.tmp", index=False)
    (lat / "per_crystal.csv.tmp").replace(lat / "per_crystal.csv")
    lattice_wide(per).to_csv(lat / "table.csv")
    summ = lattice_summary(per, teacher, n_boot=n_boot, seed=seed)
    return per, {**summ, "clearance": settings.clearance}


def lattice_rows(df: pd.DataFrame, fold_of: dict[str, int]) -> pd.DataFrame:
    """:data:`LATTICE_COLUMNS` of the lattice benchmark's records: ``gas_energy`` is
    ``sum_k count_k E_gas_k`` (eV per cell, when every kind has one), so that
    ``e_latt_kj_mol = (crystal_energy - gas_energy) / z`` in kJ/mol."""
    rows = []
    for r in df.to_dict("records"):
        row = {c: r.get(c) for c in LATTICE_COLUMNS}
        row["fold"] = fold_of[r["id"]]
        mols = r.get("molecules") if isinstance(r.get("molecules"), list) else []  # NaN: none
        counts = {m["key"]: m["count"] for m in mols}
        gas = r.get("gas") if isinstance(r.get("gas"), list) else []
        energies = [g.get("energy") for g in gas]
        if gas and all(e is not None for e in energies):
            row["gas_energy"] = sum(counts[g["key"]] * float(g["energy"]) for g in gas)
        rows.append(row)
    out = pd.DataFrame(rows, columns=list(LATTICE_COLUMNS))
    out["e_latt_kj_mol"] = pd.to_numeric(out["e_latt_kj_mol"], errors="coerce")
    return out.sort_values(["fold", "method", "id"], kind="stable").reset_index(drop=True)


def lattice_wide(per: pd.DataFrame) -> pd.DataFrame:
    """Crystals x methods of E_latt (kJ/mol, NaN where it failed), the crystal's fold and the
    spread max - min across the methods with a value (NaN with fewer than two)."""
    from kd_nnp.evaluation.lattice import per_crystal_table

    wide = per_crystal_table(per.sort_values(["method", "fold", "id"], kind="stable"))
    fold = per.drop_duplicates("id").set_index("id")["fold"]
    wide.insert(0, "fold", fold.reindex(wide.index).astype(int))
    return wide.sort_values("fold", kind="stable")


def lattice_summary(
    per: pd.DataFrame, teacher: str, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """The ``lattice`` block of ``summary.json``, from ``lattice/per_crystal.csv`` alone: per
    method ``n`` (crystals with a value), ``n_crystals``, ``failures`` (no value), mean and
    median E_latt; the student's and CHGNet's paired difference to the teacher (MAE and signed
    mean over the crystals both have, each with its seeded bootstrap 95 % interval); the
    spread max - min between the methods per crystal (mean, median, max over the crystals
    with at least two values, and the mean over those with all of them); the student's MAE
    to the teacher per fold. kJ/mol per molecule."""
    from kd_nnp.evaluation.stats import bootstrap_ci

    ref = teacher_label(teacher)
    wide = lattice_wide(per)
    methods: dict[str, Any] = {}
    for method, g in per.groupby("method", sort=True):
        v = g.loc[g["status"] == "ok", "e_latt_kj_mol"].astype(float)
        methods[str(method)] = {
            "n": int(v.notna().sum()),
            "n_crystals": int(len(g)),
            "failures": int((g["status"] != "ok").sum()),
            "mean_kj_mol": _f(v.mean()),
            "median_kj_mol": _f(v.median()),
        }
    to_teacher = {}
    for method in (STUDENT, CHGNET):
        if method not in wide or ref not in wide:
            continue
        d = (wide[method] - wide[ref]).dropna()
        lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed)
        slo, shi = bootstrap_ci(d, n_boot=n_boot, seed=seed, absolute=False)
        to_teacher[method] = {
            "reference": ref,
            "n": int(len(d)),
            "mae_kj_mol": _f(d.abs().mean()),
            "mae_ci95_kj_mol": [_f(lo), _f(hi)],
            "mean_diff_kj_mol": _f(d.mean()),
            "mean_diff_ci95_kj_mol": [_f(slo), _f(shi)],
        }
    spread = wide["spread"].dropna()
    cols = [c for c in wide.columns if c not in ("fold", "spread")]
    full = wide.loc[wide[cols].notna().all(axis=1), "spread"]
    folds = []
    if STUDENT in wide and ref in wide:
        for fold, g in wide.groupby("fold", sort=True):
            d = (g[STUDENT] - g[ref]).dropna()
            folds.append({"fold": int(fold), "n": int(len(d)), "mae_kj_mol": _f(d.abs().mean())})
    return {
        "methods": methods,
        "to_teacher": to_teacher,
        "spread": {
            "n": int(len(spread)),
            "mean_kj_mol": _f(spread.mean()),
            "median_kj_mol": _f(spread.median()),
            "max_kj_mol": _f(spread.max()),
            "n_all_methods": int(len(full)),
            "mean_all_methods_kj_mol": _f(full.mean()),
        },
        "student_per_fold": folds,
        "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "level": 0.95},
    }


def lattice_markdown(lat: dict[str, Any]) -> str:
    """The lattice lines of ``summary.md``."""
    from kd_nnp.utils.markdown import md_table

    fmt = lambda x: "nan" if x is None else f"{x:.1f}"  # noqa: E731

    def with_ci(d: dict[str, Any] | None, key: str) -> str:
        if not d:
            return ""
        lo, hi = d[key.replace("_kj_mol", "_ci95_kj_mol")]
        return f"{fmt(d[key])} [{fmt(lo)}, {fmt(hi)}]"

    rows = []
    for m, s in lat["methods"].items():
        d = lat["to_teacher"].get(m)
        rows.append({
            "method": m, "n": s["n"], "failures": s["failures"],
            "mean E_latt kJ/mol": fmt(s["mean_kj_mol"]), "median": fmt(s["median_kj_mol"]),
            "MAE vs teacher [95 %]": with_ci(d, "mae_kj_mol"),
            "signed mean vs teacher [95 %]": with_ci(d, "mean_diff_kj_mol"),
        })  # fmt: skip
    sp = lat["spread"]
    lines = [
        "Lattice energies (kJ/mol per molecule, relaxed crystal vs relaxed gas-phase "
        "molecules; no experimental reference: MAE and signed mean against the teacher over "
        "the crystals both have)",
        "",
        md_table(pd.DataFrame(rows)),
        "",
    ]
    if sp["n"]:
        lines.append(
            f"- spread between the methods (max - min per crystal): mean {fmt(sp['mean_kj_mol'])}"
            f", median {fmt(sp['median_kj_mol'])}, max {fmt(sp['max_kj_mol'])} kJ/mol over "
            f"{sp['n']} crystals (mean {fmt(sp['mean_all_methods_kj_mol'])} over the "
            f"{sp['n_all_methods']} with every method)"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- the job
def run_cv(cfg: DictConfig) -> dict[str, Any]:
    """The cross-validation job of ``conf/evaluate/cv.yaml`` (composed with ``conf/demo.yaml``)."""
    from kd_nnp.evaluation.relax import run_relax_benchmark
    from kd_nnp.evaluation.report import parity_plot
    from kd_nnp.evaluation.settings import LatticeSettings, RelaxSettings
    from kd_nnp.training.crystal_store import build_crystal_store, prerelax_teacher
    from kd_nnp.training.train import run_training
    from kd_nnp.utils.settings import from_mapping
    from kd_nnp.utils.threads import set_threads

    set_threads(cfg.get("threads"))
    cv = cfg.cv
    out = Path(cv.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher = str(cfg.teacher.name)
    try:  # the teachers the students learn from: labelled and relaxed as baselines too
        label_teachers, _ = label_set_teachers(cfg.data.get("label_set"))
    except ValueError as exc:
        raise KdNnpError(str(exc)) from exc
    baselines = baseline_calculators(teacher, label_teachers)
    workers = int(cv.workers)
    relax = from_mapping(RelaxSettings, cfg.demo.relax, where="demo.relax")
    lattice = cv.get("lattice", True)
    if not isinstance(lattice, bool):
        raise KdNnpError(f"cv.lattice must be true or false, got {lattice!r}")
    lat_settings = from_mapping(LatticeSettings, cfg.demo.get("lattice"), where="demo.lattice")
    steps = 6 if lattice else 5
    times: dict[str, float] = {}

    t = time.perf_counter()
    codes = list(cv.codes) if cv.get("codes") is not None else None
    crystals, skipped = cv_crystals(list(cv.dbs), cv.max_atoms, codes)
    folds = make_folds(crystals, int(cv.folds), int(cv.seed))
    _record_folds(
        out / "folds.json",
        {"dbs": list(cv.dbs), "max_atoms": cv.max_atoms, "seed": int(cv.seed), "folds": folds},
    )
    fold_of = {c: fd["fold"] for fd in folds for c in fd["crystals"]}
    print(f"[1/{steps}] {len(crystals)} crystals in {len(folds)} folds of whole molecules "
          f"({[len(fd['crystals']) for fd in folds]} crystals); {len(skipped)} skipped")  # fmt: skip
    store = build_crystal_store(
        out / "store",
        crystals,
        OmegaConf.to_container(cfg.demo.frames, resolve=True),
        seed=int(cfg.demo.seed),
        teacher=prerelax_teacher(cfg),
        workers=workers,
        description="kd-nnp evaluate cv: perturbed pyxtal crystals",
    )
    times["frames"] = time.perf_counter() - t

    t = time.perf_counter()
    names = ", ".join(teachers_to_label(teacher, label_teachers))
    print(f"[2/{steps}] labelling {store} with {names}")
    for line in label_cv_store(store, teacher, cfg.data.get("label_set"), workers):
        print(f"      {line}")
    times["label"] = time.perf_counter() - t

    by_code = dict(crystals)
    frames = []
    fold_info = []
    students: dict[int, str] = {}
    t = time.perf_counter()
    for fd in folds:
        k = fd["fold"]
        fdir = out / f"fold{k}"
        fdir.mkdir(exist_ok=True)
        exclude = fdir / "test_molecules.json"
        _write(exclude, json.dumps({"molecules": fd["molecules"], "crystals": fd["crystals"]}))
        print(f"[3/{steps}] fold {k}: training on the other folds ({len(fd['molecules'])} molecules "
              f"left out)")  # fmt: skip
        run_dir = fdir / "train"
        metrics = run_training(fold_config(cfg, store, exclude, run_dir), run_dir)
        _check_no_leak(run_dir, fd["crystals"])
        print(f"[4/{steps}] fold {k}: relaxing its {len(fd['crystals'])} crystals with its "
              "student")  # fmt: skip
        students[k] = f"student:{metrics['student']}"
        df = run_relax_benchmark(
            [(c, by_code[c]) for c in fd["crystals"]],
            {STUDENT: students[k]},
            fold_relax_dir(out, k),
            relax,
            workers=workers,
            references=False,
            progress=False,
        )
        frames.append(df)
        ex = metrics.get("excluded") or {}
        fold_info.append({
            "fold": k, "crystals": fd["crystals"], "n_molecules": len(fd["molecules"]),
            "n_train_frames": metrics.get("n_train"), "n_val_frames": metrics.get("n_val"),
            "excluded_frames": ex.get("n_frames"), "student": metrics["student"],
        })  # fmt: skip
    times["folds"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[4/{steps}] {', '.join(baselines)} on all {len(crystals)} crystals")
    base = run_relax_benchmark(
        crystals,
        baselines,
        out / BASELINES,
        relax,
        workers=workers,
        references=False,
    )
    times["baselines"] = time.perf_counter() - t

    per = per_crystal_table(pd.concat([*frames, base], ignore_index=True), fold_of)
    per.to_csv(out / "per_crystal.csv.tmp", index=False)
    (out / "per_crystal.csv.tmp").replace(out / "per_crystal.csv")
    summary = cv_summary(per, teacher, n_boot=int(cv.bootstrap), seed=int(cv.seed))
    summary.update(
        n_crystals=len(crystals),
        folds=fold_info,
        teacher=teacher,
        skipped=[list(s) for s in skipped],
        times_s=times,
    )
    parity_plot(
        per[per["status"] == "ok"],
        "volume_exp",
        "volume_pred",
        "volume (A^3)",
        out / "parity_volume.png",
    )
    error_histogram(per, out / "hist_volume_error.png")
    table = summary_markdown(summary)
    _write(out / "summary.md", table)
    _write(out / "summary.json", json.dumps(summary, indent=2))
    names = ["summary.json", "summary.md", "per_crystal.csv", "parity_volume.png",
             "hist_volume_error.png"]  # fmt: skip

    if lattice:
        t = time.perf_counter()
        print(f"[5/{steps}] lattice energies: the relaxed crystals above and their molecules "
              "relaxed alone")  # fmt: skip
        _, summary["lattice"] = cv_lattice(
            out,
            crystals,
            folds,
            students,
            baselines,
            relax,
            lat_settings,
            teacher=teacher,
            workers=workers,
            n_boot=int(cv.bootstrap),
            seed=int(cv.seed),
        )
        times["lattice"] = time.perf_counter() - t
        table += "\n" + lattice_markdown(summary["lattice"])
        _write(out / "summary.md", table)
        _write(out / "summary.json", json.dumps(summary, indent=2))
        names += [f"{LATTICE}/per_crystal.csv", f"{LATTICE}/table.csv"]

    print(f"[{steps}/{steps}] cross-validated relaxation benchmark\n")
    print(table)
    for name in names:
        print(f"  {out / name}")
    return summary
