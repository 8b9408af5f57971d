"""MPtrj reader: real FFAST extxyz sample, synthetic JSON in MPtrj's schema, stress sign,
streaming limits, bad input, and the figshare download path (offline, file:// URLs)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.units import GPa
from pymatgen.io.ase import AseAtomsAdaptor

from kd_nnp.data.download import DownloadError, download_file
from kd_nnp.data.sources.mptrj import (
    build_mptrj_store,
    download_mptrj,
    iter_mptrj_extxyz,
    iter_mptrj_json,
    vasp_kbar_to_ase,
)
from kd_nnp.data.store import FrameStore, StoreError
from kd_nnp.utils.paths import shared_data_dir


def _record(atoms: Atoms, mp_id: str, e_total: float, forces, stress_kbar, magmom=None) -> dict:
    n = len(atoms)
    return {
        "structure": AseAtomsAdaptor.get_structure(atoms).as_dict(),
        "uncorrected_total_energy": e_total + 0.5,
        "corrected_total_energy": e_total,
        "energy_per_atom": e_total / n,
        "ef_per_atom": -0.1,
        "e_per_atom_relaxed": e_total / n - 0.01,
        "ef_per_atom_relaxed": -0.11,
        "force": np.asarray(forces).tolist(),
        "stress": np.asarray(stress_kbar).tolist(),
        "magmom": magmom,
        "bandgap": 0.0,
        "mp_id": mp_id,
    }


def _molecular_cell(symbols: str, a: float = 6.0) -> Atoms:
    rng = np.random.default_rng(len(symbols))
    atoms = Atoms(symbols, cell=[a, a, a], pbc=True)
    atoms.positions = rng.uniform(0, a, size=(len(atoms), 3))
    return atoms


@pytest.fixture
def synthetic_json(tmp_path: Path) -> Path:
    data = {
        "mp-1": {  # organic
            f"mp-1-0-{k}": _record(
                _molecular_cell("C2H4O2"),
                "mp-1",
                -40.0 - k,
                np.full((8, 3), 0.1 * k),
                np.eye(3) * 10.0,
            )
            for k in range(3)
        },
        "mp-2": {  # complex: exactly 80 % organic atoms
            "mp-2-0-0": _record(
                _molecular_cell("C3HFe"),
                "mp-2",
                -30.0,
                np.zeros((5, 3)),
                np.zeros((3, 3)),
                magmom=[0, 0, 0, 0, 2.5],
            )
        },
        "mp-3": {  # inorganic, just below 80 %
            "mp-3-0-0": _record(
                _molecular_cell("C11H4Fe4"), "mp-3", -100.0, np.zeros((19, 3)), np.zeros((3, 3))
            )
        },
        "mp-4": {
            "mp-4-0-0": _record(
                bulk("NaCl", "rocksalt", 5.6), "mp-4", -7.0, np.zeros((2, 3)), np.zeros((3, 3))
            )
        },
    }
    path = tmp_path / "MPtrj_synthetic.json"
    path.write_text(json.dumps(data))
    return path


def test_json_stream_classifies_and_converts(synthetic_json: Path):
    stats: Counter = Counter()
    frames = list(iter_mptrj_json(synthetic_json, include=("organic", "complex"), stats=stats))
    assert [f.frame_id for f in frames] == [
        "mptrj:mp-1-0-0",
        "mptrj:mp-1-0-1",
        "mptrj:mp-1-0-2",
        "mptrj:mp-2-0-0",
    ]
    assert stats["organic"] == 3 and stats["complex"] == 1 and stats["inorganic"] == 2
    f1 = frames[1]
    assert f1.group_id == "mp-1" and f1.source == "mptrj"
    assert f1.hard.energy == pytest.approx(-41.0)  # corrected total energy, not per atom
    assert f1.info["uncorrected_total_energy"] == pytest.approx(-40.5)
    np.testing.assert_allclose(f1.hard.forces, 0.1)
    # +10 kBar (VASP: compressive) -> -1 GPa in ASE's convention
    np.testing.assert_allclose(f1.hard.stress[:3], -1.0 * GPa)
    np.testing.assert_allclose(f1.hard.stress[3:], 0.0)
    assert frames[3].info["mptrj_class"] == "complex"
    np.testing.assert_allclose(frames[3].info["magmoms"], [0, 0, 0, 0, 2.5])


def test_json_limit_and_store(synthetic_json: Path, tmp_path: Path):
    stats = build_mptrj_store(synthetic_json, tmp_path / "st", include=("organic",), limit=2)
    assert stats["written"] == 2
    store = FrameStore(tmp_path / "st")
    assert store.frame_ids() == ["mptrj:mp-1-0-0", "mptrj:mp-1-0-1"]
    fr = store.get("mptrj:mp-1-0-1")
    assert fr.hard.energy == pytest.approx(-41.0) and fr.group_id == "mp-1"
    # rerun is idempotent
    assert build_mptrj_store(synthetic_json, tmp_path / "st", include=("organic",))["written"] == 1


def test_vasp_stress_sign_matches_physics():
    """A compressed cell: VASP reports positive (compressive) kBar; ASE's stress is negative.
    EMT (native ASE convention) must agree in sign and magnitude after the conversion."""
    atoms = bulk("Cu", "fcc", a=3.61 * 0.97, cubic=True)
    atoms.calc = EMT()
    sigma_ase = atoms.get_stress(voigt=False)
    assert np.all(np.diag(sigma_ase) < 0)  # wants to expand
    pressure_gpa = -np.trace(sigma_ase) / 3 / GPa  # positive pressure in GPa
    vasp_kbar = np.eye(3) * pressure_gpa * 10.0  # how VASP prints it: +p in kB
    np.testing.assert_allclose(vasp_kbar_to_ase(vasp_kbar), sigma_ase, rtol=1e-9, atol=1e-12)


def test_bad_json_rows_name_the_row(tmp_path: Path):
    good = _record(_molecular_cell("CH4"), "mp-9", -20.0, np.zeros((5, 3)), np.zeros((3, 3)))
    bad = dict(good)
    bad["force"] = np.zeros((4, 3)).tolist()
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"mp-9": {"mp-9-0-0": good, "mp-9-0-1": bad}}))
    with pytest.raises(StoreError, match=r"mp-9/mp-9-0-1.*'force' has shape"):
        list(iter_mptrj_json(p))
    missing = dict(good)
    del missing["corrected_total_energy"]
    p.write_text(json.dumps({"mp-9": {"mp-9-0-0": missing}}))
    with pytest.raises(StoreError, match="missing 'corrected_total_energy'"):
        list(iter_mptrj_json(p))
    p.write_text('{"mp-9": {"mp-9-0-0": {"structure": ')
    with pytest.raises(StoreError, match="invalid JSON"):
        list(iter_mptrj_json(p))


@pytest.mark.shared_data
def test_real_ffast_sample():
    root = shared_data_dir()
    if root is None:
        pytest.skip("shared data not available")
    path = root / "mptrj_sample" / "mptrj_first9frames_from_FFAST.extxyz"
    stats: Counter = Counter()
    frames = list(iter_mptrj_extxyz(path, stats=stats))
    assert len(frames) == 9 and stats["inorganic"] == 9
    assert list(iter_mptrj_extxyz(path, include=("organic",))) == []
    assert {f.group_id for f in frames} == {"mp-100", "mp-10000"}
    assert len({f.frame_id for f in frames}) == 9
    hfs = [f for f in frames if f.group_id == "mp-10000"][0]
    # this file's `energy` is the uncorrected total; the store keeps the corrected total
    assert hfs.hard.energy == pytest.approx(-55.2744929)
    assert hfs.info["uncorrected_total_energy"] == pytest.approx(-54.2684929)
    assert hfs.hard.energy / len(hfs.atoms) == pytest.approx(hfs.info["energy_per_atom"], abs=1e-6)
    assert "magmoms" in hfs.info
    # ASE sign convention already: the compressed Hf frame has negative stress
    hf = sorted((f for f in frames if f.group_id == "mp-100"), key=lambda f: f.atoms.get_volume())
    assert hf[0].hard.stress[0] < 0 < hf[-1].hard.stress[0]


def test_download_file_url_with_checks(tmp_path: Path):
    src = tmp_path / "src.json"
    src.write_bytes(b'{"mp-1": {}}' * 1000)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    out = download_file(
        src.as_uri(),
        tmp_path / "dl" / "x.json",
        expected_size=src.stat().st_size,
        md5=md5,
        progress=False,
    )
    assert out.read_bytes() == src.read_bytes()
    with pytest.raises(DownloadError, match="md5"):
        download_file(src.as_uri(), tmp_path / "dl" / "y.json", md5="0" * 32, progress=False)
    assert (
        not (tmp_path / "dl" / "y.json").exists() and not (tmp_path / "dl" / "y.json.part").exists()
    )
    with pytest.raises(DownloadError, match="size"):
        download_file(src.as_uri(), tmp_path / "dl" / "z.json", expected_size=5, progress=False)
    with pytest.raises(DownloadError, match="failed"):
        download_file((tmp_path / "nope").as_uri(), tmp_path / "dl" / "w.json", progress=False)


def test_download_mptrj_via_figshare_record(tmp_path: Path, synthetic_json: Path):
    payload = synthetic_json.read_bytes()
    api = tmp_path / "article.json"
    api.write_text(
        json.dumps(
            {
                "files": [
                    {
                        "name": "MPtrj_2022.9_full.json",
                        "download_url": synthetic_json.as_uri(),
                        "size": len(payload),
                        "computed_md5": hashlib.md5(payload).hexdigest(),
                    }
                ]
            }
        )
    )
    path = download_mptrj(tmp_path / "dl", api_url=api.as_uri(), progress=False)
    assert path.name == "MPtrj_2022.9_full.json" and path.read_bytes() == payload
    api.write_text(json.dumps({"files": [{"name": "other.json"}]}))
    with pytest.raises(DownloadError, match="no file"):
        download_mptrj(tmp_path / "dl2", api_url=api.as_uri(), progress=False)
