"""The student: pretrained CHGNet with a configurable freeze policy.

Policies (exact trainable sets are asserted in tests/test_student.py):

- ``mlp`` (default, the paper): only ``model.mlp`` trains. AtomRef (``composition_model``)
  and ``readout_norm`` stay frozen. (chgnet's own fine-tuning notebook freezes a list of
  modules that leaves e.g. ``readout_norm``/``site_wise``/basis layers trainable; kd_nnp does
  not rely on such lists and instead freezes everything, then unfreezes by prefix.)
- ``readout``: ``mlp`` plus the LayerNorm ``readout_norm`` in front of it.
- ``all``: every parameter except the AtomRef composition model, which chgnet itself keeps
  fixed as the per-element energy reference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from chgnet.model import CHGNet

from kd_nnp.teachers.calculators import load_chgnet

FREEZE_POLICIES: dict[str, tuple[str, ...] | None] = {
    "mlp": ("mlp.",),
    "readout": ("mlp.", "readout_norm."),
    "all": None,  # all but composition_model
}


def apply_freeze_policy(model: torch.nn.Module, policy: str) -> list[str]:
    """Freeze ``model`` according to ``policy``; return the trainable parameter names."""
    if policy not in FREEZE_POLICIES:
        raise ValueError(f"unknown freeze policy {policy!r}; choose from {sorted(FREEZE_POLICIES)}")
    prefixes = FREEZE_POLICIES[policy]
    for name, param in model.named_parameters():
        if prefixes is None:
            param.requires_grad_(not name.startswith("composition_model."))
        else:
            param.requires_grad_(name.startswith(prefixes))
    return trainable_parameter_names(model)


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def load_student(
    model_name: str = "0.3.0", freeze: str = "mlp", path: str | Path | None = None
) -> CHGNet:
    """CHGNet with the freeze policy applied. Frozen modules are also put in eval mode by
    :class:`~kd_nnp.training.module.DistillationModule` (CHGNet 0.3.0 has no dropout/BN
    in the backbone, but this keeps the contract explicit)."""
    model = load_chgnet(model_name, path)
    apply_freeze_policy(model, freeze)
    return model
