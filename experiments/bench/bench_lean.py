"""Training step of ``model.backend=lean`` vs ``full``: peak memory and step time, batch 8/16/32
of ~50-100-atom frames, energy + forces + stress (issue 17).

    .venv/bin/python experiments/bench/bench_lean.py [--batch-sizes 8,16,32] [--steps 3]
        [--device cpu|cuda]

(``run_all.py --only lean`` runs the same thing and prints it in the common table.)

Frames: 4 test.db crystals of 52-100 atoms (:func:`common.codes_by_size`), 4 strained + 4
strained-and-rattled copies each (:func:`common.perturbed_frames`), interleaved so that every
batch mixes the sizes; seeded stand-in soft labels (timings do not depend on their values).
The step is ``DistillationModule.training_step`` (loss ``r_se=1, r_sf=1, r_ss=0.1``) +
``backward`` + Adam, only ``model.mlp`` trainable, one thread.

Each (backend, batch size) runs in a fresh process (:func:`common.run_child`). Peak memory on
the CPU: torch's CPU allocator keeps no statistics and ``tracemalloc`` does not see its
allocations, so the child resets the kernel's peak-RSS mark (``/proc/self/clear_refs`` 5)
after loading the model and building the batch, and reports ``VmHWM - VmRSS`` of that
moment: the step's own peak above what was resident. On CUDA: ``torch.cuda`` peak allocated
bytes, reset the same way. Step time: the median of the steps after the first (warm-up).
:func:`time_training_step` is the measurement itself, callable in-process (e.g. from a GPU
script: ``time_training_step("lean", 32, "cuda")``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HERE = Path(__file__).resolve()
BACKENDS = ("full", "lean")
N_STRAIN = N_RATTLE = 4  # 8 frames per crystal: 32 frames from 4 crystals


def bench_frames(n_frames: int, seed: int = 0) -> list[Any]:
    """``n_frames`` perturbed test.db frames of 52-100 atoms, the crystals interleaved."""
    codes = common.codes_by_size(50, 100, 4)
    frames = common.perturbed_frames(codes, n_strain=N_STRAIN, n_rattle=N_RATTLE, seed=seed)
    by_code: dict[str, list[Any]] = {}
    for fr in frames:
        by_code.setdefault(fr.group_id, []).append(fr)
    order = [fr for group in zip(*by_code.values()) for fr in group]
    if n_frames > len(order):
        raise ValueError(f"at most {len(order)} frames, asked {n_frames}")
    return order[:n_frames]


def make_batch(model: Any, frames: list[Any], seed: int = 0) -> Any:
    """A :class:`Batch` of CHGNet graphs with seeded soft energy/force/stress labels."""
    import torch
    from pymatgen.io.ase import AseAtomsAdaptor

    from kd_nnp.training.batch import Batch, Targets

    gen = torch.Generator().manual_seed(seed)
    graphs = [model.graph_converter(AseAtomsAdaptor.get_structure(fr.atoms)) for fr in frames]
    sizes = [len(fr.atoms) for fr in frames]
    b, n = len(frames), sum(sizes)
    soft = Targets(
        energy=-6.0 + 0.1 * torch.randn(b, generator=gen),
        energy_mask=torch.ones(b, dtype=torch.bool),
        forces=torch.randn(n, 3, generator=gen),
        forces_mask=torch.ones(n, dtype=torch.bool),
        stress=torch.randn(b, 6, generator=gen),
        stress_mask=torch.ones(b, dtype=torch.bool),
    )
    return Batch(
        frame_ids=[fr.frame_id for fr in frames],
        n_atoms=torch.as_tensor(sizes, dtype=torch.long),
        hard=Targets.empty(b, n),
        soft=soft,
        graphs=graphs,
    )


def _peak_reset(device: Any) -> float:
    """Reset the peak-memory mark; return the current level (MB) it is measured above."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
    return common.rss_mb()


def _peak(device: Any) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return common.peak_rss_mb()


def time_training_step(
    backend: str, batch_size: int, device: str = "cpu", *, steps: int = 3, seed: int = 0,
    stress: bool = True, grads_out: str | Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One training configuration measured in this process: ``steps`` optimizer steps of
    ``DistillationModule(backend=backend)`` on ``batch_size`` frames (E + F, + S unless
    ``stress=False``) on ``device``. Returns step times (s), the median after the first, the step's peak memory
    above the resident level before it (MB; CPU: RSS, CUDA: allocated), the atoms of the
    batch and the step-0 loss; ``grads_out`` saves the step-0 MLP gradients (torch.save)."""
    import functools

    import torch

    from kd_nnp.training.loss import DistillationLoss
    from kd_nnp.training.module import DistillationModule

    dev = torch.device(device)
    torch.manual_seed(seed)
    module = DistillationModule(
        student={"model_name": "0.3.0", "freeze": "mlp"},
        loss=DistillationLoss(r_he=0, r_hf=0, r_se=1, r_sf=1, r_ss=0.1 if stress else 0.0),
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        backend=backend,
    ).to(dev)
    opt = module.configure_optimizers()
    batch = make_batch(module.student, bench_frames(batch_size, seed), seed).to(dev)
    base = _peak_reset(dev)
    times, loss0 = [], None
    for step in range(steps):
        t = time.perf_counter()
        loss = module.training_step(batch, step)
        loss.backward()
        if step == 0:
            loss0 = float(loss.detach())
            if grads_out is not None:
                grads = {n: p.grad.detach().cpu() for n, p in module.named_parameters()
                         if p.grad is not None}  # fmt: skip
                torch.save(grads, grads_out)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t)
    peak = _peak(dev)
    return {
        "backend": backend, "batch_size": batch_size, "device": str(dev), "stress": stress,
        "n_atoms": int(batch.n_atoms.sum()), "step_s": times,
        "median_s": statistics.median(times[1:] if len(times) > 1 else times),
        "base_mb": base, "peak_mb": peak, "step_peak_mb": peak - base, "loss0": loss0,
    }  # fmt: skip


def child_step(cfg: dict[str, Any]) -> dict[str, Any]:
    return time_training_step(
        cfg["backend"], cfg["batch_size"], cfg.get("device", "cpu"), steps=cfg["steps"],
        stress=cfg.get("stress", True), grads_out=cfg.get("grads_out"),
    )  # fmt: skip


def _available_mb() -> float:
    from kd_nnp.training.memory_check import available_memory_bytes

    return available_memory_bytes() / 2**20


def run(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Every (batch size, backend) in its own process. On the CPU, ``full`` is skipped (and
    recorded as skipped) where its estimate exceeds 70 % of the available memory: the MB per
    atom of the last measured ``full`` case (E+F+S needs more than the forces-only
    ``memory_check.BYTES_PER_ATOM_FULL_FORCES``, which is the estimate before any)."""
    from kd_nnp.training.memory_check import BYTES_PER_ATOM_FULL_FORCES

    workdir = Path(workdir)
    res: dict[str, Any] = {"config": dict(cfg), "cases": [], "errors": {}, "skipped": {}}
    device = cfg.get("device", "cpu")
    mean_atoms = 76.0  # the mean frame of bench_frames (52/68/84/100 atoms)
    full_mb_per_atom = BYTES_PER_ATOM_FULL_FORCES / 2**20
    for bs in cfg["batch_sizes"]:
        for backend in cfg.get("backends", BACKENDS):
            name = f"{backend} batch {bs}"
            if backend == "full" and device == "cpu":
                need = bs * mean_atoms * full_mb_per_atom
                if need > 0.7 * _available_mb():
                    res["skipped"][name] = (
                        f"estimated {need / 1024:.1f} GiB ({full_mb_per_atom:.1f} MB/atom x "
                        f"{bs * mean_atoms:.0f} atoms) > 70 % of the available "
                        f"{_available_mb() / 1024:.1f} GiB"
                    )
                    continue
            grads = workdir / f"grads_{backend}_{bs}.pt"
            child_cfg = {"backend": backend, "batch_size": bs, "steps": cfg["steps"],
                         "device": device, "stress": cfg.get("stress", True),
                         "grads_out": str(grads)}  # fmt: skip
            t = time.perf_counter()
            try:
                rec = common.run_child(HERE, "step", child_cfg, workdir / "logs",
                                       timeout=cfg.get("timeout", 1800))  # fmt: skip
                rec["grads"] = str(grads)
                res["cases"].append(rec)
                mean_atoms = rec["n_atoms"] / bs
                if backend == "full":
                    full_mb_per_atom = rec["step_peak_mb"] / rec["n_atoms"]
            except Exception as exc:  # noqa: BLE001 - reported in the table
                res["errors"][name] = common.error_summary(exc)
            print(f"  lean/{name}: {time.perf_counter() - t:.0f} s", flush=True)
    res["grad_diff"] = _grad_diffs(res["cases"])
    return res


def _grad_diffs(cases: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Step-0 MLP gradients and loss, lean vs full, per batch size (both measured)."""
    import torch

    out = {}
    by = {(c["backend"], c["batch_size"]): c for c in cases}
    for (backend, bs), lean in by.items():
        full = by.get(("full", bs))
        if backend != "lean" or full is None:
            continue
        gl, gf = torch.load(lean["grads"]), torch.load(full["grads"])
        diff = max(float((gl[k] - gf[k]).abs().max()) for k in gf)
        scale = max(float(gf[k].abs().max()) for k in gf)
        out[str(bs)] = {"grad_max_abs_diff": diff, "grad_max_abs": scale,
                        "loss_full": full["loss0"], "loss_lean": lean["loss0"]}  # fmt: skip
    return out


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    out, row = common.table_rows("lean")
    by = {(c["backend"], c["batch_size"]): c for c in res.get("cases", [])}
    for bs in res["config"]["batch_sizes"]:
        for backend in BACKENDS:
            c = by.get((backend, bs))
            if c is not None:
                row(f"{backend}, batch {bs} ({c['n_atoms']} atoms) [{c['device']}]",
                    f"{c['median_s']:.2f} s/step, peak +{c['step_peak_mb']:.0f} MB",
                    f"min {min(c['step_s'][1:] or c['step_s']):.2f} s; steps {', '.join(f'{t:.2f}' for t in c['step_s'])} s; resident before "
                    f"{c['base_mb']:.0f} MB; {c['step_peak_mb'] / c['n_atoms']:.2f} MB/atom")  # fmt: skip
        lean, full = by.get(("lean", bs)), by.get(("full", bs))
        if lean and full:
            mem = full["step_peak_mb"] / max(lean["step_peak_mb"], 1e-9)
            tim = lean["median_s"] / full["median_s"]
            row(f"batch {bs}: full/lean peak memory", f"{mem:.1f}x", "target >= 3x", mem >= 3)
            row(f"batch {bs}: lean/full step time", f"{tim:.2f}x", "target <= 1.2x", tim <= 1.2)
        gd = res.get("grad_diff", {}).get(str(bs))
        if gd:
            rel = abs(gd["loss_lean"] - gd["loss_full"]) / abs(gd["loss_full"])
            grel = gd["grad_max_abs_diff"] / gd["grad_max_abs"]
            row(f"batch {bs}: step-0 loss and MLP gradients, lean vs full",
                f"loss rel {rel:.1e}, grad rel {grel:.1e}",
                f"max |grad| {gd['grad_max_abs']:.2e}; target rel <= 1e-4", rel <= 1e-4 and grel <= 1e-4)  # fmt: skip
    for what, why in res.get("skipped", {}).items():
        row(what, "skipped", why)
    for what, err in res.get("errors", {}).items():
        row(what, "FAILED", err, False)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="8,16,32")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-stress", action="store_true", help="E + F only (no stress term)")
    ap.add_argument("--out", default="outputs/bench/lean")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    cfg = {"batch_sizes": [int(x) for x in args.batch_sizes.split(",")], "steps": args.steps,
           "device": args.device, "stress": not args.no_stress}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run(cfg, out.resolve())
    record = {"machine": common.machine_info(), **res}
    print(json.dumps(record, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1, default=str))
    for r in rows(res):
        print(f"{r['what']:<60} {r['value']:<40} {r['compare']}")
    return 0


if __name__ == "__main__":
    if not common.child_main({"step": child_step}):
        sys.exit(main())
