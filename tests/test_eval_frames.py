"""`kd-nnp evaluate frames`: errors against a store's labels on every atom (kd_nnp.evaluation.frames).

The store's labels are pretrained CHGNet's own results plus known perturbations, so every
column of the summary has an exact expected value."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from kd_nnp.training.stress import EV_PER_A3_TO_GPA, molecular_stress, molecule_offsets

CODES = ("UREAXX02", "FORMAM")
E_STEP = 0.004  # eV/atom added to frame k's label energy: k * E_STEP
DF = 0.3  # eV/A added to atom 0's x force of every label
DS = 0.002  # eV/A^3 added to the xx stress of every label


@pytest.fixture(scope="module")
def chgnet_store(tmp_path_factory, small_crystals, chgnet_model):
    """2 crystals x 3 strained frames; label set 'exact' = CHGNet's results, 'shifted' = them
    plus the perturbations above; crystal FORMAM's last frame has no 'partial' label."""
    from kd_nnp.data.store import Frame, FrameStore, Labels
    from kd_nnp.teachers.calculators import InferenceCHGNetCalculator

    calc = InferenceCHGNetCalculator(chgnet_model)
    root = tmp_path_factory.mktemp("frames_store")
    store = FrameStore(root, create=True)
    frames, exact, shifted, partial = [], [], [], []
    for code in CODES:
        for k, strain in enumerate((-0.02, 0.0, 0.03)):
            a = small_crystals[code].copy()
            a.set_cell(a.cell * (1 + strain), scale_atoms=True)
            b = a.copy()
            b.calc = calc
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                e, f, s = b.get_potential_energy(), b.get_forces(), b.get_stress()
            fr = Frame(f"{code}/s{k}", a, code, "test", None, {})
            frames.append(fr)
            exact.append((fr, Labels(e, f, s), None, 0.0))
            f2, s2 = f.copy(), s.copy()
            f2[0, 0] += DF
            s2[0] += DS
            shifted.append((fr, Labels(e + k * E_STEP * len(a), f2, s2), None, 0.0))
            if not (code == "FORMAM" and k == 2):
                partial.append((fr, Labels(e, f, s), None, 0.0))
    store.add_frames(frames)
    store.labels("exact", create=True).write(exact)
    store.labels("shifted", create=True).write(shifted)
    store.labels("partial", create=True).write(partial)
    return root


def test_errors_are_zero_against_own_labels(chgnet_store, tmp_path):
    from kd_nnp.evaluation.frames import run_frame_errors

    summ = run_frame_errors(["chgnet"], chgnet_store, "exact", tmp_path, part="all",
                            progress=False)  # fmt: skip
    r = summ.iloc[0]
    assert (r.n_frames, r.n_crystals, r.n_s_mol) == (6, 2, 6)
    assert r.e_rel_mae_mev < 1e-3 and r.f_mae < 1e-5 and r.s_mae_gpa < 1e-4
    assert r.s_mol_mae_gpa < 1e-4


def test_errors_equal_the_known_perturbations(chgnet_store, small_crystals, tmp_path):
    from kd_nnp.evaluation.frames import run_frame_errors

    summ = run_frame_errors(["chgnet"], chgnet_store, "shifted", tmp_path, part="all",
                            progress=False)  # fmt: skip
    r = summ.iloc[0]
    # energies: frame k is k * E_STEP off; offsets removed per crystal: |k - 1| * E_STEP
    assert r.e_rel_mae_mev == pytest.approx(1000 * E_STEP * 2 / 3, rel=1e-3)
    # forces: one component of DF per frame, averaged over every component of every atom
    n_atoms = [len(small_crystals[c]) for c in CODES for _ in range(3)]
    assert r.f_mae == pytest.approx(6 * DF / (3 * sum(n_atoms)), rel=1e-4)
    assert r.f_max_mean == pytest.approx(DF, rel=1e-4)
    assert r.s_mae_gpa == pytest.approx(DS * EV_PER_A3_TO_GPA / 6, rel=1e-3)
    # the molecular stress sees both the stress shift and atom 0's offset times its force shift
    per = []
    for code in CODES:
        for strain in (-0.02, 0.0, 0.03):
            a = small_crystals[code].copy()
            a.set_cell(a.cell * (1 + strain), scale_atoms=True)
            dF = np.zeros((len(a), 3))
            dF[0, 0] = DF
            ds = np.zeros(6)
            ds[0] = DS
            d = molecular_stress(ds, dF, molecule_offsets(a), a.get_volume())
            per.append(np.abs(d).mean() * EV_PER_A3_TO_GPA)
    assert r.s_mol_mae_gpa == pytest.approx(np.mean(per), rel=1e-3)
    per_frame = (tmp_path / "per_frame.csv").read_text().splitlines()
    assert len(per_frame) == 7 and per_frame[0].startswith("method,frame_id,crystal")
    assert "| CHGNet | 6 |" in (tmp_path / "summary.md").read_text()


def test_selection_by_run_groups_subset_and_incomplete_labels(chgnet_store, tmp_path):
    from kd_nnp.data.store import FrameStore
    from kd_nnp.evaluation.frames import FrameEvalError, select_frames

    store = FrameStore(chgnet_store)
    run = tmp_path / "run"
    run.mkdir()
    (run / "data_summary.json").write_text(
        json.dumps({"train_groups": ["UREAXX02"], "val_groups": ["FORMAM"]})
    )
    pairs, rec = select_frames(store, "exact", run_dir=run, part="val")
    assert [f.frame_id for f, _ in pairs] == ["FORMAM/s0", "FORMAM/s1", "FORMAM/s2"]
    assert rec["selection"].startswith("val crystals of")
    pairs, _ = select_frames(store, "exact", run_dir=run, part="all")
    assert len(pairs) == 6
    pairs, rec = select_frames(store, "partial", groups=["FORMAM"])
    assert len(pairs) == 2 and rec["skipped_incomplete_labels"] == ["FORMAM/s2"]
    pairs, _ = select_frames(store, "exact", part="all", max_frames=3)
    assert [f.frame_id for f, _ in pairs] == ["FORMAM/s0", "FORMAM/s2", "UREAXX02/s2"]
    with pytest.raises(FrameEvalError, match="no label set 'teacherX'"):
        select_frames(store, "teacherX", part="all")
    with pytest.raises(FrameEvalError, match=r"no frame of the crystals \['NOPE'\]"):
        select_frames(store, "exact", groups=["NOPE"])
    with pytest.raises(FrameEvalError, match="no data_summary.json"):
        select_frames(store, "exact", run_dir=tmp_path, part="val")
    with pytest.raises(FrameEvalError, match="needs a training run folder"):
        select_frames(store, "exact", part="val")


def test_cli_prints_the_table_and_refuses_bad_input(chgnet_store, tmp_path, capsys):
    from kd_nnp.cli import main as cli_main

    out = tmp_path / "ev"
    rc = cli_main(["evaluate", "frames", "--calc", "chgnet", "--store", str(chgnet_store),
                   "--labels", "shifted", "--groups", "UREAXX02", "--out", str(out),
                   "--quiet"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "| CHGNet | 3 |" in text and "forces on every atom" in text
    assert json.loads((out / "summary.json").read_text())["selection"]["n_crystals"] == 1
    rc = cli_main(["evaluate", "frames", "--calc", "chgnet", "--store", str(chgnet_store),
                   "--labels", "nolabels", "--part", "all", "--out", str(out)])  # fmt: skip
    assert rc != 0
    assert "no label set 'nolabels'" in capsys.readouterr().err
    rc = cli_main(["evaluate", "frames", "--calc", "chgnet", "--store", str(chgnet_store),
                   "--labels", "exact", "--out", str(out)])  # fmt: skip
    assert rc == 2
