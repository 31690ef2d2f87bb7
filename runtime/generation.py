"""The scheduler: one thread that owns every engine call, fed by the HTTP handlers.

Each loop iteration admits at most one waiting request (choose its path, encode its media,
prefill its rows of the segment caches, sample its first token) and then runs one decode step
for every sequence in flight, whatever its path (runtime.step): requests join after their
prefill and leave when they finish, between steps. With modules on demand (dynamic mode,
runtime.offload), a request whose engines are not resident first waits in a loading state while
a background thread loads them, and the engine thread keeps decoding the others; between steps
the engine thread unloads the on-demand engines left idle, and frees the KV buffers of segments
whose engine is gone and whose rows nobody holds. Handlers receive events on their own asyncio
loop; cancelling a handle frees the request's rows before the next step.

With self-speculation (runtime/speculation.py), a sequence deeper than the draft exit drafts in
the shared decode steps (running only its first segments) and is verified right after the step
that completes its draft; while more sequences decode together than `speculation.max_batch`,
every sequence decodes plainly (drafts in progress are verified first).

A prefill starts from the prompt's blocks the prefix cache holds (runtime/prefix.py) and keeps its
own; the request's timeline (runtime.requests.Timeline) is marked as it leaves the queue, after its
loads, encoders, embedding, each segment and head (on a GPU when the device finished them), and once
its first token is sampled. A step's token events wait in an outbox until the next step's engines
run, so that the handlers' work per token overlaps the device's.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

import torch

from model.tokenizer import ChatTokenizer
from contract.engines import segment_engine
from contract.exits import Exits
from contract.manifest import PathRecord
from runtime.config import RuntimeConfig
from exporters import EngineIncompatible
from runtime.engines import BudgetExceeded, EngineMismatch, EngineSet, describe
from runtime.metrics import Metrics
from runtime.ondemand import BudgetTooSmall, OnDemand
from runtime.placement import Placement
from runtime.policy import Decision, DepthPolicy, PolicyInput
from runtime.prefix import media_root
from runtime.requests import Event, Failed, Finished, GenerationRequest, QueueFull, RequestHandle, Started
from runtime.sampling import GREEDY, RowContext, Sampler, TokenHistory, make_generator
from runtime.speculation import Draft, SpeculationConfigError, accept, draft_exit_depth
from runtime.speculation import check as check_speculation
from runtime.step import DeviceMarks, Row, Stepper
from runtime.text import Delta, TextStream

log = logging.getLogger("dyngraph.runtime")

MODES = ("dynamic", "static")


class EngineConfigError(ValueError):
    """The runtime config does not fit the export; the message says which setting and why."""


# --- per-request state ---------------------------------------------------------------------------


@dataclass(eq=False)
class Sequence:
    number: int
    request: GenerationRequest
    handle: RequestHandle
    text: TextStream
    path: PathRecord | None = None
    row: Row | None = None  # set once prefilled: what the decode step reads of it
    decision: Decision | None = None  # the path decision, made when it leaves the queue
    needs: tuple[str, ...] = ()  # the engines its path needs (what is known of them before prefill)
    loading: Future | None = None  # its missing engines, loading on the background thread
    waited_from: tuple[float, int] = (0.0, 0)  # when it began waiting for them: (monotonic time, decode steps so far)
    generator: torch.Generator | None = None
    draft: Draft | None = None  # its self-speculation, when it drafts
    history: TokenHistory | None = None  # what its penalties read, on the logits' device
    token_ids: list[int] = field(default_factory=list)
    reasoning_tokens: int = 0
    done: bool = False  # finished, failed or cancelled: its rows are free

    @property
    def must_close_thinking(self) -> bool:
        cap = self.request.max_reasoning_steps
        return self.text.reasoning and cap is not None and self.reasoning_tokens >= cap


# --- the engine -----------------------------------------------------------------------------------


class GenerationEngine:
    def __init__(self, engines: EngineSet, placement: Placement, tokenizer: ChatTokenizer, cfg: RuntimeConfig, metrics: Metrics,
                 draft_engines: EngineSet | None = None):
        """`draft_engines`: a weight-quantized export of the same model, for self-speculation's drafts
        (runtime.speculation.draft_quantize)."""
        self.engines, self.placement, self.tokenizer, self.cfg, self.metrics = engines, placement, tokenizer, cfg, metrics
        self.draft_engines = draft_engines
        manifest = engines.manifest
        self.manifest = manifest
        text = manifest.model["config"]["text"]
        self.exits = Exits.of(manifest)
        if cfg.mode not in MODES:
            raise EngineConfigError(f"runtime.mode={cfg.mode!r} is not one of {', '.join(MODES)}")
        self.mode = cfg.mode
        self.policy = DepthPolicy(cfg.policy, list(self.exits.layers), manifest.exits)
        if tokenizer.vocab_size > text["vocab_size"]:
            raise EngineConfigError(f"the tokenizer has {tokenizer.vocab_size} ids, more than the model's vocabulary of {text['vocab_size']}")
        self.sampler = Sampler(tokenizer.vocab_size)
        self.eos = set(tokenizer.eos_ids)
        self.think_end = tokenizer.tokenizer.token_to_id("</think>")
        dims = manifest.dims
        self.context_len = dims["capacity"]["max"] if cfg.max_context is None else cfg.max_context
        if not 1 < self.context_len <= dims["capacity"]["max"]:
            raise EngineConfigError(f"runtime.max_context={cfg.max_context} must lie in 2..{dims['capacity']['max']}, "
                                    "the context the engines were exported for")
        if not 1 <= cfg.max_batch_size <= dims["batch"]["max"]:
            raise EngineConfigError(f"runtime.max_batch_size={cfg.max_batch_size} must lie in 1..{dims['batch']['max']}, "
                                    "the batch the engines were exported for")
        if cfg.max_queue < 0:
            raise EngineConfigError("runtime.max_queue must not be negative")
        self.max_media_tokens = dims["media"]["max"]
        prefix = cfg.prefix_cache
        if prefix.enabled and prefix.exact and dims["seq"]["max"] % prefix.block_tokens:
            raise EngineConfigError(f"runtime.prefix_cache.block_tokens={prefix.block_tokens} must divide the export's prefill chunk "
                                    f"({dims['seq']['max']} tokens) for an exact prefix cache (runtime.prefix_cache.exact=true)")
        try:
            check_speculation(cfg.speculation, self.exits, dims["seq"]["max"], dims["batch"]["max"])
        except SpeculationConfigError as e:
            raise EngineConfigError(str(e)) from None
        try:
            engines.backend.check_devices(manifest.dtype, placement.devices)
        except EngineIncompatible as e:
            raise EngineConfigError(str(e)) from None
        cuda_graphs = cfg.cuda_graphs and any(torch.device(d).type == "cuda" for d in placement.devices)
        if draft_engines is not None and draft_engines.manifest.model != manifest.model:
            raise EngineConfigError(f"the draft engines in {draft_engines.directory} are another model's export (or other weights) "
                                    f"than {engines.directory}: export both from the same model")
        self.stepper = Stepper(engines, cfg.max_batch_size, self.context_len, cuda_graphs, draft_engines, cfg.prefix_cache,
                               cfg.prefill_padding)
        # a step's tokens' events wait in the outbox until the next step's engines run (Stepper.decode's
        # `meanwhile`): the handlers' work per token then takes the GIL while the engines compute without it
        self.outbox: list[tuple[RequestHandle, Event]] = []

        self.cond = threading.Condition()
        self.waiting: deque[Sequence] = deque()
        self.active = 0  # admitted and unfinished: the rows in use
        self.running: list[Sequence] = []  # decoding (engine thread only)
        self.numbers = itertools.count()
        self.stopping = False
        self.path_counts: Counter[str] = Counter()
        self.speculation_counts: dict[str, Counter[str]] = {}  # path -> drafted, accepted, verifications, tokens
        self.decode_steps = 0  # decode steps so far: a load must not stop them (the loads' log says how many ran meanwhile)
        # modules on demand (runtime/ondemand.py): what every request needs is resident from the start, the
        # rest loads when a request needs it (on a background thread) and unloads when idle or under the budget
        self.on_demand = OnDemand(engines, manifest, self.exits, cfg.offload, self.wake) \
            if cfg.offload.enabled and self.mode == "dynamic" else None
        self.loading: list[Sequence] = []  # admitted, waiting for their engines (engine thread only)
        if not self.on_demand:  # every cache allocated once, at start: what a device holds for them
            for cache in self.stepper.caches:
                cache.allocate()
        # KV bytes allocated per device now and at most; held by the requests in flight now and at most
        self.kv_bytes: Counter[str] = Counter()
        self.kv_peak: Counter[str] = Counter()
        self.kv_in_use: Counter[str] = Counter()
        self.kv_in_use_peak: Counter[str] = Counter()
        self.count_kv()
        self.captured = threading.Event()  # set by the engine thread once its start-up capture is done (or failed)
        self.capture_error: BaseException | None = None
        self.thread = threading.Thread(target=self.loop, name="dyngraph-engine", daemon=True)

    # --- lifecycle ----------------------------------------------------------------------------------

    def mode_paths(self) -> list[PathRecord]:
        """The paths this mode serves: the static one, or every dynamic one."""
        return [self.manifest.static_path] if self.mode == "static" else [p for p in self.manifest.paths if not p.static]

    def mode_engines(self) -> list[str]:
        return list(dict.fromkeys(n for p in self.mode_paths() for n in p.encode + p.step))

    def warm_up(self) -> None:
        """Verify and load what the mode needs up front (with modules on demand, only what every text
        request needs); the engine thread captures their decode graphs when it starts."""
        if self.on_demand:
            try:
                self.on_demand.check_budget(self.mode_engines())
            except BudgetTooSmall as e:
                raise EngineConfigError(str(e)) from None
            names = self.on_demand.base
        else:
            names = self.mode_engines()
        for name in names:
            self.engines.session(name)
        if self.draft_engines is not None:  # what a draft at any exit short of the last runs
            for name in ["embed", *map(segment_engine, range(self.exits.segments - 1)), "lm_head"]:
                self.draft_engines.session(name)
        if self.mode == "static":
            log.info("[DYNAMIC GRAPH] Static mode: every request runs the full graph (%d layers, every encoder)", self.exits.full)
        elif self.on_demand:
            self.on_demand.announce()

    def start(self) -> None:
        """Start the engine thread; returns once it has captured the decode graphs of every batch size."""
        self.thread.start()
        self.captured.wait()
        if self.capture_error is not None:
            raise self.capture_error

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=30)
        if self.on_demand:
            self.on_demand.shutdown()

    # --- the HTTP side --------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestHandle:
        handle = RequestHandle(loop)
        text = TextStream(self.tokenizer, request.stop, request.thinking, self.think_end)
        with self.cond:
            # requests that will find a free row do not count against the queue
            free = max(0, self.cfg.max_batch_size - self.active)
            if self.stopping or len(self.waiting) >= self.cfg.max_queue + free:
                raise QueueFull
            self.waiting.append(Sequence(next(self.numbers), request, handle, text))
            self.metrics.queue_depth.set(len(self.waiting))
            self.cond.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """The client went away: drop its request if it is still queued, else free its rows before the next step."""
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
            # here, not in warm_up: a session may keep its CUDA graphs per thread, so graphs
            # captured on another thread would be captured again in this thread's first steps
            try:
                self.stepper.warm_prefill(1 if self.on_demand else None)
                self.stepper.capture(1 if self.on_demand else None)
            except BaseException as e:  # start() raises it in the caller
                self.capture_error = e
                return
            finally:
                self.captured.set()
            while True:
                if not self.running:
                    self.deliver()  # no decode step follows to hand them over in
                with self.cond:
                    while not self.stopping and not self.running and not self.loaded_ready() \
                            and not (self.waiting and self.active < self.cfg.max_batch_size):
                        if not self.cond.wait(self.on_demand.idle_wait() if self.on_demand else None):
                            break  # time to look for idle engines
                    if self.stopping:
                        break
                    seq = None
                    if self.waiting and self.active < self.cfg.max_batch_size:
                        seq = self.waiting.popleft()
                        self.active += 1
                        self.metrics.queue_depth.set(len(self.waiting))
                        self.metrics.running.set(self.active)
                if seq is not None:
                    self.deliver()  # not after its prefill
                    self.guarded(partial(self.enter, seq), [seq])
                ready = [s for s in self.loading if s.loading.done()]
                for s in ready:
                    self.loading.remove(s)
                    self.guarded(partial(self.loaded, s), [s])
                if seq is not None or ready:
                    self.deliver()  # a first token at once, not after the next step
                for s in [s for s in self.running + self.loading if s.handle.cancelled]:
                    log.info("%s cancelled after %d tokens: slot freed", s.request.request_id, len(s.token_ids))
                    self.release(s)
                if self.on_demand:
                    self.protect()
                if self.running:
                    self.guarded(self.decode, list(self.running))
                if self.on_demand:
                    self.unload_idle()
        with self.cond:
            leftover = list(self.waiting) + self.running + self.loading
            self.waiting.clear()
        self.deliver()
        for seq in leftover:
            seq.handle.push(Failed("the server shut down before this request finished", 503))

    def loaded_ready(self) -> bool:
        return any(s.loading.done() for s in self.loading)

    def protect(self) -> None:
        self.on_demand.protect(set().union(*(s.needs for s in self.running + self.loading),
                                           *((s.path.encode + s.path.step) for s in self.running if s.path)))

    def unload_idle(self) -> None:
        self.on_demand.unload_idle()
        if self.stepper.free_unloaded():
            self.count_kv()

    def guarded(self, work: Callable[[], None], seqs: list[Sequence]) -> None:
        """A failing engine call fails the requests it served, never the engine thread."""
        try:
            work()
        except Exception as e:  # noqa: BLE001 - reported to each client and logged with its traceback
            log.exception("generation failed for %s", ", ".join(s.request.request_id for s in seqs))
            self.deliver()  # what they made before it, first
            for s in seqs:
                # an engine file that changed on disk since start-up, or an engine the memory budget cannot
                # make resident now: this path is unavailable, not broken
                if not s.done:
                    s.handle.push(Failed(f"generation failed: {type(e).__name__}: {e}",
                                         503 if isinstance(e, (EngineMismatch, BudgetExceeded)) else 500))
                    self.release(s)

    def enter(self, seq: Sequence) -> None:
        """A request leaves the queue: decide its path; prefill it now, or once its engines are loaded."""
        seq.request.timeline.mark("queue")
        if seq.handle.cancelled:
            self.release(seq)
            return
        seq.decision = self.decide(seq.request)
        req = seq.request
        if self.on_demand:
            # a depth left to prefill (the confidence policy's) is known only after it: such a request
            # waits here for its first segment (and its media engines), and deeper segments load in its
            # prefill as it reaches them
            exit_layer = self.exits.first if seq.decision.left_to_prefill else seq.decision.exit_layer
            path = self.manifest.path(exit_layer, list(req.modalities))
            seq.needs = tuple(path.encode + path.step)
            missing = self.on_demand.missing(seq.needs)
            if missing:
                log.info("[DYNAMIC GRAPH] %s waits for %s to load; %d request(s) keep decoding", req.request_id,
                         ", ".join(missing), len(self.running))
                seq.waited_from = (time.monotonic(), self.decode_steps)
                seq.loading = self.on_demand.load(missing)
                self.loading.append(seq)
                return
        self.admit(seq)

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def loaded(self, seq: Sequence) -> None:
        seq.loading.result()  # a load that failed (a file that no longer verifies) fails its request here
        seq.request.timeline.mark("load")
        since, steps = seq.waited_from
        log.info("[DYNAMIC GRAPH] %s waited %.2f s for its engines; %d decode step(s) ran meanwhile (%d engine runs uncaptured "
                 "so far, for want of a capture during a load)", seq.request.request_id, time.monotonic() - since,
                 self.decode_steps - steps, self.engines.uncaptured_runs())
        self.admit(seq)

    def admit(self, seq: Sequence) -> None:
        if seq.handle.cancelled:
            self.release(seq)
            return
        logits = self.prefill(seq)
        seq.generator = make_generator(seq.request.sampling, logits.device)
        if seq.request.sampling.penalized:
            seq.history = TokenHistory(seq.request.prompt_ids, self.sampler.decodable, logits.device)
        token = self.sample(logits, [seq])[0]
        seq.request.timeline.mark("sample")
        self.take(seq, token, self.logprob(seq, logits[0], token))
        if not seq.done:
            self.running.append(seq)

    def decide(self, req: GenerationRequest) -> Decision:
        """The policy's depth for a request (known before prefill, except the confidence policy's)."""
        return self.policy.decide(PolicyInput(req.policy_text, req.modalities, req.exit_layer, self.mode == "static"))

    def prefill(self, seq: Sequence) -> torch.Tensor:
        """Encode the media and fill the sequence's cache rows along its path; logits [1, V] of the prompt's last position."""
        req = seq.request
        static = self.mode == "static"
        decision = seq.decision or self.decide(req)
        has_media = static or len(req.modalities) > 1
        marks = DeviceMarks(req.timeline, self.stepper.head_device)  # the timeline's encode, embed, segments and head
        media = None
        if has_media:
            if not self.on_demand:  # on demand, the engine set logs each load as it happens
                for encoder, modality in (("vision", "image"), ("audio", "audio")):
                    if static or modality in req.modalities:
                        log.info("[DYNAMIC GRAPH] Loading %s (%s)", describe(self.manifest.engines[encoder]), req.request_id)
            media = self.stepper.encode(req.pixel_values, req.mel, static)
            marks.mark("encode", self.engines.device("vision" if req.pixel_values is not None or static else "audio"))
        # a depth left to prefill starts towards full depth and stops at the first exit sure enough of the next token
        depth = self.exits.depth(self.exits.full if decision.left_to_prefill else decision.exit_layer)
        reasons = []

        def confident(logits: torch.Tensor, depth: int) -> bool:
            top1 = self.sampler.top1_probability(logits)
            reasons.append(f"top-1 probability {top1:.2f} at exit {self.exits.layer(depth)}")
            return self.policy.confident(top1, self.exits.layer(depth))

        stop = confident if decision.left_to_prefill else None
        root = media_root(static, req.pixel_values, req.mel) if self.stepper.prefix else None
        logits, depth = self.stepper.prefill(seq.number, req.prompt_ids, depth, media, stop, root, marks)
        marks.settle()
        cached = req.timeline.cached_tokens
        self.metrics.prefix_tokens.labels("cached").inc(cached)
        self.metrics.prefix_tokens.labels("prefilled").inc(len(req.prompt_ids) - cached)
        exit_layer = self.exits.layer(depth)
        if decision.left_to_prefill:
            why = reasons[-1] if depth < self.exits.segments else "no earlier exit reached it"
            decision = Decision(exit_layer, f"{decision.reason}: {why}")
        seq.path = self.manifest.static_path if static else self.manifest.path(exit_layer, req.modalities)
        seq.row = Row(seq.number, depth, -1, media)
        self.count_kv()
        seq.draft = self.draft_for(seq)
        self.announce(seq, decision)
        return logits

    def draft_for(self, seq: Sequence) -> Draft | None:
        """The request's self-speculation, once its path is known: in dynamic mode, when it asks for it
        (or the server does) and its path runs deeper than the draft exit."""
        cfg, req = self.cfg.speculation, seq.request
        if self.mode != "dynamic" or not (cfg.enabled if req.speculative is None else req.speculative) or req.processed:
            return None
        draft_exit = req.draft_exit if req.draft_exit is not None else cfg.draft_exit if cfg.draft_exit is not None else self.exits.first
        depth = draft_exit_depth(draft_exit, self.exits, "draft_exit")  # the chat service checked a request's own
        if seq.row.depth <= depth:
            return None
        return Draft(depth, cfg.draft_tokens, cfg.draft_tokens, cfg.adaptive)

    def announce(self, seq: Sequence, decision: Decision) -> None:
        path, draft = seq.path, seq.draft
        if path.exit_layer == self.exits.full:
            what = f"full inference path ({self.exits.full} layers)"
        else:
            what = f"early-exit path ({path.exit_layer} of {self.exits.full} layers)"
        if draft is not None:
            what += f", drafting {'up to ' if draft.adaptive else ''}{draft.most} tokens at exit {self.exits.layer(draft.depth)}"
        log.info("[DYNAMIC GRAPH] Activating %s: %s, %s (%s)", what, path.name, decision.reason, seq.request.request_id)
        self.path_counts[path.name] += 1
        self.metrics.path_requests.labels(path.name).inc()
        engines = path.encode + path.step
        seq.handle.push(Started(path, engines, {n: str(self.engines.device(n)) for n in engines}, self.mode))

    def decode(self) -> None:
        """One decode step for every sequence in flight: a token for each, or a draft token for each
        drafting one (verified once its draft is complete)."""
        drafting = len(self.running) <= self.cfg.speculation.max_batch
        for s in list(self.running):
            if s.draft is not None and s.draft.tokens and not drafting:
                self.verify(s)  # the batch grew past speculation's: finish the draft in progress first
        for s in self.running:
            remaining = s.request.max_tokens - len(s.token_ids)  # with one token left a draft buys nothing: decode it plainly
            s.row.draft = s.draft.depth if drafting and s.draft is not None and remaining > 1 else 0
        if not self.running:
            return
        rows = {s.number: s for s in self.running}
        keys, logits = self.stepper.decode([s.row for s in self.running], meanwhile=self.deliver)
        self.decode_steps += 1
        seqs = [rows[k] for k in keys]
        self.metrics.decode_batch.observe(len(seqs))
        # a sampled draft is drawn apart from the batch: its verification needs the distribution it came from
        sampled_drafts = [i for i, s in enumerate(seqs) if s.row.draft and not s.request.sampling.greedy]
        tokens = self.sampler(logits, [GREEDY if i in sampled_drafts else s.request.sampling for i, s in enumerate(seqs)],
                              [s.generator for s in seqs], self.contexts(seqs))
        for i, s in enumerate(seqs):
            if not s.row.draft:
                token = self.think_end if s.must_close_thinking else tokens[i]
                self.take(s, token, self.logprob(s, logits[i], token))
                continue
            token, probs = self.sampler.draw(logits[i], s.request.sampling, s.generator) if i in sampled_drafts else (tokens[i], None)
            s.draft.add(token, probs)
            s.row.token = token
            remaining = s.request.max_tokens - len(s.token_ids)
            if len(s.draft.tokens) >= min(s.draft.length, remaining):
                self.verify(s)

    def verify(self, seq: Sequence) -> None:
        """Check a sequence's drafts with its deeper segments; take the tokens they yield, keep their cache entries."""
        draft = seq.draft
        past = len(seq.request.prompt_ids) + len(seq.token_ids) - 1  # entries before the first drafted position
        logits = self.stepper.verify(seq.row, past, [seq.token_ids[-1], *draft.tokens[:-1]])
        tokens, accepted = accept(draft, logits, seq.request.sampling, seq.generator, self.sampler)
        counts = draft.settle(accepted, len(tokens))  # before the tokens are taken: the last may finish the request
        self.speculation_counts.setdefault(seq.path.name, Counter()).update(counts)
        for kind, n in counts.items():
            self.metrics.speculation.labels(seq.path.name, kind).inc(n)
        taken = 0
        for token in tokens:
            forced = seq.must_close_thinking  # the plain run closes the block here whatever the model says: so does this one
            self.take(seq, self.think_end if forced else token)
            taken += 1
            if seq.done or forced:
                break
        if not seq.done:
            self.stepper.truncate(seq.number, past + taken)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        tokens = self.sampler(logits, [s.request.sampling for s in seqs], [s.generator for s in seqs], self.contexts(seqs))
        return [self.think_end if s.must_close_thinking else t for s, t in zip(seqs, tokens)]

    @staticmethod
    def contexts(seqs: list[Sequence]) -> list[RowContext | None] | None:
        """Per sequence, what its logits processing reads: its penalties' history and its grammar's mask now."""
        out = [RowContext(s.history, s.request.grammar.mask() if s.request.grammar is not None else None)
               if s.history is not None or s.request.grammar is not None else None for s in seqs]
        return out if any(c is not None for c in out) else None

    def logprob(self, seq: Sequence, logits: torch.Tensor, token: int) -> tuple[float, list[tuple[int, float]]] | None:
        """The token's logprob and the top ones at the sequence's exit, when its request asks for them."""
        k = seq.request.sampling.logprobs
        return None if k is None else self.sampler.logprobs(logits, token, k)

    def take(self, seq: Sequence, token: int, logprob: tuple[float, list[tuple[int, float]]] | None = None) -> None:
        """Account for a new token, stream its text, and finish the sequence where it ends."""
        if seq.row is not None:
            seq.row.token = token
        seq.token_ids.append(token)
        if seq.history is not None:
            seq.history.add(token)
        if seq.request.grammar is not None and token not in self.eos:
            seq.request.grammar.accept(token)
        if seq.text.reasoning:
            seq.reasoning_tokens += 1
        if token in self.eos and not seq.request.ignore_eos:
            self.finish(seq, "stop")
            return
        delta, stopped = seq.text.add(token)
        # one event per token, empty or not: streams show the real token cadence (a byte-level
        # tokenizer often needs several tokens before any text decodes)
        self.outbox.append((seq.handle, Delta(delta.content, delta.reasoning, token, logprob)))
        if stopped:
            self.finish(seq, "stop")
        elif len(seq.token_ids) >= seq.request.max_tokens:
            self.finish(seq, "length")

    def deliver(self) -> None:
        """Push the outbox's events to their handlers' loops."""
        outbox, self.outbox = self.outbox, []
        for handle, event in outbox:
            handle.push(event)

    def finish(self, seq: Sequence, reason: str) -> None:
        tail = seq.text.flush()
        if tail:
            self.outbox.append((seq.handle, tail))
        self.release(seq)  # first: whoever hears of the end finds the rows free
        self.outbox.append((seq.handle, Finished(reason, len(seq.request.prompt_ids), len(seq.token_ids), seq.reasoning_tokens,
                                                 tuple(seq.token_ids), None if seq.draft is None else dict(seq.draft.counts),
                                                 seq.request.timeline.cached_tokens)))
        if seq.draft is not None and seq.draft.counts:
            c = seq.draft.counts
            log.info("[DYNAMIC GRAPH] %s speculated: %d of %d drafted tokens accepted (%.0f %%), %.2f tokens per verification",
                     seq.request.request_id, c["accepted"], c["drafted"], 100 * c["accepted"] / max(1, c["drafted"]),
                     c["tokens"] / c["verifications"])

    def release(self, seq: Sequence) -> None:
        if seq.done:
            return
        seq.done = True
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.loading:
            self.loading.remove(seq)
        self.stepper.release(seq.number)  # also the rows of a prefill that failed half-way
        seq.row = None
        self.count_kv()
        with self.cond:
            self.active -= 1
            self.metrics.running.set(self.active)
            self.cond.notify()

    def count_kv(self) -> None:
        """Cache bytes per device: allocated (a segment's buffer exists from its first row until its
        engine unloads with no row held), and held by the requests in flight (a row of each segment
        each reaches)."""
        devices = dict.fromkeys(str(c.device) for c in self.stepper.caches)
        self.kv_bytes = Counter(dict.fromkeys(devices, 0))  # every device, zero when nothing is allocated
        self.kv_bytes.update(self.stepper.kv_allocated())
        self.kv_in_use = Counter(dict.fromkeys(devices, 0))
        for cache in self.stepper.caches:
            self.kv_in_use[str(cache.device)] += len(cache.members) * cache.bytes_per_row
        for device in devices:
            self.kv_peak[device] = max(self.kv_peak[device], self.kv_bytes[device])
            self.kv_in_use_peak[device] = max(self.kv_in_use_peak[device], self.kv_in_use[device])

    def kv_per_request(self) -> dict[str, int]:
        """KV bytes one request holds, per path served so far."""
        paths = {p.name: p for p in self.manifest.paths}
        return {name: self.stepper.kv_bytes_per_request(self.exits.depth(paths[name].exit_layer))
                for name in self.path_counts if name in paths}

    def prefix_stats(self) -> dict | None:
        """The prefix cache's blocks, bytes and evictions (None when it is off)."""
        prefix = self.stepper.prefix
        if prefix is None:
            return None
        return {"block_tokens": prefix.block_tokens, "blocks": sum(len(r) for r in prefix.recent),
                "capacity_blocks": sum(p.blocks for p in prefix.pools), "used_bytes": prefix.bytes_used(),
                "allocated_bytes": prefix.bytes_allocated(), "evicted_blocks": prefix.evicted}

    def reset_peaks(self) -> None:
        self.kv_in_use_peak = Counter(self.kv_in_use)
        self.kv_peak = Counter(self.kv_bytes)
