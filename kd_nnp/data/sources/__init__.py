"""Readers that turn external data (MPtrj, files, pyxtal, COD) into store frames."""
