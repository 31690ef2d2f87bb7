"""The prefix cache: prompts' keys/values kept by content, for later prompts that start the same way.

A prompt is cut into blocks of `block_tokens` tokens. A block is known by its tokens and by every
block before it, from a root that stands for what the prompt's keys/values also depend on: the
request's media, by content (their cross-attention reads them at every position), and whether the
static graph ran. vLLM's automatic prefix caching hashes that chain; here it is a tree of dicts
keyed by each block's own tokens, so a hit compares the tokens themselves and no collision can
serve another prompt's entries.

Each segment keeps its own copy of a block's entries (runtime.kv.BlockPool, sized from the memory
budget), since a shallow request reaches only the first segments. A prompt's hit at segment k is
its leading blocks cached there, at most as many as at segment k + 1 (which prefills the positions
past its own blocks from segment k's hidden states of them), and short of the prompt's last token,
whose logits only a prefill gives. Blocks go least recently used first, per segment; a block
that goes takes its descendants' entries in that segment with it, since no prompt reaches them
without it. A lookup touches a prompt's blocks from the last to the first, so that of blocks
used together the later ones go first.

Only a prompt's own entries are kept (written by a prefill), not a completion's: a decode step
computes an entry from one token at a time, in other shapes than a prefill, so a completion kept
and reused would not give the uncached answer token for token.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from runtime.kv import BlockPool


@dataclass(eq=False)
class Block:
    tokens: tuple[int, ...]
    parent: Block | None
    children: dict[tuple[int, ...], Block] = field(default_factory=dict)
    slots: dict[int, int] = field(default_factory=dict)  # segment -> its slot in that segment's pool


def media_root(static: bool, pixel_values: torch.Tensor | None, mel: torch.Tensor | None) -> Hashable:
    """What a prompt's keys/values depend on besides its tokens: the graph (static runs both encoders
    on placeholders) and the media's bytes, as a 128-bit digest."""
    digest = hashlib.blake2b(digest_size=16)
    for name, t in (("image", pixel_values), ("audio", mel)):
        if t is not None:
            digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return static, digest.hexdigest()


class PrefixCache:
    def __init__(self, pools: list[BlockPool], block_tokens: int):
        self.pools, self.block_tokens = pools, block_tokens
        self.roots: dict[Hashable, Block] = {}
        self.free = [list(range(p.blocks - 1, -1, -1)) for p in pools]  # per segment, slots no block holds
        self.recent = [OrderedDict() for _ in pools]  # per segment: its blocks, least recently used first
        self.evicted = 0  # blocks given up for room, per segment counted apart

    # --- lookup -----------------------------------------------------------------------------------------

    def match(self, root: Hashable, prompt_ids: list[int], depth: int) -> tuple[list[Block], list[int]]:
        """The prompt's cached blocks, and how many of them each of the first `depth` segments uses:
        those it holds, and no more than any deeper segment uses (a segment prefills the positions
        past its blocks from the hidden states the segment before computed of them), none past the
        block holding the prompt's last token."""
        chain, node, b = [], self.roots.get(root), self.block_tokens
        for i in range((len(prompt_ids) - 1) // b):
            node = node and node.children.get(tuple(prompt_ids[i * b:(i + 1) * b]))
            if node is None:
                break
            chain.append(node)
        counts, n = [], len(chain)
        for k in reversed(range(depth)):
            n = next((i for i, block in enumerate(chain[:n]) if k not in block.slots), n)
            counts.append(n)
        return chain, counts[::-1]

    def load(self, k: int, row: int, chain: list[Block], count: int) -> None:
        """Segment k's cache row takes the chain's first `count` blocks."""
        if count:
            self.pools[k].load(row, [block.slots[k] for block in chain[:count]])
            self.touch(k, chain[:count])

    def touch(self, k: int, blocks: list[Block]) -> None:
        for block in reversed(blocks):
            self.recent[k].move_to_end(block)

    # --- keeping a prompt -------------------------------------------------------------------------------------

    def save(self, root: Hashable, prompt_ids: list[int], k: int, row: int) -> None:
        """Keep the whole blocks of a prompt that segment k's cache row holds, those not kept yet there
        (as many as the pool has room for, in order: a block is of use only after its predecessors)."""
        b = self.block_tokens
        chain, node = [], self.roots.setdefault(root, Block((), None))
        for i in range(len(prompt_ids) // b):
            tokens = tuple(prompt_ids[i * b:(i + 1) * b])
            node = node.children.setdefault(tokens, Block(tokens, node))
            chain.append(node)
        self.touch(k, [block for block in chain if k in block.slots])  # the prompt's own blocks are the last to go
        kept = []
        for i in (i for i, block in enumerate(chain) if k not in block.slots):
            slot = self.slot(k, chain)
            if slot is None:
                break
            chain[i].slots[k] = slot
            self.recent[k][chain[i]] = None
            kept.append(i)
        for first, end in runs(kept):
            self.pools[k].save(row, first, [block.slots[k] for block in chain[first:end]])
        self.touch(k, [block for block in chain if k in block.slots])
        self.prune(node)

    def slot(self, k: int, keep: list[Block]) -> int | None:
        """A free slot of segment k's pool, evicting the least recently used block there for one
        (with its descendants); None when only the prompt's own blocks are left to evict."""
        while not self.free[k]:
            victim = next(iter(self.recent[k]), None)
            if victim is None or victim in keep:
                return None
            self.evict(k, victim)
        return self.free[k].pop()

    def evict(self, k: int, block: Block) -> None:
        stack, seen = [block], []
        while stack:
            b = stack.pop()
            seen.append(b)
            if k in b.slots:
                self.free[k].append(b.slots.pop(k))
                del self.recent[k][b]
                self.evicted += 1
            stack.extend(b.children.values())
        for b in reversed(seen):  # descendants first: a block emptied of entries goes once its children have
            self.prune(b)

    def prune(self, block: Block) -> None:
        """Drop blocks that hold no entries and lead to none, from this one towards the root."""
        while block.parent is not None and not block.slots and not block.children \
                and block.parent.children.get(block.tokens) is block:
            del block.parent.children[block.tokens]
            block = block.parent
        if block.parent is None and not block.children:
            for key, root in list(self.roots.items()):
                if root is block:
                    del self.roots[key]

    # --- what it holds --------------------------------------------------------------------------------------

    def bytes_used(self) -> dict[str, int]:
        """Bytes of kept blocks, per device."""
        return self.per_device([len(recent) * pool.bytes_per_block for pool, recent in zip(self.pools, self.recent)])

    def bytes_allocated(self) -> dict[str, int]:
        return self.per_device([pool.allocated_bytes for pool in self.pools])

    def per_device(self, values: list[int]) -> dict[str, int]:
        """One value per segment's pool, summed per device."""
        out: dict[str, int] = {}
        for pool, value in zip(self.pools, values):
            out[str(pool.cache.device)] = out.get(str(pool.cache.device), 0) + value
        return out

def runs(indices: list[int]) -> list[tuple[int, int]]:
    """Ascending indices as [first, end) runs of consecutive ones."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out
