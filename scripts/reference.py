"""`slimtune reference {lm,vit}`: build (or reuse) a cached reference model and print its directory."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "reference",
        help="build or reuse the reference LM (ref-lm) or ViT (ref-vit); prints the model directory",
        description="Build, or reuse from the cache ($SLIMTUNE_CACHE, default ~/.cache/slimtune), one of the "
        "reference models trained here: 'lm' (a LLaMA-architecture LM pretrained on the CPython standard "
        "library) or 'vit' (a ViT trained on glyphs of matplotlib's typefaces). Prints a one-line summary, then the "
        "model directory as the last line of stdout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("kind", choices=["lm", "vit"], help="which reference model")
    p.add_argument("--rebuild", action="store_true", help="build again even if a finished one is cached")
    p.add_argument("--seed", type=int, default=0, help="seed of the build (each seed is cached separately)")
    p.add_argument("--tiny", action="store_true",
                   help="a seconds-long build of a very small model, to check the mechanics (not for measurements)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eval.reference import reference_card, reference_image_folder, reference_path

    path = reference_path(args.kind, seed=args.seed, tiny=args.tiny, rebuild=args.rebuild)
    card = reference_card(args.kind, seed=args.seed, tiny=args.tiny)
    if args.kind == "lm":
        summary = (f"ref-lm: {card['parameters'] / 1e6:.2f} M parameters, test perplexity "
                   f"{card['test_perplexity']:.2f} (unigram {card['unigram_test_perplexity']:.1f})")
    else:
        summary = (f"ref-vit: {card['parameters'] / 1e6:.2f} M parameters, test accuracy "
                   f"{card['test_accuracy']:.2%} on {card['data']['images']['test']} test images")
        if not args.tiny:
            summary += f" (PNG folder: {reference_image_folder()})"
    print(f"{summary}, built in {card['build_seconds']:.0f} s")
    print(path)
    return 0
