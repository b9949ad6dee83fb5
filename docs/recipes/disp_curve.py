"""DISP's perplexity against hypernetwork steps on ref-lm, beside SliceGPT (docs/results/disp.md).

    python docs/recipes/disp_curve.py --out runs/disp-curve --tag defaults
    python docs/recipes/disp_curve.py --out runs/disp-curve --tag calib1024 --calib-blocks 1024

Calibration: the reference corpus' train split (`eval.calibration.calibration_texts`, as
`slimtune prune` does); every setting is compared on the **validation** split; the **test**
split's first 64 blocks of 256 tokens (the blocks `slimtune prune` reports) are reported.
One hypernetwork per budget trains to the largest step count and its masks are exported at
each smaller count on the way: the shared training loop resumes bit-exactly from its checkpoint
and nothing in training depends on the final count (constant learning rate, no warm-up), so
the exported masks at step s are those of a run of s steps. Results accumulate in
OUT/curve.json (a rerun skips what is there) and OUT/curve.md. Timings are wall-clock seconds
of hypernetwork training on whatever machine ran it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from eval.data import pack_token_blocks, pick_token_blocks
from eval.io import write_json
from eval.metrics import perplexity_of_blocks
from eval.models import load_causal_lm
from eval.reference import reference_corpus
from pruning.baselines import baseline_prune, rotate_residual
from pruning.config import DispConfig
from pruning.model import block_params, prune_model
from pruning.pipeline import PruneSettings, calibration_blocks
from pruning.trainer import train_disp


def main() -> None:
    d = PruneSettings(model="ref-lm")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tag", required=True, help="name of this setting in the table")
    p.add_argument("--kept", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--steps", type=int, nargs="+", default=[300, 1000, 3000])
    p.add_argument("--calib-blocks", type=int, default=d.calib_blocks)
    p.add_argument("--calib-pick", default=d.calib_pick)
    p.add_argument("--estimator", default=d.estimator)
    p.add_argument("--lam", type=float, default=d.lam)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--tau", type=float, default=d.tau)
    p.add_argument("--offset", type=float, default=d.offset)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--val-blocks", type=int, default=256, help="validation blocks, evenly spread over the split")
    p.add_argument("--test-blocks", type=int, default=d.eval_blocks, help="the first N test blocks (prune's report)")
    p.add_argument("--slicegpt", action="store_true", help="also measure SliceGPT at each --kept")
    p.add_argument("--rotate", action="store_true", help="diagnostic: train and prune ref-lm with its residual "
                   "rotated into its principal basis (pruning.baselines.rotate_residual; same logits)")
    p.add_argument("--seed", type=int, default=0, help="DispConfig.seed (the hypernetwork's initialisation, input "
                   "and sampling noise); give each seed its own --tag")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "curve.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["tag"], r["kept"], r["steps"]) for r in rows}

    model, tokenizer = load_causal_lm("ref-lm")
    settings = PruneSettings(model="ref-lm", calib_blocks=args.calib_blocks, calib_pick=args.calib_pick)
    calib = calibration_blocks(settings, model, tokenizer)
    # chooses: blocks evenly spread over the validation split (all 861 cost ~2 min per model on a busy core)
    if args.rotate:
        model = rotate_residual(model, calib, args.batch_size)
    val = pick_token_blocks(reference_corpus("validation"), tokenizer, 256, args.val_blocks, pick="spread")
    # reports: what `slimtune prune` reports by default (dense 43.93), and as many blocks spread over the test split
    test = pack_token_blocks(reference_corpus("test"), tokenizer, 256, max_blocks=args.test_blocks)
    test_all = pick_token_blocks(reference_corpus("test"), tokenizer, 256, args.val_blocks, pick="spread")

    def record(tag, kept, steps, pruned, train_s, extra=None):
        rows.append(dict(tag=tag, kept=kept, steps=steps, kept_ratio=block_params(pruned) / block_params(model),
                         val_ppl=perplexity_of_blocks(pruned, val, args.batch_size),
                         test_ppl=perplexity_of_blocks(pruned, test, args.batch_size),
                         test_spread_ppl=perplexity_of_blocks(pruned, test_all, args.batch_size),
                         train_s=train_s, **(extra or {})))
        write_json(results_path, rows)
        print(json.dumps(rows[-1]), flush=True)

    if ("dense", 1.0, 0) not in done:
        record("dense", 1.0, 0, model, 0.0)
    for kept in args.kept:
        slicegpt_tag = f"slicegpt ({args.calib_pick} {args.calib_blocks} blocks)"
        if args.slicegpt and not args.rotate and (slicegpt_tag, kept, 0) not in done:
            start = time.perf_counter()
            sliced = baseline_prune("slicegpt", model, kept, calib, args.batch_size)
            record(slicegpt_tag, kept, 0, sliced, time.perf_counter() - start)
        ckpt = out / f"ckpt-{args.tag}-{kept}-seed{args.seed}"
        earlier = [r["train_s"] for r in rows if r["tag"] == args.tag and r["kept"] == kept]
        elapsed = max(earlier, default=0.0)  # resumed segments add to the time already spent
        for steps in sorted(args.steps):
            config = DispConfig(kept=kept, steps=steps, estimator=args.estimator, lam=args.lam, lr=args.lr,
                                tau=args.tau, offset=args.offset, seed=args.seed)
            if (args.tag, kept, steps) in done:
                continue
            result = train_disp(model, calib, config, batch_size=args.batch_size, out_dir=ckpt)
            elapsed += result.train_time_s
            last = result.kept_ratio[-20:]
            record(args.tag, kept, steps, prune_model(model, result.plan), elapsed,
                   dict(export_threshold=result.plan.info["export_threshold"],
                        train_kept_last20=sum(last) / max(len(last), 1), setting=vars(args)))
    write_markdown(out, rows)


def write_markdown(out: Path, rows: list[dict]) -> None:
    lines = ["| setting | kept (target) | steps | block params kept | val ppl (256 spread blocks) | test ppl (first 64) "
             "| test ppl (256 spread blocks) | train s (cumulative) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tag']} | {r['kept']} | {r['steps']} | {r['kept_ratio']:.3f} | {r['val_ppl']:.2f} | "
                     f"{r['test_ppl']:.2f} | {r['test_spread_ppl']:.2f} | {r['train_s']:.0f} |")
    (out / "curve.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
