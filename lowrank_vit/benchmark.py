"""Benchmark: aa-mixed against plain SVD, ASVD and aa-uniform at the same budget, on ref-vit
(top-1 on the glyphs' test split) and on ref-lm's linears (test-split perplexity).

    slimtune lowrank-bench vit --keeps 0.5 0.4 --out runs/lowrank-bench-vit
    slimtune lowrank-bench lm  --keeps 0.8 0.6 0.5 --out runs/lowrank-bench-lm
    result, markdown = run_benchmark("vit", "runs/lowrank-bench-vit", keeps=(0.5, 0.4))   # the same, from Python

Every variant starts from the same dense model and the same calibration samples (whose input
statistics are collected once; `compress_time_s` excludes that shared calibration pass). Variants:
svd, asvd, aa-uniform (baselines, no compensation), aa-mixed/no-comp (whitening + greedy ranks,
no compensation: the allocation alone), aa-mixed (the full method: + sequential closed-form
refit), aa-mixed+gd-residual (+ a rank-4 residual per layer trained by 100 Adam steps, paid from
the same budget) and aa-mixed+int8 (int8 factors).
Besides top-1, `logit_error` = ‖logits − dense logits‖² / ‖dense logits‖² on the test split and
`agreement` = share of test images whose top-1 equals the dense model's: fidelity measures that
still separate the methods where 360 test images make top-1 differences noise.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

from eval.calibration import collect_input_statistics
from eval.errors import UserInputError
from lowrank_vit.config import MixedRankConfig
from lowrank_vit.model import compress, find_targets

VARIANTS = {
    "svd": {"method": "svd"},
    "asvd": {"method": "asvd"},
    "aa-uniform": {"method": "aa-uniform"},
    "aa-mixed/no-comp": {"method": "aa-mixed", "refit": False, "compensate_steps": 0},
    "aa-mixed": {"method": "aa-mixed"},
    "aa-mixed+gd-residual": {"method": "aa-mixed", "compensate_steps": 100, "residual_rank": 4},
    "aa-mixed+int8": {"method": "aa-mixed", "int8": True},
}


def _dense_stats(model, batches, config: MixedRankConfig):
    # Every variant starts from the same dense model and batches: calibrate once.
    layers = {name: model.get_submodule(name) for name in find_targets(model, config.targets)}
    return collect_input_statistics(model, layers, batches, ("xtx", "abs_mean"), progress=False)


def _variants(names, base: MixedRankConfig, keep: float):
    for name in names:
        yield name, dataclasses.replace(base, keep=keep, **VARIANTS[name])


def _compress_variants(dense, calib, base: MixedRankConfig, keeps, variants, score):
    """Compress a copy of `dense` per (keep, variant); yield (name, keep, model, row).

    `score(model) -> dict` adds the model-specific quality columns to each row. Compression time
    excludes scoring.
    """
    stats = _dense_stats(dense, calib, base)
    for keep in keeps:
        for name, config in _variants(variants, base, keep):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            report = compress(model, calib, config, progress=False, input_stats=stats)
            elapsed = time.perf_counter() - start
            row = {"variant": name, "keep": keep, "keep_achieved": report["keep_achieved"],
                   "targeted_params": report["targeted_params_after"], "params": report["params_after"],
                   **score(model), "compress_time_s": elapsed}
            print(row, file=sys.stderr, flush=True)
            yield name, keep, model, row


def bench_vit(keeps, variants, base: MixedRankConfig, batch_size: int = 64) -> dict:
    from eval.models import load_image_classifier
    from eval.speed import side_by_side_throughput
    from lowrank_vit.pipeline import as_tensor_batches, image_accuracy, image_splits

    dense, processor = load_image_classifier("ref-vit")
    calib_set, calib_idx, eval_set, eval_idx, note = image_splits("ref-vit", None, processor, base.calib_images, base.seed)
    calib = [p for p, _ in as_tensor_batches(calib_set, calib_idx, batch_size)]
    speed_batch = next(as_tensor_batches(eval_set, eval_idx, batch_size))[0]
    pixels = torch.stack([eval_set[i][0] for i in eval_idx])
    with torch.no_grad():
        reference = dense(pixel_values=pixels).logits

    def fidelity(model) -> dict:
        with torch.no_grad():
            logits = model(pixel_values=pixels).logits
        return {"logit_error": float((logits - reference).square().sum() / reference.square().sum()),
                "agreement": float((logits.argmax(-1) == reference.argmax(-1)).double().mean())}

    def score(model) -> dict:
        return {"accuracy": image_accuracy(model, eval_set, eval_idx, batch_size), **fidelity(model)}

    rows = [{"variant": "dense", "keep": 1.0, "accuracy": image_accuracy(dense, eval_set, eval_idx, batch_size),
             "logit_error": 0.0, "agreement": 1.0}]
    models = {}
    for name, keep, model, row in _compress_variants(dense, calib, base, keeps, variants, score):
        rows.append(row)
        if name == "aa-mixed":
            models[f"aa-mixed keep {keep}"] = model
    speed = side_by_side_throughput({"dense": dense, **models}, {"pixel_values": speed_batch},
                                    items=int(speed_batch.shape[0]))
    return {"model": "ref-vit", "data": note, "eval_images": len(eval_idx), "rows": rows,
            "images_per_s": speed, "speed_batch_size": int(speed_batch.shape[0])}


def bench_lm(keeps, variants, base: MixedRankConfig, block_size: int = 256, eval_blocks: int = 64) -> dict:
    from eval.data import pick_token_blocks
    from eval.metrics import perplexity_of_blocks
    from eval.models import load_causal_lm
    from eval.reference import reference_corpus

    dense, tokenizer = load_causal_lm("ref-lm")
    # spread over each split, as compress-lm picks them (the first test blocks are one generated file)
    calib = list(pick_token_blocks(reference_corpus("train"), tokenizer, block_size, base.calib_images).split(8))
    test = pick_token_blocks(reference_corpus("test"), tokenizer, block_size, eval_blocks)
    rows = [{"variant": "dense", "keep": 1.0, "perplexity": perplexity_of_blocks(dense, test)}]
    for _, _, _, row in _compress_variants(dense, calib, base, keeps, variants,
                                           lambda model: {"perplexity": perplexity_of_blocks(model, test)}):
        rows.append(row)
    return {"model": "ref-lm", "calib_blocks": base.calib_images, "block_size": block_size,
            "eval_blocks": int(test.shape[0]), "rows": rows}


MODELS = ("vit", "lm")
DEFAULT_CALIB = {"vit": 256, "lm": 64}  # calibration images (vit) or token blocks (lm)


def run_benchmark(model: str, out: str | Path, keeps=(0.5, 0.4), variants=tuple(VARIANTS), calib: int | None = None,
                  compensate_steps: int = MixedRankConfig.compensate_steps,
                  residual_rank: int = MixedRankConfig.residual_rank, lr: float = MixedRankConfig.lr,
                  command: str | None = None) -> tuple[dict, str]:
    """Compare the variants on ref-vit ("vit") or ref-lm ("lm"); write OUT/bench_{model}.{json,md}.

    Returns (the report, its Markdown). `calib` defaults to DEFAULT_CALIB[model].
    """
    from eval.report import markdown_table, write_report

    if model not in MODELS:
        raise UserInputError(f"unknown benchmark model {model!r}; expected one of {', '.join(MODELS)}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise UserInputError(f"unknown variant(s) {unknown or list(variants)}; expected some of {', '.join(VARIANTS)}")
    base = MixedRankConfig(calib_images=calib or DEFAULT_CALIB[model], compensate_steps=compensate_steps,
                           residual_rank=residual_rank, lr=lr)
    result = (bench_vit if model == "vit" else bench_lm)(list(keeps), list(variants), base)
    result.update(config=base.to_dict(), torch_threads=torch.get_num_threads(), command=command or " ".join(sys.argv))
    metric = "accuracy" if model == "vit" else "perplexity"
    md = f"# lowrank_vit benchmark: {result['model']}\n\n" + markdown_table(
        result["rows"], ["variant", "keep", "keep_achieved", "targeted_params", metric]
        + (["agreement", "logit_error"] if model == "vit" else []) + ["compress_time_s"])
    if "images_per_s" in result:
        md += f"\n\nimages/s (batch {result['speed_batch_size']}): " + ", ".join(
            f"{k} {v:.1f}" for k, v in result["images_per_s"].items())
    write_report(out, f"bench_{model}", result, md)
    return result, md
