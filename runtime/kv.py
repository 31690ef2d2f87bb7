"""The KV cache: one fixed buffer per segment, written in place by the segment's engine.

A segment of L layers keeps keys and values [L * 2, rows, kv_heads, capacity, head_dim] on its
device: layer i's keys are plane 2i, its values plane 2i + 1, bound to the engine's
`past_key.i`/`present_key.i` (and `_value`) as one memory (contract.engines.cache_names).
Each sequence that reaches the segment holds one row; rows [0, n) are in use, so a decode step of
n sequences binds the first n rows (or a few more, for a captured batch size: spare rows are
harmless, their writes land where no sequence reads). `lengths` [rows] int32, on the device, is
each row's number of cached entries, which is exactly GroupQueryAttention's `seqlens_k` for a
decode step. A departing sequence's row is filled by the last row's, so rows stay contiguous.

The buffer is allocated when the segment is first needed (a text-only shallow workload never
holds the deep segments' caches) and may be freed again once no row is held: the runtime does so
when the segment's engine unloads, since the engine's CUDA graphs are keyed by the buffer's
address and go with it. Its shape never changes while it exists: a row spans the whole capacity
(rows of several capacities cannot share one GroupQueryAttention call, whose past is one
[batch, kv_heads, capacity, head_dim] tensor).

This module is the only one that knows the layout.
"""
from __future__ import annotations

import math
from collections.abc import Hashable

import torch

from contract.engines import cache_names
from exporters import host_values


class SegmentCache:
    def __init__(self, layers: int, rows: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.layers, self.rows, self.capacity = layers, rows, capacity
        self.names = cache_names(layers)
        self.shape = (layers * 2, rows, kv_heads, capacity, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.buffer: torch.Tensor | None = None  # allocated by the first row (or capture), freed by free()
        self.lengths: torch.Tensor | None = None
        self.members: list[Hashable] = []  # row -> the sequence holding it
        self.views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # feeds() per row range, while the buffer lasts

    @property
    def bytes_per_row(self) -> int:
        return math.prod(self.shape) // self.rows * self.dtype.itemsize

    @property
    def allocated_bytes(self) -> int:
        return 0 if self.buffer is None else self.rows * self.bytes_per_row

    def allocate(self) -> None:
        if self.buffer is None:
            # zeroed: spare rows of a captured batch read their (masked) entries, and NaN would survive a zero weight
            self.buffer = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            self.lengths = torch.zeros(self.rows, dtype=torch.int32, device=self.device)
            self.views = {}

    def free(self) -> bool:
        """Give the buffer back when no row is held; True when it was."""
        if self.buffer is None or self.members:
            return False
        self.buffer = self.lengths = None
        self.views = {}
        return True

    def feeds(self, rows: slice) -> dict[str, torch.Tensor]:
        """past_key.i / past_value.i of these rows: views into the buffer, bound in place. Made once per
        row range and kept (a decode step binds the same rows every step; the caller must not change them)."""
        self.allocate()
        views = self.views.get((rows.start, rows.stop))
        if views is None:
            views = self.views[rows.start, rows.stop] = {past: self.buffer[j, rows] for j, (past, _) in enumerate(self.names)}
        return views

    def row(self, key: Hashable) -> int:
        return self.members.index(key)

    def add(self, key: Hashable) -> int:
        if len(self.members) == self.rows:
            raise RuntimeError(f"all {self.rows} cache rows are in use")
        self.allocate()
        self.members.append(key)
        row = len(self.members) - 1
        self.lengths[row] = 0
        return row

    def remove(self, key: Hashable) -> None:
        row, last = self.members.index(key), len(self.members) - 1
        if row != last:  # keep rows contiguous: the last sequence moves into the hole
            self.buffer[:, row].copy_(self.buffer[:, last])
            self.lengths[row] = self.lengths[last]
            self.members[row] = self.members[last]
        self.members.pop()
        self.lengths[last] = 0


class BlockPool:
    """One segment's cached prompt blocks (runtime/prefix.py decides which): keys and values
    [L * 2, kv_heads, blocks, block_tokens, head_dim] on the segment's device, the planes of
    SegmentCache's buffer cut into blocks of positions. Allocated at the first block kept."""

    def __init__(self, cache: SegmentCache, block_tokens: int, memory_bytes: float):
        planes, _, kv_heads, _, head_dim = cache.shape
        self.cache, self.block_tokens = cache, block_tokens
        self.bytes_per_block = planes * kv_heads * block_tokens * head_dim * cache.dtype.itemsize
        self.blocks = int(memory_bytes // self.bytes_per_block)  # as many as the memory holds
        self.shape = (planes, kv_heads, self.blocks, block_tokens, head_dim)
        self.buffer: torch.Tensor | None = None

    @property
    def allocated_bytes(self) -> int:
        return 0 if self.buffer is None else self.blocks * self.bytes_per_block

    def positions(self, row: int, first: int, count: int) -> torch.Tensor:
        """Blocks first..first+count of a cache row, as a view [L * 2, kv_heads, count, block_tokens, head_dim]."""
        b = self.block_tokens
        view = self.cache.buffer[:, row, :, first * b:(first + count) * b]
        return view.unflatten(2, (count, b))

    def save(self, row: int, first: int, slots: list[int]) -> None:
        """Keep the row's blocks first, first + 1, ... in these slots."""
        if self.buffer is None:
            self.buffer = torch.empty(self.shape, dtype=self.cache.dtype, device=self.cache.device)
        index = host_values(slots, self.cache.device)
        self.buffer.index_copy_(2, index, self.positions(row, first, len(slots)))

    def load(self, row: int, slots: list[int]) -> None:
        """The row's first len(slots) blocks from these slots (the row's length is the caller's to set)."""
        index = host_values(slots, self.cache.device)
        self.positions(row, 0, len(slots)).copy_(self.buffer.index_select(2, index))
