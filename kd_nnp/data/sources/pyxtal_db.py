"""The embedded default data: CSD organic crystals shipped in pyxtal's wheel.

``test.db`` holds 100 experimental crystals (16-304 atoms), ``mech.db`` 50. Rows carry
``csd_code`` (the group id), space group, SMILES etc. The stored cells are the
experimental (X-ray) ones: hydrogen positions are often poor (teacher forces of 10-120
eV/A), which is why :func:`kd_nnp.data.sources.perturb.prerelax` exists.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ase import Atoms

from kd_nnp.data.store import Frame, FrameStore, StoreError
from kd_nnp.utils.paths import pyxtal_db

_INFO_KEYS = ("space_group", "spg_num", "Z", "Zprime", "mol_smi", "mol_formula", "mol_name")


def _rows(db: str) -> list[Any]:
    from ase.db import connect

    if db not in {"test", "mech"}:
        raise StoreError(f"unknown pyxtal database {db!r}; choose 'test' or 'mech'")
    return list(connect(str(pyxtal_db(db))).select())


def _select(
    rows: list[Any],
    db: str,
    codes: Iterable[str] | None,
    max_atoms: int | None,
    limit: int | None,
) -> list[Any]:
    if codes is not None:
        codes = list(codes)
        by_code = {r.csd_code: r for r in rows}
        missing = [c for c in codes if c not in by_code]
        if missing:
            raise StoreError(
                f"pyxtal {db}.db has no csd_code {missing}; e.g. {sorted(by_code)[:5]}"
            )
        rows = [by_code[c] for c in codes]
    if max_atoms is not None:
        rows = [r for r in rows if r.natoms <= max_atoms]
    if limit is not None:
        rows = rows[:limit]
    return rows


def pyxtal_crystals(
    db: str = "test",
    codes: Iterable[str] | None = None,
    max_atoms: int | None = None,
    limit: int | None = None,
) -> list[tuple[str, Atoms]]:
    """``[(csd_code, atoms)]`` from pyxtal's ``test``/``mech`` database (file order)."""
    rows = _select(_rows(db), db, codes, max_atoms, limit)
    out = []
    for r in rows:
        atoms = r.toatoms()
        atoms.calc = None
        atoms.info = {k: r.get(k) for k in _INFO_KEYS if r.get(k) is not None}
        out.append((str(r.csd_code), atoms))
    return out


def pyxtal_frames(
    db: str = "test",
    codes: Iterable[str] | None = None,
    max_atoms: int | None = None,
    limit: int | None = None,
    *,
    skip_bad: bool = True,
    skipped: list[tuple[str, str]] | None = None,
) -> list[Frame]:
    """Unlabelled frames ``pyxtal-<db>:<csd_code>`` grouped by csd_code.

    Crystals failing :func:`kd_nnp.data.sanity.structure_issue` (H missing from the sites,
    disordered H written twice: 2 of test.db, 5 of mech.db) are left out and listed in ``skipped`` as
    ``(code, reason)``; ``skip_bad=False`` keeps them.
    """
    frames = []
    for code, atoms in checked_crystals(
        db, codes, max_atoms, limit, skip_bad=skip_bad, skipped=skipped
    ):
        info: dict[str, Any] = dict(atoms.info)
        atoms.info = {}
        frames.append(Frame(f"pyxtal-{db}:{code}", atoms, code, f"pyxtal_{db}", None, info))
    return frames


def checked_crystals(
    db: str = "test",
    codes: Iterable[str] | None = None,
    max_atoms: int | None = None,
    limit: int | None = None,
    *,
    skip_bad: bool = True,
    skipped: list[tuple[str, str]] | None = None,
) -> list[tuple[str, Atoms]]:
    """:func:`pyxtal_crystals` without repeated refcodes (the first is kept) and, with
    ``skip_bad``, without crystals failing :func:`kd_nnp.data.sanity.structure_issue`
    (appended to ``skipped`` as ``(code, reason)``)."""
    from kd_nnp.data.sanity import structure_issue

    out = []
    seen: set[str] = set()
    skipped = skipped if skipped is not None else []
    for code, atoms in pyxtal_crystals(db, codes, max_atoms, limit):
        if code in seen:  # same refcode twice in a database: keep the first
            continue
        seen.add(code)
        if skip_bad:
            issue = structure_issue(atoms, formula=atoms.info.get("mol_formula"))
            if issue:
                skipped.append((code, issue))
                continue
        out.append((code, atoms))
    return out


def build_pyxtal_store(
    out: str,
    db: str = "test",
    codes: Iterable[str] | None = None,
    max_atoms: int | None = None,
    limit: int | None = None,
) -> tuple[int, list[tuple[str, str]]]:
    """Write the crystals into store ``out``; returns (frames kept, skipped (code, reason))."""
    import logging

    from kd_nnp.data.classify import ScopeWatch

    skipped: list[tuple[str, str]] = []
    frames = pyxtal_frames(db, codes, max_atoms, limit, skipped=skipped)
    if not frames:
        why = "; ".join(f"{c}: {w}" for c, w in skipped[:3]) or "no crystal matched"
        raise StoreError(
            f"no frame written to {out}: pyxtal {db}.db gave no usable crystal "
            f"(codes={list(codes) if codes else 'all'}, max_atoms={max_atoms}; {why})"
        )
    scope = ScopeWatch()
    store = FrameStore(out, create=True, description=f"pyxtal {db}.db crystals")
    store.add_frames(scope.watch(frames))
    scope.warn(logging.getLogger(__name__), f"pyxtal {db}.db")
    return len(frames), skipped
