"""Frames: the on-disk store, its sources (MPtrj, files, pyxtal, COD, perturbations)."""

from kd_nnp.data.store import Frame, FrameStore, Labels, LabelSet

__all__ = ["Frame", "FrameStore", "LabelSet", "Labels"]
