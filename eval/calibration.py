"""Calibration: input statistics of named modules, gathered with forward pre-hooks.

For each hooked module with input tokens X [N, d] (every token of every calibration batch, the
last dimension being the channel), the statistics a caller may ask for:
    "xtx"      XᵀX [d, d]          (whitening / PCA of the activation-aware objectives)
    "abs_mean" Σ |X| / N per channel [d]   (ASVD's channel scaling)
    "sq_norm"  Σ X² per channel [d]        (the squared L2 norm of each channel, Wanda's ‖x_j‖²)
and always `count` = N and `order` (the position of the module's first call in a forward pass).
All sums are float64: XᵀX adds tens of thousands of outer products and its Cholesky / eigen
factors must be accurate. Results are returned on the CPU whatever `device` accumulated them.

`calibration_texts` chooses the text a causal LM is calibrated on and the held-out text it is
scored on, the same way for every method (pruning, low-rank compression).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from eval.data import load_text_corpus
from eval.errors import UserInputError

STATISTICS = ("xtx", "abs_mean", "sq_norm")


@dataclass
class InputStats:
    """One module's input statistics; the fields not asked for stay None."""

    xtx: torch.Tensor | None = None  # [d, d] float64
    abs_sum: torch.Tensor | None = None  # [d] float64
    sq_norm: torch.Tensor | None = None  # [d] float64
    count: int = 0
    order: int = -1  # position of the module's first call in a forward pass

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate the tokens x [N, d] (float64, on the accumulators' device)."""
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)
        if self.abs_sum is not None:
            self.abs_sum.add_(x.abs().sum(dim=0))
        if self.sq_norm is not None:
            self.sq_norm.add_((x**2).sum(dim=0))
        self.count += x.shape[0]

    def to(self, device) -> InputStats:
        def move(t):
            return None if t is None else t.to(device)

        return InputStats(move(self.xtx), move(self.abs_sum), move(self.sq_norm), self.count, self.order)


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


def _empty_stats(width: int, stats: tuple[str, ...], device) -> InputStats:
    def zeros(*shape):
        return torch.zeros(*shape, dtype=torch.float64, device=device)

    return InputStats(xtx=zeros(width, width) if "xtx" in stats else None,
                      abs_sum=zeros(width) if "abs_mean" in stats else None,
                      sq_norm=zeros(width) if "sq_norm" in stats else None)


@torch.no_grad()
def collect_input_statistics(model: nn.Module, modules: dict[Hashable, nn.Module], batches: Iterable,
                             stats: tuple[str, ...] | list[str], *, device="cpu",
                             progress: bool = True, desc: str = "calibrate") -> dict[Hashable, InputStats]:
    """Run `batches` through `model` (in eval mode) and accumulate each module's input statistics.

    modules: {name: module} (any hashable names); each module's first positional input is hooked.
    stats: which of STATISTICS to accumulate (`count` and `order` always are).
    device: where the float64 sums are accumulated (the CPU by default; the model's device is
    faster on a GPU). batches: see `run_model`.
    """
    unknown = sorted(set(stats) - set(STATISTICS))
    if unknown:
        raise ValueError(f"unknown calibration statistics {unknown}; expected some of {', '.join(STATISTICS)}")
    stats = tuple(stats)
    result: dict[Hashable, InputStats] = {}
    calls: list[Hashable] = []

    def hook(name):
        def fn(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(device, torch.float64)  # [N, d]
            if name not in result:  # width known at the first call (norms have no in_features)
                result[name] = _empty_stats(x.shape[-1], stats, device)
            s = result[name]
            s.add(x)
            if s.order < 0:
                s.order = len(calls)
                calls.append(name)

        return fn

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: _stats_of(result.get(name), modules[name], stats) for name in modules}


def _stats_of(s: InputStats | None, module: nn.Module, stats: tuple[str, ...]) -> InputStats:
    """CPU stats of one module; a module never called gets zeros of its input width (count 0)."""
    if s is not None:
        return s.to("cpu")
    width = getattr(module, "in_features", None)
    if width is None:
        weight = getattr(module, "weight", None)
        width = weight.shape[-1] if weight is not None else 0
    return _empty_stats(width, stats, "cpu")


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


# ---------------------------------------------------------------------------------------------
# Calibration text


def calibration_texts(model_name: str, calib=None, eval_text=None) -> tuple[list[str], list[str], str]:
    """(calibration texts, held-out texts, where the held-out texts came from) for a causal LM.

    `calib` / `eval_text`: a text file or folder (`eval.data.load_text_corpus`). ref-lm brings
    its own: the reference corpus's train split to calibrate on, its test split to score. Any
    other model needs `calib`; without `eval_text` the last tenth of its documents is held out
    (never calibrated on).
    """
    if calib is None and model_name != "ref-lm":
        raise UserInputError("calib (a text file or folder) is required for models other than ref-lm "
                             "(ref-lm calibrates on its own reference corpus)", field="calib")
    if calib is None:
        from eval.reference import reference_corpus

        calib_texts = [d.text for d in reference_corpus("train")]
        if eval_text is None:
            return calib_texts, [d.text for d in reference_corpus("test")], "reference corpus, test split"
    else:
        calib_texts = load_text_corpus(calib)
    if eval_text is not None:
        return calib_texts, load_text_corpus(eval_text), str(eval_text)
    if len(calib_texts) < 2:
        raise UserInputError(f"eval_text (held-out text) is needed: {calib} holds fewer than 2 documents, so none "
                             "can be held out from calibration for perplexity (the last tenth is)", field="eval_text")
    cut = max(1, len(calib_texts) // 10)
    return calib_texts[:-cut], calib_texts[-cut:], f"last {cut} documents of {calib} (held out from calibration)"
