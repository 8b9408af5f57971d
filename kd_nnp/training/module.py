"""``DistillationModule``: the frozen-backbone CHGNet student trained with the distillation loss.

Three exact prediction paths give the same energies, forces, stresses and MLP gradients:

- ``full``: CHGNet's own forward with autograd forces/stress through the frozen backbone;
- ``lean``: the backbone forward per frame, forces/stress by one vector-Jacobian product and
  their MLP gradients by one Jacobian-vector product, second order only through the MLP
  (:mod:`kd_nnp.training.lean`; no cache, a fraction of ``full``'s memory);
- ``cached``: features and their Jacobians cached once per frame
  (:mod:`kd_nnp.training.jacobian`, :mod:`kd_nnp.training.cache.features`), so a step touches only the MLP (issue 6).

Forces need autograd in validation/test too: the Trainer must run with
``inference_mode=False`` (the configs do), and the steps re-enable grad explicitly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from kd_nnp.errors import SettingsError
from kd_nnp.training.batch import QUANTITIES, TARGETS, Batch, Prediction
from kd_nnp.training.lean import predict_lean
from kd_nnp.training.loss import DistillationLoss
from kd_nnp.training.predict import predict_from_features, predict_full
from kd_nnp.training.stress import EV_PER_A3_TO_GPA, full_to_voigt
from kd_nnp.training.student import load_student, trainable_parameter_names

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BACKENDS = ("full", "lean", "cached", "auto")


def _describe(factory: Any) -> Any:
    """A partial optimizer/scheduler as plain data for the hyperparameters log."""
    if factory is None:
        return None
    if isinstance(factory, partial):
        name = f"{factory.func.__module__}.{factory.func.__qualname__}"
        return {"target": name, **{k: v for k, v in factory.keywords.items()}}
    return repr(factory)


class DistillationModule(L.LightningModule):
    """Lightning wrapper of the student and :class:`DistillationLoss`.

    Args:
        student: dict with ``model_name`` (CHGNet version, default 0.3.0), ``freeze``
            (``mlp`` | ``readout`` | ``all``) and optional ``path`` (a CHGNet model file).
        loss: the loss (ratios); Hydra instantiates it from ``conf/loss``.
        optimizer: ``params -> torch.optim.Optimizer`` (Hydra ``_partial_`` config,
            ``conf/model/optimizer/``; default Adam with lr 0.01, the paper's).
        scheduler: ``optimizer -> LR scheduler`` stepped once per epoch, or None
            (``conf/model/scheduler/``).
        compute_forces: predict forces (needed by force terms and force MAE metrics).
        compute_stress: ``auto`` (when the loss has stress terms) or a bool.
        backend: ``full`` | ``lean`` | ``cached`` | ``auto`` (cached where the Jacobian fits
            ``max_feature_bytes``, lean for the batches of the other frames); the data module
            attaches the cache of ``cached``/``auto``; ``lean`` needs none.
        allow_memory_overcommit: go on when the full backend's memory estimate of the
            largest batch exceeds the available memory by far (otherwise KdNnpError before
            training; :mod:`kd_nnp.training.memory_check`).
        anchor: L2-SP strength: the training loss gains ``anchor * mean((w - w0)^2)`` over the
            trainable parameters, ``w0`` their starting (pretrained) values, so features the
            training frames do not cover keep the pretrained head's response instead of an
            unbounded extrapolation. 0 (default): off. Only the training loss; the epoch
            losses and MAEs stay the distillation loss (``train/anchor`` logs the penalty).
    """

    def __init__(
        self,
        student: dict | None = None,
        loss: DistillationLoss | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        compute_forces: bool = True,
        compute_stress: bool | str = "auto",
        backend: str = "full",
        max_feature_bytes: int = 512 * 2**20,
        allow_memory_overcommit: bool = False,
        anchor: float = 0.0,
    ) -> None:
        super().__init__()
        anchor = float(anchor)
        if not anchor >= 0 or anchor == float("inf"):
            raise SettingsError(f"model.anchor must be finite and >= 0, got {anchor}")
        student = dict(student or {})
        self.student_cfg = {
            "model_name": student.get("model_name", "0.3.0"),
            "freeze": student.get("freeze", "mlp"),
            "path": student.get("path"),
        }
        self.loss_fn = loss if loss is not None else DistillationLoss()
        self.save_hyperparameters(
            {
                "student": self.student_cfg,
                "ratios": self.loss_fn.ratios,
                "optimizer": _describe(optimizer),
                "scheduler": _describe(scheduler),
                "compute_forces": compute_forces,
                "compute_stress": compute_stress,
                "backend": backend,
                "anchor": anchor,
            }
        )
        self.student = load_student(**self.student_cfg)
        self.trainable_names = trainable_parameter_names(self.student)
        self.anchor = anchor
        # the starting values of the trainable parameters (before any checkpoint is restored:
        # a resumed run is anchored to the same pretrained weights); not saved in checkpoints
        self._anchor_names: list[str] = []
        if anchor > 0:
            for i, p in enumerate(p for p in self.student.parameters() if p.requires_grad):
                self.register_buffer(f"_anchor_{i}", p.detach().clone(), persistent=False)
                self._anchor_names.append(f"_anchor_{i}")
        self.optimizer = optimizer if optimizer is not None else partial(torch.optim.Adam, lr=0.01)
        self.scheduler = scheduler
        self.compute_forces = bool(compute_forces) or self.loss_fn.needs_forces
        self.compute_stress = (
            self.loss_fn.needs_stress if compute_stress == "auto" else bool(compute_stress)
        )
        if self.loss_fn.needs_stress and not self.compute_stress:
            raise ValueError("the loss has stress terms but compute_stress is false")
        if self.loss_fn.needs_forces and not compute_forces:
            raise ValueError("the loss has force terms but compute_forces is false")
        if backend not in BACKENDS:
            raise SettingsError(
                f"model.backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
            )
        if backend != "full" and self.student_cfg["freeze"] == "all":
            what = "the lean path needs" if backend == "lean" else "cached features need"
            raise SettingsError(
                f"model.backend={backend}: {what} a frozen backbone, but student.freeze=all "
                "trains it: use model.backend=full with freeze=all"
            )
        self.backend = backend
        self.max_feature_bytes = max_feature_bytes
        self.allow_memory_overcommit = bool(allow_memory_overcommit)
        self._memory_checked = False
        self.metrics = torch.nn.ModuleDict(
            {
                f"{split}_{t}_{q}": MeanMetric()
                for split in SPLITS
                for t in TARGETS
                for q in QUANTITIES
            }
        )
        self.loss_metrics = torch.nn.ModuleDict({f"{s}_loss": MeanMetric() for s in SPLITS})
        # one row per (split, epoch); epoch 0 = before training (a validate() call before fit)
        self.epoch_metrics: list[dict[str, Any]] = []

    def check_memory(self, datamodule: Any) -> None:
        """The full backend's memory estimate of the largest batch against the available
        memory (:mod:`kd_nnp.training.memory_check`), once per module: warns, or raises
        KdNnpError unless ``allow_memory_overcommit``; recorded in ``datamodule.summary``."""
        if not self._memory_checked:
            from kd_nnp.training import memory_check

            memory_check.check_full_backend_memory(datamodule, self)
            self._memory_checked = True

    def setup(self, stage: str) -> None:
        """Lightning's hook (the datamodule is set up first): :meth:`check_memory` at the
        latest here, before the first step."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            self.check_memory(datamodule)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Batch) -> Prediction:
        """Energies (B,) eV/atom, forces (Natoms,3) eV/A and stress (B,6) GPa of ``batch``."""
        fw, st = self.compute_forces, self.compute_stress
        cached = batch.features is not None and self.backend in ("cached", "auto")
        if cached:
            norm = self.student.readout_norm
            out = predict_from_features(
                self.student.mlp, norm, batch.features, forces=fw, stress=st
            )
        elif self.backend in ("lean", "auto"):  # auto: frames whose Jacobian is too big
            out = predict_lean(self.student, batch.graphs, forces=fw, stress=st)
        else:
            out = predict_full(self.student, batch.graphs, forces=fw, stress=st)
        forces = stress = None
        if fw:
            forces = torch.cat(list(out["f"]), dim=0)
            if "f_mask" in out:  # cached force subsets: no label may ask for an absent row
                have = torch.cat(list(out["f_mask"]), dim=0)
                for t in TARGETS:
                    if bool((batch.targets(t).forces_mask & ~have).any()):
                        raise RuntimeError(
                            f"{t} force labels on atoms whose cached forces were not built "
                            "(feature cache and data.force_atoms disagree)"
                        )
        if st:
            full = torch.stack(list(out["s"]), dim=0)
            if not cached:
                full = self._molecular_correction(full, out, batch)
            stress = full_to_voigt(full)
        return Prediction(energy=out["e"].reshape(-1), forces=forces, stress=stress)

    @staticmethod
    def _molecular_correction(stress: Tensor, out: dict[str, Any], batch: Batch) -> Tensor:
        """Full and lean backends, ``data.stress_mode=molecular``: chgnet's affine stress plus
        ``sym(offsets^T F) / V`` (the cached backend differentiates along the molecule-rigid
        strains directly; both equal the same derivative)."""
        if batch.mol_offsets is None:
            return stress
        if "f" not in out:
            raise ValueError("molecular stress on the full/lean backend needs model.compute_forces")
        sizes = batch.n_atoms.tolist()
        offsets = torch.split(batch.mol_offsets.to(stress.device), sizes)
        rows = []
        for s, o, f, v in zip(stress, offsets, out["f"], batch.volumes, strict=True):
            extra = o.T @ f / v * EV_PER_A3_TO_GPA
            rows.append(s + 0.5 * (extra + extra.T))
        return torch.stack(rows, dim=0)

    def transfer_batch_to_device(
        self, batch: Batch, device: torch.device, dataloader_idx: int
    ) -> Batch:
        return batch.to(device)

    # ------------------------------------------------------------------ steps
    def _step(self, batch: Batch, split: str) -> Tensor:
        with torch.enable_grad():
            result = self.loss_fn(self(batch), batch)
        # the loss's own masked MAEs, weighted by their component counts: the epoch value is
        # the MAE over every labelled component of the epoch
        for key, mae in result.maes.items():
            self.metrics[f"{split}_{key.removeprefix('mae_')}"].update(
                mae, weight=result.counts[key]
            )
        self.loss_metrics[f"{split}_loss"].update(result.total.detach(), weight=len(batch))
        return result.total

    def anchor_penalty(self) -> Tensor:
        """``mean((w - w0)^2)`` over every trainable parameter element (see ``anchor``)."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        total = sum(
            ((p - getattr(self, n)) ** 2).sum()
            for p, n in zip(params, self._anchor_names, strict=True)
        )
        return total / sum(p.numel() for p in params)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        if self.anchor > 0:
            penalty = self.anchor_penalty()
            self.log("train/anchor", penalty.detach(), on_step=False, on_epoch=True)
            loss = loss + self.anchor * penalty
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def _epoch_index(self) -> int:
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        return self.current_epoch + 1 if fitting else 0

    def _log_epoch(self, split: str) -> None:
        if self._trainer is not None and self.trainer.sanity_checking:
            for m in (*self.metrics.values(), *self.loss_metrics.values()):
                m.reset()
            return
        row: dict[str, Any] = {"split": split, "epoch": self._epoch_index()}
        names = [f"{split}_{t}_{q}" for t in TARGETS for q in QUANTITIES]
        lm = self.loss_metrics[f"{split}_loss"]
        # weights summed over data-parallel ranks: every rank must take the same branches
        # below (compute() syncs), also a rank whose frames lack a label (or have no frames)
        weights = torch.stack([self.metrics[n].weight for n in names] + [lm.weight]).detach()
        if self._trainer is not None:
            weights = self.trainer.strategy.reduce(weights, reduce_op="sum")
        seen = dict(zip([*names, "loss"], (float(w) > 0 for w in weights), strict=True))
        # the epoch loss is the loss formula applied to the epoch MAEs (sum of ratio x MAE over
        # every labelled component of the epoch), not the frame-weighted mean of batch losses:
        # that one depended on the batch size and on how labels fell into batches (a batch
        # without hard labels scored 0 on the hard terms), so val/loss changed with batching
        loss = None
        for t in TARGETS:
            for q in QUANTITIES:
                m = self.metrics[f"{split}_{t}_{q}"]
                if seen[f"{split}_{t}_{q}"]:
                    value = m.compute()
                    self.log(f"{split}/mae_{t}_{q}", value, on_epoch=True, sync_dist=True)
                    row[f"mae_{t}_{q}"] = float(value)
                    r = self.loss_fn.ratio(t, q)
                    if r > 0:
                        loss = r * value if loss is None else loss + r * value
                m.reset()
        if seen["loss"]:
            value = loss if loss is not None else lm.compute() * 0.0
            self.log(f"{split}/loss", value, on_epoch=True, prog_bar=True, sync_dist=True)
            row["loss"] = float(value)
        lm.reset()
        self.epoch_metrics.append(row)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    # ------------------------------------------------------------------ optim
    def configure_optimizers(self) -> Any:
        params = [p for p in self.student.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: check student.freeze")
        opt = self.optimizer(params)
        if self.scheduler is None:
            return opt
        sched = self.scheduler(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["chgnet_model_args"] = self.student.model_args
        checkpoint["kd_nnp_student_cfg"] = self.student_cfg
