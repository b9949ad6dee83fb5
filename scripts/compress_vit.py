"""`slimtune compress-vit`: activation-aware mixed-rank compression of a ViT / DeiT / Swin classifier."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from lowrank_vit.config import MixedRankConfig
    from scripts.compress_options import add_config_options

    p = subparsers.add_parser(
        "compress-vit",
        help="compress a vision transformer's linear layers to mixed low ranks (activation-aware)",
        description="Compress the attention and MLP linears of a ViT / DeiT / Swin image classifier: "
        "calibrate on a few images, whiten, allocate ranks under a global parameter budget, compensate "
        "layer-wise errors; measure top-1 accuracy and images/s before and after. Writes OUT/model "
        "(lowrank_vit.load_compressed) and OUT/compress_report.{json,md} with OUT/ranks.png. "
        "Example: slimtune compress-vit --model ref-vit --calib 256 --keep 0.4 --out runs/vit40",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="'ref-vit' (built on first use) or a local model directory / hub id")
    p.add_argument("--data", default=None, help="ImageNet-style folder (one subfolder per class) for calibration and "
                   "evaluation; not needed for ref-vit, which brings its glyph split")
    p.add_argument("--calib", type=int, default=MixedRankConfig.calib_images, help="calibration images")
    add_config_options(p, keep_example="0.4 = 60%% fewer")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (also the images/s batch)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most this many images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output directory (created; an earlier compress-vit output is replaced)")
    p.set_defaults(func=run)


def run(args) -> int:
    from eval.errors import UserInputError, naming_flags, require_positive
    from lowrank_vit.pipeline import run_compress_vit
    from scripts.compress_options import config_from_args

    require_positive("--batch-size", args.batch_size)
    if args.eval_limit is not None:
        require_positive("--eval-limit", args.eval_limit)
    try:
        config = config_from_args(args, calib_images=args.calib)
        s = run_compress_vit(args.model, args.out, config, data=args.data, batch_size=args.batch_size,
                             eval_limit=args.eval_limit, device=args.device)
    except UserInputError as error:  # the library names its settings; say which flag sets each
        raise naming_flags(error, vars(args), {"calib_images": "--calib"}) from None
    print(s["data"])
    print(f"params {s['params_before']:,} -> {s['params_after']:,} "
          f"(targeted {s['targeted_params_before']:,} -> {s['targeted_params_after']:,})")
    print(f"top-1 {100 * s['accuracy_before']:.2f} % -> {100 * s['accuracy_after']:.2f} % on {s['eval_images']} images")
    print(f"images/s {s['images_per_s_before']:.1f} -> {s['images_per_s_after']:.1f}; compressed in {s['compress_time_s']:.1f} s")
    print(f"wrote {args.out}/model and {args.out}/compress_report.json")
    return 0
