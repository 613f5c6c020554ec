"""The server process behind ``llm.provider: llamacpp``: llama.cpp's own C++ server via xllamacpp.

:class:`medfilip.extract.server.LlamaCppServer` runs ``python -m medfilip.extract.llamacpp_serve``
as a child process, so that an interrupted or killed stage can always take the server down with
its process group (an in-process server would share the stage's fate only as long as the stage
is alive to stop it). The child starts xllamacpp's in-process server (continuous batching over
``--n-parallel`` slots, an OpenAI-compatible endpoint), prints one line once it listens, and
stops it on SIGTERM or SIGINT.

Every slot gets ``--n-ctx`` tokens of context: llama.cpp splits its context between the slots,
so the server is given ``n_ctx * n_parallel``.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading

READY_LINE = "medfilip: llama.cpp server listening on http://127.0.0.1:{port}"
PORT_TAKEN_LINE = "medfilip: address already in use: 127.0.0.1:{port}"
EXIT_PORT_TAKEN = 98  # EADDRINUSE
EXIT_NOT_STARTED = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m medfilip.extract.llamacpp_serve")
    parser.add_argument("--model", required=True, help="the GGUF file")
    parser.add_argument("--alias", required=True, help="the model name clients send and /v1/models lists")
    parser.add_argument("--port", type=int, required=True, help="the loopback port to listen on")
    parser.add_argument("--n-ctx", type=int, required=True, help="context tokens per slot")
    parser.add_argument("--n-parallel", type=int, required=True, help="slots served at once")
    parser.add_argument("--n-threads", type=int, required=True)
    parser.add_argument("--n-gpu-layers", type=int, required=True)
    return parser.parse_args(argv)


def server_params(args: argparse.Namespace):
    """xllamacpp's ``CommonParams`` for one GGUF on 127.0.0.1 (never another interface)."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.n_parallel = args.n_parallel
    params.n_ctx = args.n_ctx * args.n_parallel
    params.cont_batching = True
    params.cpuparams.n_threads = args.n_threads
    params.cpuparams_batch.n_threads = args.n_threads
    params.n_gpu_layers = args.n_gpu_layers
    params.ui = False  # the web UI: an endpoint the stage never uses
    return params


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    import xllamacpp

    try:
        server = xllamacpp.Server(server_params(args))
    except RuntimeError as exc:
        # llama.cpp binds before it loads the model and reports both failures the same way.
        if not port_is_free(args.port):
            print(PORT_TAKEN_LINE.format(port=args.port), flush=True)
            return EXIT_PORT_TAKEN
        print(f"medfilip: llama.cpp could not serve {args.model} (Failed to load model?): {exc}", flush=True)
        return EXIT_NOT_STARTED
    print(READY_LINE.format(port=args.port), flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        del server  # joins llama.cpp's loop and frees the model
    return 0


if __name__ == "__main__":
    sys.exit(main())
