"""Every command shown in README.md and docs/*.md is exercised here (defect D5).

The commands are read from the docs *at test time*, so a renamed option or verb in the code
or in the docs is checked as it is written then. Commands are the lines starting with
``kd-nnp``, ``make``, ``python -m kd_nnp`` or ``python <script>.py`` inside fenced blocks:

- ```` ```bash ````, ```` ```sh ````, ```` ```console ```` blocks hold *runnable* commands:
  ``\\`` continuations are joined, ``# comments`` dropped, ``VAR=value`` lines of the same
  file expand ``$VAR``/``${VAR}`` later on, ``$KD_NNP_SHARED_DATA`` is the shared data folder
  (or a placeholder path when absent).
- Blocks without a language are *synopses* (``[--opt X]`` optional, ``a|b`` alternatives,
  ``PATHS...``): every option they name is parse-checked, optional parts included (the first
  alternative of ``a|b`` is taken); they never run and take no part in a sequence.

What happens to each command:

- **fully run** (tiny substitutions, in a temporary working directory): ``kd-nnp data pyxtal``
  (``--limit 1`` added), ``kd-nnp data perturb`` (``--n-strain 1 --n-rattle 0 --limit 1``) and
  ``kd-nnp data inorganic`` (``--n-perturbed 1 --prototypes Si``),
  so the stores that later lines of the same file use really exist, with their real labels.
- **parse-checked**, argparse verbs (``data`` subcommands other than the three above, ``evaluate``,
  ``report``, ``export``) and ``python <script>.py``: the verb's own ``main`` is called with the
  line's arguments and stopped right after ``parse_args`` succeeds (a missing required option,
  an unknown option or a bad choice fails).
- **parse-checked**, Hydra verbs (``label``, ``train``, ``demo``; found by intercepting
  ``run_hydra``): the config is composed from ``conf_dir()`` with the line's overrides (each
  value of a ``-m`` sweep composed once) and fully resolved (a ``???`` left unset fails).
  Then the *documented sequence* is checked: a store named by ``store=``/``data.store=`` must be
  created by an earlier line of the same file (or be a placeholder such as ``STORE``); a
  ``kd-nnp label`` line adds its label set; a ``train`` line whose loss has a hard term
  (``r_he``/``r_hf``/``r_hs`` > 0 with ``data.use_hard``) needs a store with hard labels, and one
  with a soft term needs the label set ``data.label_set`` from an earlier ``label`` line; a
  ``data.replay_store`` must be made by an earlier line and hold ``data.replay_label_set``.
- ``make TARGET [VAR=value]``: the target exists in the Makefile and each VAR is one the
  Makefile reads.

Placeholders: upper-case words (``STORE``, ``DIR``, ``CKPT``) and ``<run>`` stay literal paths
(a store so named is not checked against the sequence); in synopses ``N`` becomes ``1``; a
``...`` word is dropped and means "more overrides here", so a Hydra line holding it may leave
``???`` values unset. Stores written by parse-checked ``data`` lines are known to exist but their
hard labels are unknown, so no hard-label check is made on them.
"""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_LANGS = {"bash", "sh", "console", "shell"}
_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")
HARD_RATIOS = ("r_he", "r_hf", "r_hs")
SOFT_RATIOS = ("r_se", "r_sf", "r_ss")
#: the data subcommands that are run for real, and their tiny substitutions
RUN_DATA = {
    "pyxtal": {"add": ["--limit", "1"], "set": {}},
    "perturb": {"add": ["--limit", "1"], "set": {"--n-strain": "1", "--n-rattle": "0"}},
    "inorganic": {"add": ["--prototypes", "Si"], "set": {"--n-perturbed": "1"}},
}


@dataclass
class Command:
    doc: str  # file name relative to the repo
    line: int  # first line of the command in the file
    text: str  # as written (continuations joined)
    argv: list[str]  # after variable expansion, without the program name
    program: str  # kd-nnp | make | python
    synopsis: bool  # from a block without a language

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def _is_command(words: list[str]) -> bool:
    if not words:
        return False
    if words[0] in {"kd-nnp", "make"}:
        return True
    return (
        words[0] in {"python", "python3"}
        and len(words) > 1
        and (
            words[1:3] == ["-m", "kd_nnp"]
            or words[1:3] == ["-m", "kd_nnp.cli"]
            or words[1].endswith(".py")
        )
    )


def _normalise_synopsis(text: str) -> str:
    text = text.replace("[", " ").replace("]", " ")
    words = []
    for w in text.split():
        if w.endswith("...") and w != "...":
            w = w[:-3]
        if "|" in w:
            w = w.split("|")[0]
        words.append("1" if w == "N" else w)  # the metavar of a number
    return " ".join(words)


def extract_commands(path: Path) -> list[Command]:
    """The shell commands of a markdown file, in order (see the module docstring)."""
    text = path.read_text()
    rel = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name
    env: dict[str, str] = {}
    from kd_nnp.utils.paths import shared_data_dir

    shared = shared_data_dir()
    env["KD_NNP_SHARED_DATA"] = str(shared) if shared else "/nonexistent/shared/data"
    out: list[Command] = []
    for block in _FENCE.finditer(text):
        lang = block.group(1).lower()
        if lang and lang not in RUN_LANGS:
            continue
        synopsis = not lang
        first_line = text[: block.start(2)].count("\n") + 1
        lines = block.group(2).split("\n")
        i = 0
        while i < len(lines):
            start = i
            joined = lines[i].rstrip()
            while joined.endswith("\\") and i + 1 < len(lines):
                i += 1
                joined = joined[:-1] + " " + lines[i].strip()
            i += 1
            raw = joined.strip()
            if lang == "console" and raw.startswith("$ "):
                raw = raw[2:]
            if not raw or raw.startswith("#"):
                continue
            shown = raw
            if synopsis:
                raw = _normalise_synopsis(raw)
            try:
                words = shlex.split(raw, comments=True)
            except ValueError:
                continue
            assign = re.fullmatch(r"([A-Za-z_]\w*)=(.*)", raw.split("#")[0].strip())
            if not synopsis and assign and len(words) == 1:
                env[assign.group(1)] = words[0].split("=", 1)[1]
                continue
            words = _expand(words, env)
            if not _is_command(words):
                continue
            program = "python" if words[0].startswith("python") else words[0]
            argv = words[1:]
            if program == "python" and argv[0] == "-m":
                program, argv = "kd-nnp", argv[2:]
            out.append(
                Command(rel, first_line + start, shown, [a for a in argv if a != "..."],
                        program, synopsis)
            )  # fmt: skip
    return out


def _expand(words: list[str], env: dict[str, str]) -> list[str]:
    """``$VAR``/``${VAR}`` from the file's assignments; a variable holding several words
    (``E="a=1 b=2"``) expands to them."""
    out: list[str] = []
    for w in words:
        full = re.fullmatch(r"\$\{?(\w+)\}?", w)
        if full and full.group(1) in env:
            out += shlex.split(env[full.group(1)])
            continue
        out.append(re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), w))
    return out


# ----------------------------------------------------------------------------- checkers
class _Parsed(Exception):
    """Raised right after the outermost argparse call succeeded."""

    def __init__(self, namespace: object) -> None:
        super().__init__("parsed")
        self.namespace = namespace


@dataclass
class _HydraCall(Exception):
    config_name: str
    argv: list[str]


@dataclass
class Store:
    hard: bool | None  # None: unknown (a parse-checked data line made it)
    labels: set[str] = field(default_factory=set)


def _stop_after_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    depth = [0]

    def wrap(orig):
        def f(self, *a, **k):
            depth[0] += 1
            try:
                res = orig(self, *a, **k)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise _Parsed(res)
            return res

        return f

    monkeypatch.setattr(
        argparse.ArgumentParser, "parse_args", wrap(argparse.ArgumentParser.parse_args)
    )
    monkeypatch.setattr(
        argparse.ArgumentParser, "parse_known_args", wrap(argparse.ArgumentParser.parse_known_args)
    )

    def fake_run_hydra(config_name, task, argv):
        raise _HydraCall(config_name, list(argv))

    import kd_nnp.cli.label as label_cli
    from kd_nnp.data.store import StoreError

    real_check = label_cli._check_arguments

    def check_arguments(argv):
        """`kd-nnp label` opens store= before Hydra; a store that a parse-checked (not run)
        line of the doc makes is not on disk: the sequence check (_check_hydra) judges it."""
        try:
            real_check(argv)
        except StoreError:
            stores = [a.partition("=")[2] for a in argv if a.lstrip("+").startswith("store=")]
            if any(Path(s).exists() for s in stores):
                raise

    monkeypatch.setattr(label_cli, "_check_arguments", check_arguments)

    monkeypatch.setattr("kd_nnp.utils.hydra_cli.run_hydra", fake_run_hydra)


def _parse(cmd: Command, argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys) -> object:
    """argparse Namespace or _HydraCall of a kd-nnp / python script line; raises AssertionError."""
    with monkeypatch.context() as m:
        _stop_after_parse(m)
        try:
            if cmd.program == "kd-nnp":
                from kd_nnp.cli import VERBS, main

                assert argv and argv[0] in VERBS, f"{cmd}\n  unknown verb {argv[:1]}"
                rc = main(argv)
            else:
                import runpy
                import sys

                script = REPO / argv[0]
                assert script.is_file(), f"{cmd}\n  no script {argv[0]}"
                m.setattr(sys, "argv", [str(script), *argv[1:]])
                runpy.run_path(str(script), run_name="__main__")
                rc = None
        except _Parsed as p:
            return p.namespace
        except _HydraCall as h:
            return h
        except SystemExit as e:
            err = capsys.readouterr().err.strip().splitlines()
            raise AssertionError(f"{cmd}\n  rejected (exit {e.code}): {err[-1:]}") from None
    raise AssertionError(f"{cmd}\n  returned {rc} without parsing its arguments")


def _compose_all(call: _HydraCall) -> list:
    """The composed config of every point of the line (each sweep value once)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

    from kd_nnp.utils.paths import conf_dir

    flags = {"-m", "--multirun"}
    overrides = [a for a in call.argv if a not in flags]
    bad = [a for a in overrides if a.startswith("-")]
    assert not bad, f"unsupported flags {bad}"
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        for o in parsed
        if o.is_sweep_override()
    ]
    if sweeps and not ({"-m", "--multirun"} & set(call.argv)):
        raise AssertionError(f"sweep values {sweeps} without -m")
    points = [fixed]
    for i, values in enumerate(sweeps):  # each value once, the other sweeps at their first
        for v in values if i == 0 else values[1:]:
            points.append(
                [*fixed, *(s[0] for s in sweeps[:i]), v, *(s[0] for s in sweeps[i + 1 :])]
            )
    if sweeps:
        points = points[1:] or [fixed]
    cfgs = []
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            for ov in points:
                cfg = compose(call.config_name, overrides=ov, return_hydra_config=True)
                with open_dict(cfg):
                    cfg.hydra.runtime.output_dir = "/tmp/kd_nnp_docs_check"
                    cfg.hydra.job.num = 0
                HydraConfig.instance().set_config(cfg)
                for key in cfg:
                    if key == "hydra":
                        continue
                    node = cfg._get_node(key)
                    if isinstance(node, DictConfig | ListConfig):
                        OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
                    else:
                        _ = cfg[key]
                with open_dict(cfg):
                    del cfg["hydra"]
                cfgs.append(cfg)
    finally:
        HydraConfig.instance().cfg = None  # leave no global Hydra state to later tests
    return cfgs


def _store_key(path: object, cwd: Path) -> str:
    return str((cwd / str(path)).resolve())


def _is_placeholder(path: str) -> bool:
    return any(_PLACEHOLDER.match(p) or "<" in p for p in Path(path).parts)


def _store_from_disk(path: Path) -> Store:
    from kd_nnp.data.store import FrameStore

    fs = FrameStore(path)
    return Store(any(f.hard is not None for f in fs.iter_frames()), set(fs.label_names()))


def _check_hydra(cmd: Command, call: _HydraCall, stores: dict[str, Store], cwd: Path) -> list[str]:
    """Config errors and sequence errors of one Hydra line (empty list: fine)."""
    try:
        cfgs = _compose_all(call)
    except Exception as exc:  # noqa: BLE001 - any composition/resolution error is the finding
        from omegaconf.errors import MissingMandatoryValue

        if isinstance(exc, MissingMandatoryValue) and "..." in shlex.split(cmd.text, comments=True):
            return []  # the line elides the rest of the overrides ("..."): nothing to resolve
        return [f"{cmd}\n  config does not compose/resolve: {type(exc).__name__}: {exc}"]
    problems = []
    for cfg in cfgs:
        if call.config_name in ("train", "demo"):
            problems += _replay_problems(cmd, cfg, stores, cwd)
        if call.config_name == "label":
            path = str(cfg.store)
            if cmd.synopsis or _is_placeholder(path):
                continue
            store = stores.get(_store_key(path, cwd))
            if store is None:
                problems.append(f"{cmd}\n  store {path} is not made by an earlier line")
                continue
            store.labels.add(str(cfg.name or cfg.teacher.name))
        elif call.config_name == "train" and "data" in cfg and "loss" in cfg:
            path = str(cfg.data.store)
            if cmd.synopsis or _is_placeholder(path):
                continue
            store = stores.get(_store_key(path, cwd))
            if store is None:
                problems.append(f"{cmd}\n  store {path} is not made by an earlier line")
                continue
            loss = cfg.loss
            hard = bool(cfg.data.use_hard) and any(float(loss.get(k, 0)) > 0 for k in HARD_RATIOS)
            soft = bool(cfg.data.use_soft) and any(float(loss.get(k, 0)) > 0 for k in SOFT_RATIOS)
            if hard and store.hard is False:
                ratios = {k: float(loss.get(k, 0)) for k in HARD_RATIOS}
                problems.append(
                    f"{cmd}\n  the loss has hard terms {ratios} but store {path} has no hard "
                    "(DFT) labels"
                )
            if soft and str(cfg.data.label_set) not in store.labels:
                problems.append(
                    f"{cmd}\n  soft terms need label set {cfg.data.label_set!r} in {path}; "
                    f"an earlier line made {sorted(store.labels)}"
                )
    return problems


def _replay_problems(cmd: Command, cfg, stores: dict[str, Store], cwd: Path) -> list[str]:
    """A ``train``/``demo`` line's ``data.replay_store`` is made and labelled with
    ``data.replay_label_set`` by earlier lines (unless a placeholder)."""
    replay = cfg.data.get("replay_store") if "data" in cfg else None
    if cmd.synopsis or not replay or _is_placeholder(str(replay)):
        return []
    store = stores.get(_store_key(replay, cwd))
    want = str(cfg.data.get("replay_label_set"))
    if store is None:
        return [f"{cmd}\n  replay store {replay} is not made by an earlier line"]
    if want not in store.labels:
        return [
            f"{cmd}\n  data.replay_store={replay} needs label set {want!r}; an earlier line "
            f"made {sorted(store.labels)}"
        ]
    return []


def _makefile() -> tuple[set[str], set[str]]:
    text = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M))
    variables = set(re.findall(r"^(?:export\s+)?([A-Z_][A-Z0-9_]*)\s*[?:]?=", text, re.M))
    return targets, variables


def _check_make(cmd: Command) -> list[str]:
    targets, variables = _makefile()
    problems = []
    for arg in cmd.argv:
        if "=" in arg:
            var = arg.split("=", 1)[0]
            if var not in variables:
                problems.append(f"{cmd}\n  the Makefile does not read {var}")
        elif arg not in targets:
            problems.append(f"{cmd}\n  no Makefile target {arg!r}")
    return problems


def _run_data_line(cmd: Command, argv: list[str]) -> list[str]:
    """Substitute the tiny options and really run the line."""
    from kd_nnp.cli import main

    sub = RUN_DATA[argv[1]]
    argv = list(argv)
    for opt, value in sub["set"].items():
        if opt in argv:
            argv[argv.index(opt) + 1] = value
        else:
            argv += [opt, value]
    for i in range(0, len(sub["add"]), 2):
        opt = sub["add"][i]
        if opt in argv:
            argv[argv.index(opt) + 1] = sub["add"][i + 1]
        else:
            argv += sub["add"][i : i + 2]
    rc = main(argv)
    return [] if rc == 0 else [f"{cmd}\n  exit {rc} when run as {' '.join(argv)}"]


def _calc_label_problems(cmd: Command, parsed: object) -> list[str]:
    """An ``evaluate`` line whose ``--calc`` specs share a method label is refused at run time
    (results would merge), after argparse accepted it: check it here."""
    from kd_nnp.errors import KdNnpError
    from kd_nnp.teachers.calculators import unique_labels

    specs = getattr(parsed, "calc", None)
    if not isinstance(specs, list) or cmd.synopsis:
        return []
    try:
        unique_labels(specs)
    except KdNnpError as exc:
        return [f"{cmd}\n  {exc}"]
    return []


def check_doc(path: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> list[str]:
    """All problems of one markdown file's commands, in the file's order."""
    stores: dict[str, Store] = {}
    problems: list[str] = []
    monkeypatch.chdir(tmp)
    for cmd in extract_commands(path):
        if cmd.program == "make":
            problems += _check_make(cmd)
            continue
        argv = cmd.argv
        run = (
            not cmd.synopsis
            and cmd.program == "kd-nnp"
            and argv[:1] == ["data"]
            and len(argv) > 1
            and argv[1] in RUN_DATA
        )
        try:
            parsed = _parse(cmd, argv, monkeypatch, capsys)
        except AssertionError as exc:
            problems.append(str(exc))
            continue
        if isinstance(parsed, _HydraCall):
            problems += _check_hydra(cmd, parsed, stores, tmp)
            continue
        problems += _calc_label_problems(cmd, parsed)
        if cmd.synopsis or cmd.program != "kd-nnp" or argv[0] != "data":
            continue
        out = getattr(parsed, "out", None)
        if run:
            found = _run_data_line(cmd, argv)
            problems += found
            if not found:
                stores[_store_key(out, tmp)] = _store_from_disk(tmp / out)
        elif out is not None and getattr(parsed, "cmd", None) not in {"cod", "info"}:
            stores[_store_key(out, tmp)] = Store(hard=None)
    return list(dict.fromkeys(problems))  # a sweep repeats a finding per point


def _doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_doc_commands_parse_and_run(doc, tmp_path, monkeypatch, capsys):
    problems = check_doc(doc, tmp_path, monkeypatch, capsys)
    assert not problems, "\n".join(problems)


def test_docs_show_commands():
    """The extractor finds the README pipeline (it would pass vacuously otherwise)."""
    cmds = extract_commands(REPO / "README.md")
    verbs = {c.argv[0] for c in cmds if c.program == "kd-nnp"}
    assert {"data", "label", "train", "evaluate"} <= verbs
    assert any(c.program == "make" for c in cmds)


def test_checker_flags_known_mistakes(tmp_path, monkeypatch, capsys):
    """Each kind of mistake is caught: unknown verb/option, missing required option, a hard
    loss on a store without hard labels, an unlabelled store, an unknown make target, a
    replay store not made or not labelled by an earlier line, two ``--calc`` with one label."""
    doc = tmp_path / "bad.md"
    doc.write_text(
        "```bash\n"
        "kd-nnp data pyxtal --db test --max-atoms 60 --out s/x\n"
        "kd-nnp data perturb --from s/x --out s/p --n-strain 2 --n-rattle 1\n"
        "kd-nnp train data.store=s/p loss=soft_only\n"  # no label set yet
        "kd-nnp label store=s/p teacher=so3lr\n"
        "kd-nnp train -m data.store=s/p loss=mixed loss.r_he=0.1,1\n"  # no hard labels
        "kd-nnp train data.store=s/p loss=soft_only\n"  # fine
        "kd-nnp train data.store=s/nowhere loss=soft_only\n"  # never made
        "kd-nnp train data.store=s/p los=mixed\n"  # bad override
        "kd-nnp evaluate relax --calc chgnet --dataset pyxtal:test\n"  # --out missing
        "kd-nnp data pyxtal --db nope --out s/y\n"  # bad choice
        "kd-nnp frobnicate\n"
        "make nosuchtarget\n"
        "kd-nnp train data.store=s/p data.replay_store=s/x loss.r_re=1\n"  # s/x: no chgnet set
        "kd-nnp train data.store=STORE data.replay_store=s/gone loss.r_re=1\n"  # never made
        "kd-nnp evaluate forgetting --calc student:a/train/student.pt --calc student:b/train/student.pt --out f\n"  # one label
        "kd-nnp evaluate forgetting --calc student:a/train/student.pt=A --calc student:b/train/student.pt --out f\n"  # fine
        "```\n"
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    problems = check_doc(doc, run_dir, monkeypatch, capsys)
    text = "\n".join(problems)
    flagged = {int(p.split(":", 2)[1]) for p in problems}
    assert flagged == {4, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16}, text  # 2, 3, 5, 7, 17 are right
    assert "label set 'so3lr'" in text
    assert "no hard (DFT) labels" in text and "'r_he': 0.1" in text and "'r_he': 1.0" in text
    assert "s/nowhere is not made" in text
    assert "los" in text and "does not compose" in text
    assert "evaluate relax" in text and "rejected" in text
    assert "--db nope" in text
    assert "unknown verb" in text
    assert "nosuchtarget" in text
    assert "data.replay_store=s/x needs label set 'chgnet'" in text
    assert "replay store s/gone is not made" in text
    assert "both get the label 'student(train)'" in text


def test_inline_verbs_exist():
    """Inline ``kd-nnp VERB`` mentions (tables, prose) name verbs that exist."""
    from kd_nnp.cli import VERBS

    bad = []
    for doc in DOCS:
        for m in re.finditer(r"`kd-nnp ([a-z][\w-]*)", doc.read_text()):
            if m.group(1) not in VERBS:
                bad.append(f"{_doc_id(doc)}: kd-nnp {m.group(1)}")
    assert not bad, bad


def test_no_tracked_file_is_gitignored():
    """.gitignore patterns must not match tracked files (conf/, .ci/run, ...)."""
    r = subprocess.run(
        ["git", "ls-files", "-ci", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"not a git checkout: {r.stderr.strip()}")
    assert r.stdout.strip() == "", r.stdout


def test_imports_are_declared_dependencies():
    """Every third-party module kd_nnp imports belongs to a declared dependency."""
    import ast
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [*meta["dependencies"], *itertools.chain(*meta["optional-dependencies"].values())]
    norm = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in declared}
    # imported by pandas on kd_nnp's behalf (DataFrame.to_markdown)
    modules = {"tabulate": "kd_nnp/reports (DataFrame.to_markdown)"}
    for f in (REPO / "kd_nnp").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                modules.setdefault(n.split(".")[0], str(f.relative_to(REPO)))
    dists = packages_distributions()
    missing = []
    for mod, where in sorted(modules.items()):
        if mod in sys.stdlib_module_names or mod == "kd_nnp":
            continue
        names = {d.lower().replace("_", "-") for d in dists.get(mod, [mod])}
        if not names & norm:
            missing.append(f"{mod} ({where}; distributions {sorted(names)})")
    assert not missing, "imported but not declared in pyproject.toml: " + ", ".join(missing)
    for unused in ("psutil",):
        assert unused not in modules, f"{unused} is imported again by {modules[unused]}"
        assert unused not in norm, f"{unused} is declared but nothing imports it"


# ----------------------------------------------------------------------------- skip helpers
def test_teacher_and_shared_data_helpers_skip(monkeypatch):
    """Without the [teachers] extra or the shared data, marked tests skip (never error)."""
    import importlib.util

    import conftest

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "dftd3" else real(n, *a)
    )
    assert conftest.missing_teacher_modules("chgnet_d3", "dftd3") == ["dftd3"]
    with pytest.raises(pytest.skip.Exception, match="dftd3.*teachers"):
        conftest.skip_without_teacher("chgnet_d3")
    with pytest.raises(ValueError, match="unknown teacher"):
        conftest.requires_teacher("no_such_teacher")

    class Item:  # what pytest_runtest_setup reads of a test item
        def __init__(self, *marks):
            self.marks = marks

        def get_closest_marker(self, name):
            return next((m for m in self.marks if m.name == name), None)

        def iter_markers(self, name):
            return (m for m in self.marks if m.name == name)

    teacher = conftest.requires_teacher("chgnet_d3").mark
    with pytest.raises(pytest.skip.Exception):
        conftest.pytest_runtest_setup(Item(teacher))
    conftest.pytest_runtest_setup(Item(conftest.requires_teacher("chgnet").mark))  # no package
    monkeypatch.setattr("kd_nnp.utils.paths.shared_data_dir", lambda *a, **k: None)
    with pytest.raises(pytest.skip.Exception, match="shared data"):
        conftest.pytest_runtest_setup(Item(conftest.requires_shared_data.mark))


def test_teacher_packages_are_only_used_behind_the_skip_helper():
    """A test that imports a teacher package (or loads a packaged teacher) carries
    ``@pytest.mark.teacher(...)``/``requires_teacher`` or calls ``skip_without_teacher``;
    expected failures (inside ``pytest.raises``) are exempt."""
    import ast

    import conftest

    mod_to_teacher = {m: t for t, mods in conftest.TEACHER_MODULES.items() for m in mods}
    unguarded = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            guarded = any(
                "teacher" in ast.unparse(d) for d in fn.decorator_list
            ) or "skip_without_teacher(" in ast.unparse(fn)
            if guarded:
                continue
            in_raises = {
                id(n)
                for w in ast.walk(fn)
                if isinstance(w, ast.With) and "raises" in ast.unparse(w.items[0])
                for n in ast.walk(w)
            }
            for node in ast.walk(fn):
                if id(node) in in_raises:
                    continue
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    mods = [node.module.split(".")[0]]
                elif (
                    isinstance(node, ast.Call)
                    and ast.unparse(node.func).endswith("load_teacher")
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value in conftest.TEACHER_MODULES
                ):
                    mods = list(conftest.TEACHER_MODULES[node.args[0].value])
                hits = [m for m in mods if m in mod_to_teacher]
                if hits:
                    unguarded.append(f"{path.relative_to(REPO)}::{fn.name} ({', '.join(hits)})")
    assert not unguarded, unguarded


# ----------------------------------------------------------------------------- docs say what exists
def _arch_modules() -> set[str]:
    text = (REPO / "docs" / "architecture.md").read_text().split("## Modules", 1)[1]
    return {m for m in re.findall(r"^\| `([\w/]+\.py)` \|", text, re.M)}


def test_architecture_lists_every_module():
    listed = _arch_modules()
    actual = {
        str(p.relative_to(REPO / "kd_nnp"))
        for p in (REPO / "kd_nnp").rglob("*.py")
        if p.name != "__init__.py"
    }
    assert not actual - listed, f"not in docs/architecture.md: {sorted(actual - listed)}"
    assert not listed - actual, f"listed but missing: {sorted(listed - actual)}"


def test_docs_name_only_existing_code():
    """``kd_nnp/...`` and ``tests/...`` paths and ``kd_nnp.x.y`` names in README/docs exist."""
    import importlib
    import importlib.util

    bad = []
    for doc in DOCS:
        text = doc.read_text()
        for path in set(re.findall(r"(?<![\w./])(?:kd_nnp|tests)/[\w/]*\w(?:\.py)?", text)):
            if not (REPO / path).exists() and not (REPO / f"{path}.py").exists():
                bad.append(f"{_doc_id(doc)}: {path}")
        for name in set(re.findall(r"\bkd_nnp(?:\.\w+)+", text)):
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                try:
                    if importlib.util.find_spec(".".join(parts[:i])) is not None:
                        obj = importlib.import_module(".".join(parts[:i]))
                        break
                except ModuleNotFoundError:
                    continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                bad.append(f"{_doc_id(doc)}: {name}")
    assert not bad, bad


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_docs_tables_are_well_formed(doc):
    """Every row of a markdown table has as many unescaped ``|`` as its header (D11)."""
    lines = doc.read_text().splitlines()
    bad = []
    for i in range(1, len(lines)):
        if re.match(r"^\|[-:| ]+\|$", lines[i]) and lines[i - 1].startswith("|"):
            width = len(re.findall(r"(?<!\\)\|", lines[i - 1]))
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                if len(re.findall(r"(?<!\\)\|", lines[j])) != width:
                    bad.append(f"{_doc_id(doc)}:{j + 1}: {lines[j]}")
                j += 1
    assert not bad, "\n".join(bad)


def test_integration_tests_are_slow():
    """tests/integration/ holds the long end-to-end runs: `make test` leaves them out."""
    files = sorted((REPO / "tests" / "integration").glob("test_*.py"))
    assert files
    for f in files:
        assert re.search(r"^pytestmark = pytest\.mark\.slow$", f.read_text(), re.M), f.name
