"""Sweep reports: ``kd-nnp report SWEEP_DIR`` (tables and figures of Fig. 4-6 and Table 1).

:mod:`~kd_nnp.reports.aggregate` loads a sweep directory into tables,
:mod:`~kd_nnp.reports.figures` draws them, :mod:`~kd_nnp.reports.cli` writes the report.
"""
