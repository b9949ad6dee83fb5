"""`slimtune bench`: tuning methods side by side (memory, step time, accuracy), each in a fresh process."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from qst.protocol import SCHEDULE as PROTOCOL_SCHEDULE
from qst.protocol import WARMUP_RATIO as PROTOCOL_WARMUP_RATIO
from scripts.specs import import_method_packages

# --quick: a few minutes on 2 CPU cores, def-kind's whole test split scored. QLoRA's and QST's
# learning rates and the training (120 steps, cosine after 6 % warm-up) are what `bench --protocol`
# chose on def-kind's *validation* split (docs/results/protocol.md); full and LoRA were not in that
# protocol and keep 2e-3, and QST's r = 4 (a 32-wide side network on ref-lm's 128) was chosen
# earlier on the test split (docs/RESULTS.md): both still to be chosen on validation.
QUICK = {"task": "def-kind", "batch": 8, "seq": 256, "steps": 3, "warmup": 1, "train_steps": 120,
         "eval_examples": 0, "lr": 2e-3, "qst_r": 4, "method_lrs": {"qlora": 3e-3, "qst": 3e-3},
         "schedule": PROTOCOL_SCHEDULE, "warmup_ratio": PROTOCOL_WARMUP_RATIO}
SCALING = {"batch": 4, "seq": 256, "steps": 2, "warmup": 1}
SCALING_SWEEPS = ("tuning", "pruned", "vit")  # --sweeps; each writes its own report
SCALING_REPORTS = {"tuning": "bench_scaling_tuning", "pruned": "bench_scaling_pruned", "vit": "bench_scaling_vit"}
# --protocol: the --quick budget per run (batch 8 x 256, at most 320 steps), QST's and QLoRA's
# learning rates from eval.tuning_methods.PROTOCOL_LRS unless --lrs is given.
PROTOCOL = {"task": "def-kind", "batch": 8, "seq": 256, "train_steps": 320, "qst_r": 4}
DEFAULTS = {"batch": 16, "seq": 512, "steps": 5, "train_steps": 50, "eval_examples": 200, "lr": 2e-4, "warmup": 2}


def add_parser(subparsers) -> None:
    from qst.baselines import DEFAULT_METHODS, METHODS
    from scripts.task_options import add_task_arguments

    p = subparsers.add_parser(
        "bench",
        help="compare tuning methods: peak memory, step time, tokens/s, loss, accuracy",
        description="Tune one model with several methods under the same data, batch, sequence length, "
        "optimizer (AdamW) and learning rate, each method in its own fresh process, and report trainable "
        "parameters, peak memory (with the analytic estimate beside it), median step time, tokens/s, final "
        "training loss and task accuracy, plus the floor: one no-grad forward pass of the 4-bit backbone. "
        "Writes bench_tuning.json, bench_tuning.md and bench_tuning.png under --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default="ref-lm",
                        help="the backbone every method tunes: 'ref-lm', a local model directory (plain, pruned or "
                        "low-rank) or a hub id; or pruned:DIR, lowrank:DIR (not qst:DIR: a side network is "
                        "already tuned)")
    source.add_argument("--arch", default=None,
                        help="a named architecture with random weights (llama-2-7b, opt-1.3b, ...): "
                        "memory and speed only, no accuracy")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, from {', '.join(METHODS)}; or 'all' (default {','.join(DEFAULT_METHODS)}; "
                   "--protocol: qlora,qst)")
    p.add_argument("--batch", type=int, default=None, help=f"batch size (default {DEFAULTS['batch']})")
    p.add_argument("--seq", type=int, default=None, help=f"sequence length (default {DEFAULTS['seq']})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed training steps, after --warmup (default {DEFAULTS['steps']})")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before the timed ones (default 2)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="training steps before the test accuracy is measured (the timed steps are among "
                   f"them; 0: no accuracy) (default {DEFAULTS['train_steps']})")
    add_task_arguments(p, required=False, default_help=f" (default: {QUICK['task']} with --quick, else the "
                       "first built-in task)")
    p.add_argument("--eval-examples", type=int, default=None,
                   help=f"test examples scored per method (default {DEFAULTS['eval_examples']}; 0: the whole "
                   "test split)")
    p.add_argument("--train-examples", type=int, default=None,
                   help="train on this many (shuffled) task examples, cycled as epochs (default: the whole "
                   "training split)")
    p.add_argument("--no-feature-cache", action="store_true",
                   help="QST and LST recompute their frozen backbone's features every epoch instead of "
                   "reading them from an on-disk cache")
    p.add_argument("--qst-head-dim", type=int, default=None,
                   help="QST's side attention with fewer, wider heads of this dim (default: the backbone's "
                   "head count, head dim = side width / heads)")
    p.add_argument("--qst-r", type=int, default=None,
                   help="QST's (and LST's) reduction factor r, side width = hidden / r (default: the "
                   "paper's 16, or the preset's: --quick uses 4, a 32-wide side network on ref-lm's 128)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"AdamW learning rate, the same for every method (default {DEFAULTS['lr']})")
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the 16-bit backbones ('auto': bfloat16 on CUDA, float32 on CPU); "
                   "4-bit backbones compute in bfloat16 on CUDA and on CPUs with bf16 hardware, else in "
                   "float32 (eval.bnb.compute_dtype)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a few minutes on 2 CPU cores: " + ", ".join(f"{k} {v}" for k, v in QUICK.items())
                   + " (explicit flags win)")
    protocol = p.add_argument_group("comparisons that hold up (--protocol)")
    protocol.add_argument("--protocol", action="store_true",
                          help="per method: a learning-rate grid, each point trained with a cosine schedule "
                          "after warm-up and early stopping on the validation split; the rate with the best "
                          "validation accuracy is run with --seeds seeds and scored on the whole test split; "
                          "paired QST - QLoRA difference with its 95 %% CI. Writes bench_protocol.json/.md/.png; "
                          "resumes after a kill (rerun the same command). Defaults: "
                          + ", ".join(f"{k} {v}" for k, v in PROTOCOL.items()))
    protocol.add_argument("--lrs", default=None,
                          help="learning rates tried for every method, comma-separated, increasing (default: a "
                          "grid per method, eval.tuning_methods.PROTOCOL_LRS)")
    protocol.add_argument("--seeds", type=int, default=3, help="runs at the selected learning rate")
    protocol.add_argument("--eval-every", type=int, default=40, help="steps between validation evaluations")
    protocol.add_argument("--patience", type=int, default=3,
                          help="validation evaluations without improvement before a run stops")
    protocol.add_argument("--qst-side-init", default=None, choices=["random", "pruned"],
                          help="how QST's side blocks start (default: QSTConfig's, random; pruned copies the "
                          "backbone's blocks pruned by weight norm, as LST did)")
    protocol.add_argument("--jobs", type=int, default=1,
                          help="training runs at a time, each in its own process (the results do not depend on it)")
    scaling = p.add_argument_group("how cost grows with size (--scaling)")
    scaling.add_argument("--scaling", action="store_true",
                         help="instead of one model: LLaMA shapes with random weights from ref-lm's size up "
                         "(--sizes): peak memory and step time of QST, QLoRA and LoRA and the 4-bit forward "
                         "floor; tokens/s of each shape pruned by 30 %% and 50 %% against dense; images/s of "
                         "ViT-B/16 at -50 %% and -60 %% against dense. Uses --batch/--seq (default 4 x 256), "
                         "--steps/--warmup (default 2 / 1)")
    scaling.add_argument("--sizes", default=None,
                         help="comma-separated architecture names, smallest first (default: "
                         "eval.models.SCALING_ARCHITECTURES)")
    scaling.add_argument("--sweeps", default=",".join(SCALING_SWEEPS),
                         help="which of the sweeps to run, comma-separated (default: all of "
                         f"{', '.join(SCALING_SWEEPS)}); --methods picks the tuning sweep's methods")
    scaling.add_argument("--vit-batch", type=int, default=16, help="images per forward in the ViT speed run")
    p.add_argument("--no-fit-check", action="store_true",
                   help="start even when the estimate says a method will not fit in memory")
    p.add_argument("--out", default="bench-out", help="output directory")
    p.set_defaults(func=run)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _check_seq(settings) -> None:
    from eval.errors import UserInputError
    from eval.memory_estimate import check_seq, resolve_config

    source = getattr(settings, "arch", None) or settings.model
    try:
        config = resolve_config(source)
    except UserInputError:
        return  # run_bench says what is wrong with the model
    check_seq(config, settings.seq, source)


def _flag_or(args, preset: dict, name: str):
    """The flag `--name` when given, else the preset's value (None if the preset has none)."""
    value = getattr(args, name)
    return value if value is not None else preset.get(name)


def _eval_examples(n: int) -> int | None:
    return None if n == 0 else n  # 0: the whole test split


def run(args) -> int:
    if args.scaling:
        return run_scaling(args)
    if args.protocol:
        return run_protocol(args)
    from eval.io import prepare_output_dir
    from qst.benchmark import BenchSettings, run_bench
    from scripts.task_options import task_spec

    import_method_packages()  # a pruned or low-rank --model loads through its package
    preset = QUICK if args.quick else DEFAULTS
    spec = task_spec(args, train_examples=_flag_or(args, preset, "train_examples"),
                     source=None if args.arch else preset.get("task"))  # random weights: no task
    settings = BenchSettings(
        model=None if args.arch else args.model, arch=args.arch, methods=args.methods or _default_methods(),
        batch=_flag_or(args, preset, "batch"), seq=_flag_or(args, preset, "seq"),
        steps=_flag_or(args, preset, "steps"), warmup=_flag_or(args, preset, "warmup"),
        train_steps=_flag_or(args, preset, "train_steps"),
        task=None if spec is None else dataclasses.asdict(spec),
        eval_examples=_eval_examples(_flag_or(args, preset, "eval_examples")),
        train_examples=_flag_or(args, preset, "train_examples"),
        feature_cache=not args.no_feature_cache,
        lr=_flag_or(args, preset, "lr"), device=args.device, dtype=args.dtype, seed=args.seed,
        fit_check=not args.no_fit_check, qst_r=_flag_or(args, preset, "qst_r"),
        qst_head_dim=args.qst_head_dim,
        method_lrs=preset.get("method_lrs") if args.lr is None else None,  # an explicit --lr is every method's
        schedule=preset.get("schedule", "constant"), warmup_ratio=preset.get("warmup_ratio", 0.03),
    )
    _check_seq(settings)
    with prepare_output_dir(args.out, "bench", signature="bench_tuning.json"):
        report = run_bench(settings, args.out, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(report["markdown"])
    print(f"wrote {Path(args.out) / 'bench_tuning.json'}, bench_tuning.md, bench_tuning.png")
    failed = [m for m, r in report["data"]["methods"].items() if r.get("error")]
    return 1 if failed and len(failed) == len(report["data"]["methods"]) else 0



def run_protocol(args) -> int:
    """--protocol: learning rates chosen on validation, seeds at the chosen one, paired CI."""
    from eval.errors import UserInputError, require_positive
    from eval.io import prepare_output_dir
    from qst.protocol import ProtocolSettings, run_protocol

    import_method_packages()
    if args.arch:
        raise UserInputError("--protocol measures accuracy: it needs a pretrained --model, not --arch (random weights)")
    methods = args.methods or "qlora,qst"
    settings = ProtocolSettings(
        model=args.model, task=args.task or PROTOCOL["task"], methods=methods, lrs=args.lrs, seeds=args.seeds,
        batch=_flag_or(args, PROTOCOL, "batch"), seq=_flag_or(args, PROTOCOL, "seq"),
        train_steps=_flag_or(args, PROTOCOL, "train_steps"), eval_every=args.eval_every, patience=args.patience,
        train_examples=args.train_examples, device=args.device, dtype=args.dtype,
        qst_r=_flag_or(args, PROTOCOL, "qst_r"), qst_head_dim=args.qst_head_dim, qst_side_init=args.qst_side_init,
    )
    _check_seq(settings)
    with prepare_output_dir(args.out, "bench --protocol", signature="protocol_settings.json"):
        report = run_protocol(settings, args.out, log=lambda line: print(line, file=sys.stderr, flush=True),
                              jobs=require_positive("jobs", args.jobs))
    print(report["markdown"])
    print(f"wrote {Path(args.out) / 'bench_protocol.json'}, bench_protocol.md, bench_protocol.png")
    return 0


def _default_methods() -> tuple[str, ...]:
    from qst.baselines import DEFAULT_METHODS

    return DEFAULT_METHODS


def run_scaling(args) -> int:
    """The three sweeps of --scaling, each report written by its method package."""
    from eval.io import prepare_output_dir
    from eval.models import SCALING_ARCHITECTURES, float_dtype_name
    from lowrank_vit.speed import run_vit_speed
    from pruning.scaling import run_pruned_scaling
    from qst.benchmark import SCALING_METHODS, check_scaling_archs, check_scaling_methods
    from qst.benchmark import run_scaling as run_tuning_scaling

    archs = check_scaling_archs(args.sizes or tuple(SCALING_ARCHITECTURES))  # before any model is built
    sweeps = _scaling_sweeps(args.sweeps)
    methods = check_scaling_methods(args.methods or SCALING_METHODS)
    batch, seq, steps, warmup = (_flag_or(args, SCALING, name) for name in ("batch", "seq", "steps", "warmup"))
    dtype = float_dtype_name(args.dtype, args.device)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    sweep = {
        "tuning": lambda: run_tuning_scaling(archs, args.out, batch=batch, seq=seq, steps=steps, warmup=warmup,
                                             device=args.device, seed=args.seed, log=log, qst_r=args.qst_r,
                                             qst_head_dim=args.qst_head_dim, methods=methods),
        "pruned": lambda: run_pruned_scaling(archs, args.out, batch=batch, seq=seq, device=args.device, dtype=dtype,
                                             seed=args.seed, log=log),
        "vit": lambda: run_vit_speed(args.out, batch=args.vit_batch, device=args.device, dtype=dtype, seed=args.seed,
                                     log=log),
    }
    with prepare_output_dir(args.out, "bench --scaling", signature=f"{SCALING_REPORTS[sweeps[0]]}.json"):
        reports = [sweep[name]() for name in sweeps]
    for report in reports:
        print(report["markdown"])
    print(f"wrote {', '.join(SCALING_REPORTS[name] for name in sweeps)} (.json, .md, .png) under {args.out}")
    return 0



def _scaling_sweeps(text: str) -> list[str]:
    from eval.errors import UserInputError

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCALING_SWEEPS]
    if not names or unknown:
        raise UserInputError(f"--sweeps takes a comma-separated list of {', '.join(SCALING_SWEEPS)}; got {text!r}")
    return [n for n in SCALING_SWEEPS if n in names]
