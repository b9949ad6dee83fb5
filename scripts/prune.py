"""`slimtune prune`: DISP-LLM structural pruning (or a baseline) of a causal LM."""

from __future__ import annotations

import argparse
import dataclasses


def add_parser(subparsers) -> None:
    from pruning.config import ESTIMATORS
    from pruning.pipeline import METHODS, PruneSettings
    from scripts.task_options import add_task_arguments

    defaults = PruneSettings  # its class attributes are the fields' defaults

    p = subparsers.add_parser(
        "prune",
        help="structurally prune a causal LM (DISP-LLM hypernetwork, or magnitude / wanda-sp / slicegpt)",
        description="Remove a share of a causal LM's attention + MLP weights and export a physically smaller "
        "model (index_select / index_add on the residual; loads with pruning.load_pruned, no trust_remote_code). "
        "Measures held-out perplexity and forward tokens/s before and after. Writes OUT/model, "
        "OUT/prune_report.{json,md} and OUT/kept_width.png. "
        "Example: slimtune prune --method disp --model ref-lm --kept 0.5 --out runs/disp50",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--method", default=defaults.method, choices=METHODS)
    p.add_argument("--model", required=True, help="'ref-lm' (built on first use) or a local model directory / hub id "
                   "(Llama, Mistral, Qwen2, Qwen3, Phi-3, OPT)")
    p.add_argument("--kept", type=float, default=defaults.kept, help="fraction of attention + MLP weight parameters kept, in (0, 1]")
    p.add_argument("--calib", default=None, help="calibration text: a file (.txt, .jsonl, .parquet, WikiText raw) or a "
                   "folder of them; default for ref-lm: its reference corpus (train split)")
    p.add_argument("--eval", dest="eval_text", default=None, help="held-out text for perplexity; default: the reference "
                   "test split for ref-lm, else the last tenth of --calib's documents")
    p.add_argument("--steps", type=int, default=defaults.steps, help="hypernetwork training steps (disp; the paper uses 10,000; "
                   "1,000 take about 3 minutes for ref-lm on a quiet 2-core CPU)")
    p.add_argument("--estimator", default=defaults.estimator, choices=ESTIMATORS,
                   help="straight-through estimator: Gumbel-sigmoid (the authors' code; measured better in short "
                   "runs: on ref-lm v2 at 50 %% removed, 300 steps, +40.6 %% perplexity against ReinMax's +267 %%) "
                   "or ReinMax (the paper's)")
    p.add_argument("--lam", type=float, default=defaults.lam, help="weight of the parameter-budget regulariser (the "
                   "paper's 6; on ref-lm v2's validation split 6 beat 16 at 30 %% and 50 %% removed)")
    p.add_argument("--lr", type=float, default=defaults.lr, help="hypernetwork learning rate (AdamW, weight decay 0.05)")
    p.add_argument("--tau", type=float, default=defaults.tau, help="estimator temperature")
    p.add_argument("--offset", type=float, default=defaults.offset, help="added to every mask logit (starts near 'keep all')")
    p.add_argument("--block-size", type=int, default=defaults.block_size, help="tokens per calibration / evaluation block")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="blocks per step (training, perplexity, tokens/s)")
    p.add_argument("--calib-blocks", type=int, default=defaults.calib_blocks, help="at most this many calibration blocks, spread "
                   "evenly over the whole calibration text")
    p.add_argument("--eval-blocks", type=int, default=defaults.eval_blocks, help="at most this many held-out blocks for "
                   "perplexity, spread evenly over the whole held-out text")
    p.add_argument("--recover-steps", type=int, default=defaults.recover_steps, help="LoRA recovery fine-tuning steps after pruning (0: none)")
    p.add_argument("--recover-lr", type=float, default=defaults.recover_lr, help="LoRA recovery learning rate")
    p.add_argument("--lora-rank", type=int, default=defaults.lora_rank, help="LoRA rank for recovery")
    add_task_arguments(p, required=False, flag="--recover-task", purpose=" for LoRA recovery",
                       default_help=". Recovery (--recover-steps) then trains on its train split instead of the "
                       "calibration text, and its test split is scored before and after recovery")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--threads", type=int, default=defaults.threads, help="CPU threads for the whole run (default: torch's "
                   "choice); on a shared machine 1 gives steadier tokens/s")
    p.add_argument("--out", required=True, help="output directory (replaced as a whole when the run succeeds)")
    p.set_defaults(func=run)


def run(args) -> int:
    from eval.errors import UserInputError, naming_flags
    from pruning.pipeline import PruneSettings, run_prune
    from scripts.task_options import task_spec

    try:
        recover_task = task_spec(args)
        settings = PruneSettings(
            model=args.model, method=args.method, kept=args.kept, calib=args.calib, eval_text=args.eval_text,
            steps=args.steps, estimator=args.estimator, lam=args.lam, lr=args.lr, tau=args.tau, offset=args.offset,
            block_size=args.block_size, batch_size=args.batch_size, calib_blocks=args.calib_blocks,
            eval_blocks=args.eval_blocks, recover_steps=args.recover_steps, recover_lr=args.recover_lr,
            lora_rank=args.lora_rank, recover_task=None if recover_task is None else dataclasses.asdict(recover_task),
            seed=args.seed, device=args.device, threads=args.threads,
        )
        r = run_prune(settings, args.out)
    except UserInputError as error:  # the library names its settings; say which flag sets each
        raise naming_flags(error, vars(args), {"eval_text": "--eval", "recover_task": "--recover-task"}) from None
    print(f"{r['method']}: block params {r['block_params_before']:,} -> {r['block_params_after']:,} "
          f"(kept {r['kept_ratio']:.3f}); perplexity {r['ppl_before']:.3f} -> {r['ppl_after']:.3f}"
          + (f" ({r['ppl_after_recovery']:.3f} after recovery)" if r["ppl_after_recovery"] is not None else "")
          + f"; tokens/s {r['tokens_per_s_before']:.0f} -> {r['tokens_per_s_after']:.0f}; "
          f"{r['prune_time_s']:.1f} s")
    print(f"wrote {args.out}/model, {args.out}/prune_report.json, .md and kept_width.png")
    return 0
