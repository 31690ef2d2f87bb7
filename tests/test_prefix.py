"""The prefix cache (runtime/prefix.py) in-process on the tiny export: a prompt served partly from
cached blocks gives the tokens it gives uncached, on every path and modality set, under eviction
and with requests sharing a prefix at once."""
from __future__ import annotations

import pytest

from runtime.config import PolicyConfig, PrefixCacheConfig
from runtime.requests import Finished
from tests.test_runtime import EXITS, engines, media, request, running, tok  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = ("You are a phone agent. Tools: open_app(name), tap(x, y), type(text), swipe(direction), back(), home(). "
          "Answer in one short sentence, then call one tool.")
BLOCK = 4
CHUNK = 8  # prefill chunks far shorter than the export's: the cached prefix ends inside a chunk


def cache(memory_gb: float = 0.01, enabled: bool = True, exact: bool = False) -> PrefixCacheConfig:
    """Reuse in blocks (exact=false) unless asked: on the CPU in fp32 that gives the uncached tokens too."""
    return PrefixCacheConfig(enabled=enabled, block_tokens=BLOCK, memory_gb=memory_gb, exact=exact)


def chat(tok, system: str, user: str, n: int = 8, modalities=("text",), pixels=None, mel=None, exit_layer=None):
    prompt = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}])
    req = request(tok, "", n, modalities, pixels, mel, exit_layer=exit_layer)
    req.prompt_ids = prompt
    return req


def start(running, **kw):
    r = running(policy=PolicyConfig(request_override=True), **kw)
    r.engine.stepper.chunk = CHUNK
    return r


def finished(events) -> Finished:
    return events[-1]


MODALITIES = [("text",), ("text", "image"), ("text", "audio"), ("text", "image", "audio")]


@pytest.mark.parametrize("modalities", MODALITIES, ids=["+".join(m) for m in MODALITIES])
def test_cached_prompts_give_the_uncached_tokens_on_every_path(running, tok, media, modalities):
    pixels = media[0] if "image" in modalities else None
    mel = media[1] if "audio" in modalities else None
    cached, plain = start(running, prefix_cache=cache()), start(running, prefix_cache=cache(enabled=False))
    for exit_layer in EXITS:
        first = chat(tok, SYSTEM, "打开微信", modalities=modalities, pixels=pixels, mel=mel, exit_layer=exit_layer)
        second = chat(tok, SYSTEM, "Who are you?", modalities=modalities, pixels=pixels, mel=mel, exit_layer=exit_layer)
        # each exit adds a segment none of the earlier prompts reached: its first prompt finds nothing to reuse
        assert finished(cached.run(first)[0]).cached_tokens == 0
        hit = finished(cached.run(second)[0])
        shared = next(i for i, (a, b) in enumerate(zip(first.prompt_ids, second.prompt_ids)) if a != b)
        assert hit.cached_tokens == shared // BLOCK * BLOCK > 0  # whole blocks only: a partial block is prefilled
        assert hit.token_ids == finished(plain.run(second)[0]).token_ids


def test_a_prompt_that_is_exactly_a_cached_prompt_prefills_its_last_token(running, tok):
    cached, plain = start(running, prefix_cache=cache()), start(running, prefix_cache=cache(enabled=False))
    req = chat(tok, SYSTEM, "现在几点了?")
    assert finished(cached.run(req)[0]).cached_tokens == 0
    again = finished(cached.run(req)[0])
    n = len(req.prompt_ids)
    assert again.cached_tokens == (n - 1) // BLOCK * BLOCK  # the last token's logits come from a prefill
    assert again.token_ids == finished(plain.run(req)[0]).token_ids


def test_a_deeper_request_reuses_only_blocks_every_segment_it_runs_holds(running, tok):
    cached, plain = start(running, prefix_cache=cache()), start(running, prefix_cache=cache(enabled=False))
    cached.run(chat(tok, SYSTEM, "Say hello.", exit_layer=6))  # the prefix, in segment 0 only
    deep = chat(tok, SYSTEM, "What can you do?", exit_layer=24)
    assert finished(cached.run(deep)[0]).cached_tokens == 0
    again = chat(tok, SYSTEM, "返回主屏幕", exit_layer=24)
    hit = finished(cached.run(again)[0])
    assert hit.cached_tokens > 0 and hit.token_ids == finished(plain.run(again)[0]).token_ids


def test_media_key_their_blocks_by_content(running, tok, media):
    pixels, mel = media
    cached = start(running, prefix_cache=cache())
    cached.run(chat(tok, SYSTEM, "Describe it.", modalities=("text", "image"), pixels=pixels))
    other = pixels.flip(-1)
    assert finished(cached.run(chat(tok, SYSTEM, "Describe it!", modalities=("text", "image"), pixels=other))[0]).cached_tokens == 0
    assert finished(cached.run(chat(tok, SYSTEM, "Describe it!", modalities=("text",)))[0]).cached_tokens == 0
    assert finished(cached.run(chat(tok, SYSTEM, "What is it?", modalities=("text", "image"), pixels=pixels.clone()))[0]).cached_tokens > 0


def test_eviction_under_a_small_budget_keeps_answers_exact(running, tok):
    plain = start(running, prefix_cache=cache(enabled=False))
    assert start(running, prefix_cache=cache(memory_gb=0)).engine.stepper.prefix is None  # no room for a block: no cache
    per_block = start(running, prefix_cache=cache()).engine.stepper.prefix.pools[0].bytes_per_block
    segments = len(EXITS)
    small = start(running, prefix_cache=cache(memory_gb=6 * per_block * segments / 2**30))  # six blocks a segment
    prompt_blocks = len(chat(tok, SYSTEM, "x").prompt_ids) // BLOCK
    assert all(p.blocks == 6 for p in small.engine.stepper.prefix.pools) and prompt_blocks > 6
    for name in ("alpha", "beta", "alpha"):  # each system prompt evicts the one before
        system = f"Your name is {name}; never reveal it. {SYSTEM}"
        for user in ("Who are you?", "Who are you, really?"):
            req = chat(tok, system, user, exit_layer=24)
            got = finished(small.run(req)[0])
            assert got.token_ids == finished(plain.run(req)[0]).token_ids
        assert got.cached_tokens == 6 * BLOCK  # the first six blocks: a block is of use only after those before it
    stats = small.engine.prefix_stats()
    assert stats["evicted_blocks"] > 0 and stats["blocks"] <= stats["capacity_blocks"] == 6 * segments
    stack = [child for root in small.engine.stepper.prefix.roots.values() for child in root.children.values()]
    while stack:  # evicted blocks leave no empty nodes behind: every block holds entries or leads to some
        block = stack.pop()
        assert block.slots or block.children
        stack.extend(block.children.values())


def test_concurrent_requests_sharing_a_prefix_keep_their_tokens(running, tok):
    cached, plain = start(running, prefix_cache=cache()), start(running, prefix_cache=cache(enabled=False))
    users = ["你是谁?", "今天星期几?", "Who are you?", "打开微信", "What can you do?"]
    reqs = [chat(tok, SYSTEM, u, exit_layer=e) for u, e in zip(users, [6, 12, 24, 18, 24])]
    got = [finished(ev) for ev in cached.run(*reqs)]
    want = [finished(ev) for ev in plain.run(*[chat(tok, SYSTEM, u, exit_layer=e) for u, e in zip(users, [6, 12, 24, 18, 24])])]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert sum(g.cached_tokens for g in got) > 0  # admitted one at a time: the later ones find the first's blocks


def test_cached_prompts_with_padded_prefill_chunks_give_the_uncached_tokens(running, tok):
    """The GPU placements' prefill: chunks padded to fixed lengths (runtime.prefill_padding), the cached
    prefix ending inside a padded chunk."""
    cached = start(running, prefix_cache=cache(), prefill_padding=True)
    plain = start(running, prefix_cache=cache(enabled=False), prefill_padding=True)
    for exit_layer in (6, 24):
        cached.run(chat(tok, SYSTEM, "打开微信", exit_layer=exit_layer))
        second = chat(tok, SYSTEM, "Who are you?", exit_layer=exit_layer)
        hit = finished(cached.run(second)[0])
        assert hit.cached_tokens > 0 and hit.token_ids == finished(plain.run(second)[0]).token_ids


def test_an_exact_cache_reuses_and_keeps_whole_prefill_chunks_only(running, tok):
    """runtime.prefix_cache.exact: every reused position was computed in a whole chunk, and the rest is
    prefilled from a chunk boundary, in the shapes of the uncached prefill (the same bits on a GPU)."""
    cached, plain = start(running, prefix_cache=cache(exact=True)), start(running, prefix_cache=cache(enabled=False))
    first = chat(tok, SYSTEM, "打开微信", exit_layer=24)
    assert finished(cached.run(first)[0]).cached_tokens == 0
    second = chat(tok, SYSTEM, "Who are you?", exit_layer=24)
    hit = finished(cached.run(second)[0])
    shared = next(i for i, (a, b) in enumerate(zip(first.prompt_ids, second.prompt_ids)) if a != b)
    assert hit.cached_tokens == shared // CHUNK * CHUNK > 0
    assert hit.token_ids == finished(plain.run(second)[0]).token_ids
    stats = cached.engine.prefix_stats()
    assert stats["blocks"] % (CHUNK // BLOCK) == 0  # only blocks of whole chunks are kept, in every segment


def test_an_exact_cache_needs_blocks_that_divide_the_prefill_chunk(engines, tok):
    from runtime.generation import EngineConfigError
    from tests.test_runtime import make_engine

    with pytest.raises(EngineConfigError, match="block_tokens=24 must divide the export's prefill chunk"):
        make_engine(engines, tok, prefix_cache=PrefixCacheConfig(block_tokens=24, exact=True))
