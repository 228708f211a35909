"""Average several checkpoints of one network into one (a model soup).

    python -m jobs.average_checkpoints --out soup.pt stage4/best.pt stage4/last.pt cpu5/last.pt
"""

from __future__ import annotations

import argparse
import sys

from pipeline.training.average import average_into


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.average_checkpoints",
                                description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="paths or URIs of the members")
    p.add_argument("--out", required=True, help="where to write the average (path or URI)")
    args = p.parse_args(argv)
    print(f"wrote the mean of {average_into(args.checkpoints, args.out)} checkpoints to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
