"""Training callbacks: hard/soft MAE history, the paper's crossover, Fig. 6-style curves.

The module appends one row per (split, epoch) to ``pl_module.epoch_metrics`` when it logs
epoch MAEs (epoch 0 = before training, from an optional ``trainer.validate`` call; epoch k =
after k training epochs). :class:`LossCrossover` turns that history into ``crossover.json``,
``loss_history.csv`` and ``loss_curves.png`` in the run folder.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

CURVE_KEYS = ("mae_hard_energy", "mae_soft_energy", "mae_hard_forces", "mae_soft_forces")


def find_crossover(history: list[dict[str, Any]]) -> int | None:
    """First epoch >= 1 where MAE_H,E > MAE_S,E (rows: {'epoch', 'mae_hard_energy', ...}).

    Only counts as a crossover if hard was not already above soft at the earliest recorded
    epoch (otherwise the curves never crossed: hard was worse from the start).
    """
    rows = sorted(
        (r for r in history if "mae_hard_energy" in r and "mae_soft_energy" in r),
        key=lambda r: r["epoch"],
    )
    if not rows:
        return None
    first = rows[0]
    if first["mae_hard_energy"] > first["mae_soft_energy"]:
        return None
    for r in rows:
        if r["epoch"] >= 1 and r["mae_hard_energy"] > r["mae_soft_energy"]:
            return int(r["epoch"])
    return None


def plot_loss_curves(
    histories: dict[str, list[dict[str, Any]]],
    path: Path,
    crossovers: dict[str, int | None] | None = None,
    title: str = "",
) -> Path:
    """Two panels (energy, forces): MAE of hard and soft targets vs epoch, like Fig. 6."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"hard": "tab:blue", "soft": "tab:orange"}
    styles = {"val": "-", "train": "--"}
    for split, hist in histories.items():
        rows = sorted(hist, key=lambda r: r["epoch"])
        for ax, qty, unit in ((axes[0], "energy", "eV/atom"), (axes[1], "forces", "eV/Å")):
            for tgt in ("hard", "soft"):
                key = f"mae_{tgt}_{qty}"
                pts = [(r["epoch"], r[key]) for r in rows if key in r]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(
                        xs,
                        ys,
                        styles.get(split, "-"),
                        color=colors[tgt],
                        marker="o",
                        ms=3,
                        label=f"MAE {tgt[0].upper()},{qty[0].upper()} ({split})",
                    )
            ax.set_xlabel("epoch (0 = pretrained)")
            ax.set_ylabel(f"MAE ({unit})")
            ax.set_yscale("log")
    for split, ep in (crossovers or {}).items():
        if ep is not None:
            axes[0].axvline(ep, color="grey", ls=styles.get(split, "-"), lw=1)
            axes[0].annotate(
                f"crossover ({split}) @ {ep}",
                (ep, axes[0].get_ylim()[1]),
                fontsize=8,
                va="top",
                rotation=90,
            )
    axes[0].set_title("energy")
    axes[1].set_title("forces")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:  # e.g. no force terms in an energy-only run
            ax.text(0.5, 0.5, "not trained / no labels", ha="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class LossCrossover(L.Callback):
    """Record MAE_H,E / MAE_S,E (and forces) per epoch, find the crossover, draw the curves."""

    def __init__(self, output_dir: str | None = None, plot: bool = True) -> None:
        self.output_dir = Path(output_dir) if output_dir else None
        self.plot = plot
        self.result: dict[str, Any] = {}

    def _dir(self, trainer: L.Trainer) -> Path:
        return self.output_dir or Path(trainer.default_root_dir)

    def histories(self, pl_module: L.LightningModule) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for row in getattr(pl_module, "epoch_metrics", []):
            out.setdefault(row["split"], []).append(row)
        return out

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        hists = self.histories(pl_module)
        cross = {split: find_crossover(h) for split, h in hists.items()}
        out = self._dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        self.result = {"crossover_epoch": cross}
        (out / "crossover.json").write_text(json.dumps(self.result, indent=2))
        keys = sorted({k for h in hists.values() for r in h for k in r})
        with open(out / "loss_history.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            for h in hists.values():
                for r in sorted(h, key=lambda r: r["epoch"]):
                    w.writerow(r)
        if self.plot and any(hists.values()):
            ratios = getattr(pl_module, "loss_fn", None)
            title = ", ".join(f"{k}={v:g}" for k, v in ratios.ratios.items()) if ratios else ""
            plot_loss_curves(hists, out / "loss_curves.png", cross, title)
        for split, ep in cross.items():
            for lg in trainer.loggers:
                lg.log_metrics({f"{split}/crossover_epoch": -1 if ep is None else ep})
        return self.result

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, pl_module)
        log.info("crossover epochs: %s", self.result.get("crossover_epoch"))
