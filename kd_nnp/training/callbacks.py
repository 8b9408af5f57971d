"""Training callbacks: hard/soft MAE history, the paper's crossover, Fig. 6-style curves.

The module appends one row per (split, epoch) to ``pl_module.epoch_metrics`` when it logs
epoch MAEs (epoch 0 = before training, from an optional ``trainer.validate`` call; epoch k =
after k training epochs). :class:`LossCrossover` turns that history into ``crossover.json``,
``loss_history.csv`` and ``loss_curves.png`` in the run folder (the crossover rule and its
tolerance: :mod:`kd_nnp.training.crossover`), and keeps the history in every checkpoint, so a
run resumed from ``last.ckpt`` after a kill still has the epochs before the kill.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L

from kd_nnp.training.crossover import ATOL, RTOL, crossover_epochs, split_histories
from kd_nnp.training.loss import RATIO_LABELS

log = logging.getLogger(__name__)


def loss_curves_figure(
    histories: dict[str, list[dict[str, Any]]],
    crossovers: dict[str, int | None] | None = None,
    title: str = "",
) -> Any:
    """Two panels (energy, forces): MAE of hard and soft targets vs epoch, like Fig. 6.

    Epoch ticks are integers; returns the matplotlib figure (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
    return fig


def plot_loss_curves(
    histories: dict[str, list[dict[str, Any]]],
    path: Path,
    crossovers: dict[str, int | None] | None = None,
    title: str = "",
) -> Path:
    """:func:`loss_curves_figure` saved to ``path``."""
    import matplotlib.pyplot as plt

    fig = loss_curves_figure(histories, crossovers, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curves_title(ratios: dict[str, float] | None, n_train: int | None = None) -> str:
    """A short figure title: the non-zero loss ratios (all six if none is) and N_train."""
    ratios = {k: float(v) for k, v in (ratios or {}).items()}
    shown = {k: v for k, v in ratios.items() if v} or ratios
    parts = [f"{RATIO_LABELS.get(k, k)}={v:g}" for k, v in shown.items()]
    if n_train is not None:
        parts.append(f"N_train={n_train}")
    return "  ".join(parts)


HISTORY_KEY = "kd_nnp_epoch_metrics"


class LossCrossover(L.Callback):
    """Record MAE_H,E / MAE_S,E (and forces) per epoch, find the crossover, draw the curves.

    Args:
        output_dir: where the files go (default: the trainer's ``default_root_dir``).
        plot: draw ``loss_curves.png``.
        rtol, atol: the crossover tolerance (see :mod:`kd_nnp.training.crossover`): MAE_H,E
            must exceed MAE_S,E by more than ``max(atol, rtol * MAE_S,E)`` (atol in eV/atom).
    """

    def __init__(
        self,
        output_dir: str | None = None,
        plot: bool = True,
        rtol: float = RTOL,
        atol: float = ATOL,
    ) -> None:
        if rtol < 0 or atol < 0:
            raise ValueError(f"crossover tolerances must be >= 0, got rtol={rtol}, atol={atol}")
        self.output_dir = Path(output_dir) if output_dir else None
        self.plot = plot
        self.rtol, self.atol = float(rtol), float(atol)
        self.result: dict[str, Any] = {}

    def _dir(self, trainer: L.Trainer) -> Path:
        return self.output_dir or Path(trainer.default_root_dir)

    def histories(self, pl_module: L.LightningModule) -> dict[str, list[dict[str, Any]]]:
        return split_histories(list(getattr(pl_module, "epoch_metrics", [])))

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        hists = self.histories(pl_module)
        rows = [r for h in hists.values() for r in h]
        cross = crossover_epochs(rows, self.rtol, self.atol)
        out = self._dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        self.result = {
            "crossover_epoch": cross,
            "tolerance": {"rtol": self.rtol, "atol_ev_per_atom": self.atol},
        }
        (out / "crossover.json").write_text(json.dumps(self.result, indent=2))
        keys = sorted({k for r in rows for k in r})
        with open(out / "loss_history.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow(r)
        if self.plot and rows:
            loss_fn = getattr(pl_module, "loss_fn", None)
            train = getattr(getattr(trainer, "datamodule", None), "train_samples", None)
            title = curves_title(
                getattr(loss_fn, "ratios", None), None if train is None else len(train)
            )
            plot_loss_curves(hists, out / "loss_curves.png", cross, title)
        for split, ep in cross.items():
            for lg in trainer.loggers:
                lg.log_metrics({f"{split}/crossover_epoch": -1 if ep is None else ep})
        return self.result

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:  # data-parallel: the files are rank 0's (same history)
            return
        self.write(trainer, pl_module)
        log.info("crossover epochs: %s", self.result.get("crossover_epoch"))

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[HISTORY_KEY] = [dict(r) for r in getattr(pl_module, "epoch_metrics", [])]

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Resume: the checkpoint's rows (epochs before the kill) come back into the module's
        history; rows the new process already has for the same (split, epoch) are replaced."""
        saved = checkpoint.get(HISTORY_KEY)
        if saved is None:
            log.warning("checkpoint has no epoch history: curves start at the resumed epoch")
            return
        merged = {(r["split"], r["epoch"]): r for r in getattr(pl_module, "epoch_metrics", [])}
        merged.update({(r["split"], r["epoch"]): dict(r) for r in saved})
        pl_module.epoch_metrics = sorted(merged.values(), key=lambda r: (r["epoch"], r["split"]))
