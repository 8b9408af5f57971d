"""Committee students (issue 12): K heads trained from one feature cache, the committee file,
its calculator (mean and spread from one backbone pass), single-head export, and the
volume uncertainty of a relaxation."""

from __future__ import annotations

import copy

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
    return out


def _blob(path):
    return torch.load(path, map_location="cpu", weights_only=False)


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


def test_committee_file_round_trip_and_calculator(committee_run, small_crystals, tmp_path):
    """The calculator's mean/std equal those of the K single-head CHGNet files (exported
    with ``kd-nnp export --head``), from one backbone pass; the mean export is the mean."""
    from chgnet.model import CHGNet

    from kd_nnp.cli import main as cli_main
    from kd_nnp.teachers.calculators import load_chgnet, make_calculator, method_label
    from kd_nnp.teachers.committee import CommitteeCalculator

    path = committee_run["committee"]["student"]
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
    # mean-only mode: the same mean, the spreads only when asked for
    lazy = CommitteeCalculator(calc.model, derivative_spread=False)
    b = atoms.copy()
    b.calc = lazy
    np.testing.assert_allclose(b.get_forces(), f.mean(0), atol=2e-5)
    assert "forces_std" not in lazy.results
    np.testing.assert_allclose(lazy.get_property("stress_std", b), s.std(0), atol=1e-7)


def test_export_refuses_bad_heads(committee_run, tmp_path, capsys):
    from kd_nnp.cli import main as cli_main

    path = committee_run["committee"]["student"]
    for args, msg in (
        ([], "is a committee file: choose --head"),
        (["--head", "3"], "head must be 0..2 or 'mean'"),
        (["--head", "x"], "--head must be an integer or 'mean'"),
    ):
        assert cli_main(["export", path, str(tmp_path / "x.pt"), *args]) == 1
        assert msg in capsys.readouterr().err
    single = committee_run[5]["student"]
    assert cli_main(["export", single, str(tmp_path / "x.pt"), "--head", "0"]) == 1
    assert "is not a committee file" in capsys.readouterr().err
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
    x = torch.randn(10, 64)
    torch.testing.assert_close(wide(x), torch.stack([h(x) for h in heads]).mean(0))


def test_committee_settings_are_checked(labelled_store, tmp_path):
    from kd_nnp.training.committee import CommitteeSettings, bootstrap_indices

    with pytest.raises(KdNnpError, match="committee.size must be >= 1"):
        CommitteeSettings(size=0)
    assert CommitteeSettings(size=3).head_seeds(4) == [4, 5, 6]
    assert CommitteeSettings(size=2, seed=10).head_seeds(4) == [10, 11]
    idx = bootstrap_indices(50, 3)
    assert len(idx) == 50 and len(set(idx)) < 50 and np.array_equal(idx, bootstrap_indices(50, 3))
    with pytest.raises(KdNnpError, match="sizes"):
        _train(labelled_store, tmp_path, "bad", ["+committee.sizes=2"])
    with pytest.raises(KdNnpError, match="leave data.shuffle_seed null"):
        _train(labelled_store, tmp_path, "bad2", ["committee.size=2", "data.shuffle_seed=3"])
    with pytest.raises(KdNnpError, match="export_best"):
        _train(labelled_store, tmp_path, "bad3", ["committee.size=2", "export_best=true"])
