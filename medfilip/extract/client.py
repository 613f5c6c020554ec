"""Findings from any OpenAI-compatible endpoint (OpenAI, Azure, vLLM, Ollama, llama.cpp).

Retries are ours (tenacity), not the ``openai`` client's: rate limits (honouring
``Retry-After``), server errors, timeouts, dropped connections and invalid or
truncated answers are asked again with exponential backoff and full jitter; any other
4xx is a mistake that asking again cannot fix, so it fails at once. Every answer is
validated with :func:`medfilip.extract.schema.parse_answer` whatever the endpoint
promised.
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_random_exponential

from medfilip.config import LLMParams
from medfilip.errors import UserError
from medfilip.extract.base import Answer, ExtractionFailed
from medfilip.extract.cache import redact_secrets, register_secret
from medfilip.extract.prompt import Prompt
from medfilip.extract.schema import ANSWER_SCHEMA, SCHEMA_VERSION, AnswerError, parse_answer

log = logging.getLogger(__name__)

RESPONSE_FORMATS = ("auto", "json_schema", "json_object", "grammar", "text")
# `auto` walks down this ladder when an endpoint refuses a response_format.
_FALLBACK = {"json_schema": "json_object", "json_object": "text"}
_NO_KEY_PLACEHOLDER = "sk-no-key-required"  # llama.cpp's server ignores the key
_RETRIED_STATUS = {408, 429}  # plus every 5xx


class MissingKeyError(UserError, RuntimeError):
    """The env var that should hold the API key is unset: raised before any call is made."""


def resolve_api_key(llm: LLMParams, environ: Mapping[str, str] = os.environ) -> str:
    """The API key from the env var named by ``llm.api_key_env`` (a placeholder for llamacpp)."""
    key = (environ.get(llm.api_key_env) or "").strip()
    if key:
        return key
    if llm.provider == "llamacpp":
        return _NO_KEY_PLACEHOLDER
    raise MissingKeyError(
        f"llm.provider is '{llm.provider}' but the environment variable {llm.api_key_env} "
        f"(llm.api_key_env) is not set or empty. Export it before running "
        f"(export {llm.api_key_env}=...), or set llm.api_key_env to the name of the variable "
        "that holds your key; never put the key itself in params.yaml. An endpoint that needs "
        "no key (a local vLLM or Ollama) accepts any value, e.g. "
        f"{llm.api_key_env}=none. No request was made."
    )


def response_format_payload(mode: str) -> dict[str, Any] | None:
    """The ``response_format`` request field of one mode (``None`` for text)."""
    if mode == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": "findings", "strict": True, "schema": ANSWER_SCHEMA},
        }
    if mode == "json_object":
        return {"type": "json_object"}
    if mode == "grammar":  # llama.cpp server: a JSON-schema grammar constrains the sampler
        return {"type": "json_object", "schema": ANSWER_SCHEMA}
    if mode == "text":
        return None
    raise ValueError(f"unknown response_format mode {mode!r} (one of {', '.join(RESPONSE_FORMATS)})")


class _Retryable(Exception):
    """One attempt that may succeed if asked again; ``head`` names the kind for the final message."""

    def __init__(self, head: str, detail: str = "", retry_after: float | None = None):
        super().__init__(f"{head}: {detail}" if detail else head)
        self.head = head
        self.detail = detail
        self.retry_after = retry_after


class OpenAIExtractor:
    """:class:`medfilip.extract.base.Extractor` over the chat-completions API of any compatible server."""

    def __init__(
        self,
        llm: LLMParams,
        prompt: Prompt,
        *,
        api_key: str,
        base_url: str | None = None,
        response_format: str | None = None,
        sampling: dict[str, Any] | None = None,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
    ):
        """``response_format`` overrides ``llm.response_format`` (the llamacpp provider passes ``grammar``).
        ``sampling``: sampler settings beyond the OpenAI API's, sent in the request body and part of
        :meth:`identity` (the llamacpp provider's ``repeat_penalty``); None sends none."""
        if not api_key:
            raise MissingKeyError(f"no API key given (llm.api_key_env is {llm.api_key_env})")
        mode = response_format or llm.response_format
        if mode not in RESPONSE_FORMATS:
            raise ValueError(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}; got {mode!r}")
        register_secret(api_key)
        self.llm = llm
        self.prompt = prompt
        self.provider = llm.provider
        self.model = llm.model
        self.max_tokens = llm.max_tokens  # not in identity(): see medfilip.extract.base.Extractor
        self.requested_format = mode
        self.sampling = dict(sampling) if sampling else None
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._backoff = wait_random_exponential(multiplier=backoff_s, max=max_backoff_s)  # full jitter
        # The mode requests use now; `auto` starts at json_schema and only ever steps down.
        self._format = "json_schema" if mode == "auto" else mode
        self._format_lock = threading.Lock()
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url or llm.base_url,
            timeout=llm.timeout_s,
            max_retries=0,
        )

    @property
    def current_format(self) -> str:
        """The response_format mode requests are sent with now (after any auto fallback)."""
        with self._format_lock:
            return self._format

    def identity(self) -> dict[str, Any]:
        """What determines the answer, for the cache key: never the key or the endpoint URL.

        ``response_format`` is the *requested* mode (``auto`` stays ``auto`` after a
        fallback), so keys are stable for a whole run. ``max_tokens`` is left out: it only
        decides where an answer is cut, and a cut answer is cached as a failure that names
        the limit (:meth:`medfilip.extract.cache.LLMCache.truncated_at`), so raising the
        limit re-asks just those reports.
        """
        identity = {
            "provider": self.provider,
            "model": self.model,
            "prompt_version": self.prompt.version,
            "prompt_fingerprint": self.prompt.fingerprint,
            "schema_version": SCHEMA_VERSION,
            "temperature": self.llm.temperature,
            "seed": self.llm.seed,
            "response_format": self.requested_format,
        }
        if self.sampling:  # only then: the keys of every endpoint without extra settings stay as they were
            identity["sampling"] = dict(sorted(self.sampling.items()))
        return identity

    async def extract(self, report: str) -> Answer:
        """Findings of one report, retried as the module docstring says.

        ``prompt_tokens``/``completion_tokens`` are summed over every attempt that got an
        answer (what was paid), on success and on :class:`ExtractionFailed` alike;
        ``latency_s`` is wall time including backoff waits.
        """
        messages = self.prompt.messages(report)
        started = time.monotonic()
        usage = [0, 0]
        attempts = 0
        retry_reasons: list[str] = []
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.llm.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(_Retryable),
            before_sleep=lambda state: _log_retry(state, retry_reasons),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    answer = await self._ask_once(messages, usage)
        except _Retryable as exc:
            elapsed = time.monotonic() - started
            message = f"{exc.head} after {attempts} attempt{'s' if attempts != 1 else ''}"
            if exc.detail:
                message += f": {exc.detail}"
            truncated_at = self.max_tokens if exc.head == "truncated answer" else None
            raise ExtractionFailed(
                redact_secrets(message), attempts=attempts, latency_s=elapsed,
                prompt_tokens=usage[0], completion_tokens=usage[1], truncated_at=truncated_at,
            ) from None
        except ExtractionFailed as exc:
            exc.attempts = attempts
            exc.latency_s = time.monotonic() - started
            exc.prompt_tokens, exc.completion_tokens = usage
            raise
        answer.prompt_tokens, answer.completion_tokens = usage
        answer.latency_s = time.monotonic() - started
        answer.attempts = attempts
        if retry_reasons:
            answer.extra["retry_reasons"] = retry_reasons
        return answer

    async def _ask_once(self, messages: list[dict[str, str]], usage: list[int]) -> Answer:
        """One attempt; an endpoint refusing the response_format (auto mode) steps down at once."""
        while True:
            mode = self.current_format
            try:
                completion = await self._client.chat.completions.create(**self._request(messages, mode))
            except openai.APIStatusError as exc:
                if _rejects_response_format(exc) and mode != "text":
                    if self.requested_format == "auto" and mode in _FALLBACK:
                        self._step_down(mode, exc)
                        continue
                    raise ExtractionFailed(
                        f"the endpoint rejected response_format '{mode}' ({_status_text(exc)}); "
                        "set llm.response_format to auto, json_object or text"
                    ) from None
                raise _classify_status(exc) from None
            except openai.APITimeoutError:
                raise _Retryable("timed out", f"no answer within llm.timeout_s={self.llm.timeout_s:g}s") from None
            except openai.APIConnectionError as exc:
                raise _Retryable("connection error", _short(_error_text(exc))) from None
            except openai.APIError as exc:  # e.g. a 200 whose body is not a completion
                raise _Retryable("invalid response", _short(_error_text(exc))) from None
            except ValueError as exc:  # the client decoding a 200 whose JSON body is broken
                raise _Retryable("invalid response", f"the response body is not valid JSON ({_short(str(exc))})") from None
            return self._read_completion(completion, mode, usage)

    def _request(self, messages: list[dict[str, str]], mode: str) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.llm.temperature,
            "max_tokens": self.llm.max_tokens,
        }
        if self.llm.seed is not None:
            request["seed"] = self.llm.seed
        payload = response_format_payload(mode)
        if payload is not None:
            request["response_format"] = payload
        if self.sampling:
            request["extra_body"] = dict(self.sampling)
        return request

    def _read_completion(self, completion: Any, mode: str, usage: list[int]) -> Answer:
        tokens = getattr(completion, "usage", None)
        if tokens is not None:
            usage[0] += int(getattr(tokens, "prompt_tokens", 0) or 0)
            usage[1] += int(getattr(tokens, "completion_tokens", 0) or 0)
        choices = getattr(completion, "choices", None) or []
        if not choices:
            raise _Retryable("invalid response", "the completion has no choices")
        choice = choices[0]
        message = getattr(choice, "message", None)
        text = getattr(message, "content", None)
        refusal = getattr(message, "refusal", None)
        if refusal and not text:
            raise ExtractionFailed(f"the model refused: {_short(refusal)}")
        if choice.finish_reason == "content_filter":
            raise ExtractionFailed("the answer was withheld by the endpoint's content filter")
        if choice.finish_reason == "length":
            raise _Retryable(
                "truncated answer",
                f"finish_reason=length at llm.max_tokens={self.llm.max_tokens}; raise it if this persists",
            )
        try:
            findings, dropped = parse_answer(text)
        except AnswerError as exc:
            raise _Retryable(_answer_error_head(str(exc)), _short(str(exc))) from None
        return Answer(
            findings=findings,
            n_dropped=dropped,
            raw_text=text or "",
            extra={"response_format": mode, "finish_reason": choice.finish_reason},
        )

    def _step_down(self, mode: str, exc: openai.APIStatusError) -> None:
        """Record that the endpoint refuses ``mode``; only the first task to see it logs."""
        with self._format_lock:
            if self._format != mode:  # another request already stepped down
                return
            self._format = _FALLBACK[mode]
            new = self._format
        log.warning(
            "%s refused response_format %s (%s); using %s for the rest of this run",
            self.model, mode, _status_text(exc), new,
        )

    def _wait(self, state: RetryCallState) -> float:
        """Full-jitter exponential backoff, but never shorter than the server's Retry-After."""
        backoff = self._backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        hint = getattr(exc, "retry_after", None)
        if hint is None:
            return backoff
        # A server asking for more than max_backoff_s (a daily quota) gets a capped wait:
        # the report fails after its retries, is recorded, and the next run asks again.
        return max(backoff, min(hint, self.max_backoff_s))

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.close()


# --------------------------------------------------------------------------- errors


def _classify_status(exc: openai.APIStatusError) -> Exception:
    status = exc.status_code
    if status == 429:
        return _Retryable("HTTP 429 rate limited", _short(_error_text(exc)), retry_after=_retry_after(exc.response.headers))
    if status >= 500 or status in _RETRIED_STATUS:
        return _Retryable(f"HTTP {status} server error", _short(_error_text(exc)), retry_after=_retry_after(exc.response.headers))
    hint = {
        401: " (check the key in the env var named by llm.api_key_env)",
        403: " (the key has no access to this model)",
        404: " (check llm.model and llm.base_url)",
    }.get(status, "")
    return ExtractionFailed(redact_secrets(f"{_status_text(exc)}{hint}; not retried"))


def _answer_error_head(message: str) -> str:
    """Kind of a rejected answer for the failure message (text of schema.AnswerError)."""
    if "not valid JSON" in message or message == "empty answer":
        return "invalid JSON answer"
    return "answer does not match the schema"


def _rejects_response_format(exc: openai.APIStatusError) -> bool:
    """A validation error about response_format (llama.cpp's server answers those with a 500)."""
    if exc.status_code not in (400, 422, 500, 501):
        return False
    if getattr(exc, "param", None) == "response_format":
        return True
    text = f"{exc.message} {exc.body}".lower()
    return any(word in text for word in ("response_format", "json_schema", "response format"))


def _retry_after(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            seconds = float(value) / 1000.0
            return seconds if math.isfinite(seconds) and seconds >= 0 else None
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _error_text(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, openai.APIConnectionError) and cause is not None:
        return f"{exc.message} ({type(cause).__name__}: {cause})" if str(cause) else f"{exc.message} ({type(cause).__name__})"
    return str(exc.message)


def _status_text(exc: openai.APIStatusError) -> str:
    return redact_secrets(f"HTTP {exc.status_code}: {_short(_error_text(exc))}")


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    text = redact_secrets(text) or ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _log_retry(state: RetryCallState, reasons: list[str]) -> None:
    exc = state.outcome.exception() if state.outcome else None
    reason = str(exc)
    reasons.append(reason)
    wait = state.next_action.sleep if state.next_action else 0.0
    log.debug("attempt %d failed (%s); retrying in %.2fs", state.attempt_number, reason, wait)
