"""One error base class for everything a user can cause and fix.

Every stage raises a subclass of :class:`KdNnpError` for bad input (a missing file, a row that
cannot be read, a setting out of range, a store without labels, ...). The ``kd-nnp``
dispatcher turns it into one line on stderr and exit code 1, without a traceback; argparse
usage errors exit with 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class KdNnpError(Exception):
    """A user error: the message names what is wrong and where (file, row, setting)."""


class SettingsError(KdNnpError, ValueError):
    """A setting has a value the code cannot honour."""
