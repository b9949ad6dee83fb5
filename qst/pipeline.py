"""`slimtune tune` end to end: load the backbone, wrap it with a side network, train it on a task,
score it before and after, save it, and report what it cost.

    report = run_tune(TuneSettings(task="TASK", qst=QSTConfig(r=16)), "runs/qst-TASK")

writes into OUT: the side network (`qst_config.json`, `side_network.safetensors`; load it with
`qst.QSTForCausalLM.from_pretrained(OUT)`), `tune_report.json` / `.md`, `loss.png`, and the
training checkpoint (`checkpoint/`: a rerun with the same settings resumes).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from eval.errors import UserInputError, require_positive
from eval.train import TrainConfig
from eval.tuning_methods import SIDE_TUNING_METHODS
from qst.baselines import backbone_quantization
from qst.config import QSTConfig

HEADS = ("lm", "classifier")


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """One tuning run, validated on construction (`UserInputError` naming the field).

    - `method`: "qst" (NF4 backbone) or "lst" (the same side network on an unquantized backbone).
    - `model`: "ref-lm", a local model directory or a hub id; `task`: what `eval.tasks.load_task`
      takes: a built-in name, or a `TaskSpec` as a dict (the user's data, `scripts.task_options`).
      Instruction tasks are scored by held-out loss and perplexity on the responses, not accuracy.
    - `head`: "lm" learns the answer text with the frozen LM head; "classifier" trains a fresh
      score head (classification tasks only).
    - `batch` x `seq`: examples per step and tokens per example; `train_examples`: train on a
      fixed random subset of this many (the task's seeded sample, `TaskSpec.train_examples`;
      None: the whole train split).
    - `eval_examples`: cap on test examples (None: all); `eval_batch`; `skip_before`: no accuracy
      before training.
    - `device`: "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...; `fit_check`: refuse a
      run the memory estimate says will not fit.
    - `eval_tasks`: lm-eval task names scored after training (`eval.lm_eval_bridge`, offline: local
      data only; a built-in task's own name is its suite YAML), with task YAMLs also read from
      `eval_include_path`; `eval_limit`: examples per lm-eval task (None: all).
    - `cache_backbone`: store the backbone's hidden states on disk in the first epoch (in
      `cache_dir`, default $SLIMTUNE_CACHE/qst-features); later epochs run only the side network.
    """

    task: str | dict
    method: str = "qst"
    model: str = "ref-lm"
    head: str = "lm"
    batch: int = 8
    seq: int = 128
    train_examples: int | None = None
    eval_examples: int | None = None
    eval_batch: int = 8
    skip_before: bool = False
    device: str = "auto"
    fit_check: bool = True
    cache_backbone: bool = False
    cache_dir: str | Path | None = None
    eval_tasks: tuple[str, ...] = ()
    eval_include_path: tuple[str, ...] = ()
    eval_limit: int | None = None
    qst: QSTConfig = dataclasses.field(default_factory=QSTConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.method not in SIDE_TUNING_METHODS:
            raise UserInputError(f"method must be one of {', '.join(SIDE_TUNING_METHODS)}, got {self.method!r}",
                                 field="method")
        if self.head not in HEADS:
            raise UserInputError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}", field="head")
        for name in ("batch", "seq", "eval_batch"):  # eval_examples: task_accuracy checks it
            require_positive(name, getattr(self, name))
        if self.train_examples is not None:
            require_positive("train_examples", self.train_examples)
        if self.eval_limit is not None:
            require_positive("eval_limit", self.eval_limit)
        object.__setattr__(self, "eval_tasks", tuple(self.eval_tasks))
        object.__setattr__(self, "eval_include_path", tuple(str(p) for p in self.eval_include_path))
        if not isinstance(self.qst, QSTConfig) or not isinstance(self.train, TrainConfig):
            raise UserInputError("TuneSettings.qst must be a QSTConfig and TuneSettings.train a TrainConfig")

    @property
    def quantize(self) -> str | None:
        return backbone_quantization(self.method)


def run_tune(settings: TuneSettings, out) -> dict[str, Any]:
    """Train a side network as `settings` say; write it and its report to `out`; return the report.

    `out` follows `eval.io.prepare_output_dir`: new, empty, or an earlier tune output (whose
    checkpoint a run with the same settings resumes); nothing else in it is ever deleted.
    """
    from eval.io import prepare_output_dir

    with prepare_output_dir(out, "tune", signature="tune_report.json"):
        return _run_tune(settings, Path(out))


def _run_tune(s: TuneSettings, out: Path) -> dict[str, Any]:
    from eval.measure import (
        count_parameters,
        lifetime_peak_rss,
        machine_info,
        parameter_bytes,
        peak_memory,
    )
    from eval.models import load_causal_lm
    from eval.train import train

    device = ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device
    task = _load_task(s)
    backbone, tokenizer = load_causal_lm(s.model, quantize=s.quantize, device=device)
    _check_fits(s, backbone.config, device)  # before any training memory is taken
    # The side network's initial weights come from the seed alone, not from whatever drew from the
    # global RNG before in this process (loading data, an earlier run): the same seed, the same run.
    torch.manual_seed(s.train.seed)
    model, batches = _wrap(s, backbone, tokenizer, task)
    if s.cache_backbone:
        model.enable_feature_cache(s.cache_dir)

    def scores() -> dict:
        from eval.tasks import task_scores

        model.eval()
        with torch.no_grad():
            return task_scores(model, tokenizer, task, split="test", batch_size=s.eval_batch,
                               max_examples=s.eval_examples, seq_len=s.seq)

    # Everything that defines the run: a checkpoint made with anything else is not resumed.
    run_description = {"command": "tune", "method": s.method, "model": str(s.model), "task": task.name,
                       "task_spec": _task_spec(s), "head": s.head, "batch": s.batch, "seq": s.seq,
                       "seed": s.train.seed, "train_examples": s.train_examples, "qst_config": s.qst.to_dict()}
    scores_before = None if s.skip_before else scores()
    before = None if scores_before is None else scores_before.get("accuracy")
    result = {}

    def fit():
        result["train"] = train(model, batches, s.train, out_dir=out, desc=f"{s.method} {task.name}",
                                run=run_description, param_groups=model.parameter_groups(s.train.lr))

    start = time.perf_counter()
    peak = peak_memory(fit, device)
    train_seconds = time.perf_counter() - start
    scores_after = scores()
    after = scores_after.get("accuracy")
    lm_eval_results = _lm_eval_after(s, model, tokenizer, device)
    model.slimtune_card = {"quality": {
        "task": f"{task.name} (test split{'' if s.eval_examples is None else f', first {s.eval_examples} examples'})",
        **_card_scores(scores_before, scores_after),
    }}
    model.save_pretrained(out)

    history = result["train"]
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
    per_epoch = len(batches)
    first, later = history.step_times[:per_epoch], history.step_times[per_epoch:]
    report = {
        "method": s.method, "model": s.model, "task": task.name, "head": s.head,
        "quantize": s.quantize, "device": device, "qst_config": s.qst.to_dict(), "train_config": s.train.to_dict(),
        "batch": s.batch, "seq": s.seq, "train_examples": len(task.train), "train_batches_per_epoch": per_epoch,
        "trainable_parameters": trainable, "total_parameters": total, "trainable_share": trainable / total,
        "backbone_bytes": parameter_bytes(model.backbone),
        "task_kind": task.kind, "task_spec": _task_spec(s),
        "accuracy_before": before, "accuracy_after": after,
        # instruction tasks: mean loss and perplexity per response token of the test split
        "heldout_loss_before": (scores_before or {}).get("loss"), "heldout_loss_after": scores_after.get("loss"),
        "perplexity_before": (scores_before or {}).get("perplexity"), "perplexity_after": scores_after.get("perplexity"),
        "eval_tasks": lm_eval_results,
        "losses": history.losses, "steps": history.steps, "resumed_from": history.resumed_from,
        "peak_memory_bytes": peak,
        "process_peak_rss_bytes": lifetime_peak_rss(),  # backbone, data, training, evaluation
        "peak_memory_method": "torch.cuda.max_memory_allocated" if device.startswith("cuda")
        else "peak RSS growth during training (this process)",
        "median_step_time_s": history.median_step_time,
        "median_step_time_first_epoch_s": statistics.median(first) if first else None,
        "median_step_time_later_epochs_s": statistics.median(later) if later else None,
        "train_seconds": train_seconds,
        "feature_cache": model.feature_cache.stats() if model.feature_cache is not None else None,
        "machine": machine_info(),
    }
    _write_report(out, report)
    return report


def _task_spec(s: TuneSettings) -> dict:
    """The task as a `TaskSpec` dict, with the run's training subset (sampled as the data loads)."""
    from eval.tasks import TaskSpec

    spec = dataclasses.asdict(TaskSpec(**s.task) if isinstance(s.task, dict) else TaskSpec(source=s.task))
    if s.train_examples is not None:
        spec["train_examples"] = s.train_examples
    return spec


def _lm_eval_after(s: TuneSettings, model, tokenizer, device: str) -> dict | None:
    """{lm-eval task: its metrics} of the tuned model on `s.eval_tasks` (None when none asked)."""
    if not s.eval_tasks:
        return None
    from eval.lm_eval_bridge import run_lm_eval
    from eval.tasks import BUILTIN_TASKS, lm_eval_task_name, task_yaml_dir

    names = [lm_eval_task_name(t) if t in BUILTIN_TASKS else t for t in s.eval_tasks]
    include = [*s.eval_include_path, *([str(task_yaml_dir())] if set(s.eval_tasks) & set(BUILTIN_TASKS) else [])]
    model.eval()
    results = run_lm_eval(model, tokenizer, names, include_path=include or None, limit=s.eval_limit,
                          batch_size=s.eval_batch, device=device)
    return results.get("results", {})


def _card_scores(before: dict | None, after: dict) -> dict:
    """The model card's quality lines: accuracy, or held-out perplexity for instruction tasks."""
    name = "accuracy" if "accuracy" in after else "perplexity"
    return {f"{name} before": "not measured" if before is None else before[name], f"{name} after": after[name]}


def _load_task(s: TuneSettings):
    from eval.tasks import TaskSpec, load_task, sampled_train_positions

    spec = _task_spec(s)
    task = load_task(spec)
    picked = sampled_train_positions(len(task.train), TaskSpec(**spec))  # None once the loader sampled
    if picked is not None:
        task = dataclasses.replace(task, train=[task.train[i] for i in picked])
    if s.head == "classifier" and task.kind != "classification":
        raise UserInputError(f"head 'classifier' needs a classification task; {task.name} is {task.kind}",
                             field="head")
    return task


def _wrap(s: TuneSettings, backbone, tokenizer, task):
    """The QST model for `s.head` on the loaded backbone, and the shuffled training batches."""
    from eval.tasks import classification_batches, lm_batches
    from qst.model import QSTForCausalLM, QSTForSequenceClassification

    if s.head == "classifier":
        model = QSTForSequenceClassification.from_base(backbone, s.qst, base_name_or_path=s.model,
                                                       num_labels=len(task.labels))
        return model, classification_batches(task.train, tokenizer, s.batch, s.seq, shuffle=True, seed=s.train.seed)
    model = QSTForCausalLM.from_base(backbone, s.qst, base_name_or_path=s.model)
    return model, lm_batches(task, "train", tokenizer, s.batch, s.seq, shuffle=True, seed=s.train.seed)


def _check_fits(s: TuneSettings, model_config, device: str) -> None:
    """Refuse a sequence beyond the model's context, and a run the memory estimate says will not fit."""
    from eval.bnb import compute_dtype_name
    from eval.measure import available_memory_bytes
    from eval.memory_estimate import check_seq, estimate_memory, fits

    check_seq(model_config, s.seq, s.model)
    if not s.fit_check:
        return
    try:
        estimate = estimate_memory(model_config, s.method, batch=s.batch, seq=s.seq,
                                   dtype=compute_dtype_name(device) if s.quantize else "float32", device=device,
                                   qst_reduction=s.qst.r, qst_adapter_rank=s.qst.adapter_rank)
    except UserInputError:
        return  # a side-network setting the estimate cannot model: QSTConfig says what is wrong
    available = available_memory_bytes(device)
    if available is not None and not fits(estimate, 0.9 * available):
        raise UserInputError(f"batch {s.batch} x seq {s.seq} will not fit on {device}: the memory estimate is "
                             f"{estimate['total_gb']:.2f} GB, only {available / 1e9:.2f} GB is free; use a smaller "
                             "--batch or --seq, or --no-fit-check to try anyway")


# ---------------------------------------------------------------------------------------------
# The report


def summary(report: dict[str, Any]) -> str:
    """One line: accuracy before and after, trainable parameters, peak memory, step time."""
    trainable, total = report["trainable_parameters"], report["total_parameters"]
    if report.get("perplexity_after") is not None:
        quality = (f"held-out perplexity {_fmt(report['perplexity_before'])} -> {_fmt(report['perplexity_after'])} "
                   f"(loss {_fmt(report['heldout_loss_after'])})")
    else:
        quality = f"accuracy {_fmt(report['accuracy_before'])} -> {_fmt(report['accuracy_after'])}"
    return (f"{report['method']} on {report['task']}: {quality}, {trainable:,} trainable parameters ({100 * trainable / total:.2f} %), "
            f"peak memory {report['peak_memory_bytes'] / 2**20:.1f} MiB, "
            f"median step {report['median_step_time_s'] * 1e3:.1f} ms")


def _mix(qst: dict) -> str:
    if qst.get("output_mix") != "paper":
        return str(qst.get("output_mix"))
    return f"paper (alpha_init {qst['alpha_init']}, alpha_lr {qst['alpha_lr']})"


def _mib(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.0f} MiB"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _write_report(out: Path, data: dict) -> None:
    from eval.measure import machine_line
    from eval.report import line_chart, write_report

    ms = lambda s: "n/a" if s is None else f"{s * 1e3:.1f} ms"  # noqa: E731
    cache = data["feature_cache"]
    lines = [
        f"# {data['method'].upper()} on {data['task']} ({data['model']})", "",
        "| | |", "|---|---|",
        f"| backbone | {data['model']} ({data['quantize'] or 'unquantized'}, {data['backbone_bytes'] / 2**20:.1f} MiB) |",
        f"| side network | r={data['qst_config']['r']}, downsample={data['qst_config']['downsample']}, "
        f"side_init={data['qst_config']['side_init']}, output_mix={_mix(data['qst_config'])} |",
        f"| trainable parameters | {data['trainable_parameters']:,} of {data['total_parameters']:,} "
        f"({100 * data['trainable_share']:.3f} %) |",
        f"| accuracy before → after | {_fmt(data['accuracy_before'])} → {_fmt(data['accuracy_after'])} |"
        if data.get("perplexity_after") is None else
        f"| held-out perplexity (loss) of the responses, before → after | {_fmt(data['perplexity_before'])} "
        f"({_fmt(data['heldout_loss_before'])}) → {_fmt(data['perplexity_after'])} ({_fmt(data['heldout_loss_after'])}) |",
        f"| steps × batch × seq | {data['steps']} × {data['batch']} × {data['seq']} |",
        f"| final loss (mean of last 10 steps) | {statistics.mean(data['losses'][-10:]):.4f} |",
        f"| peak memory | {data['peak_memory_bytes'] / 2**20:.1f} MiB ({data['peak_memory_method']}); "
        f"process peak RSS {_mib(data['process_peak_rss_bytes'])} |",
        f"| median step time | {ms(data['median_step_time_s'])} (first epoch {ms(data['median_step_time_first_epoch_s'])}, "
        f"later epochs {ms(data['median_step_time_later_epochs_s'])}) |",
    ]
    for name, metrics in (data.get("eval_tasks") or {}).items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        lines.append(f"| lm-eval {name} after tuning | {shown} |")
    if cache is not None:
        lines.append(f"| feature cache | {cache['hits']} hits, {cache['misses']} misses ({cache['root']}) |")
    lines += ["", f"Device: {data['device']}. {machine_line(data['machine'])}", ""]
    steps = list(range(1, len(data["losses"]) + 1))
    write_report(out, "tune_report", data, "\n".join(lines),
                 plots={"loss": line_chart({"train loss": (steps, data["losses"])}, xlabel="step", ylabel="loss")})
