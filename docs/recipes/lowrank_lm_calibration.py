"""Which calibration text makes activation-aware truncation work on ref-lm (docs/results/lowrank-lm.md).

    python docs/recipes/lowrank_lm_calibration.py --out runs/lowrank-lm-calib

Issue 23, item 5: on ref-lm v2, aa-uniform (whitened truncation) at -50 % was worse than plain
SVD (+51.7 % against +33.7 % perplexity) when calibrated on text that was mostly PyPI sources and
scored on stdlib text. This compresses ref-lm with svd, aa-uniform and aa-mixed at `--keep`,
calibrated on 64 blocks of 256 tokens (compress-lm's default) of the train split of
- "stdlib": the reference corpus (`eval.reference.reference_corpus`, what compress-lm uses for ref-lm),
- "pypi": the PyPI sources of ref-lm v2's corpus (`eval.reference.corpus.lm_corpus`, names "pypi/..."),
each with the blocks picked two ways (`eval.data.pick_token_blocks`): the text's "first" 64 blocks
(compress-lm's behaviour before this study) or 64 blocks "spread" evenly over the whole split;
and scores every model on the validation split (64 spread blocks, chooses) and the test split
(the first 64 blocks, which compress-lm reports; stdlib dense 43.93) of both texts, and on 256
blocks spread over the stdlib test split (the first 64 are one stretch of three files).
aa-mixed (slow: layer-wise refits) is run on the stdlib calibrations only (`--mixed-on-pypi`: all).
Writes OUT/calibration.json and OUT/calibration.md; a rerun skips the rows already there.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from eval.data import pack_token_blocks, pick_token_blocks
from eval.io import write_json
from eval.metrics import perplexity_of_blocks
from eval.models import load_causal_lm
from eval.reference import reference_corpus
from eval.reference.corpus import lm_corpus
from lowrank_vit.config import MixedRankConfig
from lowrank_vit.model import compress


def texts(source: str, split: str) -> list[str]:
    if source == "stdlib":
        return [d.text for d in reference_corpus(split)]
    return [d.text for d in lm_corpus(split) if d.name.startswith("pypi/")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--methods", nargs="+", default=["svd", "aa-uniform", "aa-mixed"])
    p.add_argument("--calib-blocks", type=int, default=64)
    p.add_argument("--eval-blocks", type=int, default=64)
    p.add_argument("--mixed-on-pypi", action="store_true", help="also run aa-mixed on the PyPI calibrations")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "calibration.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {(r["method"], r["calibration"]) for r in rows}

    dense, tokenizer = load_causal_lm("ref-lm")
    scored = {}
    for source in ("stdlib", "pypi"):
        scored[f"{source} val"] = pick_token_blocks(texts(source, "validation"), tokenizer, 256, args.eval_blocks)
        scored[f"{source} test"] = pack_token_blocks(texts(source, "test"), tokenizer, 256, max_blocks=args.eval_blocks)
    scored["stdlib test (256 spread)"] = pick_token_blocks(texts("stdlib", "test"), tokenizer, 256, 256)

    def record(method, calibration, model, seconds):
        row = {"method": method, "calibration": calibration, "keep": args.keep, "compress_s": seconds}
        row.update({name: perplexity_of_blocks(model, blocks, 8) for name, blocks in scored.items()})
        rows.append(row)
        write_json(path, rows)
        print(json.dumps(row), flush=True)

    if ("dense", "-") not in done:
        record("dense", "-", dense, 0.0)
    calibrations = [(source, pick) for source in ("stdlib", "pypi") for pick in ("first", "spread")]
    for source, pick in calibrations:
        name = f"{source}, {pick} {args.calib_blocks}"
        todo = [m for m in args.methods if (m, name) not in done and not (m == "svd" and ("svd", "-") in done)
                and not (m == "aa-mixed" and source == "pypi" and not args.mixed_on_pypi)]
        if not todo:
            continue
        calib = pick_token_blocks(texts(source, "train"), tokenizer, 256, args.calib_blocks, pick=pick)
        for method in todo:
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            compress(model, list(calib.split(8)), MixedRankConfig(keep=args.keep, method=method,
                                                                   calib_images=args.calib_blocks), progress=False)
            record(method, "-" if method == "svd" else name, model, time.perf_counter() - start)
            done.add((method, "-" if method == "svd" else name))
    write_markdown(out, rows)


def write_markdown(out: Path, rows: list[dict]) -> None:
    scores = [k for k in rows[0] if " val" in k or " test" in k]
    lines = ["| method | calibration (train split) | " + " | ".join(f"{s} ppl" for s in scores) + " |",
             "|---|---|" + "---:|" * len(scores)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['calibration']} | " + " | ".join(f"{r[s]:.2f}" for s in scores) + " |")
    (out / "calibration.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
