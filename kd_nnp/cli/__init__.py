"""``kd-nnp VERB ...``: one verb per stage of the pipeline.

Each verb is a thin module of this package (``kd_nnp/cli/<verb>.py``) that parses its
arguments (argparse generated from the settings dataclasses, or Hydra) and calls its stage's
functions; only verbs compose stages. User errors (:class:`kd_nnp.errors.KdNnpError`) are
handled here once: one line on stderr, exit 1; usage errors exit 2.

Verbs are resolved lazily so ``kd-nnp --help`` stays fast and optional packages are
imported only by the verb that needs them. Each verb is a ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import sys

VERBS: dict[str, tuple[str, str]] = {
    "data": (
        "kd_nnp.cli.data:main",
        "build or extend a frames store: mptrj, files, pyxtal, perturb, cod, generate, molecules, inorganic, merge",
    ),
    "label": (
        "kd_nnp.cli.label:main",
        "label a store with a teacher (Hydra: store=... teacher=so3lr)",
    ),
    "train": (
        "kd_nnp.cli.train:main",
        "distil: train the student (Hydra: experiment=... loss.r_se=1)",
    ),
    "export": ("kd_nnp.cli.export:main", "export a checkpoint as a CHGNet model file"),
    "evaluate": (
        "kd_nnp.cli.evaluate:main",
        "benchmarks: relax, teachers, elastic, table2, cv, lattice, forgetting, frames",
    ),
    "report": ("kd_nnp.cli.report:main", "aggregate a sweep directory into tables and figures"),
    "demo": (
        "kd_nnp.cli.demo:main",
        "the main job: distil, relax, compare (Hydra: demo=quick)",
    ),
}


def _usage() -> str:
    lines = ["usage: kd-nnp VERB [args...]", "", "verbs:"]
    lines += [f"  {verb:<9} {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "`kd-nnp VERB --help` for a verb's own options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from kd_nnp import __version__

        print(f"kd_nnp {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"kd-nnp: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func = VERBS[verb][0].split(":")
    from kd_nnp.errors import KdNnpError

    try:
        fn = getattr(importlib.import_module(module), func)
        rc = fn(rest)
    except KdNnpError as err:
        # a user error: one line naming what is wrong, no traceback (docs/architecture.md)
        print(f"kd-nnp {verb}: error: {err}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
