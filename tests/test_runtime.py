"""The serving runtime in-process on the tiny export: engine chains against the eager model, KV slots,
continuous batching, policies, sampling, offloading, verification and placement."""
from __future__ import annotations

import asyncio
import io
import logging
import re
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from model.multimodal.audio import AudioArgs
from model.tokenizer import ChatTokenizer
from contract.manifest import Manifest
from bench.workload import encode_wav, synth_sound
from runtime.config import OffloadConfig, PlacementConfig, PolicyConfig, PrefixCacheConfig, RuntimeConfig
from runtime.engines import EngineMismatch, EngineSet
from runtime.generation import GenerationEngine
from runtime.requests import Failed, Finished, GenerationRequest, Started
from serving.media import MediaLimits, decode_audio, decode_image
from runtime.metrics import Metrics
from runtime.placement import Placement, PlacementError
from runtime.policy import DepthPolicy, PolicyError, PolicyInput
from runtime.sampling import Sampler, SamplingParams, make_generator
from runtime.step import batch_buckets, bucket_for
from runtime.text import Delta, TextStream

EXITS = [6, 12, 18, 24]
GREEDY = SamplingParams(temperature=0.0)
LIMITS = MediaLimits(10_000_000, 10.0, 1 << 20, frozenset(), 1.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer.builtin()


@pytest.fixture(scope="module")
def engines(tiny_engines_dir) -> EngineSet:
    return EngineSet(tiny_engines_dir)


@pytest.fixture(scope="module")
def media():
    """An image and a clip, preprocessed the way the server does it."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    png = io.BytesIO()
    image.save(png, format="PNG")
    pixels = decode_image(png.getvalue(), LIMITS, 224, "image")[None]
    return pixels, decode_audio(encode_wav(synth_sound("tone", 0.7, np.random.default_rng(0))), "wav", LIMITS, AudioArgs(max_seconds=10.0), "audio")


def make_engine(engines: EngineSet, tok: ChatTokenizer, draft_engines: EngineSet | None = None, **runtime) -> GenerationEngine:
    cfg = RuntimeConfig(**runtime)
    return GenerationEngine(engines, Placement(cfg.placement, engines.manifest), tok, cfg, Metrics(cfg.max_batch_size), draft_engines)


class Running:
    """A started GenerationEngine and a way to drive it from synchronous tests."""

    def __init__(self, engine: GenerationEngine):
        self.engine, self.metrics = engine, engine.metrics
        engine.start()

    def run(self, *requests: GenerationRequest, cancel_when_started: bool = False) -> list[list]:
        async def one(request):
            handle = self.engine.submit(request, asyncio.get_running_loop())
            events = []
            while not events or not isinstance(events[-1], (Finished, Failed)):
                events.append(await handle.next())
                if cancel_when_started and isinstance(events[-1], Started):
                    self.engine.cancel(handle)
                    return events
            return events

        async def main():
            return await asyncio.gather(*(one(r) for r in requests))

        return asyncio.run(main())

    def tokens(self, *requests: GenerationRequest) -> list[tuple[str, tuple[int, ...]]]:
        """(path name, token ids) per request."""
        return [(next(e for e in ev if isinstance(e, Started)).path.name, ev[-1].token_ids) for ev in self.run(*requests)]

    def steps(self) -> tuple[float, float]:
        """Decode steps so far: (all, those that ran more than one sequence)."""
        samples = {s.labels["le"]: s.value for s in self.metrics.decode_batch.collect()[0].samples if s.name.endswith("_bucket")}
        return samples["+Inf"], samples["+Inf"] - samples["1.0"]

    def close(self):
        self.engine.stop()


@pytest.fixture
def running(engines, tok):
    started = []

    def start(**runtime) -> Running:
        started.append(Running(make_engine(engines, tok, **runtime)))
        return started[-1]

    yield start
    for r in started:
        r.close()


def request(tok, text: str, n: int = 6, modalities=("text",), pixels=None, mel=None, **kw) -> GenerationRequest:
    prompt = tok.apply_chat_template([{"role": "user", "content": text}])
    return GenerationRequest(prompt, n, modalities, pixels, mel, kw.pop("sampling", GREEDY), **kw)


def eager_greedy(model, tok, prompt: list[int], exit_layer: int, n: int, pixels=None, mel=None) -> tuple[int, ...]:
    ids, out = torch.tensor([prompt]), []
    with torch.inference_mode():
        media, mask = model.encode_media(pixels, mel)
        for _ in range(n):
            token = int(model(ids, exit_layer, media, mask)[0, -1, :tok.vocab_size].argmax())
            out.append(token)
            if token in tok.eos_ids:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tuple(out)


def forced(exit_layer: int) -> dict:
    return {"policy": PolicyConfig(force_exit=exit_layer)}


# --- the engine chain against the eager model ---------------------------------------------------------


@pytest.mark.parametrize("exit_layer", EXITS)
def test_greedy_tokens_equal_the_eager_model_at_every_depth(exit_layer, running, tok, tiny_model, media):
    r = running(**forced(exit_layer))
    pixels, mel = media
    cases = [("text",), ("text", "image"), ("text", "audio"), ("text", "image", "audio")]
    for modalities in cases:
        p = pixels if "image" in modalities else None
        m = mel if "audio" in modalities else None
        req = request(tok, "Which app shows the weather?", 6, modalities, p, m)
        (path, tokens), = r.tokens(req)
        assert path == f"exit{exit_layer}-" + "+".join(modalities)
        assert tokens == eager_greedy(tiny_model, tok, req.prompt_ids, exit_layer, 6, p, m), path


def test_static_mode_equals_the_full_depth_model(running, tok, tiny_model, media):
    r = running(mode="static")
    pixels, _ = media
    text = request(tok, "Open the settings", 6)
    image = request(tok, "What is on the screen?", 6, ("text", "image"), pixels)
    (path_a, a), (path_b, b) = r.tokens(text, image)
    assert path_a == path_b == "static"
    assert a == eager_greedy(tiny_model, tok, text.prompt_ids, 24, 6)
    assert b == eager_greedy(tiny_model, tok, image.prompt_ids, 24, 6, pixels)


def test_chunked_prefill_equals_one_forward(running, tok, tiny_model):
    r = running(**forced(12))
    r.engine.stepper.chunk = 5  # a 40-token prompt in 8 chunks, each attending to the cache of the ones before
    req = request(tok, "a prompt long enough for several chunks", 5)
    (_, tokens), = r.tokens(req)
    assert tokens == eager_greedy(tiny_model, tok, req.prompt_ids, 12, 5)


@pytest.mark.parametrize("exit_layer", [6, 24])
def test_padded_prefill_gives_the_eager_models_tokens(running, tok, tiny_model, media, exit_layer):
    """Prompt chunks padded to the next prefill length (runtime.prefill_padding): the padding follows
    the chunk, so no real position attends to it, and its cache entries lie past the row's length."""
    r = running(prefill_padding=True, **forced(exit_layer))
    assert r.engine.stepper.prefill_lengths == [16, 32, 64, 128, 256, 512]
    assert all(not c.members for c in r.engine.stepper.caches)  # the start-up warm-up gave its rows back
    pixels, mel = media
    for modalities in (("text",), ("text", "image", "audio")):
        media_args = (pixels, mel) if len(modalities) > 1 else (None, None)
        req = request(tok, "a prompt of a few dozen tokens, padded to the next prefill length", 5, modalities, *media_args)
        (_, tokens), = r.tokens(req)
        assert tokens == eager_greedy(tiny_model, tok, req.prompt_ids, exit_layer, 5, *media_args)


def test_the_eager_reference_backend_gives_the_same_tokens(tiny_engines_dir, tok, media, running):
    pixels, _ = media
    reqs = [request(tok, "Open the settings", 5), request(tok, "What is on the screen?", 5, ("text", "image"), pixels)]
    for runtime in (forced(12), {"mode": "static"}):
        onnx = running(**runtime).tokens(*reqs)
        eager = Running(make_engine(EngineSet(tiny_engines_dir, backend="eager"), tok, **runtime))
        try:
            assert eager.tokens(*reqs) == onnx
        finally:
            eager.close()


# --- continuous batching ---------------------------------------------------------------------------------


def test_concurrent_requests_share_decode_steps_and_keep_their_tokens(running, tok, media):
    r = running(**forced(24), max_batch_size=4)
    _, mel = media
    short_mel = mel[..., :24]  # another media length: the batch pads cross-attention keys and masks them
    reqs = [request(tok, "hi", 12, ignore_eos=True), request(tok, "a much longer prompt than the first", 12, ignore_eos=True),
            request(tok, "mid-size prompt", 12, ignore_eos=True),
            request(tok, "listen", 10, ("text", "audio"), mel=mel, ignore_eos=True),
            request(tok, "listen again", 10, ("text", "audio"), mel=short_mel, ignore_eos=True)]
    alone = [r.tokens(q)[0] for q in reqs]
    assert r.steps()[1] == 0
    together = r.tokens(*reqs)
    assert together == alone
    assert r.steps()[1] > 0, "no decode step ran with batch > 1"


def test_requests_on_different_paths_share_the_segments_they_have_in_common(running, tok, media, tiny_model):
    """An exit-6, an exit-12 with an image and an exit-24 request decode together: segment.0 runs
    once per step for all three, and each still gets its own path's tokens."""
    r = running(max_batch_size=4, policy=PolicyConfig(request_override=True))
    pixels, _ = media
    reqs = [request(tok, "hi", 10, ignore_eos=True, exit_layer=6),
            request(tok, "look at this", 10, ("text", "image"), pixels=pixels, ignore_eos=True, exit_layer=12),
            request(tok, "a longer prompt for the deepest path", 10, ignore_eos=True, exit_layer=24)]
    together = r.tokens(*reqs)
    assert [p for p, _ in together] == ["exit6-text", "exit12-text+image", "exit24-text"]
    for (_, tokens), q in zip(together, reqs):
        eager = eager_greedy(tiny_model, tok, q.prompt_ids, q.exit_layer, 10, q.pixel_values)  # stops at an EOS
        assert tokens[:len(eager)] == eager
    assert r.steps()[1] > 0, "no decode step ran with batch > 1"


@pytest.mark.parametrize("asynchronous", [False, True])
def test_events_handed_over_while_the_next_step_runs_come_whole_and_in_order(running, tok, asynchronous):
    """A step's events wait until the next step's engines run (on the CPU right before its segment 0,
    on a GPU once it is queued: Stepper.asynchronous, forced here on the CPU), so that the handlers
    take the GIL while the engines compute: requests of different lengths that finish while others
    decode each get Started, an event per token and Finished, the events they get alone."""
    reqs = [request(tok, "hi", 5, ignore_eos=True), request(tok, "a longer prompt than the first", 11, ignore_eos=True),
            request(tok, "mid-size prompt", 8, ignore_eos=True, stop=("zq",))]
    r = running(**forced(12), max_batch_size=4, prefix_cache=PrefixCacheConfig(enabled=False))  # the same Finished, cache hits aside
    r.engine.stepper.asynchronous = asynchronous
    alone = [r.run(q)[0] for q in reqs]
    for events, expected in zip(r.run(*reqs), alone, strict=True):
        assert isinstance(events[0], Started) and isinstance(events[-1], Finished) and events[-1] == expected[-1]
        assert [e.token for e in events if isinstance(e, Delta) and e.token is not None] == list(events[-1].token_ids)
        assert [(type(e), getattr(e, "content", None)) for e in events] == [(type(e), getattr(e, "content", None)) for e in expected]
    assert r.steps()[1] > 0 and not r.engine.outbox


def test_a_cancelled_request_frees_its_slot(running, tok, caplog):
    r = running(**forced(6), max_batch_size=1)
    with caplog.at_level(logging.INFO, logger="dyngraph.runtime"):
        events, = r.run(request(tok, "count to a thousand", 1000, ignore_eos=True), cancel_when_started=True)
        (_, tokens), = r.tokens(request(tok, "next", 3))  # the only slot is free again
    assert isinstance(events[-1], Started)
    assert len(tokens) <= 3 and r.engine.active == 0 and r.engine.kv_in_use["cpu"] == 0
    assert "cancelled after" in caplog.text


def test_kv_rows_are_held_by_depth(running, tok):
    peaks = {}
    for exit_layer in (6, 24):
        r = running(**forced(exit_layer))
        r.tokens(request(tok, "same prompt", 4, ignore_eos=True))
        peaks[exit_layer] = r.engine.kv_in_use_peak["cpu"]
        assert r.engine.kv_in_use["cpu"] == 0  # freed with the request
    capacity = r.engine.context_len  # a row holds the whole context: the buffers are fixed, and written in place
    per_layer = 2 * 2 * capacity * 32 * 4  # k and v, 2 kv heads, capacity, head_dim 32, fp32
    assert peaks == {6: 6 * per_layer, 24: 24 * per_layer}


# --- policies ----------------------------------------------------------------------------------------------


def test_confidence_policy_stops_at_the_first_sure_exit(running, tok, tiny_model):
    sure = running(policy=PolicyConfig(name="confidence", confidence=0.0))
    unsure = running(policy=PolicyConfig(name="confidence", confidence=1.0))
    req = request(tok, "Tap the blue button", 4)
    (path6, tokens6), = sure.tokens(req)
    (path24, tokens24), = unsure.tokens(req)
    assert (path6, path24) == ("exit6-text", "exit24-text")
    assert tokens6 == eager_greedy(tiny_model, tok, req.prompt_ids, 6, 4)
    assert tokens24 == eager_greedy(tiny_model, tok, req.prompt_ids, 24, 4)


def test_heuristic_policy_scores_length_questions_and_media():
    policy = DepthPolicy(PolicyConfig(thresholds=[0.2, 0.4, 0.6], length_chars=400, length_weight=0.4,
                                      question_weight=0.3, image_weight=0.3, audio_weight=0.2), EXITS)
    decide = lambda text, mods=("text",): policy.decide(PolicyInput(text, mods)).exit_layer  # noqa: E731
    assert decide("打开微信") == 6  # a command: length only, 0.004
    assert decide("你是谁?") == 6  # half the question weight: 0.15
    assert decide("why is the sky blue?") == 12  # a reasoning cue: 0.32
    assert decide("why is the sky blue?", ("text", "image")) == 24  # 0.62
    assert decide("what is in this chart?", ("text", "image")) == 18  # 0.47
    assert decide("请分析" + "这个任务的每一个步骤" * 40) == 24  # long and analytical: 0.7
    assert decide("open settings " * 40) == 18  # long, no question: 0.4 reaches the second threshold
    assert DepthPolicy(PolicyConfig(force_exit=18), EXITS).decide(PolicyInput("", ("text",))).exit_layer == 18
    with pytest.raises(PolicyError, match="force_exit=7"):
        DepthPolicy(PolicyConfig(force_exit=7), EXITS)
    with pytest.raises(PolicyError, match="thresholds"):
        DepthPolicy(PolicyConfig(thresholds=[0.5, 0.2, 0.9]), EXITS)


# --- text, thinking, sampling ------------------------------------------------------------------------------


def test_thinking_is_capped_then_closed(running, tok):
    r = running(**forced(6))
    prompt = tok.apply_chat_template([{"role": "user", "content": "plan"}], enable_thinking=True)
    req = GenerationRequest(prompt, 10, sampling=GREEDY, thinking=True, max_reasoning_steps=3, ignore_eos=True)
    events, = r.run(req)
    done = events[-1]
    assert done.token_ids[3] == tok.token_id("</think>") and done.reasoning_tokens == 4
    assert done.completion_tokens == 10


def test_stop_strings_cut_the_answer_and_hold_back_prefixes(tok):
    stream = TextStream(tok, ("o w", "!!"), thinking=False, think_end=None)
    out, stopped = [], False
    for token in tok.encode("hello world"):
        delta, stopped = stream.add(token)
        out.append(delta.content)
        if stopped:
            break
    assert "".join(out) == "hell" and stopped
    stream = TextStream(tok, ("xyz",), thinking=True, think_end=tok.token_id("</think>"))
    deltas = [stream.add(t)[0] for t in [*tok.encode("xyz"), tok.token_id("</think>"), *tok.encode("axy")]]
    assert "".join(d.reasoning for d in deltas) == "xyz"  # stop strings apply to the answer only
    assert "".join(d.content for d in deltas) == "a" and stream.flush().content == "xy"


def test_sampling_never_picks_an_id_the_tokenizer_cannot_decode(tok):
    sampler = Sampler(tok.vocab_size)
    logits = torch.zeros(3, 512)
    logits[:, 400] = 100.0  # past the tokenizer's 272 ids
    logits[:, 7] = 5.0
    params = [GREEDY, SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=0.7, top_p=0.1, seed=3)]
    assert sampler(logits, params, [make_generator(p, logits.device) for p in params]) == [7, 7, 7]
    free = SamplingParams(temperature=1.5, seed=11)
    draws = [sampler(torch.zeros(1, 512), [free], [make_generator(free, torch.device("cpu"))])[0] for _ in range(2)]
    assert draws[0] == draws[1] and 0 <= draws[0] < tok.vocab_size  # the seed reproduces the draw


# --- loading: offload, verification, placement ------------------------------------------------------------


def test_offload_keeps_engines_under_the_budget_with_lru_eviction(tiny_engines_dir, tok, tiny_model, caplog):
    """Reloads after eviction, from host copies, give the same greedy tokens as the eager model."""
    manifest = Manifest.load(tiny_engines_dir)
    segment = manifest.engines["segment.0"].bytes
    budget = 2 * segment + manifest.engines["embed"].bytes + manifest.engines["lm_head"].bytes + 4096
    unloads = []
    engines = EngineSet(tiny_engines_dir, budget_bytes={"cpu": budget}, host_copy=lambda device: True,
                        on_unload=lambda name, device, reason: unloads.append((name, reason)))
    engine = make_engine(engines, tok, offload=OffloadConfig(enabled=True, gpu_memory_budget_gb=budget / 2**30), **forced(24))
    with caplog.at_level(logging.INFO):
        engine.warm_up()
        assert set(engines.loaded()) == {"embed", "segment.0", "lm_head"}  # nothing deeper until a request needs it
        r = Running(engine)
        try:
            req = request(tok, "deep request", 4)
            (_, tokens), = r.tokens(req)
            (_, again), = r.tokens(req)
        finally:
            r.close()
    assert tokens == again == eager_greedy(tiny_model, tok, req.prompt_ids, 24, 4)  # right answer while engines come and go
    assert engines.resident_bytes("cpu") <= budget
    assert "loaded segment.3 on cpu" in caplog.text and "evicted" in caplog.text and "from host memory" in caplog.text
    assert engines.loads["segment.3"][0] >= 2 and ("segment.3", "budget") in unloads  # evicted, then reloaded from host memory
    assert set(engines.files.host) >= {"segment.0", "segment.3"}


@pytest.mark.parametrize("host_copy", [False, True], ids=["page-cache", "host-copy"])
def test_prefetch_reads_and_verifies_every_engine_ahead_of_its_first_load(tiny_engines_dir, tmp_path, caplog, monkeypatch, host_copy):
    """After the start-up prefetch a first load hashes nothing again (and, from host copies, needs no
    file at all); a file that fails its hash is reported by its load, naming it."""
    export = tmp_path / "export"
    shutil.copytree(tiny_engines_dir, export)
    manifest = Manifest.load(export)
    corrupt = manifest.engines["segment.2"]
    bad = next((f for f in corrupt.files if f.name != corrupt.path), corrupt.files[0])  # its weights, where they are apart
    data = export / bad.name
    data.write_bytes(bytes([data.read_bytes()[0] ^ 1]) + data.read_bytes()[1:])
    engines = EngineSet(export, host_copy=lambda device: host_copy)
    engines.session("embed")
    with caplog.at_level(logging.WARNING):
        engines.prefetch().join(timeout=120)
    read = set(engines.files.host) if host_copy else set(engines.files.verified)
    assert read == set(manifest.engines) - {"segment.2"}  # embed by its load, the rest by the prefetch
    assert f"{data} has sha256" in caplog.text
    monkeypatch.setattr("runtime.files.sha256_file", lambda path: pytest.fail(f"{path} hashed again"))
    if host_copy:
        for record in manifest.engines.values():
            if record.name != "segment.2":
                for f in record.files:
                    (export / f.name).unlink()
    engines.session("segment.3")  # no hash again; from host memory alone
    assert "segment.3" in engines.loaded()
    monkeypatch.undo()
    with pytest.raises(EngineMismatch, match=rf"{re.escape(str(data))} has sha256 [0-9a-f]{{64}}, manifest expects {bad.sha256}"):
        engines.session("segment.2")
    assert engines.broken["segment.2"]


def test_a_budget_below_the_largest_engine_is_refused_naming_both(tiny_engines_dir, tok):
    from runtime.generation import EngineConfigError

    engines = EngineSet(tiny_engines_dir, budget_bytes={"cpu": 4096})
    engine = make_engine(engines, tok, offload=OffloadConfig(enabled=True, gpu_memory_budget_gb=4096 / 2**30))
    largest = max(engines.manifest.engines.values(), key=lambda e: e.bytes)
    with pytest.raises(EngineConfigError, match=rf"\(0\.0 MiB on cpu\) is smaller than engine {re.escape(largest.name)} "
                                                rf"\({largest.bytes / 2**20:.1f} MiB\)"):
        engine.warm_up()
    assert engines.loaded() == []  # refused before anything loads


def test_media_engines_load_on_a_background_thread_while_others_decode(tiny_engines_dir, tok, tiny_model, media, caplog):
    engines = EngineSet(tiny_engines_dir, announce=True)
    engine = make_engine(engines, tok, offload=OffloadConfig(enabled=True, idle_unload_s=0.3), **forced(6))
    engine.warm_up()
    pixels, _ = media
    long = request(tok, "a long answer", 24, ignore_eos=True)
    image = request(tok, "what is this?", 4, ("text", "image"), pixels)
    r = Running(engine)
    try:
        with caplog.at_level(logging.INFO):
            (_, long_tokens), (_, image_tokens) = r.tokens(long, image)
        loads = [rec for rec in caplog.records if "[DYNAMIC GRAPH] Loading ViT encoder for image processing" in rec.getMessage()]
        assert [rec.threadName.startswith("dyngraph-loader") for rec in loads] == [True]
        assert "waits for vision, cross_kv.0, cross_attn.0 to load; 1 request(s) keep decoding" in caplog.text
        assert long_tokens == eager_greedy(tiny_model, tok, long.prompt_ids, 6, 24)
        assert image_tokens == eager_greedy(tiny_model, tok, image.prompt_ids, 6, 4, pixels)
        deadline = time.monotonic() + 3  # idle for 0.3 s: the engine thread unloads them by itself
        while set(engines.loaded()) != set(engine.on_demand.base) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(engines.loaded()) == set(engine.on_demand.base)
        assert engines.unloads["vision", "idle"] >= 1 and engines.unloads["cross_attn.0", "idle"] >= 1
    finally:
        r.close()


def test_kv_buffers_are_allocated_by_need_and_freed_with_their_segment(tiny_engines_dir, tok, tiny_model):
    engines = EngineSet(tiny_engines_dir)
    engine = make_engine(engines, tok, offload=OffloadConfig(enabled=True, idle_unload_s=0.3), policy=PolicyConfig(request_override=True))
    per_segment = [c.rows * c.bytes_per_row for c in engine.stepper.caches]
    assert engine.kv_bytes["cpu"] == 0  # nothing until a request needs a segment
    r = Running(engine)
    try:
        r.tokens(request(tok, "shallow", 3, exit_layer=6))
        assert engine.kv_bytes["cpu"] == per_segment[0] and [c.buffer is not None for c in engine.stepper.caches] == [True] + [False] * 3
        deep = request(tok, "deep", 3, exit_layer=24)
        (_, tokens), = r.tokens(deep)
        assert tokens == eager_greedy(tiny_model, tok, deep.prompt_ids, 24, 3)
        # every segment's buffer existed for it (now, the idle deep segments may already be gone with theirs)
        assert engine.kv_peak["cpu"] == sum(per_segment)
        deadline = time.monotonic() + 3  # the deep segments unload when idle, and their buffers go with them
        while engine.kv_bytes["cpu"] > per_segment[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.kv_bytes["cpu"] == per_segment[0] and engine.kv_peak["cpu"] == sum(per_segment)
        (_, again), = r.tokens(deep)  # reloaded, reallocated: the same answer
        assert again == tokens
        assert engine.kv_per_request() == {"exit6-text": per_segment[0] // engine.cfg.max_batch_size,
                                           "exit24-text": sum(per_segment) // engine.cfg.max_batch_size}
    finally:
        r.close()


def test_static_mode_and_offload_off_keep_everything_resident(engines, tok):
    for runtime in ({"mode": "static"}, {"offload": OffloadConfig(enabled=False)}):
        engine = make_engine(engines, tok, **runtime)
        engine.warm_up()
        assert not engine.on_demand and set(engine.mode_engines()) <= set(engines.loaded())
        assert all(c.buffer is not None for c in engine.stepper.caches)  # the baseline: every cache allocated at start


def test_a_reloaded_segment_is_a_new_session_whose_graphs_are_captured_anew(tiny_engines_dir, tiny_model):
    """A session's capture bookkeeping on the CPU (the CPU provider captures nothing): an evicted
    segment comes back as a new session, with nothing of the old one's graphs."""
    from exporters.ort import CAPTURE_RUNS
    from runtime.step import Row, Stepper, captured_engines

    engines = EngineSet(tiny_engines_dir, cuda_graphs=captured_engines(Manifest.load(tiny_engines_dir)))
    stepper = Stepper(engines, max_batch=2, capacity=64, cuda_graphs=True)
    with torch.inference_mode():
        logits, _ = stepper.prefill("a", [5, 6, 7], 4, None)
        row = Row("a", 4, int(logits.argmax()))
        out = [row.token]
        for step in range(6):
            if step == 3:
                old = engines.session("segment.3")
                engines.unload("segment.3", "budget")
                assert not stepper.free_unloaded()  # its row is held: the buffer stays, at the address the graphs bind
            _, logits = stepper.decode([row])
            row.token = int(logits.argmax())
            out.append(row.token)
    new = engines.session("segment.3")
    here = (threading.get_ident(), 1)  # ONNX Runtime counts a graph's runs per thread
    assert new is not old and new.graph_runs[here] == CAPTURE_RUNS and old.graph_runs[here] == CAPTURE_RUNS
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        want = []
        for _ in range(7):
            want.append(int(tiny_model(ids, 24)[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[want[-1]]])], dim=1)
    assert out == want  # the same greedy tokens across the eviction and reload


def test_decode_steps_never_wait_for_a_load_and_capture_once_it_is_done(tiny_engines_dir, tiny_model, monkeypatch):
    """On the H200 a request that found its segment missing froze the others for the whole 10 s load:
    a decode step's capture runs waited for the load lock. Here a load is held open on the loader thread
    while another thread (the engine thread's place; start-up captured on this one) decodes: its steps go
    on uncaptured, capture once the load is done, then replay one graph per engine and batch."""
    from exporters.ort import CAPTURE_RUNS
    from runtime.step import Row, Stepper, captured_engines

    engines = EngineSet(tiny_engines_dir, cuda_graphs=captured_engines(Manifest.load(tiny_engines_dir)))
    stepper = Stepper(engines, max_batch=2, capacity=64, cuda_graphs=True)
    for name in ("embed", "segment.0", "lm_head"):
        engines.session(name)
    with torch.inference_mode():
        stepper.capture(1)  # at start-up, on the main thread
    assert engines.session("segment.0").graph_runs[threading.get_ident(), 1] == CAPTURE_RUNS
    runs = {name: [] for name in ("embed", "segment.0", "lm_head")}  # per run: asked captured or not, and the addresses bound
    for name, seen_runs in runs.items():
        session = engines.session(name)

        def spy(feeds, outputs=None, captured=False, real=session.run, seen_runs=seen_runs):
            seen_runs.append((captured, tuple((n, t.data_ptr(), tuple(t.shape)) for n, t in {**feeds, **(outputs or {})}.items())))
            return real(feeds, outputs, captured)

        monkeypatch.setattr(session, "run", spy)
    loading, release = threading.Event(), threading.Event()
    real_load = engines.load

    def slow_load(*args, **kw):  # inside EngineSet.session, holding load_lock, as a real load does for seconds
        loading.set()
        release.wait(30)
        return real_load(*args, **kw)

    monkeypatch.setattr(engines, "load", slow_load)
    loader = threading.Thread(target=engines.session, args=("segment.3",))
    loader.start()
    assert loading.wait(10)
    tokens, seen = [], {}

    def decode(steps: int) -> None:
        with torch.inference_mode():
            if not tokens:
                logits, _ = stepper.prefill("a", [5, 6, 7], 1, None)
                tokens.append(int(logits.argmax()))
            for _ in range(steps):
                _, logits = stepper.decode([Row("a", 1, tokens[-1])])
                tokens.append(int(logits.argmax()))
        seen["thread"] = threading.get_ident()

    engine_thread = threading.Thread(target=decode, args=(4,))
    engine_thread.start()
    engine_thread.join(timeout=10)
    try:
        assert not engine_thread.is_alive(), "decode steps waited for the load"
        sessions = {name: engines.session(name) for name in runs}
        assert {name: s.uncaptured for name, s in sessions.items()} == {"embed": 4, "segment.0": 4, "lm_head": 4}
        assert all(s.graph_runs[seen["thread"], 1] == 0 for s in sessions.values())  # nothing captured on the engine thread yet
        assert all([captured for captured, _ in r] == [False] + [True] * 4 for r in runs.values())  # the prefill's run, then 4 steps'
    finally:
        release.set()
        loader.join()
        engine_thread.join()
    engine_thread = threading.Thread(target=decode, args=(CAPTURE_RUNS + 3,))  # the load is done: capture, then replay
    engine_thread.start()
    engine_thread.join()
    for name in ("embed", "segment.0", "lm_head"):
        session = engines.session(name)
        assert session.uncaptured == 4 and session.graph_runs[seen["thread"], 1] == CAPTURE_RUNS
        after = runs[name][5:]  # every step after the load: a graph run, on the same addresses (one graph: no recapture)
        assert len(after) == CAPTURE_RUNS + 3 and all(captured for captured, _ in after) and len({key for _, key in after}) == 1
        assert list(session.graphs) == stepper.buckets  # one graph per batch size, whichever thread captures it
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        want = []
        for _ in range(len(tokens)):
            want.append(int(tiny_model(ids, 6)[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[want[-1]]])], dim=1)
    assert tokens == want  # uncaptured and captured steps give the same greedy tokens


def test_engines_that_differ_from_the_manifest_are_refused(tiny_engines_dir, tmp_path):
    copy = tmp_path / "onnx"
    shutil.copytree(tiny_engines_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    manifest = Manifest.load(copy)
    victim = copy / manifest.engines["lm_head"].path
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    engines = EngineSet(copy)
    engines.session("embed")
    with pytest.raises(EngineMismatch, match=r"lm_head.*has sha256 [0-9a-f]{64}, manifest expects [0-9a-f]{64}"):
        engines.session("lm_head")
    manifest.backend["versions"]["onnxruntime"] = "0.0.1"
    manifest.save(copy)
    with pytest.raises(EngineMismatch, match=r"onnxruntime 0\.0\.1, found \d"):
        EngineSet(copy)


def test_two_gpu_placement_keeps_shallow_paths_on_the_first_gpu(tiny_engines_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    manifest = Manifest.load(tiny_engines_dir)
    placement = Placement(PlacementConfig("two_gpu", ["cuda:0", "cuda:1"], [0, 12]), manifest)
    devices = {name: placement(record) for name, record in manifest.engines.items()}
    second = {n for n, d in devices.items() if d == "cuda:1"}
    assert second == {"segment.2", "segment.3", "cross_kv.2", "cross_kv.3", "cross_attn.2", "cross_attn.3"}
    assert devices["lm_head"] == "cuda:0"  # one head for every exit: deep exits send their hidden state back
    for path in manifest.paths:
        used = {devices[n] for n in path.encode + path.step}
        assert ("cuda:1" in used) == (path.exit_layer > 12), path.name
    with pytest.raises(PlacementError, match="layer 10 would split a segment"):
        Placement(PlacementConfig("bad", ["cuda:0", "cuda:1"], [0, 10]), manifest)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(PlacementError, match="needs cuda:1"):
        Placement(PlacementConfig("two_gpu", ["cuda:0", "cuda:1"], [0, 12]), manifest)


def test_decode_steps_run_at_captured_batch_sizes():
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(6) == [1, 2, 4, 6] and batch_buckets(1) == [1]
    assert [bucket_for(n, [1, 2, 4, 8, 16]) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert bucket_for(5, None) == 5  # without graphs a step runs at its own size


def test_seeded_sampling_reproduces_whatever_it_is_batched_with(running, tok):
    r = running(max_batch_size=4, **forced(12))
    sampled = dict(temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    alone = r.tokens(request(tok, "roll the dice", 12, ignore_eos=True, sampling=SamplingParams(**sampled)))
    batched = r.tokens(request(tok, "roll the dice", 12, ignore_eos=True, sampling=SamplingParams(**sampled)),
                       request(tok, "something else entirely", 12, ignore_eos=True, sampling=SamplingParams(temperature=1.0, seed=7)),
                       request(tok, "greedy", 12, ignore_eos=True))
    assert batched[0] == alone[0]
    other_seed = r.tokens(request(tok, "roll the dice", 12, ignore_eos=True, sampling=SamplingParams(**{**sampled, "seed": 99})))
    assert other_seed[0][1] != alone[0][1]


def test_fp32_engines_on_a_gpu_placement_are_refused_in_one_line(tiny_engines_dir, tok, monkeypatch):
    from runtime.generation import EngineConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = PlacementConfig("one_gpu", ["cuda:0"], [0])
    engines = EngineSet(tiny_engines_dir, Placement(cfg, Manifest.load(tiny_engines_dir)))
    with pytest.raises(EngineConfigError, match="no fp32 CUDA kernel: export for the GPU with export.dtype=fp16"):
        make_engine(engines, tok, placement=cfg)
