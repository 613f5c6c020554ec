"""``medfilip bench NAME``: speed targets live here, not in timed tests."""

from __future__ import annotations

import json
from typing import Callable


def _phantom(args) -> dict:
    from medfilip.data.phantom import benchmark

    return benchmark(n_images=args.n, image_size=args.size or 256)


def _pixels(args) -> dict:
    from medfilip.pixels import benchmark

    return benchmark(n_images=args.n, image_size=args.size or 224, workers=args.workers)


BENCHMARKS: dict[str, Callable] = {"phantom": _phantom, "pixels": _pixels}


def run(args) -> int:
    """Run one benchmark and print its figures as JSON."""
    result = BENCHMARKS[args.name](args)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("--n", type=int, default=300, help="number of items to time")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels")
    parser.add_argument("--workers", type=int, default=1)
