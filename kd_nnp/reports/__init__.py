"""Sweep reports: ``kd-nnp report SWEEP_DIR`` (tables and figures of Fig. 4-6 and Table 1).

- :mod:`~kd_nnp.reports.load`: find the job folders of a sweep and load them into a ``Sweep``;
- :mod:`~kd_nnp.reports.tables`: Fig. 4 / Table 1 / crossover tables (statistics over seeds);
- :mod:`~kd_nnp.reports.fig6`: which job each Fig. 6 row shows;
- :mod:`~kd_nnp.utils.markdown`: escaped GitHub markdown tables;
- :mod:`~kd_nnp.reports.figures` draws, :mod:`~kd_nnp.reports.write` writes the report (verb: :mod:`kd_nnp.cli.report`).
"""
