"""The batched relaxation backend (kd_nnp.evaluation.batched): one CHGNet forward for all
crystals in flight gives the ase backend's numbers, records and trajectories."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kd_nnp.errors import KdNnpError, SettingsError
from kd_nnp.evaluation.batched import BatchedCHGNet, check_batchable, run_batched
from kd_nnp.evaluation.relax import RESULTS_FILE, run_relax_benchmark
from kd_nnp.evaluation.runner import get_calc
from kd_nnp.evaluation.settings import RelaxSettings
from kd_nnp.evaluation.structures import load_dataset
from kd_nnp.utils.settings import from_mapping

SMALL = ["UREAXX02", "OXALAC11"]  # 16 atoms each


@pytest.fixture(scope="module")
def chgnet():
    return get_calc("chgnet")  # the runner's own (one model load for the module)


@pytest.fixture(scope="module")
def small():
    return load_dataset("pyxtal:test", codes=[*SMALL, "FORMAM"])


def test_batched_forward_equals_the_ase_calculator(chgnet, small):
    """Energy, forces and stress of three rattled crystals in one forward: bit for bit those
    of InferenceCHGNetCalculator one at a time, and of the same engine one at a time."""
    engine = BatchedCHGNet(chgnet.model)
    atoms = []
    for c in small:
        a = c.atoms.copy()
        a.rattle(0.05, seed=1)
        a.set_cell(a.cell.array * 1.02, scale_atoms=True)
        atoms.append(a)
    batch = engine.evaluate([engine.graph(a) for a in atoms])
    assert len(batch) == 3
    for a, b in zip(atoms, batch, strict=True):
        one = engine.evaluate([engine.graph(a)])[0]
        a.calc = chgnet
        assert b["energy"] == a.get_potential_energy() == one["energy"]
        np.testing.assert_array_equal(b["forces"], a.get_forces())
        np.testing.assert_array_equal(b["stress"], a.get_stress())
        np.testing.assert_array_equal(b["stress"], one["stress"])
        assert np.abs(b["forces"]).max() > 0.1 and np.abs(b["stress"]).max() > 1e-3  # not trivial


def test_batched_benchmark_follows_the_ase_trajectory(tmp_path):
    """Two crystals relaxed together (6 LBFGS steps) give the ase backend's records: same
    keys, same steps and volumes; a batched run never reuses ase records (its protocol says
    so) and vice versa."""
    out = tmp_path / "relax"
    kw = {"codes": SMALL, "references": False, "progress": False, "report": False, "workers": 1}
    ase = RelaxSettings(max_steps=6, rmsd=False)
    batched = RelaxSettings(max_steps=6, rmsd=False, backend="batched", batch_size=2)
    df_a = run_relax_benchmark("pyxtal:test", {"CHGNet": "chgnet"}, out, ase, **kw)
    df_b = run_relax_benchmark("pyxtal:test", {"CHGNet": "chgnet"}, out, batched, **kw)
    lines = [json.loads(x) for x in (out / RESULTS_FILE).read_text().splitlines()]
    assert len(lines) == 4  # computed again, not reused
    rec_a = {r["id"]: r for r in lines[:2]}
    rec_b = {r["id"]: r for r in lines[2:]}
    assert all("backend" not in r["settings"] for r in rec_a.values())
    assert all(r["settings"]["backend"] == "batched" for r in rec_b.values())
    for code in SMALL:
        a, b = rec_a[code], rec_b[code]
        assert set(a) == set(b)
        assert a["status"] == b["status"] == "ok"
        assert a["steps"] == b["steps"] == 6 and not b["converged"]
        assert b["volume_pred"] == pytest.approx(a["volume_pred"], rel=1e-9)
        assert b["volume_pred"] != pytest.approx(b["volume_exp"], rel=1e-3)  # it moved
        np.testing.assert_allclose(b["final_positions"], a["final_positions"], atol=1e-5)
        assert b["energy"] == pytest.approx(a["energy"], abs=1e-6)
    assert sorted(df_a.columns) == sorted(df_b.columns)
    # 7 force calls per crystal (start + 6 steps), both crystals in each forward (one extra
    # if the second thread started after the first forward)
    stats = df_b.attrs["batched"]
    assert stats["crystals"] == 2 and 7 <= stats["forwards"] <= 8 and stats["forward_s"] > 0
    assert "batched" not in df_a.attrs
    # the ase settings again: their own records are reused, the batched ones are not taken
    df_c = run_relax_benchmark("pyxtal:test", {"CHGNet": "chgnet"}, out, ase, **kw)
    assert len((out / RESULTS_FILE).read_text().splitlines()) == 4
    assert set(df_c["spec_fingerprint"]) == {"chgnet"} and len(df_c) == 2
    wall_a, wall_c = df_a.set_index("id")["wall_s"], df_c.set_index("id")["wall_s"]
    assert wall_c.sort_index().tolist() == wall_a.sort_index().tolist()  # the same records


def test_non_chgnet_spec_is_refused(tmp_path):
    for spec in ("teacher:so3lr", "test_eval_relax:scaled_calc", "teacher:chgnet_d3"):
        with pytest.raises(KdNnpError, match="batched"):
            check_batchable(spec)
    check_batchable("chgnet")
    check_batchable("student:some/model.pt")
    with pytest.raises(KdNnpError, match="backend=ase"):
        run_relax_benchmark(
            "pyxtal:test",
            {"CHGNet": "chgnet", "scaled": "test_eval_relax:scaled_calc"},
            tmp_path,
            RelaxSettings(backend="batched"),
            codes=SMALL,
            references=False,
            progress=False,
            report=False,
        )
    assert not (tmp_path / RESULTS_FILE).exists()  # refused before anything ran
    with pytest.raises(SettingsError, match="backend='fire'"):  # never run as ase silently
        run_relax_benchmark(
            "pyxtal:test", ["chgnet"], tmp_path, RelaxSettings(backend="fire"), codes=SMALL
        )
    assert not (tmp_path / RESULTS_FILE).exists()


def test_relax_settings_backend_checks():
    with pytest.raises(SettingsError, match="backend"):
        from_mapping(RelaxSettings, {"backend": "fire"})
    with pytest.raises(SettingsError, match="batch_size"):
        from_mapping(RelaxSettings, {"backend": "batched", "batch_size": 0})
    with pytest.raises(SettingsError, match="device"):
        from_mapping(RelaxSettings, {"backend": "batched", "device": "gpu"})
    with pytest.raises(SettingsError, match="needs backend=batched"):
        from_mapping(RelaxSettings, {"device": "cuda"})
    s = from_mapping(RelaxSettings, {"backend": "batched", "device": "cuda:1", "batch_size": 8})
    assert s.protocol()["device"] == "cuda:1" and "batch_size" not in s.protocol()
    assert "backend" not in RelaxSettings().protocol()  # old ase results stay reusable


def test_cuda_without_a_gpu_is_refused(chgnet):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(KdNnpError, match="no CUDA"):
        BatchedCHGNet(chgnet.model, "cuda")


def test_run_batched_isolates_errors_and_counts_batches(chgnet, small):
    """Three crystals, batch_size 2: one task fails after its first force (an error result,
    the others go on), the third crystal takes the free place; every force call of the
    crystals in flight shares a forward."""
    jobs = [(c.id, {"atoms": c.atoms}) for c in small]

    def task(item, calc, relaxed):
        a = item["atoms"].copy()
        a.calc = calc
        e = [a.get_potential_energy()]
        if len(a) == 24:  # FORMAM
            raise ValueError("boom")
        for _ in range(2):
            a.positions[0] += 0.01
            e.append(a.get_potential_energy())
        relaxed()
        return e

    stats: dict = {}
    res = {r.key: r for r in run_batched(task, jobs, chgnet.model, batch_size=2, stats=stats)}
    assert set(res) == {c.id for c in small}
    assert not res["FORMAM"].ok and "ValueError: boom" in res["FORMAM"].error
    for code in SMALL:
        assert res[code].ok and len(res[code].value) == 3
        a = next(c.atoms for c in small if c.id == code).copy()
        a.calc = chgnet
        assert res[code].value[0] == a.get_potential_energy()
    # 7 force calls, at most 2 crystals in flight: at least 4 forwards, fewer than 7
    assert 4 <= stats["forwards"] < 7 and stats["mean_batch"] > 1.0
    assert stats["crystals"] == 3 and sum(stats["batch_sizes"]) == 7


def test_run_batched_stopped_early_leaves_no_thread_waiting(chgnet, small):
    """The consumer stops after the first result (a kill, an exception while writing): the
    crystals in flight get an error instead of waiting forever, and no thread is left."""
    import threading

    calls: list[str] = []

    def task(item, calc, relaxed):
        if len(item["atoms"]) == 24:
            raise ValueError("first out")
        a = item["atoms"].copy()
        a.calc = calc
        for _ in range(50):
            a.positions[0] += 0.001
            a.get_potential_energy()
            calls.append(a.get_chemical_formula())
        return len(calls)

    gen = run_batched(task, [(c.id, {"atoms": c.atoms}) for c in small], chgnet.model,
                      batch_size=3)  # fmt: skip
    first = next(gen)
    gen.close()
    assert first.key == "FORMAM" and not first.ok
    assert len(calls) < 100  # the two 50-step tasks were stopped, not run to the end
    assert not [t for t in threading.enumerate() if t.name.startswith("relax")]


@pytest.mark.slow
def test_batched_relaxed_volumes_match_the_ase_path(tmp_path):
    """Full relaxations (default protocol) of three crystals, batched vs ase: both converge
    (max |sigma| < 0.01 GPa) and the volumes agree within the residual-stress tolerance,
    dV/V <= stress_tol / B with B ~ 10 GPa for organic crystals (1e-3); on the CPU the
    trajectories are in fact the same."""
    codes = [*SMALL, "FORMAM"]
    kw = {"codes": codes, "references": False, "progress": False, "report": False, "workers": 1}
    settings = RelaxSettings(rmsd=False)
    df_a = run_relax_benchmark("pyxtal:test", ["chgnet"], tmp_path / "a", settings, **kw)
    df_b = run_relax_benchmark(
        "pyxtal:test", ["chgnet"], tmp_path / "b", RelaxSettings(rmsd=False, backend="batched"),
        **kw,
    )  # fmt: skip
    a, b = df_a.set_index("id"), df_b.set_index("id")
    tol = settings.stress_tol_gpa / 10.0
    for code in codes:
        assert a.loc[code, "converged"] and b.loc[code, "converged"]
        assert b.loc[code, "stress_max_gpa"] < settings.stress_tol_gpa
        assert abs(b.loc[code, "volume_pred"] / a.loc[code, "volume_pred"] - 1) < tol
        assert b.loc[code, "vol_err_pct"] > 1.0  # CHGNet overestimates: it relaxed
