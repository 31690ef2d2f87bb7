"""Constrained decoding: a grammar that a sequence's tokens must follow, enforced by masking the
logits of every id the grammar does not allow next, before the choice (runtime/sampling.py).

The grammar engine is llguidance (Microsoft's, the `guidance` backend of vLLM and SGLang): JSON
schemas and Lark grammars (with JSON schemas and special tokens inside them) compile in
microseconds to milliseconds with no per-vocabulary precomputation, its masks come as the packed
int32 bitmask that torch unpacks on the logits' device, and its wheel is one abi3 binary with no
Python dependencies (xgrammar's pulls in triton and transformers).

The grammar engine's tokenizer is made from the chat tokenizer's own tokenizer.json (byte-level
BPE: llguidance maps each token back to its bytes), with the model's vocabulary size, so that the
padding ids past the tokenizer's (which decode to nothing) are never allowed, and with GLM-4's
three end-of-turn ids as its end tokens: where the grammar is complete, any of them may end the
answer.
"""
from __future__ import annotations

import json
from typing import Any

import llguidance
import torch

from model.tokenizer import ChatTokenizer

# compact JSON as json.dumps writes it: no free whitespace, which a model with random weights could
# emit for ever, and answers that json.loads and a schema validator read back
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class GrammarError(ValueError):
    """A schema or grammar the engine cannot compile; the message says what."""


class GrammarCompiler:
    """Compiles schemas and Lark grammars against one tokenizer, and makes the per-sequence matchers."""

    def __init__(self, tokenizer: ChatTokenizer, model_vocab: int):
        self.eos_ids = tokenizer.eos_ids
        self.tokenizer = llguidance.LLTokenizer(tokenizer.tokenizer.to_str(), n_vocab=model_vocab, eos_token=self.eos_ids)
        self.words = (model_vocab + 31) // 32

    @staticmethod
    def json_schema(schema: dict[str, Any]) -> str:
        """The grammar of JSON text that validates against `schema` (not yet checked: see `check`)."""
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise GrammarError(str(e)) from None

    @staticmethod
    def lark(text: str) -> str:
        try:
            return llguidance.LLMatcher.grammar_from_lark(text)
        except (ValueError, TypeError) as e:
            raise GrammarError(str(e)) from None

    @staticmethod
    def lark_json(schema: dict[str, Any]) -> str:
        """A JSON schema as a Lark `%json{...}` rule body, with the compact JSON options."""
        return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)

    def check(self, grammar: str) -> None:
        """Raises GrammarError with the engine's message where the grammar does not compile."""
        error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if error:
            raise GrammarError("; ".join(m.strip().replace("\n", " ") for m in messages))

    def matcher(self, grammar: str) -> Grammar:
        """A fresh matcher of a checked grammar: one per sequence."""
        m = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return Grammar(m, self.words, self.eos_ids)


class Grammar:
    """One sequence's place in its grammar: the mask of what may come next, and the tokens taken."""

    def __init__(self, matcher: llguidance.LLMatcher, words: int, eos_ids: list[int]):
        self.matcher, self.words, self.eos_ids = matcher, words, eos_ids

    def mask(self) -> torch.Tensor:
        """The ids allowed next as an int32 bitmask [words] on the host. A matcher in error (it never
        should be: only allowed ids are sampled) allows only the end of the answer."""
        out = torch.zeros(self.words, dtype=torch.int32)
        if not self.matcher.is_error():
            self.matcher.unsafe_compute_mask_ptr(out.data_ptr(), out.numel() * out.element_size())
        if self.matcher.is_error() or not bool(out.any()):
            out.zero_()
            for i in self.eos_ids:
                out[i // 32] |= torch.tensor(1 << (i % 32), dtype=torch.int64).to(torch.int32)
        return out

    def accept(self, token: int) -> bool:
        """Advance past a sampled id; False where the grammar did not allow it."""
        return self.matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        return self.matcher.is_accepting()
