"""The data module's one-time caches (graphs, pretrained energies) built by several processes
(``cache_workers``, i.e. ``kd-nnp train feature_workers=N``) give the same files and numbers
as one process, and a frame whose graph cannot be built is still refused by name."""

from __future__ import annotations

import json

import pytest
from ase import Atoms

from kd_nnp.errors import KdNnpError
from kd_nnp.training.cache.graphs import GraphCache, prebuild_graphs
from kd_nnp.training.data import FramesDataModule


def _setup(store, graphs, workers: int) -> FramesDataModule:
    dm = FramesDataModule(
        str(store), label_set="toy_teacher", n_val=5, grouped=False, seed=0,
        graph_cache=str(graphs), cache_workers=workers,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def test_two_cache_workers_build_the_same_graphs_and_energies(labelled_store, tmp_path):
    one = _setup(labelled_store, tmp_path / "g1", 1)
    two = _setup(labelled_store, tmp_path / "g2", 2)
    samples1, samples2 = one.train_samples + one.val_samples, two.train_samples + two.val_samples
    assert [s.graph_key for s in samples1] == [s.graph_key for s in samples2]
    assert two.summary["graphs_built"] == one.summary["graphs_built"] == len(samples1)
    for s in samples2:
        assert s.graph_path.is_relative_to(tmp_path / "g2") and s.graph_path.exists()
    e1 = json.loads((tmp_path / "g1" / "pretrained_energy_0.3.0.json").read_text())
    e2 = json.loads((tmp_path / "g2" / "pretrained_energy_0.3.0.json").read_text())
    assert e1 == e2 and len(e1) == len(one.train_samples)  # fitted on the training frames
    assert [s.soft_energy for s in samples1] == [s.soft_energy for s in samples2]
    assert one.summary["reference"] == two.summary["reference"]


def test_parallel_graph_prebuild_leaves_a_bad_frame_to_the_named_error(tmp_path, small_crystals):
    cache = GraphCache(tmp_path / "g")
    good = small_crystals["UREAXX02"]
    lone = Atoms("Cl", [[5, 5, 5]], cell=[30, 30, 30], pbc=True)
    assert prebuild_graphs(cache, [("U/p0", good), ("X/lone", lone)], workers=2) == 1
    assert cache.path(cache.key(good)).exists() and cache.n_built == 1
    with pytest.raises(KdNnpError, match=r"frame 'X/lone' \(Cl1, 1 atoms\): CHGNet cannot build"):
        cache.get(lone, graph_id="X/lone")
    assert prebuild_graphs(cache, [("U/p0", good)], workers=2) == 0  # cached: nothing to do


def test_cache_workers_must_be_positive(labelled_store):
    with pytest.raises(Exception, match="cache_workers must be >= 1, got 0"):
        FramesDataModule(str(labelled_store), label_set="toy_teacher", cache_workers=0)
