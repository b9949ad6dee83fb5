"""Evaluate any in-memory causal LM with lm-evaluation-harness (lm-eval 0.4.x).

    results = run_lm_eval(model, tokenizer, ["slimtune_stdlib_module"],
                          include_path=task_yaml_dir(), limit=200)
    results["results"]["slimtune_stdlib_module"]["acc,none"]

The model is any `nn.Module` that behaves like a transformers causal LM: it has `.config`
and returns an object with `.logits` ([batch, seq, vocab]) when called with input ids. It
need not be a `PreTrainedModel` (QST's wrapper, a pruned model): lm-eval's `HFLM` is given a
thin adapter module around it that supplies what HFLM touches (`.device`, `.config`,
`.tie_weights()`, `.generate`), and a subclass of HFLM that does not query the Hugging Face
Hub for model info. Nothing in lm-eval is patched globally.

Offline first: `HF_DATASETS_OFFLINE=1` / `HF_HUB_OFFLINE=1` are set (unless already set) before
lm-eval and datasets are imported; a task whose data is not available locally gives a
`UserInputError` naming the dataset. Local tasks are YAML files read from `include_path`
(e.g. `dataset_path: json` with `dataset_kwargs: {data_files: {test: /path/test.jsonl}}`).
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eval.errors import UserInputError, require_positive


class CausalLMAdapter(nn.Module):
    """What lm-eval's HFLM expects of `pretrained`, around any causal-LM-like module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model, "config", None) is None:
            raise UserInputError(
                f"{type(model).__name__} has no .config: lm-eval needs a transformers-like causal LM "
                "(with .config and returning .logits)"
            )
        self.wrapped = model
        self.config = model.config

    @property
    def device(self) -> torch.device:
        device = getattr(self.wrapped, "device", None)
        if isinstance(device, torch.device):
            return device
        first = next(self.wrapped.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        dtype = getattr(self.wrapped, "dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
        first = next((p for p in self.wrapped.parameters() if p.is_floating_point()), None)
        return first.dtype if first is not None else torch.float32

    @property
    def name_or_path(self) -> str:
        return getattr(self.config, "_name_or_path", "") or type(self.wrapped).__name__

    def tie_weights(self, *args, **kwargs) -> None:
        """HFLM re-ties input/output embeddings; the model is evaluated exactly as given."""

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return self.wrapped(input_ids=input_ids, **kwargs)

    def generate(self, *args, **kwargs):
        if not hasattr(self.wrapped, "generate"):
            raise UserInputError(
                f"{type(self.wrapped).__name__} has no .generate(): generation tasks need a model that "
                "can generate; use log-likelihood (multiple-choice) tasks instead"
            )
        return self.wrapped.generate(*args, **kwargs)


def _offline_defaults() -> None:
    # datasets reads these when it is first imported; setdefault keeps a user's explicit choice.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _hflm_class():
    from lm_eval.models.huggingface import HFLM

    class InMemoryHFLM(HFLM):
        """HFLM for a model object: model info without asking the Hugging Face Hub."""

        def get_model_info(self) -> dict:
            model = self._model.wrapped if isinstance(self._model, CausalLMAdapter) else self._model
            return {
                "model_num_parameters": sum(p.numel() for p in model.parameters()),
                "model_dtype": str(getattr(self._model, "dtype", "")),
                "model_class": type(model).__name__,
            }

    return InMemoryHFLM


def make_lm(model: nn.Module, tokenizer, batch_size: int = 8, device: str | torch.device | None = None,
            max_length: int | None = None):
    """lm-eval's `HFLM` around an in-memory model (for callers that drive lm-eval themselves)."""
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise UserInputError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    if device is not None and torch.device(device) != CausalLMAdapter(model).device:
        model = model.to(device)
    # HFLM warns at length that an object (not a hub name) was passed: that is the point here.
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        return _hflm_class()(pretrained=CausalLMAdapter(model), tokenizer=tokenizer, batch_size=batch_size,
                             max_length=max_length)
    finally:
        hf_logger.setLevel(level)


def task_manager(include_path: str | Path | list | None = None, include_defaults: bool = True):
    """A TaskManager over `include_path` (checked to exist) and, optionally, lm-eval's own tasks."""
    from lm_eval.tasks import TaskManager

    paths = [] if include_path is None else include_path if isinstance(include_path, (list, tuple)) else [include_path]
    for p in paths:
        if not Path(p).exists():
            raise UserInputError(f"lm-eval include_path {p} does not exist; expected a folder of task YAMLs")
    return TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=include_defaults)


def _resolve_tasks(tasks: list[str], include_path, include_defaults: bool | None):
    """Pick a TaskManager that knows every name in `tasks`; unknown names -> UserInputError.

    With `include_defaults=None` and an `include_path` that defines every requested name, lm-eval's
    ~15k built-in task files are not indexed (seconds saved); otherwise they are.
    """
    if include_defaults is None:
        if include_path is not None:
            local = task_manager(include_path, include_defaults=False)
            if all(t in local.all_tasks for t in tasks):
                return local
        include_defaults = True
    manager = task_manager(include_path, include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, manager.all_tasks, n=5, cutoff=0.6)
            hints.append(f"{t!r}" + (f" (did you mean: {', '.join(close)}?)" if close else ""))
        where = f" in lm-eval's tasks{' or ' + str(include_path) if include_path else ''}"
        raise UserInputError(f"unknown lm-eval task(s) {', '.join(hints)}{where}")
    return manager


def _dataset_names(manager, tasks: list[str]) -> list[str]:
    names = []
    for t in tasks:
        entry = manager.task_index.get(t)
        cfg = (entry.cfg or {}) if entry is not None else {}
        if cfg.get("dataset_path"):
            names.append(f"{t}: {cfg['dataset_path']}" + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else ""))
    return names


def _is_missing_data(error: BaseException) -> bool:
    try:
        from datasets.exceptions import DatasetNotFoundError
    except ImportError:  # pragma: no cover - older datasets
        DatasetNotFoundError = FileNotFoundError  # noqa: N806
    if isinstance(error, (DatasetNotFoundError, FileNotFoundError, ConnectionError)):
        return True
    text = str(error).lower()
    return "offline" in text or "couldn't reach" in text or "doesn't exist on the hub" in text


def run_lm_eval(
    model: nn.Module,
    tokenizer,
    tasks: str | list[str],
    include_path: str | Path | list | None = None,
    num_fewshot: int | None = 0,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    include_defaults: bool | None = None,
    bootstrap_iters: int = 1000,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Evaluate `model` on lm-eval `tasks` and return lm-eval's results dict, made JSON-safe.

    `results["results"][task]` holds the metrics ("acc,none", "acc_norm,none", with
    "..._stderr,none"); `results["n-samples"]`, `results["configs"]`, `results["versions"]` as in
    lm-eval. `limit` caps examples per task (int) or takes a fraction (float < 1). The model is
    evaluated in eval mode and returned to its previous mode afterwards.
    """
    _offline_defaults()
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise UserInputError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    require_positive("batch_size", batch_size)
    manager = _resolve_tasks(tasks, include_path, include_defaults)

    from lm_eval import simple_evaluate

    was_training = model.training
    try:
        lm = make_lm(model, tokenizer, batch_size=batch_size, device=device, max_length=max_length)
        results = simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
            log_samples=False, bootstrap_iters=bootstrap_iters,
        )
    except Exception as e:
        if _is_missing_data(e):
            datasets = "; ".join(_dataset_names(manager, tasks)) or ", ".join(tasks)
            raise UserInputError(
                f"lm-eval could not load the data of {datasets} ({type(e).__name__}: {e}). Offline, a "
                "task's dataset must be in the local Hugging Face datasets cache, or the task YAML must "
                "point at local files (dataset_path: json, dataset_kwargs: {data_files: ...})"
            ) from e
        raise
    finally:
        model.train(was_training)
    return _json_safe(results)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        return obj.item()
    return str(obj)
