"""schemathesis against the real server over HTTP, from the server's own /openapi.json: every
operation gets requests that fit the schema (positive) and requests that break it (negative).

Checks: no 5xx; status codes, content types and bodies as the schema documents them; every error
an OpenAI error object; every stream ends in [DONE] with no error inside. The schema is the one
clients read, narrowed to what the server accepts (its model id, the limits, the context), so
positive requests reach the generation path: the chat test counts those that did. Each test keeps its
own counts, so any one runs alone or in any order.

Bounded: the server runs with a 96-token context (each generation is short) and chat completions
get CHAT_EXAMPLES generated requests; about a minute and a half on two cores.
"""
from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from .servers import Server

CHAT_EXAMPLES = 300  # positive and negative together; the other operations take no input and get a few
SMALL_EXAMPLES = 40
CHAT = "POST /v1/chat/completions"

pytestmark = [pytest.mark.heavy, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def fuzz_server(tiny_engines_dir, tmp_path_factory):
    s = Server(tiny_engines_dir.parent.parent, tmp_path_factory.mktemp("logs") / "fuzz.log", "runtime.max_context=96",
               "runtime.policy.request_override=true", "runtime.max_batch_size=4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
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


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          openai_errors_and_whole_streams]
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)


def fuzz(schema, max_examples: int) -> tuple[Counter, Counter]:
    """Positive and negative cases for every operation of `schema`, through hypothesis directly (schemathesis's
    documented `as_strategy`; its pytest plugin ties itself to pytest's internals). Returns this run's outcomes:
    responses by (operation, status), and generated answers by path."""
    outcomes: Counter[tuple[str, int]] = Counter()
    reached: Counter[str] = Counter()
    cases = st.one_of([schema.as_strategy(generation_mode=mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])

    @given(case=cases)
    @settings(max_examples=max_examples, **SETTINGS)
    def one(case) -> None:
        response = case.call(timeout=60)
        outcomes[(case.operation.label, response.status_code)] += 1
        case.validate_response(response, checks=CHECKS)
        if response.status_code == 200 and case.operation.label == CHAT:
            reached[generated_path(response)] += 1

    one()
    return outcomes, reached


def generated_path(response) -> str:
    """The path that wrote a 200 chat completion: the last chunk's of a stream, else the body's."""
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.content.decode().splitlines() if line.startswith("data:")]
        return json.loads(data[-2])["dyngraph"]["path"]
    return json.loads(response.content)["dyngraph"]["path"]


def assert_server_healthy(server) -> None:
    log = server.logs()
    assert "unhandled error" not in log and "generation failed" not in log and "Traceback" not in log, log[-3000:]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_the_small_endpoints_fuzzed(api_schema, fuzz_server):
    outcomes, _ = fuzz(api_schema.exclude(path="/v1/chat/completions"), max_examples=SMALL_EXAMPLES)
    print("\nfuzzing:", dict(sorted(outcomes.items())))
    assert {operation for operation, _ in outcomes} >= {"GET /health", "GET /v1/models"}, outcomes
    assert_server_healthy(fuzz_server)


def test_chat_completions_fuzzed_reach_generation(api_schema, fuzz_server):
    outcomes, reached = fuzz(api_schema.include(path="/v1/chat/completions"), max_examples=CHAT_EXAMPLES)
    chat = {status: n for (_, status), n in outcomes.items()}
    print("\nfuzzing:", sum(chat.values()), "chat requests;", dict(sorted(chat.items())), "; generated on", dict(reached))
    assert chat.get(200, 0) >= 10, f"too few fuzzed requests reached generation: {chat}"
    assert {s for s in chat if s != 200} >= {400, 404}, chat  # and the fuzzer did break the rules
    assert sum(reached.values()) == chat[200]
    assert_server_healthy(fuzz_server)
