"""DistillationLoss: hand-computed values, masks, configuration errors, gradients."""

from __future__ import annotations

import pytest
import torch

from kd_nnp.training.loss import DistillationLoss, LossConfigError, masked_mae


def _batch():
    # 2 frames: frame 0 has 2 atoms, frame 1 has 1 atom
    return {
        "hard_energy": torch.tensor([1.0, 2.0]),
        "hard_energy_mask": torch.tensor([True, False]),
        "hard_forces": torch.zeros(3, 3),
        "hard_forces_mask": torch.tensor([True, True, False]),
        "soft_energy": torch.tensor([0.5, 3.0]),
        "soft_energy_mask": torch.tensor([True, True]),
        "soft_forces": torch.ones(3, 3),
        "soft_forces_mask": torch.tensor([True, True, True]),
    }


def _pred():
    return {"energy": torch.tensor([1.5, 2.5]), "forces": torch.full((3, 3), 0.5)}


def test_hand_computed_value():
    loss = DistillationLoss(r_he=2.0, r_hf=3.0, r_se=5.0, r_sf=7.0)
    value, terms = loss(_pred(), _batch())
    # hard E: only frame 0: |1.5-1| = 0.5 ; hard F: atoms 0,1 (6 comps) of |0.5-0| = 0.5
    # soft E: (|1.5-0.5| + |2.5-3|)/2 = 0.75 ; soft F: 9 comps of |0.5-1| = 0.5
    assert terms["mae_hard_energy"].item() == pytest.approx(0.5)
    assert terms["mae_hard_forces"].item() == pytest.approx(0.5)
    assert terms["mae_soft_energy"].item() == pytest.approx(0.75)
    assert terms["mae_soft_forces"].item() == pytest.approx(0.5)
    assert value.item() == pytest.approx(2 * 0.5 + 3 * 0.5 + 5 * 0.75 + 7 * 0.5)


def test_ratios_are_not_normalised():
    a, _ = DistillationLoss(1, 1, 1, 1)(_pred(), _batch())
    b, _ = DistillationLoss(10, 10, 10, 10)(_pred(), _batch())
    assert b.item() == pytest.approx(10 * a.item())


def test_masked_terms_do_not_count():
    batch = _batch()
    batch["hard_energy_mask"] = torch.tensor([False, False])
    value, terms = DistillationLoss(r_he=1.0, r_hf=0, r_se=0, r_sf=0)(_pred(), batch)
    assert value.item() == 0.0 and "mae_hard_energy" not in terms
    mae, n = masked_mae(
        torch.tensor([1.0, 5.0]), torch.tensor([0.0, 0.0]), torch.tensor([True, False])
    )
    assert (mae.item(), n) == (1.0, 1)


def test_stress_terms():
    pred = dict(_pred(), stress=torch.tensor([[1.0] * 6, [2.0] * 6]))
    batch = dict(
        _batch(),
        soft_stress=torch.zeros(2, 6),
        soft_stress_mask=torch.tensor([False, True]),
    )
    value, terms = DistillationLoss(r_he=0, r_hf=0, r_se=0, r_sf=0, r_ss=4.0)(pred, batch)
    assert terms["mae_soft_stress"].item() == pytest.approx(2.0)
    assert value.item() == pytest.approx(8.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r_he=0, r_hf=0, r_se=0, r_sf=0), "all loss ratios are zero"),
        (dict(r_he=-1.0), ">= 0"),
        (dict(r_sf=float("nan")), ">= 0"),
    ],
)
def test_bad_ratios(kwargs, match):
    with pytest.raises(LossConfigError, match=match):
        DistillationLoss(**kwargs)


def test_ratio_for_missing_target_is_refused():
    loss = DistillationLoss(r_he=0.1, r_hf=0, r_se=1, r_sf=1)
    avail = {("soft", "energy"): 10, ("soft", "forces"): 10, ("hard", "energy"): 0}
    with pytest.raises(LossConfigError, match="r_he=0.1 but no training frame has hard energy"):
        loss.check_available(avail)
    DistillationLoss(r_he=0, r_hf=0, r_se=1, r_sf=1).check_available(avail)


def test_gradient_matches_finite_difference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 1).double()
    x = torch.randn(5, 4, dtype=torch.double)
    target = torch.randn(5, dtype=torch.double)
    batch = {"soft_energy": target, "soft_energy_mask": torch.tensor([1, 1, 0, 1, 1]).bool()}
    loss = DistillationLoss(r_he=0, r_hf=0, r_se=2.0, r_sf=0)

    def f():
        return loss({"energy": lin(x).squeeze(-1)}, batch)[0]

    f().backward()
    g = lin.weight.grad.clone()
    eps = 1e-6
    for j in range(4):
        with torch.no_grad():
            lin.weight[0, j] += eps
            up = f().item()
            lin.weight[0, j] -= 2 * eps
            down = f().item()
            lin.weight[0, j] += eps
        assert g[0, j].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)
