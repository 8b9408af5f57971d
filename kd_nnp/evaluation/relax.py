"""Relaxation benchmark: relax experimental crystals with any ASE calculator, compare with
experiment (volume, density, cell, RMSD15), stream per-crystal JSON lines, resume.

The protocol is :mod:`kd_nnp.evaluation.protocol`, the job runner
:mod:`kd_nnp.evaluation.runner`, statistics :mod:`kd_nnp.evaluation.stats` and the tables /
plots :mod:`kd_nnp.evaluation.report`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ase import Atoms
from ase.calculators.calculator import Calculator

from kd_nnp.evaluation.protocol import (
    add_rmsd15,
    committee_volume_spread,
    compare_structures,
    failure_reasons,
    relax_structure,
)
from kd_nnp.evaluation.report import write_report
from kd_nnp.evaluation.runner import (
    Structure,
    atoms_from_dict,
    get_calc,
    label_calculators,
    latest,
    run_jobs,
)
from kd_nnp.evaluation.settings import RelaxSettings
from kd_nnp.evaluation.structures import Crystal, load_dataset, pyxtal_reference_cells
from kd_nnp.utils.provenance import environment_record

log = logging.getLogger(__name__)

RESULTS_FILE = "relax.jsonl"


def _relax_task(item: dict[str, Any]) -> dict[str, Any]:
    """One (calculator, crystal) relaxation in a worker process."""
    return _relax_record(item, get_calc(item["spec"], item.get("fingerprint")))


def _relax_record(
    item: dict[str, Any], calc: Calculator, relaxed: Callable[[], None] | None = None
) -> dict[str, Any]:
    """The record of one crystal relaxed with ``calc`` (``relaxed()`` is called once the
    relaxation needs no more forces: the batched backend's crystal leaves the batch)."""
    import warnings

    from kd_nnp.teachers.committee import CommitteeCalculator

    # FrechetCellFilter's matrix log: scipy warns at ~1e-13 relative error on every step
    warnings.filterwarnings("ignore", message="logm result may be inaccurate")
    exp = atoms_from_dict(item["atoms"])
    settings = RelaxSettings(**item["settings"])
    committee = isinstance(calc, CommitteeCalculator)
    if committee:  # the mean while relaxing (a single student's cost), the spread at the end
        calc.derivative_spread = False
    pred, info = relax_structure(exp, calc, settings)
    if relaxed is not None:
        relaxed()
    rec: dict[str, Any] = {"status": "ok", **info, **compare_structures(exp, pred)}
    if committee:
        rec.update(committee_volume_spread(pred, calc))
    if item.get("rmsd", True):
        add_rmsd15(rec, exp, pred)
    rec["final_cell"] = np.round(pred.cell.array, 6).tolist()
    rec["final_positions"] = np.round(pred.positions, 5).tolist()
    return rec


def as_crystals(
    structures: str | Sequence[tuple[str, Atoms]] | Sequence[Crystal],
    skipped: list[tuple[str, str]],
    **filters: Any,
) -> tuple[list[Crystal], str | None]:
    """The crystals of a dataset spec (filtered; unreadable CIFs appended to ``skipped``) or of
    ``[(id, Atoms)]`` / ``[Crystal]`` (ids must be unique), and the spec (None for a list)."""
    if isinstance(structures, str):
        return load_dataset(structures, skipped=skipped, **filters), structures
    out = []
    for s in structures:
        if isinstance(s, Crystal):
            out.append(s)
        else:
            cid, atoms = s
            out.append(Crystal(str(cid), atoms, "api"))
    ids = [c.id for c in out]
    if len(set(ids)) != len(ids):
        raise ValueError("structure ids must be unique")
    return out, None


def run_relax_benchmark(
    structures: str | Sequence[tuple[str, Atoms]] | Sequence[Crystal],
    calculators: dict[str, str] | Sequence[str],
    out_dir: str | Path,
    settings: RelaxSettings | None = None,
    *,
    workers: int = 2,
    limit: int | None = None,
    max_atoms: int | None = None,
    codes: Sequence[str] | None = None,
    references: bool = True,
    progress: bool = True,
    report: bool = True,
    run: bool = True,
) -> pd.DataFrame:
    """Relax every crystal with every calculator; return one row per (method, crystal).

    ``structures``: a dataset spec (``pyxtal:test``, a CIF folder; filtered by ``limit``,
    ``max_atoms``, ``codes``; unreadable CIFs are skipped and listed in the report) or
    ``[(id, Atoms), ...]``. ``calculators``: ``{label: spec}`` or a list of specs (labels
    from :func:`method_label`; two specs with one label are an error). ``settings``: the
    protocol (default :class:`RelaxSettings`). Results stream to ``out_dir/relax.jsonl``;
    pairs already there from the same calculator and protocol are skipped (resume). With
    ``references`` the relaxed cells stored in pyxtal's test.db are added as reference rows.
    With ``report`` the tables and parity plots are written too; ``run=False`` only reports
    what the JSON lines already hold (missing pairs are listed as ``status == "missing"``
    failures, never dropped).
    """
    settings = settings or RelaxSettings()
    settings.check()  # built in Python, not from_mapping: an unknown backend is refused here
    calculators = label_calculators(calculators)
    skipped: list[tuple[str, str]] = []
    crystals, dataset = as_crystals(
        structures, skipped, limit=limit, max_atoms=max_atoms, codes=codes
    )
    for f, why in skipped:
        log.warning("skipped %s: %s", f, why)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = settings.protocol()
    run_settings = {
        "dataset": dataset,
        "crystals": [c.id for c in crystals],
        "skipped": skipped,
        "calculators": calculators,
        "params": params,
        "rmsd": settings.rmsd,
        "workers": workers,
    }
    with (out / "run.json").open("a") as fh:
        fh.write(json.dumps({"settings": run_settings, "environment": environment_record()}) + "\n")

    structs = [
        Structure(c.id, c.atoms, {"source": c.source, "formula": c.atoms.get_chemical_formula()})
        for c in crystals
    ]
    executor = None
    batched_stats = None
    if settings.backend == "batched":
        from kd_nnp.evaluation.batched import check_batchable

        for spec in calculators.values():
            check_batchable(spec)
        if workers > 1:
            log.warning(
                "backend=batched relaxes all crystals in this process (batch_size=%d); "
                "workers=%d is not used",
                settings.batch_size,
                workers,
            )
        batched_stats: dict[str, Any] = {}
        executor = _batched_executor(settings, progress, batched_stats)
    existing = run_jobs(
        _relax_task,
        calculators,
        structs,
        out / RESULTS_FILE,
        params,
        payload={"rmsd": settings.rmsd},
        workers=1 if executor is not None else workers,  # batched: the models in this process
        progress=progress,
        desc="relax",
        run=run,
        executor=executor,
    )
    wanted = {c.id for c in crystals}
    exp_by_id = {c.id: c.atoms for c in crystals}
    records = [
        r for r in latest(existing).values() if r["id"] in wanted and r["method"] in calculators
    ]
    have = {(r["method"], r["id"]) for r in records}
    for label, spec in calculators.items():
        for c in crystals:
            if (label, c.id) not in have:
                records.append(
                    {
                        "method": label,
                        "spec": spec,
                        "id": c.id,
                        "status": "missing",
                        "error": "no result in the JSON lines",
                        "converged": False,
                    }
                )
    if settings.rmsd:
        _fill_missing_rmsd(records, exp_by_id)
    if references and dataset is not None:
        records += pyxtal_reference_cells(dataset, [c.id for c in crystals])
    df = records_to_frame(records, settings.volume_std_threshold_pct)
    df.attrs["skipped"] = skipped
    if batched_stats:  # the batched backend ran: forwards, their seconds and batch sizes
        df.attrs["batched"] = {k: v for k, v in batched_stats.items() if k != "batch_sizes"}
    if report:
        write_report(df, out, skipped=skipped)
    return df


def _batched_executor(
    settings: RelaxSettings, progress: bool, stats: dict[str, Any]
) -> Callable[[list[tuple[Any, dict[str, Any]]]], Iterator[Any]]:
    """Run relaxation jobs with the batched backend: the jobs of each calculator together,
    ``settings.batch_size`` crystals per CHGNet forward on ``settings.device``; ``stats``
    accumulates :func:`kd_nnp.evaluation.batched.run_batched`'s counts."""

    def run(jobs: list[tuple[Any, dict[str, Any]]]) -> Iterator[Any]:
        from tqdm.auto import tqdm

        from kd_nnp.evaluation.batched import chgnet_model, run_batched
        from kd_nnp.utils.threads import set_threads

        set_threads()
        groups: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
        for key, item in jobs:
            groups.setdefault(item["fingerprint"], []).append((key, item))
        bar = tqdm(total=len(jobs), desc="relax (batched)", disable=not progress)
        try:
            for group in groups.values():
                first = group[0][1]
                model = chgnet_model(first["spec"], first["fingerprint"])
                for res in run_batched(
                    _relax_record,
                    group,
                    model,
                    batch_size=settings.batch_size,
                    device=settings.device,
                    stats=stats,
                ):
                    bar.update(1)
                    yield res
        finally:
            bar.close()

    return run


def _fill_missing_rmsd(records: list[dict[str, Any]], exp_by_id: dict[str, Atoms]) -> None:
    """RMSD15 for records written without it (e.g. by an older run), from stored finals."""
    for rec in records:
        if rec.get("status") != "ok" or "rmsd15" in rec or "final_positions" not in rec:
            continue
        exp = exp_by_id[rec["id"]]
        pred = Atoms(
            numbers=exp.numbers, positions=rec["final_positions"], cell=rec["final_cell"], pbc=True
        )
        add_rmsd15(rec, exp, pred)


DROP_COLUMNS = (
    "head_volume_shift_pct",
    "final_cell",
    "final_positions",
    "stress_gpa",
    "settings",
    "round_fmax",
    "exp_cell_factors",
)


def records_to_frame(
    records: list[dict[str, Any]],
    volume_std_threshold_pct: float = RelaxSettings.volume_std_threshold_pct,
) -> pd.DataFrame:
    """One row per record; a committee's crystals (``volume_std_pct``) get
    ``volume_uncertain``: the volume uncertainty exceeds the threshold or could not be
    estimated (a non-positive bulk modulus)."""
    rows = []
    for r in records:
        row = {k: v for k, v in r.items() if k not in DROP_COLUMNS}
        row.setdefault("reference", False)
        row["failure"] = "; ".join(failure_reasons(r))
        if r.get("status") == "ok" and "volume_std_pct" in r:
            std = r["volume_std_pct"]
            row["volume_uncertain"] = std is None or float(std) > volume_std_threshold_pct
        rows.append(row)
    df = pd.DataFrame(rows)
    if "reference" in df:
        df["reference"] = df["reference"].fillna(False).astype(bool)
    return df
