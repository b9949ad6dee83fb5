"""QST's backbone feature cache: step time with and without it, alternated in one process.

The "feature cache speed-up" of docs/RESULTS.md (History: measured on ref-lm v1 as 1.6x and
2.1x). One QST model on the 4-bit ref-lm, one def-kind training batch of 8 x 256 tokens; after a
first step fills the cache, 12 steps that run the backbone alternate with 12 that read its cached
features; prints both medians and their ratio.

    nice -n 10 python docs/recipes/qst_cache_ab.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=12, help="alternating (uncached, cached) step pairs")
    args = parser.parse_args()

    import torch

    from eval.models import load_causal_lm
    from eval.tasks import lm_batches, load_task
    from qst import QSTConfig, QSTForCausalLM

    backbone, tokenizer = load_causal_lm("ref-lm", quantize="nf4")
    model = QSTForCausalLM.from_base(backbone, QSTConfig(), base_name_or_path="ref-lm")
    batch = lm_batches(load_task("def-kind"), "train", tokenizer, 8, 256)[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()

    def step() -> float:
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="slimtune-cache-ab-") as root:
        cache = model.enable_feature_cache(root)
        step()  # fills the cache
        plain, cached = [], []
        for _ in range(args.pairs):
            model.feature_cache = None  # runs the backbone
            plain.append(step())
            model.feature_cache = cache  # reads the stored features
            cached.append(step())
    print(f"backbone + side: median {statistics.median(plain) * 1e3:.0f} ms; cached features + side: "
          f"median {statistics.median(cached) * 1e3:.0f} ms; speed-up "
          f"{statistics.median(plain) / statistics.median(cached):.1f}x ({args.pairs} alternating pairs)")


if __name__ == "__main__":
    main()
