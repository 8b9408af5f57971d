"""Exact derivative caches per scheme, and a force + stress training epoch vs chgnet's Trainer.

    .venv/bin/python experiments/bench/run_all.py --only cache [--quick]

(issue 16) Two measurements, each in its own process, one thread:

- ``schemes``: for real test.db crystals of about 50, 100 and 200 atoms, the one-time build
  seconds and bytes per frame of the cached features with

  * ``full``      dh/dR for all 3N position directions (the cache of issue 6),
  * ``M=2/4/8``   dh/dR for the 3M directions of M force atoms (``data.force_atoms``),
  * ``strain``    the 6 symmetric strain directions only (stress terms),
  * ``M=4+strain`` the demo-like force + stress cache.

  Builds that would take longer than ``full_limit_directions`` directions (full at ~200
  atoms: ~600 directions) are timed on their first ``chunk`` directions and scaled by the
  number of directions (the build is a loop over independent chunks); such rows say
  EXTRAPOLATED.
- ``epoch``: training epochs on the same frames with soft energy + forces + stress, chgnet's
  ``Trainer`` (``targets="efs"``, MLP only, autograd through the backbone every step) vs
  kd_nnp's cached backend with ``force_atoms=4`` and stress (after the one-time build, which
  is reported beside it). Target: >= 50x.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_training  # noqa: E402
import common  # noqa: E402

HERE = Path(__file__).resolve()
SCHEMES = ("full", "M=2", "M=4", "M=8", "strain", "M=4+strain")


def _scheme(name: str) -> tuple[bool, bool, int | None]:
    """(forces, stress, M) of a scheme name."""
    if name == "full":
        return True, False, None
    if name == "strain":
        return False, True, None
    m = int(name.split("+")[0][2:])
    return True, name.endswith("+strain"), m


def child_schemes(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build time and size of each scheme on one crystal (parent structure, one thread)."""
    import torch
    from pymatgen.io.ase import AseAtomsAdaptor

    from kd_nnp.data.sources.pyxtal_db import pyxtal_frames
    from kd_nnp.training.cache.features import graph_hash
    from kd_nnp.training.jacobian import compute_features, jacobian_nbytes, select_force_atoms
    from kd_nnp.utils.memory import keep_freed_memory

    keep_freed_memory()  # as the pipeline's build processes do
    device = cfg.get("device", "cpu")
    model = common.load_chgnet()
    (frame,) = pyxtal_frames("test", codes=[cfg["code"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = model.graph_converter(AseAtomsAdaptor.get_structure(frame.atoms))
    key = graph_hash(graph)
    model, graph = model.to(device), graph.to(device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    n = len(frame.atoms)
    t = time.perf_counter()
    with torch.no_grad():
        model([graph], task="e")
    sync()
    out: dict[str, Any] = {"code": cfg["code"], "n_atoms": n, "forward_s": 0.0, "schemes": {},
                           "device": device}  # fmt: skip
    out["forward_s"] = time.perf_counter() - t
    compute_features(model, graph, forces=False, stress=False)  # warm-up (first-call costs)
    for name in cfg["schemes"]:
        forces, stress, m = _scheme(name)
        index = select_force_atoms(frame.atoms.numbers, m, key) if m else None
        n_force = n if (forces and index is None) else (len(index) if forces else 0)
        n_dir = 3 * n_force + (6 if stress else 0)
        rec: dict[str, Any] = {"directions": n_dir, "extrapolated": False,
                               "nbytes": jacobian_nbytes(n, stress, forces=forces,
                                                         force_atoms=m)}  # fmt: skip
        if n_dir > cfg["full_limit_directions"]:
            # time the first chunks only; the build is a loop over independent chunks
            sub = np.arange(max(1, cfg["chunk"] // 3))
            sync()
            t = time.perf_counter()
            compute_features(model, graph, forces=True, stress=False, force_atoms=sub)
            sync()
            timed = time.perf_counter() - t
            rec.update(seconds=timed * n_dir / (3 * len(sub)), extrapolated=True,
                       timed_directions=3 * len(sub), timed_s=timed)  # fmt: skip
        else:
            sync()
            t = time.perf_counter()
            compute_features(model, graph, forces=forces, stress=stress, force_atoms=index)
            sync()
            rec["seconds"] = time.perf_counter() - t
        out["schemes"][name] = rec
    return out


def child_cached_fs(cfg: dict[str, Any]) -> dict[str, Any]:
    """kd_nnp cached backend, E + F (M atoms) + S on the hard labels, epochs timed."""
    import torch

    from kd_nnp.training.cache.attach import attach_feature_cache
    from kd_nnp.training.data import FramesDataModule
    from kd_nnp.training.loss import DistillationLoss
    from kd_nnp.training.module import DistillationModule

    dm = FramesDataModule(
        store=cfg["store"], label_set=None, n_val=0, batch_size=cfg["batch_size"],
        use_soft=False, reference="none", shuffle=False, seed=0, force_atoms=cfg["force_atoms"],
    )  # fmt: skip
    dm.setup("fit")
    loss = DistillationLoss(r_he=1.0, r_hf=1.0, r_se=0.0, r_sf=0.0, r_hs=0.1)
    module = DistillationModule(
        student={"model_name": "0.3.0", "freeze": "mlp"}, loss=loss,
        optimizer=functools.partial(torch.optim.Adam, lr=bench_training.LR),
        backend="cached",
    )  # fmt: skip
    t = time.perf_counter()
    stats = attach_feature_cache(dm, module, prebuild=True)
    build_s = time.perf_counter() - t
    timer = bench_training._epoch_timer()
    trainer = bench_training._lightning_trainer(cfg["epochs"], [timer])
    trainer.fit(module, datamodule=dm)
    compute = bench_training.compute_epochs(module, dm, cfg["epochs"])
    return {"epoch_s": timer.times, "compute_epoch_s": compute, "build_s": build_s,
            "feature_cache": stats, "n_frames": len(dm.train_samples)}  # fmt: skip


CHILDREN = {"schemes": child_schemes, "cached_fs": child_cached_fs}


def run(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    workdir = Path(workdir)
    res: dict[str, Any] = {"config": dict(cfg), "sizes": [], "errors": {}}
    for code in cfg["codes"]:
        t = time.perf_counter()
        child_cfg = {"code": code, "schemes": list(cfg["schemes"]), "chunk": 16,
                     "full_limit_directions": cfg["full_limit_directions"],
                     "device": cfg.get("device", "cpu")}  # fmt: skip
        try:
            res["sizes"].append(common.run_child(HERE, "schemes", child_cfg, workdir / "logs",
                                                 timeout=cfg.get("timeout", 1200)))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reported in the table
            res["errors"][f"schemes {code}"] = common.error_summary(exc)
        print(f"  cache/schemes {code}: {time.perf_counter() - t:.0f} s", flush=True)
    if cfg.get("device", "cpu") != "cpu":  # the GPU script measures the builds only
        return res
    # the epoch comparison on the training section's kind of frames
    store, info = common.prepare_store(workdir, cfg["epoch_codes"], 1, 1)
    res["epoch_frames"] = info
    cache = workdir / "cache_fs"
    if cache.exists():  # the build is measured every run
        import shutil

        shutil.rmtree(cache)
    env = {"KD_NNP_CACHE": str(cache)}
    base = {"store": str(store), "batch_size": cfg["batch_size"], "epochs": cfg["epochs"],
            "force_atoms": cfg["force_atoms"], "targets": "efs",
            "manifest": str(workdir / "cache_manifest.json")}  # fmt: skip
    Path(base["manifest"]).unlink(missing_ok=True)
    for name, script in (("trainer", bench_training.HERE), ("cached_fs", HERE)):
        t = time.perf_counter()
        try:
            res[name] = common.run_child(script, name, base, workdir / "logs",
                                         timeout=cfg.get("timeout", 1200), env_extra=env)  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            res["errors"][name] = common.error_summary(exc)
        print(f"  cache/{name}: {time.perf_counter() - t:.0f} s", flush=True)
    return res


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    out, row = common.table_rows("cache")
    for size in res.get("sizes", []):
        n = size["n_atoms"]
        full = size["schemes"].get("full")
        for name, rec in size["schemes"].items():
            note = f"{rec['directions']} directions"
            if rec["extrapolated"]:
                note += (f"; EXTRAPOLATED from {rec['timed_directions']} directions timed in "
                         f"{rec['timed_s']:.1f} s")  # fmt: skip
            if full and name != "full":
                note += f"; {full['seconds'] / rec['seconds']:.0f}x faster than full"
            dev = "" if size.get("device", "cpu") == "cpu" else f" [{size['device']}]"
            row(f"build {name}, {size['code']} ({n} atoms){dev}",
                f"{rec['seconds']:.1f} s, {rec['nbytes'] / 1e6:.2f} MB", note)  # fmt: skip
    tr, fs = res.get("trainer"), res.get("cached_fs")
    if tr and fs:
        t_tr = bench_training._steady(tr["epoch_s"])
        t_fs = bench_training._steady(fs["epoch_s"])
        t_c = bench_training._steady(fs["compute_epoch_s"])
        ratio = t_tr / t_fs
        row(f"epoch E+F+S: chgnet Trainer (all forces) vs cached (M={res['config']['force_atoms']} "
            f"+ strain), {fs['n_frames']} frames",
            f"{t_tr:.2f} s vs {t_fs:.3f} s = {ratio:.0f}x",
            f"compute only {t_tr / t_c:.0f}x; one-time build {fs['build_s']:.0f} s "
            f"(= {fs['build_s'] / t_tr:.1f} Trainer epochs)", ratio >= 50)  # fmt: skip
    for what, err in res.get("errors", {}).items():
        row(what, "FAILED", err, False)
    return out


if __name__ == "__main__":
    if not common.child_main(CHILDREN):
        print(json.dumps(run({"codes": sys.argv[1:] or ["BENZEN"], "schemes": list(SCHEMES),
                              "full_limit_directions": 320, "epoch_codes": ["OXALAC11"],
                              "batch_size": 2, "epochs": 2, "force_atoms": 4},
                             Path("outputs/bench/work")), default=float)[:2000])  # fmt: skip
