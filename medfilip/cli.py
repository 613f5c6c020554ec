"""The ``medfilip`` command: params check, benchmarks (and, as stages land, audit and scoring)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from medfilip import bench
from medfilip.config import ConfigError, load_params


def _params(args) -> int:
    params = load_params(args.file)
    print(json.dumps(dataclasses.asdict(params), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfilip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="validate params.yaml and print the typed values")
    p.add_argument("--file", default="params.yaml")
    p.set_defaults(func=_params)

    b = sub.add_parser("bench", help="run a speed benchmark and print its figures")
    bench.add_arguments(b)
    b.set_defaults(func=bench.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"medfilip: params error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
