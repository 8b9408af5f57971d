"""The teacher bake-off (`kd-nnp evaluate teachers`): known-answer teachers, ranking recomputed
from the JSON lines, resume / report-only, missing teachers, lattice columns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from ase.calculators.calculator import all_changes
from test_eval_relax import ScaledCrystalCalc

from kd_nnp.errors import KdNnpError
from kd_nnp.evaluation.bakeoff import (
    RANKING_CSV,
    RANKING_MD,
    bakeoff_calculators,
    default_teachers,
    rank_methods,
    run_bakeoff,
)
from kd_nnp.evaluation.settings import BakeoffSettings, RelaxSettings
from kd_nnp.evaluation.stats import bootstrap_ci
from kd_nnp.utils.jsonl import read_jsonl

CODES = ("UREAXX02", "FORMAM")  # 16 and 24 atoms


class Scaled(ScaledCrystalCalc):
    """The known-answer model of test_eval_relax with its own volume factor."""

    def __init__(self, factor: float, fail_above: int | None = None) -> None:
        super().__init__(fail_above=fail_above)
        self.factor = factor

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        a = atoms if atoms is not None else self.atoms
        key = tuple(a.numbers)
        if key not in self.refs:
            self.refs[key] = (
                a.cell.array * self.factor ** (1 / 3),
                a.get_scaled_positions(wrap=False),
            )
        super().calculate(atoms, properties, system_changes)


def plus2() -> Scaled:
    return Scaled(1.02)


def minus4() -> Scaled:
    return Scaled(0.96)


def plus1_fails_big() -> Scaled:
    """The best on what it relaxes (+1 %), but it fails on FORMAM (24 atoms)."""
    return Scaled(1.01, fail_above=20)


TEACHERS = ("test_bakeoff:plus2", "test_bakeoff:minus4", "test_bakeoff:plus1_fails_big")
FAST = RelaxSettings(fmax=0.01)


def _run(out, **kw):
    settings = BakeoffSettings(teachers=TEACHERS, chgnet=False, n_boot=500, **kw)
    return run_bakeoff(
        "pyxtal:test", out, settings, FAST, codes=list(CODES), workers=1, progress=False
    )


def test_bakeoff_known_answer_ranking_resume_and_lattice(tmp_path):
    out = tmp_path / "bake"
    table = _run(out).set_index("method")
    p2, m4, p1 = (f"teacher({t})" for t in TEACHERS)
    # known answers: +2 %, -4 % on both crystals; +1 % on urea only (FORMAM failed)
    assert table.loc[p2, "n"] == 2 and table.loc[p2, "failures"] == 0
    assert table.loc[p2, "vol_mean_pct"] == pytest.approx(2.0, abs=0.1)
    assert table.loc[m4, "vol_mean_pct"] == pytest.approx(-4.0, abs=0.1)
    assert table.loc[m4, "vol_mae_pct"] == pytest.approx(4.0, abs=0.1)
    assert table.loc[m4, "vol_median_pct"] == pytest.approx(-4.0, abs=0.1)
    assert table.loc[p1, "n"] == 1 and table.loc[p1, "failures"] == 1
    assert table.loc[p1, "failed_ids"] == "FORMAM"
    # ranked on the common set (urea only): +1 % beats +2 % beats -4 %
    assert (table["n_common"] == 1).all()
    assert list(table.index) == [p1, p2, m4]
    assert table["rank_volume"].tolist() == [1, 2, 3]
    # every number recomputed from the JSON lines
    recs = pd.DataFrame(read_jsonl(out / "relax.jsonl"))
    for method, g in recs.groupby("method"):
        ok = g[g["status"] == "ok"]
        v = ok["vol_err_pct"].astype(float)
        row = table.loc[method]
        assert row["vol_mae_pct"] == pytest.approx(v.abs().mean(), rel=1e-12)
        assert row["vol_mean_pct"] == pytest.approx(v.mean(), rel=1e-12)
        assert (row["vol_mae_ci_lo"], row["vol_mae_ci_hi"]) == pytest.approx(
            bootstrap_ci(v.to_numpy(), n_boot=500)
        )
        assert row["rmsd15_mean"] == pytest.approx(ok["rmsd15"].astype(float).mean())
        assert row["rmsd15_mean"] > 0.0
        assert row["s_per_step_median"] == pytest.approx((ok["wall_s"] / ok["steps"]).median())
        assert row["s_per_crystal"] == pytest.approx(ok["wall_s"].mean())
        urea = ok[ok["id"] == "UREAXX02"].iloc[0]
        assert row["s_per_step_common"] == pytest.approx(urea["wall_s"] / urea["steps"])
    speed = table["s_per_step_common"].rank(method="min").astype(int)
    assert table["rank_speed"].astype(int).tolist() == speed.tolist()
    csv = pd.read_csv(out / RANKING_CSV)
    assert csv["method"].tolist() == [p1, p2, m4]
    md = (out / RANKING_MD).read_text()
    assert "## Failures" in md and "FORMAM" in md and "signed mean" in md
    # resume: nothing is relaxed again; report-only ranks the same JSON lines the same way
    n_lines = len(read_jsonl(out / "relax.jsonl"))
    again = _run(out, lattice=True).set_index("method")
    assert len(read_jsonl(out / "relax.jsonl")) == n_lines  # lattice reused the relaxations
    pd.testing.assert_series_equal(again["vol_mae_pct"], table["vol_mae_pct"])
    # lattice columns: recomputed from lattice.jsonl; the reference is the first teacher
    assert again.loc[p2, "e_latt_n"] == 2 and again.loc[p1, "e_latt_n"] == 1
    lat = pd.DataFrame(read_jsonl(out / "lattice" / "lattice.jsonl"))
    lat = lat[lat["status"] == "ok"].pivot(index="id", columns="method", values="e_latt_kj_mol")
    for m in (p2, m4, p1):
        assert again.loc[m, "e_latt_mean"] == pytest.approx(lat[m].mean())
    diff = (lat[m4] - lat[p2]).dropna()
    assert len(diff) == 2 and abs(diff).max() > 1.0  # the two models differ
    assert again.loc[m4, "e_latt_mae"] == pytest.approx(diff.abs().mean())
    assert again.loc[m4, "e_latt_mean_diff"] == pytest.approx(diff.mean())
    assert again.loc[p2, "e_latt_mae"] == pytest.approx(0.0)
    assert f"against {p2}" in (out / RANKING_MD).read_text()


def test_rank_methods_on_a_frame():
    """Failures (any flag) leave the clean set; reference rows of test.db are not ranked."""
    rows = [
        # method, id, status, failure, vol_err_pct, rmsd15, wall_s, steps
        ("A", "x", "ok", "", 3.0, 0.2, 10.0, 10),
        ("A", "y", "ok", "", -1.0, 0.4, 30.0, 10),
        ("B", "x", "ok", "", 1.0, 0.1, 2.0, 10),
        ("B", "y", "ok", "molecule broken", 0.0, 0.9, 2.0, 10),
        ("DFTB-D3 (test.db)", "x", "ok", "", 0.1, np.nan, np.nan, np.nan),
    ]
    df = pd.DataFrame(
        rows, columns=["method", "id", "status", "failure", "vol_err_pct", "rmsd15", "wall_s",
                       "steps"]
    )  # fmt: skip
    df["reference"] = df["method"].str.contains("test.db")
    t = rank_methods(df, n_boot=200).set_index("method")
    assert list(t.index) == ["B", "A"]  # on the common crystal x: |1| < |3|
    assert t.loc["A", "vol_mae_pct"] == pytest.approx(2.0)
    assert t.loc["A", "vol_mean_pct"] == pytest.approx(1.0)
    assert t.loc["A", "rmsd15_mean"] == pytest.approx(0.3)
    assert t.loc["A", "s_per_step_median"] == pytest.approx(2.0)
    assert t.loc["A", "s_per_crystal"] == pytest.approx(20.0)
    assert t.loc["B", "failures"] == 1 and t.loc["B", "failed_ids"] == "y"
    assert t.loc["A", "vol_mae_common_pct"] == pytest.approx(3.0)
    assert t.loc["B", "rank_speed"] == 1 and t.loc["A", "rank_speed"] == 2
    assert t.loc["A", "rank_rmsd15"] == 2


def test_missing_teacher_names_the_extra(monkeypatch):
    from kd_nnp.teachers import calculators

    spec = calculators.TEACHERS["so3lr"]
    monkeypatch.setitem(
        calculators.TEACHERS,
        "so3lr",
        calculators.TeacherSpec(spec.factory, ("no-such-dist",), ("no_such_module_xyz",)),
    )
    with pytest.raises(KdNnpError, match=r"so3lr.*kd_nnp\[teachers\].*--skip-missing"):
        bakeoff_calculators(BakeoffSettings(teachers=("so3lr", "chgnet_d3")))
    calcs, missing = bakeoff_calculators(
        BakeoffSettings(teachers=("so3lr", "chgnet_d3"), skip_missing=True)
    )
    assert calcs == {"teacher(chgnet_d3)": "teacher:chgnet_d3", "CHGNet": "chgnet"}
    assert [n for n, _ in missing] == ["so3lr"] and "no-such-dist" in missing[0][1]
    assert "chgnet" not in default_teachers() and "so3lr" in default_teachers()


def test_cli_teachers_report_only_and_missing(tmp_path, capsys):
    from kd_nnp.cli import main

    out = tmp_path / "cli"
    base = ["evaluate", "teachers", "--dataset", "pyxtal:test", "--codes", "UREAXX02",
            "--fmax", "0.01", "--no-chgnet", "--out", str(out), "--quiet"]  # fmt: skip
    rc = main([*base, "--teachers", "test_bakeoff:plus2,test_bakeoff:minus4", "--n-boot", "200"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "# Teacher bake-off" in printed and "teacher(test_bakeoff:plus2)" in printed
    t = pd.read_csv(out / RANKING_CSV)
    assert t["method"].tolist() == ["teacher(test_bakeoff:plus2)", "teacher(test_bakeoff:minus4)"]
    # a teacher that cannot be imported: exit 1 naming it; listed with --skip-missing
    missing = "--teachers=test_bakeoff:plus2,no_such_module_xyz:factory"
    assert main([*base, missing, "--report-only"]) == 1
    assert "no_such_module_xyz" in capsys.readouterr().err
    assert main([*base, missing, "--skip-missing", "--report-only"]) == 0
    md = (out / RANKING_MD).read_text()
    assert "## Teachers left out" in md and "no_such_module_xyz" in md
    assert pd.read_csv(out / RANKING_CSV)["method"].tolist() == ["teacher(test_bakeoff:plus2)"]
