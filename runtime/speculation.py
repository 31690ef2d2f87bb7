"""Self-speculative decoding: draft with an early exit, verify with the deeper segments.

A request whose path runs deeper than the draft exit alternates two phases (LayerSkip's
self-speculation, Draft & Verify):

  draft    m decode steps through the first segments and the shared LM head only, each feeding the
           token drafted before (runtime.step: `Row.draft`); the segments' caches of those layers
           are the full model's (the same weights), and the hidden state at the draft exit of
           every fed position is kept;
  verify   those m positions through the deeper segments as one chunk after the sequence's past
           (`Stepper.verify`): the full path's logits at each position, i.e. its prediction for
           every drafted token.

The longest prefix of drafts the full path agrees with is kept, and the full path's own token
after it, so a cycle yields between 1 and m tokens; the cache entries of the rest are dropped by
each segment's length (`Stepper.truncate`). Greedy requests agree when the draft is the full
path's argmax, so their tokens are the full path's, token for token. Sampled requests keep the
full path's distribution exactly by speculative sampling (Leviathan et al. 2023, Chen et al.
2023): draft d drawn from q is kept with probability min(1, p(d) / q(d)), and the first rejected
position draws from the residual max(0, p - q), renormalised.

This module owns the acceptance rule, the draft length and the bookkeeping; the scheduler
(runtime/generation.py) decides when a sequence drafts and verifies.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from contract.exits import Exits
from runtime.config import SpeculationConfig
from runtime.sampling import Sampler, SamplingParams


class SpeculationConfigError(ValueError):
    """A speculation setting the export cannot honour; the message names the setting."""


def check(cfg: SpeculationConfig, exits: Exits, max_chunk: int, max_head_batch: int) -> None:
    """Refuse settings the engines cannot run, one line each."""
    if cfg.draft_exit is not None:
        draft_exit_depth(cfg.draft_exit, exits, "runtime.speculation.draft_exit")
    most = min(max_chunk, max_head_batch)
    if not 1 <= cfg.draft_tokens <= most:
        raise SpeculationConfigError(f"runtime.speculation.draft_tokens={cfg.draft_tokens} must lie in 1..{most}: a verification "
                                     f"runs the drafted positions as one chunk (the export's seq, {max_chunk}) and scores them "
                                     f"as one batch of the head (its batch, {max_head_batch})")
    if cfg.max_batch < 1:
        raise SpeculationConfigError(f"runtime.speculation.max_batch={cfg.max_batch} must be at least 1")


def draft_exit_depth(exit_layer: int, exits: Exits, name: str) -> int:
    """The segments a draft at this exit runs: an exit short of the last, else one line naming `name`."""
    if exit_layer not in exits.layers[:-1]:
        raise SpeculationConfigError(f"{name}={exit_layer} must be an exit short of the last, one of {list(exits.layers[:-1])}")
    return exits.depth(exit_layer)


@dataclass
class Draft:
    """One sequence's speculation: the tokens drafted since its last verification and its running counts."""

    depth: int  # segments the draft runs
    length: int  # tokens to draft before the next verification
    most: int  # the length's bound (adaptive drafts grow up to it)
    adaptive: bool
    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)  # per drafted token, the q it was drawn from (sampled requests)
    counts: Counter[str] = field(default_factory=Counter)  # drafted, accepted, verifications, tokens (what they yielded)

    def add(self, token: int, probs: torch.Tensor | None) -> None:
        self.tokens.append(token)
        if probs is not None:
            self.probs.append(probs)

    def settle(self, accepted: int, yielded: int) -> Counter[str]:
        """After a verification of the drafts so far: count it (returned too), and choose the next draft length."""
        drafted = len(self.tokens)
        counts = Counter(drafted=drafted, accepted=accepted, verifications=1, tokens=yielded)
        self.counts.update(counts)
        if self.adaptive:
            self.length = min(self.most, self.length + 2) if accepted == drafted else max(1, self.length - 1)
        self.tokens.clear()
        self.probs.clear()
        return counts


def accept(draft: Draft, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           sampler: Sampler) -> tuple[list[int], int]:
    """The tokens a verification yields from the full path's logits [m, V] at the drafted positions
    (row i predicts draft i): the agreed drafts and the full path's token after them; and how many
    drafts were accepted."""
    drafts = draft.tokens
    if params.greedy:
        full = logits[:, :sampler.decodable].argmax(-1).tolist()  # [m]: one copy to the host
        accepted = next((i for i, (d, f) in enumerate(zip(drafts, full)) if d != f), len(drafts))
        return drafts[:accepted] + full[accepted:accepted + 1], accepted
    for i, (d, q) in enumerate(zip(drafts, draft.probs)):
        p = sampler.distribution(logits[i, :sampler.decodable].float(), params)
        u = torch.rand((), device=p.device, generator=generator)
        if u * q[d] <= p[d]:  # kept with probability min(1, p(d) / q(d))
            continue
        residual = (p - q).clamp_(min=0)
        # p and q equal up to rounding leave no residual mass: p itself is then the distribution to draw from
        residual = residual if float(residual.sum()) > 0 else p
        return drafts[:i] + [int(torch.multinomial(residual, 1, generator=generator))], i
    return list(drafts), len(drafts)
