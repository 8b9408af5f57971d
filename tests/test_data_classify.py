"""The paper's organic / complex / inorganic rule, including its boundaries."""

from __future__ import annotations

import pytest
from ase.build import bulk, molecule

from kd_nnp.data.classify import classify, parse_classes


@pytest.mark.parametrize(
    ("composition", "expected"),
    [
        ({"C": 6, "H": 6}, "organic"),
        (
            {"C": 1, "H": 4, "N": 1, "O": 1, "P": 1, "S": 1, "F": 1, "Cl": 1, "Br": 1, "I": 1},
            "organic",
        ),
        ({"C": 1}, "organic"),  # diamond/graphite: only listed elements
        ({"C": 3, "H": 1, "Fe": 1}, "complex"),  # exactly 80 % organic atoms
        ({"C": 11, "H": 4, "Fe": 4}, "inorganic"),  # 15/19 = 78.9 % < 80 %
        ({"C": 9, "Fe": 1}, "inorganic"),  # 90 % but only one organic element
        ({"C": 8, "H": 8, "Na": 1}, "complex"),
        ({"Na": 1, "Cl": 1}, "inorganic"),
        ({"Hf": 4, "S": 2}, "inorganic"),
        ({"Si": 1, "O": 2}, "inorganic"),
        ({"Xe": 1, "F": 2}, "inorganic"),  # 66 % organic, one organic element
        ({"H": 8, "C": 4, "Xe": 1}, "complex"),  # noble gas counts as "other"
    ],
)
def test_classify_rule(composition, expected):
    assert classify(composition) == expected


def test_classify_accepts_atoms_and_symbols():
    assert classify(molecule("CH3CH2OH")) == "organic"
    assert classify(bulk("Cu")) == "inorganic"
    assert classify(["C", "C", "C", "C", "H", "Li"]) == "complex"  # 5/6 = 83 %
    with pytest.raises(TypeError):
        classify("CH4")
    with pytest.raises(ValueError):
        classify({})


def test_parse_classes():
    assert parse_classes("organic, complex") == ("organic", "complex")
    with pytest.raises(ValueError, match="organc"):
        parse_classes("organc")
