"""``train/import_history.py``: options generated from ``ImportConfig``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from darekit.cli import START_OVER, Parser, parse_args, run


def import_parser(prog: str) -> Parser:
    """The parser of ``train/import_history.py``; defaults and help live on ``ImportConfig``
    (``--model``, ``--history`` and ``--dataset`` are required)."""
    from darekit.config import add_options, flag
    from darekit.importer import ImportConfig

    p = Parser(prog=prog, description="Import a Keras classifier trained elsewhere and its "
               "per-epoch checkpoints (keras.callbacks.ModelCheckpoint) as a run directory that "
               "every later stage (dare/nnslicer.py, dare/get_ats.py, dare/dare.py, adv/..., "
               "dare/test.py) works on. The model must take float32 pixels in [0, 1] (NHWC) "
               "and output logits (a softmax output is stripped).")
    fields = {f.name: f for f in dataclasses.fields(ImportConfig)}
    for name in ImportConfig.REQUIRED:
        meta = fields[name].metadata
        choices = meta.get("choices")
        p.add_argument(flag(name), dest=name, required=True, help=meta["help"],
                       metavar=meta.get("metavar"),
                       choices=list(choices()) if callable(choices) else choices)
    add_options(p, ImportConfig, exclude=ImportConfig.REQUIRED)
    return p


def import_main(argv: Sequence[str] | None, *, prog: str) -> int:
    """Entry point body of ``train/import_history.py``."""
    args = parse_args(lambda: import_parser(prog), argv, prog)

    def body() -> None:
        from darekit.config import from_args
        from darekit.importer import ImportConfig, import_history

        r = import_history(from_args(ImportConfig, args))
        print(f"run directory: {r.path}")
        print(f"next: python dare/nnslicer.py --run-dir {r.path}")

    return run(body, START_OVER)
