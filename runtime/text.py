"""A sequence's text: its tokens decoded as they come, reasoning split from the answer, stop strings held back."""
from __future__ import annotations

from dataclasses import dataclass

from model.tokenizer import ChatTokenizer


@dataclass(frozen=True)
class Delta:
    content: str = ""
    reasoning: str = ""
    token: int | None = None  # the id it came from (None: text held back until the end)
    logprob: tuple[float, list[tuple[int, float]]] | None = None  # the id's logprob and the top ids', when asked for

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning)


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
        if not self.stop:
            return Delta(content=piece), False
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
