"""The pretrained student's total energies per graph (the target of ``reference=student``),
computed once and kept in ``<graph cache>/pretrained_energy_<model>.json``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kd_nnp.training.cache.graphs import GraphCache
from kd_nnp.training.progress import ProgressLog
from kd_nnp.utils.paths import cache_dir

log = logging.getLogger(__name__)


def pretrained_energies(
    samples: Sequence[Any], student_model: str, graph_cache: str | Path | None = None
) -> list[float]:
    """Total energies (eV) of the pretrained student on ``samples`` (each with ``graph_key``,
    ``graph_path``, ``n_atoms``), cached per graph key beside the graph cache."""
    from kd_nnp.teachers.calculators import load_chgnet

    cache_file = (
        Path(graph_cache) if graph_cache else cache_dir() / "graphs"
    ) / f"pretrained_energy_{student_model}.json"
    known: dict[str, float] = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    todo = [s for s in samples if s.graph_key not in known]
    if todo:
        model = load_chgnet(student_model).eval()
        progress = ProgressLog(log, "pretrained student energies", len(todo))
        for i in range(0, len(todo), 16):
            chunk = todo[i : i + 16]
            graphs = [GraphCache.load(s.graph_path) for s in chunk]
            with torch.no_grad():
                e = model(graphs, task="e")["e"].numpy()
            for s, ei in zip(chunk, e):
                known[s.graph_key] = float(ei) * s.n_atoms
            progress.step(len(chunk))
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache_file)
    return [known[s.graph_key] for s in samples]
