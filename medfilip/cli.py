"""The ``medfilip`` command: params check, benchmarks (and, as stages land, audit and scoring)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from medfilip import ablation, bench, predict
from medfilip.config import ConfigError, load_params
from medfilip.errors import UserError, debug_enabled, is_for_people, message


def _params(args) -> int:
    params = load_params(args.file)
    print(json.dumps(dataclasses.asdict(params), indent=2))
    return 0


def _audit(args) -> int:
    from medfilip import audit

    queries = audit.saved_queries(Path(args.queries))
    if args.list or not (args.sql or args.query):
        print("saved queries (medfilip audit --query NAME):")
        for name, (description, _) in queries.items():
            print(f"  {name:24s} {description}")
        views = audit.available_views(load_params(args.params))
        print("views:", ", ".join(views) or "(none yet: run `dvc repro`)")
        return 0
    if args.query:
        if args.query not in queries:
            raise audit.AuditError(f"no saved query '{args.query}' in {args.queries} (try --list)")
        sql = queries[args.query][1]
    else:
        sql = args.sql
    with audit.session(load_params(args.params), sql=sql) as (con, _):
        columns, rows = audit.run_query(con, sql)
    sys.stdout.write(audit.format_rows(columns, rows, args.format, None if args.limit <= 0 else args.limit))
    return 0


def _score(args) -> int:
    import dataclasses

    from medfilip.benchmarks.quality import score_datasets
    from medfilip.reporting import write_json

    params = load_params(args.params)
    overrides = {k: v for k, v in (("provider", args.provider), ("model", args.model),
                                   ("base_url", args.base_url)) if v is not None}
    llm = dataclasses.replace(params.llm, **overrides)
    if not (args.openi or args.phantom):
        raise UserError("nothing to score: pass --openi and/or --phantom DIR")
    results = score_datasets(llm, params.extract, args.openi, args.phantom, baseline=not args.no_baseline)
    print(json.dumps(results, indent=2))
    if args.out:
        write_json(Path(args.out), results)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfilip", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of expected errors too (or set MEDFILIP_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="validate params.yaml and print the typed values")
    p.add_argument("--file", default="params.yaml")
    p.set_defaults(func=_params)

    a = sub.add_parser("audit", help="read-only SQL over the pipeline's Parquet files and the LLM cache")
    a.add_argument("sql", nargs="?", help="one SELECT statement over the views (see --list)")
    a.add_argument("--query", "-q", help="run a saved query from data/audit/NAME.sql")
    a.add_argument("--list", action="store_true", help="list saved queries and available views")
    a.add_argument("--format", choices=("table", "csv", "json"), default="table")
    a.add_argument("--limit", type=int, default=50, help="rows shown as a table (0: all)")
    a.add_argument("--params", default="params.yaml")
    a.add_argument("--queries", default="data/audit")
    a.set_defaults(func=_audit)

    q = sub.add_parser("score", help="score any extractor against ground truth (phantom, Open-i MeSH); "
                                     "the configured one: dvc repro score")
    q.add_argument("--openi", action="store_true", help="the 3,955 Open-i reports (torchxrayvision's archive)")
    q.add_argument("--phantom", metavar="DIR", help="a phantom dataset folder, e.g. data/raw/phantom")
    q.add_argument("--provider", choices=("rules", "openai", "llamacpp"), help="override llm.provider")
    q.add_argument("--model", help="override llm.model")
    q.add_argument("--base-url", help="override llm.base_url")
    q.add_argument("--no-baseline", action="store_true", help="skip the keyword baseline")
    q.add_argument("--out", help="also write the JSON here (the configured llm's report is `dvc repro score`'s "
                                 "reports/quality.json)")
    q.add_argument("--params", default="params.yaml")
    q.set_defaults(func=_score)

    b = sub.add_parser("bench", help="run a speed benchmark and print its figures")
    bench.add_arguments(b)
    b.set_defaults(func=bench.run)

    z = sub.add_parser("predict", help="zero-shot class scores of images with a trained model")
    predict.add_arguments(z)
    z.set_defaults(func=predict.run)

    ab = sub.add_parser("ablation", help="queue the paper's ablation rows as DVC experiments, or tabulate them")
    ablation.add_arguments(ab)
    ab.set_defaults(func=ablation.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        # Expected failures (medfilip.errors.UserError: a params key, an API key, an image, a
        # server) end in their sentence; bugs, and everything under --debug, keep the traceback.
        if args.debug or debug_enabled() or not is_for_people(exc):
            raise
        prefix = "params error: " if isinstance(exc, ConfigError) else ""
        print(f"medfilip {args.command}: {prefix}{message(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
