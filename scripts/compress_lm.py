"""`slimtune compress-lm`: activation-aware mixed-rank compression of a causal LM's linears."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from scripts.compress_options import add_config_options

    p = subparsers.add_parser(
        "compress-lm",
        help="compress a causal LM's attention / MLP linears to mixed low ranks (activation-aware)",
        description="Compress the attention and MLP linears of a causal LM: calibrate on text blocks, whiten, "
        "allocate ranks under a global parameter budget, compensate layer-wise errors; measure held-out "
        "perplexity and tokens/s before and after. Writes OUT/model (a slimtune_lowrank model: "
        "AutoModelForCausalLM.from_pretrained after `import lowrank_vit`, with a README.md card) and "
        "OUT/compress_report.{json,md} with OUT/ranks.png. "
        "Example: slimtune compress-lm --model ref-lm --keep 0.6 --out runs/lm60",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="'ref-lm' (built on first use) or a local causal-LM directory / hub id")
    p.add_argument("--calib", default=None, help="text file or folder to calibrate on (not needed for ref-lm)")
    p.add_argument("--eval", dest="eval_text", default=None,
                   help="held-out text for perplexity (default: ref-lm's test split, else the last tenth of --calib)")
    p.add_argument("--calib-blocks", type=int, default=64, help="calibration blocks of --block-size tokens, spread "
                   "evenly over the whole calibration text")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks for perplexity, spread evenly over the "
                   "whole held-out text")
    add_config_options(p, keep_example="0.6 = 40%% fewer")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass (also the tokens/s batch)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from eval.errors import UserInputError, naming_flags
    from eval.model_card import current_command
    from lowrank_vit.lm_pipeline import run_compress_lm
    from scripts.compress_options import config_from_args

    try:
        config = config_from_args(args, calib_images=args.calib_blocks)
        s = run_compress_lm(args.model, args.out, config, calib=args.calib, eval_text=args.eval_text,
                            block_size=args.block_size, eval_blocks=args.eval_blocks, batch_size=args.batch_size,
                            device=args.device, command=getattr(args, "command_line", None) or current_command())
    except UserInputError as error:  # the library names its settings; say which flag sets each
        raise naming_flags(error, vars(args), {"eval_text": "--eval", "calib_images": "--calib-blocks"}) from None
    print(s["data"])
    print(f"params {s['params_before']:,} -> {s['params_after']:,} "
          f"(targeted {s['targeted_params_before']:,} -> {s['targeted_params_after']:,})")
    print(f"perplexity {s['perplexity_before']:.3f} -> {s['perplexity_after']:.3f}; "
          f"tokens/s {s['tokens_per_s_before']:.1f} -> {s['tokens_per_s_after']:.1f}; compressed in {s['compress_time_s']:.1f} s")
    print(f"wrote {args.out}/model and {args.out}/compress_report.json")
    return 0
