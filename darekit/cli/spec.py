"""Stored descriptions of every script's parser, so that ``--help`` and a bad option answer
before any backend is imported.

The real parsers are generated from config dataclasses that live in modules importing Keras
(and so TensorFlow or JAX: 4-5 s). ``darekit/cli/parsers.json`` holds each parser's options
(flags, types, choices, help) together with a hash of darekit's source. When the hash matches
the installed source, ``parse_args`` checks the command line against the stored description
first; otherwise (the source changed since the file was written) it goes to the real parser,
slower but as correct, and writes the new descriptions to the user's cache directory
(``cache_dir()``) for the next start. Regenerate the packaged file before a release::

    python -m darekit.cli.spec          # rewrites darekit/cli/parsers.json

``test/test_cli.py`` fails while its options differ from the parsers'.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from darekit import cli

PACKAGE = Path(__file__).resolve().parents[1]
STORE = Path(__file__).with_name("parsers.json")


def source_hash() -> str:
    """SHA-256 over darekit's Python source (paths and contents), this file's store excluded."""
    h = hashlib.sha256()
    for f in sorted(PACKAGE.rglob("*.py")):
        h.update(f.relative_to(PACKAGE).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------- the scripts
def builders() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    """Every entry point's parser builder, by its ``prog`` (the script's path)."""
    from darekit.cli import adv, dare, evaluate, importer, reproduce, train

    return {
        "train/train.py": lambda: train.train_parser("train/train.py"),
        "train/alexnet.py": lambda: train.train_parser("train/alexnet.py", "alexnet"),
        "train/import_history.py": lambda: importer.import_parser("train/import_history.py"),
        "adv/generate_adv.py": lambda: adv.generate_parser("adv/generate_adv.py"),
        "adv/fintune_adv.py": lambda: adv.finetune_parser("adv/fintune_adv.py"),
        "adv/adv_training.py": lambda: adv.adv_training_parser("adv/adv_training.py"),
        "dare/nnslicer.py": lambda: dare.nnslicer_parser("dare/nnslicer.py"),
        "dare/get_ats.py": lambda: dare.get_ats_parser("dare/get_ats.py"),
        "dare/dare.py": lambda: dare.dare_parser("dare", "dare/dare.py"),
        "dare/dare-s.py": lambda: dare.dare_parser("dare-s", "dare/dare-s.py"),
        "dare/dare-sl.py": lambda: dare.dare_parser("dare-sl", "dare/dare-sl.py"),
        "dare/test.py": evaluate.parser,
        "reproduce.py": reproduce.parser,
    }


# ---------------------------------------------------------------------------- describing
_ACTIONS = {
    argparse._StoreAction: "store", argparse._StoreTrueAction: "store_true",
    argparse._StoreFalseAction: "store_false", argparse._StoreConstAction: "store_const",
    argparse._AppendAction: "append", argparse._CountAction: "count",
    argparse.BooleanOptionalAction: "boolean",
}
_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int, "float": float, "str": str, "positive_int": cli.positive_int,
    "int_list": cli.int_list,
}


def _plain(v: Any) -> Any:
    """``v`` if it survives JSON unchanged in kind (numbers, strings, lists of them), else
    None (the stored parser only checks; the real one converts)."""
    if isinstance(v, bool | int | float | str) or v is None:
        return v
    if isinstance(v, list | tuple) and all(isinstance(x, bool | int | float | str) for x in v):
        return list(v)
    return None


def _type_name(t: Any) -> str | None:
    if t is None:
        return None
    name = getattr(t, "__name__", "")
    return name if name in _TYPES or name in ("int list", "float list", "str list") else None


def describe(p: argparse.ArgumentParser) -> dict[str, Any]:
    """A JSON description of ``p`` from which ``parser`` rebuilds an equivalent checker."""
    group_of = {id(a): k for k, g in enumerate(p._action_groups) for a in g._group_actions}
    actions = []
    for a in p._actions:  # in the order they were added: the usage line's order
        if isinstance(a, argparse._HelpAction):
            continue
        kind = _ACTIONS.get(type(a))
        if kind is None:
            raise TypeError(f"{p.prog}: cannot describe {type(a).__name__} of "
                            f"{a.option_strings or a.dest}")
        tname = _type_name(a.type)
        choices = _plain(list(a.choices)) if a.choices is not None else None
        if a.type is not None and tname is None:
            choices = None  # converted values: only the real parser can compare them
        actions.append({
            "flags": [s for s in a.option_strings
                      if not (kind == "boolean" and s.startswith("--no-"))],
            "group": group_of[id(a)], "dest": a.dest, "kind": kind, "type": tname,
            "choices": choices, "nargs": _plain(a.nargs), "const": _plain(a.const),
            "required": a.required, "help": a.help, "metavar": _plain(a.metavar),
            "default": _plain(a.default)})
    return {"prog": p.prog, "description": p.description, "epilog": p.epilog,
            "formatter": p.formatter_class.__name__, "actions": actions,
            "groups": [{"title": g.title, "description": g.description}
                       for g in p._action_groups]}


def parser(d: dict[str, Any]) -> argparse.ArgumentParser:
    """A parser rebuilt from ``describe``'s output: same options, same help; values that need
    darekit's converters are accepted as text (the real parser checks them next)."""
    from darekit.config import _tuple_parser

    p = cli.Parser(prog=d["prog"], description=d["description"], epilog=d["epilog"],
                   formatter_class=getattr(argparse, d["formatter"]))
    targets: list[Any] = [p, p]  # argparse's own two groups: positional and optional
    for g in d["groups"][2:]:
        targets.append(p.add_argument_group(g["title"], g["description"]))
    for a in d["actions"]:
        target = targets[a["group"]]
        kw: dict[str, Any] = {"dest": a["dest"], "default": a["default"],
                              "required": a["required"]} if a["flags"] else {}
        kind = a["kind"]
        if kind == "boolean":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind in ("store", "append"):
            kw["action"] = kind
            if a["nargs"] is not None:
                kw["nargs"] = a["nargs"]
            t = a["type"]
            if t in _TYPES:
                kw["type"] = _TYPES[t]
            elif t is not None:
                kw["type"] = _tuple_parser({"int": int, "float": float,
                                            "str": str}[t.split()[0]])
            if a["choices"] is not None:
                kw["choices"] = a["choices"]
            if a["metavar"] is not None:
                kw["metavar"] = (tuple(a["metavar"]) if isinstance(a["metavar"], list)
                                 else a["metavar"])
        else:
            kw["action"] = kind
            if kind == "store_const":
                kw["const"] = a["const"]
        if a["flags"]:
            action = target.add_argument(*a["flags"], **kw)
        else:  # a positional argument
            action = target.add_argument(a["dest"], **kw)
        action.help = a["help"]  # as stored (BooleanOptionalAction would add to it)
    return p


# ---------------------------------------------------------------------------- the store
def cache_dir() -> Path:
    """Where descriptions of a changed source are kept: ``$DAREKIT_CACHE``, else
    ``$XDG_CACHE_HOME/darekit``, else ``~/.cache/darekit``."""
    if os.environ.get("DAREKIT_CACHE"):
        return Path(os.environ["DAREKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "darekit"


def _cache_file(source: str) -> Path:
    return cache_dir() / f"parsers-{source[:16]}.json"


@functools.lru_cache(maxsize=1)
def _stored() -> dict[str, Any] | None:
    source = source_hash()
    for path in (STORE, _cache_file(source)):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("source") == source:
            return data
    return None


def load(prog: str) -> dict[str, Any] | None:
    """The stored description of ``prog``'s parser, or None when there is none for the
    current source (``parsers.json`` or, after a change, the user's cache)."""
    data = _stored()
    return None if data is None else data["parsers"].get(prog)


def generate() -> dict[str, Any]:
    """Every entry point's description (imports the backend: the real parsers need it)."""
    out = {}
    for prog, build in builders().items():
        p = build()
        cli.add_backend_option(p)
        out[prog] = describe(p)
    return {"source": source_hash(), "parsers": out}


def write(path: Path = STORE) -> Path:
    """Write the current parsers' descriptions to ``path`` (default: ``parsers.json``)."""
    from darekit import io

    io.write_text(path, json.dumps(generate(), indent=1, sort_keys=True) + "\n")
    _stored.cache_clear()
    return path


def remember() -> None:
    """After a start without a current description (the source changed): write one to the
    user's cache, so that the next ``--help`` or bad option answers fast again. Best effort:
    a failure here (an unwritable cache, a module being edited) only costs speed."""
    if _stored() is not None:
        return
    try:
        target = _cache_file(source_hash())
        write(target)
        for old in target.parent.glob("parsers-*.json"):
            if old != target:
                old.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - see the docstring
        pass


if __name__ == "__main__":
    print(f"wrote {write()}")
