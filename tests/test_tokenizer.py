"""The built-in byte-level GLM-4 chat tokenizer, its chat template and its stream decoder."""
from __future__ import annotations

import pytest
from tokenizers import decoders

from model.tokenizer import SPECIAL_TOKENS, ChatTokenizer

TEXTS = ["Hello, world!\n", "你是谁?", "emoji 🙂👍🏽 mixed 漢字"]


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer.builtin()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # id == byte value
    assert tok.decode(ids) == text


def test_special_tokens(tok):
    ids = [tok.token_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(256, 256 + len(SPECIAL_TOKENS)))
    assert tok.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert all(256 <= i < tok.vocab_size for i in tok.eos_ids)
    assert tok.eos_ids == [tok.token_id("<|endoftext|>"), tok.token_id("<|user|>"), tok.token_id("<|observation|>")]
    assert tok.encode("a<|user|>b") == [97, tok.token_id("<|user|>"), 98]
    assert tok.decode([97, tok.token_id("<think>"), 98], skip_special_tokens=True) == "ab"
    with pytest.raises(ValueError, match="not in the tokenizer"):
        tok.token_id("<|nope|>")
    with pytest.raises(ValueError, match="outside the tokenizer"):
        tok.decode([97, tok.vocab_size])


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你是谁?"}]
    prompt = "[gMASK]<sop><|system|>\nBe brief.<|user|>\n你是谁?<|assistant|>\n"
    assert tok.decode(tok.apply_chat_template(messages)) == prompt
    assert tok.apply_chat_template(messages) == tok.encode(prompt)
    thinking = tok.apply_chat_template(messages, enable_thinking=True)
    assert thinking == tok.encode(prompt + "<think>")
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert tok.decode(no_prompt) == "[gMASK]<sop><|system|>\nBe brief.<|user|>\n你是谁?"
    with pytest.raises(ValueError, match="role 'bot'"):
        tok.apply_chat_template([{"role": "bot", "content": "hi"}])


def stream(tok: ChatTokenizer, ids: list[int]) -> list[str]:
    decoder = tok.stream_decoder()
    return [decoder.step(i) for i in ids]


@pytest.mark.parametrize("fallback", [False, True], ids=["DecodeStream", "fallback"])
def test_stream_decoder(tok, monkeypatch, fallback):
    if fallback:
        monkeypatch.delattr(decoders, "DecodeStream", raising=False)
    text = "a你是谁?🙂<|assistant|>\n" + TEXTS[2]
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text
    # each 3-byte character appears whole on its third byte, nothing before
    assert pieces[1:5] == ["", "", "你", ""]


def test_from_dir(tok, tmp_path):
    tok.tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = ChatTokenizer.from_dir(tmp_path)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.eos_ids == tok.eos_ids
    messages = [{"role": "user", "content": "你是谁?"}]
    assert loaded.apply_chat_template(messages, enable_thinking=True) == tok.apply_chat_template(messages, enable_thinking=True)


def test_from_dir_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        ChatTokenizer.from_dir(tmp_path)
    # a tokenizer.json whose chat specials are not GLM-4's
    (tmp_path / "tokenizer.json").write_text(tok.tokenizer.to_str().replace('"<|user|>"', '"<|someone|>"'))
    with pytest.raises(ValueError, match=r"lacks the GLM-4 chat special tokens \['<\|user\|>'\]"):
        ChatTokenizer.from_dir(tmp_path)
