"""Worker pools for long jobs (labelling, relaxing): one thread per worker process.

Results are yielded as they complete so callers can stream them to disk (resumability).
Worker exceptions are returned as values, never raised, so one bad item cannot kill a run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kd_nnp.utils.threads import set_threads


@dataclass
class TaskResult:
    """Outcome of one item: ``value`` on success, ``error`` (a formatted traceback) on failure."""

    key: Any
    value: Any = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def die_with_parent(parent_pid: int) -> None:
    """Make this worker process end when its parent dies, even by ``kill -9`` (which runs no
    clean-up in the parent): Linux ``PR_SET_PDEATHSIG``; a parent already gone ends it now."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _init_worker(
    threads: int,
    initializer: Callable[..., None] | None,
    initargs: tuple,
    parent_pid: int | None = None,
) -> None:
    if parent_pid is not None:
        die_with_parent(parent_pid)
    set_threads(threads)
    if initializer is not None:
        initializer(*initargs)


def _call(fn: Callable[[Any], Any], key: Any, item: Any) -> TaskResult:
    t0 = time.perf_counter()
    try:
        value = fn(item)
        return TaskResult(key, value=value, seconds=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - reported to the caller, per item
        msg = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        return TaskResult(key, error=msg, seconds=time.perf_counter() - t0)


def _call_star(args: tuple) -> TaskResult:
    return _call(*args)


def run_tasks(
    fn: Callable[[Any], Any],
    items: Iterable[tuple[Any, Any]],
    *,
    n_workers: int = 1,
    threads_per_worker: int = 1,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    desc: str | None = None,
    total: int | None = None,
    progress: bool = True,
) -> Iterator[TaskResult]:
    """Apply ``fn`` to ``(key, item)`` pairs, yielding :class:`TaskResult` as they finish.

    ``n_workers <= 1`` runs in this process (still with deliberate threads). Otherwise a
    ``spawn`` pool is used (safe with torch) whose workers each get ``threads_per_worker``
    threads and run ``initializer(*initargs)`` once (e.g. to load a model). ``fn`` and the
    initializer must be importable top-level functions. Workers die with this process, even
    when it is killed with SIGKILL (:func:`die_with_parent`). A tqdm bar shows rate and ETA.
    """
    from tqdm.auto import tqdm

    items = list(items)
    if not items:  # nothing to do: no worker start-up, no model loaded by the initializer
        return
    n_workers = min(n_workers, len(items))  # no idle workers loading models for nothing
    bar = tqdm(total=total or len(items), desc=desc, disable=not progress, smoothing=0.1)
    try:
        if n_workers <= 1:
            _init_worker(threads_per_worker, initializer, initargs)
            for key, item in items:
                res = _call(fn, key, item)
                bar.update(1)
                yield res
            return
        ctx = mp.get_context("spawn")
        with ctx.Pool(
            n_workers,
            initializer=_init_worker,
            initargs=(threads_per_worker, initializer, initargs, os.getpid()),
            maxtasksperchild=None,
        ) as pool:
            for res in pool.imap_unordered(_call_star, [(fn, k, it) for k, it in items]):
                bar.update(1)
                yield res
    finally:
        bar.close()
