"""`slimtune bench`: tuning methods side by side (memory, step time, accuracy), each in a fresh process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# --quick: small enough for 2 CPU cores in a few minutes, every method still trains and scores.
QUICK = {"batch": 4, "seq": 128, "steps": 3, "train_steps": 8, "eval_examples": 48}
DEFAULTS = {"batch": 16, "seq": 512, "steps": 5, "train_steps": 50, "eval_examples": 200}


def add_parser(subparsers) -> None:
    from qst.baselines import DEFAULT_METHODS, METHODS

    p = subparsers.add_parser(
        "bench",
        help="compare tuning methods: peak memory, step time, tokens/s, loss, accuracy",
        description="Tune one model with several methods under the same data, batch, sequence length, "
        "optimizer (AdamW) and learning rate, each method in its own fresh process, and report trainable "
        "parameters, peak memory (with the analytic estimate beside it), median step time, tokens/s, final "
        "training loss and task accuracy, plus the floor: one no-grad forward pass of the 4-bit backbone. "
        "Writes bench_tuning.json, bench_tuning.md and bench_tuning.png under --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default="ref-lm",
                        help="'ref-lm' (the embedded reference model), a model directory or a cached hub id")
    source.add_argument("--arch", default=None,
                        help="a named architecture with random weights (llama-2-7b, opt-1.3b, ...): "
                        "memory and speed only, no accuracy")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)}; or 'all'")
    p.add_argument("--batch", type=int, default=None, help=f"batch size (default {DEFAULTS['batch']})")
    p.add_argument("--seq", type=int, default=None, help=f"sequence length (default {DEFAULTS['seq']})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed training steps, after --warmup (default {DEFAULTS['steps']})")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--train-steps", type=int, default=None,
                   help="training steps before the test accuracy is measured (the timed steps are among "
                   f"them; 0: no accuracy) (default {DEFAULTS['train_steps']})")
    p.add_argument("--task", default=None, help="downstream task (default: the first of eval.tasks.TASKS)")
    p.add_argument("--eval-examples", type=int, default=None,
                   help=f"test examples scored per method (default {DEFAULTS['eval_examples']})")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate, the same for every method")
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the 16-bit backbones ('auto': bfloat16 on CUDA, float32 on CPU); "
                   "4-bit backbones keep their unquantized parts in bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a few minutes on 2 CPU cores: " + ", ".join(f"{k} {v}" for k, v in QUICK.items())
                   + " (explicit flags win)")
    p.add_argument("--no-fit-check", action="store_true",
                   help="start even when the estimate says a method will not fit in memory")
    p.add_argument("--out", default="bench-out", help="output directory")
    p.set_defaults(func=run)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _check_seq(settings) -> None:
    from eval.errors import UserInputError
    from eval.memory_estimate import resolve_config
    from scripts.estimate_memory import check_seq

    source = settings.arch or settings.model
    try:
        config = resolve_config(source)
    except UserInputError:
        return  # run_bench says what is wrong with the model
    check_seq(config, settings.seq, source)


def run(args) -> int:
    from eval.io import prepare_output_dir
    from qst.benchmark import BenchSettings, run_bench

    preset = QUICK if args.quick else DEFAULTS
    settings = BenchSettings(
        model=None if args.arch else args.model, arch=args.arch, methods=args.methods,
        batch=args.batch if args.batch is not None else preset["batch"],
        seq=args.seq if args.seq is not None else preset["seq"],
        steps=args.steps if args.steps is not None else preset["steps"],
        warmup=args.warmup,
        train_steps=args.train_steps if args.train_steps is not None else preset["train_steps"],
        task=args.task,
        eval_examples=args.eval_examples if args.eval_examples is not None else preset["eval_examples"],
        lr=args.lr, device=args.device, dtype=args.dtype, seed=args.seed,
        fit_check=not args.no_fit_check,
    )
    _check_seq(settings)
    with prepare_output_dir(args.out, "bench", signature="bench_tuning.json"):
        report = run_bench(settings, args.out, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(report["markdown"])
    print(f"wrote {Path(args.out) / 'bench_tuning.json'}, bench_tuning.md, bench_tuning.png")
    failed = [m for m, r in report["data"]["methods"].items() if r.get("error")]
    return 1 if failed and len(failed) == len(report["data"]["methods"]) else 0

