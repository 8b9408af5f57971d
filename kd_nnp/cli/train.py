"""``kd-nnp train``: one distillation run or a Hydra multirun sweep of them.

The verb composes two stages: :func:`kd_nnp.training.train.run_training` trains and exports
the student, then (with an ``evaluate`` block) :func:`kd_nnp.evaluation.job.evaluate_student`
relaxes held-out crystals with it; training itself never imports evaluation.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from kd_nnp.training.train import run_training

log = logging.getLogger(__name__)


def _keep_first_hydra_files(run_dir: Path, subdir: str | None) -> None:
    """Hydra rewrites ``.hydra/{config,hydra,overrides}.yaml`` at every launch, before the task
    runs: keep the first launch's copy and put it back at later launches, so a refused (or
    resumed) relaunch does not leave provenance that contradicts the results."""
    if not subdir:
        return
    hydra_dir = run_dir / subdir
    first = hydra_dir / "first_launch"
    names = ("config.yaml", "hydra.yaml", "overrides.yaml")
    if first.is_dir():
        for name in names:
            if (first / name).exists():
                shutil.copy(first / name, hydra_dir / name)
    elif not (run_dir / "config.yaml").exists():  # the job's first launch
        first.mkdir(parents=True, exist_ok=True)
        for name in names:
            if (hydra_dir / name).exists():
                shutil.copy(hydra_dir / name, first / name)


def _task(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from kd_nnp.errors import KdNnpError

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        _keep_first_hydra_files(run_dir, hc.output_subdir)
        evaluate = None
        if cfg.get("evaluate"):
            from kd_nnp.evaluation.job import evaluate_student

            def evaluate(student: Path, job_dir: Path) -> dict:
                return evaluate_student(cfg.evaluate, student, job_dir)

        metrics = run_training(cfg, run_dir, list(hc.overrides.task), evaluate)
    except KdNnpError as err:  # into this job's train.log (kd-nnp report: failed.csv)
        log.error("job failed: %s: %s", type(err).__name__, err)
        raise
    except Exception as err:
        log.exception("job failed: %s: %s", type(err).__name__, err)
        raise
    objective = metrics.get("final", {}).get(cfg.get("objective", "val/loss"))
    return float(objective) if objective is not None else None


def main(argv: list[str]) -> int:
    from kd_nnp.utils.hydra_cli import run_hydra

    return run_hydra("train", _task, argv)
