"""`slimtune zero-shot`: lm-eval on any model the suite makes (plain, QST-tuned, pruned, low-rank).

A model is given as a spec (eval.model_specs, shared with codegen-eval and bench):
    ref-lm | PATH | HUB_ID       a causal LM; a directory a method saved loads through its package
    qst:DIR                      a QST side network on its backbone (--model, else the one it names)
    pruned:DIR                   a model written by `slimtune prune`
    lowrank:DIR                  a low-rank-compressed LM
optionally with a label: `dense=ref-lm`. `--compare A,B,...` evaluates several specs in one run.
"""

from __future__ import annotations

import argparse
import gc
import math

from eval.model_specs import ModelSpec, parse_spec

METHOD_KINDS = ("qst", "pruned", "lowrank")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "zero-shot",
        help="lm-eval zero-/few-shot accuracy of a plain, QST-tuned, pruned or low-rank model",
        description="Evaluate models with lm-evaluation-harness (its Python API, on the model object as the "
        "suite left it) on the suite's own task YAMLs, on a folder of your YAMLs (--include-path) and on "
        "lm-eval's standard tasks whose data is in the local cache. Writes OUT/zero_shot.{json,md} and "
        "OUT/zero_shot.png. Examples: slimtune zero-shot --model ref-lm --tasks def-kind,next-line,local-name "
        "--out runs/zs;  slimtune zero-shot --compare dense=ref-lm,qst:runs/qst,pruned:runs/disp/model "
        "--out runs/zs-all",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None, help="'ref-lm', a local causal-LM directory or a hub id; with --qst: "
                   "the backbone (default: the one the QST directory names); default ref-lm")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--qst", default=None, metavar="DIR", help="a QST side network saved by slimtune tune")
    group.add_argument("--pruned", default=None, metavar="DIR", help="a pruned model saved by slimtune prune")
    group.add_argument("--lowrank", default=None, metavar="DIR", help="a low-rank-compressed model (lowrank_vit)")
    group.add_argument("--compare", default=None, metavar="A,B,...",
                       help="several model specs, each [LABEL=]ref-lm|PATH|qst:DIR|pruned:DIR|lowrank:DIR, in one table")
    p.add_argument("--tasks", default=None, help="comma list of lm-eval task names; the suite's tasks also by their own names (stdlib-module, def-kind, signature-match, next-line, local-name, bracket-close); default: the suite's tasks")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of lm-eval task YAMLs (repeatable); the suite's task YAMLs are always included")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--limit", type=float, default=None, help="examples per task (an integer) or a fraction < 1")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run)


def parse_model_specs(args) -> list[ModelSpec]:
    """The models to evaluate, from --compare or from --model with at most one method flag."""
    from eval.errors import UserInputError

    if args.compare is not None:
        if args.qst or args.pruned or args.lowrank:
            raise UserInputError("--compare lists every model itself; do not combine it with --qst/--pruned/--lowrank")
        specs = [_parse_spec(item.strip()) for item in args.compare.split(",") if item.strip()]
        if not specs:
            raise UserInputError(f"--compare needs a comma list of model specs, got {args.compare!r}")
        labels = [s.label for s in specs]
        if len(set(labels)) != len(labels):
            raise UserInputError(f"--compare labels must be distinct, got {labels}; name them as LABEL=SPEC")
        return specs
    for kind, path in (("qst", args.qst), ("pruned", args.pruned), ("lowrank", args.lowrank)):
        if path:
            return [ModelSpec(kind, kind, path)]
    model = args.model or "ref-lm"
    return [ModelSpec(model, "plain", model)]


_parse_spec = parse_spec  # the shared parser (eval.model_specs)


def load_model(spec: ModelSpec, base: str | None, device: str):
    """(model, tokenizer) for a spec, through the registry the method packages fill (scripts.specs)."""
    from eval.model_specs import check_causal_lm
    from scripts.specs import load_spec

    model, tokenizer = load_spec(spec, base=base, device=device)
    check_causal_lm(model, spec.path)  # lm-eval scores language models: refuse e.g. a compressed ViT
    return model, tokenizer


def _limit(value: float | None) -> int | float | None:
    """--limit: None, a whole number of examples >= 1, or a fraction in (0, 1)."""
    from eval.errors import UserInputError

    if value is None:
        return None
    if not math.isfinite(value) or value <= 0 or (value >= 1 and value != int(value)):
        raise UserInputError(f"--limit must be a whole number of examples (>= 1) or a fraction in (0, 1), got {value}")
    return int(value) if value >= 1 else value


def run(args) -> int:
    from eval.io import prepare_output_dir

    with prepare_output_dir(args.out, "zero-shot", signature="zero_shot.json"):
        return _run(args)


def _run(args) -> int:
    from eval.errors import require_positive
    from eval.lm_eval_bridge import run_lm_eval
    from eval.measure import count_parameters
    from eval.report import markdown_table, write_report

    specs = parse_model_specs(args)
    limit = _limit(args.limit)
    tasks = _task_names(args.tasks)
    # The suite's task YAMLs are generated on first use (seconds): only when a suite task is asked for.
    suite_dir = _suite_task_dir() if set(tasks) & set(_suite_task_names()) else None
    include_paths = [p for p in (suite_dir, *args.include_path) if p is not None] or None
    require_positive("--num-fewshot", args.num_fewshot, minimum=0)
    require_positive("--batch-size", args.batch_size)

    evaluated = []
    for spec in specs:
        print(f"zero-shot: {spec.label} ({spec.kind}: {spec.path}) on {', '.join(tasks)}")
        model, tokenizer = load_model(spec, args.model, args.device)
        results = run_lm_eval(model, tokenizer, tasks, include_path=include_paths, num_fewshot=args.num_fewshot,
                              limit=limit, batch_size=args.batch_size, device=args.device)
        evaluated.append({"label": spec.label, "kind": spec.kind, "path": spec.path,
                          "parameters": count_parameters(model),
                          "results": results.get("results", {}), "versions": results.get("versions", {}),
                          "n-samples": results.get("n-samples", {}), "higher_is_better": results.get("higher_is_better", {})})
        del model
        gc.collect()

    data = {"models": evaluated, "tasks": tasks,
            "config": {"num_fewshot": args.num_fewshot, "limit": limit, "batch_size": args.batch_size,
                       "include_path": [str(p) for p in include_paths or []], "device": args.device},
            "lm_eval_version": _lm_eval_version()}
    rows, columns = score_rows(evaluated, tasks)
    markdown = (f"# Zero-shot evaluation (lm-eval {data['lm_eval_version']}, {args.num_fewshot}-shot)\n\n"
                "Headline metric per task in % ± lm-eval's standard error; n = examples scored.\n\n"
                + markdown_table(rows, ["model", "parameters", *columns]))
    write_report(args.out, "zero_shot", data, markdown, plots={"zero_shot": accuracy_plot(evaluated, tasks)})
    print(markdown.split("\n\n", 2)[-1].rstrip())
    print(f"wrote {args.out}/zero_shot.json, zero_shot.md, zero_shot.png")
    return 0


def _suite_task_dir():
    from eval.tasks import task_yaml_dir

    return task_yaml_dir()


def _suite_task_names() -> dict[str, str]:
    """The suite's tasks: {lm-eval task name: suite name}, e.g. slimtune_def_kind: def-kind."""
    from eval.tasks import TASKS, lm_eval_task_name

    return {lm_eval_task_name(name): name for name in TASKS}


def _task_names(tasks: str | None) -> list[str]:
    """lm-eval task names; the suite's tasks may also be given by their own names (def-kind)."""
    from eval.errors import UserInputError

    suite = _suite_task_names()
    if tasks is None:
        return list(suite)
    by_suite_name = {name: lm_eval_name for lm_eval_name, name in suite.items()}
    names = [by_suite_name.get(t.strip(), t.strip()) for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserInputError(f"--tasks needs a comma list of task names, got {tasks!r}")
    return list(dict.fromkeys(names))


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


def primary_metric(task_results: dict) -> tuple[str, float, float | None] | None:
    """(name, value, stderr) of a task's headline metric: acc, else acc_norm, else the first one."""
    metrics = {k.split(",")[0]: v for k, v in task_results.items()
               if "," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
    for name in ("acc", "acc_norm", "exact_match", *metrics):
        if name in metrics:
            filt = next(k.split(",", 1)[1] for k in task_results if k.split(",")[0] == name)
            stderr = task_results.get(f"{name}_stderr,{filt}")
            return name, float(metrics[name]), float(stderr) if isinstance(stderr, (int, float)) else None
    return None


def score_rows(evaluated: list[dict], tasks: list[str]) -> tuple[list[dict], list[str]]:
    """One row per model, one column per task (headline metric in %, ± stderr, with n)."""
    rows, columns = [], []
    for task in tasks:
        metric = next((primary_metric(m["results"][task])[0] for m in evaluated
                       if task in m["results"] and primary_metric(m["results"][task])), "acc")
        columns.append(f"{task} ({metric})")
    for m in evaluated:
        row = {"model": m["label"], "parameters": m["parameters"]}
        for task, column in zip(tasks, columns):
            scored = primary_metric(m["results"].get(task, {}))
            if scored is None:
                row[column] = None
                continue
            _, value, stderr = scored
            n = (m["n-samples"].get(task) or {}).get("effective")
            row[column] = f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "") + (
                f" (n={n})" if n is not None else "")
        rows.append(row)
    return rows, columns


def accuracy_plot(evaluated: list[dict], tasks: list[str]):
    """Grouped bars: one group per task, one bar per model (headline metric in %)."""

    def draw(ax):
        width = 0.8 / max(1, len(evaluated))
        for i, m in enumerate(evaluated):
            values = []
            for task in tasks:
                scored = primary_metric(m["results"].get(task, {}))
                values.append(100 * scored[1] if scored else 0.0)
            xs = [t + (i - (len(evaluated) - 1) / 2) * width for t in range(len(tasks))]
            ax.bar(xs, values, width, label=m["label"])
        ax.set_xticks(range(len(tasks)), tasks, rotation=20 if len(tasks) > 2 else 0, ha="right" if len(tasks) > 2 else "center")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("zero-shot accuracy")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)

    return draw
