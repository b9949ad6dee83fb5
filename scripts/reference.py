"""`slimtune reference {lm,vit}`: build (or reuse) a cached reference model and print its directory."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "reference",
        help="build or reuse the reference LM (ref-lm) or ViT (ref-vit); prints the model directory",
        description="Print the directory of one of the reference models trained here: 'lm' (a LLaMA-architecture "
        "LM pretrained on real Python source) or 'vit' (a ViT trained on glyphs of matplotlib's typefaces). Their "
        "weights ship with the suite, so this returns at once; --rebuild retrains from the recipe into the cache "
        "($SLIMTUNE_CACHE, default ~/.cache/slimtune), resuming an interrupted build, and compares the result with "
        "the shipped weights. Prints a one-line summary, then the model directory as the last line of stdout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("kind", choices=["lm", "vit"], help="which reference model")
    p.add_argument("--rebuild", action="store_true", help="retrain from the recipe (resumes an interrupted build) and compare with the shipped weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the build (each seed is cached separately)")
    p.add_argument("--write-images", action="store_true",
                   help="vit only: also write the glyphs as an ImageNet-style PNG folder (for --data DIR of other "
                   "commands; a minute or two the first time) and print where")
    p.add_argument("--tiny", action="store_true",
                   help="a seconds-long build of a very small model, to check the mechanics (not for measurements)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eval.errors import UserInputError
    from eval.io import read_json
    from eval.reference import CARD_NAME, reference_image_folder, reference_path
    from eval.reference.shipped import compare_with_shipped
    from eval.reference.vit import image_folder_is_written, image_folder_path

    if args.write_images and args.kind != "vit":
        raise UserInputError(f"--write-images is for `slimtune reference vit` (the glyph images); got kind {args.kind!r}")

    path = reference_path(args.kind, seed=args.seed, tiny=args.tiny, rebuild=args.rebuild)
    card = read_json(path / CARD_NAME, what="reference card")
    if args.kind == "lm":
        summary = (f"ref-lm: {card['parameters'] / 1e6:.2f} M parameters, test perplexity "
                   f"{card['test_perplexity']:.2f} (unigram {card['unigram_test_perplexity']:.1f})")
        if "test_bits_per_byte" in card:
            summary += f", {card['test_bits_per_byte']:.3f} bits per byte"
    else:
        summary = (f"ref-vit: {card['parameters'] / 1e6:.2f} M parameters, test accuracy "
                   f"{card['test_accuracy']:.2%} on {card['data']['images']['test']} test images")
        if args.write_images:  # rendered only when asked for: it takes a minute or two the first time
            summary += f" (PNG folder: {reference_image_folder()})"
        elif image_folder_is_written():
            summary += f" (PNG folder: {image_folder_path()})"
        else:
            summary += " (PNG folder of the glyphs: add --write-images)"
    print(f"{summary}, built in {card['build_seconds']:.0f} s")
    comparison = compare_with_shipped(args.kind, path) if args.rebuild and not args.tiny else None
    if comparison:
        print(f"rebuilt vs shipped: {comparison['metric']} {comparison['rebuilt']:.4f} vs {comparison['shipped']:.4f} "
              f"({comparison['relative_difference']:.2%} apart); weights "
              f"{'bit-identical' if comparison['bit_identical_weights'] else 'differ'}")
    print(path)
    return 0
