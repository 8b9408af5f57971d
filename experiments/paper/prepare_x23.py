"""Prepare the offline substitute of the paper's data: X23 vdW-DF2 frames + teacher labels.

Hard targets: real periodic DFT (vdW-DF2) energies/forces/stresses of 25 molecular crystals
(``$KD_NNP_SHARED_DATA/x23_vdwdf2``, 3436 crystal frames; gas-phase frames are skipped).
Soft targets: an offline teacher (default ``so3lr``) on the same frames. Held-out evaluation
crystals: the experimental crystals of pyxtal's ``test.db`` with no molecule of the training
set (empirical formula), no structural defect (``kd_nnp.data.sanity``) and at most
``--max-atoms`` atoms, written as a demo-style split file for ``evaluate.split_from``.

    python experiments/paper/prepare_x23.py --store stores/x23 [--teacher so3lr --workers 2]

Every step is resumable (the store skips frames it holds, labelling skips labelled frames);
``--dry-run`` only prints the commands. The training commands to run next are printed at the
end (see experiments/paper/README.md).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any


def x23_crystals(x23_dir: Path) -> dict[str, Any]:
    """The first periodic frame (``ase.Atoms``) of each X23 file, by file stem."""
    from ase.io import iread

    from kd_nnp.data.sources.files import expand_paths, gas_phase_reason

    out: dict[str, Any] = {}
    for path in expand_paths([x23_dir]):
        for atoms in iread(str(path), index=":"):
            if gas_phase_reason(atoms) is None:
                out[path.stem] = atoms
                break
    if not out:
        raise FileNotFoundError(f"no periodic frames found in {x23_dir}")
    return out


def x23_formulas(x23_dir: Path) -> dict[str, str]:
    """Empirical formula of the crystal in each X23 file (first periodic frame)."""
    return {
        g: atoms.get_chemical_formula(empirical=True) for g, atoms in x23_crystals(x23_dir).items()
    }


def heldout_split(
    x23_dir: Path,
    db: str = "test",
    max_atoms: int | None = 100,
    train_elements_only: bool = False,
) -> dict[str, Any]:
    """``{"eval": [codes], "train": [X23 groups], "excluded": {code: reason}}``.

    ``train_elements_only``: also exclude crystals with an element absent from the training
    crystals (X23: H, C, N, O; test.db's small crystals often hold S).
    """
    from kd_nnp.data.sanity import structure_issue
    from kd_nnp.data.sources.pyxtal_db import pyxtal_crystals

    crystals = x23_crystals(x23_dir)
    train = {g: a.get_chemical_formula(empirical=True) for g, a in crystals.items()}
    elements = sorted({s for a in crystals.values() for s in a.get_chemical_symbols()})
    by_formula = {f: g for g, f in train.items()}
    eval_codes: list[str] = []
    excluded: dict[str, str] = {}
    for code, atoms in pyxtal_crystals(db, max_atoms=max_atoms):
        formula = atoms.get_chemical_formula(empirical=True)
        if formula in by_formula:
            excluded[code] = (
                f"same empirical formula {formula} as training crystal {by_formula[formula]}"
            )
            continue
        extra = sorted(set(atoms.get_chemical_symbols()) - set(elements))
        if train_elements_only and extra:
            excluded[code] = f"element(s) {extra} not in the training crystals ({elements})"
            continue
        issue = structure_issue(atoms, formula=atoms.info.get("mol_formula"))
        if issue:
            excluded[code] = issue
            continue
        eval_codes.append(code)
    return {
        "eval": eval_codes,
        "train": sorted(train),
        "excluded": excluded,
        "rule": f"pyxtal:{db} crystals with <= {max_atoms} atoms, no X23 empirical formula, "
        + (f"only the training elements {elements}, " if train_elements_only else "")
        + "no structure issue",
    }


def _run(cmd: list[str], dry_run: bool) -> None:
    shown = "kd-nnp " + " ".join(shlex.quote(c) for c in cmd)
    print(f"$ {shown}", flush=True)
    if not dry_run:
        subprocess.run([sys.executable, "-m", "kd_nnp.cli", *cmd], check=True)


def main(argv: list[str] | None = None) -> int:
    from kd_nnp.utils.paths import shared_data_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--store", type=Path, default=Path("stores/x23"), help="frames store to build")
    p.add_argument("--x23", type=Path, default=None, help="default: SHARED/x23_vdwdf2")
    p.add_argument("--teacher", default="so3lr", help="teacher for the soft labels")
    p.add_argument("--workers", type=int, default=2, help="labelling worker processes")
    p.add_argument("--db", default="test", choices=["test", "mech"], help="held-out crystals")
    p.add_argument("--max-atoms", type=int, default=100, help="largest held-out crystal")
    p.add_argument(
        "--train-elements-only",
        action="store_true",
        help="held-out crystals only with elements of the training crystals (H, C, N, O)",
    )
    p.add_argument("--split-only", action="store_true", help="only write heldout.json")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)

    x23 = args.x23
    if x23 is None:
        shared = shared_data_dir()
        if shared is None:
            print("shared data not found: set KD_NNP_SHARED_DATA or pass --x23", file=sys.stderr)
            return 2
        x23 = shared / "x23_vdwdf2"
    if not x23.is_dir():
        print(f"X23 folder not found: {x23}", file=sys.stderr)
        return 2
    store = args.store
    if not args.split_only:
        _run(
            ["data", "files", str(x23), "--out", str(store), "--source-name", "x23"],
            args.dry_run,
        )
        _run(
            ["label", f"store={store}", f"teacher={args.teacher}", f"workers={args.workers}"],
            args.dry_run,
        )
    split_file = store / "heldout.json"
    print(f"# held-out crystals -> {split_file}")
    if not args.dry_run:
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split = heldout_split(x23, args.db, args.max_atoms, args.train_elements_only)
        split_file.write_text(json.dumps(split, indent=2))
        print(f"  {len(split['eval'])} held-out crystals, {len(split['excluded'])} excluded")
    # vdW-DF2 hard energies are on another absolute scale than CHGNet's: align them too
    ev = f"data.hard_reference=student evaluate.split_from={split_file}"
    if args.db != "test":
        ev += f" evaluate.dataset=pyxtal:{args.db}"
    print("\nnext (see experiments/paper/README.md):")
    for exp, extra in (
        ("paper_fig4", " data.n_train=10,100,500,1000,2500"),
        ("paper_table1", " data.n_train=10,100,500,1000,2500"),
        ("paper_fig6", ""),
        ("paper_table2", " data.n_train=2500"),
    ):
        print(
            f"  kd-nnp train -m experiment={exp} data.store={store} "
            f"teacher={args.teacher}{extra} {ev} hydra.sweep.dir=outputs/x23/{exp}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
