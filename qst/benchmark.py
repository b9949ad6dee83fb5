"""The per-method measurement that `slimtune bench` runs, each call in a fresh process.

`measure_method` builds one tuning method (see `qst.baselines`), marks set-up done, trains
with the shared loop (`eval.train.train`) for `max(train_steps, warmup + steps)` steps on the
task's training batches, times steps `warmup .. warmup + steps`, and scores the task's test
split. Every method runs its LM head and loss only at the labelled positions (QST by itself,
the others through `qst.baselines.labelled_positions_loss`). `measure_forward_floor` times a
no-grad forward pass of the 4-bit backbone's decoder stack (all hidden states kept, no LM head,
no KV cache): a QST step runs exactly that and then only the side network and the LM head on
the labelled positions, so it cannot cost less.

Both are `eval.measure.run_in_fresh_process` targets: keyword arguments and results are plain
JSON. Memory of a method is measured around its training only (scoring the test split
afterwards runs at another batch size and is not part of a training step's cost): on CUDA
`max_memory_allocated` (weights included); on CPU the peak RSS during training minus the RSS
at its start, to which the parent adds `parameter_bytes` (returned here) so that both devices
report "weights + training state".
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import torch

from eval.errors import UserInputError
from qst.baselines import DEFAULT_METHODS

LOSS_WINDOW = 5  # final_loss: mean of the last steps' losses (one batch is noisy)


def _batches(task_name: str | None, tokenizer, vocab_size: int, batch: int, seq: int, n_steps: int,
             seed: int) -> list[dict[str, torch.Tensor]]:
    """The training batches every method sees: the task's prompt+answer batches, or random tokens."""
    if tokenizer is not None:
        from eval.tasks import lm_batches, load_task

        task = load_task(task_name)
        batches = lm_batches(task, "train", tokenizer, batch, seq, shuffle=True, seed=seed)
        # Fixed shapes: a smaller final batch would make its step look faster.
        batches = [b for b in batches if b["input_ids"].shape[0] == batch]
        if not batches:
            raise UserInputError(
                f"task {task_name!r} has fewer than {batch} training examples; use a smaller --batch"
            )
        return batches
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(min(n_steps, 8)):  # random tokens: the LM loss over every position
        ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _check_sizes(batch: int, seq: int, steps: int, warmup: int, train_steps: int) -> None:
    for name, value, low in (("batch", batch, 1), ("seq", seq, 1), ("steps", steps, 1),
                             ("warmup", warmup, 0), ("train_steps", train_steps, 0)):
        if not isinstance(value, int) or value < low:
            raise UserInputError(f"{name} must be an integer >= {low}, got {value!r}")


def measure_method(method: str, model: str | None = "ref-lm", arch: str | None = None,
                   task: str | None = None, batch: int = 16, seq: int = 512, steps: int = 5,
                   warmup: int = 2, train_steps: int = 0, lr: float = 2e-4, device: str = "cpu",
                   dtype: str | None = None, seed: int = 0, eval_examples: int | None = None,
                   eval_batch_size: int = 8, baseline_options: dict | None = None) -> dict[str, Any]:
    """Build `method`, train it, and return its numbers (a `run_in_fresh_process` target)."""
    from eval.measure import count_parameters, mark_setup_done, parameter_bytes
    from eval.train import TrainConfig, train
    from qst.baselines import BaselineConfig, build_tuning_model, labelled_positions_loss

    _check_sizes(batch, seq, steps, warmup, train_steps)
    torch.manual_seed(seed)
    config = BaselineConfig(**(baseline_options or {}))
    tuned, tokenizer = build_tuning_model(method, model=model, arch=arch, device=device, dtype=dtype,
                                          config=config)
    # Random weights (arch) have no task to score: train only the timed steps.
    total_steps = max(train_steps, warmup + steps) if tokenizer is not None else warmup + steps
    batches = _batches(task, tokenizer, tuned.config.vocab_size, batch, seq, total_steps, seed)
    trainable = count_parameters(tuned, trainable_only=True)
    total = count_parameters(tuned)
    weights_bytes = parameter_bytes(tuned)
    mark_setup_done()

    side_tuning = hasattr(tuned, "parameter_groups")  # qst, lst: their own groups and loss
    with _TrainingPeak(tuned.device) as peak:  # training only: scoring afterwards is not part of it
        result = train(
            tuned, batches, TrainConfig(max_steps=total_steps, lr=lr, seed=seed, max_grad_norm=1.0),
            desc=f"bench {method}", param_groups=tuned.parameter_groups(lr) if side_tuning else None,
            loss_fn=None if side_tuning else labelled_positions_loss,
        )
    timed = result.step_times[warmup:warmup + steps]
    step_time = statistics.median(timed)
    accuracy = None
    if tokenizer is not None and train_steps > 0:
        from eval.tasks import load_task, task_accuracy

        tuned.eval()
        accuracy = task_accuracy(tuned, tokenizer, load_task(task), split="test",
                                 batch_size=eval_batch_size, max_examples=eval_examples)
    losses = result.losses[-LOSS_WINDOW:]
    return {
        "method": method,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
        "parameter_bytes": weights_bytes,
        "peak_memory_bytes": peak.bytes,
        "memory_measure": peak.how,
        "step_time_s": step_time,
        "tokens_per_s": batch * seq / step_time,
        "final_loss": sum(losses) / len(losses) if losses and all(map(math.isfinite, losses)) else None,
        "accuracy": accuracy,
        "steps_trained": result.steps,
        "losses": result.losses,
        "labelled_tokens": max(_labelled_tokens(b) for b in batches),
    }


def _labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions of a batch that predict a label: where the LM head and the loss run."""
    return int((batch["labels"][:, 1:] != -100).sum())


class _TrainingPeak:
    """Peak memory while the block runs. CUDA: max_memory_allocated (weights included); CPU: peak
    RSS minus RSS at the start (the weights are already resident: the parent adds them back)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.bytes: int | None = None
        self.how = "torch.cuda.max_memory_allocated" if self.cuda else "peak RSS increment"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            from eval.measure import RssPeakTracker

            self.tracker = RssPeakTracker().start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self.bytes = self.tracker.stop() - self.tracker.start_rss
        return False


def measure_forward_floor(model: str | None = "ref-lm", arch: str | None = None, task: str | None = None,
                          batch: int = 16, seq: int = 512, steps: int = 5, warmup: int = 2,
                          device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Median time and peak memory of one no-grad forward pass of the 4-bit NF4 backbone's decoder."""
    from eval.measure import mark_setup_done, median_step_time, parameter_bytes
    from qst.baselines import load_backbone

    _check_sizes(batch, seq, steps, warmup, 0)
    backbone, tokenizer = load_backbone("qst", model=model, arch=arch, device=device)
    backbone.eval()
    batches = _batches(task, tokenizer, backbone.config.vocab_size, batch, seq, 1, seed)
    inputs = {k: v.to(backbone.device) for k, v in batches[0].items() if k != "labels"}
    weights_bytes = parameter_bytes(backbone)
    mark_setup_done()

    use_bf16 = backbone.device.type == "cuda"  # as eval.train's "auto" mixed precision

    def forward():
        # The decoder stack with every layer's output kept: exactly what a QST step must compute
        # before its side network. Not the LM head: QST (training on labelled answer tokens)
        # projects only the labelled positions to the vocabulary, never all B x S of them.
        with torch.no_grad(), torch.autocast(backbone.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            backbone.base_model(**inputs, output_hidden_states=True, use_cache=False)

    forward_time = median_step_time(forward, warmup=warmup, repeats=steps)
    return {"forward_time_s": forward_time, "parameter_bytes": weights_bytes}


# --------------------------------------------------------------------------- the whole bench

REPORT_NAME = "bench_tuning"
METHOD_KEYS = ("trainable_params", "trainable_share", "peak_memory_bytes", "step_time_s",
               "tokens_per_s", "final_loss", "accuracy")
FIT_MARGIN = 0.9  # refuse a run whose estimate exceeds this share of the free memory


@dataclass(frozen=True)
class BenchSettings:
    """What `slimtune bench` runs; validated on construction (UserInputError)."""

    model: str | None = "ref-lm"
    arch: str | None = None
    methods: str | tuple[str, ...] = DEFAULT_METHODS
    batch: int = 16
    seq: int = 512
    steps: int = 5
    warmup: int = 2
    train_steps: int = 50
    task: str | None = None
    eval_examples: int | None = 200
    lr: float = 2e-4
    device: str = "cpu"
    dtype: str = "auto"
    seed: int = 0
    fit_check: bool = True

    def __post_init__(self):
        from qst.baselines import check_methods

        object.__setattr__(self, "methods", tuple(check_methods(self.methods)))
        _check_sizes(self.batch, self.seq, self.steps, self.warmup, self.train_steps)
        if self.arch is not None:
            object.__setattr__(self, "model", None)  # random weights of a named architecture
        elif self.model is None:
            raise UserInputError("give a model (pretrained: 'ref-lm', a directory, a hub id) or an arch (random weights)")
        if self.arch is not None and self.task is not None:
            raise UserInputError("--task needs a pretrained --model; --arch has random weights (memory and speed only)")
        if self.eval_examples is not None and (not isinstance(self.eval_examples, int) or self.eval_examples < 1):
            raise UserInputError(f"eval_examples must be a positive integer, got {self.eval_examples!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise UserInputError(f"lr must be a positive number, got {self.lr!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserInputError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        device = str(self.device)
        if not (device == "cpu" or device.startswith("cuda")):
            raise UserInputError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        from eval.models import resolve_device
        from qst.baselines import backbone_quantization

        # Before any process starts: CUDA itself, and bitsandbytes' CUDA library for 4-bit methods.
        resolve_device(device, four_bit=any(backbone_quantization(m) for m in self.methods))

    @property
    def backbone_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if str(self.device).startswith("cuda") else "float32"

    def method_dtype(self, method: str) -> str:
        """The dtype the estimate assumes: 4-bit backbones compute (and keep the rest) in bf16."""
        from qst.baselines import backbone_quantization

        return "bfloat16" if backbone_quantization(method) else self.backbone_dtype


def run_bench(settings: BenchSettings, out_dir, log=print,
              method_target: str = f"{__name__}:measure_method") -> dict[str, Any]:
    """Run the floor and every method in fresh processes; write the JSON, Markdown and PNG report.

    `method_target` is the `run_in_fresh_process` target measuring one method (tests swap it).
    """
    from eval.measure import machine_info, run_in_fresh_process
    from eval.report import write_report

    task = _resolve_task(settings)
    source = settings.arch or settings.model
    estimates = {m: _estimate(settings, m) for m in settings.methods}
    if settings.fit_check:
        _check_fits(settings, estimates)

    common = dict(model=settings.model, arch=settings.arch, task=task, batch=settings.batch, seq=settings.seq,
                  steps=settings.steps, warmup=settings.warmup, device=settings.device, seed=settings.seed)
    total_steps = max(settings.train_steps, settings.warmup + settings.steps) if task else settings.warmup + settings.steps
    log(f"bench: {source}, task {task or '(random tokens)'}, batch {settings.batch}, seq {settings.seq}, "
        f"{len(settings.methods)} method(s), each in a fresh process")
    log("bench: [floor] no-grad forward of the 4-bit backbone")
    floor_raw = run_in_fresh_process(f"{__name__}:measure_forward_floor", common)
    floor = {
        "forward_time_s": floor_raw.get("forward_time_s"),
        "forward_peak_memory_bytes": _peak_bytes(floor_raw),
    }
    if floor_raw.get("error"):
        floor["error"] = floor_raw["error"]
        log(f"bench: [floor] failed: {floor_raw['error']}")

    methods, details = {}, {}
    for i, method in enumerate(settings.methods, 1):
        log(f"bench: [{i}/{len(settings.methods)}] {method}: build, {total_steps} training steps"
            + (", test accuracy" if task and settings.train_steps else ""))
        raw = run_in_fresh_process(
            method_target,
            {**common, "method": method, "train_steps": settings.train_steps, "lr": settings.lr,
             "dtype": settings.backbone_dtype,
             "eval_examples": settings.eval_examples},
        )
        methods[method], details[method] = _method_entry(raw)
        if raw.get("error"):
            log(f"bench: [{i}/{len(settings.methods)}] {method} failed: {raw['error']}")
        else:
            estimates[method] = _estimate(settings, method, trainable_params=raw["trainable_params"],
                                          labelled_tokens=raw.get("labelled_tokens"))
            entry = methods[method]
            log(f"bench: [{i}/{len(settings.methods)}] {method}: peak {_mb(entry['peak_memory_bytes'])} MB "
                f"(estimate {_mb(estimates[method]['total_bytes'])} MB), step {entry['step_time_s']:.3f} s, "
                f"accuracy {_fmt(entry['accuracy'])}")

    data = {
        "model": source,
        "device": settings.device,
        "batch": settings.batch,
        "seq": settings.seq,
        "methods": methods,
        "floor": floor,
        "task": task,
        "settings": {k: getattr(settings, k) for k in BenchSettings.__dataclass_fields__},
        "estimates": {m: {"total_bytes": e["total_bytes"], "breakdown_bytes": e["breakdown_bytes"]}
                      for m, e in estimates.items()},
        "details": details,
        "machine": machine_info(),
    }
    markdown = format_markdown(data)
    paths = write_report(out_dir, REPORT_NAME, data, markdown, plots={REPORT_NAME: _plot(data)},
                         figsize=(10, 4))
    return {"data": data, "markdown": markdown, "paths": paths}


def _resolve_task(settings: BenchSettings) -> str | None:
    if settings.arch is not None:
        return None
    from eval.tasks import TASKS, load_task

    name = settings.task or TASKS[0]
    load_task(name)  # an unknown task fails here, before any process starts
    return name


def _estimate(settings: BenchSettings, method: str, trainable_params: int | None = None,
              labelled_tokens: int | None = None) -> dict:
    """Before the run (fit check): logits at every position, an upper bound; after it: at the
    labelled positions of the batch with the most, where every method's LM head ran."""
    from eval.memory_estimate import estimate_memory

    return estimate_memory(
        settings.arch or settings.model, method, batch=settings.batch, seq=settings.seq,
        dtype=settings.method_dtype(method), trainable_params=trainable_params, device=settings.device,
        labelled_tokens=labelled_tokens,
    )


def _available_bytes(device: str) -> int | None:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    import psutil

    return psutil.virtual_memory().available


def _check_fits(settings: BenchSettings, estimates: dict[str, dict]) -> None:
    available = _available_bytes(str(settings.device))
    if available is None:
        return
    too_big = {m: e for m, e in estimates.items() if e["total_bytes"] > FIT_MARGIN * available}
    if too_big:
        worst = ", ".join(f"{m} ~{e['total_bytes'] / 1e9:.2f} GB ({_breakdown(e)})" for m, e in too_big.items())
        raise UserInputError(
            f"batch {settings.batch} x seq {settings.seq} will not fit on {settings.device}: the memory estimate "
            f"is {worst}, but only {available / 1e9:.2f} GB is free; use a smaller --batch or --seq, fewer "
            "--methods, or --no-fit-check to try anyway"
        )


def _breakdown(estimate: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in estimate["breakdown_gb"].items() if v)


def _peak_bytes(raw: dict) -> int | None:
    """Weights + training state: CUDA's max_memory_allocated already holds the weights; on CPU the
    worker measured peak RSS minus RSS at set-up (weights already resident), so add them back."""
    peak = raw.get("peak_memory_bytes")
    if peak is None:
        return None
    if "cuda_max_memory_allocated_bytes" in raw or raw.get("memory_measure") == "torch.cuda.max_memory_allocated":
        return int(peak)
    return int(peak + raw.get("parameter_bytes", 0))


def _method_entry(raw: dict) -> tuple[dict, dict]:
    if raw.get("error"):
        entry = dict.fromkeys(METHOD_KEYS)
        entry["error"] = raw["error"]
        return entry, {"traceback": raw.get("traceback", "")}
    entry = {k: raw.get(k) for k in METHOD_KEYS}
    entry["peak_memory_bytes"] = _peak_bytes(raw)
    details = {k: raw.get(k) for k in ("total_params", "parameter_bytes", "steps_trained", "losses",
                                       "memory_measure", "labelled_tokens")}
    details["peak_increment_bytes"] = raw.get("peak_memory_bytes")
    return entry, details


# --------------------------------------------------------------------------- the report


def _ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def _mb(n):
    return None if n is None else round(n / 1e6, 1)


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def format_markdown(data: dict) -> str:
    """The table people read: each method's numbers and its ratios against QLoRA and the floor."""
    from eval.measure import machine_line
    from eval.report import markdown_table

    methods, floor = data["methods"], data["floor"]
    ref = methods.get("qlora") if not (methods.get("qlora") or {}).get("error") else None
    rows = []
    for name, m in methods.items():
        if m.get("error"):
            rows.append({"method": name, "error": m["error"]})
            continue
        estimate = data["estimates"][name]["total_bytes"]
        acc = m["accuracy"]
        ref_acc = ref["accuracy"] if ref else None
        rows.append({
            "method": name,
            "trainable": m["trainable_params"],
            "share %": 100 * m["trainable_share"],
            "peak MB": _mb(m["peak_memory_bytes"]),
            "estimate MB": _mb(estimate),
            "mem / QLoRA": _ratio(m["peak_memory_bytes"], ref and ref["peak_memory_bytes"]),
            "step s": m["step_time_s"],
            "step / QLoRA": _ratio(m["step_time_s"], ref and ref["step_time_s"]),
            "step / floor": _ratio(m["step_time_s"], floor.get("forward_time_s")),
            "tokens/s": round(m["tokens_per_s"]),
            "final loss": m["final_loss"],
            "accuracy": acc,
            "Δacc vs QLoRA (pts)": None if acc is None or ref_acc is None else 100 * (acc - ref_acc),
            "error": None,
        })
    columns = list(dict.fromkeys(k for r in rows for k in r))
    if all(r.get("error") is None for r in rows):
        columns.remove("error")
    s = data["settings"]
    lines = [
        "# Tuning benchmark",
        "",
        f"Model `{data['model']}` on `{data['device']}`, task `{data['task'] or 'random tokens'}`, batch "
        f"{data['batch']}, seq {data['seq']}, AdamW lr {s['lr']}, {s['warmup']} warm-up + {s['steps']} timed "
        f"steps" + (f", accuracy after {max(s['train_steps'], s['warmup'] + s['steps'])} training steps"
                   if data["task"] else " (random weights: no accuracy)") + ".",
        "",
        markdown_table(rows, columns, floatfmt=".4g"),
        f"Floor (no-grad forward of the 4-bit backbone's decoder, hidden states kept, no LM head, no KV cache): "
        f"{_fmt(floor.get('forward_time_s'))} s, "
        f"{_fmt(_mb(floor.get('forward_peak_memory_bytes')), '.1f')} MB"
        + (f" — failed: {floor['error']}" if floor.get("error") else "") + ".",
        "",
        "Peak memory = weights + training state, during training only (scoring afterwards not counted; "
        "CUDA: max_memory_allocated; CPU: peak RSS during training minus RSS at its start, plus the "
        "parameters' bytes). Estimate = `slimtune estimate-memory` (detailed "
        "assumptions) with the measured trainable count. Ratios < 1 mean less than QLoRA.",
        "",
        "Every method computes the LM head, the logits and the loss only at the positions that predict "
        "a labelled token (the same mean cross-entropy as ignoring label -100 everywhere).",
        "",
        machine_line(data["machine"]) if data.get("machine") else "Machine: not recorded.",
    ]
    return "\n".join(lines) + "\n"


def _plot(data: dict):
    names = [n for n, m in data["methods"].items() if not m.get("error")]
    memory = [data["methods"][n]["peak_memory_bytes"] / 1e6 for n in names]
    times = [data["methods"][n]["step_time_s"] for n in names]
    floor = data["floor"]

    def draw(ax):
        fig = ax.figure
        ax.remove()
        left, right = fig.subplots(1, 2)
        for axis, values, label, floor_value in (
            (left, memory, "peak memory (MB)", _mb(floor.get("forward_peak_memory_bytes"))),
            (right, times, "median step time (s)", floor.get("forward_time_s")),
        ):
            bars = axis.bar(range(len(names)), values, color="#4C72B0")
            axis.set_xticks(range(len(names)), names, rotation=20)
            axis.set_ylabel(label)
            axis.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8, padding=2)
            if floor_value is not None:
                axis.axhline(floor_value, color="#C44E52", linestyle="--", label="4-bit forward floor")
                axis.legend(fontsize=8)
            axis.grid(axis="y", alpha=0.3)
        fig.suptitle(f"{data['model']}, batch {data['batch']}, seq {data['seq']}, {data['device']}")

    return draw
