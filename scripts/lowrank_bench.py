"""`slimtune lowrank-bench`: aa-mixed against plain SVD, ASVD and aa-uniform at the same budgets."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from lowrank_vit.benchmark import DEFAULT_CALIB, MODELS, VARIANTS
    from lowrank_vit.config import MixedRankConfig

    p = subparsers.add_parser(
        "lowrank-bench",
        help="compare the low-rank compression variants (svd, asvd, aa-uniform, aa-mixed, ...) on ref-vit or ref-lm",
        description="Compress ref-vit (top-1, logit error, agreement on the glyphs' test split) or ref-lm's "
        "linears (test-split perplexity) with every variant at every keep fraction, from the same dense model "
        "and calibration samples. Writes OUT/bench_{vit,lm}.{json,md}. "
        "Example: slimtune lowrank-bench vit --keeps 0.5 0.4 --out runs/lowrank-bench-vit",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", choices=MODELS)
    p.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.4], help="fractions of the targeted params kept")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--calib", type=int, default=None,
                   help=f"calibration images (vit, default {DEFAULT_CALIB['vit']}) or blocks (lm, default {DEFAULT_CALIB['lm']})")
    p.add_argument("--compensate-steps", type=int, default=MixedRankConfig.compensate_steps)
    p.add_argument("--residual-rank", type=int, default=MixedRankConfig.residual_rank)
    p.add_argument("--lr", type=float, default=MixedRankConfig.lr)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from lowrank_vit.benchmark import run_benchmark

    _, markdown = run_benchmark(args.model, args.out, keeps=args.keeps, variants=args.variants, calib=args.calib,
                                compensate_steps=args.compensate_steps, residual_rank=args.residual_rank, lr=args.lr,
                                command=getattr(args, "command_line", None))
    print(markdown)
    print(f"wrote {args.out}/bench_{args.model}.json and bench_{args.model}.md")
    return 0
