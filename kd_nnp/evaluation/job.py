"""Per-job evaluation of a trained student: the paper's measurements after each sweep point.

``run_training`` calls :func:`evaluate_student` when ``cfg.evaluate`` is set (the
``conf/evaluate/`` group, used by ``conf/experiment/paper_*.yaml``; its keys are
:class:`kd_nnp.evaluation.settings.EvalJobSettings`) and stores the result
under ``metrics["evaluation"]`` in the job's ``metrics.json``:

- the student relaxes held-out experimental crystals (``dataset``, default ``pyxtal:test``;
  ``codes``, ``split_from`` (a demo ``crystals.json``: its ``"eval"`` list) or
  ``limit``/``max_atoms``) with :func:`kd_nnp.evaluation.relax.run_relax_benchmark` into
  ``RUN/eval/`` (resumable: ``relax.jsonl``);
- the ``baselines`` (``{label: calculator spec}``, e.g. pretrained CHGNet and the teacher) are
  relaxed ONCE per (dataset, crystals, relax settings) into a shared cache folder
  ``baseline_root/relax-<stable hash>`` that every job of every sweep reuses. Results there are
  keyed by calculator spec (labels are presentation only), and a file lock makes concurrent
  jobs (SLURM arrays) wait for the first one instead of relaxing the same pairs twice;
- the forgetting check (``forgetting: true``, the default, or a mapping of
  :class:`~kd_nnp.evaluation.settings.ForgettingSettings` keys;
  :func:`kd_nnp.evaluation.forgetting.job_forgetting`): the student vs pretrained CHGNet on
  inorganic and hybrid structures and the shared MPtrj frames, into ``RUN/eval/forgetting/``
  (the reference cached once in ``baseline_root/forgetting-<hash>``);
- optionally (``elastic:`` block) the paper's Table 2: stiffness tensors and moduli of the
  shared elastic set for the student, the baselines (cached the same way) and the reference
  columns "Mean model" and "PFP" (:func:`elastic_comparison`).

The returned dict (NaN -> null)::

    {"dataset": str, "crystals": [ids], "settings": {...},
     "summary": <summarize() row of the student>,
     "per_crystal": [{"id", "vol_err_pct", "density_err", "rmsd15", "failure", "converged"}],
     "baselines": {label: <summarize() row>},
     "forgetting": {"summary", "reference", "vol_change_pct", ...},  # forgetting: true
     "elastic": {...}}            # only with an ``elastic:`` block
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from kd_nnp.errors import SettingsError
from kd_nnp.evaluation.settings import ElasticJobSettings, EvalJobSettings
from kd_nnp.utils.jsonl import nan_to_none
from kd_nnp.utils.provenance import stable_hash

log = logging.getLogger(__name__)

STUDENT_LABEL = "student"
PER_CRYSTAL_COLUMNS = ("id", "vol_err_pct", "density_err", "rmsd15", "failure", "converged")


# ------------------------------------------------------------------ helpers
def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame rows as JSON-able dicts (NaN -> None, numpy scalars -> Python)."""
    if not len(df):
        return []
    return json.loads(df.to_json(orient="records"))


def codes_from_split(path: str | Path) -> list[str]:
    """The held-out crystal ids of a demo-style split file ``{"eval": [...], "train": [...]}``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"evaluate.split_from: {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"evaluate.split_from: {p} is not JSON ({exc})") from exc
    codes = data.get("eval") if isinstance(data, dict) else None
    if not isinstance(codes, list) or not codes or not all(isinstance(c, str) for c in codes):
        raise ValueError(f"evaluate.split_from: {p} has no non-empty 'eval' list of crystal ids")
    return codes


# ------------------------------------------------------------------ relaxation
def evaluate_student(
    eval_cfg: Mapping[str, Any] | EvalJobSettings, student_path: Path, run_dir: Path
) -> dict[str, Any]:
    """Relax held-out crystals with the student (and cached baselines); see module doc."""
    from kd_nnp.evaluation.relax import RESULTS_FILE, run_relax_benchmark
    from kd_nnp.evaluation.report import write_report
    from kd_nnp.evaluation.runner import shared_cache
    from kd_nnp.evaluation.stats import summarize
    from kd_nnp.evaluation.structures import load_dataset

    cfg = (
        eval_cfg
        if isinstance(eval_cfg, EvalJobSettings)
        else EvalJobSettings.from_config(eval_cfg, where="evaluate")
    )
    dataset = cfg.dataset
    codes = list(cfg.codes) if cfg.codes else None
    if cfg.split_from:
        codes = codes_from_split(cfg.split_from)
    crystals = load_dataset(dataset, limit=cfg.limit, max_atoms=cfg.max_atoms, codes=codes)
    if not crystals:
        raise SettingsError(
            f"evaluate: no crystal of {dataset} left after the filters "
            f"(codes={codes}, limit={cfg.limit}, max_atoms={cfg.max_atoms})"
        )
    ids = [c.id for c in crystals]
    relax = cfg.relax
    params = relax.protocol()
    baselines: dict[str, str] = {str(k): str(v) for k, v in (cfg.baselines or {}).items()}
    key = {"dataset": dataset, "crystals": ids, "params": params, "rmsd": relax.rmsd}
    baseline_root = Path(cfg.baseline_root).expanduser()
    baseline_dir = Path(
        cfg.baseline_dir or baseline_root / f"relax-{stable_hash(key)}"
    ).expanduser()
    student_spec = f"student:{Path(student_path).resolve()}"
    eval_dir = Path(run_dir) / "eval"
    common = dict(workers=cfg.workers, codes=ids, progress=cfg.progress)

    frames = []
    df_s = run_relax_benchmark(
        dataset,
        {STUDENT_LABEL: student_spec},
        eval_dir,
        relax,
        references=False,
        report=False,
        **common,
    )
    frames.append(df_s)
    references = cfg.references
    if baselines or references:
        specs = sorted(set(baselines.values()))
        with shared_cache(baseline_dir, key, RESULTS_FILE):
            df_b = run_relax_benchmark(
                dataset,
                {s: s for s in specs},
                baseline_dir,
                relax,
                references=references,
                report=True,
                **common,
            )
        for label, spec in baselines.items():
            g = df_b[(df_b["method"] == spec) & ~df_b["reference"]].copy()
            g["method"] = label
            frames.append(g)
        if references:
            frames.append(df_b[df_b["reference"]])
    df = pd.concat(frames, ignore_index=True)
    df = df.drop_duplicates(subset=["method", "id"], keep="first").reset_index(drop=True)
    write_report(df, eval_dir)
    summ = summarize(df)
    rows = {r["method"]: r for r in _records(summ)}

    per = df[(df["method"] == STUDENT_LABEL) & ~df["reference"]].copy()
    for col in PER_CRYSTAL_COLUMNS:
        if col not in per:
            per[col] = math.nan
    per["_order"] = per["id"].map({cid: i for i, cid in enumerate(ids)})
    per = per.sort_values("_order")[list(PER_CRYSTAL_COLUMNS)]

    result: dict[str, Any] = {
        "dataset": dataset,
        "crystals": ids,
        "settings": {
            **params,
            "rmsd": relax.rmsd,
            "references": references,
            "workers": cfg.workers,
            "codes": codes,
            "split_from": str(cfg.split_from) if cfg.split_from else None,
            "limit": cfg.limit,
            "max_atoms": cfg.max_atoms,
            "student_spec": student_spec,
            "baseline_specs": baselines,
            "baseline_dir": str(baseline_dir.resolve()),
            "eval_dir": str(eval_dir.resolve()),
        },
        "summary": rows.get(STUDENT_LABEL, {}),
        "per_crystal": _records(per),
        "baselines": {m: r for m, r in rows.items() if m != STUDENT_LABEL},
    }
    if cfg.elastic is not None:
        result["elastic"] = elastic_comparison(
            {STUDENT_LABEL: student_spec},
            eval_dir / "elastic",
            cfg.elastic,
            baselines=baselines if cfg.elastic.baselines is None else cfg.elastic.baselines,
            baseline_root=baseline_root,
            progress=cfg.progress,
        )
    if cfg.forgetting:
        from kd_nnp.evaluation.forgetting import job_forgetting

        result["forgetting"] = job_forgetting(
            student_spec,
            eval_dir / "forgetting",
            baseline_root,
            cfg.forgetting,
            progress=cfg.progress,
        )
    return nan_to_none(result)


# ------------------------------------------------------------------ elastic (Table 2)
TABLE2_FIXED_COLUMNS = ("Mean model", "PFP")


def elastic_comparison(
    students: Mapping[str, str],
    out_dir: str | Path,
    job: ElasticJobSettings | None = None,
    *,
    baselines: Mapping[str, str] | None = None,
    baseline_root: str | Path = "outputs/baselines",
    progress: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """The paper's Table 2: elastic-moduli MAE vs experiment of the ``students`` (``{label:
    spec}``), the ``baselines`` (cached once per settings in ``baseline_root/elastic-<hash>``
    or ``job.baseline_dir``), the mean model (predicts the mean experimental value) and PFP
    (the paper's teacher, from the reference tensors). Writes ``out_dir/elastic.md`` (+
    ``elastic_mae.csv``, ``elastic.csv``, ``parity_E_RH.png``). Without the shared data
    (``job.shared_dir`` or ``$KD_NNP_SHARED_DATA`` / ``../shared/data``) it returns
    ``{"skipped": reason}``. Instead of ``job``, ``settings`` may give the keys of the flat
    ``evaluate.elastic`` block (``compounds=``, ``strains=``, ...)."""
    from kd_nnp.evaluation.elastic import (
        MODULI,
        RESULTS_FILE,
        load_reference_tensors,
        mae_table,
        run_elastic_benchmark,
        write_elastic_report,
    )
    from kd_nnp.evaluation.runner import shared_cache
    from kd_nnp.utils.paths import shared_data_dir

    if job is not None and settings:
        raise TypeError("elastic_comparison: give job or settings keywords, not both")
    if job is None:
        job = ElasticJobSettings.from_config(settings, where="elastic_comparison")
    shared_dir, compounds, all_files, max_atoms = (
        job.shared_dir, job.compounds, job.all_files, job.max_atoms
    )  # fmt: skip
    sd = Path(shared_dir).expanduser() if shared_dir else shared_data_dir()
    if sd is None or not (sd / "elastic" / "elastic44_mapping.csv").is_file():
        reason = (
            f"elastic reference data not found (looked in {sd}); set $KD_NNP_SHARED_DATA or "
            "evaluate.elastic.shared_dir"
        )
        log.warning("skipping the elastic comparison: %s", reason)
        return {"skipped": reason}
    compounds = [str(c) for c in compounds] if compounds else None
    params = job.protocol.protocol()
    bench = dict(
        shared=True,
        shared_dir=sd,
        compounds=compounds,
        all_files=all_files,
        max_atoms=max_atoms,
        workers=job.workers,
        progress=progress,
    )
    baselines = dict(baselines or {})
    key = {
        "kind": "elastic",
        "shared_dir": str(sd.resolve()),
        "compounds": sorted(compounds) if compounds else "all",
        "all_files": all_files,
        "max_atoms": max_atoms,
        "params": params,
    }
    bdir = Path(
        job.baseline_dir or Path(baseline_root) / f"elastic-{stable_hash(key)}"
    ).expanduser()
    out = Path(out_dir)
    frames = []
    if baselines:
        specs = sorted(set(baselines.values()))
        with shared_cache(bdir, key, RESULTS_FILE):
            df_b = run_elastic_benchmark({s: s for s in specs}, bdir, job.protocol, **bench)
        for label, spec in baselines.items():
            g = df_b[df_b["method"] == spec].copy() if len(df_b) else df_b
            if len(g):
                g["method"] = label
                frames.append(g)
    df_s = run_elastic_benchmark(dict(students), out, job.protocol, **bench)
    frames.insert(0, df_s)
    df = pd.concat([f for f in frames if len(f)], ignore_index=True) if frames else pd.DataFrame()
    methods = [*baselines, *students]
    refs = load_reference_tensors(sd / "elastic" / "stiffness_tensors_rev.csv")
    write_elastic_report(df, refs, out, methods)
    tab, counts = mae_table(df, refs, methods)
    columns = [*TABLE2_FIXED_COLUMNS, *methods]
    per_cols = [
        c for c in ("method", "compound", "id", "status", "vol_err_pct", "negative_moduli")
        if c in df
    ]  # fmt: skip
    return nan_to_none(
        {
            "columns": columns,
            "mae": {c: {m: float(tab.loc[m, c]) for m in MODULI} for c in columns},
            "counts": counts,
            "per_structure": _records(df[[*per_cols, *[m for m in MODULI if m in df]]])
            if len(df)
            else [],
            "settings": {
                **key,
                "baseline_specs": baselines,
                "student_specs": dict(students),
                "baseline_dir": str(bdir.resolve()),
                "out_dir": str(out.resolve()),
            },
        }
    )
