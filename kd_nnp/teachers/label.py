"""``kd-nnp label store=STORE teacher=so3lr``: soft labels of a teacher for a store.

Resumable by construction: every result is committed to ``STORE/labels/<name>.db`` as it
arrives (``flush_every`` results per SQLite transaction, default 1), and a rerun skips every
frame that already has a row (ok or failed; ``retry_failed`` recomputes failures). SIGTERM
and Ctrl-C flush what has arrived before exiting. A SIGKILL loses at most the frames in
flight. Frames on which the teacher raises or returns non-finite numbers are recorded as
failed with the error, never as labels.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd_nnp.data.classify import ScopeWatch
from kd_nnp.data.store import Frame, FrameStore, Labels, LabelSet, label_set_name
from kd_nnp.utils.provenance import environment_record, stable_hash

log = logging.getLogger(__name__)

_WORKER: dict[str, Any] = {}


def _init_worker(
    store: str, teacher_name: str, settings: dict[str, Any], teacher: Any = None
) -> None:
    """Load the teacher once per worker (or reuse the one given, in-process)."""
    key = (teacher_name, stable_hash(settings))
    if _WORKER.get("key") == key and _WORKER.get("store") == store:
        return
    if teacher is None:
        from kd_nnp.teachers.registry import load_teacher

        teacher = load_teacher(teacher_name, check=False, **settings)
    _WORKER.update(key=key, store=store, teacher=teacher, frames=FrameStore(store))


def _label_one(frame_id: str) -> tuple[Frame, Labels]:
    frame = _WORKER["frames"].get(frame_id)
    gas = frame.info.get("phase") == "gas"  # an isolated molecule (kd-nnp data molecules)
    return frame, _WORKER["teacher"].compute(frame.atoms, gas=gas)


@dataclass
class LabelReport:
    name: str
    path: Path
    n_frames: int = 0
    n_done_before: int = 0
    n_todo: int = 0
    n_ok: int = 0
    n_failed: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def frames_per_s(self) -> float:
        return (self.n_ok + self.n_failed) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        s = (
            f"label set {self.name!r} ({self.path}): {self.n_frames} frames, "
            f"{self.n_done_before} done before, {self.n_ok} labelled, {self.n_failed} failed "
            f"in {self.seconds:.1f} s ({self.frames_per_s:.2f} frames/s)"
        )
        for fid, err in list(self.failures.items())[:5]:
            s += f"\n  failed {fid}: {err.splitlines()[0] if err else ''}"
        return s


def resolve_label_set(store: FrameStore, name: str) -> str:
    """The label set of ``store`` meant by ``name``: ``name`` itself when the store has it,
    else :func:`label_set_name` of it (a teacher spec) when the store has that; otherwise
    ``name`` unchanged (``store.labels(name)`` then raises, listing the sets it has)."""
    have = store.label_names()
    if name in have:
        return name
    default = label_set_name(name)
    return default if default in have else name


class _Terminated(KeyboardInterrupt):
    pass


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated(f"signal {signum}")


def label_store(
    store: str | Path,
    teacher: str = "so3lr",
    *,
    settings: dict[str, Any] | None = None,
    name: str | None = None,
    workers: int = 1,
    threads: int = 1,
    retry_failed: bool = False,
    limit: int | None = None,
    check: bool = True,
    flush_every: int = 1,
    progress: bool = True,
) -> LabelReport:
    """Label every not-yet-labelled frame of ``store`` with ``teacher`` (see module doc).

    One writer per label set: a second run on the same set while one runs is refused
    (:meth:`~kd_nnp.data.store.LabelSet.writer_lock`), so no frame is labelled twice."""
    from kd_nnp.teachers.calculators import check_spec
    from kd_nnp.utils.threads import set_threads

    set_threads(threads)
    settings = dict(settings or {})
    fs = FrameStore(store)
    check_spec(f"teacher:{teacher}")  # a bad name fails before anything is written
    name = name or label_set_name(teacher)
    labels: LabelSet = fs.labels(name, create=True)
    with labels.writer_lock():
        return _label_locked(
            fs, labels, teacher, settings, workers, threads, retry_failed, limit, check,
            flush_every, progress,
        )  # fmt: skip


def _label_locked(
    fs: FrameStore,
    labels: LabelSet,
    teacher: str,
    settings: dict[str, Any],
    workers: int,
    threads: int,
    retry_failed: bool,
    limit: int | None,
    check: bool,
    flush_every: int,
    progress: bool,
) -> LabelReport:
    from kd_nnp.teachers.registry import load_teacher
    from kd_nnp.utils.parallel import run_tasks

    name, store = labels.name, fs.root
    t = load_teacher(teacher, check=check, **settings)
    prov = t.provenance()
    old = labels.provenance
    if old.get("check") and not prov.get("check"):
        prov["check"] = old["check"]
    labels.set_provenance(dict(prov, label_set=name, environment=environment_record()))

    status = labels.status()
    ids = fs.frame_ids()
    report = LabelReport(name, labels.path, n_frames=len(ids))
    report.n_done_before = sum(
        1 for i in ids if status.get(i) == "ok" or (status.get(i) == "failed" and not retry_failed)
    )
    todo = [i for i in ids if i not in status or (retry_failed and status[i] == "failed")]
    if limit is not None:
        todo = todo[: int(limit)]
    report.n_todo = len(todo)
    if not todo:
        log.info("nothing to do: all %d frames of %s have %s labels", len(ids), store, name)
        return report

    in_process = workers <= 1
    init_args = (str(fs.root), teacher, dict(t.settings), t if in_process else None)
    if not in_process:
        del t  # workers load their own copy
    buffer: list[tuple[Frame, Labels | None, str | None, float]] = []

    def flush() -> None:
        if buffer:
            labels.write(buffer)
            buffer.clear()

    scope = ScopeWatch()
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    t0 = time.perf_counter()
    try:
        for res in run_tasks(
            _label_one,
            [(fid, fid) for fid in todo],
            n_workers=workers,
            threads_per_worker=threads,
            initializer=_init_worker,
            initargs=init_args,
            desc=f"label {name}",
            progress=progress,
        ):
            if res.ok:
                frame, lab = res.value
                buffer.append((frame, lab, None, res.seconds))
            else:
                frame = fs.get(res.key)
                buffer.append((frame, None, res.error, res.seconds))
            scope.check(frame.frame_id, frame.atoms)
            if len(buffer) >= flush_every:
                flush()
    finally:
        flush()
        signal.signal(signal.SIGTERM, old_handler)
        scope.warn(log, f"label set {name!r} of {store}")
        report.seconds = time.perf_counter() - t0
        new = labels.status()
        done = set(todo)
        report.n_ok = sum(1 for i in done if new.get(i) == "ok")
        report.n_failed = sum(1 for i in done if new.get(i) == "failed")
        report.failures = {k: v for k, v in labels.failures().items() if k in done}
    return report
