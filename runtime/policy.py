"""How deep a request goes: the exit layer of its path.

`heuristic` decides before any engine runs, from an input-complexity score: the length of the
user's text (in characters, so that the score does not depend on the tokenizer: a byte-level one
counts a Chinese character three times), question form and media. `confidence` decides during prefill: the prompt goes through one segment
at a time and stops at the first exit whose head is sure enough of the next token: its top-1
probability reaches that exit's threshold, calibrated by `python -m pipeline calibrate` and read
from the manifest, or `runtime.policy.confidence` at every exit. Either way
the depth chosen at prefill holds for the whole request, so its cache covers the same layers at
every step.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from runtime.config import PolicyConfig

log = logging.getLogger("dyngraph.policy")

POLICIES = ("heuristic", "confidence")
DEFAULT_CONFIDENCE = 0.9  # runtime.policy.confidence for engines without calibrated thresholds
# asking for an explanation or a comparison needs more depth than asking for a fact
REASONING_CUES = re.compile(r"\b(why|how|explain|compare|prove|analy[sz]e|reason|plan)\b|step by step|为什么|如何|怎么|解释|分析|比较|步骤")
QUESTION_MARKS = ("?", "？")


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class PolicyInput:
    text: str  # the last user message's text
    modalities: tuple[str, ...]
    requested: int | None = None  # the request's `exit_layer` (the chat service admits it only with request_override)
    static: bool = False  # static mode: the full graph, whatever the request


@dataclass(frozen=True)
class Decision:
    exit_layer: int | None  # None: left to prefill, where the confidence policy stops at the first exit sure enough
    reason: str

    @property
    def left_to_prefill(self) -> bool:
        return self.exit_layer is None


class DepthPolicy:
    def __init__(self, cfg: PolicyConfig, exit_layers: list[int], exits: dict | None = None):
        """`exits`: the manifest's record of the calibrated exit heads, whose thresholds the confidence policy uses by default."""
        self.cfg, self.exit_layers = cfg, list(exit_layers)
        if cfg.name not in POLICIES:
            raise PolicyError(f"runtime.policy.name={cfg.name!r} is not one of {', '.join(POLICIES)}")
        if cfg.force_exit is not None and cfg.force_exit not in self.exit_layers:
            raise PolicyError(f"runtime.policy.force_exit={cfg.force_exit} is not one of the exported exits {self.exit_layers}")
        if len(cfg.thresholds) != len(self.exit_layers) - 1 or list(cfg.thresholds) != sorted(cfg.thresholds):
            raise PolicyError(f"runtime.policy.thresholds={list(cfg.thresholds)} must be {len(self.exit_layers) - 1} "
                              f"non-decreasing scores, one per exit before the last of {self.exit_layers}")
        if cfg.length_chars < 1:
            raise PolicyError("runtime.policy.length_chars must be positive")
        if cfg.confidence is not None and not 0.0 <= cfg.confidence <= 1.0:
            raise PolicyError(f"runtime.policy.confidence={cfg.confidence} is not a probability")
        calibrated = (exits or {}).get("thresholds") if cfg.confidence is None else None
        # exit layer -> the top-1 probability that stops there (None: never); the last exit always stops
        self.thresholds: dict[int, float | None] = (
            {e: calibrated.get(str(e)) for e in self.exit_layers[:-1]} if calibrated
            else {e: DEFAULT_CONFIDENCE if cfg.confidence is None else cfg.confidence for e in self.exit_layers[:-1]})
        self.source = "calibrated" if calibrated else "runtime.policy.confidence"
        if cfg.name == "confidence":
            shown = ", ".join(f"exit {e}: {'never' if t is None else f'{t:.3g}'}" for e, t in self.thresholds.items())
            log.info("confidence policy, %s top-1 thresholds: %s", self.source, shown)

    def decide(self, x: PolicyInput) -> Decision:
        """Every depth decision, in this order: static mode, the request's own exit, the forced
        exit, the confidence policy (decided during prefill: exit_layer None), the heuristic."""
        if x.static:
            return Decision(self.exit_layers[-1], "static mode")
        if x.requested:
            return Decision(x.requested, "requested by the client")
        if self.cfg.force_exit is not None:
            return Decision(self.cfg.force_exit, "forced by runtime.policy.force_exit")
        if self.cfg.name == "confidence":
            return Decision(None, f"confidence ({self.source} thresholds)")
        score = self.score(x)
        exit_layer = next((e for e, t in zip(self.exit_layers, self.cfg.thresholds) if score < t), self.exit_layers[-1])
        return Decision(exit_layer, f"heuristic score {score:.2f}")

    def score(self, x: PolicyInput) -> float:
        c = self.cfg
        text = x.text.lower()
        question = 1.0 if REASONING_CUES.search(text) else 0.5 if any(q in text for q in QUESTION_MARKS) else 0.0
        score = (c.length_weight * min(1.0, len(x.text) / c.length_chars) + c.question_weight * question
                 + c.image_weight * ("image" in x.modalities) + c.audio_weight * ("audio" in x.modalities))
        return min(1.0, score)

    def confident(self, top1: float, exit_layer: int) -> bool:
        threshold = self.thresholds.get(exit_layer)
        return threshold is not None and top1 >= threshold
