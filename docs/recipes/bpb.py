"""Bits per byte and perplexity of a causal LM on v1's test documents (the stdlib test split).

The "v1 beside v2" table of docs/RESULTS.md: `eval.metrics.bits_per_byte_of_blocks` and
`perplexity_of_blocks` over `pack_token_blocks(reference_corpus("test"), tokenizer, block)`, at
each block length asked for (256 is ref-lm v2's training length).

    python docs/recipes/bpb.py --model ref-lm --blocks 256,512
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ref-lm", help="ref-lm or a model directory")
    parser.add_argument("--blocks", default="256,512", help="comma-separated block lengths in tokens")
    args = parser.parse_args()

    import torch

    from eval.data import pack_token_blocks
    from eval.metrics import bits_per_byte_of_blocks, perplexity_of_blocks
    from eval.models import load_causal_lm
    from eval.reference.corpus import reference_corpus

    model, tokenizer = load_causal_lm(args.model)
    model.eval()
    docs = reference_corpus("test")
    rows = []
    with torch.no_grad():
        for block in (int(b) for b in args.blocks.split(",")):
            blocks = pack_token_blocks([d.text for d in docs], tokenizer, block)
            rows.append({"model": args.model, "block": block, "blocks": len(blocks),
                         "bits_per_byte": round(bits_per_byte_of_blocks(model, blocks, tokenizer), 4),
                         "perplexity": round(perplexity_of_blocks(model, blocks), 2)})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
