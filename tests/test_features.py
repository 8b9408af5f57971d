"""Cached-feature training (kd_nnp.training.jacobian, predict, cache.features) against chgnet's own autograd path.

Small real organic crystals from pyxtal's shipped database (16-24 atoms), rattled and
strained a little so that forces and stress are far from zero.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.db import connect
from chgnet.graph import CrystalGraph
from chgnet.model import CHGNet
from pymatgen.io.ase import AseAtomsAdaptor
from torch import Tensor, nn

from kd_nnp.training.cache.features import FeatureCache, backbone_hash, graph_hash
from kd_nnp.training.jacobian import (
    FrameFeatures,
    compute_features,
    jacobian_nbytes,
    select_force_atoms,
)
from kd_nnp.training.predict import predict_from_features, predict_full
from kd_nnp.utils.paths import pyxtal_db

ROWS = (91, 93, 1)  # OXALAC11 (16 atoms), UREAXX02 (16), FORMAM (24)
REL = 1e-4  # relative tolerance (to the largest magnitude) for float32 comparisons


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _load_model() -> CHGNet:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
    model.requires_grad_(False)
    model.mlp.requires_grad_(True)
    return model


@pytest.fixture(scope="module")
def model() -> CHGNet:
    return _load_model()


def _frame_graph(model: CHGNet, row_id: int, seed: int, rattle: float = 0.04) -> CrystalGraph:
    row = connect(pyxtal_db("test")).get(id=row_id)
    atoms = row.toatoms()
    rng = np.random.default_rng(seed)
    strain = rng.normal(scale=0.01, size=(3, 3))
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + (strain + strain.T) / 2), scale_atoms=True)
    atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
    structure = AseAtomsAdaptor.get_structure(atoms)
    return model.graph_converter(structure, graph_id=f"{row.csd_code}-{seed}")


@pytest.fixture(scope="module")
def graphs(model: CHGNet) -> list[CrystalGraph]:
    return [_frame_graph(model, rid, seed=i) for i, rid in enumerate(ROWS)]


@pytest.fixture(scope="module")
def feats(model: CHGNet, graphs: list[CrystalGraph]) -> list[FrameFeatures]:
    return [compute_features(model, g, forces=True, stress=True) for g in graphs]


def _perturbed(model: CHGNet, seed: int, readout: bool = False) -> CHGNet:
    """A copy whose MLP (and optionally readout LayerNorm) is moved off the pretrained point."""
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    modules: list[nn.Module] = [new.mlp] + ([new.readout_norm] if readout else [])
    with torch.no_grad():
        for mod in modules:
            for p in mod.parameters():
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    if readout:
        new.readout_norm.requires_grad_(True)
    return new


def _assert_close(a: Tensor, b: Tensor, what: str, rel: float = REL) -> None:
    scale = float(b.abs().max())
    err = float((a - b).abs().max())
    assert err <= rel * scale + 1e-6, f"{what}: max |diff| {err:.3g} > {rel} x {scale:.3g}"


def _mae_loss(pred: dict, targets: dict) -> Tensor:
    loss = (pred["e"] - targets["e"]).abs().mean()
    loss = (
        loss
        + torch.cat([(f - t).abs().reshape(-1) for f, t in zip(pred["f"], targets["f"])]).mean()
    )
    loss = (
        loss
        + torch.cat([(s - t).abs().reshape(-1) for s, t in zip(pred["s"], targets["s"])]).mean()
    )
    return loss


def _targets(ref: dict, seed: int) -> dict:
    """Targets well away from the predictions, so that sign(pred - target) is unambiguous."""
    gen = torch.Generator().manual_seed(seed)

    def shift(t: Tensor, scale: float) -> Tensor:
        noise = torch.randn(t.shape, generator=gen)
        return t.detach() + scale * (noise + 0.2 * torch.sign(noise))

    return {
        "e": shift(ref["e"], 0.05),
        "f": [shift(f, 0.5) for f in ref["f"]],
        "s": [shift(s, 1.0) for s in ref["s"]],
    }


# --------------------------------------------------------------------------------------
def test_energy_equals_chgnet_forward(model: CHGNet, graphs: list[CrystalGraph],
                                      feats: list[FrameFeatures]) -> None:  # fmt: skip
    """sum mlp(LN(h)) + AtomRef == CHGNet's own energy: h really is the last-layer feature."""
    for g, fr in zip(graphs, feats, strict=True):
        with torch.no_grad():
            e_ref = float(model([g], task="e")["e"][0]) * fr.n_atoms
            e_cached = float(model.mlp(model.readout_norm(fr.h)).sum()) + fr.atomref_energy
        assert abs(e_cached - e_ref) <= 1e-5 * abs(e_ref), (g.graph_id, e_cached, e_ref)


@pytest.mark.parametrize("perturb", [False, True], ids=["pretrained", "perturbed_mlp"])
def test_predictions_match_full_path(model: CHGNet, graphs: list[CrystalGraph],
                                     feats: list[FrameFeatures], perturb: bool) -> None:  # fmt: skip
    m = _perturbed(model, seed=1) if perturb else model
    full = predict_full(m, graphs, forces=True, stress=True)
    cached = predict_from_features(m.mlp, m.readout_norm, feats, forces=True, stress=True)
    assert cached["e"].shape == (len(graphs),)
    _assert_close(cached["e"], full["e"].detach(), "energy per atom", rel=1e-5)
    for i, g in enumerate(graphs):
        assert cached["f"][i].shape == (int(g.atomic_number.shape[0]), 3)
        assert cached["s"][i].shape == (3, 3)
        _assert_close(cached["f"][i], full["f"][i].detach(), f"forces {g.graph_id}")
        _assert_close(cached["s"][i], full["s"][i].detach(), f"stress {g.graph_id}", rel=2e-4)
        assert float(full["f"][i].abs().max()) > 0.5  # rattled: forces are not ~0
        assert float(full["s"][i].abs().max()) > 0.5  # strained: stress (GPa) is not ~0
    if perturb:  # the comparison is not between two copies of the pretrained numbers
        base = predict_full(model, graphs, forces=True, stress=False)
        assert float((base["f"][0] - full["f"][0].detach()).abs().max()) > 1e-2


def _grads(params: list[nn.Parameter], loss: Tensor) -> list[Tensor]:
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize(
    ("perturb", "readout"),
    [(False, False), (True, False), (True, True)],
    ids=["pretrained", "perturbed_mlp", "trainable_readout_norm"],
)
def test_loss_gradients_match_full_path(model: CHGNet, graphs: list[CrystalGraph],
                                        feats: list[FrameFeatures], perturb: bool,
                                        readout: bool) -> None:  # fmt: skip
    m = _perturbed(model, seed=2, readout=readout) if perturb else model
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert {n.split(".")[0] for n, _ in named} == ({"mlp", "readout_norm"} if readout else {"mlp"})
    params = [p for _, p in named]
    full = predict_full(m, graphs, forces=True, stress=True)
    targets = _targets(full, seed=3)
    g_full = _grads(params, _mae_loss(full, targets))
    cached = predict_from_features(m.mlp, m.readout_norm, feats, forces=True, stress=True)
    loss_cached = _mae_loss(cached, targets)
    g_cached = _grads(params, loss_cached)
    assert abs(float(loss_cached) - float(_mae_loss(full, targets))) < 5e-5 * float(loss_cached)
    for (name, _), a, b in zip(named, g_cached, g_full, strict=True):
        assert float(b.abs().max()) > 0, name
        _assert_close(a, b, f"d loss / d {name}", rel=2e-4)


def test_tangent_and_vmap_builders_agree(model: CHGNet, graphs: list[CrystalGraph],
                                         feats: list[FrameFeatures]) -> None:  # fmt: skip
    """The hand-written forward mode equals functorch's vmap(jvp) of the same function."""
    ref = compute_features(model, graphs[0], forces=True, stress=True, method="vmap")
    _assert_close(feats[0].h, ref.h, "h", rel=1e-6)
    _assert_close(feats[0].jac_pos, ref.jac_pos, "dh/dR")
    _assert_close(feats[0].jac_strain, ref.jac_strain, "dh/dstrain")


def test_predict_from_features_refuses_missing_jacobian(model: CHGNet,
                                                        feats: list[FrameFeatures]) -> None:  # fmt: skip
    no_stress = copy.copy(feats[0])
    no_stress.jac_strain = None
    with pytest.raises(ValueError, match="dh/dstrain"):
        predict_from_features(model.mlp, model.readout_norm, [no_stress], forces=True, stress=True)
    out = predict_from_features(
        model.mlp, model.readout_norm, [no_stress], forces=True, stress=False
    )
    assert set(out) == {"e", "f", "f_mask"}


# --------------------------------------------------------------------------------------
def _mtimes(entry: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}


def test_cache_round_trip(model: CHGNet, graphs: list[CrystalGraph],
                          feats: list[FrameFeatures], tmp_path: Path) -> None:  # fmt: skip
    cache = FeatureCache(tmp_path, model)
    g = graphs[0]
    first = cache.get(g, forces=True, stress=False)
    assert cache.n_builds == 1
    entry = cache.path(g)
    assert sorted(p.name for p in entry.iterdir()) == ["h.npy", "jac_pos.npy", "meta.json"]
    stamps = _mtimes(entry)
    # a second get, and a fresh cache object (a new process), load without building
    again = cache.get(g, forces=True, stress=False)
    fresh = FeatureCache(tmp_path, model)
    loaded = fresh.get(g, forces=True, stress=False)
    assert cache.n_builds == 1 and fresh.n_builds == 0
    assert _mtimes(entry) == stamps
    for fr in (first, again, loaded):
        assert torch.equal(fr.h, feats[0].h)
        assert torch.equal(fr.jac_pos, feats[0].jac_pos)
        assert fr.jac_strain is None
        assert fr.atomref_energy == feats[0].atomref_energy
        assert fr.volume == pytest.approx(feats[0].volume) and fr.n_atoms == feats[0].n_atoms
    # asking for stress later adds dh/dstrain only; dh/dR and h stay as written
    with_stress = fresh.get(g, forces=True, stress=True)
    assert fresh.n_builds == 1
    new_stamps = _mtimes(entry)
    assert {k: new_stamps[k] for k in stamps} == stamps and "jac_strain.npy" in new_stamps
    assert torch.equal(with_stress.jac_strain, feats[0].jac_strain)
    # no temporary files left behind
    assert not [p for p in entry.iterdir() if p.name.startswith(".")]
    # predictions from loaded (memory-mapped) features are the in-memory ones
    a = predict_from_features(
        model.mlp, model.readout_norm, [with_stress], forces=True, stress=True
    )
    b = predict_from_features(model.mlp, model.readout_norm, feats[:1], forces=True, stress=True)
    assert torch.equal(a["f"][0], b["f"][0]) and torch.equal(a["s"][0], b["s"][0])


def test_cache_size_rule(model: CHGNet, graphs: list[CrystalGraph], tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, model)
    g = graphs[1]
    n = int(g.atomic_number.shape[0])
    fr = cache.get(g, forces=True, stress=True)
    in_memory = sum(t.numel() * t.element_size() for t in (fr.h, fr.jac_pos, fr.jac_strain))
    assert in_memory == jacobian_nbytes(n, True)
    on_disk = sum(np.load(p, mmap_mode="r").nbytes for p in cache.path(g).glob("*.npy"))
    assert on_disk == jacobian_nbytes(n, stress=True)
    assert jacobian_nbytes(n, False) == 4 * (64 * n + 64 * n * 3 * n)
    assert jacobian_nbytes(84, False) == pytest.approx(5.44e6, rel=0.01)


def test_cache_key_tracks_content(
    model: CHGNet, graphs: list[CrystalGraph], tmp_path: Path
) -> None:
    cache = FeatureCache(tmp_path, model)
    g = graphs[0]
    key = cache.key(g)
    assert key == FeatureCache(tmp_path, model).key(copy.deepcopy(g))  # deterministic
    # positions
    moved = copy.deepcopy(g)
    moved.atom_frac_coord = moved.atom_frac_coord.detach().clone()
    moved.atom_frac_coord[0, 0] += 1e-6
    assert graph_hash(moved) != graph_hash(g) and cache.key(moved) != key
    # backbone weights change the key ...
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.atom_conv_layers[-1].mlp_out.layers[-1].weight[0, 0] += 1e-4
    assert backbone_hash(other) != cache.backbone_key
    assert FeatureCache(tmp_path, other).key(g) != key
    # ... the trained readout (mlp, readout_norm) does not: training keeps the cache valid
    trained = _perturbed(model, seed=4, readout=True)
    assert FeatureCache(tmp_path, trained).key(g) == key


# --------------------------------------------------------------------------------------
# subsampled force Jacobians (issue 16): M atoms per frame instead of all N
M_SUB = 3


@pytest.fixture(scope="module")
def subsets(graphs: list[CrystalGraph]) -> list[np.ndarray]:
    out = []
    for g in graphs:
        idx = select_force_atoms(g.atomic_number.numpy(), M_SUB, key=graph_hash(g), seed=0)
        assert idx is not None and len(idx) == M_SUB
        out.append(idx)
    return out


@pytest.fixture(scope="module")
def sub_feats(model: CHGNet, graphs: list[CrystalGraph],
              subsets: list[np.ndarray]) -> list[FrameFeatures]:  # fmt: skip
    return [
        compute_features(model, g, forces=True, stress=True, force_atoms=idx)
        for g, idx in zip(graphs, subsets, strict=True)
    ]


def test_subset_jacobian_is_the_full_one_restricted(
    feats: list[FrameFeatures], sub_feats: list[FrameFeatures], subsets: list[np.ndarray]
) -> None:
    for full, sub, idx in zip(feats, sub_feats, subsets, strict=True):
        assert sub.jac_pos.shape == (full.n_atoms, 64, M_SUB, 3)
        assert torch.equal(sub.force_index, torch.as_tensor(idx))
        _assert_close(sub.jac_pos, full.jac_pos[:, :, torch.as_tensor(idx)], "dh/dR subset")
        _assert_close(sub.jac_strain, full.jac_strain, "dh/dstrain", rel=1e-5)
        assert torch.equal(sub.h, full.h)


@pytest.mark.parametrize("perturb", [False, True], ids=["pretrained", "perturbed_mlp"])
def test_subset_predictions_loss_and_gradients_match_full_path(
    model: CHGNet, graphs: list[CrystalGraph], sub_feats: list[FrameFeatures],
    subsets: list[np.ndarray], perturb: bool,
) -> None:  # fmt: skip
    """Forces on the cached atoms, stress, the masked loss and its MLP gradients equal
    chgnet's full autograd restricted to the same components."""
    m = _perturbed(model, seed=5) if perturb else model
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    full = predict_full(m, graphs, forces=True, stress=True)
    cached = predict_from_features(m.mlp, m.readout_norm, sub_feats, forces=True, stress=True)
    for i, (g, idx) in enumerate(zip(graphs, subsets, strict=True)):
        n = int(g.atomic_number.shape[0])
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.as_tensor(idx)] = True
        assert torch.equal(cached["f_mask"][i], mask)
        assert float(cached["f"][i][~mask].abs().max()) == 0.0
        _assert_close(cached["f"][i][mask], full["f"][i].detach()[mask], f"forces {g.graph_id}")
        _assert_close(cached["s"][i], full["s"][i].detach(), f"stress {g.graph_id}", rel=2e-4)
    targets = _targets(full, seed=6)

    def sub_loss(pred: dict) -> Tensor:
        sub = {
            "e": pred["e"],
            "f": [f[torch.as_tensor(idx)] for f, idx in zip(pred["f"], subsets, strict=True)],
            "s": pred["s"],
        }
        tgt = dict(targets)
        tgt["f"] = [f[torch.as_tensor(idx)] for f, idx in zip(targets["f"], subsets, strict=True)]
        return _mae_loss(sub, tgt)

    loss_full, loss_cached = sub_loss(full), sub_loss(cached)
    assert abs(float(loss_cached) - float(loss_full)) < 5e-5 * float(loss_full)
    for (name, _), a, b in zip(named, _grads(params, loss_cached), _grads(params, loss_full),
                               strict=True):  # fmt: skip
        assert float(b.abs().max()) > 0, name
        _assert_close(a, b, f"d loss / d {name}", rel=2e-4)


def test_select_force_atoms_reproducible_and_stratified() -> None:
    numbers = np.array([1] * 20 + [6] * 8 + [7] * 2 + [16])  # 31 atoms, S once
    a = select_force_atoms(numbers, 4, key="frame-a", seed=0)
    assert a is not None and len(a) == 4 and list(a) == sorted(set(a.tolist()))
    assert np.array_equal(a, select_force_atoms(numbers, 4, key="frame-a", seed=0))
    # one atom of each element first, whatever the draw
    for key in ("frame-a", "frame-b", "frame-c"):
        assert set(numbers[select_force_atoms(numbers, 4, key=key, seed=0)]) == {1, 6, 7, 16}
    # another frame or another seed draws other atoms
    draws = {tuple(select_force_atoms(numbers, 6, key=k, seed=s)) for k in "abcd" for s in (0, 1)}
    assert len(draws) > 4
    assert select_force_atoms(numbers, None, key="x") is None
    assert select_force_atoms(numbers, 31, key="x") is None  # M >= N: all atoms
    with pytest.raises(ValueError, match=">= 1"):
        select_force_atoms(numbers, 0, key="x")


def test_subset_cache_round_trip_and_size_rule(
    model: CHGNet, graphs: list[CrystalGraph], sub_feats: list[FrameFeatures],
    subsets: list[np.ndarray], tmp_path: Path,
) -> None:  # fmt: skip
    cache = FeatureCache(tmp_path, model)
    g, idx = graphs[1], subsets[1]
    n = int(g.atomic_number.shape[0])
    fr = cache.get(g, forces=True, stress=True, force_atoms=idx)
    entry = cache.path(g)
    names = sorted(p.name for p in entry.iterdir())
    pos = [x for x in names if x.startswith("jac_pos")]
    assert len(pos) == 1 and re.fullmatch(rf"jac_pos\.m{M_SUB}-[0-9a-f]{{16}}\.npy", pos[0])
    assert "force_index" + pos[0][len("jac_pos") :] in names
    assert cache.complete(entry, forces=True, stress=True, force_atoms=idx)
    assert not cache.complete(entry, forces=True, stress=False, force_atoms=None)
    assert torch.equal(fr.jac_pos, sub_feats[1].jac_pos)
    # the size rule: 768 N M bytes for the positions, plus h, strain and the index
    on_disk = sum(np.load(p, mmap_mode="r").nbytes for p in entry.glob("*.npy"))
    assert on_disk == jacobian_nbytes(n, True, force_atoms=M_SUB)
    assert jacobian_nbytes(84, False, force_atoms=4) == 4 * (64 * 84 + 64 * 84 * 12) + 32
    assert jacobian_nbytes(84, False, force_atoms=4) < jacobian_nbytes(84, False) / 15
    # a fresh object loads without building; another subset gets its own file
    fresh = FeatureCache(tmp_path, model)
    again = fresh.get(g, forces=True, stress=True, force_atoms=idx)
    assert fresh.n_builds == 0 and torch.equal(again.force_index, torch.as_tensor(idx))
    other = np.array(sorted({0, n - 1}))
    fresh.get(g, forces=True, stress=False, force_atoms=other)
    assert fresh.n_builds == 1
    assert len(list(entry.glob("jac_pos.*.npy"))) == 2
    # an index file that disagrees with its name is refused, never silently used
    _, index_file = cache.pos_files(entry, idx)
    np.save(index_file, np.array([0, 1, 2]))
    with pytest.raises(RuntimeError, match="other force atoms"):
        FeatureCache(tmp_path, model).get(g, forces=True, stress=False, force_atoms=idx)


def test_rejects_model_pooling_before_mlp(tmp_path: Path) -> None:
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull:
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(devnull):
            pooled = CHGNet(mlp_first=False)
    with pytest.raises(ValueError, match="mlp_first"):
        FeatureCache(tmp_path, pooled)


def test_keep_freed_memory_is_idempotent_and_harmless(model: CHGNet,
                                                      graphs: list[CrystalGraph]) -> None:  # fmt: skip
    """The allocator setting of the Jacobian builders changes no number."""
    from kd_nnp.utils.memory import keep_freed_memory

    before = compute_features(model, graphs[0], forces=True, stress=True, force_atoms=[0, 3])
    assert keep_freed_memory() is True  # glibc (Linux) on every machine this runs on
    assert keep_freed_memory() is True
    after = compute_features(model, graphs[0], forces=True, stress=True, force_atoms=[0, 3])
    assert torch.equal(before.jac_pos, after.jac_pos)
    assert torch.equal(before.jac_strain, after.jac_strain)


# --------------------------------------------------------------------------------------
# molecule-rigid stress (data.stress_mode=molecular)
def test_molecular_stress_jacobian_matches_chgnet_forces_and_stress(model: CHGNet) -> None:
    """Pushing molecule-rigid strains through the backbone gives chgnet's affine stress plus
    sym(offsets^T F)/V, the label formula (molecular_stress) applied to chgnet's own output."""
    from kd_nnp.training.stress import molecular_stress, molecule_offsets

    row = connect(pyxtal_db("test")).get(id=ROWS[1])  # UREAXX02: 2 molecules of urea
    atoms = row.toatoms()
    rng = np.random.default_rng(7)
    atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape)
    graph = model.graph_converter(AseAtomsAdaptor.get_structure(atoms))
    off = molecule_offsets(atoms)
    assert np.abs(off).max() < 5.0 and len(off) == len(atoms)
    feats = compute_features(model, graph, forces=False, stress=True, strain_offsets=off)
    m = _perturbed(model, seed=8)
    cached = predict_from_features(m.mlp, m.readout_norm, [feats], forces=False, stress=True)
    full = predict_full(m, [graph], forces=True, stress=True)
    gpa = 160.21766208
    s_ase = full["s"][0].detach().numpy() / gpa  # GPa -> eV/A^3, ASE's sign
    voigt = np.array([s_ase[0, 0], s_ase[1, 1], s_ase[2, 2], s_ase[1, 2], s_ase[0, 2], s_ase[0, 1]])
    mol = molecular_stress(voigt, full["f"][0].detach().numpy(), off, atoms.get_volume()) * gpa
    got = cached["s"][0].detach().numpy()
    got_voigt = np.array([got[0, 0], got[1, 1], got[2, 2], got[1, 2], got[0, 2], got[0, 1]])
    # float32: the two routes agree to rounding of the (larger) affine stress they cancel
    scale = max(np.abs(mol).max(), np.abs(voigt * gpa).max())
    assert np.abs(got_voigt - mol).max() <= 2e-4 * scale + 1e-4, (got_voigt, mol)
    assert np.abs(mol - voigt * gpa).max() > 0.05 * scale  # not the affine stress again


def test_molecular_stress_is_the_rigid_strain_derivative(chgnet_model) -> None:
    """Physics check of the label formula: central differences of the energy along strains
    that move molecules rigidly (the demo's strained frames) equal sigma + offsets^T F / V."""
    from chgnet.model.dynamics import CHGNetCalculator

    from kd_nnp.data.sources.perturb import apply_strain
    from kd_nnp.training.stress import molecular_stress, molecule_offsets

    atoms = connect(pyxtal_db("test")).get(id=ROWS[1]).toatoms()
    atoms.positions += np.random.default_rng(3).normal(scale=0.02, size=atoms.positions.shape)
    calc = CHGNetCalculator(model=chgnet_model, use_device="cpu")
    atoms.calc = calc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mol = molecular_stress(atoms.get_stress(), atoms.get_forces(),
                               molecule_offsets(atoms), atoms.get_volume())  # fmt: skip
        h, vol = 4e-3, atoms.get_volume()
        for k, (a, b) in enumerate([(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]):
            e = np.zeros((3, 3))
            e[a, b] = e[b, a] = 0.5 if a != b else 1.0
            energies = []
            for sign in (1, -1):
                strained = apply_strain(atoms, sign * h * e, mode="molecular")
                strained.calc = calc
                energies.append(strained.get_potential_energy())
            fd = (energies[0] - energies[1]) / (2 * h) / vol
            assert abs(fd - mol[k]) <= 0.03 * np.abs(mol).max() + 2e-5, (k, fd, mol[k])
