"""``model.anchor``: L2-SP toward the pretrained (starting) weights of the trainable head."""

from __future__ import annotations

import functools

import pytest
import torch

from kd_nnp.errors import SettingsError
from kd_nnp.training.loss import DistillationLoss
from kd_nnp.training.module import DistillationModule


def _module(anchor: float) -> DistillationModule:
    return DistillationModule(
        loss=DistillationLoss(r_he=0, r_hf=0, r_se=1, r_sf=0),
        optimizer=functools.partial(torch.optim.Adam, lr=0.01),
        compute_forces=False,
        anchor=anchor,
    )


def _train(module: DistillationModule, batch, steps: int = 20) -> float:
    """``steps`` Adam steps on one batch; the mean squared move of the trainable weights."""
    torch.manual_seed(0)
    opt = module.configure_optimizers()
    start = [p.detach().clone() for p in module.student.parameters() if p.requires_grad]
    for _ in range(steps):
        opt.zero_grad()
        module.training_step(batch, 0).backward()
        opt.step()
    now = [p.detach() for p in module.student.parameters() if p.requires_grad]
    return float(
        sum(((a - b) ** 2).sum() for a, b in zip(now, start)) / sum(a.numel() for a in now)
    )


def test_anchor_holds_the_head_near_its_pretrained_weights(urea_store):
    from kd_nnp.training.data import FramesDataModule

    dm = FramesDataModule(str(urea_store), label_set="toy", n_val=2, grouped=False, batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    free, held = _module(0.0), _module(1e4)
    assert held.anchor_penalty().item() == 0.0  # starts at the pretrained weights
    # the training loss is the distillation loss plus anchor x penalty
    with torch.no_grad():
        for p in held.student.mlp.parameters():
            p.add_(0.01)
    expected = held.loss_fn(held(batch), batch).total + 1e4 * held.anchor_penalty()
    assert held.training_step(batch, 0).item() == pytest.approx(expected.item(), rel=1e-6)
    assert held.anchor_penalty().item() == pytest.approx(1e-4, rel=1e-4)  # every weight +0.01
    with torch.no_grad():
        for p in held.student.mlp.parameters():
            p.sub_(0.01)
    moved_free, moved_held = _train(free, batch), _train(held, batch)
    assert moved_free > 1e-6
    assert moved_held < 0.1 * moved_free, (moved_held, moved_free)
    # a resumed run (weights restored from a checkpoint) stays anchored to the pretrained head
    again = _module(1e4)
    again.load_state_dict(held.state_dict())
    assert again.anchor_penalty().item() == pytest.approx(held.anchor_penalty().item(), rel=1e-6)
    assert again.anchor_penalty().item() > 0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_anchor_is_refused(bad):
    with pytest.raises(SettingsError, match="model.anchor must be finite and >= 0"):
        _module(bad)
