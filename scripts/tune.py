"""`slimtune tune`: train a QST (or LST) side network on a task and report what it cost.

    slimtune tune --method qst --model ref-lm --task TASK --out runs/qst-TASK
    slimtune tune --method lst --model ref-lm --task TASK --out runs/lst-TASK --side-init pruned

Writes into --out: the side network (`qst_config.json`, `side_network.safetensors`; load it
with `qst.QSTForCausalLM.from_pretrained(OUT)`), `tune_report.json` / `.md`, `loss.png`, and
the training checkpoint (`checkpoint/`: a rerun with the same arguments resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time
from pathlib import Path

from eval.errors import UserInputError

METHODS = {"qst": "nf4", "lst": None}  # method -> backbone quantization


def add_parser(subparsers) -> None:
    from qst.config import DOWNSAMPLERS, OUTPUT_MIXES, SIDE_INITS, QSTConfig

    p = subparsers.add_parser(
        "tune", help="train a QST / LST side network on a task",
        description="Quantized Side Tuning: freeze the backbone (4-bit NF4 for qst, 16/32-bit for lst), "
        "train a small side network on a task's train split, report accuracy on its test split, "
        "trainable parameters, peak memory and step time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--method", choices=sorted(METHODS), default="qst",
                   help="qst: NF4 backbone; lst: the same side network on an unquantized backbone")
    p.add_argument("--model", default="ref-lm", help="'ref-lm', a local model directory or a hub id")
    p.add_argument("--task", required=True, help="a reference task name (see eval.tasks.TASKS)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--head", choices=["lm", "classifier"], default="lm",
                   help="lm: learn the answer text with the frozen LM head; classifier: a fresh score head "
                        "(classification tasks only)")
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=200, help="optimizer steps")
    train.add_argument("--batch", type=int, default=8, help="examples per step")
    train.add_argument("--seq", type=int, default=128, help="tokens per example (padded / truncated)")
    train.add_argument("--lr", type=float, default=2e-4)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--warmup-ratio", type=float, default=0.03)
    train.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="constant")
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--seed", type=int, default=0)
    side = p.add_argument_group("side network (qst.QSTConfig)")
    side.add_argument("--r", type=int, default=16, help="reduction factor: side width = hidden size / r")
    side.add_argument("--downsample", choices=DOWNSAMPLERS, default="adapter")
    side.add_argument("--adapter-rank", type=int, default=16, help="k of the adapter / lora downsamplers")
    side.add_argument("--gate-init", type=float, default=0.0, help="starting gamma of the gates (beta = sigmoid)")
    side.add_argument("--output-mix", choices=OUTPUT_MIXES, default=QSTConfig.output_mix,
                      help="additive: h_N + up(norm(g_N)) with up starting at zero; paper: alpha * h_N + "
                           "(1 - alpha) * up(norm(g_N)) with alpha learned")
    side.add_argument("--alpha-init", type=float, default=1.0, help="(paper mix) starting alpha")
    side.add_argument("--alpha-lr", type=float, default=QSTConfig.alpha_lr,
                      help="(paper mix) alpha's learning rate as a multiple of --lr")
    side.add_argument("--dropout", type=float, default=0.0, help="dropout on the downsamplers' outputs")
    side.add_argument("--side-init", choices=SIDE_INITS, default="random")
    side.add_argument("--side-layers", default=None,
                      help="comma-separated backbone layer indices feeding side blocks (default: all)")
    side.add_argument("--gradient-checkpointing", action="store_true")
    cache = p.add_argument_group("backbone feature cache")
    cache.add_argument("--cache-backbone", action="store_true",
                       help="store the backbone's hidden states on disk in the first epoch; later epochs "
                            "run only the side network")
    cache.add_argument("--cache-dir", type=Path, default=None,
                       help="feature cache location (default: $SLIMTUNE_CACHE/qst-features)")
    train.add_argument("--train-examples", type=int, default=None,
                       help="train on a fixed random subset of this many examples (default: the whole train split)")
    evaluation = p.add_argument_group("evaluation")
    evaluation.add_argument("--eval-examples", type=int, default=None, help="cap on test examples (default: all)")
    evaluation.add_argument("--eval-batch", type=int, default=8)
    evaluation.add_argument("--skip-before", action="store_true", help="skip the accuracy before training")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--no-fit-check", action="store_true",
                   help="start even when the memory estimate says the run will not fit")
    p.set_defaults(func=run)


def _side_layers(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise UserInputError(f"--side-layers must be comma-separated integers like 0,2,4; got {text!r}") from e


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise UserInputError(f"--{name} must be a positive integer, got {value}")


def run(args: argparse.Namespace) -> int:
    from eval.io import prepare_output_dir

    for name in ("steps", "batch", "seq", "eval_batch"):
        _positive(name.replace("_", "-"), getattr(args, name))
    with prepare_output_dir(args.out, "tune", signature="tune_report.json"):
        return _run(args)


def _check_fits(args, model_config, device: str) -> None:
    """Refuse --seq beyond the model's context, and a run the memory estimate says will not fit."""
    from eval.memory_estimate import estimate_memory, fits
    from scripts.estimate_memory import check_seq

    check_seq(model_config, args.seq, args.model)
    if args.no_fit_check:
        return
    try:
        estimate = estimate_memory(model_config, args.method, batch=args.batch, seq=args.seq,
                                   dtype="bfloat16" if METHODS[args.method] else "float32", device=device,
                                   qst_reduction=args.r, qst_adapter_rank=args.adapter_rank)
    except UserInputError:
        return  # a side-network setting the estimate cannot model: QSTConfig says what is wrong
    available = _available_bytes(device)
    if available is not None and not fits(estimate, 0.9 * available):
        raise UserInputError(f"batch {args.batch} x seq {args.seq} will not fit on {device}: the memory estimate is "
                             f"{estimate['total_gb']:.2f} GB, only {available / 1e9:.2f} GB is free; use a smaller "
                             "--batch or --seq, or --no-fit-check to try anyway")


def _available_bytes(device: str) -> int | None:
    import psutil
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0] if torch.cuda.is_available() else None
    return psutil.virtual_memory().available


def _run(args: argparse.Namespace) -> int:
    import torch

    from eval.measure import count_parameters, machine_info, parameter_bytes, peak_memory
    from eval.models import load_causal_lm
    from eval.tasks import classification_batches, lm_batches, load_task, task_accuracy
    from eval.train import TrainConfig, train
    from qst import QSTConfig, QSTForCausalLM, QSTForSequenceClassification

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    config = QSTConfig(
        r=args.r, downsample=args.downsample, adapter_rank=args.adapter_rank, gate_init=args.gate_init,
        output_mix=args.output_mix, alpha_init=args.alpha_init, alpha_lr=args.alpha_lr, dropout=args.dropout,
        side_init=args.side_init,
        side_layers=_side_layers(args.side_layers), gradient_checkpointing=args.gradient_checkpointing,
    )
    train_config = TrainConfig(
        max_steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        schedule=args.schedule, max_grad_norm=args.max_grad_norm, seed=args.seed,
    )
    task = load_task(args.task)
    if args.train_examples is not None:
        _positive("train-examples", args.train_examples)
        subset = random.Random(args.seed).sample(task.train, min(args.train_examples, len(task.train)))
        task = dataclasses.replace(task, train=subset)
    if args.head == "classifier" and task.kind != "classification":
        raise UserInputError(f"--head classifier needs a classification task; {task.name} is {task.kind}")

    quantize = METHODS[args.method]
    backbone, tokenizer = load_causal_lm(args.model, quantize=quantize, device=device)
    _check_fits(args, backbone.config, device)  # before any training memory is taken
    if args.head == "classifier":
        model = QSTForSequenceClassification.from_base(
            backbone, config, base_name_or_path=args.model, num_labels=len(task.labels))
        batches = classification_batches(task.train, tokenizer, args.batch, args.seq, shuffle=True, seed=args.seed)
    else:
        model = QSTForCausalLM.from_base(backbone, config, base_name_or_path=args.model)
        batches = lm_batches(task, "train", tokenizer, args.batch, args.seq, shuffle=True, seed=args.seed)
    if args.cache_backbone:
        model.enable_feature_cache(args.cache_dir)

    def accuracy() -> float:
        return task_accuracy(model, tokenizer, task, split="test", batch_size=args.eval_batch,
                             max_examples=args.eval_examples)

    # Everything that defines the run: a checkpoint made with anything else is not resumed.
    run_description = {"command": "tune", "method": args.method, "model": str(args.model), "task": task.name,
                       "head": args.head, "batch": args.batch, "seq": args.seq, "seed": args.seed,
                       "train_examples": args.train_examples, "qst_config": config.to_dict()}
    model.eval()
    with torch.no_grad():
        before = None if args.skip_before else accuracy()
    result = {}

    def fit():
        result["train"] = train(model, batches, train_config, out_dir=args.out, desc=f"{args.method} {task.name}",
                                run=run_description, param_groups=model.parameter_groups(train_config.lr))

    start = time.perf_counter()
    peak = peak_memory(fit, device)
    train_seconds = time.perf_counter() - start
    history = result["train"]
    model.eval()
    with torch.no_grad():
        after = accuracy()
    model.save_pretrained(args.out)

    trainable = count_parameters(model, trainable_only=True)
    total = count_parameters(model)
    per_epoch = len(batches)
    first, later = history.step_times[:per_epoch], history.step_times[per_epoch:]
    data = {
        "method": args.method, "model": args.model, "task": task.name, "head": args.head,
        "quantize": quantize, "device": device, "qst_config": config.to_dict(), "train_config": train_config.to_dict(),
        "batch": args.batch, "seq": args.seq, "train_examples": len(task.train), "train_batches_per_epoch": per_epoch,
        "trainable_parameters": trainable, "total_parameters": total, "trainable_share": trainable / total,
        "backbone_bytes": parameter_bytes(model.backbone),
        "accuracy_before": before, "accuracy_after": after,
        "losses": history.losses, "steps": history.steps, "resumed_from": history.resumed_from,
        "peak_memory_bytes": peak,
        "process_peak_rss_bytes": _process_peak_rss(),
        "peak_memory_method": "torch.cuda.max_memory_allocated" if device.startswith("cuda")
        else "peak RSS growth during training (this process)",
        "median_step_time_s": history.median_step_time,
        "median_step_time_first_epoch_s": statistics.median(first) if first else None,
        "median_step_time_later_epochs_s": statistics.median(later) if later else None,
        "train_seconds": train_seconds,
        "feature_cache": model.feature_cache.stats() if model.feature_cache is not None else None,
        "machine": machine_info(),
    }
    _write(args.out, data)
    print(f"{args.method} on {task.name}: accuracy {_fmt(before)} -> {_fmt(after)}, "
          f"{trainable:,} trainable parameters ({100 * trainable / total:.2f} %), "
          f"peak memory {peak / 2**20:.1f} MiB, median step {history.median_step_time * 1e3:.1f} ms")
    print(f"side network and tune_report.json/.md written to {args.out}")
    return 0


def _process_peak_rss() -> int | None:
    """Peak resident memory of this whole process so far (backbone, data, training, evaluation)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _mix(qst: dict) -> str:
    if qst.get("output_mix") != "paper":
        return str(qst.get("output_mix"))
    return f"paper (alpha_init {qst['alpha_init']}, alpha_lr {qst['alpha_lr']})"


def _mib(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.0f} MiB"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _write(out: Path, data: dict) -> None:
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
        f"| accuracy before → after | {_fmt(data['accuracy_before'])} → {_fmt(data['accuracy_after'])} |",
        f"| steps × batch × seq | {data['steps']} × {data['batch']} × {data['seq']} |",
        f"| final loss (mean of last 10 steps) | {statistics.mean(data['losses'][-10:]):.4f} |",
        f"| peak memory | {data['peak_memory_bytes'] / 2**20:.1f} MiB ({data['peak_memory_method']}); "
        f"process peak RSS {_mib(data['process_peak_rss_bytes'])} |",
        f"| median step time | {ms(data['median_step_time_s'])} (first epoch {ms(data['median_step_time_first_epoch_s'])}, "
        f"later epochs {ms(data['median_step_time_later_epochs_s'])}) |",
    ]
    if cache is not None:
        lines.append(f"| feature cache | {cache['hits']} hits, {cache['misses']} misses ({cache['root']}) |")
    lines += ["", f"Device: {data['device']}. {machine_line(data['machine'])}", ""]
    steps = list(range(1, len(data["losses"]) + 1))
    write_report(out, "tune_report", data, "\n".join(lines),
                 plots={"loss": line_chart({"train loss": (steps, data["losses"])}, xlabel="step", ylabel="loss")})
