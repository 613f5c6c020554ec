"""OpenAIExtractor against a real OpenAI-compatible server on loopback (StandinServer)."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from medfilip.config import LLMParams
from medfilip.extract.base import Answer, ExtractionFailed
from medfilip.extract.cache import LLMCache, cache_key
from medfilip.extract.client import MissingKeyError, OpenAIExtractor, resolve_api_key
from medfilip.extract.prompt import load_prompt
from medfilip.extract.schema import ANSWER_SCHEMA, Finding
from medfilip.testing.standin import StandinServer, report_text

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-medfilip-test-0123456789abcdefSECRET"
REPORT = "FINDINGS: Mild left lower lobe consolidation. No pneumothorax."
LLM = LLMParams(provider="openai", model="gpt-test", max_retries=3, timeout_s=5.0, api_key_env="MEDFILIP_TEST_KEY")


@pytest.fixture(scope="module")
def prompt():
    return load_prompt(REPO / "data" / "prompts" / "extract_v1")


def answer_for(report: str) -> dict:
    """A deterministic 'model': one finding per sentence naming consolidation, plus one without a category."""
    findings = [
        {"severity": "mild", "location": "left lower lobe", "category": "consolidation",
         "negated": False, "uncertain": False, "evidence": s.strip()}
        for s in report.split(".") if "consolidation" in s
    ]
    findings.append({"severity": None, "location": None, "category": None,
                     "negated": False, "uncertain": False, "evidence": "dropped"})
    return {"findings": findings}


EXPECTED = [Finding("consolidation", "mild", "left lower lobe", evidence="FINDINGS: Mild left lower lobe consolidation")]


def extract(server: StandinServer, prompt, report: str = REPORT, llm: LLMParams = LLM, **kwargs) -> Answer:
    async def go():
        extractor = OpenAIExtractor(llm, prompt, api_key=KEY, base_url=server.base_url, backoff_s=0.01, **kwargs)
        try:
            return await extractor.extract(report)
        finally:
            await extractor.aclose()

    return asyncio.run(go())


def completion_bodies(server: StandinServer) -> list[dict]:
    return [r["body"] for r in server.requests if r["path"].endswith("/chat/completions")]


# --------------------------------------------------------------------------- happy path


def test_answer_and_request_shape(prompt):
    with StandinServer(answer=answer_for) as server:
        answer = extract(server, prompt)
    assert answer.findings == EXPECTED
    assert answer.n_dropped == 1
    assert answer.attempts == 1
    assert answer.prompt_tokens > 0 and answer.completion_tokens > 0
    assert answer.latency_s > 0
    assert json.loads(answer.raw_text)["findings"][0]["category"] == "consolidation"
    (body,) = completion_bodies(server)
    assert body["model"] == "gpt-test"
    assert body["messages"] == prompt.messages(REPORT)
    assert report_text(body["messages"]) == REPORT
    assert body["temperature"] == 0 and body["max_tokens"] == LLM.max_tokens and body["seed"] == 0
    assert body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "findings", "strict": True, "schema": ANSWER_SCHEMA}
    }


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("json_object", {"type": "json_object"}),
        ("grammar", {"type": "json_object", "schema": ANSWER_SCHEMA}),
        ("text", None),
    ],
)
def test_response_format_modes(prompt, mode, expected):
    with StandinServer(answer=answer_for) as server:
        answer = extract(server, prompt, response_format=mode)
    assert answer.findings == EXPECTED
    (body,) = completion_bodies(server)
    assert body.get("response_format") == expected


def test_models_endpoint():
    import httpx2

    with StandinServer(model="tiny") as server:
        data = httpx2.get(server.base_url + "/models").json()
    assert data["data"][0]["id"] == "tiny"


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize(
    "fault", ["500", "503", "malformed", "truncated", "badschema", "badbody", "disconnect", "429ms:20", "408"]
)
def test_each_retry_path_ends_in_a_valid_answer(prompt, fault):
    with StandinServer(answer=answer_for, faults=[fault]) as server:
        answer = extract(server, prompt)
    assert answer.findings == EXPECTED
    assert answer.attempts == 2
    assert len(completion_bodies(server)) == 2
    assert len(answer.extra["retry_reasons"]) == 1


def test_timeout_is_retried(prompt):
    llm = replace(LLM, timeout_s=0.3)
    with StandinServer(answer=answer_for, faults=["timeout:1.0"]) as server:
        answer = extract(server, prompt, llm=llm)
    assert answer.findings == EXPECTED and answer.attempts == 2
    assert "timed out" in answer.extra["retry_reasons"][0]


def test_retry_after_is_honoured(prompt):
    with StandinServer(answer=answer_for, faults=["429:0.3"]) as server:
        answer = extract(server, prompt)
    first, second = (r["t"] for r in server.requests)
    print(f"waited {second - first:.3f}s after a 429 with Retry-After: 0.3 (backoff_s=0.01)")
    assert second - first >= 0.3
    assert answer.attempts == 2 and answer.findings == EXPECTED


def test_tokens_are_summed_over_attempts(prompt):
    with StandinServer(answer=answer_for) as server:
        single = extract(server, prompt)
    with StandinServer(answer=answer_for, faults=["badschema"]) as server:
        retried = extract(server, prompt)
    assert retried.prompt_tokens == 2 * single.prompt_tokens


@pytest.mark.parametrize("fault, truncated_at", [("truncated", LLM.max_tokens), ("badschema", None)])
def test_failed_attempts_report_what_they_cost(prompt, fault, truncated_at):
    n = LLM.max_retries + 1
    with StandinServer(answer=answer_for) as server:
        single = extract(server, prompt)
    with StandinServer(answer=answer_for, faults=[fault] * n) as server:
        with pytest.raises(ExtractionFailed) as info:
            extract(server, prompt)
    assert info.value.prompt_tokens == n * single.prompt_tokens  # every answered attempt was paid
    assert info.value.completion_tokens > 0
    assert info.value.truncated_at == truncated_at  # the limit that cut it, so a larger one re-asks it


def test_max_tokens_is_not_in_the_cache_key(prompt):
    small = OpenAIExtractor(replace(LLM, max_tokens=256), prompt, api_key=KEY)
    large = OpenAIExtractor(replace(LLM, max_tokens=4096), prompt, api_key=KEY)
    assert small.identity() == large.identity() and "max_tokens" not in small.identity()
    assert (small.max_tokens, large.max_tokens) == (256, 4096)


def test_extra_sampling_settings_are_sent_and_keyed_and_absent_otherwise(prompt):
    plain = OpenAIExtractor(LLM, prompt, api_key=KEY)
    assert "sampling" not in plain.identity()  # cache keys of plain endpoints are unchanged
    assert "extra_body" not in plain._request([{"role": "user", "content": "r"}], "json_schema")
    tuned = OpenAIExtractor(LLM, prompt, api_key=KEY, sampling={"repeat_penalty": 1.1})
    other = OpenAIExtractor(LLM, prompt, api_key=KEY, sampling={"repeat_penalty": 1.0})
    assert tuned.identity()["sampling"] == {"repeat_penalty": 1.1}
    assert tuned.identity() != other.identity() != plain.identity()
    assert tuned._request([{"role": "user", "content": "r"}], "grammar")["extra_body"] == {"repeat_penalty": 1.1}


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("429", "HTTP 429 rate limited after 4 attempts"),
        ("500", "HTTP 500 server error after 4 attempts"),
        ("malformed", "invalid JSON answer after 4 attempts: "),
        ("badschema", "answer does not match the schema after 4 attempts: "),
        ("truncated", "truncated answer after 4 attempts: "),
        ("disconnect", "connection error after 4 attempts"),
    ],
)
def test_retries_exhausted(prompt, fault, reason):
    n = LLM.max_retries + 1
    with StandinServer(answer=answer_for, faults=[fault] * n) as server:
        with pytest.raises(ExtractionFailed) as info:
            extract(server, prompt)
    assert str(info.value).startswith(reason), str(info.value)
    assert info.value.attempts == n
    assert info.value.latency_s > 0
    assert len(completion_bodies(server)) == n


def test_zero_retries_means_one_attempt(prompt):
    with StandinServer(answer=answer_for, faults=["500"]) as server:
        with pytest.raises(ExtractionFailed, match="^HTTP 500 server error after 1 attempt: "):
            extract(server, prompt, llm=replace(LLM, max_retries=0))
    assert len(completion_bodies(server)) == 1


@pytest.mark.parametrize("status", ["400", "404", "422"])
def test_other_4xx_is_not_retried(prompt, status):
    with StandinServer(answer=answer_for, faults=[status]) as server:
        with pytest.raises(ExtractionFailed) as info:
            extract(server, prompt)
    assert f"HTTP {status}" in str(info.value) and "not retried" in str(info.value)
    assert info.value.attempts == 1
    assert len(completion_bodies(server)) == 1


# --------------------------------------------------------------------------- response_format fallback


@pytest.mark.parametrize("reject_status", [400, 500])  # 500: how llama.cpp's server refuses it
def test_auto_falls_back_to_json_object_and_remembers(prompt, reject_status, caplog):
    async def go(server):
        extractor = OpenAIExtractor(LLM, prompt, api_key=KEY, base_url=server.base_url, backoff_s=0.01)
        try:
            answers = await asyncio.gather(*(extractor.extract(f"{REPORT} case {i}.") for i in range(6)))
            return extractor, answers
        finally:
            await extractor.aclose()

    with caplog.at_level(logging.WARNING, logger="medfilip.extract.client"):
        with StandinServer(answer=answer_for, reject_json_schema=True, reject_status=reject_status) as server:
            extractor, answers = asyncio.run(go(server))
            later = extract(server, prompt, response_format="json_object")
    assert all(a.findings == EXPECTED and a.attempts == 1 for a in answers)  # a fallback is not a retry
    assert all(a.extra["response_format"] == "json_object" for a in answers)
    assert later.findings == EXPECTED
    assert extractor.current_format == "json_object"
    assert extractor.identity()["response_format"] == "auto"  # cache keys stay stable
    kinds = [(b.get("response_format") or {}).get("type") for b in completion_bodies(server)]
    # concurrent first requests may each see a refusal; once stepped down, never json_schema again
    assert kinds.count("json_object") == 7
    assert kinds[: kinds.index("json_object")] == ["json_schema"] * kinds.index("json_object")
    warnings = [r for r in caplog.records if "refused response_format" in r.getMessage()]
    assert len(warnings) == 1


def test_fixed_json_schema_mode_refused_fails_with_advice(prompt):
    with StandinServer(answer=answer_for, reject_json_schema=True) as server:
        with pytest.raises(ExtractionFailed, match="llm.response_format") as info:
            extract(server, prompt, llm=replace(LLM, response_format="json_schema"))
    assert info.value.attempts == 1 and len(completion_bodies(server)) == 1


# --------------------------------------------------------------------------- the API key


def test_missing_key_is_reported_before_any_request(prompt):
    with StandinServer(answer=answer_for) as server:
        with pytest.raises(MissingKeyError) as info:
            key = resolve_api_key(LLM, environ={})
            OpenAIExtractor(LLM, prompt, api_key=key, base_url=server.base_url)
        assert server.requests == []
    message = str(info.value)
    assert "MEDFILIP_TEST_KEY" in message and "llm.api_key_env" in message and "export" in message


def test_resolve_api_key():
    assert resolve_api_key(LLM, environ={"MEDFILIP_TEST_KEY": " abc "}) == "abc"
    with pytest.raises(MissingKeyError):
        resolve_api_key(LLM, environ={"MEDFILIP_TEST_KEY": ""})
    local = replace(LLM, provider="llamacpp")
    assert resolve_api_key(local, environ={})  # llama.cpp needs none: a placeholder
    assert resolve_api_key(local, environ={"MEDFILIP_TEST_KEY": "k"}) == "k"


def test_key_travels_only_in_the_authorization_header(prompt, tmp_path):
    cache_path = tmp_path / "llm.sqlite"

    async def go(server):
        extractor = OpenAIExtractor(LLM, prompt, api_key=KEY, base_url=server.base_url, backoff_s=0.01)
        identity = extractor.identity()
        with LLMCache(cache_path) as cache:
            answer = await extractor.extract(REPORT)  # after one 500
            cache.put_ok(cache_key(identity, REPORT), identity, REPORT, answer, study_id="s1")
            server.add_faults("401")
            try:
                await extractor.extract("second report")  # a 401 that echoes the key
            except ExtractionFailed as exc:
                failure = exc
                cache.put_failure(cache_key(identity, "second report"), identity, "second report",
                                  str(exc), exc.attempts, exc.latency_s, study_id="s2")
        await extractor.aclose()
        return identity, answer, failure

    with StandinServer(answer=answer_for, faults=["500"]) as server:
        identity, answer, failure = asyncio.run(go(server))
    assert "HTTP 401" in str(failure) and failure.attempts == 1
    assert KEY not in str(failure) and KEY not in repr(failure.args)
    assert KEY not in repr(answer)
    assert KEY not in json.dumps(identity) and server.base_url not in json.dumps(identity)
    assert set(identity) >= {"provider", "model", "prompt_version", "prompt_fingerprint", "schema_version",
                             "temperature", "seed", "response_format"}
    assert len(server.requests) == 3
    for request in server.requests:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert headers["authorization"] == f"Bearer {KEY}"
        others = {k: v for k, v in headers.items() if k != "authorization"}
        assert KEY not in json.dumps(others) + request["path"] + json.dumps(request["body"])
    for file in tmp_path.iterdir():
        assert KEY.encode() not in file.read_bytes(), file.name


# --------------------------------------------------------------------------- concurrency


def test_concurrent_extractions_with_faults(prompt):
    reports = [f"Report {i}: moderate consolidation." for i in range(24)]
    faults = ["500", "malformed", "disconnect", "429:0.05", "truncated", "503"] * 2

    async def go(server):
        extractor = OpenAIExtractor(LLM, prompt, api_key=KEY, base_url=server.base_url, backoff_s=0.01)
        try:
            return await asyncio.gather(*(extractor.extract(r) for r in reports))
        finally:
            await extractor.aclose()

    with StandinServer(answer=answer_for, faults=faults, latency_s=0.01) as server:
        answers = asyncio.run(go(server))
        assert server.n_completions == len(reports)  # fault answers are not counted
    assert [a.findings[0].evidence for a in answers] == [r.rstrip(".") for r in reports]
    assert sum(a.attempts for a in answers) == len(reports) + len(faults)


def test_retry_after_is_capped_at_max_backoff(prompt):
    """A server asking for an hour (a spent daily quota) does not stall the run for an hour."""
    with StandinServer(answer=answer_for, faults=["429:3600"]) as server:
        answer = extract(server, prompt, max_backoff_s=0.2)
    first, second = (r["t"] for r in server.requests)
    assert 0.2 <= second - first < 2.0
    assert answer.attempts == 2


def test_retry_after_header_forms():
    from email.utils import format_datetime
    from datetime import datetime, timedelta, timezone

    from medfilip.extract.client import _retry_after

    assert _retry_after({"retry-after-ms": "250"}) == pytest.approx(0.25)
    assert _retry_after({"retry-after": "2"}) == 2.0
    assert _retry_after({"retry-after-ms": "100", "retry-after": "9"}) == pytest.approx(0.1)
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= _retry_after({"retry-after": soon}) <= 31
    assert _retry_after({"retry-after": "soon"}) is None
    assert _retry_after({}) is None
