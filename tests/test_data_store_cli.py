"""`kd-nnp data`: empty stores, sources that write nothing, elements outside the organic
scope."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.io import write

from kd_nnp.cli import main as kd_main
from kd_nnp.data.sources.pyxtal_db import pyxtal_frames
from kd_nnp.data.store import FrameStore


def test_info_of_an_empty_store(tmp_path: Path, capsys):
    """D9: `data info` on a store with 0 frames crashed with an sqlite error."""
    st = FrameStore(tmp_path / "empty", create=True)
    assert kd_main(["data", "info", str(st.root)]) == 0
    assert "0 frames" in capsys.readouterr().out


def _inorganic_json(path: Path) -> Path:
    a = bulk("NaCl", "rocksalt", 5.6)
    rec = {
        "structure": {
            "lattice": {"matrix": a.cell.array.tolist()},
            "sites": [
                {"species": [{"element": s, "occu": 1}], "xyz": p.tolist(), "label": s}
                for s, p in zip(a.get_chemical_symbols(), a.positions)
            ],
        },
        "corrected_total_energy": -7.0,
        "force": np.zeros((2, 3)).tolist(),
        "stress": np.zeros((3, 3)).tolist(),
        "mp_id": "mp-4",
    }
    path.write_text(json.dumps({"mp-4": {"mp-4-0-0": rec, "mp-4-0-1": rec}}))
    return path


def test_mptrj_that_writes_nothing_is_an_error(tmp_path: Path, capsys):
    """D9: an all-inorganic file with the default --include organic exited 0 silently."""
    src = _inorganic_json(tmp_path / "inorganic.json")
    rc = kd_main(["data", "mptrj", "--json", str(src), "--out", str(tmp_path / "st")])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "no frame written" in err and "2 inorganic" in err and "--include" in err
    # asking for the class writes them
    args = ["--include", "inorganic"]
    assert kd_main(["data", "mptrj", "--json", str(src), "--out", str(tmp_path / "s2"), *args]) == 0


def test_files_that_write_nothing_is_an_error(tmp_path: Path, capsys):
    gas = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    write(tmp_path / "gas.xyz", gas)
    rc = kd_main(["data", "files", str(tmp_path / "gas.xyz"), "--out", str(tmp_path / "st")])
    err = capsys.readouterr().err
    assert rc == 1 and "no frame written" in err and "gas-phase" in err


def test_files_outside_the_organic_scope_are_named(tmp_path: Path, caplog):
    """D17: a crystal with elements outside H,C,N,O,P,S,F,Cl,Br,I passed unnoticed."""
    urea = pyxtal_frames("test", codes=["UREAXX02"])[0].atoms
    write(tmp_path / "urea.extxyz", urea)
    salt = bulk("NaCl", "rocksalt", 5.6, cubic=True)
    salt.numbers[0] = 26  # Fe
    write(tmp_path / "salt.extxyz", salt)
    with caplog.at_level(logging.WARNING):
        rc = kd_main(["data", "files", str(tmp_path), "--out", str(tmp_path / "st")])
    assert rc == 0
    msgs = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "outside the organic scope" in msgs and "files:salt/0" in msgs
    assert "(Fe, Na)" in msgs and "urea" not in msgs
