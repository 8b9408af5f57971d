"""Replay frames (`kd-nnp data inorganic`, kd_nnp.data.sources.inorganic): strained/rattled
copies of the built-in inorganic/hybrid crystals, labelled by pretrained CHGNet through the
ordinary label machinery (`kd-nnp label store=... teacher=chgnet`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kd_nnp.cli.data import main as data_main
from kd_nnp.data.sources.inorganic import REPLAY_SOURCE, builtin_structures, replay_frames
from kd_nnp.data.store import FrameStore, StoreError


def test_replay_frames_are_seeded_and_not_the_check_frames():
    frames = replay_frames(2, seed=1, prototypes=["Si", "NH4Cl"])
    assert [f.frame_id for f in frames] == [
        "replay:Si/1-0", "replay:Si/1-1", "replay:NH4Cl/1-0", "replay:NH4Cl/1-1"
    ]  # fmt: skip
    assert {f.group_id for f in frames} == {"Si", "NH4Cl"}
    assert all(f.source == REPLAY_SOURCE and f.hard is None and len(f.atoms) >= 8 for f in frames)
    again = replay_frames(2, seed=1, prototypes=["Si", "NH4Cl"])
    assert all(np.array_equal(a.atoms.positions, b.atoms.positions) for a, b in zip(frames, again))
    # the forgetting check's copies use seed 0: other geometries
    check = replay_frames(2, seed=0, prototypes=["Si", "NH4Cl"])
    assert not any(np.allclose(a.atoms.positions, b.atoms.positions) for a, b in zip(frames, check))
    si = builtin_structures()["Si"][0]
    assert frames[0].atoms.get_volume() != pytest.approx(8 * si.get_volume(), rel=1e-6)
    with pytest.raises(StoreError, match=r"unknown built-in structure\(s\) \['Xx'\]"):
        replay_frames(1, prototypes=["Xx"])


@pytest.mark.teacher("chgnet")
def test_replay_store_labelled_by_pretrained_chgnet(tmp_path, capsys):
    from kd_nnp.teachers.calculators import InferenceCHGNetCalculator
    from kd_nnp.teachers.label import label_store

    out = tmp_path / "replay"
    args = ["inorganic", "--out", str(out), "--n-perturbed", "1", "--prototypes", "Si", "NaCl"]
    assert data_main(args) == 0
    assert "2 replay frames written" in capsys.readouterr().out
    assert data_main(args) == 0  # same recipe: resumes, writes nothing
    assert "0 replay frames written" in capsys.readouterr().out
    assert data_main([*args[:4], "2", *args[5:]]) == 1  # another recipe: refused, named
    assert "n_perturbed: 1 -> 2" in capsys.readouterr().err
    assert json.loads((out / "replay_recipe.json").read_text())["settings"]["seed"] == 1
    rep = label_store(out, "chgnet", progress=False, check=False)
    assert (rep.n_ok, rep.n_failed) == (2, 0)
    store = FrameStore(out)
    labels = store.labels("chgnet").load()
    calc = InferenceCHGNetCalculator()
    for frame in store.iter_frames():
        a = frame.atoms.copy()
        a.calc = calc
        lab = labels[frame.frame_id]
        assert lab.energy == pytest.approx(a.get_potential_energy(), abs=1e-4)
        assert np.abs(lab.forces - a.get_forces()).max() < 1e-4
        assert np.abs(lab.forces).max() > 0.01  # rattled: real forces, not symmetry zeros
