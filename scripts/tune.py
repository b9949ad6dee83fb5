"""`slimtune tune`: train a QST (or LST) side network on a task and report what it cost.

    slimtune tune --method qst --model ref-lm --task TASK --out runs/qst-TASK
    slimtune tune --method lst --model ref-lm --task TASK --out runs/lst-TASK --side-init pruned
    slimtune tune --model ref-lm --task reviews.csv --text-column review --label-column stars --out runs/reviews

--task takes the user's data too (docs/DATA.md; the flags: scripts.task_options).

The pipeline is `qst.pipeline.run_tune`; see there for what --out receives.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from eval.errors import UserInputError


def add_parser(subparsers) -> None:
    from eval.train import SCHEDULES, TrainConfig
    from eval.tuning_methods import SIDE_TUNING_METHODS
    from qst.config import DOWNSAMPLERS, OUTPUT_MIXES, SIDE_INITS, QSTConfig
    from qst.pipeline import HEADS
    from scripts.task_options import add_task_arguments

    p = subparsers.add_parser(
        "tune", help="train a QST / LST side network on a task",
        description="Quantized Side Tuning: freeze the backbone (4-bit NF4 for qst, 16/32-bit for lst), "
        "train a small side network on a task's train split, report accuracy on its test split, "
        "trainable parameters, peak memory and step time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--method", choices=sorted(SIDE_TUNING_METHODS), default="qst",
                   help="qst: NF4 backbone; lst: the same side network on an unquantized backbone")
    p.add_argument("--model", default="ref-lm", help="'ref-lm', a local model directory or a hub id")
    add_task_arguments(p)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--head", choices=HEADS, default="lm",
                   help="lm: learn the answer text with the frozen LM head; classifier: a fresh score head "
                        "(classification tasks only)")
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=200, help="optimizer steps")
    train.add_argument("--batch", type=int, default=8, help="examples per step")
    train.add_argument("--seq", type=int, default=128, help="tokens per example (padded / truncated)")
    train.add_argument("--lr", type=float, default=TrainConfig.lr)
    train.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    train.add_argument("--warmup-ratio", type=float, default=TrainConfig.warmup_ratio)
    train.add_argument("--schedule", choices=SCHEDULES, default=TrainConfig.schedule)
    train.add_argument("--max-grad-norm", type=float, default=TrainConfig.max_grad_norm)
    train.add_argument("--seed", type=int, default=TrainConfig.seed)
    side = p.add_argument_group("side network (qst.QSTConfig)")
    side.add_argument("--r", type=int, default=QSTConfig.r, help="reduction factor: side width = hidden size / r")
    side.add_argument("--downsample", choices=DOWNSAMPLERS, default=QSTConfig.downsample)
    side.add_argument("--adapter-rank", type=int, default=QSTConfig.adapter_rank,
                      help="k of the adapter / lora downsamplers")
    side.add_argument("--gate-init", type=float, default=QSTConfig.gate_init,
                      help="starting gamma of the gates (beta = sigmoid)")
    side.add_argument("--output-mix", choices=OUTPUT_MIXES, default=QSTConfig.output_mix,
                      help="additive: h_N + up(norm(g_N)) with up starting at zero; paper: alpha * h_N + "
                           "(1 - alpha) * up(norm(g_N)) with alpha learned")
    side.add_argument("--alpha-init", type=float, default=QSTConfig.alpha_init, help="(paper mix) starting alpha")
    side.add_argument("--alpha-lr", type=float, default=QSTConfig.alpha_lr,
                      help="(paper mix) alpha's learning rate as a multiple of --lr")
    side.add_argument("--dropout", type=float, default=QSTConfig.dropout, help="dropout on the downsamplers' outputs")
    side.add_argument("--side-init", choices=SIDE_INITS, default=QSTConfig.side_init)
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
                       help="train on a fixed random subset of this many examples, sampled as the data loads "
                       "(--data-seed; default: the whole train split)")
    evaluation = p.add_argument_group("evaluation")
    evaluation.add_argument("--eval-examples", type=int, default=None, help="cap on test examples (default: all)")
    evaluation.add_argument("--eval-batch", type=int, default=8)
    evaluation.add_argument("--skip-before", action="store_true", help="skip the accuracy before training")
    evaluation.add_argument("--eval-tasks", default=None,
                            help="comma list of lm-eval tasks scored after training (local data only, e.g. MMLU "
                            "after instruction tuning through a YAML in --eval-include-path; a built-in task by "
                            "its own name)")
    evaluation.add_argument("--eval-include-path", action="append", default=[],
                            help="a folder of lm-eval task YAMLs for --eval-tasks (repeatable)")
    evaluation.add_argument("--eval-limit", type=int, default=None, help="examples per --eval-tasks task")
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


def settings(args: argparse.Namespace):
    """The `qst.pipeline.TuneSettings` of the command line."""
    from eval.train import TrainConfig
    from qst.config import QSTConfig
    from qst.pipeline import TuneSettings

    train = TrainConfig(
        max_steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        schedule=args.schedule, max_grad_norm=args.max_grad_norm, seed=args.seed,
    )
    qst = QSTConfig(
        r=args.r, downsample=args.downsample, adapter_rank=args.adapter_rank, gate_init=args.gate_init,
        output_mix=args.output_mix, alpha_init=args.alpha_init, alpha_lr=args.alpha_lr, dropout=args.dropout,
        side_init=args.side_init, side_layers=_side_layers(args.side_layers),
        gradient_checkpointing=args.gradient_checkpointing,
    )
    from scripts.task_options import task_spec

    return TuneSettings(
        task=dataclasses.asdict(task_spec(args)), method=args.method, model=args.model, head=args.head, batch=args.batch, seq=args.seq,
        train_examples=args.train_examples, eval_examples=args.eval_examples, eval_batch=args.eval_batch,
        skip_before=args.skip_before, device=args.device,
        eval_tasks=tuple(t.strip() for t in (args.eval_tasks or "").split(",") if t.strip()),
        eval_include_path=tuple(args.eval_include_path), eval_limit=args.eval_limit, fit_check=not args.no_fit_check,
        cache_backbone=args.cache_backbone, cache_dir=args.cache_dir, qst=qst, train=train,
    )


# The settings of the nested configs that a flag of another name sets.
FLAGS = {"TrainConfig.max_steps": "--steps", "QSTConfig.r": "--r", "QSTConfig.adapter_rank": "--adapter-rank"}


def run(args: argparse.Namespace) -> int:
    from eval.errors import naming_flags
    from qst.pipeline import run_tune, summary

    try:
        report = run_tune(settings(args), args.out)
    except UserInputError as error:  # the library names its settings; say which flag sets each
        raise naming_flags(error, vars(args), FLAGS) from None
    print(summary(report))
    print(f"side network and tune_report.json/.md written to {args.out}")
    return 0
