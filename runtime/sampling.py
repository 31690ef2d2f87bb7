"""Next-token choice for a batch of sequences, each with its own settings and seed.

Only ids the tokenizer can decode are ever chosen: the model's vocabulary is padded past the
tokenizer's (512 against 272 ids for the tiny model, 151552 against GLM-4's 151329), and a
padding id would be text no client can receive.

A row's logits are processed on their device before the choice, in this order (a row that asks
for none of it is not touched):

  repetition_penalty   vLLM's: the logit of every id seen in the prompt or the output so far is
                       divided by it where positive, multiplied by it where negative
  frequency_penalty    OpenAI's: minus the penalty times the id's count in the output so far
  presence_penalty     OpenAI's: minus the penalty for every id the output holds at least once
  logit_bias           OpenAI's: plus the bias of each listed id
  grammar mask         constrained decoding (runtime/constrained.py): ids the grammar does not
                       allow next are -inf; the mask is a packed int32 bitmask, unpacked with torch
                       on the logits' device
  temperature, top-k, top-p   then greedy argmax or a draw from the row's own generator

Logprobs (`logprobs(...)`) are the exit's own log-softmax over the decodable ids, before any of
that processing (vLLM's default, raw logprobs): what the path's exit thinks of each token.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch


# a temperature or top_p this small is greedy (as in vLLM): logits / 1e-300 are inf, and a top_p of 1e-300 is 0 in
# float32, which would drop every token; either way the probabilities become NaN
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k likeliest (top_logprobs)

    @property
    def greedy(self) -> bool:
        """The one rule of what is greedy: a temperature or top_p under GREEDY_BELOW, or top_k of 1."""
        return self.temperature < GREEDY_BELOW or self.top_p < GREEDY_BELOW or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Whether its logits are processed by the history of the sequence (penalties) or a bias."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias)


GREEDY = SamplingParams(temperature=0.0)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A request's own random stream: the same seed gives the same tokens whatever it is batched with."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


class TokenHistory:
    """What the penalties read of one sequence, kept on the logits' device and updated a token at a
    time: which ids the prompt or the output holds (repetition) and each id's count in the output."""

    def __init__(self, prompt_ids: list[int], vocab: int, device: torch.device | str):
        self.vocab = vocab
        self.counts = torch.zeros(vocab, device=device)
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        ids = [i for i in prompt_ids if 0 <= i < vocab]
        if ids:
            self.seen[torch.tensor(ids, device=device)] = True

    def add(self, token: int) -> None:
        if 0 <= token < self.vocab:
            self.counts[token] += 1
            self.seen[token] = True


@dataclass
class RowContext:
    """What a row's processing reads besides its SamplingParams: None where it has none."""

    history: TokenHistory | None = None  # penalties
    mask: torch.Tensor | None = None  # the grammar's allowed ids: an int32 bitmask [ceil(V / 32)] on the host


def unpack_bitmask(mask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """An int32 bitmask [W] (bit j of word i: id 32 i + j allowed) -> bool [vocab] on `device`; ids past
    the mask's 32 W are not allowed."""
    words = mask.to(device, non_blocking=True)
    bits = (words.unsqueeze(-1) >> torch.arange(32, device=device, dtype=torch.int32)) & 1  # [W, 32]
    allowed = bits.reshape(-1).bool()
    if allowed.numel() < vocab:
        allowed = torch.cat([allowed, allowed.new_zeros(vocab - allowed.numel())])
    return allowed[:vocab]


class Sampler:
    """Runs where the logits are: greedy rows take one argmax over the batch, sampled rows draw
    from their own generator on the device, and the ids come back to the host in one copy."""

    def __init__(self, decodable: int):
        self.decodable = decodable  # ids [0, decodable) are the tokenizer's

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 contexts: list[RowContext | None] | None = None) -> list[int]:
        """logits [B, V] -> one token id per row; `contexts`: per row, its penalties' history and grammar mask."""
        logits = self.processed(logits, params, contexts)
        tokens = logits.argmax(-1)  # [B]
        sampled = [row for row, p in enumerate(params) if not p.greedy]
        if sampled:
            draws = torch.stack([self.sample_row(logits[row], params[row], generators[row]) for row in sampled])
            tokens = tokens.index_copy(0, torch.tensor(sampled, device=tokens.device), draws)
        return tokens.tolist()

    def processed(self, logits: torch.Tensor, params: list[SamplingParams], contexts: list[RowContext | None] | None) -> torch.Tensor:
        """logits [B, V] -> [B, decodable] float, each row processed as its params and context say (a new
        tensor where any row is: the engines' output buffers stay as they are)."""
        logits = logits[:, :self.decodable].float()
        rows = [i for i, c in enumerate(contexts or ()) if params[i].penalized or (c is not None and c.mask is not None)]
        if not rows:
            return logits
        done = torch.stack([self.process(logits[i], params[i], contexts[i] or RowContext()) for i in rows])
        return logits.index_copy(0, torch.tensor(rows, device=logits.device), done)

    def process(self, x: torch.Tensor, p: SamplingParams, ctx: RowContext) -> torch.Tensor:
        """One row [decodable] through repetition, frequency and presence penalties, logit bias and the grammar mask."""
        h = ctx.history
        if h is not None and p.repetition_penalty != 1.0:
            seen = h.seen[:x.numel()]
            x = torch.where(seen, torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
        if h is not None and (p.frequency_penalty or p.presence_penalty):
            counts = h.counts[:x.numel()]
            x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        if p.logit_bias:
            ids = [(i, b) for i, b in p.logit_bias if 0 <= i < x.numel()]
            if ids:
                x = x.index_add(0, torch.tensor([i for i, _ in ids], device=x.device),
                                torch.tensor([b for _, b in ids], device=x.device, dtype=x.dtype))
        if ctx.mask is not None:
            x = x.masked_fill(~unpack_bitmask(ctx.mask, x.numel(), x.device), float("-inf"))
        return x

    def logprobs(self, logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
        """The exit's own log-probability of `token` from a [V] row, and its `top` likeliest ids with
        theirs (sorted, likeliest first), over the decodable ids: one copy to the host."""
        lp = torch.log_softmax(logits[:self.decodable].float(), -1)
        if top:
            values, ids = torch.topk(lp, min(top, lp.numel()))
            both = torch.cat([lp[token:token + 1], values]).tolist()
            return both[0], list(zip(ids.tolist(), both[1:]))
        return float(lp[token]), []

    def top1_probability(self, logits: torch.Tensor) -> float:
        """The largest next-token probability of a [1, V] row, over the decodable ids (the confidence policy)."""
        return float(torch.softmax(logits[0, :self.decodable].float(), -1).max())

    @staticmethod
    def sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
        """One draw from a [V] row under temperature, top-k and top-p: a 0-d tensor on the row's device."""
        return torch.multinomial(Sampler.distribution(logits, p), 1, generator=generator)[0]

    def draw(self, logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> tuple[int, torch.Tensor]:
        """One draw from a [V] row and the distribution it was drawn from (a speculative draft's q)."""
        probs = self.distribution(logits[:self.decodable].float(), p)
        return int(torch.multinomial(probs, 1, generator=generator)), probs

    @staticmethod
    def distribution(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
        """The probabilities [V] a sampled row draws from: softmax of the logits under temperature, top-k and top-p."""
        x = logits / p.temperature
        if 0 < p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, -1)
            # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is short of it
            drop = probs.cumsum(-1) - probs >= p.top_p
            x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))  # back to id order, without a host sync
        return torch.softmax(x, -1)
