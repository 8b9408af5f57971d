"""Committee students (issue 12): K heads trained from one feature cache, the committee file,
its calculator (mean and spread from one backbone pass), single-head export, and the
volume uncertainty of a relaxation."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from kd_nnp.errors import KdNnpError

pytestmark = pytest.mark.filterwarnings("ignore")


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from kd_nnp.utils.paths import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("train", overrides=overrides)


def _tiny(store, tmp_path) -> list[str]:
    """Soft-energy training, cached backend (features without Jacobians: cheap to build),
    3 epochs; no callbacks/loggers (they need Hydra's run directory, not used in process)."""
    return [f"data.store={store}", "data.label_set=toy_teacher", "data.n_val=4",
            "data.batch_size=4", "data.grouped=false", "model.compute_forces=false",
            "loss.r_sf=0", "model.backend=cached", "model.optimizer.lr=0.003",
            "trainer.max_epochs=3", "trainer.enable_progress_bar=false",
            "validate_before_training=false", "~callbacks", "~logger",
            f"paths.output_dir={tmp_path}"]  # fmt: skip


def _train(store, tmp_path, name, extra):
    from kd_nnp.training.train import run_training

    cfg = _compose(_tiny(store, tmp_path) + extra)
    return run_training(cfg, tmp_path / name, overrides=extra)


@pytest.fixture(scope="module")
def committee_run(labelled_store, tmp_path_factory):
    """A committee of 3 heads (seeds 5, 6, 7) and the single runs of seeds 5 and 6."""
    tmp = tmp_path_factory.mktemp("committee")
    out = {"dir": tmp}
    out["committee"] = _train(labelled_store, tmp, "committee",
                              ["committee.size=3", "committee.seed=5"])  # fmt: skip
    for seed in (5, 6):
        out[seed] = _train(labelled_store, tmp, f"single{seed}", [f"data.shuffle_seed={seed}"])
    out["bootstrap"] = _train(labelled_store, tmp, "bootstrap",
                              ["committee.size=2", "committee.seed=5", "committee.bootstrap=true"])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def synthetic_committee(tmp_path_factory):
    """A committee file of 3 heads: the pretrained MLP with seeded perturbations (what a
    committee file holds does not depend on how its heads were trained)."""
    from kd_nnp.teachers.calculators import load_chgnet
    from kd_nnp.training.committee import export_committee

    base = load_chgnet()
    heads = []
    for k in range(3):
        h = copy.deepcopy(base.mlp)
        with torch.no_grad():
            for p in h.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(k)))
        heads.append(h)
    path = tmp_path_factory.mktemp("synthetic") / "committee.pt"
    info = {"size": 3, "bootstrap": False, "head_seeds": [0, 1, 2]}
    return str(export_committee(base, heads, path, {"note": "test"}, info))


def _blob(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_heads_differ_and_equal_single_trainings(committee_run):
    from kd_nnp.teachers.committee import head_model

    m = committee_run["committee"]
    assert m["committee"]["head_seeds"] == [5, 6, 7]
    assert [h["n_train_unique"] for h in m["committee"]["heads"]] == [m["n_train"]] * 3
    blob = _blob(m["student"])
    heads = [head_model(blob, k).mlp.state_dict() for k in range(3)]
    for a, b in ((0, 1), (0, 2), (1, 2)):  # different batch orders: different heads
        diff = max(float((heads[a][k] - heads[b][k]).abs().max()) for k in heads[a])
        assert diff > 1e-4, (a, b, diff)
    for k, seed in ((0, 5), (1, 6)):  # head k == the plain run with that seed's batch order
        single = _blob(committee_run[seed]["student"])["model"]["state_dict"]
        for name, value in heads[k].items():
            torch.testing.assert_close(value, single[f"mlp.{name}"], rtol=1e-5, atol=1e-6)
    # the backbone is the pretrained one, stored once
    pre = _blob(committee_run[5]["student"])["model"]["state_dict"]
    for name, value in blob["model"]["state_dict"].items():
        if not name.startswith("mlp."):
            assert torch.equal(value, pre[name]), name


def test_committee_file_round_trip_and_calculator(synthetic_committee, small_crystals, tmp_path):
    """The calculator's mean/std equal those of the K single-head CHGNet files (exported
    with ``kd-nnp export --head``), from one backbone pass; the mean export is the mean."""
    from chgnet.model import CHGNet

    from kd_nnp.cli import main as cli_main
    from kd_nnp.teachers.calculators import load_chgnet, make_calculator, method_label
    from kd_nnp.teachers.committee import CommitteeCalculator

    path = synthetic_committee
    blob = _blob(path)
    assert blob["kd_nnp"] == {"note": "test"} and blob["kd_nnp_committee"]["head_seeds"] == [
        0,
        1,
        2,
    ]
    calc = make_calculator(f"student:{path}")
    assert isinstance(calc, CommitteeCalculator) and calc.size == 3
    files = []
    for head in ("0", "1", "2", "mean"):
        out = tmp_path / f"head_{head}.pt"
        assert cli_main(["export", path, str(out), "--head", head]) == 0
        CHGNet.from_file(str(out))  # a plain chgnet file
        files.append(out)
    atoms = small_crystals["OXALAC11"].copy()
    atoms.positions += np.random.default_rng(1).normal(0, 0.05, atoms.positions.shape)
    atoms.set_cell(atoms.cell * 1.02, scale_atoms=True)
    preds = []
    for f in files:
        a = atoms.copy()
        a.calc = make_calculator(f"student:{f}")
        preds.append((a.get_potential_energy(), a.get_forces(), a.get_stress()))
    e = np.array([p[0] for p in preds[:3]])
    f = np.array([p[1] for p in preds[:3]])
    s = np.array([p[2] for p in preds[:3]])
    a = atoms.copy()
    a.calc = calc
    assert a.get_potential_energy() == pytest.approx(e.mean(), abs=1e-4)
    r = calc.results
    assert r["energy_std"] == pytest.approx(e.std(), rel=1e-4, abs=1e-6) and e.std() > 1e-4
    np.testing.assert_allclose(r["forces"], f.mean(0), atol=2e-5)
    np.testing.assert_allclose(r["forces_std"], f.std(0), atol=2e-5)
    assert f.std(0).max() > 1e-3
    np.testing.assert_allclose(r["stress"], s.mean(0), atol=1e-7)
    np.testing.assert_allclose(r["stress_std"], s.std(0), atol=1e-7)
    np.testing.assert_allclose(r["energies"], e, atol=1e-4)
    # the exported mean (and load_chgnet / CHGNet.from_file of the committee file itself) is
    # the committee mean as one plain CHGNet
    assert preds[3][0] == pytest.approx(e.mean(), abs=2e-4)
    np.testing.assert_allclose(preds[3][1], f.mean(0), atol=2e-5)
    np.testing.assert_allclose(preds[3][2], s.mean(0), rtol=1e-4, atol=1e-6)  # float32 sums
    mean_model = load_chgnet(path=path)
    assert mean_model.model_args["mlp_hidden_dims"] == [192, 192, 192]
    assert method_label(f"student:{path}") == "student(committee)"
    # per-frame disagreement (the API of a later active selection)
    from kd_nnp.teachers.committee import committee_disagreement

    (dis,) = committee_disagreement(
        CommitteeCalculator(calc.model, derivative_spread=False), [atoms]
    )
    assert dis["energy_std_per_atom"] == pytest.approx(e.std() / len(atoms), rel=1e-4)
    assert dis["forces_std_max"] == pytest.approx(np.linalg.norm(f.std(0), axis=1).max(), rel=1e-3)
    assert dis["stress_std_max"] == pytest.approx(np.abs(s.std(0)).max(), rel=1e-3)
    # mean-only mode: the same mean, the spreads only when asked for
    lazy = CommitteeCalculator(calc.model, derivative_spread=False)
    b = atoms.copy()
    b.calc = lazy
    np.testing.assert_allclose(b.get_forces(), f.mean(0), atol=2e-5)
    assert "forces_std" not in lazy.results
    np.testing.assert_allclose(lazy.get_property("stress_std", b), s.std(0), atol=1e-7)


def test_export_refuses_bad_heads(synthetic_committee, tmp_path, capsys):
    from kd_nnp.cli import main as cli_main

    path = synthetic_committee
    for args, msg in (
        ([], "is a committee file: choose --head"),
        (["--head", "3"], "head must be 0..2 or 'mean'"),
        (["--head", "x"], "--head must be an integer or 'mean'"),
    ):
        assert cli_main(["export", path, str(tmp_path / "x.pt"), *args]) == 1
        assert msg in capsys.readouterr().err
    single = tmp_path / "head0.pt"
    assert cli_main(["export", path, str(single), "--head", "0"]) == 0
    assert cli_main(["export", str(single), str(tmp_path / "x.pt"), "--head", "0"]) == 1
    captured = capsys.readouterr()
    assert "is not a committee file" in captured.err and f"wrote {single}" in captured.out
    assert not (tmp_path / "x.pt").exists()


def test_mean_mlp_is_exact():
    """The wide MLP of the committee mean equals the average of the heads (random heads)."""
    from kd_nnp.teachers.calculators import load_chgnet
    from kd_nnp.teachers.committee import mean_mlp_state

    base = load_chgnet().mlp
    heads = []
    for k in range(4):
        h = copy.deepcopy(base)
        with torch.no_grad():
            for p in h.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(k)))
        heads.append(h)
    dims, state = mean_mlp_state(heads)
    assert dims == [256, 256, 256]
    from chgnet.model.functions import MLP

    wide = MLP(64, hidden_dim=dims, output_dim=1)
    wide.load_state_dict(state)
    # in float64: the outputs are ~1e2-1e3, so float32 summation order alone differs by ~1e-3
    # (a CI run failed on 1 of 10 rows at atol 1e-5); float64 makes the identity exact to ~1e-10
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    wide = wide.double()
    mean = torch.stack([h.double()(x) for h in heads]).mean(0)
    torch.testing.assert_close(wide(x), mean, rtol=1e-10, atol=1e-8)


def test_committee_settings_are_checked(tmp_path):
    """Refused before any data is read (the store path need not exist)."""
    from kd_nnp.training.committee import CommitteeSettings, bootstrap_indices

    with pytest.raises(KdNnpError, match="committee.size must be >= 1"):
        CommitteeSettings(size=0)
    assert CommitteeSettings(size=3).head_seeds(4) == [4, 5, 6]
    assert CommitteeSettings(size=2, seed=10).head_seeds(4) == [10, 11]
    idx = bootstrap_indices(50, 3)
    assert len(idx) == 50 and len(set(idx)) < 50 and np.array_equal(idx, bootstrap_indices(50, 3))
    with pytest.raises(KdNnpError, match="sizes"):
        _train(tmp_path / "no_store", tmp_path, "bad", ["+committee.sizes=2"])
    with pytest.raises(KdNnpError, match="leave data.shuffle_seed null"):
        _train(tmp_path / "no_store", tmp_path, "bad2", ["committee.size=2", "data.shuffle_seed=3"])
    with pytest.raises(KdNnpError, match="export_best"):
        _train(tmp_path / "no_store", tmp_path, "bad3", ["committee.size=2", "export_best=true"])


class _PressureCommittee:
    """Known-answer committee: head k's pressure is ``B ln(V_k / V)`` (stable at V_k, bulk
    modulus B, isotropic), plus forces ``c_k * offset`` from each molecule's centre, which
    the molecular (rigid-molecule) pressure must add as ``-c_k sum|o|^2 / (3V)``."""

    def __init__(self, v_heads, bulk_gpa, c):
        from ase import units

        self.v_heads, self.b, self.c = np.asarray(v_heads), bulk_gpa * units.GPa, np.asarray(c)
        self.results = {}

    def calculate(self, atoms, properties):
        from kd_nnp.data.molecules import molecule_centres

        _, pos, centres = molecule_centres(atoms)
        p = self.b * np.log(self.v_heads / atoms.get_volume())
        stresses = np.zeros((len(p), 6))
        stresses[:, :3] = -p[:, None]
        forces = self.c[:, None, None] * (pos - centres)[None]
        self.results = {"stresses": stresses, "head_forces": forces}


def test_volume_spread_known_answer(small_crystals):
    from ase import units

    from kd_nnp.data.molecules import molecule_centres
    from kd_nnp.evaluation.protocol import VOLUME_SPREAD_STRAIN, committee_volume_spread

    atoms = small_crystals["UREAXX02"]
    v0 = atoms.get_volume()
    _, pos, centres = molecule_centres(atoms)
    o2 = float(((pos - centres) ** 2).sum())
    v_heads, c = v0 * np.array([0.98, 1.0, 1.03]), np.array([0.0, 0.01, -0.02])
    out = committee_volume_spread(atoms, _PressureCommittee(v_heads, 8.0, c))
    d = VOLUME_SPREAD_STRAIN

    def pressure(v):  # (K,) eV/A^3 at volume v, molecules rigid
        return 8.0 * units.GPa * np.log(v_heads / v) - c * o2 / (3 * v)

    bulk = -(pressure(v0 * (1 + d)).mean() - pressure(v0 * (1 - d)).mean()) / (2 * d)
    assert out["bulk_modulus_gpa"] == pytest.approx(bulk / units.GPa, rel=1e-9)
    assert bulk / units.GPa == pytest.approx(8.0, rel=0.01)
    expect = 100 * pressure(v0) / bulk
    np.testing.assert_allclose(out["head_volume_shift_pct"], expect, rtol=1e-9)
    assert out["volume_std_pct"] == pytest.approx(expect.std(), rel=1e-9)
    assert out["committee_size"] == 3 and out["volume_std_pct"] > 1.0
    # an unstable committee mean (B <= 0) gives no number, and the record is flagged
    neg = committee_volume_spread(atoms, _PressureCommittee(v_heads, -8.0, c))
    assert neg["volume_std_pct"] is None and neg["bulk_modulus_gpa"] < 0
    from kd_nnp.evaluation.relax import records_to_frame

    recs = [{"method": "m", "id": i, "status": "ok", "converged": True, "volume_std_pct": s}
            for i, s in enumerate((0.5, 1.5, None))]  # fmt: skip
    assert records_to_frame(recs, 1.0)["volume_uncertain"].tolist() == [False, True, True]


@pytest.mark.slow
def test_bootstrap_heads_and_resume(committee_run, labelled_store):
    """Bootstrap heads see a resample (fewer distinct frames, as drawn by their seed) and
    differ from the plain heads of the same seeds; a killed committee run resumes at the
    first unfinished head and gives the same committee."""
    from kd_nnp.teachers.committee import head_model
    from kd_nnp.training.committee import bootstrap_indices

    m = committee_run["bootstrap"]
    n = m["n_train"]
    for rec in m["committee"]["heads"]:
        assert rec["n_train_unique"] == len(set(bootstrap_indices(n, rec["seed"]))) < n
    boot = head_model(_blob(m["student"]), 0).mlp.state_dict()
    plain = head_model(_blob(committee_run["committee"]["student"]), 0).mlp.state_dict()
    assert max(float((boot[k] - plain[k]).abs().max()) for k in boot) > 1e-4
    run = committee_run["dir"] / "committee"
    before = _blob(run / "student.pt")["kd_nnp_committee"]["heads"]
    (run / "metrics.json").unlink()
    (run / "heads" / "2" / "head.pt").unlink()
    again = _train(labelled_store, committee_run["dir"], "committee",
                   ["committee.size=3", "committee.seed=5"])  # fmt: skip
    after = _blob(run / "student.pt")["kd_nnp_committee"]["heads"]
    for a, b in zip(before, after, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert [h["seed"] for h in again["committee"]["heads"]] == [5, 6, 7]


@pytest.mark.slow
def test_relaxation_record_of_a_committee(committee_run, small_crystals, tmp_path):
    """The relaxation benchmark with a committee student: per-crystal volume_std_pct, the
    flag, and the summary's uncertainty columns (Spearman needs >= 3 crystals)."""
    from kd_nnp.evaluation.relax import run_relax_benchmark
    from kd_nnp.evaluation.settings import RelaxSettings

    path = committee_run["committee"]["student"]
    crystals = [(c, small_crystals[c]) for c in ("FORMAM", "UREAXX02", "OXALAC11")]
    settings = RelaxSettings(max_steps=15, rmsd=False, volume_std_threshold_pct=1e-6)
    df = run_relax_benchmark(crystals, {"committee": f"student:{path}"}, tmp_path, settings,
                             workers=1, references=False, progress=False)  # fmt: skip
    assert len(df) == 3 and (df["status"] == "ok").all()
    assert (df["volume_std_pct"] > 0).all() and (df["bulk_modulus_gpa"] > 0).all()
    assert df["volume_uncertain"].all()  # every spread is above the tiny threshold
    rec = json.loads((tmp_path / "relax.jsonl").read_text().splitlines()[0])
    assert rec["committee_size"] == 3
    assert rec["volume_std_pct"] == pytest.approx(np.std(rec["head_volume_shift_pct"]))
    summary = (tmp_path / "summary.csv").read_text()
    assert "spearman_vol_std_abs_err" in summary and "n_volume_uncertain" in summary
    assert "rho(std, |V err|)" in (tmp_path / "table.md").read_text()


def test_evaluate_relax_help_formats():
    """argparse expands '%' in help texts: the threshold's help once held '%)' and made
    `kd-nnp evaluate relax --help` crash."""
    from kd_nnp.cli.evaluate import parser

    relax = parser()._subparsers._group_actions[0].choices["relax"]
    text = relax.format_help()
    assert "--volume-std-threshold-pct" in text and "in percent" in text
