"""How fast can dh/dR be built? Forward mode (hand-written tangents / functorch vmap(jvp))
vs reverse mode (vmap(vjp) over the 64N outputs), on one rattled pyxtal organic crystal.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/bench/bench_feature_build.py --row 28

Prints seconds per build (reverse mode is timed on a few chunks and extrapolated to all
64N rows), time per input direction relative to one plain forward pass, and the maximum
Jacobian difference between methods. One thread (kd_nnp.utils.threads.set_threads).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from ase.db import connect
from chgnet.model import CHGNet
from pymatgen.io.ase import AseAtomsAdaptor

from kd_nnp.training import jacobian as F
from kd_nnp.utils.paths import pyxtal_db
from kd_nnp.utils.threads import set_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", type=int, default=28, help="pyxtal test.db row id (28: 100 atoms)")
    ap.add_argument("--chunk", type=int, default=32, help="directions per batch")
    ap.add_argument("--reverse-chunks", type=int, default=2, help="vjp chunks timed")
    ap.add_argument("--skip-vmap", action="store_true")
    args = ap.parse_args()
    set_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
    model.requires_grad_(False)
    row = connect(pyxtal_db("test")).get(id=args.row)
    atoms = row.toatoms()
    atoms.positions += np.random.default_rng(0).normal(scale=0.03, size=atoms.positions.shape)
    graph = model.graph_converter(AseAtomsAdaptor.get_structure(atoms))
    n = len(atoms)
    print(
        f"{row.csd_code}: {n} atoms, {len(graph.atom_graph)} directed bonds, "
        f"{len(graph.bond_graph)} angles; {3 * n} position directions, chunk {args.chunk}"
    )
    fn = F.make_features_fn(model, graph)
    with torch.no_grad():
        fn(torch.zeros(n, 3), torch.zeros(3, 3))
        t = time.perf_counter()
        for _ in range(3):
            fn(torch.zeros(n, 3), torch.zeros(3, 3))
        t_fwd = (time.perf_counter() - t) / 3
    print(f"plain forward pass (features only): {t_fwd * 1e3:.0f} ms")

    results = {}
    methods = ["tangent"] + ([] if args.skip_vmap else ["vmap"])
    for method in methods:
        t = time.perf_counter()
        fr = F.compute_features(model, graph, forces=True, stress=False, method=method,
                                chunk_size=args.chunk)  # fmt: skip
        dt = time.perf_counter() - t
        results[method] = fr.jac_pos
        print(
            f"forward mode [{method:7s}]: {dt:7.1f} s  = {dt / (3 * n) / t_fwd:.2f} forward "
            f"passes per direction"
        )
    # reverse mode: time a few chunks of the 64N cotangents, extrapolate
    strain0 = torch.zeros(3, 3)
    with torch.no_grad():
        _, vjp_fn = torch.func.vjp(lambda d: fn(d, strain0), torch.zeros(n, 3))
        cot = torch.eye(n * 64).reshape(-1, n, 64)
        batched = torch.func.vmap(vjp_fn)
        batched(cot[: args.chunk])
        t = time.perf_counter()
        rows = [batched(cot[i * args.chunk : (i + 1) * args.chunk])[0]
                for i in range(args.reverse_chunks)]  # fmt: skip
        dt = (time.perf_counter() - t) / (args.reverse_chunks * args.chunk) * (64 * n)
    rev = torch.cat(rows).reshape(-1, n * 3)
    ref = results["tangent"].reshape(n * 64, n * 3)[: rev.shape[0]]
    print(
        f"reverse mode [vmap(vjp)]: {dt:7.1f} s (extrapolated from "
        f"{args.reverse_chunks * args.chunk} of {64 * n} rows)"
    )
    print(
        f"max |J_reverse - J_tangent| on those rows: {(rev - ref).abs().max():.2e} "
        f"(max |J| {ref.abs().max():.1f})"
    )
    if "vmap" in results:
        diff = (results["vmap"] - results["tangent"]).abs().max()
        print(f"max |J_vmap - J_tangent|: {diff:.2e}")


if __name__ == "__main__":
    main()
