"""One runner for benchmark jobs (relaxation, elastic): every (calculator, structure) pair is a
job whose result streams to a JSON-lines file as one record.

A record is reused on the next run only when it was computed by the same calculator (its
*fingerprint*: the spec, plus the model file's content hash for ``student:PATH``, so a student
retrained at the same path is computed again) with the same settings; everything else is
recomputed and the latest record of a pair wins. Jobs run in worker processes (one thread
each, see :func:`kd_nnp.utils.parallel.run_tasks`); every calculator is built once in the
parent first, so a spec that cannot be built is an error before any job starts. Baselines
shared by the jobs of a sweep live in a cache folder under a file lock (:func:`shared_cache`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ase import Atoms
from ase.calculators.calculator import Calculator

from kd_nnp.errors import KdNnpError
from kd_nnp.teachers.calculators import (
    check_spec,
    make_calculator,
    spec_fingerprint,
    unique_labels,
)
from kd_nnp.utils.jsonl import open_append, read_jsonl
from kd_nnp.utils.parallel import TaskResult, run_tasks

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ calculators
def label_calculators(calculators: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    """``{label: spec}``; a list of specs is labelled by
    :func:`kd_nnp.teachers.calculators.unique_labels` (two specs with one label would share,
    i.e. merge or drop, results: a :class:`KdNnpError` naming both)."""
    if isinstance(calculators, Mapping):
        return {str(k): str(v) for k, v in calculators.items()}
    return {label: spec for spec, label in unique_labels(calculators).items()}


_CALCS: dict[str, Calculator] = {}


def get_calc(spec: str, fingerprint: str | None = None) -> Calculator:
    """The calculator of ``spec``, built once per process and :func:`spec_fingerprint` (a
    student file rewritten at the same path is loaded again)."""
    key = fingerprint or spec_fingerprint(spec)
    if key not in _CALCS:
        _CALCS[key] = make_calculator(spec)
    return _CALCS[key]


def check_calculators(calculators: Mapping[str, str], *, keep: bool) -> None:
    """Build every calculator now (in this process): a spec that cannot be built is a
    :class:`KdNnpError` naming it. ``keep`` keeps them for jobs run in this process."""
    for label, spec in calculators.items():
        check_spec(spec)  # cheap checks first: a missing file or unknown name, said plainly
        try:
            calc = get_calc(spec, spec_fingerprint(spec)) if keep else make_calculator(spec)
        except KdNnpError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to build is the user's spec
            msg = str(exc).splitlines()[0] if str(exc) else ""
            raise KdNnpError(
                f"calculator {label!r} ({spec!r}) cannot be built: {type(exc).__name__}: {msg}"
            ) from exc
        del calc


def _json_plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def is_done(rec: dict[str, Any], fingerprints: dict[str, str], settings: dict[str, Any]) -> bool:
    """Whether a record on disk holds the result of this calculator with these settings."""
    fp = fingerprints.get(rec.get("method", ""))
    if fp is None or rec.get("spec_fingerprint", rec.get("spec")) != fp:
        return False
    return rec.get("settings", settings) == settings


# ------------------------------------------------------------------ JSON lines
def atoms_to_dict(atoms: Atoms) -> dict[str, Any]:
    return {
        "numbers": atoms.numbers.tolist(),
        "positions": atoms.positions.tolist(),
        "cell": atoms.cell.array.tolist(),
    }


def atoms_from_dict(d: dict[str, Any]) -> Atoms:
    return Atoms(numbers=d["numbers"], positions=d["positions"], cell=d["cell"], pbc=True)


# ------------------------------------------------------------------ the runner
@dataclass
class Structure:
    """One structure of a benchmark: ``meta`` goes into each of its records."""

    id: str
    atoms: Atoms
    meta: dict[str, Any]


def run_jobs(
    task: Callable[[dict[str, Any]], dict[str, Any]],
    calculators: Mapping[str, str],
    structures: Sequence[Structure],
    path: Path,
    settings: dict[str, Any],
    *,
    payload: dict[str, Any] | None = None,
    workers: int = 1,
    progress: bool = True,
    desc: str = "jobs",
    run: bool = True,
    executor: Callable[[list[tuple[Any, dict[str, Any]]]], Iterator[TaskResult]] | None = None,
) -> list[dict[str, Any]]:
    """Run ``task({"spec", "atoms", "settings", **payload})`` for every (calculator,
    structure) pair without a reusable record in ``path``; return the reusable and new
    records (with ``run=False`` every record on disk, nothing computed).

    ``executor(jobs)`` (default: ``task`` in ``workers`` processes,
    :func:`~kd_nnp.utils.parallel.run_tasks`) runs the ``(key, item)`` jobs and yields a
    :class:`~kd_nnp.utils.parallel.TaskResult` per job as it finishes (the batched
    relaxation backend). A worker's exception becomes a record with ``status == "error"``
    (never dropped)."""
    settings = _json_plain(settings)
    fingerprints = {label: spec_fingerprint(spec) for label, spec in calculators.items()}
    on_disk = read_jsonl(path)
    records = [r for r in on_disk if not run or is_done(r, fingerprints, settings)]
    stale = len(on_disk) - len(records)
    if stale:
        log.info("%d results in %s are from other calculators/settings: recomputed", stale, path)
    done = {(r["method"], r["id"]) for r in records}
    jobs = []
    for label, spec in calculators.items() if run else ():
        for s in structures:
            if (label, s.id) in done:
                continue
            item = {
                "spec": spec,
                "fingerprint": fingerprints[label],
                "atoms": atoms_to_dict(s.atoms),
                "settings": settings,
                **(payload or {}),
            }
            jobs.append(((label, spec, s.id, len(s.atoms), s.meta), item))
    if records and jobs:
        log.info("resuming: %d results already in %s, %d to run", len(records), path, len(jobs))
    if jobs:
        check_calculators(
            {k[0]: k[1] for k, _ in jobs}, keep=workers <= 1
        )  # before any job: a bad spec is the user's error, not one error record per structure
    jobs.sort(key=lambda t: -t[0][3])  # longest first keeps workers busy at the end
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_append(path) as fh:
        results = (
            executor(jobs)
            if executor is not None
            else run_tasks(task, jobs, n_workers=workers, desc=desc, progress=progress)
        )
        for res in results:
            label, spec, sid, natoms, meta = res.key
            rec = {
                "method": label,
                "spec": spec,
                "spec_fingerprint": fingerprints[label],
                "id": sid,
                **meta,
                "natoms": natoms,
                "settings": settings,
            }
            if res.ok:
                rec.update(res.value)
            else:
                rec.update(status="error", converged=False, error=res.error, wall_s=res.seconds)
            fh.write(json.dumps(rec, default=str) + "\n")
            fh.flush()
            records.append(rec)
    return records


def latest(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The last record of each (method, id) pair."""
    return {(r["method"], r["id"]): r for r in records}


# ------------------------------------------------------------------ shared caches
@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on ``folder/.lock`` (jobs of a sweep computing a shared cache)."""
    from filelock import FileLock, Timeout

    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for %s (another job is computing the shared baselines)", lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def shared_cache(folder: Path, key: dict[str, Any], results: str) -> Iterator[None]:
    """Hold the lock of a baseline cache folder (records keyed by spec: label == spec) that
    ``key`` describes; refuse a folder that is not such a cache."""
    with folder_lock(folder):
        key_file = folder / "key.json"
        if not key_file.exists():
            key_file.write_text(json.dumps(key, indent=2, default=str))
        for rec in read_jsonl(folder / results):
            if rec.get("method") != rec.get("spec"):
                raise KdNnpError(
                    f"{folder / results}: record for {rec.get('id')} has method "
                    f"{rec.get('method')!r} != spec {rec.get('spec')!r}; this folder is not a "
                    "kd_nnp baseline cache"
                )
        yield
