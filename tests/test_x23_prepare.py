"""experiments/paper/prepare_x23.py: held-out crystals restricted to the training elements,
and the training commands it prints align the vdW-DF2 hard energies."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _prepare_module():
    spec = importlib.util.spec_from_file_location(
        "prepare_x23", REPO / "experiments" / "paper" / "prepare_x23.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.shared_data
def test_heldout_train_elements_only(shared_data):
    from kd_nnp.data.sources.pyxtal_db import pyxtal_crystals

    mod = _prepare_module()
    x23 = shared_data / "x23_vdwdf2"
    full = mod.heldout_split(x23, "test", max_atoms=60)
    only = mod.heldout_split(x23, "test", max_atoms=60, train_elements_only=True)
    assert set(only["eval"]) < set(full["eval"])
    assert only["eval"] == ["JAYDUI", "BIPHEN", "RESORA03", "XULDUD01", "PHENAZ01", "PYRZIN01"]
    for _, atoms in pyxtal_crystals("test", codes=only["eval"]):
        assert set(atoms.get_chemical_symbols()) <= {"H", "C", "N", "O"}
    assert "element(s) ['S']" in only["excluded"]["FIQSEG"]
    assert "only the training elements" in only["rule"]


@pytest.mark.shared_data
def test_prepare_dry_run_prints_hard_reference(shared_data, tmp_path, capsys):
    mod = _prepare_module()
    assert mod.main(["--store", str(tmp_path / "st"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "kd-nnp data files" in out and "kd-nnp label" in out
    train_lines = [line for line in out.splitlines() if "kd-nnp train" in line]
    assert len(train_lines) == 4 and all("data.hard_reference=student" in t for t in train_lines)
    assert not (tmp_path / "st").exists()
