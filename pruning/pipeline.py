"""`slimtune prune` end to end: load, calibrate, prune (DISP or a baseline), recover, measure, save.

    summary = run_prune("disp", "ref-lm", "runs/disp50", kept=0.5, steps=300)

writes OUT/model (load with `pruning.load_pruned`), OUT/prune_report.{json,md} and
OUT/kept_width.png; the whole directory appears at once (nothing half-written on error).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from eval.errors import UserInputError
from pruning.arch import MASK_NAMES, layout_for
from pruning.baselines import BASELINES, baseline_prune
from pruning.config import DispConfig
from pruning.model import block_params, pruning_plan
from pruning.trainer import kept_widths, recover_with_lora, train_disp

METHODS = ("disp", *BASELINES)


def _texts(model_name: str, calib, eval_texts) -> tuple[list[str], list[str], str]:
    """(calibration texts, held-out texts, where the held-out text came from)."""
    from eval.data import load_text_corpus

    if calib is None and model_name != "ref-lm":
        raise UserInputError("--calib FILE_OR_DIR is required for models other than ref-lm "
                             "(ref-lm calibrates on its own reference corpus)")
    if calib is None:
        from eval.reference import reference_corpus

        calib_texts = [d.text for d in reference_corpus("train")]
        if eval_texts is None:
            return calib_texts, [d.text for d in reference_corpus("test")], "reference corpus, test split"
    else:
        calib_texts = load_text_corpus(calib)
    if eval_texts is not None:
        return calib_texts, load_text_corpus(eval_texts), str(eval_texts)
    if len(calib_texts) < 2:
        raise UserInputError(f"{calib}: need --eval held-out text, or at least 2 documents in --calib "
                             "(the last tenth is held out for perplexity)")
    cut = max(1, len(calib_texts) // 10)
    return calib_texts[:-cut], calib_texts[-cut:], f"last {cut} documents of {calib} (held out from calibration)"


def measure_throughput(models: dict[str, nn.Module], batch: torch.Tensor, rounds: int = 5) -> dict[str, float]:
    """Forward tokens/s of each model on `batch`, measured in alternating rounds (fair on a busy machine)."""
    from eval.measure import median_step_time

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, model in models.items():
                times[name].append(median_step_time(lambda m=model: m(input_ids=batch), warmup=1, repeats=3))
    return {name: batch.numel() / statistics.median(t) for name, t in times.items()}


def _kept_width_plot(widths: list[dict[str, int]], dense: list[dict[str, int]]):
    def draw(ax):
        n = len(widths)
        bar = 0.8 / len(MASK_NAMES)
        for j, name in enumerate(MASK_NAMES):
            xs = [i + (j - 2) * bar for i in range(n)]
            ax.bar(xs, [w[name] / d[name] for w, d in zip(widths, dense)], width=bar, label=name)
        ax.set_xticks(range(n), [str(i) for i in range(n)])
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("kept fraction of width")
        ax.set_ylim(0, 1.25)
        ax.legend(fontsize=7, ncol=5, loc="upper center")
        ax.grid(axis="y", alpha=0.3)
    return draw


def _markdown(r: dict) -> str:
    from eval.report import markdown_table

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [
        {"": "parameters", "before": f"{r['params_before']:,}", "after": f"{r['params_after']:,}"},
        {"": "block parameters", "before": f"{r['block_params_before']:,}", "after": f"{r['block_params_after']:,}"},
        {"": "held-out perplexity", "before": f(r["ppl_before"], ".3f"), "after": f(r["ppl_after"], ".3f")},
        {"": "tokens/s (forward)", "before": f(r["tokens_per_s_before"], ".0f"), "after": f(r["tokens_per_s_after"], ".0f")},
    ]
    lines = [f"# slimtune prune: {r['method']} on {r['model']}", "",
             f"Target: keep {r['kept']:.3f} of the attention + MLP weights; kept {r['kept_ratio']:.4f} "
             f"(block_params_after / block_params_before).", "", markdown_table(rows), ""]
    if r.get("ppl_after_recovery") is not None:
        lines += [f"After {r['recover_steps']} LoRA recovery steps: perplexity {r['ppl_after_recovery']:.3f}.", ""]
    lines += [f"Pruning took {r['prune_time_s']:.1f} s"
              + (f" (hypernetwork training {r['hypernet_train_time_s']:.1f} s, {r['steps']} steps)."
                 if r["method"] == "disp" else "."),
              f"Perplexity: {r['eval_text']}, {r['eval_blocks']} blocks of {r['block_size']} tokens. "
              f"Calibration: {r['calib_blocks']} blocks.",
              f"Machine: {r['machine']}.", "", "Kept width per layer: kept_width.png.", ""]
    return "\n".join(lines)


def run_prune(method: str, model_name: str, out, kept: float = 0.5, calib=None, eval_text=None,
              steps: int = 300, estimator: str = "reinmax", lam: float = 16.0, lr: float = 1e-3,
              tau: float = 0.4, offset: float = 3.0, block_size: int = 256, batch_size: int = 4,
              calib_blocks: int = 128, eval_blocks: int = 64, recover_steps: int = 0, recover_lr: float = 2e-4,
              lora_rank: int = 8, seed: int = 0, device: str = "cpu", threads: int | None = None) -> dict:
    """Prune `model_name` with `method` at `kept` of the block parameters; write everything to `out`.

    `out` follows `eval.io.prepare_output_dir`: new, empty or an earlier prune output; nothing
    else in it is ever deleted.
    """
    from eval.io import prepare_output_dir

    _check_args(method, block_size, batch_size, calib_blocks, eval_blocks, recover_steps, lora_rank, threads)
    DispConfig(kept=kept, steps=steps, estimator=estimator, lam=lam, lr=lr, tau=tau, offset=offset, seed=seed)
    with prepare_output_dir(out, "prune", signature="prune_report.json"):
        return _run_prune(method, model_name, Path(out), kept, calib, eval_text, steps, estimator, lam, lr, tau,
                          offset, block_size, batch_size, calib_blocks, eval_blocks, recover_steps, recover_lr,
                          lora_rank, seed, device, threads)


def _check_args(method, block_size, batch_size, calib_blocks, eval_blocks, recover_steps, lora_rank, threads) -> None:
    if method not in METHODS:
        raise UserInputError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    for name, value in (("block_size", block_size), ("batch_size", batch_size), ("calib_blocks", calib_blocks),
                        ("eval_blocks", eval_blocks)):
        if value < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be a positive integer; got {value}")
    if recover_steps < 0:
        raise UserInputError(f"--recover-steps must be >= 0; got {recover_steps}")
    if recover_steps and lora_rank < 1:
        raise UserInputError(f"--lora-rank must be a positive integer for LoRA recovery; got {lora_rank}")
    if threads is not None and threads < 1:
        raise UserInputError(f"--threads must be a positive integer; got {threads}")


def _run_prune(method, model_name, out: Path, kept, calib, eval_text, steps, estimator, lam, lr, tau, offset,
               block_size, batch_size, calib_blocks, eval_blocks, recover_steps, recover_lr, lora_rank, seed,
               device, threads) -> dict:
    from eval.data import pack_token_blocks
    from eval.io import atomic_contents
    from eval.measure import count_parameters
    from eval.metrics import model_context_length, perplexity_of_blocks
    from eval.models import load_causal_lm
    from eval.report import write_report

    config = DispConfig(kept=kept, steps=steps, estimator=estimator, lam=lam, lr=lr, tau=tau, offset=offset, seed=seed)
    if threads is not None:
        torch.set_num_threads(threads)  # on a shared CPU, oversubscribed threads distort tokens/s
    torch.manual_seed(seed)

    model, tokenizer = load_causal_lm(model_name, device=device)
    layout_for(model.config)  # an unsupported architecture fails here, before any work
    calib_texts, held_out, eval_source = _texts(model_name, calib, eval_text)
    context = model_context_length(model)
    blocks = pack_token_blocks(calib_texts, tokenizer, block_size, max_blocks=calib_blocks, max_positions=context)
    test_blocks = pack_token_blocks(held_out, tokenizer, block_size, max_blocks=eval_blocks, max_positions=context)

    ppl_before = perplexity_of_blocks(model, test_blocks, batch_size=batch_size)
    report: dict = {"method": method, "model": model_name, "kept": kept}
    # Inside OUT (kept if interrupted; a rerun of the same command resumes), named by everything
    # that defines the hypernetwork's training, so that a different run never resumes it.
    run_key = json.dumps([model_name, calib, block_size, batch_size, calib_blocks, config.to_dict()], default=str)
    checkpoint_dir = out / f".disp-checkpoint-{hashlib.sha256(run_key.encode()).hexdigest()[:12]}"
    start = time.perf_counter()
    hypernet = None
    if method == "disp":
        result = train_disp(model, blocks, config, batch_size=batch_size, out_dir=checkpoint_dir)
        from pruning.model import prune_model

        pruned = prune_model(model, result.plan)
        hypernet = result.hypernet
        report.update(hypernet_train_time_s=result.train_time_s, steps=steps, estimator=estimator,
                      export_threshold=result.plan.info["export_threshold"],
                      # sampled masks' kept share over the last steps: far from `kept` means the
                      # export leaned on the threshold fit rather than on converged masks
                      train_kept_ratio_final=sum(result.kept_ratio[-20:]) / len(result.kept_ratio[-20:]),
                      train_curve={"loss": result.losses, "ce": result.ce, "kept_ratio": result.kept_ratio})
    else:
        pruned = baseline_prune(method, model, kept, blocks, batch_size)
    prune_time = time.perf_counter() - start
    pruned.eval()

    ppl_after = perplexity_of_blocks(pruned, test_blocks, batch_size=batch_size)
    speed_batch = test_blocks[:batch_size].to(model.device)
    speed = measure_throughput({"dense": model, "pruned": pruned}, speed_batch)
    ppl_recovered = None
    if recover_steps:
        pruned = recover_with_lora(pruned, blocks, recover_steps, lr=recover_lr, rank=lora_rank,
                                   batch_size=batch_size, seed=seed)
        ppl_recovered = perplexity_of_blocks(pruned, test_blocks, batch_size=batch_size)

    plan = pruning_plan(pruned)
    report.update(
        params_before=count_parameters(model), params_after=count_parameters(pruned),
        block_params_before=block_params(model), block_params_after=block_params(pruned),
        ppl_before=ppl_before, ppl_after=ppl_after, ppl_after_recovery=ppl_recovered, recover_steps=recover_steps,
        tokens_per_s_before=speed["dense"], tokens_per_s_after=speed["pruned"], prune_time_s=prune_time,
        kept_widths=kept_widths(pruned), dense_widths=kept_widths(model),
        block_size=block_size, calib_blocks=int(blocks.shape[0]), eval_blocks=int(test_blocks.shape[0]),
        eval_text=eval_source, throughput_batch=list(speed_batch.shape), plan_info=plan.info if plan else {},
        config=config.to_dict() if method == "disp" else None, device=str(model.device),
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    )
    report["kept_ratio"] = report["block_params_after"] / report["block_params_before"]
    if method == "slicegpt":  # its residual is narrower: plot the kept share of the dense width
        report["kept_widths"] = [{m: (w[m] if m == "mlp_mid" else plan.info["kept_residual"]) for m in MASK_NAMES}
                                 for w in report["kept_widths"]]

    with atomic_contents(out) as tmp:
        pruned.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        if hypernet is not None:
            hypernet.save(tmp / "hypernetwork.safetensors")
        write_report(tmp, "prune_report", report, _markdown(report),
                     plots={"kept_width": _kept_width_plot(report["kept_widths"], report["dense_widths"])})
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return report
