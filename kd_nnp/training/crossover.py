"""The paper's hard/soft crossover of the energy MAE curves (no Lightning: reports use it too).

A history is a list of rows ``{'split', 'epoch', 'mae_hard_energy', 'mae_soft_energy', ...}``
(epoch 0 = the pretrained model, epoch k = after k training epochs), as
:class:`kd_nnp.training.module.DistillationModule` records them and ``metrics.json: history``
stores them.

Tolerance: MAE_H,E counts as above MAE_S,E only when it exceeds it by more than
``max(atol, rtol * MAE_S,E)``; differences inside that band are noise (an 8e-8 eV/atom
"crossover" of two equal curves is none). The defaults, 1 % relative and 1e-5 eV/atom absolute,
are the ``callbacks.loss_crossover.rtol`` / ``atol`` settings of ``kd-nnp train``.
"""

from __future__ import annotations

from typing import Any

RTOL = 0.01
ATOL = 1e-5  # eV/atom


def hard_above_soft(hard: float, soft: float, rtol: float = RTOL, atol: float = ATOL) -> bool:
    """Whether MAE_H,E exceeds MAE_S,E by more than the tolerance ``max(atol, rtol * soft)``."""
    return hard - soft > max(atol, rtol * abs(soft))


def find_crossover(
    history: list[dict[str, Any]], rtol: float = RTOL, atol: float = ATOL
) -> int | None:
    """First epoch >= 1 where MAE_H,E > MAE_S,E beyond the tolerance (rows of one split).

    Only counts as a crossover if hard was not already above soft at the earliest recorded
    epoch (otherwise the curves never crossed: hard was worse from the start).
    """
    if rtol < 0 or atol < 0:
        raise ValueError(f"crossover tolerances must be >= 0, got rtol={rtol}, atol={atol}")
    rows = sorted(
        (r for r in history if "mae_hard_energy" in r and "mae_soft_energy" in r),
        key=lambda r: r["epoch"],
    )
    if not rows:
        return None
    first = rows[0]
    if hard_above_soft(first["mae_hard_energy"], first["mae_soft_energy"], rtol, atol):
        return None
    for r in rows:
        if r["epoch"] >= 1 and hard_above_soft(
            r["mae_hard_energy"], r["mae_soft_energy"], rtol, atol
        ):
            return int(r["epoch"])
    return None


def split_histories(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by their ``split`` (rows without one count as ``val``), sorted by epoch."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row.get("split", "val"), []).append(row)
    return {k: sorted(v, key=lambda r: r["epoch"]) for k, v in out.items()}


def crossover_epochs(
    rows: list[dict[str, Any]], rtol: float = RTOL, atol: float = ATOL
) -> dict[str, int | None]:
    """``{split: crossover epoch or None}`` of a whole history."""
    return {s: find_crossover(h, rtol, atol) for s, h in split_histories(rows).items()}
