"""The pretrained student's total energies per graph (the target of ``reference=student``),
computed once and kept in ``<graph cache>/pretrained_energy_<model>.json``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kd_nnp.training.cache.graphs import GraphCache
from kd_nnp.training.progress import ProgressLog
from kd_nnp.utils.paths import cache_dir

log = logging.getLogger(__name__)

CHUNK = 16  # graphs per forward pass


_WORKER_MODEL: Any = None


def _init_energy_worker(student_model: str) -> None:
    global _WORKER_MODEL
    from kd_nnp.teachers.calculators import load_chgnet

    _WORKER_MODEL = load_chgnet(student_model).eval()


def _energies(model: Any, graph_paths: Sequence[Path], n_atoms: Sequence[int]) -> list[float]:
    graphs = [GraphCache.load(p) for p in graph_paths]
    with torch.no_grad():
        e = model(graphs, task="e")["e"].numpy()
    return [float(ei) * n for ei, n in zip(e, n_atoms)]


def _energy_task(item: tuple[list[Path], list[int]]) -> list[float]:
    return _energies(_WORKER_MODEL, *item)


def pretrained_energies(
    samples: Sequence[Any],
    student_model: str,
    graph_cache: str | Path | None = None,
    workers: int = 1,
) -> list[float]:
    """Total energies (eV) of the pretrained student on ``samples`` (each with ``graph_key``,
    ``graph_path``, ``n_atoms``), cached per graph key beside the graph cache. ``workers`` > 1
    spreads the missing ones over that many processes (one thread each; same numbers)."""
    cache_file = (
        Path(graph_cache) if graph_cache else cache_dir() / "graphs"
    ) / f"pretrained_energy_{student_model}.json"
    known: dict[str, float] = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    todo = list({s.graph_key: s for s in samples if s.graph_key not in known}.values())
    if todo:
        progress = ProgressLog(log, "pretrained student energies", len(todo))
        chunks = [todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK)]
        items = [
            (i, ([s.graph_path for s in c], [s.n_atoms for s in c])) for i, c in enumerate(chunks)
        ]
        if workers <= 1:
            from kd_nnp.teachers.calculators import load_chgnet

            model = load_chgnet(student_model).eval()
            results = ((i, _energies(model, *item)) for i, item in items)
        else:
            results = _pool_energies(items, student_model, workers)
        for i, energies in results:
            for s, e in zip(chunks[i], energies):
                known[s.graph_key] = e
            progress.step(len(chunks[i]))
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache_file)
    return [known[s.graph_key] for s in samples]


def _pool_energies(
    items: list[tuple[int, Any]], student_model: str, workers: int
) -> Iterator[tuple[int, list[float]]]:
    """``(chunk index, energies)`` of ``items`` from ``workers`` processes, as they finish;
    a failed chunk stops the run (nothing of this run is written to the cache file)."""
    from kd_nnp.utils.parallel import run_tasks

    for r in run_tasks(
        _energy_task, items, n_workers=workers, initializer=_init_energy_worker,
        initargs=(student_model,), progress=False,
    ):  # fmt: skip
        if not r.ok:
            raise RuntimeError(f"pretrained student energies: a worker failed:\n{r.error}")
        yield r.key, r.value
