#!/usr/bin/env python3
"""Use vhdfs's block layer from Python, no mount needed: print an image's partition table and
the first bytes of each partition, plus how much of the disk is allocated.

    python examples/block_layer.py disk.vhd
"""

from __future__ import annotations

import sys

from vhdfs.block import Kind, open_image
from vhdfs.block.partitions import find_partitions  # pure parsing; needs no FUSE at run time


def main(path: str) -> int:
    with open_image(path) as img:                     # read-only; parents found and checked
        print(f"{img.path}: {img.format} {img.type}, {img.size} bytes, chain depth {len(img.chain)}")
        data = sum(e.length for e in img.extents() if e.kind == Kind.DATA)
        print(f"allocated: {data} bytes ({100 * data / max(img.size, 1):.1f} %)")
        for part in find_partitions(img):
            head = img.read(part.start, 16)
            print(f"partition {part.number}: offset {part.start}, {part.length} bytes, starts {head.hex(' ')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]) if len(sys.argv) == 2 else (print(__doc__), 2)[1])
