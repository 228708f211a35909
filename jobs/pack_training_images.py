"""Copy training images as lossless WebP, small enough to travel to a lent GPU machine.

    python -m jobs.pack_training_images PHOTOS/ .gpu/train
"""

from __future__ import annotations

import argparse
import sys

from pipeline.training.pack_images import pack_folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.pack_training_images",
                                description=__doc__.splitlines()[0])
    p.add_argument("src", help="folder of PNG training images")
    p.add_argument("dst", help="folder for the WebP copies (names and folders kept)")
    args = p.parse_args(argv)
    images, total = pack_folder(args.src, args.dst)
    print(f"{images} images, {total / 1e6:.1f} MB in {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
