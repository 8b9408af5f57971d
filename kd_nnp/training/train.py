"""``kd-nnp train``: one distillation run (or a Hydra multirun sweep of them).

Each run folder receives: ``config.yaml`` (resolved), ``provenance.json`` (package versions,
git commit, host), ``data_summary.json`` (split, reference alignment), Lightning logs
(CSV by default), ``checkpoints/``, ``student.pt`` (the exported CHGNet model file),
``loss_curves.png`` / ``crossover.json`` and ``metrics.json`` (written last: its presence
marks the job done, so a re-launched sweep skips it).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd_nnp.utils.threads import set_threads

log = logging.getLogger(__name__)


def _instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    from hydra.utils import instantiate

    if not cfg:
        return []
    return [instantiate(v) for v in cfg.values() if v is not None and "_target_" in v]


def _jsonable(obj: Any) -> Any:
    try:
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.item() if obj.numel() == 1 else obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    return obj


def run_training(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train one student as configured; return the metrics written to ``metrics.json``."""
    import lightning as L
    from hydra.utils import instantiate

    from kd_nnp.training.callbacks import LossCrossover
    from kd_nnp.training.export import export_student
    from kd_nnp.utils.provenance import environment_record

    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / "metrics.json"
    if done.exists() and cfg.get("skip_if_done", True):
        log.info("%s exists: job already done, skipping", done)
        return json.loads(done.read_text())

    set_threads(cfg.get("threads"))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "provenance.json").write_text(json.dumps(environment_record(), indent=2))

    t0 = time.perf_counter()
    module = instantiate(cfg.model)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module.loss_fn.check_available(datamodule.available())
    if module.backend != "full":
        from kd_nnp.training.cache.attach import attach_feature_cache

        attach_feature_cache(
            datamodule, module, workers=int(cfg.get("feature_workers", 1)),
            device=str(cfg.get("feature_device", "cpu")),
        )  # fmt: skip
    (run_dir / "data_summary.json").write_text(json.dumps(datamodule.summary, indent=2))
    t_data = time.perf_counter() - t0

    callbacks = _instantiate_dict(cfg.get("callbacks"))
    crossover = next((c for c in callbacks if isinstance(c, LossCrossover)), None)
    loggers = _instantiate_dict(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(run_dir)
    )
    if cfg.trainer.get("inference_mode", True):
        raise ValueError("trainer.inference_mode must be false: forces need autograd in val/test")
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if cfg.get("validate_before_training", True) and datamodule.val_samples:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    last = run_dir / "checkpoints" / "last.ckpt"
    t1 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.exists() else None)
    t_fit = time.perf_counter() - t1

    ckpt_cb = trainer.checkpoint_callback
    best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb is not None else ""
    if best and cfg.get("export_best", True):
        from kd_nnp.teachers.calculators import student_from_checkpoint

        student = student_from_checkpoint(best)
    else:
        student = module.student
    final = {k: _jsonable(v) for k, v in trainer.callback_metrics.items()}
    meta = {
        "ratios": module.loss_fn.ratios,
        "student": module.student_cfg,
        "data": {k: v for k, v in datamodule.summary.items() if "groups" not in k},
        "checkpoint": best or None,
    }
    student_path = export_student(student, run_dir / "student.pt", meta)

    metrics: dict[str, Any] = {
        "ratios": module.loss_fn.ratios,
        "n_train": len(datamodule.train_samples),
        "n_val": len(datamodule.val_samples),
        "seed": int(cfg.seed),
        "epochs": int(trainer.current_epoch),
        "final": final,
        "crossover_epoch": (crossover.result if crossover else {}).get("crossover_epoch"),
        "history": module.epoch_metrics,
        "student": str(student_path),
        "best_checkpoint": best or None,
        "time_s": {"data": t_data, "fit": t_fit},
    }
    if cfg.get("evaluate"):
        from kd_nnp.evaluation.job import evaluate_student

        metrics["evaluation"] = evaluate_student(cfg.evaluate, student_path, run_dir)
    for lg in loggers:
        lg.finalize("success")
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, default=str))
    tmp.replace(done)
    return metrics


def _task(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    metrics = run_training(cfg, run_dir)
    objective = metrics.get("final", {}).get(cfg.get("objective", "val/loss"))
    return float(objective) if objective is not None else None


def main(argv: list[str]) -> int:
    from kd_nnp.utils.hydra_cli import run_hydra

    return run_hydra("train", _task, argv)
