"""Labelling throughput per teacher (1 thread) and peak RSS.

    .venv/bin/python experiments/bench/bench_labelling.py [--teachers so3lr chgnet_d3 gfn2]
        [--codes KONTIQ,WIDBAO] [--n 6] [--gfn2-n 1]

Each teacher runs in its own process (so the peak RSS, ``VmHWM``, is that teacher's) on the
same perturbed frames of pyxtal test.db crystals (:func:`common.perturbed_frames`); the
teacher is loaded with ``check=False`` (its load-time finite-difference check is timed by
the tests, not here). frames/s excludes loading and one warm-up call (lazy init, JIT).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HERE = Path(__file__).resolve()


def child_teacher(cfg: dict[str, Any]) -> dict[str, Any]:
    from kd_nnp.teachers.registry import load_teacher

    k = cfg["n"] // len(cfg["codes"]) + 1
    frames = common.perturbed_frames(cfg["codes"], n_strain=k, n_rattle=k)
    # one extra frame for the warm-up: ASE calculators return cached results for a
    # structure they have just computed, so the warm-up frame must not be timed again
    warm, *frames = _interleave(frames, cfg["n"] + 1)
    t0 = time.perf_counter()
    teacher = load_teacher(cfg["teacher"], check=False)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher.compute(warm.atoms)  # warm-up (lazy init, JIT)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for f in frames:
        lab = teacher.compute(f.atoms)
        assert lab.energy is not None and lab.forces is not None and lab.stress is not None
    dt = time.perf_counter() - t0
    return {
        "teacher": cfg["teacher"],
        "frames": len(frames),
        "n_atoms": [len(f.atoms) for f in frames],
        "load_s": load_s,
        "warmup_s": warm_s,
        "s_per_frame": dt / len(frames),
        "frames_per_s": len(frames) / dt,
    }


def _interleave(frames: list[Any], n: int) -> list[Any]:
    """n frames taking the parents in turn (frames come grouped by parent)."""
    by_parent: dict[str, list[Any]] = {}
    for f in frames:
        by_parent.setdefault(f.group_id, []).append(f)
    out: list[Any] = []
    while len(out) < n and any(by_parent.values()):
        for lst in by_parent.values():
            if lst and len(out) < n:
                out.append(lst.pop(0))
    return out


def run(cfg: dict[str, Any], workdir: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"config": dict(cfg), "teachers": {}, "errors": {}}
    for name in cfg["teachers"]:
        n = cfg.get("gfn2_n", 1) if name == "gfn2" else cfg["n"]
        t = time.perf_counter()
        try:
            child_cfg = {"teacher": name, "n": n, "codes": cfg["codes"]}
            res["teachers"][name] = common.run_child(
                HERE, name, child_cfg, Path(workdir) / "logs", timeout=cfg.get("timeout", 900)
            )
        except Exception as exc:  # noqa: BLE001 - reported in the table
            res["errors"][name] = common.error_summary(exc)
            res.setdefault("tracebacks", {})[name] = common.format_exc(exc)
        print(f"  labelling/{name}: {time.perf_counter() - t:.0f} s"
              + (f"  FAILED {res['errors'][name]}" if name in res["errors"] else ""),
              flush=True)  # fmt: skip
    return res


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, err in res.get("errors", {}).items():
        out.append({"section": "labelling", "what": f"teacher {name}", "value": "FAILED",
                    "compare": err, "ok": False})  # fmt: skip
    base = None
    for name, r in res.get("teachers", {}).items():
        n = r["n_atoms"]
        cmp = (f"{r['s_per_frame']:.2f} s/frame, {r['frames']} frames of {min(n)}-{max(n)} "
               f"atoms; load {r['load_s']:.1f} s; peak RSS {r['peak_rss_mb']:.0f} MB")  # fmt: skip
        if base is None:
            base = r
        else:
            cmp += (
                f"; {r['frames_per_s'] / base['frames_per_s']:.2g}x the rate of {base['teacher']}"
            )
        out.append({"section": "labelling", "what": f"teacher {name}",
                    "value": f"{r['frames_per_s']:.3g} frames/s", "compare": cmp, "ok": None})  # fmt: skip
    return out


def main() -> None:
    children = {name: child_teacher for name in ("so3lr", "chgnet_d3", "gfn2", "chgnet")}
    if common.child_main(children):
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", nargs="+", default=["so3lr", "chgnet_d3", "gfn2"])
    p.add_argument("--codes", default="KONTIQ,WIDBAO", help="test.db csd codes")
    p.add_argument("--n", type=int, default=6, help="frames per teacher")
    p.add_argument("--gfn2-n", type=int, default=1, help="frames for gfn2 (slow)")
    args = p.parse_args()
    cfg = {"teachers": args.teachers, "codes": args.codes.split(","), "n": args.n,
           "gfn2_n": args.gfn2_n}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kd_bench_label_") as tmp:
        res = run(cfg, Path(tmp))
    for r in rows(res):
        print(f"{r['what']:<20} {r['value']:<16} {r['compare']}")


if __name__ == "__main__":
    main()
