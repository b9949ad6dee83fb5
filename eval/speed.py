"""Throughput of several models measured side by side: alternating rounds in one process.

Comparing a compressed model's speed with its dense original is only fair when both are timed
under the same conditions. Timed one after the other, a change in machine load, or the first
calls' costs (allocations, kernel selection, cold caches), lands on one model only: on a busy
machine a pruned model once read 0.26× dense, and compress-lm's dense model read 2,106 tokens/s
against 23,945 once warm. So every model is warmed up before any timing, then the models take
turns, round after round, and each one's figure is its median over the rounds.

    speed = side_by_side_throughput({"dense": dense, "pruned": pruned}, {"input_ids": ids}, items=ids.numel())
    speed["pruned"] / speed["dense"]     # the speed-up
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

from eval.errors import require_positive
from eval.measure import median_step_time


def side_by_side_throughput(models: dict[str, nn.Module], inputs: dict[str, Any], items: int, rounds: int = 5,
                            repeats: int = 3, warmup: int = 2) -> dict[str, float]:
    """{name: items per second} of each model's forward on the same `inputs` (model kwargs), which
    hold `items` items (tokens, images).

    `warmup` untimed calls of every model first; then `rounds` rounds in which each model in turn
    makes one untimed call (the previous model's data has left the caches) and `repeats` timed
    ones (their median); the figure is the median over rounds.
    """
    for name, value in (("items", items), ("rounds", rounds), ("repeats", repeats)):
        require_positive(name, value)
    require_positive("warmup", warmup, minimum=0)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(warmup):
                model(**inputs)
        for _ in range(rounds):
            for name, model in models.items():
                times[name].append(median_step_time(lambda m=model: m(**inputs), warmup=1, repeats=repeats))
    return {name: items / statistics.median(t) for name, t in times.items()}
