"""Frame-level errors against a store's teacher labels (``kd-nnp evaluate frames``).

Training logs the validation MAEs of its own path, and with subsampled force Jacobians
(``data.force_atoms = M``) its force MAEs cover only the M cached atoms per frame. This check
recomputes every calculator on the frames themselves (students through chgnet's full
autograd, :func:`~kd_nnp.teachers.calculators.make_calculator`) and compares with the label
set the student learned from:

- **forces** on every atom (MAE per Cartesian component, eV/A; and the mean per-frame max
  |dF|);
- the **stress** (MAE per Voigt component, GPa) and the **molecular stress** (the stress along
  strains that keep every molecule rigid, :func:`kd_nnp.training.stress.molecular_stress`,
  computed the same way from the labels and from the calculator; ``NaN`` for a frame whose
  covalent network percolates);
- **energies with each crystal's mean offset removed** (meV/atom): a student's absolute
  energy on a crystal it never saw carries a per-crystal offset that the volumes, forces and
  stress do not depend on (docs/demo.md); what is compared is E(frame) - mean over the
  crystal's frames, for prediction and label alike. Crystals with a single selected frame
  carry no such difference and are left out of this column.

Typical use: the validation crystals of a training run (``--run RUN_DIR``, whose
``data_summary.json`` names them), i.e. molecules the student never trained on. Writes
``OUT/per_frame.csv``, ``OUT/summary.csv``, ``OUT/summary.md`` and ``OUT/summary.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kd_nnp.data.store import FrameStore, Labels, StoreError
from kd_nnp.errors import KdNnpError
from kd_nnp.training.stress import EV_PER_A3_TO_GPA, molecular_stress, molecule_offsets

log = logging.getLogger(__name__)

PARTS = ("val", "train", "all")
SUMMARY_COLUMNS = (
    "method",
    "n_frames",
    "n_crystals",
    "n_atoms",
    "e_rel_mae_mev",
    "f_mae",
    "f_max_mean",
    "s_mae_gpa",
    "s_mol_mae_gpa",
    "n_s_mol",
)


class FrameEvalError(KdNnpError, ValueError):
    """The frames or labels asked for cannot be evaluated (what and why in the message)."""


def select_frames(
    store: FrameStore,
    label_set: str,
    *,
    run_dir: str | Path | None = None,
    part: str = "val",
    groups: Sequence[str] | None = None,
    max_frames: int | None = None,
) -> tuple[list[tuple[Any, Labels]], dict[str, Any]]:
    """Frames of ``store`` with complete ``label_set`` labels (energy, forces, stress).

    Which frames: the crystals (store groups) of ``part`` (``val`` / ``train``) of the training
    run ``run_dir`` (its ``data_summary.json``), or the ``groups`` given, or every frame
    (``part='all'`` without ``groups``). ``max_frames`` keeps an evenly spaced subset of the
    selected frames sorted by id (deterministic). Returns the (frame, labels) pairs and a
    record of the selection (what was asked, what was skipped and why)."""
    if part not in PARTS:
        raise FrameEvalError(f"part must be one of {PARTS}, got {part!r}")
    if label_set not in store.label_names():
        raise FrameEvalError(
            f"store {store.root} has no label set {label_set!r} (it has: "
            f"{', '.join(store.label_names()) or 'none'}); label it with `kd-nnp label`"
        )
    wanted: set[str] | None = None
    source = "all frames"
    if groups:
        wanted = {str(g) for g in groups}
        source = f"{len(wanted)} crystals given"
    elif run_dir is not None:
        summ_path = Path(run_dir) / "data_summary.json"
        if not summ_path.is_file():
            raise FrameEvalError(f"{run_dir}: no data_summary.json (not a training run folder?)")
        summ = json.loads(summ_path.read_text())
        if part == "all":
            keys = ["train_groups", "val_groups"]
        else:
            keys = [f"{part}_groups"]
        missing = [k for k in keys if k not in summ]
        if missing:
            raise FrameEvalError(f"{summ_path}: no {', '.join(missing)} (written by kd-nnp train)")
        wanted = {str(g) for k in keys for g in summ[k]}
        source = f"{part} crystals of {run_dir}"
        if not wanted:
            raise FrameEvalError(f"{summ_path}: its {part} part holds no crystal")
    elif part != "all":
        raise FrameEvalError(f"part={part!r} needs a training run folder (--run) or --groups")
    frames = [f for f in store.iter_frames() if wanted is None or f.group_id in wanted]
    if wanted is not None:
        unknown = sorted(wanted - {f.group_id for f in frames})
        if unknown:
            raise FrameEvalError(
                f"store {store.root} holds no frame of the crystals {unknown[:5]}"
                f"{' ...' if len(unknown) > 5 else ''} (another store than the run's?)"
            )
    labels = store.labels(label_set).load([f.frame_id for f in frames])
    pairs, incomplete = [], []
    for f in sorted(frames, key=lambda fr: fr.frame_id):
        lab = labels.get(f.frame_id)
        if lab is None or lab.energy is None or lab.forces is None or lab.stress is None:
            incomplete.append(f.frame_id)
            continue
        pairs.append((f, lab))
    if not pairs:
        raise FrameEvalError(
            f"no frame of {source} has energy, forces and stress in label set {label_set!r}"
        )
    if max_frames is not None and len(pairs) > max_frames:
        if max_frames < 1:
            raise FrameEvalError(f"max_frames must be >= 1, got {max_frames}")
        keep = np.unique(np.linspace(0, len(pairs) - 1, max_frames).round().astype(int))
        pairs = [pairs[i] for i in keep]
    record = {
        "store": str(store.root),
        "label_set": label_set,
        "selection": source,
        "n_frames": len(pairs),
        "n_crystals": len({f.group_id for f, _ in pairs}),
        "skipped_incomplete_labels": incomplete,
    }
    return pairs, record


def frame_rows(calc: Any, method: str, pairs: Sequence[tuple[Any, Labels]]) -> list[dict[str, Any]]:
    """One row per frame: the calculator's errors against the labels (see the module doc)."""
    rows = []
    for frame, lab in pairs:
        atoms = frame.atoms.copy()
        atoms.calc = calc
        e = float(atoms.get_potential_energy())
        f = np.asarray(atoms.get_forces(), dtype=float)
        s = np.asarray(atoms.get_stress(voigt=True), dtype=float)
        n = len(atoms)
        df = f - lab.forces
        row = {
            "method": method,
            "frame_id": frame.frame_id,
            "crystal": frame.group_id,
            "n_atoms": n,
            "e_pred": e / n,
            "e_label": float(lab.energy) / n,
            "f_abs_sum": float(np.abs(df).sum()),
            "f_max": float(np.linalg.norm(df, axis=1).max()),
            "s_mae_gpa": float(np.abs(s - lab.stress).mean() * EV_PER_A3_TO_GPA),
            "s_mol_mae_gpa": np.nan,
        }
        try:
            off = molecule_offsets(frame.atoms)
        except ValueError as exc:  # a percolating covalent network has no molecules
            log.info("%s: no molecular stress (%s)", frame.frame_id, exc)
        else:
            vol = float(frame.atoms.get_volume())
            s_mol = molecular_stress(s, f, off, vol)
            l_mol = molecular_stress(lab.stress, lab.forces, off, vol)
            row["s_mol_mae_gpa"] = float(np.abs(s_mol - l_mol).mean() * EV_PER_A3_TO_GPA)
        rows.append(row)
    return rows


def _offset_free(per_frame: pd.DataFrame) -> pd.Series:
    """|(e_pred - e_label) - its mean over the crystal's frames| per frame (meV/atom); NaN for
    crystals with one frame."""
    d = per_frame["e_pred"] - per_frame["e_label"]
    keys = [per_frame["method"], per_frame["crystal"]]
    centred = d - d.groupby(keys).transform("mean")
    size = d.groupby(keys).transform("size")
    return (centred.abs() * 1000.0).where(size > 1)


def summarize(per_frame: pd.DataFrame) -> pd.DataFrame:
    """Per method: the MAEs of the module docstring (forces over every atom's components)."""
    per_frame = per_frame.copy()
    per_frame["e_rel_abs_mev"] = _offset_free(per_frame)
    out = []
    for method, g in per_frame.groupby("method", sort=False):
        out.append(
            {
                "method": method,
                "n_frames": len(g),
                "n_crystals": g["crystal"].nunique(),
                "n_atoms": int(g["n_atoms"].sum()),
                "e_rel_mae_mev": float(g["e_rel_abs_mev"].mean()),
                "f_mae": float(g["f_abs_sum"].sum() / (3 * g["n_atoms"].sum())),
                "f_max_mean": float(g["f_max"].mean()),
                "s_mae_gpa": float(g["s_mae_gpa"].mean()),
                "s_mol_mae_gpa": float(g["s_mol_mae_gpa"].mean()),
                "n_s_mol": int(g["s_mol_mae_gpa"].notna().sum()),
            }
        )
    return pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))


def summary_markdown(summ: pd.DataFrame, record: dict[str, Any]) -> str:
    head = (
        f"Errors against label set `{record['label_set']}` of `{record['store']}` on "
        f"{record['n_frames']} frames of {record['n_crystals']} crystals ({record['selection']}); "
        "forces on every atom.\n\n"
        "| method | frames | E MAE, crystal offset removed (meV/atom) | F MAE (eV/A) | "
        "mean max abs dF (eV/A) | stress MAE (GPa) | molecular stress MAE (GPa) |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r.method} | {r.n_frames} | {r.e_rel_mae_mev:.2f} | {r.f_mae:.4f} | "
        f"{r.f_max_mean:.3f} | {r.s_mae_gpa:.3f} | {r.s_mol_mae_gpa:.3f} |"
        for r in summ.itertuples()
    ]
    return head + "\n".join(lines) + "\n"


def run_frame_errors(
    specs: Sequence[str],
    store_dir: str | Path,
    label_set: str,
    out: str | Path,
    *,
    run_dir: str | Path | None = None,
    part: str = "val",
    groups: Sequence[str] | None = None,
    max_frames: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Evaluate every calculator spec on the selected frames; write the tables; return the
    summary (one row per spec, in the order given)."""
    from kd_nnp.teachers.calculators import check_spec, make_calculator, unique_labels

    if not specs:
        raise FrameEvalError("give at least one calculator (--calc)")
    for spec in specs:
        check_spec(spec)
    try:
        store = FrameStore(store_dir)
    except StoreError as exc:
        raise FrameEvalError(f"cannot open the store {store_dir}: {exc}") from exc
    pairs, record = select_frames(
        store, label_set, run_dir=run_dir, part=part, groups=groups, max_frames=max_frames
    )
    if record["skipped_incomplete_labels"]:
        log.warning(
            "%d frames skipped: no energy, forces and stress in %r",
            len(record["skipped_incomplete_labels"]),
            label_set,
        )
    labels = unique_labels(specs)
    rows: list[dict[str, Any]] = []
    for spec, label in labels.items():
        calc = make_calculator(spec)
        it: Sequence[tuple[Any, Labels]] = pairs
        if progress:
            from tqdm import tqdm

            it = tqdm(pairs, desc=f"frames ({label})")
        rows += frame_rows(calc, label, it)
    per_frame = pd.DataFrame(rows)
    summ = summarize(per_frame)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_frame.to_csv(out / "per_frame.csv", index=False)
    summ.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(summary_markdown(summ, record))
    (out / "summary.json").write_text(
        json.dumps({"selection": record, "summary": summ.to_dict(orient="records")}, indent=2)
    )
    return summ
