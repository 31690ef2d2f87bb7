"""The KV cache: one fixed buffer per segment, written in place by the segment's engine.

A segment of L layers keeps keys and values [L * 2, rows, kv_heads, capacity, head_dim] on its
device, allocated once: layer i's keys are plane 2i, its values plane 2i + 1, bound to the
engine's `past_key.i`/`present_key.i` (and `_value`) as one memory (pipeline.engines.cache_names).
Each sequence that reaches the segment holds one row; rows [0, n) are in use, so a decode step of
n sequences binds the first n rows (or a few more, for a captured batch size: spare rows are
harmless, their writes land where no sequence reads). `lengths` [rows] int32, on the device, is
each row's number of cached entries, which is exactly GroupQueryAttention's `seqlens_k` for a
decode step. A departing sequence's row is filled by the last row's, so rows stay contiguous.

This module is the only one that knows the layout.
"""
from __future__ import annotations

from collections.abc import Hashable

import torch

from contract.engines import cache_names


class SegmentCache:
    def __init__(self, layers: int, rows: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.layers, self.rows, self.capacity = layers, rows, capacity
        self.names = cache_names(layers)
        # zeroed: spare rows of a captured batch read their (masked) entries, and NaN would survive a zero weight
        self.buffer = torch.zeros(layers * 2, rows, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.int32, device=device)
        self.members: list[Hashable] = []  # row -> the sequence holding it

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def bytes_per_row(self) -> int:
        return self.buffer[:, 0].numel() * self.buffer.element_size()

    def feeds(self, rows: slice) -> dict[str, torch.Tensor]:
        """past_key.i / past_value.i of these rows: views into the buffer, bound in place."""
        return {past: self.buffer[j, rows] for j, (past, _) in enumerate(self.names)}

    def row(self, key: Hashable) -> int:
        return self.members.index(key)

    def add(self, key: Hashable) -> int:
        if len(self.members) == self.rows:
            raise RuntimeError(f"all {self.rows} cache rows are in use")
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
