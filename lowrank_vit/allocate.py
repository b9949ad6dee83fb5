"""Rank allocation under a global parameter budget.

A layer of shape [out=m, in=n] at rank r with a residual term of rank k costs (r + k)(m + n)
weight parameters, unless that is not smaller than the dense m·n: then it stays dense (cost m·n,
no error). A rank of `None` below means "stays dense".

Mixed rank (global greedy): every singular value is an item with cost (m + n) and gain
σᵢ²/‖XWᵀ‖² (its share of that layer's output energy, so layers of different scale compare).
Every layer starts at `min_rank`; items are then taken best gain first while they fit. An item
that does not fit ends its layer (the layer's later items need it first), and the search goes on
with the other layers, so the result fills the budget as far as any single item can: no layer's
next item fits in what is left. Items of one layer come in descending σ, so taking them in gain
order always takes a prefix of each layer's spectrum.
"""

from __future__ import annotations

import heapq
import math

import torch

from eval.errors import UserInputError


def layer_cost(rank: int | None, shape: tuple[int, int], residual_rank: int = 0) -> int:
    """Weight parameters of a layer [out, in] at `rank` (None = dense)."""
    m, n = shape
    if rank is None:
        return m * n
    return min((rank + residual_rank) * (m + n), m * n)


def is_dense(rank: int, shape: tuple[int, int], residual_rank: int = 0) -> bool:
    """True when the low-rank form would not be smaller than the dense weight."""
    m, n = shape
    return (rank + residual_rank) * (m + n) >= m * n


def budget(shapes: dict[str, tuple[int, int]], keep: float) -> int:
    """Parameters allowed for the targeted layers: floor(keep · Σ m·n)."""
    return math.floor(keep * sum(m * n for m, n in shapes.values()) + 1e-9)


def total_cost(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]], residual_rank: int = 0) -> int:
    return sum(layer_cost(ranks[name], shapes[name], residual_rank if ranks[name] is not None else 0) for name in ranks)


def greedy_ranks(
    shapes: dict[str, tuple[int, int]],
    gains: dict[str, torch.Tensor],
    budget_params: int,
    residual_rank: int = 0,
    min_rank: int = 1,
) -> dict[str, int | None]:
    """Global greedy: per-layer ranks (None = dense) whose total cost is at most `budget_params`."""
    ranks: dict[str, int | None] = {}
    for name, shape in shapes.items():
        ranks[name] = None if is_dense(min_rank, shape, residual_rank) else min_rank
    spent = total_cost(ranks, shapes, residual_rank)
    if spent > budget_params:
        dense = sum(m * n for m, n in shapes.values())
        raise UserInputError(
            f"keep={budget_params / dense:.4f} is too small: every targeted layer at rank {min_rank}"
            + (f" plus a residual of rank {residual_rank}" if residual_rank else "")
            + f" already needs {spent} parameters ({spent / dense:.4f} of {dense}); raise keep or lower min_rank/residual_rank"
        )
    # Max-heap of (−gain of the layer's next singular value, name).
    heap = []
    for name, rank in ranks.items():
        if rank is not None:
            heapq.heappush(heap, (-float(gains[name][rank]), name))
    while heap:
        _, name = heapq.heappop(heap)
        rank, shape = ranks[name], shapes[name]
        new_rank = None if is_dense(rank + 1, shape, residual_rank) else rank + 1
        delta = layer_cost(new_rank, shape, residual_rank) - layer_cost(rank, shape, residual_rank)
        if spent + delta > budget_params:
            continue  # this layer is done; smaller steps elsewhere may still fit
        ranks[name], spent = new_rank, spent + delta
        if new_rank is not None:
            heapq.heappush(heap, (-float(gains[name][new_rank]), name))
    return ranks


def uniform_ranks(shapes: dict[str, tuple[int, int]], keep: float, min_rank: int = 1) -> dict[str, int | None]:
    """The same parameter fraction in every layer: rank = floor(keep · m·n / (m + n))."""
    ranks: dict[str, int | None] = {}
    for name, (m, n) in shapes.items():
        if keep >= 1.0:
            ranks[name] = None
            continue
        rank = max(min_rank, math.floor(keep * m * n / (m + n)))
        ranks[name] = None if is_dense(rank, (m, n)) else rank
    return ranks
