"""``kd-nnp evaluate table2``: the paper's Table 2 for a distilled student.

Elastic moduli (Voigt / Reuss / Hill / RH averages of E, K, G; Poisson ratio; anisotropy) of
the shared elastic set, MAE vs experiment, in the paper's column layout: the mean model (it
predicts the mean experimental value of the compounds evaluated: no structure-property
relation), PFP (the paper's teacher, from the reference tensors), pretrained CHGNet, the
teacher used here and the student(s)::

    kd-nnp evaluate table2 --student outputs/runs/RUN/student.pt --out table2
    kd-nnp evaluate table2 --sweep outputs/paper_table2/DATE --out table2

``--sweep`` takes the student of the sweep's job with the lowest held-out volume MAE
(``metrics.json: evaluation.summary.vol_mae_pct``, what the paper selected its model by).
Pretrained CHGNet and the teacher are computed once per settings in ``--baseline-root``
(shared with the sweep jobs' ``evaluate`` blocks); everything resumes after a kill. Needs the
shared elastic data (``$KD_NNP_SHARED_DATA`` or ``../shared/data``); exits 2 when absent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kd_nnp.errors import KdNnpError
from kd_nnp.evaluation.settings import ElasticJobSettings


def best_student(sweep_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The student of the finished job with the lowest held-out volume MAE in a sweep."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep folder not found: {root}")
    best: tuple[float, Path, dict[str, Any]] | None = None
    n_jobs = 0
    for mfile in sorted(root.glob("*/metrics.json")):
        n_jobs += 1
        metrics = json.loads(mfile.read_text())
        summary = (metrics.get("evaluation") or {}).get("summary") or {}
        mae = summary.get("vol_mae_pct")
        student = mfile.parent / "student.pt"
        if mae is None or not student.is_file():
            continue
        if best is None or float(mae) < best[0]:
            best = (float(mae), student, metrics)
    if best is None:
        raise ValueError(
            f"{root}: none of {n_jobs} finished job(s) has an evaluated student "
            "(metrics.json: evaluation.summary.vol_mae_pct); run the sweep with an evaluate block"
        )
    return best[1], best[2]


def run_table2(args: argparse.Namespace, job: ElasticJobSettings) -> int:
    """The ``table2`` verb (options: :func:`kd_nnp.cli.evaluate.parser`)."""
    from kd_nnp.evaluation.job import elastic_comparison

    students: dict[str, str] = {}
    if args.sweep is not None:
        path, metrics = best_student(args.sweep)
        mae = metrics["evaluation"]["summary"]["vol_mae_pct"]
        print(f"best student of {args.sweep}: {path} (held-out volume MAE {mae:.2f} %)")
        students["Knowledge distillation"] = f"student:{path.resolve()}"
    else:
        for item in args.student:
            label, sep, path = item.partition("=")
            if not sep or Path(item).expanduser().is_file():  # sweep job folders contain '='
                label, path = "Knowledge distillation" if len(args.student) == 1 else "", item
            p = Path(path).expanduser()
            if not p.is_file():
                raise KdNnpError(f"student model file not found: {p}")
            students[label or f"student({p.parent.name}/{p.stem})"] = f"student:{p.resolve()}"
    baselines: dict[str, str] = {}
    if not args.no_chgnet:
        baselines["Pretrained CHGNet"] = "chgnet"
    if not args.no_teacher:
        baselines[f"teacher ({args.teacher})"] = f"teacher:{args.teacher}"
    res = elastic_comparison(
        students,
        args.out,
        job,
        baselines=baselines,
        baseline_root=args.baseline_root,
        progress=not args.quiet,
    )
    if "skipped" in res:
        print(f"table2: {res['skipped']}", file=sys.stderr)
        return 2
    (args.out / "table2.json").write_text(json.dumps(res, indent=2))
    print((args.out / "elastic.md").read_text())
    print(f"wrote {args.out}/elastic.md, elastic_mae.csv, table2.json, parity_E_RH.png")
    return 0
