"""Committee training: K readout MLPs ("heads") on one frozen backbone, one run.

``kd-nnp train ... committee.size=K`` prepares the data once (graphs, energy reference, the
feature cache of ``model.backend=cached``) and then trains K heads one after the other in the
same process, each with its own seed: head k uses seed ``committee.seed + k`` (default: the
run's seed + k) for its training batch order and, with ``committee.bootstrap=true``, for a
bootstrap resample (drawn with replacement, same size) of the training frames. The split,
the validation frames and the cached features are shared. Every head starts from the same
student (the pretrained MLP), so the seed is what makes them differ.

Head k equals a plain run with ``data.shuffle_seed=<its seed>`` (same data, same steps) to
float rounding (tests/test_committee.py). Heads run one after another rather than as one
module with K heads on shared batches: each head keeps its own batch order (what makes heads
trained from one pretrained start differ without bootstrap), and the per-step work of the
cached backend is the MLP alone, so K heads cost about K single trainings (measured in
docs/performance.md).

The run's ``student.pt`` is then a committee file (:mod:`kd_nnp.teachers.committee`): the
backbone once, the K heads, and as its plain-CHGNet ``model`` the exact committee mean.
Finished heads are kept under ``heads/<k>/head.pt``: a killed committee run resumes at the
first unfinished head.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_nnp.errors import SettingsError
from kd_nnp.training.export import save_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommitteeSettings:
    """``committee`` block of ``conf/train.yaml``."""

    size: int = field(default=1, metadata={"help": "number of heads; 1 = one plain student"})
    bootstrap: bool = field(
        default=False,
        metadata={"help": "each head trains on a bootstrap resample of the training frames"},
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "seed of head 0 (head k: seed + k); null = the run's seed"},
    )

    def __post_init__(self) -> None:
        if int(self.size) < 1:
            raise SettingsError(f"committee.size must be >= 1, got {self.size}")

    def head_seeds(self, run_seed: int) -> list[int]:
        base = int(run_seed if self.seed is None else self.seed)
        return [base + k for k in range(int(self.size))]


def committee_settings(cfg: Any) -> CommitteeSettings:
    from kd_nnp.utils.settings import from_mapping

    return from_mapping(CommitteeSettings, cfg.get("committee"), where="committee")


def bootstrap_indices(n: int, seed: int) -> np.ndarray:
    """Indices of a bootstrap resample (n draws with replacement) of n frames."""
    return np.random.default_rng(seed).integers(0, n, size=n)


def fit_committee(
    settings: CommitteeSettings,
    run_seed: int,
    first_module: Any,
    make_module: Callable[[], Any],
    make_trainer: Callable[[Path], Any],
    datamodule: Any,
    run_dir: Path,
    validate_first: bool = False,
) -> dict[str, Any]:
    """Train the heads (``first_module`` is head 0's module, ``make_module`` builds the
    others; the data module is set up and its feature loader attached already).
    ``validate_first``: each head logs epoch 0 (the pretrained student) before training.

    Returns ``{"heads": [MLP modules], "records": [per-head seed, n_unique, history, fit_s]}``.
    """
    seeds = settings.head_seeds(run_seed)
    base_samples = list(datamodule.train_samples)
    base_shuffle_seed = datamodule.shuffle_seed
    heads, records = [], []
    try:
        for k, seed in enumerate(seeds):
            done = run_dir / "heads" / str(k) / "head.pt"
            if done.exists():
                saved = torch.load(done, map_location="cpu", weights_only=False)
                if saved["seed"] != seed or saved["bootstrap"] != settings.bootstrap:
                    raise RuntimeError(f"{done} was trained with other committee settings")
                mlp = _copy_mlp(first_module.student.mlp)
                mlp.load_state_dict(saved["mlp"])
                heads.append(mlp)
                records.append(saved["record"])
                log.info("committee head %d (seed %d): done already (%s)", k, seed, done)
                continue
            module = first_module if k == 0 else make_module()
            datamodule.shuffle_seed = seed
            if settings.bootstrap:
                idx = bootstrap_indices(len(base_samples), seed)
                datamodule.train_samples = [base_samples[i] for i in idx]
            trainer = make_trainer(done.parent)
            if validate_first and datamodule.val_samples:
                trainer.validate(module, datamodule=datamodule, verbose=False)
            t0 = time.perf_counter()
            trainer.fit(module, datamodule=datamodule)
            fit_s = time.perf_counter() - t0
            record = {
                "head": k,
                "seed": seed,
                "n_train_unique": len({s.frame_id for s in datamodule.train_samples}),
                "epochs": int(trainer.current_epoch),
                "fit_s": fit_s,
                "history": module.epoch_metrics,
                "final": {
                    k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1
                },
            }
            mlp = _copy_mlp(module.student.mlp)
            save_atomic(
                {"seed": seed, "bootstrap": settings.bootstrap, "mlp": mlp.state_dict(),
                 "record": record},
                done,
            )  # fmt: skip
            (done.parent / "record.json").write_text(json.dumps(record, indent=2, default=str))
            log.info("committee head %d (seed %d) trained in %.1f s", k, seed, fit_s)
            heads.append(mlp)
            records.append(record)
    finally:
        datamodule.train_samples = base_samples
        datamodule.shuffle_seed = base_shuffle_seed
    return {"heads": heads, "records": records}


def _copy_mlp(mlp: torch.nn.Module) -> torch.nn.Module:
    import copy

    out = copy.deepcopy(mlp).cpu().eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def export_committee(
    base: Any,
    heads: list[torch.nn.Module],
    path: str | Path,
    metadata: dict[str, Any],
    committee: dict[str, Any],
) -> Path:
    """Write the committee file (atomically): ``base``'s backbone, the heads, their mean as
    a plain CHGNet (:func:`kd_nnp.teachers.committee.committee_blob`)."""
    from kd_nnp.teachers.committee import committee_blob

    return save_atomic(committee_blob(base, heads, metadata, committee), path)


def train_committee_run(
    cfg: Any,
    settings: CommitteeSettings,
    module: Any,
    datamodule: Any,
    run_dir: Path,
    t_data: float,
) -> dict[str, Any]:
    """The committee part of :func:`kd_nnp.training.train.run_training` (data ready): train
    the heads, write ``student.pt`` (the committee file); return the run's metrics."""
    from kd_nnp.training.train import instantiate_block

    def make_trainer(head_dir: Path) -> Any:
        return instantiate_block(
            cfg.trainer, "trainer", callbacks=[], logger=False, enable_checkpointing=False,
            default_root_dir=str(head_dir),
        )  # fmt: skip

    t1 = time.perf_counter()
    result = fit_committee(
        settings, int(cfg.seed), module, lambda: instantiate_block(cfg.model, "model"),
        make_trainer, datamodule, run_dir,
        validate_first=bool(cfg.get("validate_before_training", True)),
    )  # fmt: skip
    t_fit = time.perf_counter() - t1
    records = result["records"]
    info = {
        "size": settings.size,
        "bootstrap": settings.bootstrap,
        "head_seeds": [r["seed"] for r in records],
    }
    meta = {
        "ratios": module.loss_fn.ratios,
        "student": module.student_cfg,
        "data": {k: v for k, v in datamodule.summary.items() if "groups" not in k},
        "checkpoint": None,
        "exported": "last",
        "committee": info,
    }
    student_path = export_committee(
        module.student, result["heads"], run_dir / "student.pt", meta, info
    )
    return {
        "ratios": module.loss_fn.ratios,
        "n_train": len(datamodule.train_samples),
        "n_val": len(datamodule.val_samples),
        "seed": int(cfg.seed),
        "epochs": records[0]["epochs"],
        "final": records[0]["final"],
        "crossover_epoch": None,
        "history": records[0]["history"],
        "student": str(student_path),
        "exported": "last",
        "best_checkpoint": None,
        "committee": {**info, "heads": records},
        "time_s": {"data": t_data, "fit": t_fit},
        **(
            {"excluded": datamodule.summary["excluded"]}
            if datamodule.summary.get("excluded")
            else {}
        ),
    }
