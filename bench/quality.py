"""The bench's quality column: the share of generated tokens equal to full depth's greedy output
on the same prompts, next to the latency and energy that early exits save.

The reference is the static mode's output for each request at the lowest concurrency level (all
layers, greedy with bench.temperature=0, the fewest requests batched together). Every mode and
concurrency level is compared with it, position by position, over the longer of the two outputs:
a token that the mode generated past the reference's end, or that it did not generate, counts
as different. The static mode's own figure at higher concurrency shows what batching alone moves.

Tokens are compared by their text, one streamed chunk per token as the server sends them. A
character spread over several tokens (a byte-level vocabulary's CJK characters) reaches the
client with its last token; the chunks before carry no text, so each of them is labelled with
the character it belongs to. Tokens without text of their own (special tokens) compare equal.
"""
from __future__ import annotations


def token_texts(chunks: list[str]) -> list[str]:
    """One label per token: its text, or for a token that completed no text, the text of the next one that does."""
    labels, pending = [], 0
    for text in chunks:
        if not text:
            pending += 1
            continue
        labels += [text] * (pending + 1)
        pending = 0
    return labels + [""] * pending


def agreement(generated: list[str], reference: list[str]) -> tuple[int, int]:
    """(tokens equal at the same position, tokens compared)."""
    gen, ref = token_texts(generated), token_texts(reference)
    return sum(a == b for a, b in zip(gen, ref)), max(len(gen), len(ref))


def quality_block(blocks: dict, temperature: float) -> dict:
    """Per mode (and its depth-policy settings), the token agreement with full-depth greedy: pooled,
    per concurrency level and per request group. `blocks`: the report's modes."""
    if temperature != 0:
        return {"reason": f"bench.temperature={temperature}: sampled outputs have no greedy reference"}
    if "static" not in blocks:
        return {"reason": "the static mode did not run: its greedy full-depth output is the reference"}
    base = min(blocks["static"]["runs"], key=lambda run: run["concurrency"])
    reference = {r["index"]: r["tokens"] for r in base["requests"] if r["ok"]}
    out: dict = {"reference": f"static mode, concurrency {base['concurrency']}", "modes": {}}
    for mode, block in blocks.items():
        pooled, levels, groups = [0, 0], {}, {}
        for run in block["runs"]:
            level = [0, 0]
            for r in run["requests"]:
                if not r["ok"] or r["index"] not in reference:
                    continue
                same, total = agreement(r["tokens"], reference[r["index"]])
                group = groups.setdefault(r["group"], [0, 0])
                for acc in (pooled, level, group):
                    acc[0] += same
                    acc[1] += total
            levels[str(run["concurrency"])] = share(level)
        settings = [a for a in block["server"]["command"] if a.startswith(("runtime.policy.", "runtime.mode="))]
        out["modes"][mode] = {"token_agreement": share(pooled), "tokens": pooled[1], "per_concurrency": levels,
                              "per_group": {g: share(v) for g, v in sorted(groups.items())}, "settings": settings}
    return out


def share(counts: list[int]) -> float | None:
    return counts[0] / counts[1] if counts[1] else None
