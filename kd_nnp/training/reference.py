"""Per-element energy reference alignment of soft (teacher) energies.

Teachers put the energy zero elsewhere: SO3LR gives about -5950 eV for one naphthalene cell
where CHGNet gives about -233 eV. The difference is, to a very good approximation, a sum of
per-element constants (isolated-atom references differ between methods), so before training
the soft energies are shifted by a per-element linear correction fitted by least squares::

    E_soft_aligned = E_soft + sum_el n_el * delta_el,
    delta = argmin || (E_target - E_soft) - N delta ||^2      (N: frames x elements counts)

``E_target`` is chosen by ``method``:

- ``none``: no alignment (only sensible when the teacher shares the student's zero);
- ``hard``: the hard (DFT) energies of the same training frames;
- ``student``: the pretrained student's own predictions on the training frames (works for
  teacher-only data; the per-element offsets then absorb only the zero, the fit leaves the
  teacher's energy *differences* between structures untouched);

Only composition enters the correction, so energy differences between frames of the same
composition (strain, rattle: what shapes the relaxed volume) are exactly the teacher's.
Compositions that are linearly dependent (e.g. all frames of one molecule) make N rank
deficient; the minimum-norm solution is used, which is exact on the span of the data. A frame
whose composition lies outside that span (e.g. a validation crystal whose stoichiometry is no
combination of the training ones) has an undetermined correction: :meth:`identifiable` tells,
and the data module masks such soft energies out of losses and metrics (and counts them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

METHODS = ("none", "hard", "student")


@dataclass
class ElementReference:
    """A fitted per-element shift (eV per atom of each element)."""

    method: str
    shifts: dict[int, float] = field(default_factory=dict)  # atomic number -> eV
    n_frames: int = 0
    rmse_before: float | None = None  # eV/atom, of (target - source) before the shift
    rmse_after: float | None = None  # eV/atom, after
    # orthonormal basis of the fitted compositions' span (rows over sorted(shifts)); a frame
    # whose composition lies outside it gets an arbitrary (minimum-norm) correction
    span: list[list[float]] = field(default_factory=list)

    def identifiable(self, numbers: Sequence[int] | np.ndarray, tol: float = 1e-6) -> bool:
        """True if the correction of this composition is determined by the fitted data."""
        if self.method == "none":
            return True
        elements = sorted(self.shifts)
        if {int(z) for z in numbers} - set(elements):
            return False
        c = composition_matrix([numbers], elements)[0]
        basis = np.asarray(self.span, dtype=float).reshape(-1, len(elements))
        resid = c - basis.T @ (basis @ c)
        return bool(np.linalg.norm(resid) <= tol * max(1.0, np.linalg.norm(c)))

    def correction(self, numbers: Sequence[int] | np.ndarray) -> float:
        """Total energy to add to a frame with these atomic numbers (eV)."""
        if self.method == "none":
            return 0.0
        missing = sorted({int(z) for z in numbers} - set(self.shifts))
        if missing:
            raise ValueError(
                f"energy reference ({self.method}) was fitted without element(s) {missing}; "
                "include frames with these elements in the training set"
            )
        return float(sum(self.shifts[int(z)] for z in numbers))

    def apply(self, numbers: Sequence[int] | np.ndarray, energy: float) -> float:
        return energy + self.correction(numbers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shifts"] = {str(k): v for k, v in self.shifts.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ElementReference:
        d = dict(d)
        d["shifts"] = {int(k): float(v) for k, v in d.get("shifts", {}).items()}
        return cls(**d)


def composition_matrix(
    numbers_list: Sequence[Sequence[int]], elements: Sequence[int]
) -> np.ndarray:
    col = {z: j for j, z in enumerate(elements)}
    mat = np.zeros((len(numbers_list), len(elements)))
    for i, numbers in enumerate(numbers_list):
        for z in numbers:
            mat[i, col[int(z)]] += 1
    return mat


def fit_element_reference(
    numbers_list: Sequence[Sequence[int]],
    source_energies: Sequence[float],
    target_energies: Sequence[float] | None,
    method: str,
) -> ElementReference:
    """Fit per-element shifts mapping total ``source_energies`` onto ``target_energies``."""
    if method not in METHODS:
        raise ValueError(f"unknown energy reference method {method!r}; choose from {METHODS}")
    if method == "none":
        return ElementReference("none")
    if target_energies is None:
        raise ValueError(f"energy reference {method!r} needs target energies")
    src = np.asarray(source_energies, dtype=float)
    tgt = np.asarray(target_energies, dtype=float)
    if len(src) != len(tgt) or len(src) != len(numbers_list):
        raise ValueError("numbers, source and target energies must have the same length")
    if len(src) == 0:
        raise ValueError("cannot fit an energy reference on zero frames")
    elements = sorted({int(z) for nums in numbers_list for z in nums})
    mat = composition_matrix(numbers_list, elements)
    diff = tgt - src
    delta, *_ = np.linalg.lstsq(mat, diff, rcond=None)
    _, sing, vt = np.linalg.svd(mat, full_matrices=False)
    span = vt[sing > 1e-9 * sing.max()]
    n_atoms = mat.sum(axis=1)
    before = diff / n_atoms
    after = (diff - mat @ delta) / n_atoms
    return ElementReference(
        method=method,
        shifts={z: float(d) for z, d in zip(elements, delta)},
        n_frames=len(src),
        rmse_before=float(np.sqrt(np.mean(before**2))),
        rmse_after=float(np.sqrt(np.mean(after**2))),
        span=span.tolist(),
    )
