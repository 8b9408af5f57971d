"""Frames from structure files: extxyz/xyz, ASE .traj, ASE .db, CIF, and folders of them.

Labels attached to the atoms (a SinglePointCalculator, as ASE's readers give) become hard
labels. The store is periodic-only: gas-phase frames (not fully periodic, or one molecule in
a mostly empty box, detected by number density) are *reported and skipped*, never stored.
Frame ids are ``<source>:<file stem>/<index>`` (CIFs with one block: ``<source>:<stem>``);
the group id is the file stem (one trajectory or crystal per file; ``<source>:<stem>`` when
the stem is a number such as a COD id, which ASE's database cannot hold as a string).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms

from kd_nnp.data.store import Frame, FrameStore, Labels, StoreError

SUFFIXES = {".extxyz", ".xyz", ".traj", ".db", ".cif"}
# Molecular crystals hold ~0.05-0.15 atoms/A^3; one molecule in a 25 A box ~0.0002.
GAS_MAX_DENSITY = 0.02


log = logging.getLogger(__name__)


@dataclass
class ReadReport:
    """What a reader kept and what it skipped (``(file, index, reason)``)."""

    n_read: int = 0
    n_kept: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"read {self.n_read} frames, kept {self.n_kept}, skipped {len(self.skipped)}"]
        reasons: dict[str, int] = {}
        for _, _, why in self.skipped:
            key = why.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        lines += [f"  skipped ({n}): {why}" for why, n in sorted(reasons.items())]
        return "\n".join(lines)


def gas_phase_reason(atoms: Atoms, max_density: float = GAS_MAX_DENSITY) -> str | None:
    """Why ``atoms`` is not a periodic crystal frame, or None if it is one."""
    if not np.all(atoms.pbc):
        return f"gas-phase: not periodic in all directions (pbc={atoms.pbc.tolist()})"
    vol = abs(atoms.cell.volume)
    if vol < 1e-6:
        return "gas-phase: no cell"
    density = len(atoms) / vol
    if density < max_density:
        return (
            f"gas-phase: {density:.4f} atoms/A^3 < {max_density} "
            "(isolated molecule in a vacuum box)"
        )
    return None


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files in ``paths``, folders expanded recursively (sorted, known suffixes only)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise StoreError(f"input {p} does not exist")
    return out


def _read_all(path: Path) -> list[tuple[str, Atoms]]:
    """(index label, atoms) for every frame of ``path``; errors name the file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".db":
            from ase.db import connect

            out = []
            for row in connect(str(path)).select():
                label = str(row.id)
                atoms = row.toatoms(attach_calculator=False)
                _attach_row_labels(atoms, row)
                out.append((label, atoms))
            return out
        from ase.io import read

        fmt = {".xyz": "extxyz", ".extxyz": "extxyz", ".traj": "traj", ".cif": "cif"}.get(suffix)
        if fmt is None:
            raise StoreError(f"{path}: unsupported file type {suffix!r} (have {sorted(SUFFIXES)})")
        frames = read(str(path), index=":", format=fmt)
        if not frames:
            raise StoreError(f"{path}: no structure in the file")
        return [(str(i), a) for i, a in enumerate(frames)]
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader error becomes a named, clear error
        raise StoreError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc


def _attach_row_labels(atoms: Atoms, row: object) -> None:
    lab = Labels(row.get("energy"), row.get("forces"), row.get("stress"))  # type: ignore[attr-defined]
    lab.attach(atoms)


def _db_safe(value: object) -> object:
    """ASE db rejects str values that parse as numbers: store those as numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# keys the store sets itself (kd_nnp.data.store) and may not come from a file's info
STORE_KEYS = {"frame_id", "group_id", "source", "status", "error"}


def info_key(key: str) -> str:
    """A key-value name ASE's database accepts for an ``atoms.info`` key.

    ASE db refuses its reserved keys (``ase.db.core.reserved_keys``: ``energy``,
    ``free_energy``, ``stress``, ``forces``, element symbols, ...) and names that are not
    words; the X23 ``.traj`` files carry ``energy``/``free_energy`` in ``atoms.info``. Such
    keys get the prefix ``info_`` (``info_energy``), other non-word characters become ``_``.
    The labels themselves come from the attached calculator (:func:`labels_of`), never from
    these copies.
    """
    import re

    from ase.db.core import reserved_keys, word

    k = key if word.match(key) else re.sub(r"\W", "_", key)
    if not word.match(k) or k in reserved_keys or k in STORE_KEYS:
        k = f"info_{k}"
    return k


def info_key_values(info: dict) -> dict[str, object]:
    """Scalar ``atoms.info`` entries as store-safe key-value pairs (see :func:`info_key`)."""
    out: dict[str, object] = {}
    for k, v in info.items():
        if isinstance(v, (bool, np.bool_)):
            v = bool(v)
        elif isinstance(v, (np.integer, np.floating)):
            v = v.item()
        if not isinstance(v, (int, float, str)):
            continue  # arrays (e.g. X23's 3x3 info stress), None, objects: not key-value pairs
        out[info_key(str(k))] = _db_safe(v)
    return out


def labels_of(atoms: Atoms) -> Labels | None:
    calc = atoms.calc
    if calc is None or not getattr(calc, "results", None):
        return None
    res = calc.results
    lab = Labels(res.get("energy"), res.get("forces"), res.get("stress"))
    return None if lab.empty else lab


def iter_files(
    paths: Iterable[str | Path],
    *,
    source_name: str = "files",
    report: ReadReport | None = None,
    max_density: float = GAS_MAX_DENSITY,
) -> Iterator[Frame]:
    """Frames from files/folders; gas-phase and unreadable CIFs are skipped into ``report``."""
    report = report if report is not None else ReadReport()
    for path in expand_paths(paths):
        is_cif = path.suffix.lower() == ".cif"
        try:
            frames = _read_all(path)
        except StoreError as exc:
            if is_cif:  # a folder of CIFs: one broken file must not stop the rest
                report.skipped.append((str(path), "-", f"unreadable: {exc}"))
                continue
            raise
        single = len(frames) == 1 and is_cif
        for label, atoms in frames:
            report.n_read += 1
            why = gas_phase_reason(atoms, max_density)
            if why:
                report.skipped.append((str(path), label, why))
                continue
            hard = labels_of(atoms)
            info = info_key_values(atoms.info)
            clean = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
            fid = f"{source_name}:{path.stem}" + ("" if single else f"/{label}")
            # ASE db refuses strings that look like numbers (e.g. COD ids as file names)
            group = path.stem if _db_safe(path.stem) == path.stem else f"{source_name}:{path.stem}"
            frame = Frame(fid, clean, group, source_name, hard, info)
            try:
                frame.validate()
            except StoreError as exc:
                raise StoreError(f"{path} frame {label}: {exc}") from exc
            report.n_kept += 1
            yield frame


def build_files_store(
    paths: Iterable[str | Path], out: str | Path, *, source_name: str = "files"
) -> ReadReport:
    """Write the frames of ``paths`` into store ``out``. Raises :class:`StoreError` when no
    frame is kept (saying why), and warns about frames outside the organic scope."""
    from kd_nnp.data.classify import ScopeWatch

    paths = list(paths)
    report = ReadReport()
    scope = ScopeWatch()
    store = FrameStore(out, create=True, description="frames from files")
    store.add_frames(scope.watch(iter_files(paths, source_name=source_name, report=report)))
    scope.warn(log, f"files {', '.join(map(str, paths))}")
    if report.n_kept == 0:
        why = "; ".join(f"{f} [{i}]: {w}" for f, i, w in report.skipped[:3]) or "no frames"
        raise StoreError(
            f"no frame written to {out}: read {report.n_read} frame(s) from "
            f"{', '.join(map(str, paths))}, kept none ({why})"
        )
    return report
