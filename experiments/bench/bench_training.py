"""MLP-only training: chgnet's Trainer (autograd through the frozen backbone every step)
vs kd_nnp's cached features (kd_nnp.training.features), side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/bench/bench_training.py --frames 8

Frames: real organic crystals of pyxtal's shipped ``test.db`` with ``--min-atoms`` to
``--max-atoms`` atoms, rattled (0.05 A) and strained (~1 %). Labels: the pretrained CHGNet's
own energies/forces plus Gaussian noise (a stand-in teacher; timing does not depend on it).
Both sides use the same MAE energy+force loss (chgnet's ``CombinedLoss(criterion="MAE")``),
Adam, the same batch size, one thread. Every measurement that reports memory runs in its
own subprocess (peak RSS = VmHWM of /proc/self/status):

- ``trainer``: ``chgnet.trainer.Trainer._train`` epochs over pre-converted graphs
  (graph conversion excluded from both sides), only ``model.mlp`` trainable;
- ``build``:   one-time ``FeatureCache.get`` per frame (h and dh/dR, to a fresh folder);
- ``cached``:  epochs of ``predict_from_features`` + the same loss + Adam from that cache.

The parent also checks that both paths give the same loss and MLP gradients at step 0.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_nnp.utils.threads import set_threads

HERE = Path(__file__).resolve()


def _load_model() -> Any:
    from chgnet.model import CHGNet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
    model.requires_grad_(False)
    model.mlp.requires_grad_(True)
    return model


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    ``VmHWM`` of /proc/self/status (a fresh high-water mark after exec); getrusage's
    ru_maxrss is not used where VmHWM exists because Linux carries it over from the parent
    through fork + exec, which reported the parent's peak for the small children."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def make_dataset(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Pick, perturb and label the frames; save graphs + labels for the children."""
    from ase.db import connect
    from pymatgen.io.ase import AseAtomsAdaptor

    from kd_nnp.utils.paths import pyxtal_db

    db = connect(pyxtal_db("test"))
    rows = sorted(
        (r for r in db.select() if args.min_atoms <= r.natoms <= args.max_atoms),
        key=lambda r: (r.natoms, r.id),
    )
    if len(rows) < args.frames:
        raise SystemExit(
            f"only {len(rows)} pyxtal crystals have {args.min_atoms}-{args.max_atoms} atoms"
        )
    picks = [rows[int(i)] for i in np.linspace(0, len(rows) - 1, args.frames).round()]
    rng = np.random.default_rng(args.seed)
    model = _load_model()
    graphs, energies, forces = [], [], []
    for row in picks:
        atoms = row.toatoms()
        strain = rng.normal(scale=0.01, size=(3, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + (strain + strain.T) / 2), scale_atoms=True)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        graph = model.graph_converter(AseAtomsAdaptor.get_structure(atoms), graph_id=row.csd_code)
        pred = model([graph], task="ef")
        energies.append(float(pred["e"][0]) + float(rng.normal(scale=0.02)))
        f = pred["f"][0].detach()
        forces.append(f + torch.from_numpy(rng.normal(scale=0.1, size=tuple(f.shape))).float())
        graphs.append(graph)
    data = {"graphs": graphs, "e": energies, "f": forces}
    torch.save(data, workdir / "data.pt")
    return data


def _load_data(workdir: Path) -> dict[str, Any]:
    return torch.load(workdir / "data.pt", weights_only=False)


def _targets(data: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    return {"e": torch.tensor([data["e"][i] for i in idx]), "f": [data["f"][i] for i in idx]}


def _criterion() -> Any:
    from chgnet.trainer.trainer import CombinedLoss

    return CombinedLoss(target_str="ef", criterion="MAE", energy_loss_ratio=1, force_loss_ratio=1)


# ----------------------------------------------------------------------------- children
def child_trainer(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from chgnet.data.dataset import collate_graphs
    from chgnet.trainer import Trainer
    from torch.utils.data import DataLoader

    data = _load_data(workdir)
    model = _load_model()
    items = [
        (g, {"e": torch.tensor(e), "f": f})
        for g, e, f in zip(data["graphs"], data["e"], data["f"], strict=True)
    ]
    loader = DataLoader(items, batch_size=args.batch_size, shuffle=False, collate_fn=collate_graphs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(
            model, targets="ef", criterion="MAE", optimizer="Adam", learning_rate=1e-3,
            epochs=args.epochs, use_device="cpu", print_freq=10**9,
        )  # fmt: skip
    trainable = sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})
    assert trainable == ["mlp"], trainable
    times = []
    for epoch in range(args.epochs):
        t = time.perf_counter()
        trainer._train(loader, epoch)
        times.append(time.perf_counter() - t)
    return {"epoch_s": times, "n_batches": len(loader), "peak_rss_mb": _peak_rss_mb()}


def child_build(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from kd_nnp.training.features import FeatureCache

    data = _load_data(workdir)
    cache = FeatureCache(Path(args.cache_dir), _load_model())
    per_frame = []
    for g in data["graphs"]:
        t = time.perf_counter()
        built = cache.n_builds
        cache.get(g, forces=True, stress=False)
        per_frame.append(
            {
                "n_atoms": int(g.atomic_number.shape[0]),
                "seconds": time.perf_counter() - t,
                "built": cache.n_builds > built,
            }
        )
    disk = sum(p.stat().st_size for p in Path(args.cache_dir).rglob("*.npy"))
    return {"frames": per_frame, "disk_bytes": disk, "peak_rss_mb": _peak_rss_mb()}


def child_cached(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from kd_nnp.training.features import FeatureCache, predict_from_features

    data = _load_data(workdir)
    model = _load_model()
    cache = FeatureCache(Path(args.cache_dir), model)
    t = time.perf_counter()
    feats = [cache.get(g, forces=True, stress=False) for g in data["graphs"]]
    load_s = time.perf_counter() - t
    assert cache.n_builds == 0, "the build child should have filled the cache"
    criterion = _criterion()
    optimizer = torch.optim.Adam(model.mlp.parameters(), lr=1e-3)
    index_batches = _batches(list(range(len(feats))), args.batch_size)
    times = []
    for _ in range(args.epochs):
        t = time.perf_counter()
        for idx in index_batches:
            pred = predict_from_features(
                model.mlp, model.readout_norm, [feats[i] for i in idx], forces=True, stress=False
            )
            loss = criterion(_targets(data, idx), pred)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - t)
    return {"epoch_s": times, "load_s": load_s, "peak_rss_mb": _peak_rss_mb()}


def run_child(mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE), "--child", mode, "--workdir", str(workdir)]
    for key in ("batch_size", "epochs", "cache_dir"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- parent
def check_step0(data: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """Loss and MLP gradients at step 0 on the first batch, both paths, same model."""
    from kd_nnp.training.features import FeatureCache, predict_from_features, predict_full

    model = _load_model()
    cache = FeatureCache(Path(args.cache_dir), model)
    idx = list(range(min(args.batch_size, len(data["graphs"]))))
    graphs = [data["graphs"][i] for i in idx]
    criterion = _criterion()
    params = list(model.mlp.parameters())
    loss_full = criterion(
        _targets(data, idx), predict_full(model, graphs, forces=True, stress=False)
    )
    g_full = torch.autograd.grad(loss_full["loss"], params)
    feats = [cache.get(g, forces=True, stress=False) for g in graphs]
    pred = predict_from_features(model.mlp, model.readout_norm, feats, forces=True, stress=False)
    loss_cached = criterion(_targets(data, idx), pred)
    g_cached = torch.autograd.grad(loss_cached["loss"], params)
    lf, lc = float(loss_full["loss"]), float(loss_cached["loss"])
    diff = max(float((a - b).abs().max()) for a, b in zip(g_cached, g_full, strict=True))
    scale = max(float(b.abs().max()) for b in g_full)
    return {"loss_full": lf, "loss_cached": lc, "loss_rel_diff": abs(lf - lc) / abs(lf),
            "grad_max_abs_diff": diff, "grad_max_abs": scale}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8, help="number of frames (default 8)")
    ap.add_argument("--min-atoms", type=int, default=48)
    ap.add_argument("--max-atoms", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None, help="feature cache (default: fresh temp dir)")
    ap.add_argument("--child", choices=["trainer", "build", "cached"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    set_threads(1)

    if args.child:
        fn = {"trainer": child_trainer, "build": child_build, "cached": child_cached}[args.child]
        print(json.dumps(fn(args, Path(args.workdir))))
        return

    with tempfile.TemporaryDirectory(prefix="kd_nnp_bench_") as tmp:
        workdir = Path(tmp)
        if args.cache_dir is None:
            args.cache_dir = str(workdir / "features")
        t0 = time.perf_counter()
        data = make_dataset(args, workdir)
        sizes = [int(g.atomic_number.shape[0]) for g in data["graphs"]]
        print(f"{len(sizes)} frames, {min(sizes)}-{max(sizes)} atoms (mean {np.mean(sizes):.0f}), "
              f"batch {args.batch_size}, {args.epochs} epochs, 1 thread")  # fmt: skip
        trainer = run_child("trainer", args, workdir)
        build = run_child("build", args, workdir)
        cached = run_child("cached", args, workdir)
        check = check_step0(data, args)

    built = [f for f in build["frames"] if f["built"]]
    t_tr = float(np.mean(trainer["epoch_s"][1:] or trainer["epoch_s"]))
    t_ca = float(np.mean(cached["epoch_s"][1:] or cached["epoch_s"]))
    nb = trainer["n_batches"]
    print("\n(a) epoch time (mean over epochs after the first; all epochs listed)")
    print(f"    chgnet Trainer : {t_tr:9.3f} s/epoch  {t_tr / nb * 1e3:9.1f} ms/step   "
          f"{[round(t, 3) for t in trainer['epoch_s']]}")  # fmt: skip
    print(f"    kd_nnp cached  : {t_ca:9.3f} s/epoch  {t_ca / nb * 1e3:9.1f} ms/step   "
          f"{[round(t, 4) for t in cached['epoch_s']]}")  # fmt: skip
    print(f"    speed-up       : {t_tr / t_ca:9.0f} x   (loading {len(sizes)} mmapped frames: "
          f"{cached['load_s'] * 1e3:.0f} ms)")  # fmt: skip
    print("\n(b) one-time cache build (h + dh/dR), per frame")
    for f in build["frames"]:
        print(f"    {f['n_atoms']:4d} atoms: {f['seconds']:7.1f} s"
              + ("" if f["built"] else "  (already cached)"))  # fmt: skip
    if built:
        per_atom2 = np.mean([f["seconds"] / f["n_atoms"] ** 2 for f in built])
        total = sum(f["seconds"] for f in built)
        print(f"    total {total:.0f} s = {total / t_tr:.1f} Trainer epochs; "
              f"~{per_atom2 * 1e3:.2f} ms x N^2 per frame")  # fmt: skip
    print(f"    on disk: {build['disk_bytes'] / 1e6:.1f} MB for {len(sizes)} frames")
    print("\n(c) step 0, first batch, same model")
    print(f"    loss full {check['loss_full']:.6f}  cached {check['loss_cached']:.6f}  "
          f"rel diff {check['loss_rel_diff']:.1e}")  # fmt: skip
    print(f"    MLP gradients: max |diff| {check['grad_max_abs_diff']:.2e} "
          f"(max |grad| {check['grad_max_abs']:.2e})")  # fmt: skip
    print("\n(d) peak RSS (each in its own process)")
    print(f"    chgnet Trainer : {trainer['peak_rss_mb']:8.0f} MB")
    print(f"    cache build    : {build['peak_rss_mb']:8.0f} MB")
    print(
        f"    kd_nnp cached  : {cached['peak_rss_mb']:8.0f} MB   "
        f"(ratio Trainer/cached {trainer['peak_rss_mb'] / cached['peak_rss_mb']:.1f})"
    )
    print(f"\ntotal bench time {time.perf_counter() - t0:.0f} s")
    ok = check["loss_rel_diff"] < 1e-5
    if not ok:
        raise SystemExit("step-0 loss differs between the paths by more than 1e-5 (relative)")


if __name__ == "__main__":
    main()
