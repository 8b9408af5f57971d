"""Memory of streaming a large MPtrj-shaped JSON file vs loading it whole.

    python experiments/bench/bench_mptrj_stream.py [--gb 2] [--keep FILE]

Writes a synthetic file in MPtrj's exact schema ({mp_id: {frame_id: record}}, ~30-atom
frames, 2 % organic), then in a fresh subprocess streams it into a store with
`build_mptrj_store` while sampling RSS, and in another subprocess `json.load`s a slice of
it, to show side by side that streaming memory is flat in file size while loading is not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _structure(symbols: list[str], rng: np.random.Generator) -> dict:
    a = 9.0
    return {
        "@module": "pymatgen.core.structure",
        "@class": "Structure",
        "charge": 0,
        "lattice": {"matrix": [[a, 0, 0], [0, a, 0], [0, 0, a]], "pbc": [True, True, True]},
        "properties": {},
        "sites": [
            {
                "species": [{"element": s, "occu": 1}],
                "abc": (xyz / a).tolist(),
                "xyz": xyz.tolist(),
                "label": s,
                "properties": {"magmom": 0.0},
            }
            for s, xyz in zip(symbols, rng.uniform(0, a, size=(len(symbols), 3)))
        ],
    }


def write_synthetic(path: Path, target_bytes: int, frames_per_mp: int = 20) -> int:
    rng = np.random.default_rng(0)
    inorganic = ["Li", "Fe", "O", "O", "P", "O", "Mn", "Co"] * 4
    organic = ["C", "C", "H", "H", "H", "O", "N", "H"] * 4
    n = 0
    with open(path, "w") as fh:
        fh.write("{")
        k = 0
        while fh.tell() < target_bytes:
            symbols = organic if k % 50 == 0 else inorganic
            frames = {}
            for j in range(frames_per_mp):
                natoms = len(symbols)
                frames[f"mp-{k}-{j // 5}-{j % 5}"] = {
                    "structure": _structure(symbols, rng),
                    "uncorrected_total_energy": -5.0 * natoms,
                    "corrected_total_energy": -5.1 * natoms,
                    "energy_per_atom": -5.1,
                    "ef_per_atom": -1.0,
                    "e_per_atom_relaxed": -5.2,
                    "ef_per_atom_relaxed": -1.1,
                    "force": rng.normal(size=(natoms, 3)).round(8).tolist(),
                    "stress": rng.normal(size=(3, 3)).round(6).tolist(),
                    "magmom": None,
                    "bandgap": 0.0,
                    "mp_id": f"mp-{k}",
                }
                n += 1
            fh.write(("," if k else "") + json.dumps(f"mp-{k}") + ":" + json.dumps(frames))
            k += 1
        fh.write("}")
    return n


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child_stream(path: str, out: str) -> None:
    from kd_nnp.data.sources.mptrj import build_mptrj_store

    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    size = os.path.getsize(path)

    def sampler() -> None:
        fd = os.open(path, os.O_RDONLY)
        while not stop.is_set():
            pos = _read_pos(path)
            samples.append((pos / size if pos is not None else float("nan"), _rss_mb()))
            time.sleep(0.5)
        os.close(fd)

    base = _rss_mb()
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    t0 = time.perf_counter()
    stats = build_mptrj_store(path, out, include=("organic", "complex"))
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        "RESULT "
        + json.dumps(
            {
                "base_mb": base,
                "peak_mb": peak,
                "seconds": dt,
                "stats": dict(stats),
                "samples": samples,
            }
        )
    )


def _read_pos(path: str) -> int | None:
    """Offset of this process's read handle on ``path`` (from /proc/self/fdinfo)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == os.path.abspath(path):
                with open(f"/proc/self/fdinfo/{fd}") as fh:
                    pos = int(fh.readline().split()[1])
                if pos > 0:
                    return pos
        except OSError:
            continue
    return None


def child_load(path: str, nbytes: int) -> None:
    import resource

    with open(path) as fh:
        text = fh.read(nbytes)
    cut = text.rfind(',"mp-')
    text = text[:cut] + "}"
    del cut
    base = _rss_mb()
    data = json.loads(text)
    del text
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        "RESULT "
        + json.dumps(
            {
                "bytes": nbytes,
                "base_mb": base,
                "peak_mb": peak,
                "rss_after_mb": _rss_mb(),
                "n_mp": len(data),
            }
        )
    )


def _run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(lines[0][7:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--load-mb", type=float, default=200.0, help="slice size for json.load")
    p.add_argument("--keep", default=None, help="write/reuse the synthetic file here")
    p.add_argument("--child", nargs="*", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        if a.child[0] == "stream":
            child_stream(a.child[1], a.child[2])
        else:
            child_load(a.child[1], int(a.child[2]))
        return
    tmp = tempfile.mkdtemp(prefix="bench_mptrj_")
    path = Path(a.keep or Path(tmp) / "MPtrj_synthetic.json")
    if not path.exists():
        t0 = time.perf_counter()
        n = write_synthetic(path, int(a.gb * 1e9))
        print(
            f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {n} frames) in {time.perf_counter() - t0:.0f} s"
        )
    size_gb = path.stat().st_size / 1e9
    s = _run(["--child", "stream", str(path), str(Path(tmp) / "store")])
    print(
        f"stream {size_gb:.2f} GB: {s['seconds']:.0f} s ({size_gb * 1e3 / s['seconds']:.0f} MB/s), "
        f"frames {s['stats']}"
    )
    print(
        f"  RSS before {s['base_mb']:.0f} MB, peak {s['peak_mb']:.0f} MB "
        f"(+{s['peak_mb'] - s['base_mb']:.0f} MB for {size_gb:.2f} GB)"
    )
    samples = [x for x in s["samples"] if x[0] == x[0]]
    for q in (0.1, 0.25, 0.5, 0.75, 0.95):
        near = min(samples, key=lambda x: abs(x[0] - q), default=None)
        if near:
            print(f"  at {near[0] * 100:5.1f} % of the file: RSS {near[1]:.0f} MB")
    nbytes = int(a.load_mb * 1e6)
    ld = _run(["--child", "load", str(path), str(nbytes)])
    growth = ld["peak_mb"] - ld["base_mb"]
    print(
        f"json.load of a {nbytes / 1e6:.0f} MB slice: +{growth:.0f} MB "
        f"({growth / (nbytes / 1e6):.1f} MB per MB of JSON) -> the real 11 GB file would need "
        f"~{growth / (nbytes / 1e6) * 11e3 / 1e3:.0f} GB"
    )
    print(
        f"ratio: streaming used {s['peak_mb'] - s['base_mb']:.0f} MB for {size_gb * 1e3:.0f} MB; "
        f"json.load would use ~{growth / (nbytes / 1e6) * size_gb * 1e3:.0f} MB for the same file"
    )


if __name__ == "__main__":
    main()
