"""Freeze policies: exact trainable sets, and frozen tensors stay bit-identical."""

from __future__ import annotations

import pytest
import torch

from kd_nnp.teachers.calculators import load_chgnet
from kd_nnp.training.student import apply_freeze_policy

# chgnet 0.3.0's readout MLP: Linear(64,64) SiLU Linear(64,64) SiLU Linear(64,64) SiLU Dropout Linear(64,1)
MLP_PARAMS = [
    "mlp.layers.0.weight", "mlp.layers.0.bias",
    "mlp.layers.2.weight", "mlp.layers.2.bias",
    "mlp.layers.4.weight", "mlp.layers.4.bias",
    "mlp.layers.7.weight", "mlp.layers.7.bias",
]  # fmt: skip


@pytest.fixture()
def model():
    return load_chgnet("0.3.0")


def test_mlp_policy_trains_exactly_the_mlp(model):
    names = apply_freeze_policy(model, "mlp")
    expected = [n for n, _ in model.mlp.named_parameters(prefix="mlp")]
    assert names == expected
    assert len(names) == 8 and sum(p.numel() for p in model.mlp.parameters()) == 12545
    assert not any(n.startswith(("readout_norm", "composition_model")) for n in names)


def test_mlp_parameter_names_are_pinned(model):
    # pins chgnet 0.3.0's MLP layout; a chgnet change that moves parameters must be noticed
    names = apply_freeze_policy(model, "mlp")
    assert names == MLP_PARAMS
    assert set(names) == {n for n, _ in model.named_parameters() if n.startswith("mlp.")}


def test_readout_policy_adds_the_layernorm(model):
    names = apply_freeze_policy(model, "readout")
    assert set(names) == {n for n, _ in model.named_parameters() if n.startswith("mlp.")} | {
        "readout_norm.weight",
        "readout_norm.bias",
    }


def test_all_policy_keeps_atomref_frozen(model):
    names = apply_freeze_policy(model, "all")
    every = [n for n, _ in model.named_parameters()]
    assert names == [n for n in every if not n.startswith("composition_model.")]
    assert "composition_model.fc.weight" in every and "composition_model.fc.weight" not in names


def test_unknown_policy(model):
    with pytest.raises(ValueError, match="unknown freeze policy"):
        apply_freeze_policy(model, "backbone")


def test_training_step_leaves_frozen_tensors_bit_identical(model, small_crystals):
    from chgnet.graph import CrystalGraphConverter
    from pymatgen.io.ase import AseAtomsAdaptor

    apply_freeze_policy(model, "mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv = CrystalGraphConverter(atom_graph_cutoff=6, bond_graph_cutoff=3)
    g = conv(AseAtomsAdaptor.get_structure(small_crystals["OXALAC11"]))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    out = model([g], task="ef")
    loss = out["e"].abs().sum() + torch.cat(out["f"]).abs().mean()
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith("mlp.")}
    assert changed  # the MLP did move


def test_one_loader_for_model_files_and_checkpoints(model, tmp_path):
    """load_chgnet reads what `kd-nnp export` writes and a training checkpoint; export
    turns a checkpoint into a model file that loads back with the same weights."""
    from kd_nnp.cli.export import main as export_main

    with torch.no_grad():
        model.mlp.layers[0].bias.add_(0.5)  # a trained student differs from pretrained
    ckpt = tmp_path / "last.ckpt"
    state = {f"student.{k}": v for k, v in model.state_dict().items()}
    torch.save({"chgnet_model_args": model.model_args, "state_dict": state}, ckpt)
    out = tmp_path / "run" / "student.pt"
    assert export_main([str(ckpt), str(out)]) == 0
    ref = model.state_dict()
    for path in (ckpt, out):
        loaded = load_chgnet(path=path)
        assert next(loaded.parameters()).dtype == torch.float32
        got = loaded.state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref), path
