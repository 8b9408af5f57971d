"""MLP-only training: chgnet's Trainer (autograd through the frozen backbone every step)
vs kd_nnp's DistillationModule with the cached-feature and the full backend, side by side.

    .venv/bin/python experiments/bench/bench_training.py [--codes BENZEN,NACJAF,ACSALA]
        [--n-strain 1 --n-rattle 1] [--batch-size 4] [--epochs 3]

(``run_all.py --only training`` runs the same thing and prints it in the common table.)

Frames: real organic crystals of pyxtal's shipped ``test.db`` perturbed by kd_nnp
(:func:`common.perturbed_frames`), written to a frames store with stand-in labels
(:func:`common.child_prepare`). All paths read the same frames in the same order (the data
module's, unshuffled) with the same batch size, and minimise the same MAE energy (per atom)
+ force loss (chgnet's ``CombinedLoss(criterion="MAE")`` = kd_nnp's ``DistillationLoss(r_he=1,
r_hf=1)``) with Adam, lr 1e-3, only ``model.mlp`` trainable, one thread. Graph conversion is
excluded (done once into kd_nnp's graph cache, timed separately). Each measurement runs in
its own process so that its peak RSS (``VmHWM``) is its own:

- ``build``:   FramesDataModule setup (graph cache) + one-time ``FeatureCache.get`` per frame;
- ``trainer``: ``chgnet.trainer.Trainer._train`` epochs over the same graphs;
- ``cached``:  ``lightning.Trainer.fit`` of ``DistillationModule(backend="cached")`` on the
  ``FramesDataModule`` (the real kd_nnp path, data loading included), then the same steps on
  pre-collated batches (compute only);
- ``full``:    the same module with ``backend="full"`` (chgnet's forward inside kd_nnp),
  then the check: step 0 on the first batch, loss and MLP gradients of chgnet's forward +
  ``CombinedLoss`` vs kd_nnp's cached and full backends, one fresh model.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HERE = Path(__file__).resolve()
LR = 1e-3
GB = 1e9


# ----------------------------------------------------------------------------- helpers
def _datamodule(cfg: dict[str, Any]) -> Any:
    from kd_nnp.training.data import FramesDataModule

    return FramesDataModule(
        store=cfg["store"], label_set=None, n_val=0, batch_size=cfg["batch_size"],
        use_soft=False, reference="none", shuffle=False, seed=0,
    )  # fmt: skip


def _module(backend: str) -> Any:
    import torch

    from kd_nnp.training.loss import DistillationLoss
    from kd_nnp.training.module import DistillationModule

    loss = DistillationLoss(r_he=1.0, r_hf=1.0, r_se=0.0, r_sf=0.0)
    return DistillationModule(
        student={"model_name": "0.3.0", "freeze": "mlp"}, loss=loss, optimizer=functools.partial(torch.optim.Adam, lr=LR),
        compute_stress=False, backend=backend,
    )  # fmt: skip


def _epoch_timer() -> Any:
    import lightning as L

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self._t = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            self.times.append(time.perf_counter() - self._t)

    return EpochTimer()


def _lightning_trainer(epochs: int, callbacks: list[Any]) -> Any:
    import lightning as L

    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        inference_mode=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=callbacks,
    )  # fmt: skip


# ----------------------------------------------------------------------------- children
def child_build(cfg: dict[str, Any]) -> dict[str, Any]:
    """Graph cache + one-time feature build of every frame; writes the frame order."""
    from kd_nnp.training.cache.features import FeatureCache
    from kd_nnp.training.cache.graphs import GraphCache
    from kd_nnp.training.jacobian import jacobian_nbytes
    from kd_nnp.utils.paths import cache_dir

    t = time.perf_counter()
    dm = _datamodule(cfg)
    dm.setup("fit")
    graph_s = time.perf_counter() - t
    cache = FeatureCache(cache_dir() / "features", common.load_chgnet())
    frames = []
    for s in dm.train_samples:
        g = GraphCache.load(s.graph_path)
        t = time.perf_counter()
        before = cache.n_builds
        cache.get(g, forces=True, stress=False)
        frames.append({"frame_id": s.frame_id, "n_atoms": s.n_atoms,
                       "seconds": time.perf_counter() - t, "built": cache.n_builds > before,
                       "nbytes": jacobian_nbytes(s.n_atoms, False)})  # fmt: skip
    manifest = [{"frame_id": s.frame_id, "graph": str(s.graph_path)} for s in dm.train_samples]
    Path(cfg["manifest"]).write_text(json.dumps(manifest))
    disk = sum(p.stat().st_size for p in (cache_dir() / "features").rglob("*.npy"))
    return {"graph_s": graph_s, "graphs_built": dm.summary["graphs_built"], "frames": frames,
            "disk_bytes": disk}  # fmt: skip


def child_trainer(cfg: dict[str, Any]) -> dict[str, Any]:
    """chgnet's own Trainer, MLP only, MAE energy + forces (+ stress: ``targets="efs"``)."""
    import torch
    from chgnet.data.dataset import collate_graphs
    from chgnet.trainer import Trainer
    from torch.utils.data import DataLoader

    from kd_nnp.data.store import FrameStore
    from kd_nnp.training.cache.graphs import GraphCache

    if not Path(cfg["manifest"]).is_file():  # no build child ran: the data module's order
        dm = _datamodule(cfg)
        dm.setup("fit")
        manifest = [{"frame_id": s.frame_id, "graph": str(s.graph_path)} for s in dm.train_samples]
        Path(cfg["manifest"]).write_text(json.dumps(manifest))
    manifest = json.loads(Path(cfg["manifest"]).read_text())
    targets = cfg.get("targets", "ef")
    store = FrameStore(cfg["store"])
    items = []
    for m in manifest:
        fr = store.get(m["frame_id"])
        lab = {
            "e": torch.tensor(fr.hard.energy / fr.n_atoms, dtype=torch.float32),
            "f": torch.tensor(np.asarray(fr.hard.forces), dtype=torch.float32),
        }
        if "s" in targets:  # chgnet's stress target: GPa, 3x3, ASE's sign
            from ase.stress import voigt_6_to_full_3x3_stress

            s = voigt_6_to_full_3x3_stress(np.asarray(fr.hard.stress)) * 160.21766208
            lab["s"] = torch.tensor(s, dtype=torch.float32)
        items.append((GraphCache.load(Path(m["graph"])), lab))
    model = common.load_chgnet()
    loader = DataLoader(items, batch_size=cfg["batch_size"], shuffle=False,
                        collate_fn=collate_graphs)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(
            model, targets=targets, criterion="MAE", optimizer="Adam", learning_rate=LR,
            epochs=cfg["epochs"], use_device="cpu", print_freq=10**9,
        )  # fmt: skip
    trainable = sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})
    assert trainable == ["mlp"], trainable
    rss0 = common.rss_mb()
    times = []
    for epoch in range(cfg["epochs"]):
        t = time.perf_counter()
        trainer._train(loader, epoch)
        times.append(time.perf_counter() - t)
    return {"epoch_s": times, "n_batches": len(loader), "rss_before_mb": rss0}


def child_kdnnp(cfg: dict[str, Any]) -> dict[str, Any]:
    """kd_nnp's DistillationModule through lightning (backend from cfg), data module included."""

    from kd_nnp.training.cache.attach import attach_feature_cache
    from kd_nnp.training.jacobian import jacobian_nbytes

    backend = cfg["backend"]
    dm = _datamodule(cfg)
    dm.setup("fit")
    module = _module(backend)
    rss0 = common.rss_mb()
    stats: dict[str, Any] = {}
    if backend != "full":
        stats = attach_feature_cache(dm, module, prebuild=True)
    rss_feats = common.rss_mb()
    # largest frame for which 1000 cached frames plus this process fit 3 GB, all resident
    n_max = 1
    while rss0 * 1e6 + 1000 * jacobian_nbytes(n_max + 1, False) <= 3 * GB:
        n_max += 1
    timer = _epoch_timer()
    trainer = _lightning_trainer(cfg["epochs"], [timer])
    t = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - t
    out: dict[str, Any] = {"epoch_s": timer.times, "fit_s": fit_s, "rss_before_mb": rss0,
                           "rss_after_attach_mb": rss_feats, "feature_cache": stats,
                           "n_max_1000_3gb": n_max, "rss_after_fit": common.rss_parts_mb(),
                           "n_batches": len(dm.train_dataloader())}  # fmt: skip
    if backend != "full":
        # the data loader alone (graph file + feature-cache lookup per frame, collate)
        times = []
        for _ in range(cfg["epochs"]):
            t = time.perf_counter()
            for _batch in dm.train_dataloader():
                pass
            times.append(time.perf_counter() - t)
        out["loader_epoch_s"] = times
        out["compute_epoch_s"] = compute_epochs(module, dm, cfg["epochs"])
    else:  # step-0 check in this process (saves a process start): a fresh module
        out["check"] = child_check(cfg)
    return out


def compute_epochs(module: Any, dm: Any, epochs: int) -> list[float]:
    """Seconds per epoch of the module's steps on pre-collated batches: compute only (no
    loader, no Lightning), Adam at LR."""
    import torch

    batches = list(dm.train_dataloader())
    opt = torch.optim.Adam([p for p in module.student.parameters() if p.requires_grad], lr=LR)
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        for batch in batches:
            with torch.enable_grad():
                loss = module.loss_fn(module(batch), batch).total
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t)
    return times


def child_check(cfg: dict[str, Any]) -> dict[str, Any]:
    """Step 0, first batch, one model: chgnet forward + CombinedLoss vs kd_nnp backends."""
    from dataclasses import replace

    import torch
    from chgnet.trainer.trainer import CombinedLoss

    from kd_nnp.training.cache.attach import attach_feature_cache
    from kd_nnp.training.cache.graphs import GraphCache
    from kd_nnp.training.predict import predict_full

    dm = _datamodule(cfg)
    dm.setup("fit")
    module = _module("cached")
    attach_feature_cache(dm, module, prebuild=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch.features is not None, "the first batch has no cached features"
    if not batch.graphs:  # a cached batch may come without graphs: the full path needs them
        by_id = {s.frame_id: s for s in dm.train_samples}
        graphs = [GraphCache.load(by_id[f].graph_path) for f in batch.frame_ids]
        batch = replace(batch, graphs=graphs)
    params = [p for p in module.student.mlp.parameters()]
    sizes = batch.n_atoms.tolist()
    targets = {"e": batch.hard.energy, "f": list(torch.split(batch.hard.forces, sizes))}
    criterion = CombinedLoss(target_str="ef", criterion="MAE", energy_loss_ratio=1,
                             force_loss_ratio=1)  # fmt: skip
    pred = predict_full(module.student, batch.graphs, forces=True, stress=False)
    loss_chgnet = criterion(targets, pred)["loss"]
    g_chgnet = torch.autograd.grad(loss_chgnet, params)
    out: dict[str, Any] = {"frame_ids": batch.frame_ids, "loss_chgnet": float(loss_chgnet)}
    scale = max(float(g.abs().max()) for g in g_chgnet)
    out["grad_max_abs"] = scale
    for backend in ("cached", "full"):
        module.backend = backend
        with torch.enable_grad():
            loss = module.loss_fn(module(batch), batch).total
        grads = torch.autograd.grad(loss, params)
        diff = max(float((a - b).abs().max()) for a, b in zip(grads, g_chgnet, strict=True))
        out[f"loss_{backend}"] = float(loss)
        out[f"loss_rel_diff_{backend}"] = abs(float(loss) - float(loss_chgnet)) / abs(
            float(loss_chgnet)
        )
        out[f"grad_max_abs_diff_{backend}"] = diff
    return out


CHILDREN = {
    "build": child_build,
    "trainer": child_trainer,
    "cached": child_kdnnp,
    "full": child_kdnnp,  # + the step-0 check
    "check": child_check,
}


# ----------------------------------------------------------------------------- parent
def run(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The whole section; each child's failure is recorded, the others still run."""
    workdir = Path(workdir)
    store, info = common.prepare_store(workdir, cfg["codes"], cfg["n_strain"], cfg["n_rattle"])
    res: dict[str, Any] = {"config": dict(cfg), "store": str(store), "frames": info,
                           "errors": {}}  # fmt: skip
    base = {"store": str(store), "batch_size": cfg["batch_size"], "epochs": cfg["epochs"],
            "manifest": str(workdir / "train_manifest.json")}  # fmt: skip
    cache = workdir / "train_cache"
    if cache.exists():  # a fresh feature cache: the build is measured every run
        import shutil

        shutil.rmtree(cache)
    env = {"KD_NNP_CACHE": str(cache)}
    timeout = cfg.get("timeout", 1200)
    for name in ("build", "trainer", "cached", "full"):
        if name != "build" and "build" in res["errors"]:
            res["errors"][name] = "skipped: the build child failed"
            continue
        child_cfg = dict(base, backend=name)
        t = time.perf_counter()
        try:
            res[name] = common.run_child(HERE, name, child_cfg, workdir / "logs",
                                         timeout=timeout, env_extra=env)  # fmt: skip
            if "check" in res[name]:
                res["check"] = res[name].pop("check")
        except Exception as exc:  # noqa: BLE001 - reported in the table
            res["errors"][name] = common.error_summary(exc)
            res.setdefault("tracebacks", {})[name] = common.format_exc(exc)
        print(f"  training/{name}: {time.perf_counter() - t:.0f} s"
              + (f"  FAILED {res['errors'][name]}" if name in res["errors"] else ""),
              flush=True)  # fmt: skip
    return res


def _steady(times: list[float]) -> float:
    """Mean epoch time after the first epoch (which pages in caches, starts Lightning)."""
    return float(np.mean(times[1:] or times))


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows of this section (see run_all.py)."""
    sec = "training"
    out, row = common.table_rows(sec)
    err = res.get("errors", {})

    n_atoms = res.get("frames", {}).get("n_atoms", [])
    if n_atoms:
        c = res["config"]
        row("frames (test.db, perturbed)",
            f"{len(n_atoms)} x {min(n_atoms)}-{max(n_atoms)} atoms (mean {np.mean(n_atoms):.0f})",
            f"batch {c['batch_size']}, {c['epochs']} epochs, 1 thread")  # fmt: skip
    for name in ("build", "trainer", "cached", "full", "check"):
        if name in err:
            row(f"{name} child", "FAILED", err[name], False)
    tr, ca, fu = res.get("trainer"), res.get("cached"), res.get("full")
    t_tr = _steady(tr["epoch_s"]) if tr else None
    if tr:
        row(
            "chgnet Trainer epoch",
            f"{t_tr:.3f} s",
            f"{t_tr / tr['n_batches'] * 1e3:.0f} ms/step; epochs {_fmt_list(tr['epoch_s'])}",
        )
    if ca:
        t = _steady(ca["epoch_s"])
        row("kd_nnp cached epoch (lightning + loader)", f"{t:.3f} s",
            f"{t_tr / t:.0f}x faster than Trainer" if t_tr else "")  # fmt: skip
        if "loader_epoch_s" in ca:
            tl = _steady(ca["loader_epoch_s"])
            row("  of which the data loader alone", f"{tl:.4f} s",
                "FramesDataset (feature lookup per frame) + collate, no compute")  # fmt: skip
        if "compute_epoch_s" in ca:
            tc = _steady(ca["compute_epoch_s"])
            row("kd_nnp cached epoch (compute only)", f"{tc:.4f} s",
                f"{t_tr / tc:.0f}x faster than Trainer" if t_tr else "")  # fmt: skip
    if fu:
        t = _steady(fu["epoch_s"])
        row("kd_nnp full-backend epoch", f"{t:.3f} s",
            f"{t / t_tr:.2f}x the Trainer's time" if t_tr else "")  # fmt: skip
    b = res.get("build")
    if b:
        built = [f for f in b["frames"] if f["built"]]
        total = sum(f["seconds"] for f in built)
        per = np.mean([f["seconds"] / f["n_atoms"] ** 2 for f in built]) if built else float("nan")
        row("one-time feature build (h, dh/dR)", f"{total:.1f} s",
            f"{len(built)} frames, {per * 1e3:.1f} ms x N^2 per frame"
            + (f"; = {total / t_tr:.1f} Trainer epochs" if t_tr else ""))  # fmt: skip
        row("one-time graph conversion", f"{b['graph_s']:.1f} s", f"{b['graphs_built']} graphs")
        row(
            "feature cache on disk",
            f"{b['disk_bytes'] / 1e6:.1f} MB",
            f"{sum(f['nbytes'] for f in b['frames']) / 1e6:.1f} MB by jacobian_nbytes",
        )
    ck = res.get("check")
    if ck:
        for backend in ("cached", "full"):
            rel = ck[f"loss_rel_diff_{backend}"]
            row(f"step-0 loss, chgnet vs kd_nnp {backend}",
                f"{ck['loss_chgnet']:.6f} vs {ck[f'loss_{backend}']:.6f}",
                f"rel diff {rel:.1e} (target <= 1e-5)", rel <= 1e-5)  # fmt: skip
            d = ck[f"grad_max_abs_diff_{backend}"]
            row(f"step-0 MLP gradients, chgnet vs kd_nnp {backend}", f"max |diff| {d:.1e}",
                f"max |grad| {ck['grad_max_abs']:.2e}; rel {d / ck['grad_max_abs']:.1e}",
                d <= 1e-4 * ck["grad_max_abs"])  # fmt: skip
    peaks = {k: res[k]["peak_rss_mb"] for k in ("trainer", "build", "cached", "full") if k in res}
    for k, label in (("trainer", "chgnet Trainer"), ("build", "feature build"),
                     ("cached", "kd_nnp cached"), ("full", "kd_nnp full")):  # fmt: skip
        if k in peaks:
            extra = ""
            if k == "cached" and "trainer" in peaks:
                extra = f"Trainer/cached = {peaks['trainer'] / peaks[k]:.1f}x"
            row(f"peak RSS, {label}", f"{peaks[k]:.0f} MB", extra)
    if b and ca:
        out.extend(_memory_rows(res))
    return out


def _memory_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    b, ca = res["build"], res["cached"]
    n = [f["n_atoms"] for f in b["frames"]]
    per_frame = float(np.mean([f["nbytes"] for f in b["frames"]]))
    base = ca["rss_before_mb"] * 1e6
    bs = res["config"]["batch_size"]
    all_resident = base + 1000 * per_frame
    working = base + bs * max(f["nbytes"] for f in b["frames"])
    n_max = ca["n_max_1000_3gb"]
    parts = ca.get("rss_after_fit", {})
    out = []

    def row(what: str, value: str, compare: str = "", ok: bool | None = None) -> None:
        out.append({"section": "training", "what": what, "value": value, "compare": compare,
                    "ok": ok})  # fmt: skip

    row(
        "cache bytes per frame (jacobian_nbytes, mean)",
        f"{per_frame / 1e6:.2f} MB",
        f"mean {np.mean(n):.0f} atoms, {len(n)} frames",
    )
    if parts:
        row(
            "RSS of the cached process after its epochs",
            f"{parts['anon']:.0f} MB private",
            f"+ {parts['file']:.0f} MB file-backed (libraries + the memory-mapped features, "
            f"{len(n) * per_frame / 1e6:.1f} MB of which are features)",
        )
    row("EXTRAPOLATED 1000 frames, all features resident",
        f"{all_resident / GB:.2f} GB",
        f"{base / 1e6:.0f} MB base + 1000 x {per_frame / 1e6:.2f} MB; target <= 3 GB; "
        f"fits for frames <= {n_max} atoms", all_resident <= 3 * GB)  # fmt: skip
    row("EXTRAPOLATED 1000 frames, mmap working set", f"{working / GB:.2f} GB",
        f"base + one batch of {bs}; the other pages are clean, reclaimable page cache; "
        f"disk {1000 * per_frame / GB:.1f} GB")  # fmt: skip
    return out


def _fmt_list(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in xs) + "]"


def main() -> None:
    if common.child_main(CHILDREN):
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codes", default="BENZEN,NACJAF,ACSALA",
                    help="test.db csd codes (comma separated)")  # fmt: skip
    ap.add_argument("--n-strain", type=int, default=1)
    ap.add_argument("--n-rattle", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="default: a temporary folder")
    args = ap.parse_args()
    cfg = {"codes": args.codes.split(","), "n_strain": args.n_strain, "n_rattle": args.n_rattle,
           "batch_size": args.batch_size, "epochs": args.epochs}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kd_bench_train_") as tmp:
        res = run(cfg, Path(args.workdir or tmp))
    for r in rows(res):
        flag = {True: "ok", False: "MISS", None: ""}[r["ok"]]
        print(f"{r['what']:<50} {r['value']:<28} {r['compare']} {flag}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
