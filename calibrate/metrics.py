"""The numbers of a calibration: per exit, top-1 agreement with full depth against the exit's
confidence (the curve a threshold is chosen on, CALM's fixed-sequence rule on point estimates), what
a set of thresholds does as a cascade, where the confidence policy sends requests, and the
heuristic policy's thresholds fitted to the same target."""
from __future__ import annotations

import numpy as np


def agreement_curve(confidence: np.ndarray, agree: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, exit rate, agreement), thresholds from the highest down: exiting at
    confidence >= t, every distinct held-out confidence as t (ties exit together)."""
    order = np.argsort(-confidence, kind="stable")
    c, hits = confidence[order], np.cumsum(agree[order])
    ends = np.append(np.nonzero(c[:-1] != c[1:])[0], len(c) - 1)
    counts = ends + 1
    return c[ends], counts / len(c), hits[ends] / counts


def choose_threshold(thresholds: np.ndarray, rates: np.ndarray, agreements: np.ndarray, target: float, min_rate: float) -> float | None:
    """The lowest threshold that meets `target`, as does every higher one that `min_rate` of the
    positions would exit at (those above rest on too few to test); None: no threshold does."""
    tested = rates >= min_rate
    failed = tested & (agreements < target)
    stop = int(np.argmax(failed)) if failed.any() else len(thresholds)
    passing = np.nonzero(tested[:stop])[0]
    return float(thresholds[passing[-1]]) if len(passing) else None


def curve_points(curve: tuple[np.ndarray, np.ndarray, np.ndarray], n: int = 300) -> dict:
    """At most n points of an agreement curve, evenly spread over its thresholds, for the report and the plots."""
    keep = np.unique(np.linspace(0, len(curve[0]) - 1, n).astype(int))
    return {key: [round(float(v), 6) for v in values[keep]] for key, values in zip(("threshold", "exit_rate", "agreement"), curve)}


def at_threshold(confidence: np.ndarray, agree: np.ndarray, t: float | None) -> dict:
    exits = confidence >= t if t is not None else np.zeros(len(confidence), dtype=bool)
    return {"threshold": t, "exit_rate": float(exits.mean()), "agreement": float(agree[exits].mean()) if exits.any() else None,
            "positions": int(exits.sum())}


def cascade(confidence: list[np.ndarray], agree: list[np.ndarray], thresholds: list[float | None], exit_layers: list[int]) -> dict:
    """The confidence policy over every held-out position: it stops at the first exit whose
    threshold its confidence reaches, else at full depth (which agrees with itself)."""
    n = len(confidence[0])
    remaining = np.ones(n, dtype=bool)
    agreed = np.zeros(n, dtype=bool)
    shares, depth = {}, np.full(n, exit_layers[-1], dtype=float)
    for k, t in enumerate(thresholds):
        stop = remaining & (confidence[k] >= t) if t is not None else np.zeros(n, dtype=bool)
        shares[str(exit_layers[k])] = float(stop.mean())
        agreed[stop] = agree[k][stop]
        depth[stop] = exit_layers[k]
        remaining &= ~stop
    shares[str(exit_layers[-1])] = float(remaining.mean())
    agreed[remaining] = True
    return {"thresholds": thresholds, "exit_share": shares, "agreement": float(agreed.mean()), "mean_layers": float(depth.mean())}


def policy_shares(confidence: np.ndarray, thresholds: list[float | None], exit_layers: list[int]) -> dict:
    """Where the confidence policy sends each request: share per exit layer."""
    where = []
    for conf in confidence:
        k = next((k for k, t in enumerate(thresholds) if t is not None and conf[k] >= t), len(exit_layers) - 1)
        where.append(exit_layers[k])
    return {str(e): float(np.mean([w == e for w in where])) if where else None for e in exit_layers}


def fit_heuristic(scores: np.ndarray, agreement: np.ndarray, counts: np.ndarray, target: float) -> tuple[list[float], list[dict]]:
    """runtime.policy.thresholds from held-out chats: a request exits at the first exit whose
    threshold its heuristic score is below. Exit by exit, the threshold rises over the sorted
    scores as long as the requests it adds to that exit (those between the previous threshold and
    it) keep a reply agreement, weighted by reply length, of at least `target`."""
    cuts = np.append(np.unique(scores), 1.0 + 1e-6)  # a threshold above every score lets everything through
    thresholds, groups, low = [], [], 0.0
    for k in range(agreement.shape[1]):
        chosen = low
        for t in cuts[cuts > low]:
            members = (scores >= low) & (scores < t)
            if not members.any():
                continue
            if np.average(agreement[members, k], weights=counts[members]) < target:
                break
            chosen = float(t)
        members = (scores >= low) & (scores < chosen)
        groups.append({"requests": int(members.sum()),
                       "agreement": float(np.average(agreement[members, k], weights=counts[members])) if members.any() else None})
        thresholds.append(round(chosen, 6))
        low = chosen
    return thresholds, groups
