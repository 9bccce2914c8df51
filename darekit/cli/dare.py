"""Entry points of ``dare/``: nnslicer.py, get_ats.py, dare.py, dare-s.py and dare-sl.py.

Options are generated from ``SliceConfig``, ``MineConfig`` and ``DareConfig`` (their fields
own the defaults and the help) and validated before the run is opened or any model loaded.
Without ``--run-dir`` every script works on the most recently trained run.
"""

from __future__ import annotations

from collections.abc import Sequence

from darekit.cli import START_OVER, Parser, parse_args, resolve_run, run, run_dir_option


# --------------------------------------------------------------------------- nnslicer.py
def nnslicer_parser(prog: str = "dare/nnslicer.py") -> Parser:
    from darekit.config import add_options
    from darekit.slicing import SliceConfig

    p = Parser(prog=prog, description="Stage 1: NNSlicer contribution analysis; per class and "
               "sliced layer, the smallest set of neurons (channels) covering --per of the "
               "aggregated |contribution|. Writes <run-dir>/slice/.")
    run_dir_option(p)
    add_options(p, SliceConfig)
    return p


def nnslicer_main(argv: Sequence[str] | None, prog: str = "dare/nnslicer.py") -> int:
    args = parse_args(lambda: nnslicer_parser(prog), argv, prog)

    def body() -> None:
        from darekit import layout
        from darekit.config import from_args
        from darekit.slicing import SliceConfig, run_slicing

        cfg = from_args(SliceConfig, args)
        r = resolve_run(args.run_dir)
        result = run_slicing(r, cfg)
        for name, m in result.masks().items():
            print(f"{name}: slice sizes per class {m.sum(1).tolist()} of {m.shape[1]}")
        print(f"{result.images.sum()} images in {result.seconds:.1f}s "
              f"({result.images_per_second:.1f} images/s); summary "
              f"{r.file(layout.SLICE_SUMMARY)}")

    return run(body, START_OVER)


# --------------------------------------------------------------------------- get_ats.py
def get_ats_parser(prog: str = "dare/get_ats.py") -> Parser:
    from darekit.config import add_options
    from darekit.mining import MineConfig

    p = Parser(prog=prog, description="Stage 2: traverse the training history over "
               "x_validation, ddmin each failure-inducing perturbation to a 1-minimal patch "
               "set, and collect regression data (activation traces). Writes <run-dir>/ats/.")
    run_dir_option(p)
    add_options(p, MineConfig)
    return p


def get_ats_main(argv: Sequence[str] | None, prog: str = "dare/get_ats.py") -> int:
    args = parse_args(lambda: get_ats_parser(prog), argv, prog)

    def body() -> None:
        import json

        from darekit import layout
        from darekit.config import from_args
        from darekit.mining import MineConfig, run_mining

        cfg = from_args(MineConfig, args)
        r = resolve_run(args.run_dir)
        result = run_mining(r, cfg)
        s = result.stats
        print(json.dumps({k: s[k] for k in ("inputs", "failures", "failure_rate", "collected",
                                             "model_queries_per_input")}))
        print(f"|S*| {s['s_star_size']}; statistics {r.file(layout.MINED_STATS)}")

    return run(body, START_OVER)


# --------------------------------------------------------------------------- dare*.py
def dare_parser(variant: str, prog: str) -> Parser:
    """The parser of ``dare/dare.py``, ``dare/dare-s.py`` and ``dare/dare-sl.py``."""
    from darekit.config import add_options
    from darekit.dare import VARIANTS, DareConfig

    p = Parser(prog=prog, description=f"Stage 3 ({variant}): {VARIANTS[variant].summary}. "
               f"Saves <run-dir>/models/{variant}.weights.h5 (and .keras) and logs to "
               "<run-dir>/dare/. Stages 1 and 2 run first, with their defaults, when the run "
               "has no slice or mined data yet.")
    run_dir_option(p)
    add_options(p, DareConfig)
    return p


def dare_main(argv: Sequence[str] | None, variant: str, prog: str) -> int:
    """Entry point of ``dare/dare.py``, ``dare/dare-s.py`` and ``dare/dare-sl.py``."""
    args = parse_args(lambda: dare_parser(variant, prog), argv, prog)

    def body() -> None:
        from darekit import layout
        from darekit.config import from_args
        from darekit.dare import VARIANTS, DareConfig, run_dare
        from darekit.errors import DareError
        from darekit.mining import MineConfig, run_mining
        from darekit.slicing import SliceConfig, run_slicing

        cfg = from_args(DareConfig, args, variant=variant)
        r = resolve_run(args.run_dir)
        # The artifact's users run nnslicer.py and get_ats.py first; as typed after a training
        # run alone, dare.py runs what is missing with those scripts' defaults, and says so.
        if VARIANTS[variant].use_slice and not r.file(layout.MASKS).is_file():
            print(f"{r.path} has no slice yet: running Stage 1 (dare/nnslicer.py) first")
            run_slicing(r, SliceConfig())
        if not r.file(layout.MINED).is_file():
            print(f"{r.path} has no mined data yet: running Stage 2 (dare/get_ats.py) first")
            run_mining(r, MineConfig())
        res = run_dare(r, cfg)
        if res.status == "diverged":
            raise DareError(f"{variant} diverged at lr {res.summary['lr']:g} (the weights "
                            f"became NaN/inf; log {res.summary['log']}); nothing was saved. "
                            "Try a smaller --lr.")
        if res.status == "no-op":  # a run that is not a result must not exit 0
            raise DareError(f"{variant} at lr {res.summary['lr']:g}: {res.summary['why']}; "
                            "this run is not a result and nothing was saved")

    return run(body, START_OVER)
