"""``medfilip bench NAME``: speed targets live here, not in timed tests."""

from __future__ import annotations

import argparse
import json
from typing import Callable


def _phantom(args) -> dict:
    from medfilip.data.phantom import benchmark

    return benchmark(n_images=args.n, image_size=args.size or 256)


def _pixels(args) -> dict:
    from medfilip.pixels import benchmark

    return benchmark(n_images=args.n, image_size=args.size or 224, workers=args.workers)


def _extract(args) -> dict:
    from medfilip.benchmarks.extract_throughput import benchmark, cached_rerun_benchmark

    if args.sizes:  # issue 9: peak RSS and reports/s at scale, one fresh process per size
        from medfilip.benchmarks.extract_throughput import scale_benchmark

        sizes = tuple(int(n) for n in args.sizes.split(","))
        concurrency = int(args.concurrency.split(",")[-1])
        return scale_benchmark(sizes, concurrency=concurrency, latency_s=args.latency, code_path=args.code_path)
    concurrencies = tuple(int(c) for c in args.concurrency.split(","))
    if args.provider == "llamacpp":  # issue 15: the local llama.cpp server on the packaged model
        from medfilip.benchmarks.extract_throughput import llamacpp_benchmark

        return llamacpp_benchmark(n_reports=args.n, concurrencies=concurrencies, max_tokens=args.max_tokens,
                                  old_engine_python=args.old_engine_python, gguf=args.gguf)
    result = benchmark(n_reports=args.n, latency_s=args.latency, concurrencies=concurrencies)
    result["cached_at_scale"] = cached_rerun_benchmark(n_reports=args.scale)
    return result


def _vocab(args) -> dict:
    import time

    from medfilip.vocab import load_vocabulary

    vocab = load_vocabulary()
    phrases = ["small effusion", "cardiomegaly", "blunting", "no acute cardiopulmonary process"]
    texts = [f"{phrases[i % len(phrases)]} {i}" for i in range(args.n)]
    start = time.perf_counter()
    found = sum(vocab.category_of(t) is not None for t in texts)
    seconds = time.perf_counter() - start
    return {"n_phrases": len(texts), "n_with_category": found, "seconds": round(seconds, 4),
            "phrases_per_s": round(len(texts) / seconds, 1) if seconds > 0 else None}


def _audit(args) -> dict:
    from medfilip.benchmarks.audit_memory import benchmark

    return benchmark(n_answers=args.n)


def _normalize(args) -> dict:
    from medfilip.benchmarks.findings import benchmark

    return benchmark(n_rows=args.n, explain=args.name == "explain")


def _embed(args) -> dict:
    from medfilip.embed import benchmark

    return benchmark(n_texts=args.n)


def _dvc_status(args) -> dict:
    from medfilip.benchmarks.dvc_status import benchmark

    return benchmark(n_files=args.n)


def _import(args) -> dict:
    from medfilip.benchmarks.import_rate import benchmark

    return benchmark(n_studies=args.n)


def _train(args) -> dict:
    from medfilip.config import load_params
    from medfilip.train_bench import bench_params, benchmark

    tp = bench_params(load_params(args.params).train, batch_size=args.batch, image_size=args.size,
                      image_encoder=args.image_encoder, compile=args.compile, workers=args.workers,
                      text_frozen=args.text_frozen, device=args.device)
    return benchmark(tp, steps=args.steps)


BENCHMARKS: dict[str, Callable] = {
    "phantom": _phantom, "pixels": _pixels, "extract": _extract, "embed": _embed, "train": _train,
    "vocab": _vocab, "audit": _audit, "dvc-status": _dvc_status, "import": _import,
    "normalize": _normalize, "explain": _normalize,  # finding rows/s (normalize; explain adds build_labels)
}


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
    parser.add_argument("--latency", type=float, default=0.05, help="extract: stand-in latency per call (s)")
    parser.add_argument("--concurrency", default="1,8,64", help="extract: llm.max_concurrency values")
    parser.add_argument("--scale", type=int, default=100_000, help="extract: reports in the cached re-run")
    parser.add_argument("--provider", default="standin", choices=("standin", "llamacpp"),
                        help="extract: a stand-in with --latency, or the local llama.cpp server on the "
                             "packaged SmolLM2 (e.g. --provider llamacpp --n 16 --concurrency 1,4,8)")
    parser.add_argument("--gguf", default=None,
                        help="extract --provider llamacpp: a GGUF to serve instead of the packaged SmolLM2")
    parser.add_argument("--max-tokens", type=int, default=1024,
                        help="extract --provider llamacpp: llm.max_tokens (1024, the params default)")
    parser.add_argument("--old-engine-python", default=None,
                        help="extract --provider llamacpp: a Python with llama-cpp-python[server], to time "
                             "the engine before issue 15 on the same reports")
    parser.add_argument("--sizes", default=None,
                        help="extract: e.g. 10000,200000 -- peak RSS and reports/s of uncached runs at these sizes "
                             "(at the last --concurrency value)")
    parser.add_argument("--code-path", default=None,
                        help="extract --sizes: run the stage from this checkout (before/after comparisons)")
    parser.add_argument("--params", default="params.yaml", help="train: the train section to start from")
    parser.add_argument("--batch", type=int, default=None, help="train: batch size (default: train.batch_size)")
    parser.add_argument("--steps", type=int, default=20, help="train: timed steps per measurement")
    parser.add_argument("--image-encoder", default=None, help="train: e.g. resnet50")
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--text-frozen", action=argparse.BooleanOptionalAction, default=None)
