"""DistillationLoss: hand-computed values, masks, configuration errors, gradients."""

from __future__ import annotations

import pytest
import torch

from kd_nnp.training.batch import Batch, Prediction, Targets
from kd_nnp.training.loss import DistillationLoss, LossConfigError, masked_mae


def _targets(**labels) -> Targets:
    # 2 frames: frame 0 has 2 atoms, frame 1 has 1 atom; unlisted labels are masked out
    empty = Targets.empty(2, 3)
    return Targets(**{f: labels.get(f, getattr(empty, f)) for f in empty.__dataclass_fields__})


def _batch(hard=None, soft=None) -> Batch:
    hard = hard or dict(
        energy=torch.tensor([1.0, 2.0]),
        energy_mask=torch.tensor([True, False]),
        forces=torch.zeros(3, 3),
        forces_mask=torch.tensor([True, True, False]),
    )
    soft = soft or dict(
        energy=torch.tensor([0.5, 3.0]),
        energy_mask=torch.tensor([True, True]),
        forces=torch.ones(3, 3),
        forces_mask=torch.tensor([True, True, True]),
    )
    return Batch(
        frame_ids=["a", "b"],
        n_atoms=torch.tensor([2, 1]),
        hard=_targets(**hard),
        soft=_targets(**soft),
    )


def _pred(**kw) -> Prediction:
    return Prediction(energy=torch.tensor([1.5, 2.5]), forces=torch.full((3, 3), 0.5), **kw)


def test_hand_computed_value():
    loss = DistillationLoss(r_he=2.0, r_hf=3.0, r_se=5.0, r_sf=7.0)
    out = loss(_pred(), _batch())
    value, terms = out.total, out.maes
    # hard E: only frame 0: |1.5-1| = 0.5 ; hard F: atoms 0,1 (6 comps) of |0.5-0| = 0.5
    # soft E: (|1.5-0.5| + |2.5-3|)/2 = 0.75 ; soft F: 9 comps of |0.5-1| = 0.5
    assert terms["mae_hard_energy"].item() == pytest.approx(0.5)
    assert terms["mae_hard_forces"].item() == pytest.approx(0.5)
    assert terms["mae_soft_energy"].item() == pytest.approx(0.75)
    assert terms["mae_soft_forces"].item() == pytest.approx(0.5)
    assert value.item() == pytest.approx(2 * 0.5 + 3 * 0.5 + 5 * 0.75 + 7 * 0.5)
    # the counts the module weights the epoch MAEs with; no stress was predicted
    assert out.counts == {
        "mae_hard_energy": 1,
        "mae_hard_forces": 6,
        "mae_soft_energy": 2,
        "mae_soft_forces": 9,
    }


def test_ratios_are_not_normalised():
    a = DistillationLoss(1, 1, 1, 1)(_pred(), _batch()).total
    b = DistillationLoss(10, 10, 10, 10)(_pred(), _batch()).total
    assert b.item() == pytest.approx(10 * a.item())


def test_masked_terms_do_not_count():
    batch = _batch(hard=dict(energy=torch.tensor([1.0, 2.0])))  # every hard label masked
    out = DistillationLoss(r_he=1.0, r_hf=0, r_se=0, r_sf=0)(_pred(), batch)
    value, terms = out.total, out.maes
    assert value.item() == 0.0 and "mae_hard_energy" not in terms
    mae, n = masked_mae(
        torch.tensor([1.0, 5.0]), torch.tensor([0.0, 0.0]), torch.tensor([True, False])
    )
    assert (mae.item(), n) == (1.0, 1)


def test_stress_terms():
    pred = _pred(stress=torch.tensor([[1.0] * 6, [2.0] * 6]))
    batch = _batch(soft=dict(stress=torch.zeros(2, 6), stress_mask=torch.tensor([False, True])))
    out = DistillationLoss(r_he=0, r_hf=0, r_se=0, r_sf=0, r_ss=4.0)(pred, batch)
    value, terms = out.total, out.maes
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
    empty = Targets.empty(5, 5)
    soft = Targets(**{**empty.__dict__, "energy": target,
                      "energy_mask": torch.tensor([1, 1, 0, 1, 1]).bool()})  # fmt: skip
    batch = Batch(frame_ids=list("abcde"), n_atoms=torch.ones(5, dtype=torch.long),
                  hard=empty, soft=soft)  # fmt: skip
    loss = DistillationLoss(r_he=0, r_hf=0, r_se=2.0, r_sf=0)

    def f():
        return loss(Prediction(energy=lin(x).squeeze(-1)), batch).total

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
