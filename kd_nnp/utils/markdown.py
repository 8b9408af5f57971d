"""GitHub markdown tables of the report (``DataFrame.to_markdown``, i.e. tabulate).

Cells and headers are escaped so that a ``|`` in them (a ``|sigma|`` header, an override
string, a failure reason) stays inside its cell instead of splitting the row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def md_escape(value: object) -> str:
    """A table cell: ``|`` escaped, line breaks joined with spaces."""
    text = " ".join(str(value).splitlines())
    return text.replace("\\|", "|").replace("|", "\\|")


def md_cell(value: object, floatfmt: str = "{:.4g}") -> str:
    """NaN and None print empty; whole floats as integers; other floats with ``floatfmt``."""
    if value is None:
        return ""
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):
            return ""
        if float(value).is_integer() and abs(value) < 1e15:
            return str(int(value))
        return floatfmt.format(value)
    return md_escape(value)


def md_table(
    df: pd.DataFrame,
    cols: Sequence[str | tuple[str, str]] | None = None,
    floatfmt: str = "{:.4g}",
) -> str:
    """A GitHub markdown table of ``cols`` of ``df`` (default: all columns).

    A column is a name, or ``(name, header)`` to print another header; columns missing from
    ``df`` are left out.
    """
    pairs = [c if isinstance(c, tuple) else (c, c) for c in (cols or list(df.columns))]
    pairs = [(c, h) for c, h in pairs if c in df]
    names = [c for c, _ in pairs]
    view = pd.DataFrame(
        [[md_cell(v, floatfmt) for v in row] for row in df[names].itertuples(index=False)],
        columns=[md_escape(h) for _, h in pairs],
    )
    return view.to_markdown(index=False, tablefmt="github", disable_numparse=True)
