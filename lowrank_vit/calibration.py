"""Calibration: input statistics of the targeted linears, gathered with forward hooks.

For each targeted layer with input tokens X [N, in] (every token of every calibration sample):
    xtx     = XᵀX in float64 [in, in]   (the whitening matrix of the activation-aware objective)
    abs_sum = Σ |X| per input channel    (ASVD's channel scaling)
    count   = N
float64 because XᵀX sums tens of thousands of outer products and its Cholesky factor must be
accurate for the truncation error to equal the dropped singular values.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class InputStats:
    xtx: torch.Tensor  # [in, in] float64
    abs_sum: torch.Tensor  # [in] float64
    count: int = 0
    order: int = field(default=-1)  # position of the layer's first call in a forward pass

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)


def run_model(model: nn.Module, batch) -> object:
    """One forward pass: float tensors are `pixel_values`, integer tensors `input_ids`, dicts kwargs."""
    device = next(model.parameters()).device
    if isinstance(batch, dict):
        return model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    if not torch.is_tensor(batch):
        raise TypeError(f"a calibration batch must be a tensor or a dict of tensors; got {type(batch).__name__}")
    if batch.is_floating_point():
        return model(pixel_values=batch.to(device, next(model.parameters()).dtype))
    return model(input_ids=batch.to(device))


def batch_size_of(batch) -> int:
    tensor = batch if torch.is_tensor(batch) else next(v for v in batch.values() if torch.is_tensor(v))
    return int(tensor.shape[0])


@torch.no_grad()
def collect_input_statistics(model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable, progress: bool = True) -> dict[str, InputStats]:
    """Run `batches` through `model` and accumulate each layer's input statistics."""
    stats = {name: InputStats(torch.zeros(m.in_features, m.in_features, dtype=torch.float64), torch.zeros(m.in_features, dtype=torch.float64)) for name, m in layers.items()}
    calls = []

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, module.in_features).to("cpu", torch.float64)  # [N, in]
            s = stats[name]
            s.xtx.addmm_(x.T, x)
            s.abs_sum.add_(x.abs().sum(dim=0))
            s.count += x.shape[0]
            if s.order < 0:
                s.order = len(calls)
                calls.append(name)

        return fn

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="calibrate", disable=not progress, leave=False):
            run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, module: nn.Module, batches: Iterable, what: str) -> torch.Tensor:
    """The `what` ("input" or "output") of `module` over all batches, flattened to [N, features].

    The forward pass stops right after `module` runs: later layers are not needed.
    """
    chunks = []

    def hook(mod, args, output):
        t = args[0] if what == "input" else output
        chunks.append(t.detach().reshape(-1, t.shape[-1]).float())
        raise _StopForward

    handle = module.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            try:
                run_model(model, batch)
            except _StopForward:
                pass
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(chunks)
