"""schemathesis against the real server over HTTP, from the server's own /openapi.json: every
operation gets requests that fit the schema (positive) and requests that break it (negative).

Checks: no 5xx; status codes, content types and bodies as the schema documents them; every error
an OpenAI error object; every stream ends in [DONE] with no error inside. The schema is the one
clients read, narrowed to what the server accepts (its model id, the limits, the context), so
positive requests reach the generation path: the last test counts those that did.

Bounded: the server runs with a 96-token context (each generation is short) and chat completions
get CHAT_EXAMPLES generated requests; about a minute and a half on two cores.
"""
from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from .test_serve import Server

CHAT_EXAMPLES = 150  # per generation mode; the other operations take no input and get a few
OUTCOMES: Counter[tuple[str, int]] = Counter()  # (operation, status) -> responses
REACHED_GENERATION: Counter[str] = Counter()  # chat completions answered with generated tokens, by path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fuzz_server(tiny_engines_dir, tmp_path_factory):
    s = Server(tiny_engines_dir.parent.parent, tmp_path_factory.mktemp("logs") / "fuzz.log", "runtime.max_context=96",
               "runtime.policy.request_override=true", "runtime.max_batch_size=4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    schema.config.max_stream_events = 200  # read whole streams (schemathesis stops at 20): 96 tokens at most, a chunk each
    return schema


@schemathesis.check
def openai_errors_and_whole_streams(ctx, response, case) -> None:
    """Every error is {"error": {"message", "type", "param", "code"}}; a stream ends in [DONE] with no error chunk."""
    content_type = response.headers.get("content-type", [""])[0]
    if response.status_code >= 400:
        body = json.loads(response.content)
        error = body.get("error") if isinstance(body, dict) else None
        assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, f"not an OpenAI error object: {body}"
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), body
        assert all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")), body
    elif content_type.startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.content.decode().splitlines() if line.startswith("data:")]
        assert data and data[-1] == "[DONE]", f"the stream did not end in [DONE]: {data[-3:]}"
        chunks = [json.loads(d) for d in data[:-1]]
        assert not [c for c in chunks if "error" in c], f"an error inside the stream: {chunks}"
        REACHED_GENERATION[chunks[-1]["dyngraph"]["path"]] += 1
    elif case.operation.label == "POST /v1/chat/completions":
        REACHED_GENERATION[json.loads(response.content)["dyngraph"]["path"]] += 1


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          openai_errors_and_whole_streams]
schema = schemathesis.pytest.from_fixture("api_schema")


@schema.exclude(path="/v1/chat/completions").parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
def test_the_small_endpoints_fuzzed(case):
    fuzz_one(case)


@schema.include(path="/v1/chat/completions").parametrize()
@settings(max_examples=CHAT_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True, database=None)
def test_chat_completions_fuzzed(case):
    fuzz_one(case)


def fuzz_one(case) -> None:
    response = case.call(timeout=60)
    OUTCOMES[(case.operation.label, response.status_code)] += 1
    case.validate_response(response, checks=CHECKS)


def test_fuzzing_reached_generation_and_nothing_went_wrong(fuzz_server):
    by_status = Counter()
    for (operation, status), n in OUTCOMES.items():
        by_status[f"{operation} {status}"] += n
    print("\nfuzzing:", sum(OUTCOMES.values()), "requests;", dict(sorted(by_status.items())), "; generated on", dict(REACHED_GENERATION))
    chat = {status: n for (operation, status), n in OUTCOMES.items() if operation == "POST /v1/chat/completions"}
    assert chat.get(200, 0) >= 10, f"too few fuzzed requests reached generation: {chat}"
    assert {s for s in chat if s != 200} >= {400, 404}, chat  # and the fuzzer did break the rules
    assert sum(REACHED_GENERATION.values()) == chat[200]
    log = fuzz_server.logs()
    assert "unhandled error" not in log and "generation failed" not in log and "Traceback" not in log, log[-3000:]
    assert httpx.get(f"{fuzz_server.url}/health").json() == {"status": "ok"}
