"""Find and load the job folders of a training sweep into one :class:`Sweep` (the jobs table).

A sweep directory is what ``kd-nnp train -m ...`` writes: ``multirun.yaml`` and one folder
per job (``<num>_<override_dirname>``). A job folder is any folder holding ``metrics.json``,
``config.yaml`` or ``.hydra/``; it is *finished* when ``metrics.json`` exists (written last
by :func:`kd_nnp.training.train.run_training`), otherwise it is listed as failed/unfinished
with the last lines of its ``*.log`` files as the reason.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kd_nnp.errors import KdNnpError
from kd_nnp.training.loss import RATIO_LABELS, RATIOS

CURVE_KEYS = ("mae_hard_energy", "mae_soft_energy", "mae_hard_forces", "mae_soft_forces")
FINAL_KEYS = tuple(f"{split}/{k}" for split in ("val", "train") for k in CURVE_KEYS) + (
    "val/mae_hard_stress",
    "val/mae_soft_stress",
    "val/loss",
    "train/loss",
)
#: evaluation.summary fields copied into the jobs table
EVAL_KEYS = (
    "vol_mae_pct",
    "vol_mean_pct",
    "density_mae",
    "rmsd15_mean",
    "rmsd15_matched_mean",
    "n_covered",
    "n_failures",
)
#: evaluation.forgetting.summary fields copied into the jobs table ({column: key}): how far
#: the student moved from pretrained CHGNet outside organic crystals (kd_nnp.evaluation.forgetting)
FORGETTING_KEYS = {
    "forget_e_mae_ev_atom": "energy_mae_ev_atom",
    "forget_f_mae_ev_a": "force_mae_ev_a",
    "forget_dv_mae_pct": "vol_change_mae_pct",
}
#: metrics of the Fig. 4 table when the jobs were evaluated (relaxation benchmark)
VOLUME_METRICS = ("vol_mae_pct", "vol_mean_pct", "density_mae", "rmsd15_mean")
#: stand-ins when no job carries an evaluation
FALLBACK_METRICS = ("val/mae_soft_energy", "val/mae_hard_energy")
#: replicate dimensions: averaged over, never part of a "setting"
REPLICATE_KEYS = ("seed", "data.seed")
#: config keys never treated as a sweep dimension (run paths, duplicated sub-configs)
_IGNORED_PREFIXES = (
    "paths.",
    "logger.",
    "callbacks.",
    "hydra.",
    "model.loss.",
    "model.student.",
    "loss.",
    "data.n_train",
    "data.store",
)


class SweepError(KdNnpError, ValueError):
    """The sweep directory cannot be read (missing, or no job folder in it)."""


@dataclass
class Sweep:
    """Everything the report needs, loaded once."""

    root: Path
    jobs: pd.DataFrame  # one row per finished job
    failed: pd.DataFrame  # job, path, overrides, reason
    histories: dict[str, list[dict[str, Any]]]  # job -> metrics.json history rows
    baselines: pd.DataFrame  # one row per baseline label (mean over jobs)
    dims: list[str] = field(default_factory=list)  # config keys varying besides ratios
    warnings: list[str] = field(default_factory=list)
    multirun: dict[str, Any] | None = None

    @property
    def has_evaluation(self) -> bool:
        return bool(len(self.jobs)) and bool(self.jobs["vol_mae_pct"].notna().any())

    @property
    def has_forgetting(self) -> bool:
        """Whether any job carries the forgetting check (``evaluation.forgetting``)."""
        col = next(iter(FORGETTING_KEYS))
        return bool(len(self.jobs)) and col in self.jobs and bool(self.jobs[col].notna().any())

    @property
    def n_finished(self) -> int:
        return len(self.jobs)

    @property
    def n_failed(self) -> int:
        return len(self.failed)

    def metrics(self) -> tuple[tuple[str, ...], str]:
        """The metrics to aggregate and a sentence saying which (volume or fallback)."""
        if self.has_evaluation:
            return VOLUME_METRICS, "cell volume error after relaxation (evaluation.summary)"
        return FALLBACK_METRICS, (
            "no job has an evaluation: final validation energy MAEs (eV/atom) "
            "instead of the volume error"
        )

    def primary_metric(self) -> str:
        return self.metrics()[0][0]


def _is_job_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("metrics.json", "config.yaml", ".hydra"))


def find_job_dirs(root: Path) -> list[Path]:
    """Job folders below ``root`` (not descending into a job, nor into ``report/``)."""
    out: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if here != root and _is_job_dir(here):
            out.append(here)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "report")
    return sorted(out, key=_job_sort_key)


def _job_sort_key(path: Path) -> tuple[int, str]:
    head = path.name.split("_", 1)[0]
    return (int(head) if head.isdigit() else 10**9, str(path))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _read_yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


def _float(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _log_tail(job: Path, n: int = 3) -> str:
    lines: list[str] = []
    for log in sorted(job.glob("*.log")):
        try:
            text = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        tail = [ln.strip() for ln in text if ln.strip()][-n:]
        if tail:
            lines.append(f"{log.name}: " + " | ".join(tail))
    return " ; ".join(lines)


def _overrides(job: Path) -> str:
    path = job / ".hydra" / "overrides.yaml"
    if path.exists():
        try:
            items = _read_yaml(path) or []
            return " ".join(str(x) for x in items)
        except Exception:  # noqa: BLE001 - a broken overrides file only loses this column
            return ""
    return ""


def _crossovers(value: Any, history: list[dict[str, Any]]) -> tuple[float, float]:
    """(val, train) crossover epochs from metrics.json (dict per split, or a bare int)."""
    if isinstance(value, dict):
        return _float(value.get("val")), _float(value.get("train"))
    if value is not None:
        return _float(value), math.nan
    # not recorded: recompute from the history (kd_nnp.training.crossover, the training callback's rule)
    from kd_nnp.training.crossover import find_crossover

    out = []
    for split in ("val", "train"):
        rows = [r for r in history if r.get("split", "val") == split]
        ep = find_crossover(rows) if rows else None
        out.append(_float(ep))
    return out[0], out[1]


def loss_kind(ratios: dict[str, float]) -> str:
    hard = any(_float(ratios.get(k)) > 0 for k in ("r_he", "r_hf", "r_hs"))
    soft = any(_float(ratios.get(k)) > 0 for k in ("r_se", "r_sf", "r_ss"))
    if hard and not soft:
        return "hard only"
    if soft and not hard:
        return "soft only"
    return "hard+soft" if hard else "none"


def setting_label(ratios: dict[str, float], extras: dict[str, Any] | None = None) -> str:
    """E.g. ``soft only (rSE=1, rSF=1)``; zero ratios are left out; extra dims appended."""
    parts = [
        f"{RATIO_LABELS[k]}={_float(ratios.get(k)):g}"
        for k in RATIOS
        if _float(ratios.get(k)) != 0 and not math.isnan(_float(ratios.get(k)))
    ]
    parts += [f"{k}={v}" for k, v in (extras or {}).items()]
    return f"{loss_kind(ratios)} ({', '.join(parts)})"


def _varying_dims(configs: list[dict[str, Any]], names: list[str]) -> list[str]:
    """Config keys whose value differs between finished jobs, other than ratios/N/seeds."""
    keys = sorted({k for c in configs for k in c})
    dims = []
    for key in keys:
        if key in REPLICATE_KEYS or key.startswith(_IGNORED_PREFIXES):
            continue
        values = [c.get(key) for c in configs]
        if any(isinstance(v, str) and name and name in v for v, name in zip(values, names)):
            continue  # a path inside the job folder
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            dims.append(key)
    return dims


def load_sweep(root: str | os.PathLike[str]) -> Sweep:
    """Read every job folder under ``root``; raise :class:`SweepError` on unusable input."""
    root = Path(root).expanduser()
    if not root.exists():
        raise SweepError(f"sweep directory not found: {root}")
    if not root.is_dir():
        raise SweepError(f"not a directory: {root}")
    job_dirs = find_job_dirs(root)
    if not job_dirs:
        hint = (
            " (it is a single run folder itself: pass the folder that contains the runs)"
            if _is_job_dir(root)
            else ""
        )
        raise SweepError(
            f"no job folders in {root} (expected subfolders with metrics.json, config.yaml "
            f"or .hydra/, as written by `kd-nnp train -m`){hint}"
        )
    warnings: list[str] = []
    rows: list[dict[str, Any]] = []
    configs: list[dict[str, Any]] = []
    names: list[str] = []
    failed: list[dict[str, Any]] = []
    histories: dict[str, list[dict[str, Any]]] = {}
    baseline_rows: list[dict[str, Any]] = []
    for job in job_dirs:
        name = str(job.relative_to(root))
        metrics_path = job / "metrics.json"
        if not metrics_path.exists():
            reason = _log_tail(job) or "no metrics.json and no log (unfinished or failed)"
            failed.append(
                {"job": name, "path": str(job), "overrides": _overrides(job), "reason": reason}
            )
            continue
        try:
            metrics = json.loads(metrics_path.read_text())
            if not isinstance(metrics, dict):
                raise ValueError("top level is not an object")
        except (OSError, ValueError) as exc:
            msg = f"unreadable {metrics_path}: {exc}"
            warnings.append(msg)
            failed.append(
                {"job": name, "path": str(job), "overrides": _overrides(job), "reason": msg}
            )
            continue
        config: dict[str, Any] = {}
        if (job / "config.yaml").exists():
            try:
                config = _flatten(_read_yaml(job / "config.yaml") or {})
            except Exception as exc:  # noqa: BLE001 - reported, the metrics still count
                warnings.append(f"unreadable {job / 'config.yaml'}: {exc}")
        row, base = _job_row(name, job, metrics, config)
        rows.append(row)
        configs.append(config)
        names.append(job.name)
        histories[name] = list(metrics.get("history") or [])
        baseline_rows += base

    dims = _varying_dims(configs, names) if configs else []
    for row, config in zip(rows, configs):
        extras = {k: config.get(k) for k in dims}
        row.update({k: v for k, v in extras.items()})
        row["setting"] = setting_label(row, extras)
    jobs = pd.DataFrame(rows, columns=_job_columns(dims) if not rows else None)
    if len(jobs):
        cols = _job_columns(dims)
        jobs = jobs[[c for c in cols if c in jobs] + [c for c in jobs if c not in cols]]
    failed_df = pd.DataFrame(failed, columns=["job", "path", "overrides", "reason"])
    baselines = _baselines(baseline_rows)
    datasets = sorted({d for d in jobs.get("eval_dataset", pd.Series(dtype=object)).dropna()})
    if len(datasets) > 1:
        warnings.append(f"jobs were evaluated on different datasets: {datasets}")
    multirun = None
    if (root / "multirun.yaml").exists():
        try:
            multirun = _read_yaml(root / "multirun.yaml")
        except Exception as exc:  # noqa: BLE001
            warnings.append(f"unreadable {root / 'multirun.yaml'}: {exc}")
    return Sweep(root, jobs, failed_df, histories, baselines, dims, warnings, multirun)


def _job_columns(dims: list[str]) -> list[str]:
    return [
        "job",
        "setting",
        "loss_kind",
        *RATIOS,
        *dims,
        "n_train",
        "n_val",
        "seed",
        "data_seed",
        "epochs",
        *FINAL_KEYS,
        "crossover_epoch",
        "crossover_epoch_train",
        "eval_dataset",
        *EVAL_KEYS,
        *FORGETTING_KEYS,
        "time_fit_s",
        "path",
    ]


def _job_row(
    name: str, job: Path, metrics: dict[str, Any], config: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    ratios = dict(metrics.get("ratios") or {})
    for k in RATIOS:  # fall back on the resolved config
        if k not in ratios:
            ratios[k] = config.get(f"loss.{k}", 0.0)
    row: dict[str, Any] = {"job": name, "path": str(job)}
    row.update({k: _float(ratios.get(k)) for k in RATIOS})
    row["loss_kind"] = loss_kind(ratios)
    row["n_train"] = _float(metrics.get("n_train", config.get("data.n_train")))
    row["n_val"] = _float(metrics.get("n_val"))
    row["seed"] = _float(metrics.get("seed", config.get("seed")))
    row["data_seed"] = _float(config.get("data.seed"))
    row["epochs"] = _float(metrics.get("epochs"))
    final = metrics.get("final") or {}
    for key in FINAL_KEYS:
        row[key] = _float(final.get(key))
    history = list(metrics.get("history") or [])
    row["crossover_epoch"], row["crossover_epoch_train"] = _crossovers(
        metrics.get("crossover_epoch"), history
    )
    time_s = metrics.get("time_s")
    row["time_fit_s"] = _float(time_s.get("fit")) if isinstance(time_s, dict) else _float(time_s)
    evaluation = metrics.get("evaluation") or {}
    summary = evaluation.get("summary") or {}
    row["eval_dataset"] = evaluation.get("dataset") if evaluation else None
    for key in EVAL_KEYS:
        row[key] = _float(summary.get(key))
    forgetting = (evaluation.get("forgetting") or {}).get("summary") or {}
    for col, key in FORGETTING_KEYS.items():
        row[col] = _float(forgetting.get(key))
    base = []
    for label, bsum in (evaluation.get("baselines") or {}).items():
        if isinstance(bsum, dict):
            b = {"label": str(label), "dataset": evaluation.get("dataset")}
            b.update({k: _float(bsum.get(k)) for k in EVAL_KEYS})
            base.append(b)
    return row, base


def _baselines(rows: list[dict[str, Any]]) -> pd.DataFrame:
    cols = ["label", "dataset", "n_jobs", *EVAL_KEYS]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows)
    out = []
    for label, g in df.groupby("label", sort=False):
        r: dict[str, Any] = {
            "label": label,
            "dataset": ",".join(sorted({str(d) for d in g["dataset"].dropna()})),
            "n_jobs": len(g),
        }
        r.update({k: g[k].mean() for k in EVAL_KEYS})  # NaN-skipping
        out.append(r)
    return pd.DataFrame(out, columns=cols)
