"""The frames store: one directory, ASE SQLite databases inside.

Layout::

    STORE/
      frames.db              # ASE database: one row per frame (atoms + hard/DFT labels)
      labels/<name>.db       # ASE database per teacher label set (soft labels), same frame ids
      labels/shards/<name>/<k>-of-<n>.db  # shards of a label set (``kd-nnp label shard=K/N``)
      store.json             # format version and a free-form description

Why ASE databases (see docs/data.md): every user can open them with ``ase db``,
``ase.io.read('frames.db@:')`` or sqlite3; SQLite transactions make each batch of writes
atomic, so a reader never sees half a frame and a killed writer loses at most the open
batch; labels of several teachers coexist as separate files that never lock each other.

Conventions (tested):
- energies are *total* energies in eV (per-atom values are derived when needed);
- forces in eV/A, shape (N, 3);
- stress in ASE's convention: Voigt order (xx, yy, zz, yz, xz, xy), eV/A^3,
  sigma = (1/V) dE/d(strain), i.e. negative when the cell wants to expand.

Each frame row carries the key-value pairs ``frame_id`` (unique, stable), ``group_id``
(material/trajectory, used for grouped splits), ``source`` and any scalar ``info``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from kd_nnp.errors import KdNnpError

STORE_FORMAT_VERSION = 1
_RESERVED = {"frame_id", "group_id", "source", "status", "error"}


class StoreError(KdNnpError, RuntimeError):
    """A store is missing, malformed, or an input frame is invalid."""


@dataclass
class Labels:
    """Energy (eV, total), forces (eV/A, (N,3)) and stress (ASE Voigt, eV/A^3); any may be None."""

    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.forces is not None:
            self.forces = np.asarray(self.forces, dtype=float)
        if self.stress is not None:
            s = np.asarray(self.stress, dtype=float)
            if s.shape == (3, 3):
                s = s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
            if s.shape != (6,):
                raise StoreError(f"stress must be Voigt (6,) or (3,3), got shape {s.shape}")
            self.stress = s
        if self.energy is not None:
            self.energy = float(self.energy)

    @property
    def empty(self) -> bool:
        return self.energy is None and self.forces is None and self.stress is None

    def validate(self, n_atoms: int, where: str) -> None:
        """Raise :class:`StoreError` naming ``where`` if shapes or values are wrong."""
        if self.energy is not None and not np.isfinite(self.energy):
            raise StoreError(f"{where}: energy is not finite ({self.energy})")
        if self.forces is not None:
            if self.forces.shape != (n_atoms, 3):
                raise StoreError(
                    f"{where}: forces have shape {self.forces.shape}, expected ({n_atoms}, 3)"
                )
            if not np.all(np.isfinite(self.forces)):
                raise StoreError(f"{where}: forces contain non-finite values")
        if self.stress is not None and not np.all(np.isfinite(self.stress)):
            raise StoreError(f"{where}: stress contains non-finite values")

    @classmethod
    def from_row(cls, row: Any) -> Labels:
        return cls(
            energy=row.get("energy"),
            forces=row.get("forces"),
            stress=row.get("stress"),
        )

    def attach(self, atoms: Atoms) -> Atoms:
        """Attach as a SinglePointCalculator (so ASE stores them in its native columns)."""
        results: dict[str, Any] = {}
        if self.energy is not None:
            results["energy"] = self.energy
        if self.forces is not None:
            results["forces"] = self.forces
        if self.stress is not None:
            results["stress"] = self.stress
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        else:
            atoms.calc = None
        return atoms


@dataclass
class Frame:
    """One labelled configuration."""

    frame_id: str
    atoms: Atoms
    group_id: str
    source: str
    hard: Labels | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        return len(self.atoms)

    def validate(self) -> None:
        where = f"frame {self.frame_id!r} (source {self.source!r})"
        if not self.frame_id or not isinstance(self.frame_id, str):
            raise StoreError(f"{where}: frame_id must be a non-empty string")
        if len(self.atoms) == 0:
            raise StoreError(f"{where}: no atoms")
        if not np.all(self.atoms.pbc):
            raise StoreError(f"{where}: kd_nnp frames are periodic crystals (pbc must be True)")
        if abs(self.atoms.cell.volume) < 1e-6:
            raise StoreError(f"{where}: cell volume is zero")
        if not np.all(np.isfinite(self.atoms.positions)):
            raise StoreError(f"{where}: non-finite positions")
        if self.hard is not None:
            self.hard.validate(len(self.atoms), where + " hard labels")


def _split_info(info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scalars go to ASE key-value pairs (queryable), everything else to row data."""
    kvp, data = {}, {}
    for key, val in info.items():
        if key in _RESERVED:
            raise StoreError(f"info key {key!r} is reserved")
        if isinstance(val, (bool, np.bool_)):
            kvp[key] = bool(val)
        elif isinstance(val, (int, float, str, np.integer, np.floating)) and not (
            isinstance(val, float) and not np.isfinite(val)
        ):
            kvp[key] = val.item() if isinstance(val, np.generic) else val
        else:
            data[key] = val
    return kvp, data


def _frame_ids(db_path: Path) -> dict[str, int]:
    """frame_id -> ASE row id, read straight from SQLite (fast for millions of rows)."""
    if not db_path.exists():
        return {}
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        try:
            rows = con.execute(
                "SELECT value, id FROM text_key_values WHERE key='frame_id'"
            ).fetchall()
        except sqlite3.OperationalError:  # empty database, tables not created yet
            return {}
    finally:
        con.close()
    return {v: i for v, i in rows}


class FrameStore:
    """A directory holding ``frames.db`` and per-teacher ``labels/*.db``."""

    def __init__(self, root: str | Path, *, create: bool = False, description: str = "") -> None:
        self.root = Path(root)
        meta = self.root / "store.json"
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "labels").mkdir(exist_ok=True)
            if not meta.exists():
                meta.write_text(
                    json.dumps(
                        {
                            "format": "kd_nnp-store",
                            "version": STORE_FORMAT_VERSION,
                            "description": description,
                        },
                        indent=2,
                    )
                )
        elif not meta.is_file():
            raise StoreError(
                f"{self.root} is not a kd_nnp frames store (no store.json); "
                "build one with `kd-nnp data ...`"
            )
        self._ids: dict[str, int] | None = None

    # ------------------------------------------------------------------ frames
    @property
    def frames_path(self) -> Path:
        return self.root / "frames.db"

    def _db(self, path: Path) -> Any:
        from ase.db import connect

        return connect(str(path), type="db", append=True)

    def frame_ids(self) -> list[str]:
        """All frame ids in insertion order."""
        ids = _frame_ids(self.frames_path)
        return [k for k, _ in sorted(ids.items(), key=lambda kv: kv[1])]

    def __len__(self) -> int:
        return len(_frame_ids(self.frames_path))

    def __contains__(self, frame_id: str) -> bool:
        return frame_id in self._id_map()

    def _id_map(self, refresh: bool = False) -> dict[str, int]:
        if self._ids is None or refresh:
            self._ids = _frame_ids(self.frames_path)
        return self._ids

    def add_frames(self, frames: Iterable[Frame], *, batch_size: int = 256) -> int:
        """Append frames; ids already present are skipped (idempotent, resumable).

        Each batch is one SQLite transaction. Returns the number of frames written.
        """
        existing = set(self._id_map(refresh=True))
        written = 0
        db = self._db(self.frames_path)
        batch: list[Frame] = []

        def flush() -> None:
            nonlocal written
            if not batch:
                return
            with db:
                for fr in batch:
                    kvp, data = _split_info(fr.info)
                    atoms = fr.atoms.copy()
                    (fr.hard or Labels()).attach(atoms)
                    db.write(
                        atoms,
                        key_value_pairs=dict(
                            kvp, frame_id=fr.frame_id, group_id=str(fr.group_id), source=fr.source
                        ),
                        data={"info": data} if data else None,
                    )
            written += len(batch)
            batch.clear()

        for fr in frames:
            fr.validate()
            if fr.frame_id in existing:
                continue
            existing.add(fr.frame_id)
            batch.append(fr)
            if len(batch) >= batch_size:
                flush()
        flush()
        self._ids = None
        return written

    @staticmethod
    def _row_to_frame(row: Any) -> Frame:
        kvp = dict(row.key_value_pairs)
        frame_id = kvp.pop("frame_id")
        group_id = kvp.pop("group_id", frame_id)
        source = kvp.pop("source", "unknown")
        info = dict(kvp)
        data = row.get("data") or {}
        info.update(data.get("info", {}))
        atoms = row.toatoms()
        hard = Labels.from_row(row)
        atoms.calc = None
        return Frame(frame_id, atoms, group_id, source, None if hard.empty else hard, info)

    def iter_frames(self, frame_ids: Iterable[str] | None = None) -> Iterator[Frame]:
        """Stream frames (all, in insertion order, or the given ids in that order)."""
        db = self._db(self.frames_path)
        if frame_ids is None:
            for row in db.select():
                yield self._row_to_frame(row)
            return
        idmap = self._id_map()
        for fid in frame_ids:
            if fid not in idmap:
                raise StoreError(f"{self.frames_path}: no frame with frame_id={fid!r}")
            yield self._row_to_frame(db.get(id=idmap[fid]))

    def get(self, frame_id: str) -> Frame:
        return next(self.iter_frames([frame_id]))

    # ------------------------------------------------------------------ labels
    def label_names(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "labels").glob("*.db"))

    def labels(self, name: str, *, create: bool = False) -> LabelSet:
        path = self.root / "labels" / f"{name}.db"
        if not create and not path.exists():
            raise StoreError(
                f"{self.root}: no label set {name!r} (have: {self.label_names() or 'none'}); "
                f"run `kd-nnp label store={self.root} teacher={name}`"
            )
        return LabelSet(path, name)

    # ------------------------------------------------------------ label shards
    def shard_dir(self, name: str) -> Path:
        """``labels/shards/<name>/``: the shard files of label set ``name`` (outside
        ``labels/*.db``, so a shard is never taken for a label set)."""
        return self.root / "labels" / "shards" / name

    def label_shard(self, name: str, k: int, n: int) -> LabelSet:
        """Shard ``k`` of ``n`` of label set ``name``: ``labels/shards/<name>/<k>-of-<n>.db``,
        written by ``kd-nnp label ... shard=K/N`` alone (one process per file)."""
        return LabelSet(self.shard_dir(name) / f"{int(k)}-of-{int(n)}.db", name)

    def label_shards(self, name: str) -> dict[tuple[int, int], LabelSet]:
        """``(k, n)`` -> shard of label set ``name`` for every shard file there is; a file
        there that is not ``<k>-of-<n>.db`` raises :class:`StoreError` naming it."""
        out: dict[tuple[int, int], LabelSet] = {}
        for path in sorted(self.shard_dir(name).glob("*.db")):
            m = _SHARD_FILE.fullmatch(path.name)
            if m is None or not 0 <= int(m.group(1)) < int(m.group(2)):
                raise StoreError(f"{path}: not a shard file (<k>-of-<n>.db with 0 <= k < n)")
            out[(int(m.group(1)), int(m.group(2)))] = LabelSet(path, name)
        return out


_SHARD_FILE = re.compile(r"(\d+)-of-(\d+)\.db")


class LabelSet:
    """Soft labels of one teacher for frames of a store (``labels/<name>.db``).

    Rows hold the frame's atoms with the teacher's results as a SinglePointCalculator, so
    ``ase.io.read('labels/so3lr.db@:')`` is a complete teacher-labelled dataset: every row
    has energy, forces and stress. Keys: ``frame_id``, ``status`` ('ok'), ``seconds``.
    Frames the teacher failed on are kept aside in the SQLite table ``kd_nnp_failures``
    (frame_id, error, seconds) of the same file, which ASE does not read; a later success
    (``retry_failed``) deletes the failure in the same transaction.
    Provenance (teacher name, version, settings, hash) lives in the database metadata.
    """

    FAILURES_TABLE = "kd_nnp_failures"

    def __init__(self, path: Path, name: str) -> None:
        self.path = Path(path)
        self.name = name

    def _db(self) -> Any:
        from ase.db import connect

        return connect(str(self.path), type="db", append=True)

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Hold the label set for one writer (``labels/<name>.lock``, an OS file lock that
        dies with its process: a killed run never leaves the set locked). A second writer
        is refused at once with :class:`StoreError` naming the holder's pid."""
        lock_path = self.path.with_suffix(".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise StoreError(
                    f"label set {self.name!r} ({self.path}) is being labelled by another "
                    f"process (pid {holder}); wait for it to finish (or stop it), or give one "
                    "run more workers (workers=N)"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    @property
    def provenance(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        return dict(self._db().metadata)

    def check_provenance(self, prov: dict[str, Any]) -> None:
        """Refuse (:class:`StoreError`) labels of a teacher whose provenance hash differs
        from the one this label set was made with."""
        old = self.provenance
        if old.get("hash") and prov.get("hash") and old["hash"] != prov["hash"]:
            raise StoreError(
                f"{self.path}: label set was made with other teacher settings "
                f"(hash {old['hash']} vs {prov['hash']}); use another label-set name"
            )

    def set_provenance(self, prov: dict[str, Any]) -> None:
        self.check_provenance(prov)
        self._db().metadata = prov

    def _failure_rows(self) -> list[tuple[str, str]]:
        if not self.path.exists():
            return []
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            return con.execute(
                f"SELECT frame_id, error FROM {self.FAILURES_TABLE} ORDER BY rowid"
            ).fetchall()
        except sqlite3.OperationalError:  # no failure yet
            return []
        finally:
            con.close()

    def status(self) -> dict[str, str]:
        """frame_id -> 'ok' | 'failed' for every frame already processed."""
        if not self.path.exists():
            return {}
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT a.value, b.value FROM text_key_values a JOIN text_key_values b "
                "ON a.id = b.id WHERE a.key='frame_id' AND b.key='status' ORDER BY a.id"
            ).fetchall()
        except sqlite3.OperationalError:
            rows = []
        finally:
            con.close()
        out: dict[str, str] = {}
        for fid, st in rows:
            if out.get(fid) != "ok":  # an ok row wins over an earlier failure
                out[fid] = st
        for fid, _ in self._failure_rows():
            out.setdefault(fid, "failed")
        return out

    def write(self, results: Iterable[tuple[Frame, Labels | None, str | None, float]]) -> int:
        """Write (frame, labels, error, seconds) tuples in one transaction.

        ``labels=None`` with an ``error`` records a failure (aside, in
        :attr:`FAILURES_TABLE`; no row ASE would read without labels). Labels with
        non-finite numbers are turned into failures here. A success deletes the frame's
        earlier failure.
        """
        db = self._db()
        n = 0
        with db:
            con = db.connection
            con.execute(
                f"CREATE TABLE IF NOT EXISTS {self.FAILURES_TABLE} "
                "(frame_id TEXT PRIMARY KEY, error TEXT, seconds REAL)"
            )
            for frame, labels, error, seconds in results:
                atoms = frame.atoms.copy()
                if labels is not None and error is None:
                    try:
                        labels.validate(len(atoms), f"teacher {self.name} on {frame.frame_id}")
                    except StoreError as exc:
                        labels, error = None, str(exc)
                if labels is None or error is not None:
                    con.execute(
                        f"INSERT OR REPLACE INTO {self.FAILURES_TABLE} VALUES (?, ?, ?)",
                        (frame.frame_id, (error or "no labels")[:2000], float(seconds)),
                    )
                else:
                    labels.attach(atoms)
                    db.write(
                        atoms,
                        key_value_pairs={
                            "frame_id": frame.frame_id,
                            "status": "ok",
                            "seconds": float(seconds),
                        },
                    )
                    con.execute(
                        f"DELETE FROM {self.FAILURES_TABLE} WHERE frame_id = ?", (frame.frame_id,)
                    )
                n += 1
        return n

    def load(self, frame_ids: Iterable[str] | None = None) -> dict[str, Labels]:
        """frame_id -> Labels for successfully labelled frames (latest row wins)."""
        if not self.path.exists():
            return {}
        wanted = None if frame_ids is None else set(frame_ids)
        out: dict[str, Labels] = {}
        for row in self._db().select(status="ok"):
            fid = row.get("frame_id")
            if wanted is None or fid in wanted:
                out[fid] = Labels.from_row(row)
        return out

    def failures(self) -> dict[str, str]:
        """frame_id -> error of frames that failed and have no label since."""
        ok = {k for k, v in self.status().items() if v == "ok"}
        return {fid: err for fid, err in self._failure_rows() if fid not in ok}


def label_set_name(teacher: str) -> str:
    """Default label-set name of a teacher spec: ``so3lr`` -> ``so3lr``,
    ``mace.calculators:mace_off`` -> ``mace_calculators_mace_off`` (a plain file name).

    Every writer of labels uses it (``kd-nnp label`` unless ``name=`` is given, ``data
    generate``, ``data molecules``) and training (``data.label_set: ${teacher.name}``) looks the
    set up through :func:`kd_nnp.teachers.label.resolve_label_set`, so all agree for
    ``module:factory`` teachers.
    """
    return str(teacher).replace(":", "_").replace(".", "_")


def check_recipe(
    dest: FrameStore, file_name: str, recipe: dict[str, Any], verb: str, *, own_store: bool = True
) -> None:
    """A store written by a source verb (``perturb``, ``generate``) holds one recipe, recorded in
    ``dest/file_name`` at its first run: the same recipe resumes, another one is refused with
    the keys that differ (``settings`` flattened), frames the verb did not write are refused
    unless ``own_store`` is False (a verb that adds frames to an existing store: ``molecules``)."""
    path = dest.root / file_name
    if not path.is_file():
        if own_store and len(dest):
            raise StoreError(
                f"{dest.root} already holds {len(dest)} frames that `kd-nnp data {verb}` did "
                f"not write with a recorded recipe; write to a new --out store"
            )
        path.write_text(json.dumps(recipe, indent=2))
        return
    old = json.loads(path.read_text())
    if old == recipe:
        return

    def flat(r: dict[str, Any]) -> dict[str, Any]:
        return dict(r.get("settings", {}), **{k: v for k, v in r.items() if k != "settings"})

    a, b = flat(old), flat(recipe)
    diff = [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    raise StoreError(
        f"{dest.root} was built with another {verb} recipe ({'; '.join(diff)}); rerun with "
        f"the recorded settings ({path}) to resume, or write to a new --out store"
    )
