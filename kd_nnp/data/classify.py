"""The paper's element rule for MPtrj frames: organic / complex / inorganic.

- ``organic``: every atom is one of H, C, N, O, P, S, F, Cl, Br, I;
- ``complex``: at least two *different* elements of that list, at least one element outside
  it, and at least 80 % of the atoms from the list;
- ``inorganic``: everything else.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Literal

ORGANIC_ELEMENTS: frozenset[str] = frozenset(["H", "C", "N", "O", "P", "S", "F", "Cl", "Br", "I"])
COMPLEX_MIN_FRACTION = 0.8
CLASSES = ("organic", "complex", "inorganic")

Klass = Literal["organic", "complex", "inorganic"]


def _counts(obj: Any) -> Counter[str]:
    """Element -> number of atoms from an ase.Atoms, a symbol list, or a {symbol: count} map."""
    if hasattr(obj, "get_chemical_symbols"):
        return Counter(obj.get_chemical_symbols())
    if isinstance(obj, Mapping):
        return Counter({str(k): float(v) for k, v in obj.items()})
    if isinstance(obj, str):
        raise TypeError("pass a list of symbols or a {symbol: count} mapping, not a string")
    if isinstance(obj, Iterable):
        return Counter(str(s) for s in obj)
    raise TypeError(f"cannot read a composition from {type(obj).__name__}")


def classify(composition: Any) -> Klass:
    """Classify a composition (Atoms, list of symbols or {symbol: count}) by the paper's rule."""
    counts = _counts(composition)
    total = sum(counts.values())
    if total <= 0:
        raise ValueError("empty composition")
    organic_elements = [el for el in counts if el in ORGANIC_ELEMENTS and counts[el] > 0]
    n_organic = sum(counts[el] for el in organic_elements)
    if n_organic == total:
        return "organic"
    if len(organic_elements) >= 2 and n_organic >= COMPLEX_MIN_FRACTION * total - 1e-9:
        return "complex"
    return "inorganic"


def parse_classes(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"organic,complex"`` -> ("organic", "complex"), with a clear error on typos."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    items = [s for s in items if s]
    bad = [s for s in items if s not in CLASSES]
    if bad or not items:
        raise ValueError(f"unknown frame class(es) {bad or items}; choose from {list(CLASSES)}")
    return tuple(items)


def outside_scope(atoms: Any) -> list[str]:
    """Elements of ``atoms`` (or a symbol list) outside kd_nnp's organic scope, sorted."""
    return sorted(set(_counts(atoms)) - ORGANIC_ELEMENTS)


class ScopeWatch:
    """Notes frames with elements outside the organic scope while they stream past, and
    warns once, naming them: kd_nnp distils for organic molecular crystals, and a frame with
    e.g. Fe or Na is probably a mistake (or needs a teacher that covers it)."""

    def __init__(self) -> None:
        self.found: dict[str, list[str]] = {}

    def check(self, frame_id: str, atoms: Any) -> None:
        extra = outside_scope(atoms)
        if extra:
            self.found[frame_id] = extra

    def watch(self, frames: Iterable[Any]) -> Iterable[Any]:
        for fr in frames:
            self.check(fr.frame_id, fr.atoms)
            yield fr

    def message(self, where: str, show: int = 5) -> str | None:
        if not self.found:
            return None
        items = list(self.found.items())
        listed = "; ".join(f"{fid} ({', '.join(els)})" for fid, els in items[:show])
        more = f"; and {len(items) - show} more" if len(items) > show else ""
        elements = sorted({e for els in self.found.values() for e in els})
        return (
            f"{where}: {len(items)} frame(s) have elements outside the organic scope "
            f"{{{', '.join(sorted(ORGANIC_ELEMENTS))}}}: {listed}{more} (elements: "
            f"{', '.join(elements)}); kd_nnp targets organic molecular crystals"
        )

    def warn(self, log: Any, where: str) -> None:
        msg = self.message(where)
        if msg:
            log.warning(msg)
