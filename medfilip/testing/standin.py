"""A real OpenAI-compatible HTTP server on loopback, for tests and benchmarks.

It speaks enough of the chat-completions API for the ``openai`` client (keep-alive
HTTP/1.1, proper ``chat.completion`` bodies, OpenAI-style error bodies) and can be told
to misbehave: a FIFO of faults is consumed one per completion request before it
answers normally, so every retry path of the extractor runs against real sockets.

Faults: ``"429"`` (``Retry-After: 0.05``), ``"429:<s>"`` (``Retry-After: <s>``),
``"429ms:<ms>"`` (``retry-after-ms``), any other status code (``"500"``, ``"503"``,
``"400"``, ``"401"`` — the 401 echoes the bearer token, as a careless proxy would),
``"timeout:<s>"`` (sleep, then answer), ``"malformed"`` (content that is not JSON),
``"truncated"`` (half the answer, ``finish_reason: length``), ``"badschema"`` (JSON of
the wrong shape), ``"badbody"`` (HTTP 200 whose JSON body is cut short),
``"disconnect"`` (close the socket without answering).
"""

from __future__ import annotations

import collections
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY_BYTES = 4 * 1024 * 1024
_REPORT_FENCE = re.compile(r"^\s*<report>\s*\n?(.*?)\n?\s*</report>\s*$", re.DOTALL)
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
    404: "not_found_error", 422: "invalid_request_error", 429: "rate_limit_error",
}


def report_text(messages: list[dict[str, Any]]) -> str:
    """The report of a chat request: the last user message with its ``<report>`` fence removed."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content") or ""
            if isinstance(content, list):  # content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            match = _REPORT_FENCE.match(content)
            return match.group(1).strip() if match else content.strip()
    return ""


def _count_words(text: str) -> int:
    return len(text.split())


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a sleeping "timeout" handler never blocks shutdown
    request_queue_size = 256  # the default listen backlog (5) resets bursts of concurrent clients
    standin: "StandinServer"

    # Every accepted connection is counted open from its accept until its thread is done, so
    # StandinServer.wait_idle can tell when nothing a client sent is still being handled.
    def process_request(self, request, client_address) -> None:
        self.standin._begin_request()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.standin._end_request()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.standin._end_request()


class StandinServer:
    """Context manager: serves ``/v1/chat/completions`` and ``/v1/models`` on 127.0.0.1:<free port>."""

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        answer: Callable[[str], dict] | None = None,
        faults: list[str] | None = None,
        reject_json_schema: bool = False,
        reject_status: int = 400,
        model: str = "standin",
        max_recorded: int = 10_000,
    ):
        """``reject_status`` is the status of a json_schema refusal (llama.cpp's server uses 500);
        only the last ``max_recorded`` requests are kept in :attr:`requests`."""
        self.latency_s = latency_s
        self.answer = answer or (lambda report: {"findings": []})
        self.reject_json_schema = reject_json_schema
        self.reject_status = reject_status
        self.model = model
        for fault in faults or []:
            _parse_fault(fault)  # a typo in a test fails here, not as a puzzling answer
        self._faults: collections.deque[str] = collections.deque(faults or [])
        self._requests: collections.deque[dict] = collections.deque(maxlen=max_recorded)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._n_completions = 0
        self._in_flight = 0
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> StandinServer:
        """Bind a free loopback port and serve from a daemon thread."""
        handler = type("StandinHandler", (_Handler,), {"standin": self})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._httpd.standin = self
        port = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"standin:{port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> StandinServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- state

    @property
    def requests(self) -> list[dict]:
        """What the server received: ``{"method", "path", "headers", "body", "t"}`` per request."""
        with self._lock:
            return list(self._requests)

    @property
    def n_completions(self) -> int:
        """Completion requests answered with a normal body (a timeout fault's late answer counts)."""
        with self._lock:
            return self._n_completions

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no connection is open (every request received on one is answered or failed,
        and its client has gone), so counts read after it are final; False after ``timeout`` (a hang)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def _begin_request(self) -> None:
        with self._lock:
            self._in_flight += 1

    def _end_request(self) -> None:
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()

    def add_faults(self, *faults: str) -> None:
        """Queue more faults behind those not yet consumed."""
        for fault in faults:
            _parse_fault(fault)
        with self._lock:
            self._faults.extend(faults)

    def _record(self, entry: dict) -> None:
        with self._lock:
            self._requests.append(entry)

    def _next_fault(self) -> str | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _count_completion(self) -> None:
        with self._lock:
            self._n_completions += 1


def _parse_fault(fault: str) -> tuple[str, float | None]:
    kind, _, arg = fault.partition(":")
    if kind in ("malformed", "truncated", "badschema", "badbody", "disconnect") and not arg:
        return kind, None
    if kind in ("timeout", "429", "429ms") or (kind.isdigit() and len(kind) == 3):
        try:
            value = float(arg) if arg else None
        except ValueError:
            value = None
        if kind == "timeout" and value is None:
            raise ValueError(f"fault {fault!r}: write timeout:<seconds>")
        if not arg or value is not None:
            return kind, value
    raise ValueError(
        f"unknown stand-in fault {fault!r}: use 429[:s], 429ms:<ms>, <status>, timeout:<s>, "
        "malformed, truncated, badschema, badbody or disconnect"
    )


class _Handler(BaseHTTPRequestHandler):
    standin: StandinServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
    timeout = 30  # an idle keep-alive connection frees its thread after this
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server_version = "medfilip-standin/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: tests read self.standin.requests instead

    # ----------------------------------------------------------------- routing

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._record(None)
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send_json(200, {
                "object": "list",
                "data": [{"id": self.standin.model, "object": "model", "created": 0, "owned_by": "medfilip"}],
            })
        else:
            self._send_error(404, f"no route GET {self.path}")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._record(None)
            self._send_error(411, "Content-Length required")
            return
        if int(length) > MAX_BODY_BYTES:
            self._record(None)
            self.close_connection = True
            self._send_error(413, f"request body over {MAX_BODY_BYTES} bytes")
            return
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._record(raw.decode("utf-8", "replace"))
            self._send_error(400, "request body is not JSON")
            return
        self._record(body)
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._send_error(404, f"no route POST {self.path}")
            return
        self._chat_completion(body)

    def _chat_completion(self, body: dict) -> None:
        standin = self.standin
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list):
            self._send_error(400, "'messages' must be a list", param="messages")
            return
        response_format = body.get("response_format")
        rf_type = response_format.get("type") if isinstance(response_format, dict) else None
        if standin.reject_json_schema and rf_type == "json_schema":
            self._send_error(
                standin.reject_status,
                "response_format type 'json_schema' is not supported by this model",
                param="response_format",
            )
            return
        fault = standin._next_fault()
        if fault is not None:
            kind, arg = _parse_fault(fault)
            if kind == "disconnect":
                self.close_connection = True
                return  # the socket closes without a response
            if kind == "badbody":  # HTTP 200 whose JSON body is cut short (a broken proxy)
                self._send_raw(200, b'{"id": "chatcmpl-x", "choices": [')
                return
            if kind == "timeout":
                time.sleep(arg or 0.0)
            elif kind in ("429", "429ms"):
                header = ("Retry-After", f"{arg if arg is not None else 0.05:g}") if kind == "429" \
                    else ("retry-after-ms", f"{arg if arg is not None else 50:g}")
                self._send_error(429, "Rate limit reached (stand-in)", headers=[header])
                return
            elif kind.isdigit():
                status = int(kind)
                message = f"stand-in fault {status}"
                if status == 401:  # like a proxy echoing the credentials it got
                    message = f"Incorrect API key provided: {self.headers.get('Authorization', '')}"
                self._send_error(status, message)
                return
        report = report_text(messages)
        try:
            content = json.dumps(standin.answer(report))
        except Exception as exc:  # a broken test double should read as a server error, not a hang
            self._send_error(500, f"stand-in answer function failed: {type(exc).__name__}: {exc}")
            return
        finish_reason = "stop"
        if fault == "malformed":
            content = "Sure! Here are the findings: severity mild, category opacity"
        elif fault == "truncated":
            content, finish_reason = content[: max(1, len(content) // 2)], "length"
        elif fault == "badschema":
            content = json.dumps({"result": [{"label": "opacity"}]})
        if standin.latency_s:
            time.sleep(standin.latency_s)
        prompt_words = sum(_count_words(str(m.get("content") or "")) for m in messages)
        completion_words = _count_words(content)
        self._send_json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or standin.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
                "logprobs": None,
            }],
            "usage": {
                "prompt_tokens": prompt_words,
                "completion_tokens": completion_words,
                "total_tokens": prompt_words + completion_words,
            },
        })
        if fault is None or fault.startswith("timeout"):
            standin._count_completion()

    # ----------------------------------------------------------------- plumbing

    def _record(self, body: Any) -> None:
        self.standin._record({
            "method": self.command,
            "path": self.path,
            "headers": dict(self.headers.items()),
            "body": body,
            "t": time.monotonic(),
        })

    def _send_error(self, status: int, message: str, *, param: str | None = None,
                    headers: list[tuple[str, str]] | None = None) -> None:
        error_type = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self._send_json(status, {"error": {"message": message, "type": error_type, "param": param, "code": None}},
                        headers=headers)

    def _send_json(self, status: int, payload: dict, headers: list[tuple[str, str]] | None = None) -> None:
        self._send_raw(status, json.dumps(payload).encode(), headers)

    def _send_raw(self, status: int, data: bytes, headers: list[tuple[str, str]] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers or []:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout fault)
            self.close_connection = True
