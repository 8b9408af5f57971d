"""``kd-nnp train``: one distillation run (or a Hydra multirun sweep of them).

Each run folder receives: ``config.yaml`` (the resolved config of the job's first launch) and
``job.json`` (its hash), ``provenance.json`` (package versions, git commit, host),
``data_summary.json`` (split, reference alignment), Lightning logs (CSV by default),
``checkpoints/``, ``student.pt`` (the exported CHGNet model file), ``loss_curves.png`` /
``crossover.json`` and ``metrics.json`` (written last: its presence marks the job done).
With ``committee.size=K > 1`` the K heads train after one data preparation
(:mod:`kd_nnp.training.committee`: ``heads/<k>/``, no checkpoints or loggers) and
``student.pt`` is the committee file.

Launching into a folder that already holds a job: the same job (same resolved config, see
:func:`kd_nnp.utils.provenance.check_job_config`) is skipped when finished and resumed from
``checkpoints/last.ckpt`` otherwise (the epoch history and ``logs/metrics.csv`` of the epochs
before the kill are kept); another config is refused with the keys that differ.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd_nnp.errors import KdNnpError, SettingsError
from kd_nnp.utils.threads import set_threads

log = logging.getLogger(__name__)


def instantiate_block(node: Any, where: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)``; a config the target refuses (an unknown
    accelerator, a misspelt argument) becomes a :class:`SettingsError` naming the config
    block ``where`` and the target's own message (one line, exit 1), not Hydra's wrapped
    traceback."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        target = node.get("_target_", "?") if hasattr(node, "get") else "?"
        raise SettingsError(
            f"{where}: {target} refused this config: {type(cause).__name__}: {cause}"
        ) from err


def _instantiate_dict(cfg: DictConfig | None, where: str) -> list[Any]:
    if not cfg:
        return []
    return [
        instantiate_block(v, f"{where}.{k}")
        for k, v in cfg.items()
        if v is not None and "_target_" in v
    ]


def _jsonable(obj: Any) -> Any:
    try:
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.item() if obj.numel() == 1 else obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    return obj


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _keep_csv_history(loggers: list[Any], resumed_epoch: int) -> list[tuple[Path, list[dict]]]:
    """Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts: take the rows
    of the epochs up to the checkpoint (``epoch <= resumed_epoch``) out of it first."""
    kept = []
    for lg in loggers:
        if type(lg).__name__ != "CSVLogger":
            continue
        path = Path(lg.log_dir) / "metrics.csv"
        if path.exists():
            rows = [
                r for r in _csv_rows(path) if not r.get("epoch") or int(r["epoch"]) <= resumed_epoch
            ]
            kept.append((path, rows))
            shutil.copy(path, path.with_suffix(".csv.before-resume"))
    return kept


def _merge_csv_history(kept: list[tuple[Path, list[dict]]]) -> None:
    for path, old in kept:
        new = _csv_rows(path) if path.exists() else []
        keys = list(dict.fromkeys(k for r in old + new for k in r))
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(old + new)
        tmp.replace(path)
        path.with_suffix(".csv.before-resume").unlink(missing_ok=True)


def run_training(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str] | None = None,
    evaluate: Callable[[Path, Path], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train one student as configured; return the metrics written to ``metrics.json``.

    ``evaluate(student_path, run_dir)``: the per-job evaluation of a config with an
    ``evaluate`` block (the ``kd-nnp train`` verb passes
    :func:`kd_nnp.evaluation.job.evaluate_student`; training never imports a later stage);
    its result goes to ``metrics.json`` under ``evaluation`` before the job counts as done.

    ``overrides`` (the job's command-line overrides) tell which keys a relaunch set on
    purpose (see :func:`kd_nnp.utils.provenance.config_differences`).
    """
    import lightning as L
    import torch

    from kd_nnp.training import ddp
    from kd_nnp.training.callbacks import LossCrossover
    from kd_nnp.training.committee import committee_settings
    from kd_nnp.training.data import excluded_molecules, replay_fingerprint
    from kd_nnp.training.export import export_student
    from kd_nnp.training.loss import check_replay_settings
    from kd_nnp.utils.provenance import check_job_config, environment_record

    committee = committee_settings(cfg)
    if committee.size > 1 and cfg.get("export_best", False):
        raise KdNnpError("export_best=true is not available with committee.size > 1")
    if committee.size > 1 and cfg.data.get("shuffle_seed") is not None:
        raise KdNnpError(
            "committee heads set their own batch order (committee.seed + k): "
            "leave data.shuffle_seed null"
        )
    # a replay ratio without replay frames, or replay frames without a ratio: before any file
    check_replay_settings(cfg.get("loss") or {}, cfg.data.get("replay_store"))
    if cfg.get("evaluate") and evaluate is None:
        raise ValueError("the config has an evaluate block: pass evaluate= (see kd_nnp.cli.train)")
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    excluded = excluded_molecules(cfg.data.get("exclude_molecules"))
    if excluded is not None:  # the molecules themselves, not only the file name, define the job
        resolved["data_excluded_molecules"] = {k: excluded[k] for k in ("n_molecules", "sha")}
    replay = replay_fingerprint(
        cfg.data.get("replay_store"), cfg.data.get("replay_label_set", "chgnet")
    )
    if replay is not None:  # likewise the replay frames and labels, not only the store's path
        resolved["data_replay"] = replay
    writer = ddp.env_rank() == 0  # data-parallel: rank 0 alone writes the run folder
    if writer and check_job_config(run_dir, resolved, overrides) == "same":
        log.info("%s holds this job already (same resolved config)", run_dir)
    done = run_dir / "metrics.json"
    if done.exists() and cfg.get("skip_if_done", True):
        log.info("%s exists: job already done, skipping", done)
        return json.loads(done.read_text())

    set_threads(cfg.get("threads"))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if writer:
        (run_dir / "provenance.json").write_text(json.dumps(environment_record(), indent=2))

    t0 = time.perf_counter()
    if committee.size == 1:  # built before the data is read: a bad trainer config fails at once
        callbacks = _instantiate_dict(cfg.get("callbacks"), "callbacks")
        crossover = next((c for c in callbacks if isinstance(c, LossCrossover)), None)
        loggers = _instantiate_dict(cfg.get("logger"), "logger")
        trainer: L.Trainer = instantiate_block(
            cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False,
            default_root_dir=str(run_dir),
        )  # fmt: skip
    module = instantiate_block(cfg.model, "model")
    # feature_workers: processes for every one-time cache (graphs, pretrained energies, features)
    datamodule = instantiate_block(
        cfg.data, "data", cache_workers=int(cfg.get("feature_workers", 1))
    )
    log.info(
        "data: reading %s, building graphs and fitting the energy reference ...", cfg.data.store
    )
    datamodule.setup("fit")
    log.info(
        "data ready in %.1f s: %d training / %d validation frames",
        time.perf_counter() - t0, len(datamodule.train_samples), len(datamodule.val_samples),
    )  # fmt: skip
    module.loss_fn.check_available(datamodule.available())
    module.check_memory(datamodule)
    if module.backend in ("cached", "auto"):  # full and lean take the graphs
        from kd_nnp.training.cache.attach import attach_feature_cache

        t_cache = time.perf_counter()
        log.info(
            "feature cache (model.backend=%s): building the missing entries ...", module.backend
        )
        attach_feature_cache(
            datamodule, module, workers=int(cfg.get("feature_workers", 1)),
            device=str(cfg.get("feature_device", "cpu")),
        )  # fmt: skip
        log.info("feature cache ready in %.1f s", time.perf_counter() - t_cache)
    if writer:
        (run_dir / "data_summary.json").write_text(json.dumps(datamodule.summary, indent=2))
    t_data = time.perf_counter() - t0
    if cfg.trainer.get("inference_mode", True):  # plain runs and committees alike
        raise ValueError("trainer.inference_mode must be false: forces need autograd in val/test")
    if committee.size > 1:
        from kd_nnp.training.committee import train_committee_run

        metrics = train_committee_run(cfg, committee, module, datamodule, run_dir, t_data)
        if evaluate is not None:
            metrics["evaluation"] = evaluate(Path(metrics["student"]), run_dir)
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(metrics, indent=2, default=str))
        tmp.replace(done)
        return metrics

    if 0 < len(datamodule.val_samples) < trainer.world_size:
        raise KdNnpError(
            f"{len(datamodule.val_samples)} validation frame(s) for {trainer.world_size} "
            "data-parallel ranks: each rank needs one (raise data.n_val or lower trainer.devices)"
        )

    last = run_dir / "checkpoints" / "last.ckpt"
    kept_csv: list[tuple[Path, list[dict]]] = []
    if last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        log.info("resuming from %s (after epoch %d)", last, int(ckpt["epoch"]) + 1)
        if crossover is None:
            log.warning("no LossCrossover callback: the epoch history restarts at the resume")
        kept_csv = _keep_csv_history(loggers, int(ckpt["epoch"])) if writer else []
        del ckpt
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    # epoch 0 (the pretrained model); a resumed run has it in the checkpoint's history
    if cfg.get("validate_before_training", True) and datamodule.val_samples and not last.exists():
        trainer.validate(module, datamodule=datamodule, verbose=False)
    t1 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.exists() else None)
    t_fit = time.perf_counter() - t1
    if not trainer.is_global_zero:  # the other data-parallel ranks are done
        return {}
    ddp.finish(trainer)  # the ranks this process started have ended (no-op without)

    ckpt_cb = trainer.checkpoint_callback
    best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb is not None else ""
    export_best = bool(cfg.get("export_best", False))
    if export_best and not best:
        raise KdNnpError("export_best=true but no checkpoint monitors a metric (callbacks)")
    if export_best:
        from kd_nnp.teachers.calculators import student_from_checkpoint

        student = student_from_checkpoint(best)
    else:
        student = module.student
    final = {k: _jsonable(v) for k, v in trainer.callback_metrics.items()}
    meta = {
        "ratios": module.loss_fn.ratios,
        "student": module.student_cfg,
        "data": {k: v for k, v in datamodule.summary.items() if "groups" not in k},
        "checkpoint": best if export_best else None,
        "exported": "best" if export_best else "last",
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
        "exported": "best" if export_best else "last",
        "best_checkpoint": best or None,
        "time_s": {"data": t_data, "fit": t_fit},
    }
    if datamodule.summary.get("excluded"):  # the leakage guard: what it dropped
        metrics["excluded"] = datamodule.summary["excluded"]
    if datamodule.summary.get("replay"):  # replay frames (data.replay_store), training only
        metrics["replay"] = datamodule.summary["replay"]
    if evaluate is not None:
        metrics["evaluation"] = evaluate(student_path, run_dir)
    for lg in loggers:
        lg.finalize("success")
    _merge_csv_history(kept_csv)
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, default=str))
    tmp.replace(done)
    return metrics
