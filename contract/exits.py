"""The exits of an export: exit layer, depth and segment index, converted in one place.

The decoder's layers are cut into segments at the exit layers: segment k (from 0) ends at exit
layers[k], and a sequence that exits there runs k + 1 segments, its depth. The last exit is the
decoder's full depth.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Exits:
    layers: tuple[int, ...]  # the exit layers, increasing; the last is the decoder's depth

    @classmethod
    def of(cls, manifest) -> Exits:
        """The exits of an export (a contract.manifest.Manifest)."""
        return cls(tuple(manifest.model["config"]["text"]["exit_layers"]))

    @property
    def segments(self) -> int:
        return len(self.layers)

    @property
    def first(self) -> int:
        return self.layers[0]

    @property
    def full(self) -> int:
        return self.layers[-1]

    def depth(self, exit_layer: int) -> int:
        """The segments a sequence that exits after `exit_layer` runs."""
        return self.layers.index(exit_layer) + 1

    def layer(self, depth: int) -> int:
        """The exit layer at the end of `depth` segments (segment depth - 1)."""
        return self.layers[depth - 1]
