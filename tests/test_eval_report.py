"""Relaxation report figures: parity plots readable for many methods, failures visible."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from kd_nnp.evaluation.report import parity_plot  # noqa: E402


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for m in range(7):
        for c in range(6):
            v = 300.0 + 150 * c
            failed = c == 5 and m % 2 == 0
            pred = v * (2.4 if failed else 1.0 + rng.normal(0.05, 0.03))  # a blown-up cell
            rows.append(
                {
                    "method": f"method {m}",
                    "id": f"X{c}",
                    "status": "ok",
                    "volume_exp": v,
                    "volume_pred": pred,
                    "failure": "volume blown up" if failed else "",
                }
            )
    return pd.DataFrame(rows)


def test_parity_plot_grid_limits_and_failed_markers(tmp_path, monkeypatch):
    """D19: 7 panels in one 2856 x 420 strip, points clipped, failures drawn like the rest."""
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)  # keep the figure to inspect it
    df = _frame()
    path = tmp_path / "parity.png"
    parity_plot(df, "volume_exp", "volume_pred", "volume (A^3)", path)
    assert path.stat().st_size > 0
    fig = plt.gcf()
    w, h = fig.get_size_inches()
    assert w / h <= 2.0, (w, h)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.collections]
    assert len(panels) == 7
    ncols = len({round(ax.get_position().x0, 3) for ax in panels})
    assert ncols <= 4
    for ax in panels:
        method = ax.get_title().splitlines()[0]
        g = df[df["method"] == method]
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        pts = np.concatenate([c.get_offsets() for c in ax.collections])
        assert len(pts) == len(g)
        assert (pts[:, 0] > x0).all() and (pts[:, 0] < x1).all()
        assert (pts[:, 1] > y0).all() and (pts[:, 1] < y1).all()
        n_failed = int((g["failure"] != "").sum())
        labels = [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
        failed = [c for c in ax.collections if c.get_label().startswith("failed")]
        if n_failed:
            assert len(failed) == 1 and len(failed[0].get_offsets()) == n_failed
            assert any(t.startswith("failed") for t in labels)
            others = [c for c in ax.collections if c not in failed]
            va, vb = failed[0].get_paths()[0].vertices, others[0].get_paths()[0].vertices
            assert va.shape != vb.shape or not np.allclose(va, vb)  # another marker
        else:
            assert not failed
    plt.close(fig)
