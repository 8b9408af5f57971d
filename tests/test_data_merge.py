"""kd-nnp data merge: one store from several, nothing recomputed, nothing silently dropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

from kd_nnp.cli import main as kd_main
from kd_nnp.data.sources.merge import merge_stores
from kd_nnp.data.store import Frame, FrameStore, Labels, StoreError


def _frame(fid: str, a: float, group: str = "g", energy: float | None = None) -> Frame:
    atoms = bulk("Si", "diamond", a=a)
    hard = None if energy is None else Labels(energy=energy, forces=np.zeros((2, 3)))
    return Frame(fid, atoms, group, "test", hard, {"a": a})


def _store(root: Path, frames: list[Frame], labels: dict[str, dict], teacher_hash="h1") -> Path:
    fs = FrameStore(root, create=True)
    fs.add_frames(frames)
    ls = fs.labels("so3lr", create=True)
    ls.set_provenance({"name": "so3lr", "hash": teacher_hash})
    by_id = {f.frame_id: f for f in frames}
    rows = []
    for fid, e in labels.items():
        if e is None:
            rows.append((by_id[fid], None, "teacher exploded", 1.0))
        else:
            lab = Labels(energy=e, forces=np.full((2, 3), e / 10), stress=np.zeros(6))
            rows.append((by_id[fid], lab, None, 1.0))
    ls.write(rows)
    return root


def test_merge_copies_frames_labels_and_failures(tmp_path):
    a = _store(
        tmp_path / "a",
        [_frame("a/0", 5.40, "ga", -1.0), _frame("a/1", 5.45, "ga")],
        {"a/0": -10.0, "a/1": None},
    )
    b = _store(tmp_path / "b", [_frame("b/0", 5.50, "gb")], {"b/0": -12.5})
    rep = merge_stores(tmp_path / "m", [a, b])
    assert rep.frames_written == 3 and rep.labels_written == {"so3lr": 3}
    m = FrameStore(tmp_path / "m")
    assert m.frame_ids() == ["a/0", "a/1", "b/0"]
    f = m.get("a/0")
    assert f.group_id == "ga" and f.info["a"] == 5.40 and f.hard.energy == -1.0
    assert np.allclose(f.atoms.cell.array, bulk("Si", "diamond", a=5.40).cell.array)
    ls = m.labels("so3lr")
    got = ls.load()
    assert {k: v.energy for k, v in got.items()} == {"a/0": -10.0, "b/0": -12.5}
    assert np.allclose(got["b/0"].forces, -1.25)
    assert ls.failures() == {"a/1": "teacher exploded"}
    assert ls.provenance["hash"] == "h1"
    # a rerun writes nothing; other sources into the same store are refused
    again = merge_stores(tmp_path / "m", [a, b])
    assert again.frames_written == 0 and again.labels_written == {"so3lr": 0}
    assert len(FrameStore(tmp_path / "m").labels("so3lr").load()) == 2
    with pytest.raises(StoreError, match="another merge recipe"):
        merge_stores(tmp_path / "m", [a])


def test_merge_keeps_an_identical_frame_once_and_refuses_a_clash(tmp_path):
    a = _store(tmp_path / "a", [_frame("x/0", 5.40)], {"x/0": -1.0})
    same = _store(tmp_path / "same", [_frame("x/0", 5.40)], {"x/0": -1.0})
    rep = merge_stores(tmp_path / "m", [a, same])
    assert rep.frames_written == 1 and rep.frames_same == 1
    other = _store(tmp_path / "other", [_frame("x/0", 5.60)], {"x/0": -1.0})
    with pytest.raises(StoreError, match=r"frame 'x/0' is in .*a and in .*other"):
        merge_stores(tmp_path / "m2", [a, other])


def test_merge_refuses_label_sets_of_different_teachers(tmp_path):
    a = _store(tmp_path / "a", [_frame("a/0", 5.40)], {"a/0": -1.0}, teacher_hash="h1")
    b = _store(tmp_path / "b", [_frame("b/0", 5.40)], {"b/0": -1.0}, teacher_hash="h2")
    with pytest.raises(StoreError, match="label set 'so3lr' differs .*h1.*h2"):
        merge_stores(tmp_path / "m", [a, b])
    assert not (tmp_path / "m" / "frames.db").exists()  # refused before writing anything


def test_merge_cli(tmp_path, capsys):
    a = _store(tmp_path / "a", [_frame("a/0", 5.40)], {"a/0": -1.0})
    assert kd_main(["data", "merge", str(a), "--out", str(tmp_path / "m")]) == 0
    assert "1 frames written" in capsys.readouterr().out
    assert kd_main(["data", "merge", str(tmp_path / "nope"), "--out", str(tmp_path / "m3")]) == 1
    assert "not a kd_nnp frames store" in capsys.readouterr().err
