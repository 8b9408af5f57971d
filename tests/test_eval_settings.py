"""Evaluation settings are defined once (kd_nnp.evaluation.settings): the YAML blocks, the
command-line options and the runners all go through the dataclasses."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from kd_nnp.cli.evaluate import parser
from kd_nnp.errors import SettingsError
from kd_nnp.evaluation.protocol import relax_structure
from kd_nnp.evaluation.settings import (
    ElasticSettings,
    EvalJobSettings,
    RelaxSettings,
)
from kd_nnp.evaluation.structures import load_dataset
from kd_nnp.utils.paths import conf_dir
from kd_nnp.utils.settings import from_mapping


def _compose(config: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose(config, overrides=overrides)


def test_exp_cell_factor_help_says_what_the_code_does():
    """The option's help claimed min(1, tol*V/fmax); the code uses 1 when unset."""
    relax = parser()._subparsers._group_actions[0].choices["relax"]
    (action,) = [a for a in relax._actions if a.dest == "exp_cell_factor"]
    assert "min(" not in action.help and "unset = 1" in action.help
    atoms = load_dataset("pyxtal:test", codes=["FORMAM"])[0].atoms
    from test_eval_relax import ScaledCrystalCalc

    _, info = relax_structure(atoms, ScaledCrystalCalc(), RelaxSettings(max_steps=2))
    assert info["exp_cell_factor"] == 1.0


def test_yaml_blocks_load_into_the_settings():
    cfg = _compose("train", ["data.store=STORE", "experiment=paper_table2"])
    job = EvalJobSettings.from_config(cfg.evaluate)
    assert job.relax == RelaxSettings(fmax=cfg.evaluate.fmax, max_steps=cfg.evaluate.max_steps)
    assert job.max_atoms == cfg.evaluate.max_atoms and job.baselines
    assert job.elastic is not None and job.elastic.protocol == ElasticSettings()
    demo = _compose("demo", [])
    assert from_mapping(RelaxSettings, demo.demo.relax).max_steps == demo.demo.relax.max_steps
    with pytest.raises(SettingsError, match=r"unknown key\(s\) \['fmx'\]"):
        EvalJobSettings.from_config(OmegaConf.create({"fmx": 0.1}))
    with pytest.raises(SettingsError, match="ion_fmx"):
        EvalJobSettings.from_config({"elastic": {"ion_fmx": 0.1}})


def test_relax_options_generated_from_the_settings():
    args = parser().parse_args(
        ["relax", "--calc", "chgnet", "--out", "o", "--stress-tol-gpa", "0.02", "--no-rmsd"]
    )
    assert args.stress_tol_gpa == 0.02 and args.rmsd is False and args.workers == 2
    args = parser().parse_args(["elastic", "--calc", "chgnet", "--shared", "--out", "o"])
    assert args.strains == (0.005, 0.01) and args.ion_fmax == 0.01


def test_elastic_relaxation_defaults_are_the_relaxation_settings():
    """The elastic protocol's relaxation thresholds default to RelaxSettings' (defined once)."""
    import dataclasses

    from kd_nnp.evaluation.settings import ElasticSettings, RelaxSettings

    relax = {f.name: f.default for f in dataclasses.fields(RelaxSettings)}
    for f in dataclasses.fields(ElasticSettings):
        if f.name in relax:
            assert f.default == relax[f.name], f.name
    assert ElasticSettings().relax() == RelaxSettings()
