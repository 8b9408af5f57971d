"""Per-element energy reference alignment."""

from __future__ import annotations

import numpy as np
import pytest

from kd_nnp.training.reference import ElementReference, fit_element_reference


def test_recovers_per_element_offsets():
    rng = np.random.default_rng(1)
    true = {1: -13.6, 6: -1030.0, 8: -2040.0}
    numbers, target, source = [], [], []
    for _ in range(12):
        nums = rng.choice([1, 6, 8], size=rng.integers(6, 30)).tolist()
        e_target = rng.normal(-5.0, 0.3) * len(nums)
        numbers.append(nums)
        target.append(e_target)
        source.append(e_target + sum(true[z] for z in nums) + rng.normal(0, 1e-3))
    ref = fit_element_reference(numbers, source, target, "student")
    for z, v in true.items():
        assert ref.shifts[z] == pytest.approx(-v, abs=0.01)
    aligned = [ref.apply(n, e) for n, e in zip(numbers, source)]
    assert np.max(np.abs(np.array(aligned) - target)) < 0.05
    assert ref.rmse_before > 100 and ref.rmse_after < 1e-3


def test_keeps_energy_differences_of_same_composition():
    numbers = [[6, 1, 1], [6, 1, 1], [8, 8]]
    source = [-100.0, -99.0, -50.0]
    target = [-10.0, -10.5, -3.0]
    ref = fit_element_reference(numbers, source, target, "hard")
    a = [ref.apply(n, e) for n, e in zip(numbers, source)]
    assert a[1] - a[0] == pytest.approx(1.0)  # the teacher's difference, untouched


def test_none_and_errors():
    ref = fit_element_reference([[1]], [1.0], None, "none")
    assert ref.apply([1, 1], 5.0) == 5.0
    with pytest.raises(ValueError, match="unknown energy reference"):
        fit_element_reference([[1]], [1.0], [1.0], "magic")
    ref = fit_element_reference([[1, 6]], [1.0], [2.0], "hard")
    with pytest.raises(ValueError, match=r"without element\(s\) \[8\]"):
        ref.correction([8])
    round_trip = ElementReference.from_dict(ref.to_dict())
    assert round_trip.shifts == ref.shifts


def test_compositions_outside_the_fitted_span_are_flagged():
    # two stoichiometries of H, C, O (rank 2 < 3 elements): the split between elements is free
    numbers = [[6, 1, 1, 1, 1], [6, 1, 1, 1, 1], [6, 8, 8]]
    ref = fit_element_reference(numbers, [0.0, 1.0, 2.0], [5.0, 6.5, 7.0], "student")
    assert ref.identifiable([6, 1, 1, 1, 1]) and ref.identifiable([6, 6, 8, 8, 8, 8])
    assert not ref.identifiable([1, 1, 8])  # water: not a combination of CH4 and CO2
    assert not ref.identifiable([7, 1, 1, 1])  # an element never seen
