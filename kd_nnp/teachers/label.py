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
from kd_nnp.data.sources.merge import copy_labels, same_teacher
from kd_nnp.data.store import Frame, FrameStore, Labels, LabelSet, StoreError, label_set_name
from kd_nnp.teachers.select import SelectSettings, select_todo
from kd_nnp.utils.provenance import environment_record, stable_hash
from kd_nnp.utils.shard import check_shard, shard_of

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
    shard: tuple[int, int] | None = None,
    select: SelectSettings | None = None,
) -> LabelReport:
    """Label every not-yet-labelled frame of ``store`` with ``teacher`` (see module doc).

    One writer per label set: a second run on the same set while one runs is refused
    (:meth:`~kd_nnp.data.store.LabelSet.writer_lock`), so no frame is labelled twice.

    ``shard=(k, n)`` labels only the frames of shard ``k`` of ``n``
    (:func:`kd_nnp.utils.shard.shard_of` of the frame id) into their own file
    ``labels/shards/<name>/<k>-of-<n>.db``, which no other process writes (SQLite locking is
    unreliable on NFS); frames the label set itself already holds are skipped.
    :func:`merge_label_shards` joins the shards into the label set.

    ``select`` (active selection, :mod:`kd_nnp.teachers.select`): label only the frames that
    bring the label set to ``select.n`` frames, picked at random or by committee
    disagreement, each round recorded in ``labels/<name>.select.jsonl``."""
    from kd_nnp.teachers.calculators import check_spec
    from kd_nnp.utils.threads import set_threads

    set_threads(threads)
    settings = dict(settings or {})
    fs = FrameStore(store)
    check_spec(f"teacher:{teacher}")  # a bad name fails before anything is written
    name = name or label_set_name(teacher)
    if select is not None and not select.active:
        select = None
    if select is not None and shard is not None:
        raise StoreError(
            "select.n (active selection) picks from the whole store: it cannot run on one "
            f"shard ({shard[0]}/{shard[1]}); label the selection unsharded"
        )
    merged: LabelSet | None = None
    if shard is None:
        labels: LabelSet = fs.labels(name, create=True)
    else:
        k, n = check_shard(*shard)
        other = sorted({nn for _, nn in fs.label_shards(name)} - {n})
        if other:
            raise StoreError(
                f"{fs.shard_dir(name)} holds shards of {other[0]} (<k>-of-{other[0]}.db), "
                f"this run asks for shard {k}/{n}: use the same N for every shard of a label "
                "set (or another label-set name)"
            )
        labels = fs.label_shard(name, k, n)
        merged = fs.labels(name, create=True)
    with labels.writer_lock():
        return _label_locked(
            fs, labels, teacher, settings, workers, threads, retry_failed, limit, check,
            flush_every, progress, shard, merged, select,
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
    shard: tuple[int, int] | None = None,
    merged: LabelSet | None = None,
    select: SelectSettings | None = None,
) -> LabelReport:
    from kd_nnp.teachers.registry import load_teacher
    from kd_nnp.utils.parallel import run_tasks

    name, store = labels.name, fs.root
    t = load_teacher(teacher, check=check, **settings)
    prov = t.provenance()
    old = labels.provenance
    if old.get("check") and not prov.get("check"):
        prov["check"] = old["check"]
    if merged is not None:
        merged.check_provenance(prov)  # a shard of a label set made by another teacher
    labels.set_provenance(dict(prov, label_set=name, environment=environment_record()))

    status = labels.status()
    ids = fs.frame_ids()
    if shard is not None:
        k, n = shard
        ids = [i for i in ids if shard_of(i, n) == k]
        # frames the label set itself holds (labelled before sharding, or merged) are done
        for fid, st in (merged.status() if merged is not None else {}).items():
            if status.get(fid) != "ok" and not (st == "failed" and retry_failed):
                status[fid] = st
    report = LabelReport(name, labels.path, n_frames=len(ids))
    report.n_done_before = sum(
        1 for i in ids if status.get(i) == "ok" or (status.get(i) == "failed" and not retry_failed)
    )
    if select is not None:
        todo = select_todo(fs, labels, select, status)
        if retry_failed:
            todo += [i for i in ids if status.get(i) == "failed" and i not in todo]
    else:
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


@dataclass
class ShardMergeReport:
    name: str
    path: Path
    n_shards: int = 0
    n_frames: int = 0
    n_written: int = 0
    n_ok: int = 0
    n_failed: int = 0

    def summary(self) -> str:
        return (
            f"label set {self.name!r} ({self.path}): {self.n_shards} shards merged, "
            f"{self.n_written} rows written; {self.n_ok} of {self.n_frames} frames labelled, "
            f"{self.n_failed} failed"
        )


def merge_label_shards(
    store: str | Path, name: str, *, teacher: str | None = None
) -> ShardMergeReport:
    """Join the shard files ``labels/shards/<name>/<k>-of-<n>.db`` of ``store`` into the label
    set ``labels/<name>.db`` (``kd-nnp label ... merge_shards=true``).

    Refused (:class:`~kd_nnp.data.store.StoreError`, before anything is written) when there is
    no shard, shards of several N, a shard file missing (named), a shard holding a frame of
    another shard, a shard that has not labelled all its frames (named, with the command that
    finishes it), or shards (or the label set) made by teachers of other settings hashes. Rows
    are copied by :func:`kd_nnp.data.sources.merge.copy_labels` (the one implementation shared
    with ``kd-nnp data merge``): a frame labelled twice must agree and is kept once. Resumable
    and idempotent; the shard files are kept. ``teacher``: the teacher the shards must have
    been labelled with (its name as given to ``label_store``), checked when given."""
    fs = FrameStore(store)
    shards = fs.label_shards(name)
    folder = fs.shard_dir(name)
    if not shards:
        raise StoreError(
            f"{fs.root}: no shards of label set {name!r} in {folder}; label them first "
            f"(`kd-nnp label store={fs.root} ... shard=K/N`)"
        )
    ns = sorted({n for _, n in shards})
    if len(ns) > 1:
        raise StoreError(
            f"{folder} holds shards of different N ({', '.join(f'*-of-{n}.db' for n in ns)}): "
            "one labelling split per label set; remove the files of the wrong split"
        )
    n = ns[0]
    missing = [fs.label_shard(name, k, n).path for k in range(n) if (k, n) not in shards]
    if missing:
        raise StoreError(
            f"label set {name!r}: {len(missing)} of {n} shard files missing "
            f"({', '.join(str(p) for p in missing[:5])}{' ...' if len(missing) > 5 else ''}); "
            f"run `kd-nnp label store={fs.root} ... shard=K/{n}` for them, then merge again"
        )
    target = fs.labels(name, create=True)
    ids = fs.frame_ids()
    known = set(ids)
    done_before = target.status()
    ordered = [shards[(k, n)] for k in range(n)]
    for k, ls in enumerate(ordered):
        status = ls.status()
        stray = [f for f in status if f in known and shard_of(f, n) != k]
        if stray:
            raise StoreError(
                f"{ls.path} holds frame {stray[0]!r} of shard {shard_of(stray[0], n)}/{n} "
                f"({len(stray)} such frames): not a shard {k}/{n} of this store's frames"
            )
        lacking = [
            f for f in ids if shard_of(f, n) == k and f not in status and f not in done_before
        ]
        if lacking:
            raise StoreError(
                f"{ls.path} lacks {len(lacking)} frames of shard {k}/{n} (e.g. {lacking[0]!r}): "
                f"finish it (`kd-nnp label store={fs.root} ... shard={k}/{n}` resumes it), "
                "then merge again"
            )
    where = [(str(ls.path), ls) for ls in ordered]
    if target.path.exists():
        where.insert(0, (str(target.path), target))
    prov = same_teacher(name, where)
    if teacher is not None and prov.get("name") not in (None, teacher):
        raise StoreError(
            f"the shards of label set {name!r} ({folder}) were labelled by teacher "
            f"{prov.get('name')!r}, not {teacher!r}: merge them with that teacher (or name=)"
        )
    report = ShardMergeReport(name, target.path, n_shards=n, n_frames=len(ids))
    with target.writer_lock():
        target.set_provenance(dict(prov, shards=n))
        report.n_written = copy_labels(target, [(fs, ls) for ls in ordered])
        status = target.status()
    report.n_ok = sum(1 for f in ids if status.get(f) == "ok")
    report.n_failed = sum(1 for f in ids if status.get(f) == "failed")
    return report
