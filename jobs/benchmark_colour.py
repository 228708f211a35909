"""Restore a wide-gamut photograph in its own encoding or converted to sRGB: CIELAB error of each.

    python -m jobs.benchmark_colour PHOTO [PHOTO ...]

Each PHOTO's numbers are read as Adobe RGB (1998) (a saturated, wide-gamut photo); see
pipeline/restore/colour_benchmark.py for what is compared. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.restore.colour_benchmark import measure, render


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark_colour",
                                description=__doc__.splitlines()[0])
    p.add_argument("photos", type=Path, nargs="+")
    args = p.parse_args(argv)
    print(render([measure(photo) for photo in args.photos]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
