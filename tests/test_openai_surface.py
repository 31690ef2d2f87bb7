"""The OpenAI surface agents use, over HTTP on the tiny export with random weights: tools in GLM-4's
format (required and named choices enforced by constrained decoding), structured output through
llguidance, n, logprobs, penalties and logit_bias; LangChain's bind_tools and with_structured_output;
and the Sampler's logits processing against a plain reference."""
from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
import torch

from runtime.sampling import RowContext, Sampler, SamplingParams, TokenHistory, make_generator

from .test_serve import DEPTH_POLICY, MODEL, TOK, Server, chat

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXITS = [6, 12, 18, 24]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]},
                                           "name": {"type": "string", "maxLength": 3}},
          "required": ["ok", "color", "name"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "celsius": {"type": "boolean"}},
           "required": ["city", "celsius"], "additionalProperties": False}
APP = {"type": "object", "properties": {"app": {"enum": ["WeChat", "Camera"]}}, "required": ["app"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "open_app", "description": "Open an app on the phone", "parameters": APP}}]
SCHEMAS = {"get_weather": WEATHER, "open_app": APP}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_engines_dir, tmp_path_factory):
    s = Server(tiny_engines_dir.parent.parent, tmp_path_factory.mktemp("logs") / "openai.log", *DEPTH_POLICY,
               "runtime.max_batch_size=4", "runtime.policy.request_override=true")
    yield s
    s.stop()


def stream(server: Server, messages, **kw) -> tuple[list[dict], dict]:
    """A streamed answer's chunks, and its message put back together (content, tool_calls by index)."""
    chunks = [c.model_dump() for c in server.client().chat.completions.create(model=MODEL, messages=messages, stream=True, **kw)]
    content, calls, finish = "", {}, None
    for c in chunks:
        for choice in c["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                into = calls.setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
                into["id"] = into["id"] or call.get("id")
                into["name"] += (call.get("function") or {}).get("name") or ""
                into["arguments"] += (call.get("function") or {}).get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    return chunks, {"content": content, "tool_calls": [calls[i] for i in sorted(calls)], "finish_reason": finish}


# --- structured output ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("exit_layer", EXITS)
def test_every_json_schema_answer_validates_at_every_exit(server, exit_layer):
    fmt = {"type": "json_schema", "json_schema": {"name": "status", "schema": SCHEMA, "strict": True}}
    body, _ = chat(server, ASK, max_tokens=96, temperature=1.0, seed=exit_layer, response_format=fmt, extra_body={"exit_layer": exit_layer})
    assert body["dyngraph"]["exit_layer"] == exit_layer
    assert body["choices"][0]["finish_reason"] == "stop", body
    jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), SCHEMA)
    _, streamed = stream(server, ASK, max_tokens=96, response_format=fmt, extra_body={"exit_layer": exit_layer})
    assert streamed["finish_reason"] == "stop"
    jsonschema.validate(json.loads(streamed["content"]), SCHEMA)


def test_json_object_is_an_object_or_stops_on_length(server):
    body, _ = chat(server, ASK, max_tokens=24, response_format={"type": "json_object"}, extra_body={"exit_layer": 6})
    choice = body["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:  # random weights may open objects for ever: capped by max_tokens, and said so
        assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith("{")


# --- tools ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exit_layer", EXITS)
def test_required_tool_calls_parse_into_the_arguments_schema_at_every_exit(server, exit_layer):
    kw = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=64, extra_body={"exit_layer": exit_layer})
    body, _ = chat(server, ASK, temperature=1.0, seed=exit_layer, **kw)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls", body
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    chunks, streamed = stream(server, ASK, **kw)
    assert streamed["finish_reason"] == "tool_calls"
    (call,) = streamed["tool_calls"]
    assert call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    assert chunks[-1]["dyngraph"]["exit_layer"] == exit_layer


def test_a_named_tool_choice_calls_that_function(server):
    for name in SCHEMAS:
        body, _ = chat(server, ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": name}}, max_tokens=64)
        (call,) = body["choices"][0]["message"]["tool_calls"]
        assert call["function"]["name"] == name
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


def test_parallel_calls_come_as_several_tool_calls(server):
    # each call after the first is opened by <|assistant|>: whatever the random model chooses, every complete call parses
    body, _ = chat(server, ASK, tools=TOOLS, tool_choice="required", max_tokens=200, temperature=1.0, seed=3)
    choice = body["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert calls and len({c["id"] for c in calls}) == len(calls)
    complete = calls if choice["finish_reason"] == "tool_calls" else calls[:-1]
    for call in complete:
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


def test_tool_results_go_back_as_observations_in_glm4s_format(server):
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "celsius": true}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    body, _ = chat(server, messages, tools=TOOLS, tool_choice="none", max_tokens=4)
    functions = [t["function"] for t in TOOLS]
    prompt = TOK.apply_chat_template([{"role": "user", "content": ASK[0]["content"]},
                                      {"role": "assistant", "content": "", "tool_calls": [
                                          {"name": "get_weather", "arguments": '{"city": "Paris", "celsius": true}'}]},
                                      {"role": "observation", "content": "18 degrees, sunny"}], tools=functions)
    assert body["usage"]["prompt_tokens"] == len(prompt)
    text = TOK.decode(prompt)
    assert "# 可用工具\n\n## get_weather\n\n" in text and "在调用上述函数时，请使用 Json 格式表示调用的参数。" in text
    assert '<|assistant|>get_weather\n{"city": "Paris", "celsius": true}<|observation|>\n18 degrees, sunny<|assistant|>\n' in text
    assert "tool_calls" not in body["choices"][0]["message"]  # tool_choice=none: a text answer


def test_langchain_agents_bind_tools_and_structured_output(server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    @tool
    def open_app(app: Literal["WeChat", "Camera"]) -> str:
        """Open an app on the phone."""
        return f"opened {app}"

    class Status(BaseModel):
        ok: bool
        color: Literal["red", "green"]

    llm = ChatOpenAI(model=MODEL, base_url=f"{server.url}/v1", api_key="EMPTY", max_tokens=48, temperature=0, max_retries=0)
    message = llm.bind_tools([open_app], tool_choice="required").invoke("Open the camera")
    (call,) = message.tool_calls[:1]
    assert call["name"] == "open_app" and call["id"]
    assert open_app.invoke(call["args"]) in ("opened WeChat", "opened Camera")
    status = llm.with_structured_output(Status).invoke("How is it going?")
    assert isinstance(status, Status)


# --- n, logprobs, penalties ------------------------------------------------------------------------------------------


def test_n_choices_each_with_its_finish_and_seeded_runs_reproduce(server):
    kw = dict(n=3, max_tokens=6, temperature=1.0, seed=11, extra_body={"exit_layer": 6})
    body, _ = chat(server, ASK, **kw)
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert all(c["finish_reason"] in ("stop", "length") for c in choices)
    assert body["usage"]["prompt_tokens"] == len(TOK.apply_chat_template(ASK))
    assert 3 <= body["usage"]["completion_tokens"] <= 18
    again, _ = chat(server, ASK, **kw)
    assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in choices]
    chunks, _ = stream(server, ASK, **kw, stream_options={"include_usage": True})
    by_index = {i: "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"] and c["choices"][0]["index"] == i)
                for i in range(3)}
    assert list(by_index.values()) == [c["message"]["content"] for c in choices]
    assert chunks[-1]["usage"]["completion_tokens"] == body["usage"]["completion_tokens"]


@pytest.mark.parametrize("streamed", [False, True])
def test_logprobs_one_per_token_top_sorted_from_the_paths_exit(server, streamed):
    kw = dict(max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, extra_body={"exit_layer": 12, "ignore_eos": True})
    if streamed:
        chunks, _ = stream(server, ASK, **kw)
        entries = [e for c in chunks for ch in c["choices"] if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    else:
        body, _ = chat(server, ASK, **kw)
        assert body["dyngraph"]["exit_layer"] == 12
        entries = body["choices"][0]["logprobs"]["content"]
    assert len(entries) == 6
    for e in entries:
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 3
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert e["logprob"] == pytest.approx(tops[0])  # greedy: the chosen token is the likeliest
        assert bytes(e["bytes"]) == bytes(e["top_logprobs"][0]["bytes"])


def test_logit_bias_and_penalties_reach_sampling(server):
    body, _ = chat(server, ASK, max_tokens=5, temperature=0, logit_bias={"65": 100}, extra_body={"ignore_eos": True})
    assert body["choices"][0]["message"]["content"] == "AAAAA"
    plain, _ = chat(server, ASK, max_tokens=1, temperature=0, logprobs=True, extra_body={"ignore_eos": True})
    first = bytes(plain["choices"][0]["logprobs"]["content"][0]["bytes"])
    token = first[0] if len(first) == 1 else TOK.token_id(first.decode())  # the built-in tokenizer: a byte is its id
    banned, _ = chat(server, ASK, max_tokens=1, temperature=0, logprobs=True, logit_bias={str(token): -100}, extra_body={"ignore_eos": True})
    assert bytes(banned["choices"][0]["logprobs"]["content"][0]["bytes"]) != first
    # the penalties' arithmetic is the unit test's below; here they are taken, with the bias, in one request
    body, _ = chat(server, ASK, max_tokens=3, temperature=0, logit_bias={"65": 100}, frequency_penalty=2, presence_penalty=2,
                   extra_body={"ignore_eos": True, "repetition_penalty": 1.5})
    assert body["choices"][0]["message"]["content"] == "AAA"  # +100 outweighs every penalty here


BAD = {
    "schema": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)y"}}}}}}, "response_format.json_schema.schema"),
    "type": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frog"}}}},
             "response_format.json_schema.schema"),
    "tool parameters": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "(?<=a)b"}}}}}]}, "tools.0.function.parameters"),
    # found by the fuzzer (a 500 before): a number the grammar engine cannot serialise, in a tool's parameters
    "tool parameters out of range": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "maxLength": 103329786841365011759104}}}}}]}, "tools.0.function.parameters"),
    "unknown tool": ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "order_pizza"}}}, "tool_choice"),
    "required without tools": ({"tool_choice": "required"}, "tool_choice"),
    "n": ({"n": 9}, "n"),
    "top_logprobs": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "top_logprobs alone": ({"top_logprobs": 2}, "top_logprobs"),
    "logit_bias id": ({"logit_bias": {"100000": 1}}, "logit_bias"),
    "logit_bias value": ({"logit_bias": {"65": 101}}, "logit_bias"),
    "presence_penalty": ({"presence_penalty": 3}, "presence_penalty"),
    "repetition_penalty": ({"repetition_penalty": 5e-324}, "repetition_penalty"),  # found by the fuzzer: a 500 before it was bounded
    "functions": ({"functions": [{"name": "f"}]}, "functions"),
    "min_p": ({"min_p": 0.1}, "min_p"),
    "audio": ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_what_cannot_be_honoured_gets_a_400_naming_the_parameter(server, case):
    patch, param = BAD[case]
    r = server.post({"model": MODEL, "messages": ASK, "max_tokens": 2, **patch})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    if case in ("schema", "tool parameters"):
        assert "look-around" in error["message"]


# --- the sampler and the grammar engine's tokenizer, without a server -------------------------------------------------


def reference(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int], allowed: set[int] | None) -> list[float]:
    """Penalties, bias and mask as the README defines them, one id at a time in plain Python."""
    out = []
    for i, x in enumerate(logits):
        if p.repetition_penalty != 1.0 and (i in prompt or i in output):
            x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        count = output.count(i)
        x -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
        x += sum(b for j, b in p.logit_bias if j == i)
        out.append(x if allowed is None or i in allowed else float("-inf"))
    return out


def test_sampling_with_penalties_and_bias_equals_a_plain_reference():
    torch.manual_seed(0)
    vocab, decodable = 48, 40
    sampler = Sampler(decodable)
    logits = torch.randn(3, vocab) * 3
    prompt, output = [1, 2, 3, 5, 39], [5, 5, 7, 30, 45]
    params = [SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.7, repetition_penalty=1.3,
                             logit_bias=((4, 2.5), (7, -1.0))),
              SamplingParams(temperature=0.8, top_k=10, seed=5, frequency_penalty=-0.4, logit_bias=((0, 100.0),)),
              SamplingParams(temperature=0.0, repetition_penalty=0.7)]
    allowed = {2, 5, 7, 11, 30}
    mask = torch.zeros(2, dtype=torch.int32)
    for i in allowed:
        mask[i // 32] |= 1 << (i % 32)
    contexts = []
    for k, p in enumerate(params):
        history = TokenHistory(prompt, decodable, "cpu")
        for t in output:
            history.add(t)
        contexts.append(RowContext(history, mask if k == 2 else None))
    processed = sampler.processed(logits, params, contexts)
    for k, p in enumerate(params):
        expected = reference(logits[k, :decodable].tolist(), p, prompt, [t for t in output if t < decodable], allowed if k == 2 else None)
        assert processed[k].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    tokens = sampler(logits, params, [make_generator(p, logits.device) for p in params], contexts)
    assert tokens[0] == max(range(decodable), key=lambda i: reference(logits[0, :decodable].tolist(), params[0], prompt, output, None)[i])
    assert tokens[2] in allowed
    twice = sampler(logits, params, [make_generator(p, logits.device) for p in params], contexts)
    assert twice == tokens  # seeded
    assert torch.equal(logits, logits.clone())  # the engines' buffer is not written


def test_the_grammar_engine_reads_the_byte_level_vocabulary_and_masks_padding():
    from runtime.constrained import GrammarCompiler

    compiler = GrammarCompiler(TOK, 512)
    # each byte-level id is its byte, except 0xff: llguidance marks special tokens with that byte, which no UTF-8
    # text holds, so no grammar of text ever allows it
    assert [i for i in range(256) if compiler.tokenizer.decode_bytes([i]) != bytes([i])] == [0xff]
    assert all(compiler.tokenizer.is_special_token(i) for i in range(256, 512))
    grammar = compiler.matcher(compiler.json_schema({"type": "string", "maxLength": 2}))
    allowed = Sampler(512).processed(torch.zeros(1, 512), [SamplingParams()], [RowContext(mask=grammar.mask())])[0]
    assert torch.isfinite(allowed).nonzero().flatten().tolist() == [ord('"')]
    assert grammar.accept(ord('"')) and grammar.accept(ord("a"))
    ids = torch.isfinite(Sampler(512).processed(torch.zeros(1, 512), [SamplingParams()], [RowContext(mask=grammar.mask())])[0])
    assert not ids[TOK.vocab_size:].any()  # the padding ids past the tokenizer's never come
    # the whole mask, 512 ids: padding bits are off in the engine's own mask too
    bits = [(int(grammar.mask()[i // 32]) >> (i % 32)) & 1 for i in range(512)]
    assert not any(bits[TOK.vocab_size:]) and bits[ord('"')] and bits[ord("b")]


def test_processed_requests_do_not_speculate(server):
    """A grammar, penalties or logprobs are not applied to self-speculation's drafts: such a request decodes plainly."""
    kw = dict(max_tokens=6, temperature=0, extra_body={"exit_layer": 24, "speculative": True, "ignore_eos": True})
    plain, _ = chat(server, ASK, **kw)
    assert plain["dyngraph"]["speculation"]["drafted"] > 0
    for extra in ({"logprobs": True}, {"presence_penalty": 1.0}, {"response_format": {"type": "json_object"}}):
        body, _ = chat(server, ASK, **kw, **extra)
        assert "speculation" not in body["dyngraph"], extra
