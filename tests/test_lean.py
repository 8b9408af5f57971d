"""``model.backend=lean`` (issue 17): energies, forces, stress, loss and every trainable
gradient equal to ``full``'s (chgnet's own second-order autograd) on a batch of frames of
different sizes, and one Lightning step moves the parameters as ``full``'s does.

Tolerance (float32 rounding; the two paths sum the same terms in another order): every
compared quantity agrees to 1e-5 of its largest magnitude, or to 1e-4 in its own units
(eV/atom, eV/A, GPa, gradient) where that is larger: the molecule-rigid stress (a few GPa) is
the difference of terms of ~40 GPa, so it keeps their absolute rounding (measured: forces 8e-6
eV/A of 30, affine stress 3e-5 GPa of 44, molecular stress 3e-5 GPa of 2.9, MLP gradients 3e-6
of 6.5)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from pymatgen.io.ase import AseAtomsAdaptor

from kd_nnp.errors import KdNnpError
from kd_nnp.training.batch import Batch, Targets
from kd_nnp.training.lean import predict_lean
from kd_nnp.training.loss import DistillationLoss
from kd_nnp.training.module import DistillationModule
from kd_nnp.training.stress import molecule_offsets
from kd_nnp.training.student import load_student

REL, ATOL = 1e-5, 1e-4
# three frames of different sizes (16, 24, 16 atoms), rattled so forces are far from 0
CODES = ("OXALAC11", "FORMAM", "UREAXX02")
LOSS = {"r_he": 0.5, "r_hf": 0.3, "r_se": 1.0, "r_sf": 1.0, "r_hs": 0.05, "r_ss": 0.1}


def _batch(model, small_crystals, *, molecular: bool = False, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    atoms = []
    for i, code in enumerate(CODES):
        a = small_crystals[code].copy()
        a.rattle(0.04, seed=seed + i)
        atoms.append(a)
    graphs = [model.graph_converter(AseAtomsAdaptor.get_structure(a)) for a in atoms]
    sizes = [len(a) for a in atoms]
    b, n = len(atoms), sum(sizes)

    def targets() -> Targets:
        return Targets(
            energy=-6.0 + 0.3 * torch.randn(b, generator=gen),
            energy_mask=torch.tensor([True, False, True]),
            forces=torch.randn(n, 3, generator=gen),
            forces_mask=torch.rand(n, generator=gen) < 0.7,
            stress=torch.randn(b, 6, generator=gen),
            stress_mask=torch.ones(b, dtype=torch.bool),
        )

    extra = {}
    if molecular:
        extra["mol_offsets"] = torch.as_tensor(
            np.concatenate([molecule_offsets(a) for a in atoms]), dtype=torch.float32
        )
        extra["volumes"] = torch.tensor([a.get_volume() for a in atoms], dtype=torch.float32)
    return Batch(
        frame_ids=list(CODES),
        n_atoms=torch.as_tensor(sizes),
        hard=targets(),
        soft=targets(),
        graphs=graphs,
        **extra,
    )


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = float(b.abs().max())
    diff = float((a - b).abs().max())
    assert diff <= max(REL * scale, ATOL), f"{what}: max |diff| {diff:.2e} of max {scale:.2e}"


def _run(module: DistillationModule, batch: Batch, backend: str) -> dict:
    module.backend = backend
    module.zero_grad(set_to_none=True)
    pred = module(batch)
    result = module.loss_fn(pred, batch)
    result.total.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return {"pred": pred, "loss": result.total.detach(), "maes": result.maes, "grads": grads}


@pytest.mark.parametrize(
    ("freeze", "molecular"), [("mlp", False), ("readout", True)], ids=["affine", "molecular"]
)
def test_lean_equals_full(small_crystals, freeze, molecular):
    """Predictions, loss, every MAE term and every trainable gradient (mlp; + readout_norm
    with freeze=readout) of lean equal full's, affine and molecule-rigid stress."""
    module = DistillationModule(student={"freeze": freeze}, loss=DistillationLoss(**LOSS))
    assert module.compute_forces and module.compute_stress
    batch = _batch(module.student, small_crystals, molecular=molecular)
    full, lean = _run(module, batch, "full"), _run(module, batch, "lean")
    for q in ("energy", "forces", "stress"):
        _close(lean["pred"].get(q), full["pred"].get(q), q)
    assert float(full["pred"].forces.abs().max()) > 1.0  # rattled: real forces to compare
    assert float(lean["loss"]) == pytest.approx(float(full["loss"]), rel=REL)
    assert set(lean["maes"]) == set(full["maes"]) and len(full["maes"]) == 6
    for k, v in full["maes"].items():
        assert float(lean["maes"][k]) == pytest.approx(float(v), rel=REL), k
    want = {"mlp"} | ({"readout_norm"} if freeze == "readout" else set())
    assert {n.split(".")[1] for n in full["grads"]} == want
    for name, g in full["grads"].items():
        # (the last bias only sees the energy terms, whose signs may cancel to exactly 0)
        assert float(g.abs().max()) > 0 or not name.endswith("weight"), name
        _close(lean["grads"][name], g, name)


def _fit_one_step(backend: str, batch: Batch) -> dict[str, torch.Tensor]:
    import lightning as L

    torch.manual_seed(0)
    module = DistillationModule(
        loss=DistillationLoss(**LOSS), backend=backend,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05),
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in module.student.mlp.named_parameters()}
    loader = torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    after = {n: p.detach().clone() for n, p in module.student.mlp.named_parameters()}
    return {n: after[n] - before[n] for n in after}


def test_lean_lightning_step_equals_full(small_crystals, chgnet_model):
    """One SGD step through Lightning (training_step -> backward -> step) changes every MLP
    parameter by the same amount with backend=lean as with backend=full."""
    batch = _batch(chgnet_model, small_crystals, seed=1)
    d_full, d_lean = _fit_one_step("full", batch), _fit_one_step("lean", batch)
    for name, d in d_full.items():
        assert float(d.abs().max()) > 0, name
        _close(d_lean[name], d, name)


def test_lean_refuses_a_trainable_backbone(small_crystals):
    """freeze=all trains the backbone: lean (like cached) is refused with a clear error; and
    predict_lean itself never drops a backbone parameter's gradient silently."""
    with pytest.raises(KdNnpError, match="backend=lean.*frozen backbone.*freeze=all"):
        DistillationModule(student={"freeze": "all"}, backend="lean")
    with pytest.raises(KdNnpError, match="backend must be one of full, lean, cached, auto"):
        DistillationModule(backend="fast")
    student = load_student("0.3.0", freeze="mlp")
    graph = student.graph_converter(AseAtomsAdaptor.get_structure(small_crystals["UREAXX02"]))
    student.atom_embedding.embedding.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen backbone.*atom_embedding"):
        predict_lean(student, [graph], forces=True, stress=False)


def test_auto_backend_takes_lean_for_uncached_batches(small_crystals, monkeypatch):
    """backend=auto: a batch without cached features (a frame over max_feature_bytes) goes
    through the lean path, never chgnet's second-order full path."""
    import kd_nnp.training.module as module_mod

    def no_full(*args, **kw):
        raise AssertionError("predict_full called")

    monkeypatch.setattr(module_mod, "predict_full", no_full)
    module = DistillationModule(loss=DistillationLoss(r_se=1, r_sf=1), backend="auto")
    graph = module.student.graph_converter(
        AseAtomsAdaptor.get_structure(small_crystals["UREAXX02"])
    )
    batch = Batch(frame_ids=["u"], n_atoms=torch.tensor([len(small_crystals["UREAXX02"])]),
                  hard=Targets.empty(1, 16), soft=Targets.empty(1, 16), graphs=[graph])  # fmt: skip
    pred = module(batch)
    assert pred.forces.shape == (16, 3) and pred.forces.grad_fn is not None
    assert float(pred.forces.abs().max()) > 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lean_on_cuda_equals_cpu(small_crystals):
    """The lean path on CUDA (tensors follow the batch) gives the CPU's predictions."""
    module = DistillationModule(loss=DistillationLoss(**LOSS), backend="lean")
    batch = _batch(module.student, small_crystals)
    cpu = module(batch)
    gpu = module.to("cuda")(batch.to("cuda"))
    for q in ("energy", "forces", "stress"):
        _close(gpu.get(q).cpu(), cpu.get(q), q)


@pytest.mark.slow
def test_lean_training_run_cli(labelled_store, tmp_path):
    """kd-nnp train model.backend=lean: forces + stress, no feature cache built, loss falls."""
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="1")
    args = [
        "train", f"data.store={labelled_store}", "data.label_set=toy_teacher", "data.n_val=5",
        "data.batch_size=5", "data.grouped=false", "trainer.max_epochs=3", "loss=soft_only",
        "loss.r_sf=0.5", "loss.r_ss=0.05", "model.backend=lean", "model.optimizer.lr=0.003",
        f"paths.output_dir={tmp_path}", "hydra.run.dir=" + str(run),
    ]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "kd_nnp.cli", *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((run / "data_summary.json").read_text())
    assert "feature_cache" not in summary
    metrics = json.loads((run / "metrics.json").read_text())
    train = [h for h in metrics["history"] if h["split"] == "train"]
    assert "mae_soft_forces" in train[0] and "mae_soft_stress" in train[0]
    assert train[-1]["loss"] < train[0]["loss"], train
