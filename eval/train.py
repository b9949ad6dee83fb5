"""The one training loop every method uses (QST, LoRA/QLoRA, the DISP hypernetwork, low-rank
compensation, recovery fine-tuning).

Plain on purpose (nanoGPT spirit): AdamW over the trainable parameters, linear warm-up then a
constant / linear / cosine schedule, gradient accumulation and clipping, bf16 autocast on CUDA,
a tqdm bar, periodic evaluation and atomic checkpoints that resume bit-exactly.

It is built on `accelerate.Accelerator`, so `accelerate launch --num_processes N script.py`
gives data parallelism: the model is wrapped in DistributedDataParallel and process `r` of `N`
takes micro-batches `r, r+N, r+2N, ...` of every pass over `train_batches` (cut to a multiple
of N batches, so that all processes take the same number).

Usage:

    result = train(model, batches, TrainConfig(max_steps=200, lr=2e-4))
    result = train(model, batches, config, loss_fn=lambda m, b: my_loss(m(**b), b["labels"]))
    result = train(model, batches, config, eval_fn=lambda m: {"acc": acc(m)}, out_dir=out / "ckpt")

Exact resume: a checkpoint holds the trainable parameters, the optimizer and scheduler states,
every RNG state, the step and the position in the data. Rerunning the same call with the same
`out_dir` (and a model rebuilt the same way: frozen weights are not saved) continues from the
last checkpoint and ends with the same weights and loss curve as an uninterrupted run, provided
`train_batches` yields the same batches each pass (a list, or a DataLoader whose shuffling
draws from torch's global RNG: the loop re-seeds it at the start of every pass).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from eval.errors import UserInputError, require_positive, require_positive_number

SCHEDULES = ("constant", "linear", "cosine")
MIXED_PRECISION = ("auto", "no", "bf16")
CHECKPOINT_DIRNAME = "checkpoint"
# Config fields that may change between an interrupted run and its resumption: they do not
# alter the trajectory of the steps already taken (max_steps: "train for longer").
_RESUMABLE_CHANGES = {"max_steps", "eval_every", "checkpoint_every", "log_every"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of `train`. One optimizer step = `grad_accum` micro-batches per process."""

    max_steps: int = 100
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    schedule: str = "constant"
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    mixed_precision: str = "auto"  # "auto": bf16 autocast on CUDA, full precision on CPU
    log_every: int = 1  # the progress bar shows the mean loss of the last `log_every` steps

    def __post_init__(self):
        for name in ("max_steps", "grad_accum", "log_every"):
            require_positive(f"TrainConfig.{name}", getattr(self, name))
        for name in ("eval_every", "checkpoint_every"):  # None: never
            if getattr(self, name) is not None:
                require_positive(f"TrainConfig.{name}", getattr(self, name))
        if not isinstance(self.seed, int):
            raise UserInputError(f"TrainConfig.seed must be an integer, got {self.seed!r}")
        require_positive_number("TrainConfig.lr", self.lr)
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise UserInputError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserInputError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not (0 <= self.warmup_ratio < 1):
            raise UserInputError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.schedule not in SCHEDULES:
            raise UserInputError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.max_grad_norm is not None:
            require_positive_number("TrainConfig.max_grad_norm", self.max_grad_norm)
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserInputError(
                f"TrainConfig.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_ratio * self.max_steps)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Stop when `metric` of `eval_fn` has not improved for `patience` evaluations in a row, and
    end with the trainable parameters of its best evaluation (higher is better when `mode` is
    "max"). Ties keep the earlier evaluation: fewer steps for the same score."""

    metric: str
    patience: int = 3
    mode: str = "max"

    def __post_init__(self):
        require_positive("EarlyStopping.patience", self.patience)
        if self.mode not in ("max", "min"):
            raise UserInputError(f"EarlyStopping.mode must be 'max' or 'min', got {self.mode!r}")

    def improves(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.mode == "max" else value < best


@dataclasses.dataclass
class TrainResult:
    losses: list[float]  # one per optimizer step: mean over its micro-batches (and processes)
    eval_history: list[dict[str, Any]]  # {"step": s, **eval_fn(model)}
    step_times: list[float]  # wall seconds per optimizer step (CUDA-synchronised)
    steps: int  # optimizer steps done in total (including those before a resume)
    resumed_from: int | None = None  # the checkpoint step this run started from, if any
    best_step: int | None = None  # early stopping: the step whose parameters the model ends with
    stopped_early: bool = False  # early stopping ended the run before max_steps

    @property
    def median_step_time(self) -> float:
        return float(np.median(self.step_times)) if self.step_times else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for reports."""
        return {**dataclasses.asdict(self), "median_step_time": self.median_step_time}


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Factor on `config.lr` for optimizer step `step` (0-based): warm-up, then the schedule."""
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, config.max_steps - warmup)
    if config.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    model: nn.Module,
    train_batches: Iterable[dict[str, Any]],
    config: TrainConfig,
    loss_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor] | None = None,
    eval_fn: Callable[[nn.Module], dict[str, Any]] | None = None,
    out_dir: str | Path | None = None,
    desc: str = "train",
    param_groups: list[dict[str, Any]] | None = None,
    run: dict[str, Any] | None = None,
    early_stopping: EarlyStopping | None = None,
) -> TrainResult:
    """Train `model` in place for `config.max_steps` optimizer steps and return the history.

    - `train_batches`: a re-iterable (list, DataLoader) of dicts of tensors; it is cycled as
      epochs until `max_steps`. Tensors are moved to the training device.
    - `loss_fn(model, batch) -> scalar tensor`; default `model(**batch).loss`. Under
      `accelerate launch` the model passed in is the DDP wrapper: call it, and reach its
      attributes through `.module` (or close over the unwrapped model for non-forward parts).
    - `eval_fn(model) -> dict` runs every `eval_every` steps (if set) and after the last step,
      with the unwrapped model in eval mode and gradients off (on every process).
    - `param_groups`: AdamW parameter groups (each a dict with "params" and optional "lr",
      "weight_decay"); default: one group with every parameter that requires grad.
    - `out_dir`: checkpoints go to `out_dir/checkpoint/` every `checkpoint_every` steps and
      after the last step; an existing one is resumed from, only if it belongs to the same
      run: the same config (up to `_RESUMABLE_CHANGES`), the same `run` description (JSON-able,
      e.g. model, task, method, batch, seq) and the same data (a hash of `train_batches` when
      it is a list); anything else is a `UserInputError` saying what differs.
    - `early_stopping`: needs `eval_fn` and `config.eval_every`; the run ends when the metric has
      not improved for `patience` evaluations, and the model keeps its best evaluation's trainable
      parameters (held in memory: not combined with `out_dir` checkpoints).
    """
    from accelerate import Accelerator

    if not isinstance(config, TrainConfig):
        raise UserInputError(f"config must be a TrainConfig, got {type(config).__name__}")
    _check_early_stopping(early_stopping, eval_fn, config, out_dir)
    groups = _param_groups(model, param_groups)
    named_trainable = _named_trainable(model, groups)
    ckpt_dir = Path(out_dir) / CHECKPOINT_DIRNAME if out_dir is not None else None
    identity = _run_identity(run, train_batches) if ckpt_dir is not None else None

    # Mixed precision is done with torch.autocast (in `_optimizer_step`) rather than through
    # Accelerator, so that the caller's model.forward is never patched and repeated calls in one
    # process with different settings do not clash in accelerate's process-wide state.
    accelerator = Accelerator(mixed_precision="no")
    _seed_everything(config.seed + accelerator.process_index)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, config))
    state, resumed_from = _start_state(ckpt_dir, named_trainable, optimizer, scheduler, config, identity)

    # The scheduler is deliberately not prepared: accelerate would step it once per process.
    prepared_model, prepared_optimizer = accelerator.prepare(model, optimizer)
    loop = _Loop(prepared_model, prepared_optimizer, scheduler, accelerator,
                 params=[p for g in groups for p in g["params"]], compute_loss=loss_fn or _default_loss,
                 use_bf16=_uses_bf16(config, accelerator.device))
    unwrapped = accelerator.unwrap_model(prepared_model)
    was_training = unwrapped.training
    batches = _micro_batches(train_batches, state, config.seed, accelerator)
    if resumed_from is not None:
        _set_rng_state(state.pop("rng"), accelerator.process_index)

    bar = _progress_bar(config, state, desc, accelerator)
    watch = _BestWatch(early_stopping, named_trainable)
    prepared_model.train()
    try:
        while state["step"] < config.max_steps and not watch.stop:
            start = _now(accelerator.device)
            loss = _optimizer_step(loop, batches, config, state["step"])
            state["step_times"].append(_now(accelerator.device) - start)
            state["losses"].append(loss)
            state["step"] += 1
            _show_loss(bar, state, config, scheduler)
            if eval_fn is not None and _due(state["step"], config.eval_every, config):
                state["eval_history"].append({"step": state["step"], **_evaluate(unwrapped, eval_fn)})
                bar.set_postfix({k: _short(v) for k, v in state["eval_history"][-1].items() if k != "step"})
                watch.update(state["eval_history"][-1])
            if ckpt_dir is not None and _due(state["step"], config.checkpoint_every, config):
                _save_checkpoint(ckpt_dir, state, named_trainable, optimizer, scheduler, config, accelerator,
                                 identity)
    finally:
        bar.close()
        batches.close()
        unwrapped.train(was_training)
    watch.restore_best()

    return TrainResult(
        losses=list(state["losses"]), eval_history=list(state["eval_history"]),
        step_times=list(state["step_times"]), steps=state["step"], resumed_from=resumed_from,
        best_step=watch.best_step, stopped_early=watch.stop and state["step"] < config.max_steps,
    )


def _check_early_stopping(early_stopping, eval_fn, config: TrainConfig, out_dir) -> None:
    if early_stopping is None:
        return
    if not isinstance(early_stopping, EarlyStopping):
        raise UserInputError(f"early_stopping must be an EarlyStopping, got {type(early_stopping).__name__}")
    if eval_fn is None or config.eval_every is None:
        raise UserInputError("early stopping needs an eval_fn and TrainConfig.eval_every (how often to evaluate)")
    if out_dir is not None:
        raise UserInputError("early stopping keeps its best parameters in memory; it does not combine with "
                             "out_dir checkpoints (resume whole runs instead)")


class _BestWatch:
    """Early stopping's bookkeeping: the best evaluation so far, a copy of the trainable
    parameters it had, and how many evaluations since it. Does nothing without a rule."""

    def __init__(self, rule: EarlyStopping | None, named_trainable: dict[str, nn.Parameter]):
        self.rule, self.params = rule, named_trainable
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.since_best = 0
        self.stop = False

    def update(self, evaluation: dict[str, Any]) -> None:
        if self.rule is None:
            return
        if self.rule.metric not in evaluation:
            raise UserInputError(f"early stopping watches {self.rule.metric!r}, but eval_fn returned only "
                                 f"{', '.join(k for k in evaluation if k != 'step')}")
        value = float(evaluation[self.rule.metric])
        if self.rule.improves(value, self.best):
            self.best, self.best_step, self.since_best = value, evaluation["step"], 0
            self.best_state = {n: p.detach().clone() for n, p in self.params.items()}
        else:
            self.since_best += 1
            self.stop = self.since_best >= self.rule.patience

    def restore_best(self) -> None:
        if self.best_state is None:
            return
        with torch.no_grad():
            for name, value in self.best_state.items():
                self.params[name].copy_(value)


# ---------------------------------------------------------------------------------------------
# The steps of the loop


@dataclasses.dataclass
class _Loop:
    """What every optimizer step uses: the prepared (DDP-wrapped under `accelerate launch`)
    model and optimizer, the schedule, the optimised parameters and how the loss is computed."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    accelerator: Any
    params: list[nn.Parameter]
    compute_loss: Callable[[nn.Module, dict[str, Any]], torch.Tensor]
    use_bf16: bool


def _uses_bf16(config: TrainConfig, device: torch.device) -> bool:
    return config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and device.type == "cuda")


def _start_state(ckpt_dir: Path | None, named_trainable, optimizer, scheduler, config: TrainConfig,
                 identity: dict | None) -> tuple[dict[str, Any], int | None]:
    """(the loop's state, the step resumed from): a fresh start, or `ckpt_dir`'s checkpoint loaded
    into the parameters, optimizer and scheduler when there is one."""
    if ckpt_dir is not None and (ckpt_dir / "state.json").is_file():
        state = _load_checkpoint(ckpt_dir, named_trainable, optimizer, scheduler, config, identity)
        return state, state["step"]
    return {"step": 0, "epoch": 0, "batch_index": 0, "losses": [], "eval_history": [], "step_times": []}, None


def _optimizer_step(loop: _Loop, batches: Iterator[dict[str, Any]], config: TrainConfig, step: int) -> float:
    """One optimizer step over `config.grad_accum` micro-batches; its mean loss over processes."""
    from accelerate.utils import send_to_device

    device = loop.accelerator.device
    step_loss = torch.zeros((), device=device)
    for micro in range(config.grad_accum):
        batch = send_to_device(next(batches), device)
        # Gradients are all-reduced only on the last micro-batch of the step.
        sync = loop.accelerator.no_sync(loop.model) if micro < config.grad_accum - 1 else nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=loop.use_bf16):
                loss = loop.compute_loss(loop.model, batch)
            _check_loss(loss, step)
            loop.accelerator.backward(loss / config.grad_accum)
        step_loss += loss.detach().float() / config.grad_accum
    if config.max_grad_norm is not None:
        loop.accelerator.clip_grad_norm_(loop.params, config.max_grad_norm)
    loop.optimizer.step()
    loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return loop.accelerator.reduce(step_loss, reduction="mean").item()


def _due(step: int, every: int | None, config: TrainConfig) -> bool:
    """Is an evaluation / checkpoint due after `step` (every `every` steps, and after the last)?"""
    return step == config.max_steps or bool(every and step % every == 0)


def _progress_bar(config: TrainConfig, state: dict[str, Any], desc: str, accelerator):
    from tqdm.auto import tqdm

    return tqdm(
        total=config.max_steps, initial=min(state["step"], config.max_steps), desc=desc,
        disable=not accelerator.is_local_main_process, dynamic_ncols=True,
    )


def _show_loss(bar, state: dict[str, Any], config: TrainConfig, scheduler) -> None:
    bar.update(1)
    step = state["step"]
    if step % config.log_every == 0 or step == config.max_steps:
        recent = state["losses"][-config.log_every:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")


# ---------------------------------------------------------------------------------------------
# Pieces of the loop: loss, parameters, data, evaluation


def _default_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    output = model(**batch)
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None:
        raise UserInputError(
            "the model returned no .loss for a training batch: include 'labels' in the batches "
            "or pass loss_fn(model, batch) -> scalar tensor"
        )
    return loss


def _check_loss(loss: torch.Tensor, step: int) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise UserInputError(f"the loss must be a scalar tensor, got {type(loss).__name__} "
                             f"{tuple(getattr(loss, 'shape', ()))}")
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {step + 1}; lower the learning rate")


def _param_groups(model: nn.Module, param_groups) -> list[dict[str, Any]]:
    if param_groups is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise UserInputError("the model has no parameters with requires_grad=True: nothing to train")
        return [{"params": params}]
    groups = []
    for g in param_groups:
        if not isinstance(g, dict) or "params" not in g:
            raise UserInputError("param_groups must be a list of dicts, each with a 'params' list")
        groups.append({**g, "params": list(g["params"])})
    if not any(g["params"] for g in groups):
        raise UserInputError("param_groups holds no parameters: nothing to train")
    return groups


def _named_trainable(model: nn.Module, groups) -> dict[str, nn.Parameter]:
    """The optimised parameters by name (the names key the checkpoint)."""
    names = {id(p): n for n, p in model.named_parameters()}
    named = {}
    for g in groups:
        for p in g["params"]:
            if id(p) not in names:
                raise UserInputError("param_groups holds a parameter that is not part of the model")
            named[names[id(p)]] = p
    return named


def _micro_batches(train_batches, state, seed: int, accelerator) -> Iterator[dict[str, Any]]:
    """Cycle over `train_batches` forever, this process's share only, tracking the position.

    Process `r` of `N` takes batches `r, r+N, ...` of each pass; with several processes the
    pass is cut to a multiple of `N` batches, so that every process takes the same number per
    pass and one position (`state["epoch"]`, `state["batch_index"]` = batches this process has
    taken in the pass) describes all of them; a resumed run skips exactly what was used.
    Torch's global RNG is re-seeded before each pass, so a shuffling DataLoader repeats its order.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    usable = None  # batches per pass that are used (all of them with one process)
    if world > 1:
        try:
            usable = (len(train_batches) // world) * world
        except TypeError:
            raise UserInputError("with several processes, train_batches must have a len() (a list or DataLoader)") from None
        if usable == 0:
            raise UserInputError(f"train_batches holds {len(train_batches)} batches: too few for {world} processes")
    while True:
        # Start the pass (and draw a shuffling DataLoader's order) under a seed fixed by the
        # pass number, without disturbing the global RNG stream that dropout etc. use.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1_000_003 * (state["epoch"] + 1))
            iterator = iter(train_batches)
            first = next(iterator, None)
        if first is None:
            raise UserInputError("train_batches is empty: expected at least one batch")
        taken = 0
        for index, batch in enumerate(itertools.chain([first], iterator)):
            if usable is not None and index >= usable:
                break
            if index % world != rank:
                continue
            taken += 1
            if taken <= state["batch_index"]:
                continue  # used before the resume
            if not isinstance(batch, dict):
                raise UserInputError(f"train_batches must yield dicts of tensors, got {type(batch).__name__}")
            state["batch_index"] = taken
            yield batch
        state["epoch"] += 1
        state["batch_index"] = 0


def _evaluate(model: nn.Module, eval_fn) -> dict[str, Any]:
    model.eval()
    try:
        with torch.no_grad():
            metrics = eval_fn(model)
    finally:
        model.train()
    if not isinstance(metrics, dict):
        raise UserInputError(f"eval_fn must return a dict of metrics, got {type(metrics).__name__}")
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v


# ---------------------------------------------------------------------------------------------
# Random state


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA too


def _get_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(per_process: list[dict[str, Any]], rank: int) -> None:
    state = per_process[rank] if rank < len(per_process) else per_process[0]
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for everything else (no pickle)
#
#   checkpoint/trainable.safetensors   the optimised parameters, by model parameter name
#   checkpoint/optimizer.safetensors   optimizer state tensors; optimizer.json the rest
#   checkpoint/scheduler.json, checkpoint/state.json (step, data position, curves, RNG, config)


def _save_checkpoint(ckpt_dir: Path, state, named_trainable, optimizer, scheduler, config, accelerator,
                     identity: dict) -> None:
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    from eval.io import atomic_directory, write_json

    rng = gather_object([_get_rng_state()])  # one entry per process
    if accelerator.is_main_process:
        with atomic_directory(ckpt_dir) as tmp:
            # clone: safetensors refuses tensors that share storage
            save_file({n: p.detach().cpu().clone() for n, p in named_trainable.items()},
                      tmp / "trainable.safetensors")
            tensors: dict[str, torch.Tensor] = {}
            write_json(tmp / "optimizer.json", _extract_tensors(optimizer.state_dict(), "optim", tensors))
            save_file(tensors, tmp / "optimizer.safetensors")
            write_json(tmp / "scheduler.json", scheduler.state_dict())
            write_json(tmp / "state.json", {**state, "rng": rng, "config": config.to_dict(), "run": identity})
    accelerator.wait_for_everyone()


def _run_identity(run: dict | None, train_batches) -> dict:
    """What defines the run besides the config: the caller's description and the data's hash."""
    identity = json.loads(json.dumps(run or {}, default=str))  # as it reads back from JSON
    identity["data"] = _data_fingerprint(train_batches)
    return identity


def _data_fingerprint(train_batches) -> str | None:
    """sha256 of every tensor of a list of batches (order, names, shapes, values); None for
    other iterables (a DataLoader is not read twice just for this)."""
    import hashlib

    if not isinstance(train_batches, (list, tuple)):
        return None
    h = hashlib.sha256()
    for batch in train_batches:
        for name, value in sorted(batch.items()) if isinstance(batch, dict) else ():
            if isinstance(value, torch.Tensor):
                t = value.detach().cpu().contiguous()
                h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _check_same_run(ckpt_dir: Path, saved: dict | None, identity: dict) -> None:
    saved = saved or {}
    differs = [f"{k}: {saved.get(k, '(not recorded)')!r} -> {identity.get(k)!r}"
               for k in sorted(set(saved) | set(identity)) if saved.get(k) != identity.get(k)]
    if differs:
        raise UserInputError(
            f"{ckpt_dir} holds the checkpoint of a different run ({'; '.join(differs)}), so it is not resumed; "
            f"to start fresh use a new output directory or delete {ckpt_dir}"
        )


def _load_checkpoint(ckpt_dir: Path, named_trainable, optimizer, scheduler, config, identity: dict) -> dict:
    from eval.io import load_named_tensors_into, load_safetensors, read_json

    state = read_json(ckpt_dir / "state.json", "training checkpoint state")
    _check_same_run(ckpt_dir, state.pop("run", None), identity)
    saved_config = state.pop("config")
    changed = {k for k, v in config.to_dict().items() if saved_config.get(k) != v} - _RESUMABLE_CHANGES
    if changed:
        raise UserInputError(
            f"{ckpt_dir} holds a checkpoint made with a different training config "
            f"({', '.join(f'{k}: {saved_config.get(k)!r} -> {getattr(config, k)!r}' for k in sorted(changed))}); "
            "use a new output directory or delete the checkpoint to start over"
        )
    load_named_tensors_into(named_trainable, ckpt_dir / "trainable.safetensors", "training checkpoint")
    tensors = load_safetensors(ckpt_dir / "optimizer.safetensors", "training checkpoint")
    optimizer.load_state_dict(_restore_tensors(read_json(ckpt_dir / "optimizer.json"), tensors))
    scheduler.load_state_dict(read_json(ckpt_dir / "scheduler.json"))
    if state["step"] > config.max_steps:
        raise UserInputError(
            f"{ckpt_dir} is at step {state['step']}, beyond max_steps={config.max_steps}; "
            "raise max_steps or use a new output directory"
        )
    return state


def _extract_tensors(obj, prefix: str, tensors: dict[str, torch.Tensor]):
    """Replace every tensor in a nested dict/list by {"__tensor__": key}, collecting them."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        # JSON object keys are strings: remember int keys (optimizer state is keyed by index)
        return {"__dict__": [[k, _extract_tensors(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_extract_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _restore_tensors(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _restore_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_restore_tensors(v, tensors) for v in obj]
    return obj


def load_checkpoint_state(out_dir: str | Path) -> dict[str, Any] | None:
    """The saved step, curves and config of `out_dir`'s checkpoint, or None if there is none."""
    path = Path(out_dir) / CHECKPOINT_DIRNAME / "state.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
