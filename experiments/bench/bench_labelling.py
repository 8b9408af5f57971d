"""Labelling throughput per teacher (1 thread, ~100-atom cells) and peak RSS.

    OMP_NUM_THREADS=1 python experiments/bench/bench_labelling.py [--teachers so3lr chgnet_d3 gfn2]
        [--n 10] [--gfn2-n 1]

Each teacher runs in its own subprocess (so peak RSS is per teacher) on the same perturbed
frames of pyxtal crystals with 80-120 atoms; frames/s excludes model loading and the check.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _one(name: str, n: int) -> dict:
    from kd_nnp.utils.threads import set_threads

    set_threads(1)
    from kd_nnp.data.sources.perturb import make_perturbations
    from kd_nnp.data.sources.pyxtal_db import pyxtal_frames
    from kd_nnp.teachers.registry import load_teacher

    parents = [f for f in pyxtal_frames("test") if 80 <= len(f.atoms) <= 120][:3]
    frames = make_perturbations(parents, n_strain=4, n_rattle=4, seed=0)[:n]
    t0 = time.perf_counter()
    teacher = load_teacher(name, check=False)
    t_load = time.perf_counter() - t0
    teacher.compute(frames[0].atoms)  # warm-up (lazy init, JIT)
    t0 = time.perf_counter()
    for f in frames:
        teacher.compute(f.atoms)
    dt = time.perf_counter() - t0
    return {
        "teacher": name,
        "frames": len(frames),
        "mean_atoms": sum(len(f.atoms) for f in frames) / len(frames),
        "load_s": t_load,
        "s_per_frame": dt / len(frames),
        "frames_per_s": len(frames) / dt,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teachers", nargs="+", default=["so3lr", "chgnet_d3", "gfn2"])
    p.add_argument("--n", type=int, default=10, help="frames per teacher")
    p.add_argument("--gfn2-n", type=int, default=2, help="frames for gfn2 (slow)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_one(args.child, args.n)))
        return
    rows = []
    for name in args.teachers:
        n = args.gfn2_n if name == "gfn2" else args.n
        out = subprocess.run(
            [sys.executable, __file__, "--child", name, "--n", str(n)],
            capture_output=True,
            text=True,
        )
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        rows.append(json.loads(line[0][7:]))
    print(
        f"{'teacher':<10} {'frames':>6} {'atoms':>6} {'load s':>7} {'s/frame':>8} "
        f"{'frames/s':>9} {'peak RSS MB':>12}"
    )
    for r in rows:
        print(
            f"{r['teacher']:<10} {r['frames']:>6} {r['mean_atoms']:>6.0f} {r['load_s']:>7.1f} "
            f"{r['s_per_frame']:>8.3f} {r['frames_per_s']:>9.3f} {r['peak_rss_mb']:>12.0f}"
        )
    if rows:
        base = rows[0]
        for r in rows[1:]:
            print(
                f"{base['teacher']} is {base['frames_per_s'] / r['frames_per_s']:.1f}x the rate of {r['teacher']}"
            )


if __name__ == "__main__":
    main()
