"""The generation engine: one thread that owns every engine call, fed by the HTTP handlers.

Each loop iteration admits at most one waiting request (prefill: choose its path, fill its cache
slot, sample its first token) and then runs one decode step for every path that has requests
in flight, batching all of a path's requests into one call per engine (continuous batching:
requests join after their prefill and leave when they finish, between steps). Handlers receive
events on their own asyncio loop; cancelling a handle frees its slot before the next step.

A request's cache is a slot per cache engine, preallocated for its prompt plus completion on
the device of that engine's layers, so a shallow path allocates less. The segment engines take
the cache as input and return it with the new entries appended, so a batched step gathers the
slots into one tensor (shorter sequences padded on the right, masked out by kv_mask; each
sequence keeps its own position ids) and copies each sequence's new entry back.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from model.tokenizer import ChatTokenizer
from pipeline.manifest import PathRecord
from runtime.chain import DTYPES, KVLayout, PathRunner
from runtime.config import RuntimeConfig
from runtime.engines import EngineSet
from runtime.metrics import Metrics
from runtime.placement import Placement
from runtime.policy import Decision, DepthPolicy, PolicyInput
from runtime.sampling import Sampler, SamplingParams, make_generator

log = logging.getLogger("dyngraph.runtime")

MODES = ("dynamic", "static")
ENCODER_NAMES = {"vision": "ViT encoder for image processing", "audio": "audio encoder for audio processing"}


class EngineConfigError(ValueError):
    """The runtime config does not fit the export; the message says which setting and why."""


class QueueFull(Exception):
    pass


# --- what goes in and what comes out ------------------------------------------------------------


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    modalities: tuple[str, ...] = ("text",)
    pixel_values: torch.Tensor | None = None  # [n_images, 3, H, W], normalised
    mel: torch.Tensor | None = None  # [1, n_mels, frames]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    thinking: bool = False  # the prompt ends inside an open thinking block
    max_reasoning_steps: int | None = None  # thinking tokens before the engine closes the block itself
    policy_text: str = ""  # what the heuristic reads for question form: the last user message
    exit_layer: int | None = None  # chosen by the client (runtime.policy.request_override), else by the policy
    request_id: str = ""


@dataclass(frozen=True)
class Started:
    path: PathRecord
    engines: list[str]
    devices: dict[str, str]
    mode: str


@dataclass(frozen=True)
class Delta:
    content: str = ""
    reasoning: str = ""

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning)


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    token_ids: tuple[int, ...]  # every sampled id, the one that stopped it included


@dataclass(frozen=True)
class Failed:
    message: str
    status: int = 500


Event = Started | Delta | Finished | Failed


class RequestHandle:
    """The HTTP side of one request: events arrive on its asyncio loop, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.polled_at = time.monotonic()  # when its HTTP handler last asked whether the client is still there

    def push(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            self.cancelled = True

    async def next(self) -> Event:
        return await self.events.get()


# --- per-request state ---------------------------------------------------------------------------


class KVSlot:
    """One request's cache: per cache engine [L, 2, Hkv, capacity, hd] on that engine's device; entries
    [0, length) are filled. Allocated zeroed, as gathered batches pass the unfilled tail as padding."""

    def __init__(self, capacity: int, dtype: torch.dtype):
        self.capacity, self.dtype = capacity, dtype
        self.kv: dict[str, torch.Tensor] = {}
        self.length = 0

    def allocate(self, name: str, layout: KVLayout) -> torch.Tensor:
        self.kv[name] = torch.zeros(layout.layers, 2, layout.kv_heads, self.capacity, layout.head_dim, dtype=self.dtype, device=layout.device)
        return self.kv[name]

    def bytes_per_device(self) -> Counter[str]:
        sizes: Counter[str] = Counter()
        for t in self.kv.values():
            sizes[str(t.device)] += t.numel() * t.element_size()
        return sizes


class TextStream:
    """A sequence's text: decoded without splitting characters, split into reasoning and answer at
    </think>, and held back wherever it might be the beginning of a stop string.

    Stop strings apply to the answer: a stop string met while reasoning would cut the answer
    before it starts, and the reasoning is not what the client asked to stop."""

    def __init__(self, tokenizer: ChatTokenizer, stop: tuple[str, ...], thinking: bool, think_end: int | None):
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.reasoning = thinking
        self.think_end = think_end
        self.pending = ""

    def add(self, token: int) -> tuple[Delta, bool]:
        """The text the token completes, and whether the answer met a stop string."""
        if self.reasoning and token == self.think_end:
            self.reasoning = False
            return Delta(), False
        piece = self.decoder.step(token)
        if self.reasoning:
            return Delta(reasoning=piece), False
        text = self.pending + piece
        hits = [i for s in self.stop if (i := text.find(s)) >= 0]
        if hits:
            self.pending = ""
            return Delta(content=text[:min(hits)]), True
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - hold:]
        return Delta(content=text[:len(text) - hold]), False

    def flush(self) -> Delta:
        tail, self.pending = self.pending, ""
        return Delta(content=tail)


@dataclass(eq=False)
class Sequence:
    number: int
    request: GenerationRequest
    handle: RequestHandle
    text: TextStream
    path: PathRecord | None = None
    runner: PathRunner | None = None
    slot: KVSlot | None = None
    media: dict | None = None  # cross_kv per block ([2, 1, Hkv, M, hd]; static: all blocks) and media_mask [1, M]
    generator: torch.Generator | None = None
    next_token: int = -1  # sampled, not yet in the cache
    token_ids: list[int] = field(default_factory=list)
    reasoning_tokens: int = 0
    done: bool = False  # finished, failed or cancelled: its slot is free

    @property
    def must_close_thinking(self) -> bool:
        cap = self.request.max_reasoning_steps
        return self.text.reasoning and cap is not None and self.reasoning_tokens >= cap


# --- the engine -----------------------------------------------------------------------------------


class GenerationEngine:
    def __init__(self, engines: EngineSet, placement: Placement, tokenizer: ChatTokenizer, cfg: RuntimeConfig, metrics: Metrics):
        self.engines, self.placement, self.tokenizer, self.cfg, self.metrics = engines, placement, tokenizer, cfg, metrics
        manifest = engines.manifest
        self.manifest = manifest
        text = manifest.model["config"]["text"]
        self.exit_layers, self.n_layers = list(text["exit_layers"]), text["n_layers"]
        self.dtype = DTYPES[manifest.dtype]
        if cfg.mode not in MODES:
            raise EngineConfigError(f"runtime.mode={cfg.mode!r} is not one of {', '.join(MODES)}")
        self.mode = cfg.mode
        if self.mode == "static" and manifest.static_path is None:
            raise EngineConfigError(f"static mode needs the static engines, which the export in {engines.directory} "
                                    "left out (export.static=false): export again with export.static=true")
        self.policy = DepthPolicy(cfg.policy, self.exit_layers, manifest.exits)
        if tokenizer.vocab_size > text["vocab_size"]:
            raise EngineConfigError(f"the tokenizer has {tokenizer.vocab_size} ids, more than the model's vocabulary of {text['vocab_size']}")
        self.sampler = Sampler(tokenizer.vocab_size)
        self.eos = set(tokenizer.eos_ids)
        self.think_end = tokenizer.tokenizer.token_to_id("</think>")
        dims = manifest.dims
        self.context_len = dims["past"]["max"] if cfg.max_context is None else cfg.max_context
        if not 1 < self.context_len <= dims["past"]["max"]:
            raise EngineConfigError(f"runtime.max_context={cfg.max_context} must lie in 2..{dims['past']['max']}, "
                                    "the context the engines were exported for")
        if not 1 <= cfg.max_batch_size <= dims["batch"]["max"]:
            raise EngineConfigError(f"runtime.max_batch_size={cfg.max_batch_size} must lie in 1..{dims['batch']['max']}, "
                                    "the batch the engines were exported for")
        if cfg.max_queue < 0:
            raise EngineConfigError("runtime.max_queue must not be negative")
        self.chunk = dims["seq"]["max"]  # prompt tokens per forward: longer prompts prefill in chunks
        self.max_media_tokens = dims["media"]["max"]
        self.runners = {p.name: PathRunner(engines, p) for p in manifest.paths}

        self.cond = threading.Condition()
        self.waiting: deque[Sequence] = deque()
        self.active = 0  # admitted and unfinished: the slots in use
        self.running: dict[str, list[Sequence]] = {}  # path name -> sequences decoding on it (engine thread only)
        self.media_batches: dict[str, tuple[tuple[int, ...], dict]] = {}  # cross-attention block -> (sequence numbers, batched media)
        self.numbers = itertools.count()
        self.stopping = False
        self.path_counts: Counter[str] = Counter()
        self.kv_bytes: Counter[str] = Counter()
        self.kv_peak: Counter[str] = Counter()
        self.thread = threading.Thread(target=self.loop, name="dyngraph-engine", daemon=True)

    # --- lifecycle ----------------------------------------------------------------------------------

    def mode_engines(self) -> list[str]:
        paths = [self.manifest.static_path] if self.mode == "static" else [p for p in self.manifest.paths if not p.static]
        return list(dict.fromkeys(n for p in paths for n in p.encode + p.step))

    def warm_up(self) -> None:
        """Verify and load what the mode needs up front; with offload, only what every text request needs."""
        names = self.mode_engines()
        if self.cfg.offload.enabled and self.mode == "dynamic":
            names = self.manifest.path(self.exit_layers[0], ["text"]).step
            biggest = max((p for p in self.manifest.paths if not p.static), key=lambda p: sum(self.manifest.engines[n].bytes for n in p.encode + p.step))
            for device, budget in self.engines.budget_bytes.items():
                need = sum(self.manifest.engines[n].bytes for n in biggest.encode + biggest.step if str(self.engines.device(n)) == device)
                if need > budget:
                    log.warning("[DYNAMIC GRAPH] path %s needs %.1f MiB of engines on %s, over the %.1f MiB budget: "
                                "its requests will reload engines at every step", biggest.name, need / 2**20, device, budget / 2**20)
        for name in names:
            self.engines.session(name)
        for exit_layer in self.exit_layers:  # the shared head beside every exit held by another device
            device = self.placement.exit_device(exit_layer)
            if self.mode == "dynamic" and not self.cfg.offload.enabled and device != str(self.engines.device("lm_head")):
                self.engines.session("lm_head", device)
        if self.mode == "static":
            log.info("[DYNAMIC GRAPH] Static mode: every request runs the full graph (%d layers, every encoder)", self.n_layers)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=30)

    # --- the HTTP side --------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestHandle:
        handle = RequestHandle(loop)
        text = TextStream(self.tokenizer, request.stop, request.thinking, self.think_end)
        with self.cond:
            # requests that will find a free slot do not count against the queue
            free = max(0, self.cfg.max_batch_size - self.active)
            if self.stopping or len(self.waiting) >= self.cfg.max_queue + free:
                raise QueueFull
            self.waiting.append(Sequence(next(self.numbers), request, handle, text))
            self.metrics.queue_depth.set(len(self.waiting))
            self.cond.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """The client went away: drop its request if it is still queued, else free its slot before the next step."""
        handle.cancelled = True
        with self.cond:
            for seq in self.waiting:
                if seq.handle is handle:
                    self.waiting.remove(seq)
                    self.metrics.queue_depth.set(len(self.waiting))
                    log.info("%s cancelled while queued", seq.request.request_id)
                    break
            self.cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    # --- the engine thread ------------------------------------------------------------------------------

    def loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.stopping and not self.running and not (self.waiting and self.active < self.cfg.max_batch_size):
                        self.cond.wait()
                    if self.stopping:
                        break
                    seq = None
                    if self.waiting and self.active < self.cfg.max_batch_size:
                        seq = self.waiting.popleft()
                        self.active += 1
                        self.metrics.queue_depth.set(len(self.waiting))
                        self.metrics.running.set(self.active)
                if seq is not None:
                    self.guarded(partial(self.admit, seq), [seq])
                for s in [s for seqs in self.running.values() for s in seqs if s.handle.cancelled]:
                    log.info("%s cancelled after %d tokens: slot freed", s.request.request_id, len(s.token_ids))
                    self.release(s)
                batch = [s for seqs in self.running.values() for s in seqs]
                if batch:
                    step = self.decode if self.mode == "static" else self.decode_dynamic
                    self.guarded(partial(step, batch), batch)
        with self.cond:
            leftover = list(self.waiting) + [s for seqs in self.running.values() for s in seqs]
            self.waiting.clear()
        for seq in leftover:
            seq.handle.push(Failed("the server shut down before this request finished", 503))

    def guarded(self, work: Callable[[], None], seqs: list[Sequence]) -> None:
        """A failing engine call fails the requests it served, never the engine thread."""
        try:
            work()
        except Exception as e:  # noqa: BLE001 - reported to each client and logged with its traceback
            log.exception("generation failed for %s", ", ".join(s.request.request_id for s in seqs))
            for s in seqs:
                if not s.done:
                    s.handle.push(Failed(f"generation failed: {type(e).__name__}: {e}"))
                    self.release(s)

    def admit(self, seq: Sequence) -> None:
        if seq.handle.cancelled:
            self.release(seq)
            return
        logits = self.prefill(seq)
        seq.generator = make_generator(seq.request.sampling, logits.device)
        self.take(seq, self.sample(logits, [seq])[0])
        if not seq.done:
            self.running.setdefault(seq.path.name, []).append(seq)

    def prefill(self, seq: Sequence) -> torch.Tensor:
        """Choose the path and fill a new slot with the prompt's cache; logits [1, V] of its last position."""
        req = seq.request
        slot = KVSlot(len(req.prompt_ids) + req.max_tokens, self.dtype)
        if self.mode == "static":
            runner, decision = self.runners[self.manifest.static_path.name], Decision(self.n_layers, "static mode")
            media = runner.encode_static(req.pixel_values, req.mel)
            logits = self.prefill_static(runner, req.prompt_ids, slot, media)
        else:
            decision = (Decision(req.exit_layer, "requested by the client") if req.exit_layer
                        else self.policy.decide(PolicyInput(req.policy_text, req.modalities)))
            # the confidence policy starts on the deepest path and stops at the exit it settles on
            runner = self.runners[self.manifest.path(decision.exit_layer or self.exit_layers[-1], req.modalities).name]
            media = self.encode(runner, req)
            logits, decision = self.prefill_dynamic(runner, req.prompt_ids, slot, media, decision)
            runner = self.runners[self.manifest.path(decision.exit_layer, req.modalities).name]
        slot.length = len(req.prompt_ids)
        seq.path, seq.runner, seq.slot, seq.media = runner.path, runner, slot, media
        for device, n in slot.bytes_per_device().items():
            self.kv_bytes[device] += n
            self.kv_peak[device] = max(self.kv_peak[device], self.kv_bytes[device])
        self.announce(seq, decision)
        return logits

    def chunks(self, n: int) -> list[tuple[int, int]]:
        """[a, b) spans of a prompt, each short enough for one forward."""
        return [(a, min(a + self.chunk, n)) for a in range(0, n, self.chunk)]

    def prefill_static(self, runner: PathRunner, prompt_ids: list[int], slot: KVSlot, media: dict) -> torch.Tensor:
        device = self.engines.device("static.decode")
        prompt = torch.tensor([prompt_ids], device=device)
        layouts = runner.kv_layouts()
        kv = {name: empty_kv(layout, self.dtype) for name, layout in layouts.items()}
        for a, b in self.chunks(len(prompt_ids)):
            logits, kv = runner.forward(prompt[:, a:b], *chunk_feeds(a, b, device), kv, media)
        for name, layout in layouts.items():
            slot.allocate(name, layout)[:, :, :, :len(prompt_ids)] = kv[name][:, :, 0]
        return logits

    def encode(self, runner: PathRunner, req: GenerationRequest) -> dict | None:
        """The request's media tokens, with room for each block's keys/values as prefill reaches it."""
        if not runner.path.encode:
            return None
        for encoder in ("vision", "audio"):
            if encoder in runner.path.encode:
                log.info("[DYNAMIC GRAPH] Loading %s (%s)", ENCODER_NAMES[encoder], req.request_id)
        tokens = runner.media_tokens(req.pixel_values, req.mel, batch=1)
        return {"tokens": tokens, "cross_kv": {}, "media_mask": torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)}

    def prefill_dynamic(self, runner: PathRunner, prompt_ids: list[int], slot: KVSlot, media: dict | None,
                        decision: Decision) -> tuple[torch.Tensor, Decision]:
        """One segment at a time over the whole prompt (in chunks), so that the confidence policy can
        stop at an exit before any deeper segment has run."""
        device = self.engines.device("embed")
        prompt = torch.tensor([prompt_ids], device=device)
        spans = self.chunks(len(prompt_ids))
        layouts = runner.kv_layouts()
        hidden = [runner.embed(prompt[:, a:b]) for a, b in spans]
        for stage in runner.stages:
            if media is not None:
                media["cross_kv"][stage.cross_attn] = runner.cross_kv(stage, media["tokens"])
            kv = empty_kv(layouts[stage.segment], self.dtype)
            for c, (a, b) in enumerate(spans):
                hidden[c], exit_hidden, kv = runner.run_stage(stage, hidden[c], *chunk_feeds(a, b, device), kv, media)
            slot.allocate(stage.segment, layouts[stage.segment])[:, :, :, :len(prompt_ids)] = kv[:, :, 0]
            if decision.exit_layer is None:  # confidence: stop at the first exit sure enough of the next token
                logits = runner.head(exit_hidden)
                top1 = self.sampler.top1_probability(logits)
                if self.policy.confident(top1, stage.exit_layer) or stage is runner.stages[-1]:
                    decision = Decision(stage.exit_layer, f"{decision.reason}: top-1 probability {top1:.2f} at exit {stage.exit_layer}")
                    break
            elif stage is runner.stages[-1]:
                logits = runner.head(exit_hidden)
        if media is not None:
            del media["tokens"]  # decode steps need only the keys/values
        return logits, decision

    def announce(self, seq: Sequence, decision: Decision) -> None:
        path = seq.path
        if path.exit_layer == self.n_layers:
            what = f"full inference path ({self.n_layers} layers)"
        else:
            what = f"early-exit path ({path.exit_layer} of {self.n_layers} layers)"
        log.info("[DYNAMIC GRAPH] Activating %s: %s, %s (%s)", what, path.name, decision.reason, seq.request.request_id)
        self.path_counts[path.name] += 1
        self.metrics.path_requests.labels(path.name).inc()
        engines = path.encode + path.step
        devices = {n: str(self.engines.device(n)) for n in engines}
        if not path.static:
            devices["lm_head"] = self.placement.exit_device(path.exit_layer)
        seq.handle.push(Started(path, engines, devices, self.mode))

    def decode(self, seqs: list[Sequence]) -> None:
        """One step of every sequence of one path (static mode's), as one batch."""
        runner = seqs[0].runner
        device = self.engines.device(runner.path.step[0])
        lengths = torch.tensor([s.slot.length for s in seqs])
        past = int(lengths.max())
        input_ids = torch.tensor([[s.next_token] for s in seqs], device=device)
        kv_mask = (torch.arange(past)[None, :] < lengths[:, None]).to(device)
        kv = {name: self.gather(seqs, name, past) for name in seqs[0].slot.kv}
        media = self.block_media(seqs, "static.decode")
        media = media and {"cross_kv": {"static.decode": media["cross_kv"]}, "media_mask": media["media_mask"]}
        logits, kv_out = runner.forward(input_ids, lengths[:, None].to(device), kv_mask, kv, media)
        for name, out in kv_out.items():
            self.append_kv(seqs, name, out, past)
        self.end_step(seqs, logits)

    def decode_dynamic(self, seqs: list[Sequence]) -> None:
        """One step of every dynamic sequence, whatever its path: each segment runs once for all the
        sequences that reach it (an exit-6 request shares segment.0 with an exit-24 one), so a step
        reads each segment's weights once, not once per path in flight; cross-attention runs for the
        sequences with media, and the LM head once per device that an exit lives on."""
        runner = seqs[0].runner
        lengths = torch.tensor([s.slot.length for s in seqs])
        hidden = runner.embed(torch.tensor([[s.next_token] for s in seqs], device=self.engines.device("embed")))
        exit_hidden: list[torch.Tensor | None] = [None] * len(seqs)
        active = list(range(len(seqs)))  # the sequences still going, by index into seqs
        for k in range(max(len(s.runner.stages) for s in seqs)):
            going = [j for j, i in enumerate(active) if len(seqs[i].runner.stages) > k]
            if len(going) < len(active):
                hidden = hidden[torch.tensor(going, device=hidden.device)]
                active = [active[j] for j in going]
            group = [seqs[i] for i in active]
            stage = group[0].runner.stages[k]
            with_media = [j for j, s in enumerate(group) if s.runner.stages[k].cross_attn]
            if with_media:
                name = f"cross_attn.{k}"
                index = torch.tensor(with_media, device=hidden.device)
                media = self.block_media([group[j] for j in with_media], name)
                hidden = hidden.clone() if len(with_media) < len(group) else hidden
                hidden[index] = self.engines.run(name, {"hidden": hidden[index], "cross_kv": media["cross_kv"],
                                                        "media_mask": media["media_mask"]})["hidden_out"].to(hidden.device)
            group_lengths = lengths[active]
            past = int(group_lengths.max())
            device = self.engines.device(stage.segment)
            out = self.engines.run(stage.segment, {
                "hidden": hidden, "position_ids": group_lengths[:, None].to(device),
                "kv_mask": (torch.arange(past)[None, :] < group_lengths[:, None]).to(device),
                "kv": self.gather(group, stage.segment, past)})
            self.append_kv(group, stage.segment, out["kv_out"], past)
            for b, s in enumerate(group):
                if len(s.runner.stages) == k + 1:
                    exit_hidden[active[b]] = out["exit_hidden"][b]
            hidden = out["hidden_out"]
        self.end_step(seqs, self.heads(exit_hidden))

    @staticmethod
    def append_kv(seqs: list[Sequence], name: str, kv_out: torch.Tensor, past: int) -> None:
        """Each sequence's new cache entry (the last of kv_out) goes right after its own entries."""
        for b, s in enumerate(seqs):
            s.slot.kv[name][:, :, :, s.slot.length] = kv_out[:, :, b, :, past]

    def end_step(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        for s in seqs:
            s.slot.length += 1
        self.metrics.decode_batch.observe(len(seqs))
        for s, token in zip(seqs, self.sample(logits, seqs)):
            self.take(s, token)

    def heads(self, exit_hidden: list[torch.Tensor]) -> torch.Tensor:
        """Logits [B, V] in sequence order, the LM head running beside each exit's device."""
        by_device: dict[torch.device, list[int]] = {}
        for i, h in enumerate(exit_hidden):
            by_device.setdefault(h.device, []).append(i)
        first = exit_hidden[0].device
        rows: list[torch.Tensor | None] = [None] * len(exit_hidden)
        for device, index in by_device.items():
            logits = self.engines.run("lm_head", {"exit_hidden": torch.stack([exit_hidden[i] for i in index])}, device=device)["logits"]
            for row, i in zip(logits.to(first), index):
                rows[i] = row
        return torch.stack(rows)

    def block_media(self, seqs: list[Sequence], name: str) -> dict | None:
        """One cross-attention block's media keys/values for these sequences (static.decode: every
        block's, stacked in front), padded to the longest media; kept while the same sequences share it."""
        if seqs[0].media is None:
            return None
        if len(seqs) == 1:
            return {"cross_kv": seqs[0].media["cross_kv"][name], "media_mask": seqs[0].media["media_mask"]}
        key = tuple(s.number for s in seqs)
        cached = self.media_batches.get(name)
        if cached and cached[0] == key:
            return cached[1]
        batch_dim = 2 if name == "static.decode" else 1
        length = max(s.media["media_mask"].shape[1] for s in seqs)
        media = {"cross_kv": torch.cat([pad_to(s.media["cross_kv"][name], batch_dim + 2, length) for s in seqs], dim=batch_dim),
                 "media_mask": torch.cat([pad_to(s.media["media_mask"], 1, length) for s in seqs])}
        self.media_batches[name] = (key, media)
        return media

    @staticmethod
    def gather(seqs: list[Sequence], name: str, past: int) -> torch.Tensor:
        """The batch's cache for one engine, [L, 2, B, Hkv, past, hd], shorter sequences zero-padded on the right."""
        if len(seqs) == 1:
            return seqs[0].slot.kv[name][:, :, None, :, :past]
        first = seqs[0].slot.kv[name]
        layers, _, heads, _, head_dim = first.shape
        out = first.new_empty(layers, 2, len(seqs), heads, past, head_dim)
        for b, s in enumerate(seqs):
            n = s.slot.length
            out[:, :, b, :, :n] = s.slot.kv[name][:, :, :, :n]
            out[:, :, b, :, n:] = 0  # masked out, but an uninitialised NaN would survive a zero attention weight
        return out

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        tokens = self.sampler(logits, [s.request.sampling for s in seqs], [s.generator for s in seqs])
        return [self.think_end if s.must_close_thinking else t for s, t in zip(seqs, tokens)]

    def take(self, seq: Sequence, token: int) -> None:
        """Account for a new token, stream its text, and finish the sequence where it ends."""
        seq.next_token = token
        seq.token_ids.append(token)
        if seq.text.reasoning:
            seq.reasoning_tokens += 1
        if token in self.eos and not seq.request.ignore_eos:
            self.finish(seq, "stop")
            return
        delta, stopped = seq.text.add(token)
        # one event per token, empty or not: streams show the real token cadence (a byte-level
        # tokenizer often needs several tokens before any text decodes)
        seq.handle.push(delta)
        if stopped:
            self.finish(seq, "stop")
        elif len(seq.token_ids) >= seq.request.max_tokens:
            self.finish(seq, "length")

    def finish(self, seq: Sequence, reason: str) -> None:
        tail = seq.text.flush()
        if tail:
            seq.handle.push(tail)
        self.release(seq)  # first: whoever hears of the end finds the slot free
        seq.handle.push(Finished(reason, len(seq.request.prompt_ids), len(seq.token_ids), seq.reasoning_tokens, tuple(seq.token_ids)))

    def release(self, seq: Sequence) -> None:
        if seq.done:
            return
        seq.done = True
        if seq.path is not None and seq in self.running.get(seq.path.name, ()):
            self.running[seq.path.name].remove(seq)
            if not self.running[seq.path.name]:
                del self.running[seq.path.name]
        self.media_batches = {k: v for k, v in self.media_batches.items() if seq.number not in v[0]}
        if seq.slot is not None:
            for device, n in seq.slot.bytes_per_device().items():
                self.kv_bytes[device] -= n
            seq.slot = None
        seq.media = None
        with self.cond:
            self.active -= 1
            self.metrics.running.set(self.active)
            self.cond.notify()

    def reset_peaks(self) -> None:
        self.kv_peak = Counter(self.kv_bytes)


def chunk_feeds(a: int, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids [1, b - a] of prompt tokens [a, b), and the mask [1, a] of the (all valid) entries cached before them."""
    return torch.arange(a, b, device=device)[None], torch.ones(1, a, dtype=torch.bool, device=device)


def empty_kv(layout: KVLayout, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(layout.layers, 2, 1, layout.kv_heads, 0, layout.head_dim, dtype=dtype, device=layout.device)


def pad_to(t: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Zero/False-pad dimension `dim` of t up to `length`."""
    if t.shape[dim] == length:
        return t
    shape = list(t.shape)
    shape[dim] = length - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)
