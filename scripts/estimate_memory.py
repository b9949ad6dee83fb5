"""`slimtune estimate-memory`: the analytic training-memory breakdown of a tuning method."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from eval.errors import UserInputError


def add_parser(subparsers) -> None:
    from eval.memory_estimate import ASSUMPTIONS, METHODS

    p = subparsers.add_parser(
        "estimate-memory",
        help="analytic training-memory breakdown (context, weights, gradients, optimizer, activations)",
        description="Estimate the memory to fine-tune a causal LM with one tuning method, split into CUDA "
        "context, weights, gradients, optimizer states and activations (1 GB = 1e9 bytes). "
        "'--assumptions course --param-count 6.515e9' reproduces the course's 67.22 GB for full "
        "fine-tuning of LLaMA-2-7B at seq 4096, batch 1 (15.88 GB with --trainable-fraction 0.02).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--arch", help="named architecture, e.g. llama-2-7b, opt-1.3b (default llama-2-7b)")
    source.add_argument("--model", help="a local model directory (only its config.json is read)")
    p.add_argument("--method", default="full", choices=METHODS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="backbone and activation dtype (4-bit methods quantize the decoder Linears)")
    p.add_argument("--trainable-fraction", type=float, default=None,
                   help="share of the parameters that train (default: counted for the method)")
    p.add_argument("--assumptions", default="detailed", choices=ASSUMPTIONS,
                   help="'course': the course's arithmetic; 'detailed': what this suite's training holds")
    p.add_argument("--param-count", type=float, default=None,
                   help="override the model's parameter count (the course's LLaMA-2-7B figure is 6.515e9)")
    p.add_argument("--device", default="cuda", help="'cuda' adds the 1 GB CUDA context; 'cpu' does not")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"],
                   help="eager attention keeps the heads x seq x seq scores per layer")
    p.add_argument("--json", action="store_true", help='print {"breakdown_gb": {...}, "total_gb": ...}')
    p.set_defaults(func=run)


def run(args) -> int:
    from eval.memory_estimate import check_seq, estimate_memory, resolve_config

    if args.param_count is not None and not (math.isfinite(args.param_count) and args.param_count > 0):
        raise UserInputError(f"--param-count must be a positive finite number like 6.515e9, got {args.param_count}")
    if args.trainable_fraction is not None and not math.isfinite(args.trainable_fraction):
        raise UserInputError(f"--trainable-fraction must be in (0, 1], got {args.trainable_fraction}")
    name = args.model or args.arch or "llama-2-7b"
    if args.model is not None and not Path(args.model).expanduser().exists() and _looks_like_path(args.model):
        raise UserInputError(f"--model {args.model}: no such directory; expected a local model directory "
                             "holding config.json")
    config = check_causal_lm_config(resolve_config(name), name)
    check_seq(config, args.seq, name)
    estimate = estimate_memory(
        config, args.method, batch=args.batch, seq=args.seq,
        dtype=args.dtype, trainable_fraction=args.trainable_fraction, assumptions=args.assumptions,
        param_count=args.param_count, device=args.device, attention=args.attention,
    )
    if args.json:
        print(json.dumps({"breakdown_gb": estimate["breakdown_gb"], "total_gb": estimate["total_gb"]}))
        return 0
    print(format_estimate(estimate, args))
    return 0


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1


def check_causal_lm_config(config, name: str):
    """`config` if it describes a causal LM (what the estimate models), else a `UserInputError`."""
    from transformers import AutoModelForCausalLM

    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise UserInputError(f"{name} is a {config.model_type!r} model; the memory estimate covers causal language "
                             "models (Llama, OPT, Mistral, Qwen2, ...)")
    return config


def format_estimate(estimate: dict, args) -> str:
    what = args.model or args.arch or "llama-2-7b"
    lines = [
        f"{what}, {args.method}, batch {args.batch}, seq {args.seq}, {args.dtype} "
        f"({estimate['assumptions']} assumptions): {estimate['params'] / 1e9:.3f} B parameters, "
        f"{estimate['trainable_params'] / 1e6:.2f} M trainable",
    ]
    for name, gb in estimate["breakdown_gb"].items():
        lines.append(f"  {name:<13}{gb:>9.2f} GB")
    lines.append(f"  {'total':<13}{estimate['total_gb']:>9.2f} GB")
    return "\n".join(lines)
