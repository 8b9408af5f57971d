"""COD: download CIFs by id (``<base_url>/<id>.cif``), resumable, with a report CSV.

Each id ends in one status: ``ok`` (downloaded and usable), ``exists`` (already on disk and
usable: not downloaded again), ``failed_download`` or ``failed_parse`` (unparsable, disordered
(partial occupancies), missing H, ...). Failures are reported, never fatal; unusable files
are renamed ``OUT/<id>.cif.rejected`` (ignored by ``kd-nnp data files``) so a rerun does not fetch them again unless ``retry=True``.
"""

from __future__ import annotations

import csv
import re
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kd_nnp.data.store import StoreError

COD_BASE_URL = "https://www.crystallography.net/cod/"
REPORT_FIELDS = ("cod_id", "status", "n_atoms", "formula", "message")


@dataclass
class CodResult:
    cod_id: str
    status: str
    n_atoms: int | None = None
    formula: str = ""
    message: str = ""


def read_cod_ids(path: str | Path) -> list[str]:
    """Ids from a CSV with a ``COD_ID``-like column (or a plain list, one id per line)."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"COD id list {path} does not exist")
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise StoreError(f"{path}: empty id list")
    header = [h.strip().lower() for h in rows[0]]
    col = next((k for k, h in enumerate(header) if h in {"cod_id", "codid", "cod", "id"}), None)
    body = rows[1:] if col is not None else rows
    col = 0 if col is None else col
    ids = []
    for lineno, row in enumerate(body, start=2 if body is not rows else 1):
        if not row or not "".join(row).strip():
            continue
        val = row[col].strip() if col < len(row) else ""
        if not re.fullmatch(r"\d{7}", val):
            raise StoreError(f"{path} line {lineno}: {val!r} is not a 7-digit COD id")
        ids.append(val)
    return ids


def check_cif(path: Path) -> tuple[int, str]:
    """(n_atoms, formula) of a usable ordered organic CIF; raises ValueError with the reason."""
    import warnings

    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifParser

    from kd_nnp.data.sanity import structure_issue

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            parser = CifParser(str(path))
            structures = parser.parse_structures(primitive=False)
        except Exception as exc:  # noqa: BLE001 - any parser error is a reported reason
            raise ValueError(f"cannot parse CIF ({type(exc).__name__}: {exc})") from exc
    if not structures:
        raise ValueError("no structure in CIF")
    s = structures[0]
    if not s.is_ordered:
        raise ValueError("disorder: partial occupancies")
    formula = None
    for block in parser.as_dict().values():
        formula = block.get("_chemical_formula_sum") or formula
    atoms = AseAtomsAdaptor.get_atoms(s)
    issue = structure_issue(atoms, formula=formula if isinstance(formula, str) else None)
    if issue:
        raise ValueError(issue)
    return len(atoms), atoms.get_chemical_formula()


def _fetch(url: str, dest: Path, timeout: float) -> None:
    part = dest.with_name(dest.name + ".part")
    req = urllib.request.Request(url, headers={"User-Agent": "kd_nnp"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
        part.write_bytes(resp.read())
    part.replace(dest)


def download_cod(
    ids: Iterable[str],
    out_dir: str | Path,
    *,
    base_url: str = COD_BASE_URL,
    timeout: float = 60,
    retry: bool = False,
    report_path: str | Path | None = None,
    progress: bool = True,
) -> list[CodResult]:
    """Download and vet CIFs; write ``report_path`` (default ``OUT/cod_report.csv``)."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = base_url if base_url.endswith("/") else base_url + "/"
    results: list[CodResult] = []
    for cod_id in tqdm(list(ids), desc="COD", disable=not progress):
        dest = out / f"{cod_id}.cif"
        rejected = out / f"{cod_id}.cif.rejected"
        existed = dest.exists()
        if rejected.exists() and not retry:
            try:
                check_cif(rejected)
                rejected.replace(dest)
                existed = True
            except ValueError as exc:
                results.append(CodResult(cod_id, "failed_parse", message=f"(cached) {exc}"))
                continue
        if not existed:
            try:
                _fetch(f"{base}{cod_id}.cif", dest, timeout)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                results.append(CodResult(cod_id, "failed_download", message=str(exc)))
                continue
        try:
            n, formula = check_cif(dest)
        except ValueError as exc:
            dest.replace(rejected)
            results.append(CodResult(cod_id, "failed_parse", message=str(exc)))
            continue
        results.append(CodResult(cod_id, "exists" if existed else "ok", n, formula))
    report = Path(report_path) if report_path else out / "cod_report.csv"
    with open(report, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(REPORT_FIELDS)
        for r in results:
            w.writerow(
                [r.cod_id, r.status, "" if r.n_atoms is None else r.n_atoms, r.formula, r.message]
            )
    return results
