"""Combine what the GPU verdict's runs sent back into one report (mean ± std across seeds).

    python scripts/combine-verdict.py OUT1 OUT2 ... [--out docs/results/verdict]

Each input is a folder that ``scripts/gpu-verdict.sh`` wrote to (its ``$OUT``), a
``.tar.gz`` it wrote, or that archive's ``.partNN`` pieces. Writes ``report.md``,
``results.json``, ``results.csv`` and ``er.png`` (``darekit.verdict.combine``).
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # repo root: see README

from darekit.verdict import main as verdict_main  # noqa: E402


def main(argv=None) -> int:
    return verdict_main(["combine", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
