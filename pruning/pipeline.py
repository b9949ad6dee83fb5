"""`slimtune prune` end to end: load, calibrate, prune (DISP or a baseline), recover, measure, save.

    summary = run_prune(PruneSettings(model="ref-lm", method="disp", kept=0.5, steps=300), "runs/disp50")

writes OUT/model (load with `pruning.load_pruned`), OUT/prune_report.{json,md} and
OUT/kept_width.png; the whole directory appears at once (nothing half-written on error).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from eval.data import BLOCK_PICKS
from eval.errors import UserInputError, require_positive
from eval.speed import side_by_side_throughput
from pruning.arch import MASK_NAMES, layout_for
from pruning.baselines import BASELINES, baseline_prune
from pruning.config import DispConfig
from pruning.model import block_params, pruning_plan
from pruning.trainer import kept_widths, recover_with_lora, train_disp

METHODS = ("disp", *BASELINES)


@dataclass(frozen=True)
class PruneSettings:
    """Everything a prune run depends on, validated on construction (`UserInputError` naming the field).

    model: 'ref-lm', a local causal-LM directory or a hub id. method: "disp" or one of `BASELINES`.
    kept: fraction of the attention + MLP weight parameters kept, in (0, 1] (every method).
    calib / eval_text: calibration and held-out text, a file or folder (`eval.calibration.calibration_texts`).
    steps, estimator, lam, lr, tau, offset: DISP's hypernetwork training (`DispConfig`; a short
        run by default (1,000 steps), with the Gumbel-sigmoid estimator; the paper trains 10,000
        steps with ReinMax).
    block_size: tokens per block; batch_size: blocks per step (training, perplexity, tokens/s);
    calib_blocks / eval_blocks: at most this many calibration / held-out blocks.
    calib_pick: which calibration blocks (`eval.data.pick_token_blocks`): "spread" evenly over the
        whole calibration text, or its "first" ones. The held-out blocks are always spread: the
        first 64 of ref-lm's test split are 91 % one generated file (docs/results/lowrank-lm.md).
    recover_steps, recover_lr, lora_rank: LoRA recovery fine-tuning after pruning (0 steps: none).
    recover_task: recover on a task's training split instead of the calibration text (what
        `eval.tasks.load_task` takes: a built-in name or a `TaskSpec` dict, the user's data); its
        test split is scored (accuracy, or held-out perplexity of the responses) before and after.
    threads: CPU threads for the whole run (None: torch's choice).
    """

    model: str
    method: str = "disp"
    kept: float = 0.5
    calib: str | None = None
    eval_text: str | None = None
    # The most steps that fit 5 minutes on a quiet 2-core CPU for ref-lm with room to spare
    # (1,000 steps: 172 s on an AVX2 machine, issue 23); the paper trains 10,000.
    steps: int = 1000
    # Not the paper's ReinMax: in short runs from the +3 offset the Gumbel-sigmoid straight-through
    # estimator reaches the budget and ReinMax does not (ref-lm v2, 50 % removed, 300 steps:
    # perplexity +40.6 % against +267 %; docs/RESULTS.md).
    estimator: str = "gumbel"
    lam: float = DispConfig.lam
    lr: float = DispConfig.lr
    tau: float = DispConfig.tau
    offset: float = DispConfig.offset
    block_size: int = 256
    batch_size: int = 4
    calib_blocks: int = 128
    # Spread over the whole text: the first 128 blocks of ref-lm's sorted train split are 10 files.
    # Chosen on ref-lm v2's validation split at 300 steps (docs/results/disp.md).
    calib_pick: str = "spread"
    eval_blocks: int = 64
    recover_steps: int = 0
    recover_lr: float = 2e-4
    lora_rank: int = 8
    recover_task: str | dict | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.calib_pick not in BLOCK_PICKS:
            raise UserInputError(f"calib_pick {self.calib_pick!r} is unknown; expected one of {', '.join(BLOCK_PICKS)}",
                                 field="calib_pick")
        if self.method not in METHODS:
            raise UserInputError(f"method {self.method!r} is unknown; expected one of {', '.join(METHODS)}",
                                 field="method")
        for name in ("block_size", "batch_size", "calib_blocks", "eval_blocks"):
            require_positive(name, getattr(self, name))
        require_positive("recover_steps", self.recover_steps, minimum=0)
        if self.recover_steps:
            require_positive("lora_rank", self.lora_rank)
        if self.recover_task is not None and not self.recover_steps:
            raise UserInputError("recover_task needs recover_steps > 0 (the LoRA recovery that trains on it)",
                                 field="recover_task")
        if self.threads is not None:
            require_positive("threads", self.threads)
        self.disp_config()  # validates the hypernetwork's settings, whatever the method

    def disp_config(self) -> DispConfig:
        return DispConfig(kept=self.kept, steps=self.steps, estimator=self.estimator, lam=self.lam, lr=self.lr,
                          tau=self.tau, offset=self.offset, seed=self.seed)

    def to_dict(self) -> dict:
        return asdict(self)


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
    if r.get("recover_task_scores"):
        before, after = r["recover_task_scores"]["before_recovery"], r["recover_task_scores"]["after_recovery"]
        name = "accuracy" if "accuracy" in after else "perplexity"
        lines += [f"Recovered on task {r['recover_task']}: test {name} {before[name]:.4f} after pruning, "
                  f"{after[name]:.4f} after recovery.", ""]
    lines += [f"Pruning took {r['prune_time_s']:.1f} s"
              + (f" (hypernetwork training {r['hypernet_train_time_s']:.1f} s, {r['steps']} steps)."
                 if r["method"] == "disp" else "."),
              f"Perplexity: {r['eval_text']}, {r['eval_blocks']} blocks of {r['block_size']} tokens. "
              f"Calibration: {r['calib_blocks']} blocks.",
              f"Tokens/s: dense and pruned side by side in one process (warmed up, then alternating rounds), "
              f"on a batch of {r['throughput_batch'][0]}x{r['throughput_batch'][1]} tokens.",
              f"Machine: {r['machine']}.", "", "Kept width per layer: kept_width.png.", ""]
    return "\n".join(lines)


def run_prune(settings: PruneSettings, out) -> dict:
    """Prune as `settings` say; write the model, the report and the plot to `out`.

    `out` follows `eval.io.prepare_output_dir`: new, empty or an earlier prune output; nothing
    else in it is ever deleted.
    """
    from eval.io import prepare_output_dir

    if not isinstance(settings, PruneSettings):
        raise UserInputError(f"settings must be a PruneSettings, got {type(settings).__name__}")
    with prepare_output_dir(out, "prune", signature="prune_report.json"):
        return _run_prune(settings, Path(out))


def _run_prune(s: PruneSettings, out: Path) -> dict:
    from eval.measure import count_parameters
    from eval.metrics import perplexity_of_blocks
    from eval.models import load_causal_lm

    if s.threads is not None:
        torch.set_num_threads(s.threads)  # on a shared CPU, oversubscribed threads distort tokens/s
    torch.manual_seed(s.seed)
    model, tokenizer = load_causal_lm(s.model, device=s.device)
    layout_for(model.config)  # an unsupported architecture fails here, before any work
    recover_task = _load_recover_task(s)  # bad task data fails here, before any work
    blocks, test_blocks, eval_source = _token_blocks(s, model, tokenizer)

    ppl_before = perplexity_of_blocks(model, test_blocks, batch_size=s.batch_size)
    checkpoint_dir = _checkpoint_dir(s, out)
    start = time.perf_counter()
    pruned, hypernet, training = _prune(s, model, blocks, checkpoint_dir)
    prune_time = time.perf_counter() - start
    pruned.eval()

    ppl_after = perplexity_of_blocks(pruned, test_blocks, batch_size=s.batch_size)
    speed_batch = test_blocks[: s.batch_size].to(model.device)
    speed = side_by_side_throughput({"dense": model, "pruned": pruned}, {"input_ids": speed_batch},
                                    items=speed_batch.numel())
    ppl_recovered, task_scores = None, {}
    if s.recover_steps:
        task_batches = None
        if recover_task is not None:
            from eval.tasks import lm_batches

            task_batches = lm_batches(recover_task, "train", tokenizer, s.batch_size, s.block_size, shuffle=True,
                                      seed=s.seed)
            task_scores["before_recovery"] = _task_scores(pruned, tokenizer, recover_task, s)
        pruned = recover_with_lora(pruned, blocks, s.recover_steps, lr=s.recover_lr, rank=s.lora_rank,
                                   batch_size=s.batch_size, seed=s.seed, batches=task_batches)
        ppl_recovered = perplexity_of_blocks(pruned, test_blocks, batch_size=s.batch_size)
        if recover_task is not None:
            task_scores["after_recovery"] = _task_scores(pruned, tokenizer, recover_task, s)

    report = {"method": s.method, "model": s.model, "kept": s.kept, **training}
    report.update(
        params_before=count_parameters(model), params_after=count_parameters(pruned),
        block_params_before=block_params(model), block_params_after=block_params(pruned),
        ppl_before=ppl_before, ppl_after=ppl_after, ppl_after_recovery=ppl_recovered,
        recover_steps=s.recover_steps, recover_task=None if recover_task is None else recover_task.name,
        recover_task_scores=task_scores or None, tokens_per_s_before=speed["dense"], tokens_per_s_after=speed["pruned"],
        prune_time_s=prune_time, **_widths_report(s.method, model, pruned),
        block_size=s.block_size, calib_blocks=int(blocks.shape[0]), eval_blocks=int(test_blocks.shape[0]),
        eval_text=eval_source, throughput_batch=list(speed_batch.shape),
        config=s.disp_config().to_dict() if s.method == "disp" else None, device=str(model.device),
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    )
    report["kept_ratio"] = report["block_params_after"] / report["block_params_before"]
    pruned.slimtune_card = {"base_model": s.model, "quality": _card_quality(report)}
    _write(out, pruned, tokenizer, hypernet, report)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return report


def _load_recover_task(s: PruneSettings):
    if s.recover_task is None:
        return None
    from eval.tasks import load_task

    return load_task(s.recover_task)


def _task_scores(model, tokenizer, task, s: PruneSettings) -> dict:
    """The recovery task's test score: accuracy, or held-out loss / perplexity (instruction)."""
    from eval.tasks import task_scores

    model.eval()
    with torch.no_grad():
        return task_scores(model, tokenizer, task, "test", batch_size=s.batch_size, seq_len=s.block_size)


def _card_quality(r: dict) -> dict:
    """What the model card says was measured: held-out perplexity and tokens/s, before and after."""
    quality = {"held-out text": f"{r['eval_blocks']} blocks of {r['block_size']} tokens ({r['eval_text']})",
               "perplexity before": r["ppl_before"], "perplexity after": r["ppl_after"]}
    if r["ppl_after_recovery"] is not None:
        quality[f"perplexity after {r['recover_steps']} LoRA recovery steps"] = r["ppl_after_recovery"]
    quality["tokens/s before / after (side by side)"] = f"{r['tokens_per_s_before']:,.0f} / {r['tokens_per_s_after']:,.0f}"
    return quality


def _token_blocks(s: PruneSettings, model: nn.Module, tokenizer) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(calibration blocks, held-out blocks, where the held-out text came from)."""
    from eval.calibration import calibration_texts
    from eval.data import pick_token_blocks
    from eval.metrics import model_context_length

    calib_texts, held_out, eval_source = calibration_texts(s.model, s.calib, s.eval_text)
    test_blocks = pick_token_blocks(held_out, tokenizer, s.block_size, s.eval_blocks, pick="spread",
                                    max_positions=model_context_length(model))
    return calibration_blocks(s, model, tokenizer, calib_texts), test_blocks, eval_source


def calibration_blocks(s: PruneSettings, model: nn.Module, tokenizer, texts: list[str] | None = None) -> torch.Tensor:
    """The calibration token blocks [calib_blocks, block_size] a run with settings `s` trains on."""
    from eval.calibration import calibration_texts
    from eval.data import pick_token_blocks
    from eval.metrics import model_context_length

    if texts is None:
        texts = calibration_texts(s.model, s.calib, s.eval_text)[0]
    return pick_token_blocks(texts, tokenizer, s.block_size, s.calib_blocks, pick=s.calib_pick,
                             max_positions=model_context_length(model))


def _checkpoint_dir(s: PruneSettings, out: Path) -> Path:
    """Inside OUT (kept if interrupted; a rerun of the same command resumes), named by everything
    that defines the hypernetwork's training, so that a different run never resumes it."""
    run_key = json.dumps([s.model, s.calib, s.block_size, s.batch_size, s.calib_blocks, s.calib_pick,
                          s.disp_config().to_dict()],
                         default=str)
    return out / f".disp-checkpoint-{hashlib.sha256(run_key.encode()).hexdigest()[:12]}"


def _prune(s: PruneSettings, model: nn.Module, blocks: torch.Tensor, checkpoint_dir: Path):
    """(the pruned model, the trained hypernetwork or None, DISP's training record for the report)."""
    if s.method != "disp":
        return baseline_prune(s.method, model, s.kept, blocks, s.batch_size), None, {}
    from pruning.model import prune_model

    result = train_disp(model, blocks, s.disp_config(), batch_size=s.batch_size, out_dir=checkpoint_dir)
    last = result.kept_ratio[-20:]
    training = dict(
        hypernet_train_time_s=result.train_time_s, steps=s.steps, estimator=s.estimator,
        export_threshold=result.plan.info["export_threshold"],
        # sampled masks' kept share over the last steps: far from `kept` means the export
        # leaned on the threshold fit rather than on converged masks
        train_kept_ratio_final=sum(last) / len(last),
        train_curve={"loss": result.losses, "ce": result.ce, "kept_ratio": result.kept_ratio},
    )
    return prune_model(model, result.plan), result.hypernet, training


def _widths_report(method: str, model: nn.Module, pruned: nn.Module) -> dict:
    """Kept and dense width per layer and the pruning plan's record."""
    plan = pruning_plan(pruned)
    widths = kept_widths(pruned)
    if method == "slicegpt":  # its residual is narrower: plot the kept share of the dense width
        widths = [{m: (w[m] if m == "mlp_mid" else plan.info["kept_residual"]) for m in MASK_NAMES} for w in widths]
    return {"kept_widths": widths, "dense_widths": kept_widths(model), "plan_info": plan.info if plan else {}}


def _write(out: Path, pruned: nn.Module, tokenizer, hypernet, report: dict) -> None:
    from eval.io import atomic_contents
    from eval.report import write_report

    with atomic_contents(out) as tmp:
        pruned.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        if hypernet is not None:
            hypernet.save(tmp / "hypernetwork.safetensors")
        write_report(tmp, "prune_report", report, _markdown(report),
                     plots={"kept_width": _kept_width_plot(report["kept_widths"], report["dense_widths"])})
