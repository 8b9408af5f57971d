"""Store builders: files (x23 vdW-DF2, gas frames skipped), pyxtal, perturbations, COD,
and the `kd-nnp data` CLI."""

from __future__ import annotations

import csv
import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
from ase.io import read, write

from kd_nnp.cli import main as kd_main
from kd_nnp.data.molecules import molecule_labels as molecule_indices
from kd_nnp.data.sources.cod import download_cod, read_cod_ids
from kd_nnp.data.sources.files import build_files_store, gas_phase_reason, iter_files
from kd_nnp.data.sources.perturb import apply_strain, make_perturbations
from kd_nnp.data.sources.pyxtal_db import pyxtal_crystals, pyxtal_frames
from kd_nnp.data.store import FrameStore, StoreError
from kd_nnp.utils.paths import shared_data_dir


def _x23() -> Path:
    root = shared_data_dir()
    if root is None:
        pytest.skip("shared data not available")
    return root / "x23_vdwdf2"


# ------------------------------------------------------------------ files
@pytest.mark.shared_data
def test_files_aspirin_gas_frames_reported_and_skipped(tmp_path: Path):
    rep = build_files_store([_x23() / "ASPIRIN.xyz"], tmp_path / "st", source_name="x23")
    # TRAIN_stats.txt of the data set: ASPIRIN solid 125, gas 25
    assert rep.n_read == 150 and rep.n_kept == 125 and len(rep.skipped) == 25
    assert all(why.startswith("gas-phase") for _, _, why in rep.skipped)
    store = FrameStore(tmp_path / "st")
    assert len(store) == 125
    fr = store.get("x23:ASPIRIN/0")
    assert fr.group_id == "ASPIRIN" and fr.hard.energy == pytest.approx(-475.39440501)
    assert fr.hard.forces.shape == (84, 3) and fr.hard.stress.shape == (6,)


@pytest.mark.shared_data
def test_files_traj_and_folder(tmp_path: Path):
    x23 = _x23()
    rep_frames = list(iter_files([x23 / "07_co2.traj"], source_name="x23"))
    assert len(rep_frames) == 122  # 186 frames, 64 gas (TRAIN_stats.txt)
    # a folder mixing a .traj and CIFs written from its frames
    folder = tmp_path / "in"
    folder.mkdir()
    write(folder / "co2_a.cif", rep_frames[0].atoms)
    write(folder / "broken.cif", rep_frames[0].atoms)
    (folder / "broken.cif").write_text("data_x\n_cell_length_a 3\nloop_\n_garbage\n")
    write(folder / "frames.extxyz", [f.atoms for f in rep_frames[:3]])
    rep = build_files_store([folder], tmp_path / "st")
    store = FrameStore(tmp_path / "st")
    assert sorted(store.frame_ids()) == [
        "files:co2_a",
        "files:frames/0",
        "files:frames/1",
        "files:frames/2",
    ]
    assert any("broken.cif" in p and "unreadable" in why for p, _, why in rep.skipped)


def test_files_traj_info_with_reserved_keys(tmp_path: Path):
    """X23's .traj files carry energy/free_energy/stress in atoms.info: ASE db refuses
    those as key-value pairs ("Bad key: energy"); they are renamed, the labels come from the
    SinglePointCalculator."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import Trajectory

    _, urea = pyxtal_crystals("test", codes=["UREAXX02"])[0]
    rng = np.random.default_rng(0)
    path = tmp_path / "21_urea.traj"
    with Trajectory(str(path), "w") as traj:
        for i in range(2):
            a = urea.copy()
            a.rattle(0.01, seed=i)
            e = -41.5 - i
            forces = rng.normal(size=(len(a), 3))
            stress = rng.normal(size=6) * 1e-4
            a.info = {
                "energy": e + 100.0,  # deliberately not the label: labels come from the calc
                "free_energy": e,
                "stress": np.zeros((3, 3)),  # an array: not a key-value pair
                "config_stress_weight": 0.0,
                "C": 1,  # an element symbol (reserved by ASE db)
                "bad-key": "x",
            }
            a.calc = SinglePointCalculator(a, energy=e, forces=forces, stress=stress)
            traj.write(a)
    rep = build_files_store([path], tmp_path / "st", source_name="x23")
    assert rep.n_kept == 2
    store = FrameStore(tmp_path / "st")
    fr = store.get("x23:21_urea/1")
    ref = read(path, 1)
    assert fr.hard.energy == pytest.approx(-42.5)
    np.testing.assert_allclose(fr.hard.forces, ref.get_forces(), atol=1e-12)
    np.testing.assert_allclose(fr.hard.stress, ref.get_stress(), atol=1e-12)
    assert fr.info["info_energy"] == pytest.approx(57.5)
    assert fr.info["info_free_energy"] == pytest.approx(-42.5)
    assert fr.info["config_stress_weight"] == 0.0
    assert fr.info["info_C"] == 1 and fr.info["bad_key"] == "x"
    assert "stress" not in fr.info and "energy" not in fr.info


@pytest.mark.shared_data
def test_files_x23_traj_info_keys_into_store(tmp_path: Path):
    """The real X23 .traj (energy/free_energy/stress in atoms.info) goes into a store."""
    from ase.io import iread

    path = _x23() / "21_urea.traj"
    rep = build_files_store([path], tmp_path / "st", source_name="x23")
    assert rep.n_kept > 0
    store = FrameStore(tmp_path / "st")
    first = next(
        (i, a) for i, a in enumerate(iread(str(path), index=":")) if gas_phase_reason(a) is None
    )
    fr = store.get(f"x23:21_urea/{first[0]}")
    assert fr.hard.energy == pytest.approx(first[1].get_potential_energy())
    assert fr.info["info_energy"] == pytest.approx(fr.hard.energy)
    assert "info_free_energy" in fr.info and "energy" not in fr.info


def test_files_bad_input_names_file(tmp_path: Path):
    with pytest.raises(StoreError, match="does not exist"):
        build_files_store([tmp_path / "nope.xyz"], tmp_path / "st")
    bad = tmp_path / "bad.extxyz"
    bad.write_text('3\nLattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3\nC 0 0 0\n')
    with pytest.raises(StoreError, match="bad.extxyz"):
        build_files_store([bad], tmp_path / "st")


def test_gas_phase_reason():
    from ase.build import molecule

    m = molecule("CH4")
    assert "not periodic" in gas_phase_reason(m)
    m.cell = [25, 25, 25]
    m.pbc = True
    assert "atoms/A^3" in gas_phase_reason(m)
    _, urea = pyxtal_crystals("test", codes=["UREAXX02"])[0]
    assert gas_phase_reason(urea) is None


# ------------------------------------------------------------------ pyxtal
def test_pyxtal_crystals_and_frames():
    crystals = pyxtal_crystals("test")
    assert len(crystals) == 100 and all(a.pbc.all() for _, a in crystals)
    small = pyxtal_crystals("test", max_atoms=24)
    assert {c for c, _ in small} == {"OXALAC11", "UREAXX02", "FORMAM", "OXALAC02"}
    skipped: list = []
    frames = pyxtal_frames("test", skipped=skipped)
    assert len(frames) == 98 and {c for c, _ in skipped} == {"DBZCOR", "OXALAC02"}
    assert all(f.group_id == f.frame_id.split(":")[1] for f in frames)
    assert len(pyxtal_crystals("mech")) == 50
    with pytest.raises(StoreError, match="NOTACODE"):
        pyxtal_crystals("test", codes=["NOTACODE"])


# ------------------------------------------------------------------ perturb
def _urea():
    return pyxtal_frames("test", codes=["UREAXX02"])


def test_perturbations_reproducible_and_ids():
    a = make_perturbations(_urea(), n_strain=6, n_rattle=3, seed=7)
    b = make_perturbations(_urea(), n_strain=6, n_rattle=3, seed=7)
    c = make_perturbations(_urea(), n_strain=6, n_rattle=3, seed=8)
    ids = [f.frame_id for f in a]
    assert ids == ["pyxtal-test:UREAXX02/parent"] + [
        f"pyxtal-test:UREAXX02/strain{k}" for k in range(6)
    ] + [f"pyxtal-test:UREAXX02/rattle{k}" for k in range(3)]
    assert ids == [f.frame_id for f in b]
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa.atoms.positions, fb.atoms.positions)
        np.testing.assert_array_equal(fa.atoms.cell.array, fb.atoms.cell.array)
    assert not np.allclose(a[-1].atoms.positions, c[-1].atoms.positions)
    assert all(f.group_id == "UREAXX02" for f in a)
    vols = [f.info["volume_strain"] for f in a[1:7]]
    assert min(vols) == pytest.approx(-0.08) and max(vols) == pytest.approx(0.20)
    assert all(-0.08 - 1e-9 <= v <= 0.20 + 1e-9 for v in vols)
    # unrattled strains are unrattled: intramolecular distances are kept (molecular mode)
    labels, pos0 = molecule_indices(a[0].atoms)
    _, pos1 = molecule_indices(a[6].atoms)
    for m in np.unique(labels):
        sel = np.where(labels == m)[0]
        d0 = np.linalg.norm(pos0[sel, None] - pos0[None, sel], axis=-1)
        d1 = np.linalg.norm(pos1[sel, None] - pos1[None, sel], axis=-1)
        np.testing.assert_allclose(d0, d1, atol=1e-8)


def test_affine_vs_molecular_strain():
    atoms = _urea()[0].atoms
    eps = np.eye(3) * (1.1 ** (1 / 3) - 1)
    aff = apply_strain(atoms, eps, "affine")
    mol = apply_strain(atoms, eps, "molecular")
    assert (
        aff.get_volume()
        == pytest.approx(mol.get_volume())
        == pytest.approx(atoms.get_volume() * 1.1)
    )
    # affine stretches C=O bonds, molecular does not
    i_c = [i for i, s in enumerate(atoms.get_chemical_symbols()) if s == "C"][0]

    def shortest(a, i):
        d = a.get_distances(i, range(len(a)), mic=True)
        return np.sort(d)[1]

    assert shortest(mol, i_c) == pytest.approx(shortest(atoms, i_c), abs=1e-8)
    assert abs(shortest(aff, i_c) - shortest(atoms, i_c)) > 1e-3


def test_perturb_prerelax_with_calculator():
    from ase.calculators.emt import EMT

    frames = make_perturbations(
        _urea(), n_strain=2, n_rattle=1, seed=0, prerelax_calc=EMT(), prerelax_steps=5
    )
    assert frames[0].info["prerelax_steps"] <= 5
    assert frames[0].info["prerelax_fmax"] < frames[0].info["prerelax_fmax0"]


# ------------------------------------------------------------------ COD
def _cif_dir(tmp_path: Path) -> Path:
    srv = tmp_path / "server"
    srv.mkdir()
    _, urea = pyxtal_crystals("test", codes=["UREAXX02"])[0]
    write(srv / "1000001.cif", urea)
    _, oxa = pyxtal_crystals("test", codes=["OXALAC02"])[0]  # H missing from the sites
    write(srv / "1000002.cif", oxa)
    text = (srv / "1000002.cif").read_text()
    assert '_chemical_formula_sum              "C8 O16"' in text
    (srv / "1000002.cif").write_text(text.replace('"C8 O16"', "'C2 H2 O4'", 1))  # as COD would say
    (srv / "1000003.cif").write_text("not a cif at all\n")
    return srv


def test_cod_download_file_url_resumable(tmp_path: Path):
    srv = _cif_dir(tmp_path)
    ids_csv = tmp_path / "ids.csv"
    ids_csv.write_text(",COD_ID\n0,1000001\n1,1000002\n2,1000003\n3,1000004\n")
    ids = read_cod_ids(ids_csv)
    assert ids == ["1000001", "1000002", "1000003", "1000004"]
    out = tmp_path / "cifs"
    res = {r.cod_id: r for r in download_cod(ids, out, base_url=srv.as_uri(), progress=False)}
    assert res["1000001"].status == "ok" and res["1000001"].n_atoms == 16
    assert res["1000002"].status == "failed_parse" and "missing H" in res["1000002"].message
    assert res["1000003"].status == "failed_parse"
    assert res["1000004"].status == "failed_download"
    rows = list(csv.DictReader(open(out / "cod_report.csv")))
    assert [r["status"] for r in rows] == ["ok", "failed_parse", "failed_parse", "failed_download"]
    # rerun: nothing fetched again (server emptied), the good file is reused
    for p in srv.iterdir():
        p.unlink()
    res2 = {
        r.cod_id: r.status for r in download_cod(ids, out, base_url=srv.as_uri(), progress=False)
    }
    assert res2 == {
        "1000001": "exists",
        "1000002": "failed_parse",
        "1000003": "failed_parse",
        "1000004": "failed_download",
    }
    # the downloaded folder builds a store
    assert build_files_store([out], tmp_path / "st").n_kept == 1


def test_cod_over_local_http(tmp_path: Path):
    srv = _cif_dir(tmp_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(srv))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}/"
        res = {
            r.cod_id: r.status
            for r in download_cod(
                ["1000001", "1000009"], tmp_path / "c", base_url=base, progress=False
            )
        }
    finally:
        httpd.shutdown()
    assert res == {"1000001": "ok", "1000009": "failed_download"}


def test_cod_bad_id_list(tmp_path: Path):
    p = tmp_path / "ids.csv"
    p.write_text("COD_ID\n1000001\nabc\n")
    with pytest.raises(StoreError, match="line 3.*'abc'"):
        read_cod_ids(p)


@pytest.mark.shared_data
def test_cod_paper_id_list_reads():
    root = shared_data_dir()
    if root is None:
        pytest.skip("shared data not available")
    ids = read_cod_ids(root / "cod" / "Sampled_COD_Organic.csv")
    assert len(ids) == 477 and len(set(ids)) == 477


# ------------------------------------------------------------------ CLI
def test_data_cli_pyxtal_perturb_info(tmp_path: Path, capsys):
    st, pert = tmp_path / "pyx", tmp_path / "pert"
    assert kd_main(["data", "pyxtal", "--db", "test", "--out", str(st), "--max-atoms", "24"]) == 0
    assert "1 skipped" in capsys.readouterr().out  # OXALAC02 (no H)
    assert len(FrameStore(st)) == 3
    args = [
        "data",
        "perturb",
        "--from",
        str(st),
        "--out",
        str(pert),
        "--n-strain",
        "3",
        "--n-rattle",
        "2",
        "--seed",
        "3",
    ]
    assert kd_main(args) == 0
    assert len(FrameStore(pert)) == 3 * 6
    assert kd_main(args) == 0  # rerun: resumable, nothing new
    assert "0 parents processed" in capsys.readouterr().out.splitlines()[-1]
    assert kd_main(["data", "info", str(pert)]) == 0
    out = capsys.readouterr().out
    assert "18 frames" in out and "source perturb: 18 frames in 3 groups" in out
    assert kd_main(["data", "info", str(tmp_path / "none")]) == 1
    assert "not a kd_nnp frames store" in capsys.readouterr().err
