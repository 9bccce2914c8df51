"""One source for every option: a config dataclass field carries its default and its help.

``option(default, help)`` declares a field; ``add_options(parser, Config)`` generates the
command-line options from the fields (``--batch-size`` from ``batch_size``, the type from the
annotation, the default shown from the field, never restated by hand); ``from_args(Config,
args)`` builds the config from the options the user typed. Parser defaults are ``None``: the
config owns its defaults, and a field whose default depends on something else (the
architecture, the dataset) says so through ``default_text``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Help = str | Callable[[], str]


def option(default: Any = dataclasses.MISSING, help: Help = "", *,
           default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
           default_text: Help | None = None, choices: Sequence[Any] | Callable[[], Sequence[Any]]
           | None = None, cli: bool = True, metavar: str | None = None,
           parse: Callable[[str], Any] | None = None, flag: str | None = None) -> Any:
    """A config field with its help. ``default_text`` replaces the shown default (e.g. "by
    architecture: ..."); ``choices`` may be a callable (a registry read when the parser is
    built); ``cli=False`` keeps the field off the command line; ``parse`` converts the
    command-line string when the annotation is not enough; ``flag`` replaces the option name
    derived from the field's (``--attack`` for ``attacks``)."""
    meta = {"help": help, "default_text": default_text, "choices": choices, "cli": cli,
            "metavar": metavar, "parse": parse, "flag": flag}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _text(h: Help | None) -> str:
    return h() if callable(h) else (h or "")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base(tp: Any) -> tuple[Any, bool]:
    """``int | None`` -> ``(int, True)``; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _tuple_parser(item: type) -> Callable[[str], tuple]:
    def parse(s: str) -> tuple:
        try:
            return tuple(item(t.strip()) for t in s.split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {item.__name__} values, received {s!r}") from None
    parse.__name__ = f"{item.__name__} list"
    return parse


def _dest(f: dataclasses.Field) -> str:
    """The argparse destination of a field: its name, or its own flag's (two configs of one
    command may share a field name, e.g. ``attacks``, under different flags)."""
    own = f.metadata.get("flag")
    return own.lstrip("-").replace("-", "_") if own else f.name


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with its ``DareError`` turned into argparse's one-line usage error."""
    from darekit.errors import DareError

    def convert(s: str) -> Any:
        try:
            return parse(s)
        except DareError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _shown(d: Any) -> str:
    if isinstance(d, bool):
        return "on" if d else "off"
    if isinstance(d, tuple):
        return ",".join(map(str, d)) if d else "none"
    if d is None:
        return "none"
    return f"{d:g}" if isinstance(d, float) else str(d)


def _default_shown(f: dataclasses.Field, architecture: str | None = None) -> str:
    text = f.metadata.get("default_text")
    if isinstance(text, _ByArchitecture):
        return text(None if f.default is dataclasses.MISSING else f.default, architecture)
    if text is not None:
        return _text(text)
    if f.default is dataclasses.MISSING:
        return ""
    return _shown(f.default)


def add_options(parser: argparse.ArgumentParser, cls: type, *, exclude: Sequence[str] = (),
                only: Sequence[str] | None = None, architecture: str | None = None,
                defaults: Mapping[str, Any] | None = None) -> list[str]:
    """Add one option per command-line field of the dataclass ``cls``; return their names.
    ``architecture``: show per-architecture defaults for that one only; ``defaults``: the
    values a command applies instead of the fields' (e.g. a recipe), shown as the defaults."""
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", False) or f.name in exclude or (only is not None
                                                              and f.name not in only):
            continue
        tp, _ = _base(hints[f.name])
        kw: dict[str, Any] = {"default": None, "dest": _dest(f)}
        help_text = _text(meta.get("help"))
        shown = _default_shown(f, architecture)
        if defaults and f.name in defaults:
            shown = _shown(defaults[f.name])
        kw["help"] = f"{help_text} (default: {shown})" if shown else help_text
        choices = meta.get("choices")
        if meta.get("parse") is not None:
            kw["type"] = _argparse_type(meta["parse"])
        elif tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple:
            kw["type"] = _tuple_parser(typing.get_args(tp)[0])
        elif tp in (int, float, str):
            kw["type"] = tp
        if choices is not None:
            kw["choices"] = list(choices() if callable(choices) else choices)
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        parser.add_argument(meta.get("flag") or flag(f.name), **kw)
        names.append(f.name)
    return names


class _ByArchitecture:
    """A ``default_text`` for a field whose default each architecture may set: "by
    architecture: vgg16 200, alexnet 100, ..." (the field's own default for the others)."""

    def __init__(self, name: str, attribute: str):
        self.name, self.attribute = name, attribute

    def __call__(self, fallback: Any = None, only: str | None = None) -> str:
        from darekit.models import ARCHITECTURES

        def shown(v: Any) -> str:
            if isinstance(v, tuple):
                return ",".join(map(str, v)) if v else "none"
            return f"{v:g}" if isinstance(v, float) else str(v)

        values = {}
        for arch in ARCHITECTURES.values():
            source = getattr(arch, self.attribute)
            v = source.get(self.name, fallback) if isinstance(source, Mapping) else source
            if v is not None and only in (None, arch.name):
                values[arch.name] = shown(v)
        if only is not None:
            return values.get(only, "none")
        return "by architecture: " + ", ".join(f"{k} {v}" for k, v in values.items())


def by_architecture(name: str, attribute: str = "train_defaults") -> _ByArchitecture:
    """``default_text`` of a field set per architecture: ``attribute`` is ``train_defaults``
    (a dict of field values) or an attribute of ``Architecture`` (e.g. ``dare_lr``)."""
    return _ByArchitecture(name, attribute)


def given(args: argparse.Namespace | Mapping[str, Any], cls: type) -> dict[str, Any]:
    """The options of ``cls`` that the user typed (not ``None``)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    out = {}
    for f in dataclasses.fields(cls):
        dest = _dest(f) if isinstance(args, argparse.Namespace) else f.name
        if values.get(dest) is not None:
            out[f.name] = values[dest]
    return out


def from_args(cls: type, args: argparse.Namespace | Mapping[str, Any], **fixed: Any) -> Any:
    """``cls(**typed options, **fixed)``: the config's own defaults for everything not typed."""
    return cls(**{**given(args, cls), **fixed})
