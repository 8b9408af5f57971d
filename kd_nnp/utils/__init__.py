"""Shared utilities: paths, thread control, worker pools, provenance, Hydra glue."""
