"""The batch contract shared by the data module, the loss and the Lightning module.

- :class:`Targets`: one label set (``hard``: DFT, ``soft``: the teacher, ``replay``: pretrained
  CHGNet's own labels of the replay frames, ``data.replay_store``) of a batch, with a boolean
  mask per quantity (a frame or atom without that label has mask False; the hard and soft
  masks are False on replay frames, the replay masks False on every other frame);
- :class:`Batch`: what the data module's ``collate`` makes: the structures (CHGNet graphs for
  the full backend, cached :class:`~kd_nnp.training.jacobian.FrameFeatures` for the cached
  one), atoms per frame, the three label sets and, for ``data.stress_mode=molecular`` on the full
  backend, the molecule offsets and cell volumes;
- :class:`Prediction`: what the student predicts for a batch (same units as the labels).

Units: energies eV/atom (B,), forces eV/A (Natoms, 3), stress GPa in ASE's Voigt order (B, 6).
Force masks also carry ``data.force_atoms``: only the components of the selected atoms count.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

TARGETS = ("hard", "soft", "replay")
QUANTITIES = ("energy", "forces", "stress")


@dataclass(frozen=True)
class Targets:
    """Labels of one target with their masks ((B,) for energy and stress, (Natoms,) forces)."""

    energy: Tensor
    energy_mask: Tensor
    forces: Tensor
    forces_mask: Tensor
    stress: Tensor
    stress_mask: Tensor

    def label(self, quantity: str) -> tuple[Tensor, Tensor]:
        """(values, mask) of ``quantity`` (``energy`` | ``forces`` | ``stress``)."""
        if quantity not in QUANTITIES:
            raise KeyError(f"unknown quantity {quantity!r}; choose from {QUANTITIES}")
        return getattr(self, quantity), getattr(self, f"{quantity}_mask")

    @classmethod
    def empty(cls, n_frames: int, n_atoms: int) -> Targets:
        """All-zero labels, every mask False (filled by the data module's collate)."""
        return cls(
            energy=torch.zeros(n_frames),
            energy_mask=torch.zeros(n_frames, dtype=torch.bool),
            forces=torch.zeros(n_atoms, 3),
            forces_mask=torch.zeros(n_atoms, dtype=torch.bool),
            stress=torch.zeros(n_frames, 6),
            stress_mask=torch.zeros(n_frames, dtype=torch.bool),
        )

    def to(self, device: torch.device | str) -> Targets:
        return Targets(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass(frozen=True)
class Batch:
    """One collated batch of frames (see the module docstring)."""

    frame_ids: list[str]
    n_atoms: Tensor  # (B,) long
    hard: Targets
    soft: Targets
    graphs: list[Any] | None = None  # CrystalGraph per frame (full backend)
    features: list[Any] | None = None  # FrameFeatures per frame (cached backend)
    mol_offsets: Tensor | None = None  # (Natoms, 3) offsets from molecule centres
    volumes: Tensor | None = None  # (B,) A^3, with mol_offsets
    # replay labels (the data module's collate always fills them; None: no replay label)
    replay: Targets | None = None

    def __len__(self) -> int:
        return len(self.frame_ids)

    def targets(self, target: str) -> Targets:
        if target not in TARGETS:
            raise KeyError(f"unknown target {target!r}; choose from {TARGETS}")
        if target == "replay" and self.replay is None:
            n_atoms = int(self.n_atoms.sum())
            return Targets.empty(len(self), n_atoms).to(self.n_atoms.device)
        return getattr(self, target)

    def to(self, device: torch.device | str) -> Batch:
        """The labels, tensors and graphs on ``device`` (Lightning's batch transfer). Cached
        features stay on the CPU (memory maps): the cached prediction moves what it needs."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            graphs=None if self.graphs is None else [g.to(device) for g in self.graphs],
            n_atoms=self.n_atoms.to(device),
            hard=self.hard.to(device),
            soft=self.soft.to(device),
            replay=None if self.replay is None else self.replay.to(device),
            mol_offsets=move(self.mol_offsets),
            volumes=move(self.volumes),
        )


@dataclass(frozen=True)
class Prediction:
    """The student's predictions for a batch; ``forces``/``stress`` None when not asked."""

    energy: Tensor  # (B,) eV/atom
    forces: Tensor | None = None  # (Natoms, 3) eV/A
    stress: Tensor | None = None  # (B, 6) GPa, ASE Voigt order

    def get(self, quantity: str) -> Tensor | None:
        if quantity not in QUANTITIES:
            raise KeyError(f"unknown quantity {quantity!r}; choose from {QUANTITIES}")
        return getattr(self, quantity)
