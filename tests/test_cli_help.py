"""Every ``--help`` page of the argparse verbs formats, and ``kd-nnp --help`` names every
subcommand (``kd-nnp data generate --help`` crashed on a '%' in a settings help text)."""

from __future__ import annotations

import argparse

import pytest

from kd_nnp import cli
from kd_nnp.cli import data, evaluate, report


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    out: dict[str, argparse.ArgumentParser] = {}
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.update(action.choices)
    return out


PARSERS = {"data": data._parser(), "evaluate": evaluate.parser(), "report": report.build_parser()}


@pytest.mark.parametrize(
    ("verb", "sub"),
    [(v, s) for v, p in PARSERS.items() for s in [None, *_subparsers(p)]],
)
def test_help_pages_format(verb: str, sub: str | None) -> None:
    p = PARSERS[verb] if sub is None else _subparsers(PARSERS[verb])[sub]
    text = p.format_help()  # raised ValueError for `data generate` before the fix
    assert "usage:" in text


def test_top_level_usage_names_every_subcommand() -> None:
    usage = cli._usage()
    for verb in ("data", "evaluate"):
        line = next(line for line in usage.splitlines() if line.strip().startswith(verb + " "))
        missing = [s for s in _subparsers(PARSERS[verb]) if s != "info" and s not in line]
        assert not missing, f"`kd-nnp --help` line of {verb} misses {missing}"


def test_percent_in_a_settings_help_text_is_escaped() -> None:
    import dataclasses

    from kd_nnp.utils.settings import add_options

    @dataclasses.dataclass(frozen=True)
    class S:
        share: float = dataclasses.field(default=0.5, metadata={"help": "fraction (CSD %)"})
        ratio: str = dataclasses.field(default="50%", metadata={"help": "as text"})

    p = argparse.ArgumentParser()
    add_options(p, S)
    text = p.format_help()
    assert "(CSD %)" in text and "(default: 50%)" in text
