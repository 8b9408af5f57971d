"""The distillation loss of Taniguchi (Faraday Discuss. 2025), with masks and stress terms.

    L = rHE*MAE(E_hard) + rHF*MAE(F_hard) + rSE*MAE(E_soft) + rSF*MAE(F_soft)
        [+ rHS*MAE(S_hard) + rSS*MAE(S_soft)]                    (stress terms: an extension)
        [+ rRE*MAE(E_replay) + rRF*MAE(F_replay) + rRS*MAE(S_replay)]   (replay frames)

- energies per atom (eV/atom), forces per Cartesian component (eV/A), stress per Voigt
  component (GPa);
- the ratios are used as given, NOT normalised to sum to one (as in the paper: the absolute
  size of the ratios acts as a learning-rate multiplier);
- each term is a masked mean: frames without that label contribute nothing and are not
  counted in the denominator; a term with no labelled element in a batch contributes 0;
- replay terms: pretrained CHGNet's own labels on the replay frames (``data.replay_store``,
  inorganic crystals), so that the student keeps what CHGNet knew outside organic crystals
  (docs/evaluation.md, "Replay frames"); only replay frames carry them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kd_nnp.errors import KdNnpError
from kd_nnp.training.batch import Batch, Prediction

RATIO_NAMES = {
    ("hard", "energy"): "r_he",
    ("hard", "forces"): "r_hf",
    ("hard", "stress"): "r_hs",
    ("soft", "energy"): "r_se",
    ("soft", "forces"): "r_sf",
    ("soft", "stress"): "r_ss",
    ("replay", "energy"): "r_re",
    ("replay", "forces"): "r_rf",
    ("replay", "stress"): "r_rs",
}
RATIOS = ("r_he", "r_hf", "r_se", "r_sf", "r_hs", "r_ss", "r_re", "r_rf", "r_rs")
REPLAY_RATIOS = ("r_re", "r_rf", "r_rs")
# how tables and figure titles print them (the paper's rHE, rHF, ...)
RATIO_LABELS = {r: "r" + r[2:].upper() for r in RATIOS}


class LossConfigError(KdNnpError, ValueError):
    """The loss ratios are inconsistent with themselves or with the data."""


@dataclass(frozen=True)
class LossResult:
    """The loss and its terms: ``maes[f"mae_{target}_{quantity}"]`` (detached, unweighted)
    with ``counts`` (number of scalar components averaged) for every term that had a labelled
    component in the batch. The module logs these (count-weighted over an epoch), so the
    logged MAE is exactly the loss's MAE."""

    total: Tensor
    maes: dict[str, Tensor]
    counts: dict[str, int]


def masked_mae(pred: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, int]:
    """Mean |pred-target| over rows where ``mask`` is True (all trailing components count).

    Returns (mae, number of scalar elements averaged). With no element, mae is 0 (a tensor
    connected to ``pred`` so autograd stays happy) and the count is 0.
    """
    mask = mask.to(torch.bool)
    if mask.numel() == 0 or not bool(mask.any()):
        return pred.sum() * 0.0, 0
    diff = (pred[mask] - target[mask]).abs()
    return diff.mean(), diff.numel()


def check_replay_settings(ratios: Mapping[str, float], replay_store: str | None) -> None:
    """Refuse (:class:`LossConfigError`) a replay ratio > 0 without ``data.replay_store`` and
    a replay store whose ratios are all 0 (its frames would be read, cached and batched for
    nothing). Cheap: run before the data is read."""
    on = {r: float(ratios.get(r, 0.0)) for r in REPLAY_RATIOS if float(ratios.get(r, 0.0)) > 0}
    if on and not replay_store:
        raise LossConfigError(
            f"{', '.join(f'loss.{k}={v:g}' for k, v in on.items())} but data.replay_store is "
            "not set: give the replay store (kd-nnp data inorganic, labelled with "
            "teacher=chgnet) or set the replay ratios to 0"
        )
    if replay_store and not on:
        raise LossConfigError(
            f"data.replay_store={replay_store} but loss.r_re, loss.r_rf and loss.r_rs are all "
            "0: its frames would train nothing; set a replay ratio > 0 (e.g. loss.r_re=1) or "
            "data.replay_store=null"
        )


class DistillationLoss(nn.Module):
    """Weighted sum of masked MAEs of hard, soft and replay energy/forces/stress."""

    def __init__(
        self,
        r_he: float = 0.0,
        r_hf: float = 0.0,
        r_se: float = 1.0,
        r_sf: float = 1.0,
        r_hs: float = 0.0,
        r_ss: float = 0.0,
        r_re: float = 0.0,
        r_rf: float = 0.0,
        r_rs: float = 0.0,
    ) -> None:
        super().__init__()
        self.ratios = {
            "r_he": float(r_he),
            "r_hf": float(r_hf),
            "r_se": float(r_se),
            "r_sf": float(r_sf),
            "r_hs": float(r_hs),
            "r_ss": float(r_ss),
            "r_re": float(r_re),
            "r_rf": float(r_rf),
            "r_rs": float(r_rs),
        }
        bad = {k: v for k, v in self.ratios.items() if v < 0 or v != v}
        if bad:
            raise LossConfigError(f"loss ratios must be >= 0, got {bad}")
        if all(v == 0 for v in self.ratios.values()):
            raise LossConfigError("all loss ratios are zero: nothing to train on")

    def ratio(self, target: str, quantity: str) -> float:
        return self.ratios[RATIO_NAMES[(target, quantity)]]

    @property
    def needs_forces(self) -> bool:
        return any(self.ratio(t, "forces") > 0 for t in ("hard", "soft", "replay"))

    @property
    def needs_stress(self) -> bool:
        return any(self.ratio(t, "stress") > 0 for t in ("hard", "soft", "replay"))

    def check_available(self, available: Mapping[tuple[str, str], int]) -> None:
        """Refuse a non-zero ratio whose target the data lacks entirely.

        ``available[(target, quantity)]`` is the number of training frames carrying it.
        """
        missing = [
            f"{RATIO_NAMES[key]}={self.ratio(*key)} but no training frame has {key[0]} {key[1]}"
            + (" (set data.replay_store)" if key[0] == "replay" else "")
            for key in RATIO_NAMES
            if self.ratio(*key) > 0 and available.get(key, 0) == 0
        ]
        if missing:
            raise LossConfigError("loss configuration does not fit the data: " + "; ".join(missing))

    def forward(self, pred: Prediction, batch: Batch) -> LossResult:
        """The weighted loss and the masked MAE of every labelled (target, quantity).

        ``pred`` carries energies (B,) eV/atom, forces (Natoms, 3) and stress (B, 6) GPa (the
        last two None when not predicted); the labels and masks come from ``batch.hard``,
        ``batch.soft`` and ``batch.replay``. A non-zero ratio whose quantity was not predicted is an error.
        """
        total = pred.energy.sum() * 0.0
        maes: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        for (target, quantity), rname in RATIO_NAMES.items():
            r = self.ratios[rname]
            predicted = pred.get(quantity)
            if predicted is None:
                if r > 0:
                    raise LossConfigError(f"{rname}={r} but the prediction lacks {quantity}")
                continue
            values, mask = batch.targets(target).label(quantity)
            mae, count = masked_mae(predicted, values, mask)
            if count:
                maes[f"mae_{target}_{quantity}"] = mae.detach()
                counts[f"mae_{target}_{quantity}"] = count
            if r > 0:
                total = total + r * mae
        return LossResult(total=total, maes=maes, counts=counts)
