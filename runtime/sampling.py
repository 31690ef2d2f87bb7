"""Next-token choice for a batch of sequences, each with its own settings and seed.

Only ids the tokenizer can decode are ever chosen: the model's vocabulary is padded past the
tokenizer's (512 against 272 ids for the tiny model, 151552 against GLM-4's 151329), and a
padding id would be text no client can receive.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


GREEDY = SamplingParams(temperature=0.0)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A request's own random stream: the same seed gives the same tokens whatever it is batched with."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


class Sampler:
    """Runs where the logits are: greedy rows take one argmax over the batch, sampled rows draw
    from their own generator on the device, and the ids come back to the host in one copy."""

    def __init__(self, decodable: int):
        self.decodable = decodable  # ids [0, decodable) are the tokenizer's

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
        """logits [B, V] -> one token id per row."""
        logits = logits[:, :self.decodable].float()
        tokens = logits.argmax(-1)  # [B]
        sampled = [row for row, p in enumerate(params) if not p.greedy]
        if sampled:
            draws = torch.stack([self.sample_row(logits[row], params[row], generators[row]) for row in sampled])
            tokens = tokens.index_copy(0, torch.tensor(sampled, device=tokens.device), draws)
        return tokens.tolist()

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
