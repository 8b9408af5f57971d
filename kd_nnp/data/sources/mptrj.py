"""MPtrj (Deng et al. 2023, the CHGNet training set) -> frames.

The real ``MPtrj_2022.9_full.json`` (~11 GB, 1.58 M frames) is one JSON object
``{mp_id: {frame_id: record}}``. It is *streamed* with ijson, one material at a time, so
memory is bounded by the largest single material's trajectory, never by the file.

Conventions (see docs/data.md):
- energy: ``corrected_total_energy`` (total, eV; MP2020-corrected, what CHGNet and the paper
  train on, = ``energy_per_atom * n_atoms``); ``uncorrected_total_energy`` kept in info;
- forces: ``force`` (eV/A);
- stress: MPtrj's ``stress`` is VASP's, in kBar with VASP's sign (positive = compressed,
  the cell pushes outwards). The store holds ASE's convention, so
  ``sigma_ase = -0.1 * GPa * stress_kbar`` (ase.io.vasp and chgnet's dataset use the same
  factor -0.1 to GPa);
- magmoms: into info (``magmoms``); mp_id is the group id; frame id ``mptrj:<frame_id>``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.units import GPa

from kd_nnp.data.classify import CLASSES, classify
from kd_nnp.data.store import Frame, FrameStore, Labels, StoreError

MPTRJ_FILENAME = "MPtrj_2022.9_full.json"
MPTRJ_FIGSHARE_ARTICLE = 23713842
FIGSHARE_API = "https://api.figshare.com/v2/articles/{article}"
KBAR_TO_EV_PER_A3 = 0.1 * GPa  # 1 kBar = 0.1 GPa = 1/1602.18 eV/A^3
SOURCE = "mptrj"
_SCALAR_KEYS = (
    "uncorrected_total_energy",
    "corrected_total_energy",
    "energy_per_atom",
    "ef_per_atom",
    "e_per_atom_relaxed",
    "ef_per_atom_relaxed",
    "bandgap",
)


def vasp_kbar_to_ase(stress_kbar: Any) -> np.ndarray:
    """VASP stress (kBar, positive = compressive) -> ASE stress (eV/A^3, 3x3)."""
    s = np.asarray(stress_kbar, dtype=float)
    if s.shape == (6,):  # already Voigt
        s = np.array([[s[0], s[5], s[4]], [s[5], s[1], s[3]], [s[4], s[3], s[2]]])
    if s.shape != (3, 3):
        raise ValueError(f"stress must be 3x3 or Voigt 6, got shape {s.shape}")
    return -KBAR_TO_EV_PER_A3 * s


def _site_symbols(structure: dict, where: str) -> list[str]:
    try:
        sites = structure["sites"]
        out = []
        for i, site in enumerate(sites):
            species = site["species"]
            if len(species) != 1:
                raise StoreError(f"{where}: site {i} is disordered ({species})")
            out.append(str(species[0]["element"]))
        return out
    except (KeyError, TypeError, IndexError) as exc:
        raise StoreError(f"{where}: structure is not a pymatgen Structure dict ({exc!r})") from exc


def mptrj_record_to_frame(mp_id: str, frame_key: str, rec: dict, *, where: str = "") -> Frame:
    """One MPtrj JSON record -> :class:`Frame` (raises :class:`StoreError` naming ``where``)."""
    where = where or f"MPtrj {mp_id}/{frame_key}"
    if not isinstance(rec, dict):
        raise StoreError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("structure", "corrected_total_energy", "force"):
        if key not in rec or rec[key] is None:
            raise StoreError(f"{where}: missing {key!r}")
    structure = rec["structure"]
    symbols = _site_symbols(structure, where)
    try:
        cell = np.asarray(structure["lattice"]["matrix"], dtype=float)
        positions = np.asarray([s["xyz"] for s in structure["sites"]], dtype=float)
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{where}: bad lattice/site coordinates ({exc!r})") from exc
    if cell.shape != (3, 3) or positions.shape != (len(symbols), 3):
        raise StoreError(f"{where}: lattice {cell.shape} / positions {positions.shape} malformed")
    atoms = Atoms(symbols=symbols, positions=positions, cell=cell, pbc=True)
    forces = np.asarray(rec["force"], dtype=float)
    if forces.shape != (len(atoms), 3):
        raise StoreError(f"{where}: 'force' has shape {forces.shape}, expected ({len(atoms)}, 3)")
    stress = None
    if rec.get("stress") is not None:
        try:
            stress = vasp_kbar_to_ase(rec["stress"])
        except ValueError as exc:
            raise StoreError(f"{where}: {exc}") from exc
    info: dict[str, Any] = {"mptrj_frame": str(frame_key), "mptrj_class": classify(symbols)}
    for key in _SCALAR_KEYS:
        val = rec.get(key)
        if val is not None:
            info[key] = float(val)
    if rec.get("magmom") is not None:
        mag = np.asarray(rec["magmom"], dtype=float)
        if mag.shape != (len(atoms),):
            raise StoreError(f"{where}: 'magmom' has shape {mag.shape}, expected ({len(atoms)},)")
        info["magmoms"] = mag
    hard = Labels(energy=float(rec["corrected_total_energy"]), forces=forces, stress=stress)
    return Frame(f"mptrj:{frame_key}", atoms, str(rec.get("mp_id") or mp_id), SOURCE, hard, info)


def iter_mptrj_json(
    path: str | Path,
    *,
    include: Iterable[str] = ("organic",),
    limit: int | None = None,
    stats: Counter | None = None,
) -> Iterator[Frame]:
    """Stream frames of the classes in ``include`` from an MPtrj JSON file.

    Frames of other classes are classified from the element list alone and never
    converted. ``stats`` (a Counter) receives counts per class and ``written``.
    """
    import ijson

    include = set(include)
    bad = include - set(CLASSES)
    if bad:
        raise ValueError(f"unknown classes {sorted(bad)}; choose from {list(CLASSES)}")
    stats = stats if stats is not None else Counter()
    path = Path(path)
    n = 0
    with open(path, "rb") as fh:
        try:
            for mp_id, frames in ijson.kvitems(fh, "", use_float=True):
                if not isinstance(frames, dict):
                    raise StoreError(
                        f"{path}: value of {mp_id!r} is not an object of frames "
                        "(expected MPtrj's {mp_id: {frame_id: record}})"
                    )
                for frame_key, rec in frames.items():
                    where = f"{path.name}: {mp_id}/{frame_key}"
                    if not isinstance(rec, dict) or "structure" not in rec:
                        raise StoreError(f"{where}: record has no 'structure'")
                    klass = classify(_site_symbols(rec["structure"], where))
                    stats[klass] += 1
                    if klass not in include:
                        continue
                    yield mptrj_record_to_frame(mp_id, frame_key, rec, where=where)
                    stats["selected"] += 1
                    n += 1
                    if limit is not None and n >= limit:
                        return
        except ijson.JSONError as exc:
            raise StoreError(f"{path}: invalid JSON ({exc})") from exc


def iter_mptrj_extxyz(
    path: str | Path,
    *,
    include: Iterable[str] = CLASSES,
    limit: int | None = None,
    stats: Counter | None = None,
) -> Iterator[Frame]:
    """MPtrj frames already converted to extxyz (e.g. by FFAST, as in the shared sample).

    Those files keep MPtrj's scalars as info keys; their ``energy`` is the *uncorrected*
    total energy and their stress is already ASE's eV/A^3 convention (a compressed frame
    has negative stress). The store energy is ``corrected_total_energy``, as for the JSON.
    """
    from ase.io import iread

    include = set(include)
    stats = stats if stats is not None else Counter()
    path = Path(path)
    n = 0
    for i, atoms in enumerate(iread(str(path), index=":", format="extxyz")):
        where = f"{path.name}: frame {i}"
        info = dict(atoms.info)
        if "corrected_total_energy" not in info:
            raise StoreError(f"{where}: no 'corrected_total_energy' key; not an MPtrj extxyz")
        klass = classify(atoms)
        stats[klass] += 1
        if klass not in include:
            continue
        calc = atoms.calc
        res = dict(calc.results) if calc is not None else {}
        if "forces" not in res:
            raise StoreError(f"{where}: no forces")
        mp_id = str(info.get("mp_id", path.stem))
        if {"task_id", "calc_id", "ionic_step"} <= set(info):
            key = f"{info['task_id']}-{info['calc_id']}-{info['ionic_step']}"
        else:
            key = f"{path.stem}-{i}"
        extra: dict[str, Any] = {"mptrj_frame": key, "mptrj_class": klass}
        for k in _SCALAR_KEYS:
            if k in info:
                extra[k] = float(info[k])
        if "energy" in res:
            extra["uncorrected_total_energy"] = float(res["energy"])
        if "magmoms" in res:
            extra["magmoms"] = np.asarray(res["magmoms"], dtype=float)
        a = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        hard = Labels(float(info["corrected_total_energy"]), res["forces"], res.get("stress"))
        yield Frame(f"mptrj:{key}", a, mp_id, SOURCE, hard, extra)
        stats["selected"] += 1
        n += 1
        if limit is not None and n >= limit:
            return


def build_mptrj_store(
    src: str | Path,
    out: str | Path,
    *,
    include: Iterable[str] = ("organic",),
    limit: int | None = None,
) -> Counter:
    """Stream an MPtrj ``.json`` (or FFAST-style ``.extxyz``) into the store ``out``."""
    src = Path(src)
    if not src.is_file():
        raise StoreError(f"MPtrj file {src} does not exist")
    stats: Counter = Counter()
    reader = iter_mptrj_extxyz if src.suffix in {".extxyz", ".xyz"} else iter_mptrj_json
    store = FrameStore(out, create=True, description=f"MPtrj frames from {src.name}")
    stats["written"] = store.add_frames(reader(src, include=include, limit=limit, stats=stats))
    if not stats["selected"]:
        read = ", ".join(f"{stats[k]} {k}" for k in CLASSES if stats[k]) or "no frames"
        raise StoreError(
            f"no frame written to {out}: {src} holds {read}, none of the selected "
            f"class(es) {', '.join(include)}; choose classes with --include (e.g. "
            "--include organic,complex or --include inorganic)"
        )
    return stats


def figshare_file_record(
    name: str = MPTRJ_FILENAME,
    article: int = MPTRJ_FIGSHARE_ARTICLE,
    api_url: str | None = None,
) -> dict[str, Any]:
    """Look ``name`` up in a figshare article: {'download_url', 'size', 'computed_md5', ...}."""
    from kd_nnp.data.download import DownloadError, fetch_json

    url = api_url or FIGSHARE_API.format(article=article)
    record = fetch_json(url)
    for f in record.get("files", []):
        if f.get("name") == name:
            return f
    names = [f.get("name") for f in record.get("files", [])]
    raise DownloadError(f"figshare article {article} ({url}) has no file {name!r}; has {names}")


def download_mptrj(
    dest_dir: str | Path,
    *,
    name: str = MPTRJ_FILENAME,
    api_url: str | None = None,
    progress: bool = True,
) -> Path:
    """Download MPtrj from figshare (size and md5 taken from figshare's API and checked)."""
    from kd_nnp.data.download import download_file

    rec = figshare_file_record(name, api_url=api_url)
    return download_file(
        rec["download_url"],
        Path(dest_dir) / name,
        expected_size=rec.get("size"),
        md5=rec.get("computed_md5") or rec.get("supplied_md5") or None,
        progress=progress,
    )
