"""The `compress-lm` job end to end: text → perplexity and tokens/s before → compress the causal
LM's attention / MLP linears → after → OUT/model, OUT/compress_report.{json,md}, OUT/ranks.png
(the same files as compress-vit).

Data: `ref-lm` calibrates on its reference corpus (train split) and is scored on its test split;
any other model needs `calib` (a text file or folder, `eval.data.load_text_corpus`); without
`eval_text` its last tenth of documents is held out for perplexity and never calibrated on.
Both sets of blocks are spread evenly over their whole text (`eval.data.pick_token_blocks`): the
first 64 blocks of ref-lm's test split are 91 % one generated file (`_sysconfigdata_*.py`, a dict
of build flags), on which plain SVD looked better than whitened truncation while the opposite
holds over the split (docs/results/lowrank-lm.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from eval.errors import require_positive
from eval.speed import side_by_side_throughput
from lowrank_vit.config import MixedRankConfig
from lowrank_vit.model import compress
from lowrank_vit.pipeline import REPORT_NAME, ranks_plot


def run_compress_lm(model_name: str, out, config: MixedRankConfig, calib=None, eval_text=None, block_size: int = 256,
                    eval_blocks: int = 64, batch_size: int = 8, device: str = "cpu", command: str | None = None) -> dict:
    """Load, score, compress, score again; write the model (with its card) and the reports under `out`."""
    import copy

    from eval.calibration import calibration_texts
    from eval.data import pick_token_blocks
    from eval.io import atomic_directory
    from eval.metrics import perplexity_of_blocks
    from eval.models import load_causal_lm
    from eval.report import markdown_table, write_report

    require_positive("block_size", block_size, minimum=2)
    require_positive("eval_blocks", eval_blocks)
    require_positive("batch_size", batch_size)
    model, tokenizer = load_causal_lm(model_name, device=device)
    calib_texts, eval_texts, held_out = calibration_texts(model_name, calib, eval_text)
    data_note = f"calibration: {calib or 'reference corpus, train split'}; held out: {held_out}"
    calib_blocks = pick_token_blocks(calib_texts, tokenizer, block_size, config.calib_images).to(device)
    test_blocks = pick_token_blocks(eval_texts, tokenizer, block_size, eval_blocks).to(device)
    ppl_before = perplexity_of_blocks(model, test_blocks, batch_size=batch_size)
    dense = copy.deepcopy(model)
    started = time.perf_counter()
    report = compress(model, list(calib_blocks.split(batch_size)), config)
    compress_time = time.perf_counter() - started
    ppl_after = perplexity_of_blocks(model, test_blocks, batch_size=batch_size)
    speed_batch = test_blocks[:batch_size]
    speed = side_by_side_throughput({"dense": dense, "compressed": model}, {"input_ids": speed_batch},
                                    items=speed_batch.numel())
    del dense
    summary = {
        "model": model_name, "method": config.method, "keep": config.keep, "int8": config.int8, "data": data_note,
        "block_size": block_size, "calib_blocks": int(calib_blocks.shape[0]), "eval_blocks": int(test_blocks.shape[0]),
        "params_before": report["params_before"], "params_after": report["params_after"],
        "targeted_params_before": report["targeted_params_before"], "targeted_params_after": report["targeted_params_after"],
        "perplexity_before": ppl_before, "perplexity_after": ppl_after, "compress_time_s": compress_time,
        "tokens_per_s_before": speed["dense"], "tokens_per_s_after": speed["compressed"],
        "speed_batch": list(speed_batch.shape), "torch_threads": torch.get_num_threads(),
        "ranks": report["ranks"], "compression": report,
    }
    model.slimtune_card = {  # measured above, on the held-out text
        "quality": {"perplexity before": ppl_before, "perplexity after": ppl_after, "held-out text": data_note},
        "base_model": model_name, "command": command,
    }
    with atomic_directory(Path(out)) as tmp:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        write_report(tmp, REPORT_NAME, summary, lm_report_markdown(summary, markdown_table),
                     plots={"ranks": ranks_plot(report)})
    return summary


def lm_report_markdown(s: dict, markdown_table) -> str:
    rows = [
        {"": "parameters", "before": s["params_before"], "after": s["params_after"]},
        {"": "targeted parameters", "before": s["targeted_params_before"], "after": s["targeted_params_after"]},
        {"": f"perplexity ({s['eval_blocks']} blocks of {s['block_size']})", "before": round(s["perplexity_before"], 3),
         "after": round(s["perplexity_after"], 3)},
        {"": f"tokens/s (batch {s['speed_batch'][0]}x{s['speed_batch'][1]}, side by side)", "before": round(s["tokens_per_s_before"], 1),
         "after": round(s["tokens_per_s_after"], 1)},
    ]
    layers = [{"layer": name, "role": e["role"], "shape": "x".join(map(str, e["shape"])),
               "rank": "dense" if e["rank"] is None else e["rank"] + e["residual_rank"], "params": e["params"],
               "output error": e["output_error"]} for name, e in s["compression"]["layers"].items()]
    return (f"# compress-lm: {s['model']}, {s['method']}, keep {s['keep']}{' + int8' if s['int8'] else ''}\n\n"
            f"Data: {s['data']}. Compression took {s['compress_time_s']:.1f} s.\n\n"
            + markdown_table(rows) + "\n\n## Per-layer ranks\n\n" + markdown_table(layers))


__all__ = ["run_compress_lm"]
