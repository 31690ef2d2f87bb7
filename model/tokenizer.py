"""GLM-4 chat tokenizer on the `tokenizers` library.

Two sources: a checkpoint's tokenizer.json (the real GLM-4 vocabulary), or `builtin()`, a
byte-level tokenizer that needs no download, so that tests, CI and the tiny model can run a
whole chat with random weights: ids 0..255 are the bytes, the GLM-4 chat specials follow.
`train_bpe` makes a third kind, a byte-level BPE of a local corpus (scripts/build_corpus.py --code)
for models trained here.
Either way the chat template is GLM-4's, built from token ids (not from a Jinja template) so
that the runtime needs nothing from transformers.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

# GLM-4's chat specials, in the order builtin() assigns them ids from 256 on
SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_audio|>", "<|end_of_audio|>",
    "<think>", "</think>",
]
ROLES = ("system", "user", "assistant", "observation")
# GLM-4 ends a turn by starting the next one: the user's, or a tool's answer for a function call
EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
# what apply_chat_template and eos_ids need; from_dir refuses a tokenizer.json without them
CHAT_TOKENS = ("[gMASK]", "<sop>", *(f"<|{r}|>" for r in ROLES), "<|endoftext|>")
# GLM-4's system turn for tools, as its tokenizer_config.json chat template writes it (glm-4-9b-chat)
TOOLS_INTRO = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
               "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
TOOL_CALL_HINT = "在调用上述函数时，请使用 Json 格式表示调用的参数。"


def tools_system_prompt(functions: list[dict[str, Any]]) -> str:
    """The system turn that lists the functions (OpenAI's `function` objects: name, description,
    parameters), each as `## name` and its JSON, as GLM-4's template writes it."""
    parts = [TOOLS_INTRO]
    for f in functions:
        parts.append(f"\n\n## {f['name']}\n\n{json.dumps(f, indent=4, ensure_ascii=False)}\n{TOOL_CALL_HINT}")
    return "".join(parts)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer emits."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


class StreamDecoder:
    """Text of a token stream, one id at a time, never cutting a UTF-8 character in half.

    `step` returns the text that the new id completes, or "" while a character is still partial
    (a byte-level vocabulary spreads a CJK character or an emoji over several ids).
    """

    def __init__(self, tokenizer: ChatTokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""
        self.vocab_size = tokenizer.vocab_size
        stream_type = getattr(decoders, "DecodeStream", None)  # tokenizers >= 0.21
        self.stream = stream_type(skip_special_tokens=skip_special_tokens) if stream_type else None

    def step(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            self.tokenizer.check_ids([token_id])
        if self.stream is not None:
            return self.stream.step(self.tokenizer.tokenizer, token_id) or ""
        # fallback: decode everything so far, hold back an unfinished character (decoded as U+FFFD)
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new


class ChatTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        missing = [t for t in CHAT_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the GLM-4 chat special tokens {missing}")

    @classmethod
    def builtin(cls) -> ChatTokenizer:
        """Byte-level tokenizer: id == byte value for 0..255, no merges, then the chat specials."""
        vocab = {char: byte for byte, char in bytes_to_unicode().items()}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        # no regex split and no prefix space: every byte of the text becomes exactly one id
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
        return cls(tok)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> ChatTokenizer:
        """A byte-level BPE trained on `texts`, `vocab_size` ids in all: the chat specials take ids
        0..15, so that a model whose vocabulary is `vocab_size` decodes every id it can sample.
        The `tokenizers` trainer is deterministic: the same texts in the same order give the same file."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"a byte-level BPE needs at least {256 + len(SPECIAL_TOKENS)} ids (256 bytes and the chat specials), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[AddedToken(t, special=True) for t in SPECIAL_TOKENS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTokenizer:
        """The tokenizer.json of a checkpoint directory."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"no tokenizer.json in {path}")
        return cls(Tokenizer.from_file(str(file)))

    def save(self, directory: str | Path) -> Path:
        """tokenizer.json in `directory`, the file from_dir reads."""
        path = Path(directory) / "tokenizer.json"
        self.tokenizer.save(str(path))
        return path

    @property
    def vocab_size(self) -> int:
        """Ids it can decode; the model's vocabulary may be larger (sampling masks the rest)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_ids(self) -> list[int]:
        return [self.token_id(t) for t in EOS_TOKENS]

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        # no post-processor specials: GLM-4's tokenizer.json would prepend [gMASK]<sop> to every piece
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode of each text, the batch spread over the cores by `tokenizers`."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def check_ids(self, ids: list[int]) -> None:
        # the tokenizers library silently drops unknown ids; an id past the vocabulary is a sampling bug
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the tokenizer's {self.vocab_size} ids")

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.check_ids(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], enable_thinking: bool = False, add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None, call_tools: bool = False,
    ) -> list[int]:
        """GLM-4's prompt: [gMASK]<sop>, then <|role|>\\n{content} per message, then <|assistant|>\\n.

        With enable_thinking the prompt ends inside "<think>", so the model starts by reasoning.
        The result equals `encode` of the template's text: the specials split the text anyway.

        Tools, in GLM-4's own format: `tools` (OpenAI function objects) make a first system turn that
        lists them; an assistant message's `tool_calls` ([{"name", "arguments"}], arguments a JSON
        string) are turns of their own, `<|assistant|>{name}\\n{arguments}` (its content, if any,
        comes first as a turn of its own); a tool's result is an `observation` turn. With
        `call_tools` the prompt ends at `<|assistant|>`: the model's first line is then a function
        name (a call, arguments on the next line) or empty (an answer in text); without it the
        newline is in the prompt and the answer is text.
        """
        ids = [self.token_id("[gMASK]"), self.token_id("<sop>")]
        if tools:
            ids += [self.token_id("<|system|>"), *self.encode("\n" + tools_system_prompt(tools))]
        for message in messages:
            role, content = message["role"], message["content"]
            if role not in ROLES:
                raise ValueError(f"chat role {role!r} is not one of {ROLES}")
            if not isinstance(content, str):
                raise ValueError(f"chat content of a {role} message must be a string, got {type(content).__name__}")
            calls = message.get("tool_calls") or []
            if content or not calls:
                ids += [self.token_id(f"<|{role}|>"), *self.encode("\n" + content)]
            for call in calls:
                ids += [self.token_id("<|assistant|>"), *self.encode(f"{call['name']}\n{call['arguments']}")]
        if add_generation_prompt:
            ids.append(self.token_id("<|assistant|>"))
            if not call_tools:
                ids += self.encode("\n")
            if enable_thinking:
                ids.append(self.token_id("<think>"))
        return ids
