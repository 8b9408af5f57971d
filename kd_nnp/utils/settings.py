"""Settings defined once: a frozen dataclass per group, used whole everywhere.

A group of settings (relaxation, elastic, perturbation, ...) is a frozen dataclass whose
fields carry their help text in ``field(metadata={"help": ...})``. From that one definition:

- :func:`register_schema` registers it as a Hydra structured-config schema (so a YAML file of
  the group is type-checked and a misspelled key is an error);
- :func:`add_options` generates the argparse options (``--max-steps`` for ``max_steps``,
  ``--no-rmsd`` for a boolean that defaults to true) and :func:`from_args` reads them back;
- :func:`from_mapping` builds the dataclass from a dict or DictConfig, refusing unknown keys.

Nothing else spells the fields or their defaults again.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from kd_nnp.errors import SettingsError

T = TypeVar("T")


def _help(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", ""))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of an annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_seq(elem: Any) -> Any:
    def parse(text: str) -> tuple:
        return tuple(elem(x) for x in text.split(",") if x.strip())

    parse.__name__ = f"comma-separated {getattr(elem, '__name__', 'value')} list"
    return parse


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    exclude: tuple[str, ...] = (),
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Add one option per field of the dataclass ``cls`` (help from the field's metadata).

    Booleans that default to ``True`` become ``--no-NAME`` switches, those that default to
    ``False`` ``--NAME`` switches; tuples/lists take a comma-separated value. ``defaults``
    overrides a field's default for this parser only (e.g. a verb that uses 2 workers).
    """
    hints = _hints(cls)
    defaults = dict(defaults or {})
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        tp, optional = _base_type(hints[f.name])
        default = defaults.get(f.name, _default(f))
        # argparse %-formats help strings: a literal '%' (e.g. "CSD %") crashed --help
        text = _help(f).replace("%", "%%")
        if tp is bool:
            if default is True:
                parser.add_argument(
                    "--no-" + f.name.replace("_", "-"),
                    dest=f.name,
                    action="store_false",
                    help=f"{text} (on by default; this switch turns it off)",
                )
            else:
                parser.add_argument(
                    option_name(f.name), dest=f.name, action="store_true", help=text
                )
            parser.set_defaults(**{f.name: bool(default)})
            continue
        origin = typing.get_origin(tp)
        shown = str(default).replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "help": f"{text} (default: {shown})"}
        if origin in (tuple, list):
            elem = (typing.get_args(tp) or (str,))[0]
            kwargs["type"] = _parse_seq(elem if elem is not Ellipsis else str)
            kwargs["metavar"] = "A,B,..."
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        parser.add_argument(option_name(f.name), **kwargs)


def from_args(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    """The dataclass from parsed options (those :func:`add_options` made) plus ``extra``."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.init and hasattr(args, f.name)
    }
    values.update(extra)
    return from_mapping(cls, values, where="command line")


def _coerce(value: Any, tp: Any, where: str, name: str) -> Any:
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise SettingsError(f"{where}: {name} must not be null")
    origin = typing.get_origin(base)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        elem = (typing.get_args(base) or (str,))[0]
        elem = str if elem is Ellipsis else elem
        try:
            return tuple(elem(v) for v in value)
        except (TypeError, ValueError) as err:
            raise SettingsError(
                f"{where}: {name}={value!r} is not a list of {elem.__name__}"
            ) from err
    if base is bool:
        if isinstance(value, bool):
            return value
        raise SettingsError(f"{where}: {name}={value!r} must be true or false")
    if base in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return base(value)
            except (TypeError, ValueError) as err:
                raise SettingsError(f"{where}: {name}={value!r} is not a {base.__name__}") from err
        if base is int and isinstance(value, float) and not value.is_integer():
            raise SettingsError(f"{where}: {name}={value!r} is not an integer")
        return base(value)
    if base is str:
        return str(value)
    return value


def to_plain(values: Any) -> Any:
    """An OmegaConf container (from Hydra) as plain dicts/lists, resolved; anything else as is."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(values):
        return OmegaConf.to_container(values, resolve=True)
    return values


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, *, where: str = "settings") -> T:
    """Build ``cls`` from a mapping (dict or DictConfig); unknown keys are an error naming them."""
    values = to_plain(values) if values is not None else {}
    if dataclasses.is_dataclass(values):
        values = dataclasses.asdict(values)  # type: ignore[arg-type]
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SettingsError(
            f"{where}: unknown {cls.__name__} setting(s) {unknown}; known: {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], where, k) for k, v in values.items()}
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        check()
    return obj


def as_dict(obj: Any) -> dict[str, Any]:
    """Plain dict of a settings dataclass (tuples as lists, for JSON/YAML and hashing)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(obj).items()}


def register_schema(group: str | None, name: str, cls: type) -> None:
    """Register ``cls`` with Hydra's ConfigStore (``group/name``) as a structured schema.

    A YAML file of the group then starts with ``defaults: [NAME_schema, _self_]`` ... or is
    validated by :func:`from_mapping` at use. Registering twice is harmless.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group=group, name=name, node=cls)
