"""Object-store requests per layout, counted on a local S3 server, priced per 10M thumbnails.

    python -m jobs.benchmark_requests [--images N] [--per-shard N] [--delay-ms MS]
                                      [--against REV] [--json PATH]

Needs the test extras (moto's server). See pipeline/restore/request_benchmark.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.restore.request_benchmark import measure, render


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark_requests",
                                description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100, help="the smaller run's thumbnails "
                   "(the larger has 4x)")
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--delay-ms", type=float, default=50.0,
                   help="also time runs with this delay added to every request (0: not)")
    p.add_argument("--against", metavar="REV",
                   help="with the delay, also the files layout as git revision REV has it")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = measure(args.images, args.per_shard, args.delay_ms, args.against)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
