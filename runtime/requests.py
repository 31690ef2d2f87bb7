"""What a request is to the runtime, and what comes back: the generation request the chat service
builds, the events it receives on its own asyncio loop (Started, each Delta, Finished or Failed),
and the handle they arrive on. The scheduler (runtime/generation.py) consumes the one and produces
the others; serving imports these, never the scheduler.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from contract.manifest import PathRecord
from runtime.sampling import SamplingParams
from runtime.text import Delta


class QueueFull(Exception):
    """No slot and no room in the queue: the request is refused (429)."""


# --- what goes in and what comes out ------------------------------------------------------------


@dataclass
class Timeline:
    """Where a request's time to its first token went: marks on one clock (time.perf_counter), each
    naming the part that ends there, so the parts add up to the time from `start` to the last mark.
    The chat service marks its parts (parse, grammar, tokenize, media; deliver and, streaming, write),
    the engine thread its own (queue, load, encode, embed, each segment, head, sample)."""

    start: float = field(default_factory=time.perf_counter)
    marks: list[tuple[str, float]] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache

    def mark(self, part: str) -> None:
        self.marks.append((part, time.perf_counter()))

    def parts(self) -> dict[str, float]:
        """Seconds per part, in order (a part marked twice counts both times)."""
        out: dict[str, float] = {}
        before = self.start
        for part, at in self.marks:
            out[part] = out.get(part, 0.0) + at - before
            before = at
        return out

    def copy(self) -> Timeline:
        return Timeline(self.start, list(self.marks), self.cached_tokens)


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
    speculative: bool | None = None  # self-speculation for this request; None: runtime.speculation.enabled
    draft_exit: int | None = None  # its draft exit; None: runtime.speculation.draft_exit
    # constrained decoding: this sequence's own matcher (runtime.constrained.Grammar: mask() before each
    # token, accept(token) after); its tokens follow the grammar, at whatever exit the path takes
    grammar: Any = None
    request_id: str = ""
    timeline: Timeline = field(default_factory=Timeline)  # its own, one per choice: the engine marks it

    @property
    def processed(self) -> bool:
        """Whether its logits are processed per token (grammar, penalties, bias) or it wants logprobs:
        such a request does not speculate (its drafts would be chosen from unprocessed logits)."""
        return self.grammar is not None or self.sampling.penalized or self.sampling.logprobs is not None


@dataclass(frozen=True)
class Started:
    path: PathRecord
    engines: list[str]
    devices: dict[str, str]
    mode: str


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    token_ids: tuple[int, ...]  # every sampled id, the one that stopped it included
    speculation: dict[str, int] | None = None  # drafted, accepted, verifications, tokens: when it speculated
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache


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
