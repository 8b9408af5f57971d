"""Settings defined once (kd_nnp.utils.settings) and the one user-error handler (kd_nnp.cli)."""

from __future__ import annotations

import argparse
import sys
import types
from dataclasses import dataclass, field

import pytest

from kd_nnp import cli
from kd_nnp.errors import KdNnpError, SettingsError
from kd_nnp.utils.settings import add_options, as_dict, from_args, from_mapping


@dataclass(frozen=True)
class _Demo:
    fmax: float = field(default=0.03, metadata={"help": "force threshold, eV/A"})
    rmsd: bool = field(default=True, metadata={"help": "RMSD15 overlay"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})
    strains: tuple[float, ...] = field(default=(0.005, 0.01), metadata={"help": "magnitudes"})
    exp_cell_factor: float | None = field(default=None, metadata={"help": "cell scaling"})
    workers: int = 1


def test_options_generated_from_fields_round_trip():
    p = argparse.ArgumentParser()
    add_options(p, _Demo, defaults={"workers": 2})
    args = p.parse_args(["--fmax", "0.1", "--no-rmsd", "--strains", "0.1,0.2"])
    s = from_args(_Demo, args)
    assert s == _Demo(fmax=0.1, rmsd=False, strains=(0.1, 0.2), workers=2)
    assert from_args(_Demo, p.parse_args([])) == _Demo(workers=2)
    text = p.format_help()
    assert "--exp-cell-factor" in text and "cell scaling" in text and "--quiet" in text


def test_from_mapping_types_and_unknown_keys():
    s = from_mapping(_Demo, {"strains": [0.1], "exp_cell_factor": 2, "workers": 3.0})
    assert s.strains == (0.1,) and s.exp_cell_factor == 2.0 and s.workers == 3
    assert as_dict(s)["strains"] == [0.1]
    with pytest.raises(SettingsError, match=r"unknown _Demo setting\(s\) \['fmx'\]"):
        from_mapping(_Demo, {"fmx": 1})
    with pytest.raises(SettingsError, match="workers=1.5 is not an integer"):
        from_mapping(_Demo, {"workers": 1.5})
    with pytest.raises(SettingsError, match="rmsd='yes' must be true or false"):
        from_mapping(_Demo, {"rmsd": "yes"})


def test_dispatcher_turns_user_errors_into_one_line(monkeypatch, capsys):
    mod = types.ModuleType("kd_nnp_fake_verb")

    def main(argv):
        raise KdNnpError("store /x/frames.db: row 3 has no cell")

    def bug(argv):
        raise RuntimeError("a bug")

    mod.main, mod.bug = main, bug
    monkeypatch.setitem(sys.modules, "kd_nnp_fake_verb", mod)
    monkeypatch.setitem(cli.VERBS, "fake", ("kd_nnp_fake_verb:main", ""))
    monkeypatch.setitem(cli.VERBS, "fakebug", ("kd_nnp_fake_verb:bug", ""))
    assert cli.main(["fake"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "kd-nnp fake: error: store /x/frames.db: row 3 has no cell"
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["fakebug"])
