"""`python -m runtime.serve` as a subprocess on the tiny export, driven over HTTP by the official
openai client, langchain_openai.ChatOpenAI and raw httpx: paths, batching, streaming, thinking,
greedy tokens against the eager model, bad input, limits, disconnects and draining."""
from __future__ import annotations

import base64
import http.server
import json
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from contract.manifest import Manifest

from .conftest import run_cli
from .servers import (DEPTH_POLICY, MODEL, TEXT, TOK, Server, audio_part, chat, eager_text, image_part, langchain_round_trip, png_url, user,
                      wait_for, wav_b64)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engines_dir(tiny_engines_dir) -> Path:
    return tiny_engines_dir.parent.parent


@pytest.fixture(scope="module")
def server(engines_dir, tmp_path_factory):
    s = Server(engines_dir, tmp_path_factory.mktemp("logs") / "dynamic.log", *DEPTH_POLICY, "runtime.max_batch_size=4",
               "runtime.policy.request_override=true", "runtime.prefix_cache.exact=false",  # blocks of 16: short prompts share some
               "server.max_image_pixels=1000000", "server.allowed_image_hosts=[127.0.0.1]")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def static_server(engines_dir, tmp_path_factory):
    s = Server(engines_dir, tmp_path_factory.mktemp("logs") / "static.log", env={"ENABLE_DYNAMIC_GRAPH": "False"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def strict_server(engines_dir, tmp_path_factory):
    """One slot, one queue place, a key and a small body limit."""
    s = Server(engines_dir, tmp_path_factory.mktemp("logs") / "strict.log", "server.api_key=sekret", "server.max_body_bytes=65536",
               "runtime.max_batch_size=1", "runtime.max_queue=1", "runtime.policy.force_exit=6", "runtime.offload.enabled=false")
    yield s
    s.stop()


def test_without_an_export_it_names_the_export_command(tmp_path, monkeypatch):
    result = run_cli("runtime.serve", f"engines_dir={tmp_path}", "server.port=1", timeout=120)
    assert result.returncode == 2
    assert f"export them first with `python -m pipeline export model=tiny engines_dir={tmp_path}`" in result.stderr
    from cli.serve import dynamic_graph_env

    for value, expected in (("False", False), ("0", False), ("true", True)):
        monkeypatch.setenv("ENABLE_DYNAMIC_GRAPH", value)
        assert dynamic_graph_env() is expected
    monkeypatch.setenv("ENABLE_DYNAMIC_GRAPH", "maybe")
    with pytest.raises(ValueError, match="use True or False"):
        dynamic_graph_env()


def test_the_export_command_keeps_the_preset_that_chose_the_engines():
    """+preset=phone-9b-gpu sets the model, fp16, CUDA and /data/engines: the export to suggest is that preset's."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cli.serve import CONF_DIR, export_command

    overrides = ["+preset=phone-9b-gpu", "runtime=two_gpu", "export.quantize=int8"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        app = OmegaConf.to_object(compose(config_name="serve", overrides=overrides))
    assert export_command(app, overrides) == "python -m pipeline export model=phone-9b +preset=phone-9b-gpu export.quantize=int8"
    assert export_command(app, ["paths=gpu-host"]) == "python -m pipeline export model=phone-9b paths=gpu-host"

# --- the dynamic server -------------------------------------------------------------------------------------


def test_models_lists_the_configured_id(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


@pytest.mark.parametrize("exit_layer", [6, 12, 18, 24])
def test_every_depth_gives_the_eager_models_greedy_tokens(server, tiny_model, exit_layer):
    body, headers = chat(server, [{"role": "user", "content": TEXT[exit_layer]}], max_tokens=8, temperature=0)
    path = f"exit{exit_layer}-text"
    assert headers["x-dyngraph-path"] == path
    timeline = body["dyngraph"].pop("timeline")
    assert list(timeline)[:4] == ["parse", "grammar", "tokenize", "media"] and list(timeline)[-3:] == ["head", "sample", "deliver"]
    assert body["dyngraph"] == {"path": path, "exit_layer": exit_layer, "modalities": ["text"], "mode": "dynamic",
                                "engines": ["embed", *[f"segment.{k}" for k in range(exit_layer // 6)], "lm_head"],
                                "devices": {n: "cpu" for n in ["embed", *[f"segment.{k}" for k in range(exit_layer // 6)], "lm_head"]}}
    text, n, reason = eager_text(tiny_model, TEXT[exit_layer], exit_layer, 8)
    prompt = len(TOK.apply_chat_template([{"role": "user", "content": TEXT[exit_layer]}]))
    assert body["choices"][0]["message"]["content"] == text
    assert body["choices"][0]["finish_reason"] == reason
    cached = body["usage"].pop("prompt_tokens_details")["cached_tokens"]  # whole blocks of an earlier prompt's
    assert cached % 16 == 0 and cached < prompt
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n,
                             "completion_tokens_details": {"reasoning_tokens": 0}}
    what = "full inference path (24 layers)" if exit_layer == 24 else f"early-exit path ({exit_layer} of 24 layers)"
    assert f"[DYNAMIC GRAPH] Activating {what}" in server.logs()


def test_streaming_ends_with_usage_and_path_then_done(server):
    messages = [{"role": "user", "content": TEXT[12]}]
    whole, _ = chat(server, messages, max_tokens=10, temperature=0)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": messages, "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.headers["x-dyngraph-path"] == "exit12-text"
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == whole["choices"][0]["finish_reason"]
    last = chunks[-1]
    assert last["choices"] == [] and last["dyngraph"].pop("timeline") and whole["dyngraph"].pop("timeline")
    assert last["dyngraph"] == whole["dyngraph"]
    assert last["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the same prompt again: its whole blocks but the last token's
    assert {**last["usage"], "prompt_tokens_details": None} == {**whole["usage"], "prompt_tokens_details": None}
    assert all("dyngraph" not in c for c in chunks[:-1])


def test_openai_client_streams_too(server):
    stream = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                                     stream=True, stream_options={"include_usage": True}, seed=7, temperature=0.8)
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens <= 5 and chunks[-1].model_extra["dyngraph"]["path"] == "exit6-text"


@pytest.mark.parametrize("parts, path, encoders", [
    ((image_part(png_url()),), "exit6-text+image", ["ViT encoder for image processing"]),
    ((audio_part(wav_b64(0.5)),), "exit6-text+audio", ["audio encoder for audio processing"]),
    ((image_part(png_url(300, 200)), audio_part(wav_b64(1.2, rate=8000, channels=2))), "exit6-text+image+audio",
     ["ViT encoder for image processing", "audio encoder for audio processing"]),
])
def test_image_and_audio_requests_take_their_paths(server, parts, path, encoders):
    body, headers = chat(server, user("What is this?", *parts), max_tokens=4, temperature=0)
    assert headers["x-dyngraph-path"] == path
    assert body["dyngraph"]["modalities"] == path.removeprefix("exit6-").split("+")
    assert body["dyngraph"]["engines"][0] in ("vision", "audio") and "cross_attn.0" in body["dyngraph"]["engines"]
    for encoder in encoders:
        assert f"[DYNAMIC GRAPH] Loading {encoder}" in server.logs()


def test_allow_listed_hosts_serve_remote_images(server, tmp_path):
    (tmp_path / "shot.png").write_bytes(base64.b64decode(png_url().split(",")[1]))
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        _, headers = chat(server, user("describe", image_part(f"http://127.0.0.1:{httpd.server_port}/shot.png")), max_tokens=2)
    finally:
        httpd.shutdown()
    assert headers["x-dyngraph-path"] == "exit6-text+image"


def test_thinking_is_returned_as_reasoning_content_and_capped(server):
    extra = {"enable_thinking": True, "return_reasoning": True, "max_reasoning_steps": 3, "ignore_eos": True}
    body, _ = chat(server, [{"role": "user", "content": "plan a trip"}], max_tokens=9, temperature=0, extra_body=extra)
    prompt = TOK.apply_chat_template([{"role": "user", "content": "plan a trip"}], enable_thinking=True)
    assert body["usage"]["prompt_tokens"] == len(prompt) and body["usage"]["completion_tokens"] == 9
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 4}  # 3 steps, then </think>
    assert isinstance(body["choices"][0]["message"]["reasoning_content"], str)
    stream = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "plan a trip"}], max_tokens=9,
                                                     temperature=0, stream=True, extra_body=extra)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == body["choices"][0]["message"]["reasoning_content"]
    assert "".join(d.content or "" for d in deltas) == body["choices"][0]["message"]["content"]
    # the chat_template_kwargs spelling opens the block too; without return_reasoning the reasoning stays out
    body, _ = chat(server, [{"role": "user", "content": "plan a trip"}], max_tokens=2, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert body["usage"]["prompt_tokens"] == len(prompt) and "reasoning_content" not in body["choices"][0]["message"]


def test_langchain_chat_openai_as_the_seed_configures_it(server):
    langchain_round_trip(server.url)


def test_concurrent_requests_share_decode_steps(server):
    before = server.metric("dyngraph_decode_batch_size_count") - server.metric("dyngraph_decode_batch_size_bucket", le="1.0")
    barrier = threading.Barrier(4)
    results = []

    def one(i):
        barrier.wait()
        body, _ = chat(server, [{"role": "user", "content": f"req {i}"}], max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
        results.append(body["usage"]["completion_tokens"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [60] * 4
    after = server.metric("dyngraph_decode_batch_size_count") - server.metric("dyngraph_decode_batch_size_bucket", le="1.0")
    assert after > before, "no decode step ran with batch > 1"


BAD = {
    "temperature": ({"temperature": 5}, "temperature"),
    "top_p": ({"top_p": 0}, "top_p"),
    "n": ({"n": 99}, "n"),
    "max_tokens": ({"max_tokens": 0}, "max_tokens"),
    "empty messages": ({"messages": []}, "messages"),
    "role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    "part type": ({"messages": user({"type": "video", "video": {}})}, "messages.0.content.0"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}},
              "tool_choice"),
    "logprobs": ({"top_logprobs": 2}, "top_logprobs"),
    "empty stop": ({"stop": [""]}, "stop"),
    "exit layer": ({"exit_layer": 7}, "exit_layer"),
    "image in system": ({"messages": [{"role": "system", "content": [image_part(png_url())]}]}, "messages.0.content.0"),
    "two images": ({"messages": user("a", image_part(png_url()), image_part(png_url()))}, "messages"),
    "base64": ({"messages": user("a", image_part("data:image/png;base64,@@not base64@@"))}, "messages.0.content.1.image_url.url"),
    "image bytes": ({"messages": user("a", image_part("data:image/png;base64," + base64.b64encode(b"not an image").decode()))},
                    "messages.0.content.1.image_url.url"),
    "pixels": ({"messages": user("a", image_part(png_url(1200, 1000)))}, "messages.0.content.1.image_url.url"),
    "remote image": ({"messages": user("a", image_part("https://example.com/cat.png"))}, "messages.0.content.1.image_url.url"),
    "audio bytes": ({"messages": user("a", audio_part(base64.b64encode(b"RIFF\0\0\0\0WAVEjunk").decode()))}, "messages.0.content.1.input_audio.data"),
    "audio base64": ({"messages": user("a", audio_part("%%%"))}, "messages.0.content.1.input_audio.data"),
    "audio length": ({"messages": user("a", audio_part(wav_b64(11, rate=8000)))}, "messages.0.content.1.input_audio.data"),
    "audio format": ({"messages": user("a", audio_part(wav_b64(0.1), "mp3"))}, "messages.0.content.1.input_audio.format"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_parameters_get_one_clear_400(server, case):
    patch, param = BAD[case]
    r = server.post({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **patch})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    if case == "pixels":
        assert "1200x1000 = 1200000 pixels" in error["message"]
    if case == "audio length":
        assert "11.00 s" in error["message"] and "10 s" in error["message"]


@pytest.mark.parametrize("exit_layer", [6, 24])
def test_a_request_may_choose_its_exit_where_the_server_allows(server, strict_server, exit_layer):
    body, headers = chat(server, user("what is in this picture?", image_part(png_url())), max_tokens=2, extra_body={"exit_layer": exit_layer})
    assert headers["x-dyngraph-path"] == f"exit{exit_layer}-text+image" == body["dyngraph"]["path"]
    r = strict_server.post({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "exit_layer": 6},
                           headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 400 and "runtime.policy.request_override=true" in r.json()["error"]["message"]


def test_prompt_plus_max_tokens_beyond_the_context_names_both(server):
    prompt = len(TOK.apply_chat_template([{"role": "user", "content": "hi"}]))
    r = server.post({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2100})
    assert r.status_code == 400
    assert "maximum context length is 2048 tokens" in r.json()["error"]["message"]
    assert f"({prompt} in the messages, 2100 in the completion)" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400), (b"[1, 2]", 400), (b"\xff\xfe\xfd", 400), (b"", 400), (b'{"model": 5}', 400),
    (json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404),
])
def test_malformed_requests_never_get_a_5xx(server, body, status):
    r = server.post(body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    if status == 404:
        assert r.json()["error"]["code"] == "model_not_found"


def test_unknown_routes_and_methods_get_openai_errors(server):
    assert httpx.get(f"{server.url}/v1/nope").json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server.url}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_stats_and_metrics(server):
    stats = httpx.get(f"{server.url}/stats").json()
    assert set(stats) == {"engines_loaded", "devices", "requests_per_path", "mode", "speculation", "kv_cache", "on_demand", "engine_loads",
                          "resident_engine_bytes", "prefix_cache"}
    kv = stats["kv_cache"]
    assert kv["allocated_peak_bytes"]["cpu"] >= kv["in_use_peak_bytes"]["cpu"] > 0 and kv["in_use_bytes"]["cpu"] == 0
    assert stats["mode"] == "dynamic" and stats["on_demand"] and {"embed", "segment.0", "lm_head"} <= set(stats["engines_loaded"])
    # earlier tests ran every depth and both encoders: each loaded once at least, timed
    for name in ("segment.3", "vision", "audio", "cross_attn.0"):
        assert stats["engine_loads"][name]["loads"] >= 1 and stats["engine_loads"][name]["load_seconds"] > 0, name
    manifest = Manifest.load(server.engines_dir / "tiny" / "onnx")
    assert stats["resident_engine_bytes"]["cpu"] == sum(manifest.engines[n.partition("@")[0]].bytes for n in stats["engines_loaded"])
    per_request = kv["per_request_bytes"]
    assert per_request["exit24-text"] == 4 * per_request["exit6-text"] > 0  # a row in each segment reached, nothing more
    assert stats["requests_per_path"]["exit6-text"] >= 1
    assert stats["devices"]["cpu"]["nvml_used_bytes"] is None and stats["devices"]["cpu"]["torch_peak_allocated_bytes"] > 0
    reset = httpx.post(f"{server.url}/stats/reset").json()
    # on the CPU the runtime's torch memory is its KV caches, allocated by need
    allocated = reset["kv_cache"]["allocated_bytes"]["cpu"]
    assert reset["devices"]["cpu"]["torch_peak_allocated_bytes"] == reset["devices"]["cpu"]["torch_allocated_bytes"] == allocated
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("dyngraph_requests_total", "dyngraph_request_latency_seconds_bucket", "dyngraph_time_to_first_token_seconds_count",
                 'dyngraph_tokens_total{kind="completion"}', 'dyngraph_path_requests_total{path="exit24-text"}', "dyngraph_queue_depth",
                 "dyngraph_running_requests", 'dyngraph_device_memory_bytes{device="cpu",kind="torch_allocated"}',
                 'dyngraph_engine_load_seconds_count{engine="vision"}', 'dyngraph_engine_loads_total{device="cpu",engine="segment.3"}'):
        assert name in text, name
    assert server.metric("dyngraph_requests_total", status="400") >= len(BAD)


def test_encoders_and_deep_segments_load_on_first_need_and_unload_when_idle(engines_dir, tmp_path):
    s = Server(engines_dir, tmp_path / "ondemand.log", "runtime.offload.idle_unload_s=1", "runtime.policy.request_override=true")
    try:
        stats = httpx.get(f"{s.url}/stats").json()
        assert set(stats["engines_loaded"]) == {"embed", "segment.0", "lm_head"} and stats["on_demand"]
        assert stats["kv_cache"]["allocated_bytes"]["cpu"] == 0  # no buffer before a request needs it
        body, _ = chat(s, user("What is this?", image_part(png_url())), max_tokens=3, temperature=0, extra_body={"exit_layer": 24})
        assert body["dyngraph"]["path"] == "exit24-text+image"
        assert "[DYNAMIC GRAPH] Loading ViT encoder for image processing" in s.logs()
        assert "[DYNAMIC GRAPH] Loading decoder segment (layers 18-23)" in s.logs()
        # read from the counters, not from what is resident now: on a busy machine the idle second may
        # already have passed
        stats = httpx.get(f"{s.url}/stats").json()
        full = stats["kv_cache"]["allocated_peak_bytes"]["cpu"]
        assert all(stats["engine_loads"][name]["loads"] == 1 for name in ("vision", "cross_attn.3", "segment.3")) and full > 0
        assert s.metric("dyngraph_engine_load_seconds_count", engine="vision") == 1
        wait_for(lambda: len(httpx.get(f"{s.url}/stats").json()["engines_loaded"]) == 3, timeout=60)
        stats = httpx.get(f"{s.url}/stats").json()
        assert set(stats["engines_loaded"]) == {"embed", "segment.0", "lm_head"}
        assert stats["kv_cache"]["allocated_bytes"]["cpu"] == full // 4  # segment 0's buffer only: it stays with its engine
        assert s.metric("dyngraph_engine_unloads_total", engine="vision", reason="idle") == 1
        assert stats["resident_engine_bytes"]["cpu"] == sum(Manifest.load(engines_dir / "tiny" / "onnx").engines[n].bytes
                                                            for n in ("embed", "segment.0", "lm_head"))
        again, _ = chat(s, user("What is this?", image_part(png_url())), max_tokens=3, temperature=0, extra_body={"exit_layer": 24})
        assert again["choices"][0]["message"] == body["choices"][0]["message"]  # reloaded: the same greedy answer
        assert httpx.get(f"{s.url}/stats").json()["engine_loads"]["vision"]["loads"] == 2
    finally:
        s.stop()


def test_a_budget_smaller_than_an_engine_is_refused_at_start_up(engines_dir):
    out = run_cli("runtime.serve", f"engines_dir={engines_dir}", "runtime.offload.gpu_memory_budget_gb=0.0001", timeout=120)
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if "cannot serve" in ln]
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    line = lines[0]
    assert re.search(r"gpu_memory_budget_gb=0\.0001 \(0\.1 MiB on cpu\) is smaller than engine \S+ \(\d+\.\d MiB\)", line), line


def test_offload_off_loads_every_engine_at_start(strict_server):
    stats = httpx.get(f"{strict_server.url}/stats", headers={"Authorization": "Bearer sekret"}).json()
    assert not stats["on_demand"] and {"vision", "audio", "segment.3", "cross_attn.3"} <= set(stats["engines_loaded"])


# --- static mode ---------------------------------------------------------------------------------------------


def test_static_mode_runs_the_full_graph_for_everything(static_server, tiny_model):
    body, headers = chat(static_server, [{"role": "user", "content": TEXT[6]}], max_tokens=6, temperature=0)
    assert headers["x-dyngraph-path"] == "static"
    every = ["vision", "audio", *(f"cross_kv.{k}" for k in range(4)), "embed",
             *(f"{e}.{k}" for k in range(4) for e in ("cross_attn", "segment")), "lm_head"]
    assert body["dyngraph"].pop("timeline")
    assert body["dyngraph"] == {"path": "static", "exit_layer": 24, "modalities": ["text"], "engines": every,
                                "devices": dict.fromkeys(every, "cpu"), "mode": "static"}
    assert body["choices"][0]["message"]["content"] == eager_text(tiny_model, TEXT[6], 24, 6)[0]
    body, _ = chat(static_server, user("look and listen", image_part(png_url()), audio_part(wav_b64(0.3))), max_tokens=3)
    assert body["dyngraph"]["path"] == "static" and body["dyngraph"]["modalities"] == ["text", "image", "audio"]
    assert httpx.get(f"{static_server.url}/stats").json()["mode"] == "static"


# --- limits, keys, disconnects, draining ----------------------------------------------------------------------

KEY = {"authorization": "Bearer sekret"}
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "max_tokens": 1900, "ignore_eos": True, "temperature": 0}


def test_api_key_is_required_where_set(strict_server):
    with pytest.raises(openai.AuthenticationError):
        strict_server.client("wrong").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    r = strict_server.post({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{strict_server.url}/stats").status_code == 401
    assert httpx.get(f"{strict_server.url}/health").status_code == 200
    ok = strict_server.client("sekret").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.usage.completion_tokens <= 2


def test_bodies_over_the_limit_get_413(strict_server):
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 70_000}]}
    r = strict_server.post(big, KEY)
    assert r.status_code == 413 and "65536" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: counted while read
        yield json.dumps(big).encode()

    r = httpx.post(f"{strict_server.url}/v1/chat/completions", content=chunked(), headers={**KEY, "content-type": "application/json"})
    assert r.status_code == 413


def test_a_full_queue_gets_429_with_retry_after(strict_server):
    with httpx.stream("POST", f"{strict_server.url}/v1/chat/completions", json={**LONG, "stream": True}, headers=KEY, timeout=60) as long:
        lines = long.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)  # generating: the only slot is taken
        queued = []
        waiter = threading.Thread(target=lambda: queued.append(strict_server.post(
            {"model": MODEL, "messages": [{"role": "user", "content": "next"}], "max_tokens": 2}, KEY)))
        waiter.start()
        wait_for(lambda: strict_server.metric("dyngraph_queue_depth") == 1)
        r = strict_server.post({"model": MODEL, "messages": [{"role": "user", "content": "one more"}], "max_tokens": 2}, KEY)
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    waiter.join(timeout=30)  # leaving the stream freed the slot for the queued request
    assert queued[0].status_code == 200


def test_a_client_that_disconnects_frees_its_slot(strict_server):
    with httpx.stream("POST", f"{strict_server.url}/v1/chat/completions", json={**LONG, "stream": True}, headers=KEY, timeout=60) as r:
        next(r.iter_lines())
    with pytest.raises(httpx.TimeoutException):  # a non-streaming client that gives up
        strict_server.post(LONG, KEY, timeout=0.5)
    wait_for(lambda: strict_server.metric("dyngraph_running_requests") == 0)
    assert strict_server.logs().count("tokens: slot freed") >= 2
    r = strict_server.post({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, KEY, timeout=10)
    assert r.status_code == 200


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(strict_server):
    body = {**LONG, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{strict_server.url}/v1/chat/completions", json=body, headers=KEY, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        strict_server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{strict_server.url}/health").status_code == 503)
        refused = strict_server.post({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, KEY)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert json.loads(data[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    assert strict_server.proc.wait(timeout=30) == 0


def test_probe_runs_one_request_per_path(server, tmp_path):
    out = tmp_path / "probe.json"
    result = run_cli("runtime.probe", "--url", server.url, "--exits", "6", "24", "--max-tokens", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [r["path"] for r in rows] == [f"exit{e}-{m}" for e in (6, 24) for m in ("text", "text+image", "text+audio", "text+image+audio")]
    assert all(r["completion_tokens"] == 3 and set(r["devices"].values()) == {"cpu"} for r in rows)
    # against its own output, one token of the first path changed: greedy reproduces every other token
    rows[0]["tokens"][0] = "\u2603"
    (tmp_path / "reference.json").write_text(json.dumps(rows))
    again = run_cli("runtime.probe", "--url", server.url, "--exits", "6", "24", "--max-tokens", "3", "--out", str(out),
                    "--reference", str(tmp_path / "reference.json"))
    assert again.returncode == 0, again.stderr
    compared = json.loads(out.read_text())
    assert [r["agreement"] for r in compared] == [2 / 3] + [1.0] * 7
    assert f"token agreement with {tmp_path / 'reference.json'}: 95.8% over 24 tokens" in again.stdout


def test_probe_refuses_a_reference_that_is_not_a_probe(tmp_path):
    bad = tmp_path / "stats.json"
    bad.write_text('{"engine_loads": {}}')
    result = run_cli("runtime.probe", "--url", "http://127.0.0.1:9", "--reference", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"--reference {bad}: not the --out of a probe (a list of rows with path and tokens)"


def test_streaming_sends_a_chunk_per_token(server):
    """Token timing is visible to clients even while bytes do not yet decode to text."""
    from serving.chat import sse_json

    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    chunks = [json.loads(line) for line in lines]
    token_chunks = [c for c in chunks if c["choices"] and "role" not in c["choices"][0]["delta"]
                    and "content" in c["choices"][0]["delta"]]
    assert len(token_chunks) == chunks[-1]["usage"]["completion_tokens"] == 7
    # a token's chunk (made from a template) is written as the others are (through the protocol models): the
    # same fields in the same order, the same id and timestamp, the same JSON text for the same content
    assert all(line == sse_json(c) for line, c in zip(lines, chunks))
    first = chunks[0]
    for c in token_chunks:
        assert list(c) == list(first) and list(c["choices"][0]) == list(first["choices"][0])
        assert (c["id"], c["created"], c["model"]) == (first["id"], first["created"], first["model"])


def test_the_timeline_adds_up_to_the_time_to_first_token_the_client_sees(server):
    """The parts of the streamed answer's timeline, from the request's arrival to its first token's chunk
    sent, sum to what the client measures from sending to receiving that chunk, less the transport (the
    request's bytes in, the chunk's way back), which the server cannot see. Stated tolerance: 50 ms on
    this loopback over a kept-alive connection, where the transport takes a few."""
    system = "You are a phone agent. " * 20  # a shared prefix: the second request reuses its blocks
    client = httpx.Client(base_url=server.url, timeout=60)
    client.get("/health")  # the connection is made before the clock starts
    for user_text in ("Open the camera", "Open the gallery"):
        body = {"model": MODEL, "messages": [{"role": "system", "content": system}, {"role": "user", "content": user_text}],
                "max_tokens": 4, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "exit_layer": 24}
        sent = time.perf_counter()
        first = None
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            chunks = []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    delta = chunks[-1]["choices"][0]["delta"] if chunks[-1]["choices"] else {}
                    if first is None and "content" in delta and "role" not in delta:
                        first = time.perf_counter() - sent
        timeline = chunks[-1]["dyngraph"]["timeline"]
        assert [p for p in timeline if p != "load"] == ["parse", "grammar", "tokenize", "media", "queue", "embed",
                                  *(f"segment.{k}" for k in range(4)), "head", "sample", "deliver", "write"]
        total = sum(timeline.values()) / 1e3
        assert first - 0.05 <= total <= first
    client.close()
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16 * 5
    assert server.metric("dyngraph_time_to_first_token_part_seconds_count", part="segment.3") >= 2
    assert server.metric("dyngraph_prefix_cache_tokens_total", kind="cached") >= 16 * 5
    stats = httpx.get(f"{server.url}/stats").json()["prefix_cache"]
    assert stats["blocks"] > 0 and stats["used_bytes"]["cpu"] > 0


# --- request limits, rate limit per key, slow clients --------------------------------------------------------

ALICE, BOB = {"authorization": "Bearer alice"}, {"authorization": "Bearer bob"}


@pytest.fixture(scope="module")
def limits_server(engines_dir, tmp_path_factory):
    """Small limits, two users' keys with a rate limit each (bursts of 20, then one request per 5 s),
    one generation slot and no queue, and short deadlines for slow clients."""
    s = Server(engines_dir, tmp_path_factory.mktemp("logs") / "limits.log", "server.api_keys=[alice,bob]",
               "server.max_messages=4", "server.max_content_parts=3", "server.max_characters=2000", "server.max_stop=2",
               "server.max_stop_chars=8", "server.max_audio_seconds=1.0",
               "server.rate_limit.per_second=0.2", "server.rate_limit.burst=20",
               "server.header_timeout_s=1.5", "server.body_timeout_s=1.5", "runtime.max_batch_size=1", "runtime.max_queue=0")
    yield s
    s.stop()


OVER = {
    "messages": ({"messages": [{"role": "user", "content": "hi"}] * 5}, "messages", "array_above_max_length", "5 messages; at most 4"),
    "parts": ({"messages": user("a", "b", "c", "d")}, "messages.0.content", "array_above_max_length", "4 parts; at most 3"),
    "characters": ({"messages": [{"role": "system", "content": "x" * 1500}, {"role": "user", "content": "y" * 501}]}, "messages",
                   "string_above_max_length", "2001 characters of text; at most 2000"),
    "stop count": ({"stop": ["a", "b", "c"]}, "stop", "array_above_max_length", "3 stop strings; at most 2"),
    "stop length": ({"stop": ["123456789"]}, "stop", "string_above_max_length", "9 characters; at most 8"),
    "images": ({"messages": user("a", image_part(png_url()), image_part(png_url()))}, "messages", None, "2 images; at most 1"),
    "audio seconds": ({"messages": user("a", audio_part(wav_b64(1.5)))}, "messages.0.content.1.input_audio.data", "invalid_media",
                      "1.50 s of audio, over the limit of 1 s"),
    "max_tokens": ({"max_tokens": 2045}, "max_tokens", "context_length_exceeded", "maximum context length is 2048 tokens"),
}


@pytest.mark.parametrize("case", list(OVER))
def test_each_limit_is_configurable_and_answered_with_a_400(limits_server, case):
    patch, param, code, words = OVER[case]
    r = limits_server.post({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **patch}, ALICE)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == code, r.json()
    assert words in r.json()["error"]["message"]


def test_within_the_limits_the_same_server_answers(limits_server):
    messages = [{"role": "system", "content": "x" * 1000}, *user("a", "b", image_part(png_url())), {"role": "assistant", "content": "c"},
                *user("y" * 990, audio_part(wav_b64(0.9)))]
    r = limits_server.post({"model": MODEL, "messages": messages, "max_tokens": 2, "stop": ["12345678", "z"]}, ALICE)
    assert r.status_code == 200, r.text
    assert r.json()["dyngraph"]["modalities"] == ["text", "image", "audio"]


def test_each_key_has_its_own_rate_limit(limits_server):
    before = limits_server.metric("dyngraph_rate_limited_total", client="key")
    wrong_model = {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}  # answered at once: only the bucket matters
    statuses = [limits_server.post(wrong_model, BOB).status_code for _ in range(21)]
    assert statuses == [404] * 20 + [429]
    r = limits_server.post(wrong_model, BOB)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["retry-after"]) <= 5 and "per API key" in r.json()["error"]["message"]
    assert limits_server.post(wrong_model, ALICE).status_code == 404  # alice's bucket is her own
    assert limits_server.metric("dyngraph_rate_limited_total", client="key") == before + 2
    assert limits_server.metric("dyngraph_requests_total", status="429") >= 2


def test_a_bucket_refills_when_retry_after_says():
    # the bucket takes the time it is asked at: a fake clock, not the seconds of a real Retry-After
    from serving.app import TokenBuckets
    from serving.config import RateLimitConfig

    buckets = TokenBuckets(RateLimitConfig(per_second=0.2, burst=2))
    assert buckets.take("bob", 100.0) == 0 and buckets.take("bob", 100.0) == 0
    wait = buckets.take("bob", 100.0)
    assert wait == pytest.approx(5.0) and buckets.take("alice", 100.0) == 0  # her bucket is her own
    assert buckets.take("bob", 104.0) == pytest.approx(1.0)  # 4 s in: 0.8 of a token, 1 s to go
    assert buckets.take("bob", 105.0) == 0  # refilled as Retry-After said


def test_without_keys_the_rate_limit_is_per_client_address():
    """The Guard middleware itself, in process: the same ASGI app behind it, two client addresses."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from serving.config import RateLimitConfig, ServerConfig
    from runtime.metrics import Metrics
    from serving.app import Guard

    async def ok(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/v1/chat/completions", ok, methods=["POST"]), Route("/v1/models", ok)])
    metrics = Metrics(1)
    guard = Guard(app, ServerConfig(rate_limit=RateLimitConfig(per_second=0.01, burst=2)), metrics)

    async def statuses(address: str, route: str = "/v1/chat/completions", method: str = "POST") -> list[int]:
        transport = httpx.ASGITransport(app=guard, client=(address, 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [(await client.request(method, route)).status_code for _ in range(3)]

    import asyncio

    assert asyncio.run(statuses("10.0.0.1")) == [200, 200, 429]
    assert asyncio.run(statuses("10.0.0.2")) == [200, 200, 429]
    assert asyncio.run(statuses("10.0.0.1", "/v1/models", "GET")) == [200, 200, 200]  # only chat completions are limited
    assert metrics.rate_limited.labels("address")._value.get() == 2


def raw_request(port: int, chunks: list[bytes], pause_s: float) -> tuple[bytes, float]:
    """Send `chunks` pausing between them, as a slow client would; return what came back and when the server closed."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
                time.sleep(pause_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server hung up on us: what it said is still in the socket
        received = b""
        try:
            while data := sock.recv(65536):
                received += data
        except ConnectionResetError:
            pass
    return received, time.monotonic() - t0


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_slow_clients_are_cut_off_without_holding_a_slot(limits_server, phase):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    head = [b"POST /v1/chat/completions HTTP/1.1\r\n", b"host: 127.0.0.1\r\n", b"authorization: Bearer alice\r\n",
            b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body)]
    # headers: one line every 0.4 s, the last never; body: the headers at once, then a byte every 0.4 s
    chunks = [*head, b"x-slow: 1\r\n"] * 3 if phase == "headers" else [b"".join(head) + b"\r\n", *[body[i:i + 1] for i in range(10)]]
    before = limits_server.metric("dyngraph_client_timeouts_total", phase=phase)
    slow: list[tuple[bytes, float]] = []
    threads = [threading.Thread(target=lambda: slow.append(raw_request(limits_server.port, chunks, 0.4))) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    # the only slot and no queue: a slow client holding the slot would make this a 429
    r = limits_server.post({"model": MODEL, "messages": [{"role": "user", "content": "quick"}], "max_tokens": 2}, ALICE, timeout=10)
    assert r.status_code == 200, r.text
    for t in threads:
        t.join(timeout=20)
    for received, seconds in slow:
        assert received.startswith(b"HTTP/1.1 408"), received[:200]
        error = json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "request_timeout" and f"server.{phase.removesuffix('s')}_timeout_s" in error["message"]
        assert 1.4 < seconds < 4.0, seconds  # cut off at the deadline, not when the client gave up
    assert limits_server.metric("dyngraph_client_timeouts_total", phase=phase) == before + 2
    assert limits_server.metric("dyngraph_running_requests") == 0


def test_stream_chunks_survive_line_splitters_whatever_the_text():
    """A sampled token may decode to NEL, U+2028 or U+2029, which JSON leaves raw and httpx's
    aiter_lines (like str.splitlines) takes for line ends: found by the soak, two chunks cut in half."""
    from httpx._decoders import LineDecoder

    from serving.chat import sse_json, sse_string

    text = "a\x85b\u2028c\u2029d\r\ne 打开微信"
    chunk = {"choices": [{"delta": {"content": text}}]}
    lines = LineDecoder().decode(f"data: {sse_json(chunk)}\n\n")
    assert lines[1:] == [""] and json.loads(lines[0].removeprefix("data: ")) == chunk
    assert "打开微信" in sse_json(chunk)  # still UTF-8, not \\u-escaped throughout
    assert sse_json(chunk) == '{"choices": [{"delta": {"content": ' + sse_string(text) + '}}]}'  # a token's text in a template
