"""A loss-ratio sweep through the real CLI: ``kd-nnp train -m loss.r_he=... loss.r_hf=...``
(5 x 5 = 25 jobs, Hydra's basic launcher: one process, jobs one after the other) vs one job,
all with the cached-feature backend and one shared ``KD_NNP_CACHE`` (graph cache + feature
cache), on the same frames store.

    .venv/bin/python experiments/bench/bench_sweep.py [--codes ...] [--grid 0.1,0.3,1,3,10]

Measured, one after the other, each a fresh ``kd-nnp train`` process:

1. cold single job: empty ``KD_NNP_CACHE``; builds the graphs, the pretrained-energy
   reference and the features (h, dh/dR) of all train + validation frames;
2. warm single job: the same job in a new run folder; every cache hit;
3. the sweep: ``-m`` over ``loss.r_he`` x ``loss.r_hf``, caches warm (built by job 1).

A sweep started from an empty cache builds the features once, in its first job; its wall
time is estimated as sweep + (cold - warm). Peak RSS per command is ``ru_maxrss`` of that
process (``os.wait4``). Each job's ``metrics.json`` says where its time went (``time_s``:
data = store + caches, fit = Lightning fit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def kd_nnp_cmd() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m kd_nnp.cli``."""
    exe = Path(sys.executable).parent / "kd-nnp"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "kd_nnp.cli"]


def run(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    workdir = Path(workdir)
    store, info = common.prepare_store(workdir, cfg["codes"], cfg["n_strain"], cfg["n_rattle"])
    root = workdir / "sweep"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    cache = root / "kd_cache"
    env = common.one_thread_env({"KD_NNP_CACHE": str(cache)})
    n_groups = len(cfg["codes"])
    common_args = [
        f"data.store={store}",
        f"data.label_set={common.SOFT_LABEL_SET}",
        f"data.val_fraction={1 / n_groups:.4f}",  # one crystal's frames validate
        f"data.batch_size={cfg['batch_size']}",
        "loss=mixed",
        "model.backend=cached",
        f"trainer.max_epochs={cfg['epochs']}",
        "trainer.enable_progress_bar=false",
        f"paths.output_dir={root / 'outputs'}",
    ]
    grid = ",".join(str(x) for x in cfg["grid"])
    commands = {
        "cold": common_args + [f"hydra.run.dir={root / 'cold'}"],
        "warm": common_args + [f"hydra.run.dir={root / 'warm'}"],
        "sweep": [
            "-m",
            *common_args,
            f"loss.r_he={grid}",
            f"loss.r_hf={grid}",
            f"hydra.sweep.dir={root / 'multirun'}",
        ],  # fmt: skip
    }
    res: dict[str, Any] = {"config": dict(cfg), "frames": info, "errors": {}, "runs": {},
                           "n_jobs": len(cfg["grid"]) ** 2}  # fmt: skip
    for name, args in commands.items():
        if name != "cold" and "cold" in res["errors"]:
            res["errors"][name] = "skipped: the cold job failed"
            continue
        cmd = kd_nnp_cmd() + ["train", *args]
        r = common.run_measured(cmd, cwd=root, env=env, timeout=cfg.get("timeout", 1500),
                                log=root / f"{name}.log")  # fmt: skip
        run_dirs = [root / name] if name != "sweep" else sorted((root / "multirun").glob("*/"))
        metrics = [json.loads((d / "metrics.json").read_text()) for d in run_dirs
                   if (d / "metrics.json").is_file()]  # fmt: skip
        summaries = [json.loads((d / "data_summary.json").read_text()) for d in run_dirs
                     if (d / "data_summary.json").is_file()]  # fmt: skip
        res["runs"][name] = {
            "cmd": " ".join(["kd-nnp", "train", *args]),
            "rc": r["rc"], "wall_s": r["wall_s"], "peak_rss_mb": r["maxrss_mb"],
            "jobs_done": len(metrics),
            "time_s": [m.get("time_s", {}) for m in metrics],
            "feature_cache": [s.get("feature_cache", {}) for s in summaries],
            "n_train": metrics[0]["n_train"] if metrics else None,
            "n_val": metrics[0]["n_val"] if metrics else None,
        }  # fmt: skip
        want = res["n_jobs"] if name == "sweep" else 1
        if r["rc"] != 0 or len(metrics) != want:
            tail = "\n".join(r["output"].strip().splitlines()[-20:])
            why = "timed out" if r["timed_out"] else f"rc {r['rc']}"
            res["errors"][name] = f"{why}, {len(metrics)}/{want} jobs done (log {name}.log)"
            res.setdefault("tracebacks", {})[name] = tail
        print(f"  sweep/{name}: {r['wall_s']:.0f} s"
              + (f"  FAILED {res['errors'][name]}" if name in res["errors"] else ""),
              flush=True)  # fmt: skip
    return res


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    out, row = common.table_rows("sweep")

    for name, err in res.get("errors", {}).items():
        row(f"{name} run", "FAILED", err, False)
    runs = res.get("runs", {})
    cold, warm, sweep = runs.get("cold"), runs.get("warm"), runs.get("sweep")
    n_jobs = res["n_jobs"]
    c = res["config"]
    if cold:
        fc = (cold["feature_cache"] or [{}])[0]
        ts = (cold["time_s"] or [{}])[0]
        row("cold single job (empty KD_NNP_CACHE)", f"{cold['wall_s']:.1f} s",
            f"{cold['n_train']} train + {cold['n_val']} val frames, {c['epochs']} epochs, batch "
            f"{c['batch_size']}; data {ts.get('data', float('nan')):.1f} s (feature build "
            f"{fc.get('build_s', float('nan')):.1f} s), fit {ts.get('fit', float('nan')):.1f} s; "
            f"peak RSS {cold['peak_rss_mb']:.0f} MB")  # fmt: skip
    if warm:
        ts = (warm["time_s"] or [{}])[0]
        row("warm single job (caches filled)", f"{warm['wall_s']:.1f} s",
            f"data {ts.get('data', float('nan')):.2f} s, fit {ts.get('fit', float('nan')):.2f} s; "
            f"the rest is process start, imports, export, plots; "
            f"peak RSS {warm['peak_rss_mb']:.0f} MB")  # fmt: skip
    if sweep:
        data = [t.get("data", 0.0) for t in sweep["time_s"]]
        fit = [t.get("fit", 0.0) for t in sweep["time_s"]]
        per_job = sweep["wall_s"] / max(sweep["jobs_done"], 1)
        row(f"sweep {len(c['grid'])}x{len(c['grid'])} = {n_jobs} jobs (-m, warm caches)",
            f"{sweep['wall_s']:.1f} s",
            f"{sweep['jobs_done']}/{n_jobs} jobs done; {per_job:.1f} s/job; per job: data "
            f"{np.mean(data):.2f} s, fit {np.mean(fit):.2f} s; peak RSS "
            f"{sweep['peak_rss_mb']:.0f} MB")  # fmt: skip
    if cold and warm and sweep:
        scratch = sweep["wall_s"] + cold["wall_s"] - warm["wall_s"]
        r_scratch = scratch / cold["wall_s"]
        row("ratio sweep / one job, both from scratch", f"{r_scratch:.2f}x",
            f"(sweep + cold - warm) / cold = {scratch:.0f} / {cold['wall_s']:.0f} s; target <= 3x",
            r_scratch <= 3)  # fmt: skip
        row("ratio sweep (warm caches) / cold single job", f"{sweep['wall_s'] / cold['wall_s']:.2f}x",
            f"sweep / warm single job = {sweep['wall_s'] / warm['wall_s']:.2f}x; "
            f"{n_jobs} separate warm jobs would take ~{n_jobs * warm['wall_s']:.0f} s")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codes", default="BENZEN,NACJAF,ACSALA")
    ap.add_argument("--n-strain", type=int, default=1)
    ap.add_argument("--n-rattle", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--grid", default="0.1,0.3,1,3,10", help="values of r_he and of r_hf")
    ap.add_argument("--workdir", default=None, help="default: a temporary folder")
    args = ap.parse_args()
    cfg = {"codes": args.codes.split(","), "n_strain": args.n_strain, "n_rattle": args.n_rattle,
           "batch_size": args.batch_size, "epochs": args.epochs,
           "grid": [float(x) for x in args.grid.split(",")]}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kd_bench_sweep_") as tmp:
        t = time.perf_counter()
        res = run(cfg, Path(args.workdir or tmp))
    for r in rows(res):
        flag = {True: "ok", False: "MISS", None: ""}[r["ok"]]
        print(f"{r['what']:<45} {r['value']:<10} {r['compare']} {flag}")
    print(f"total {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
