"""`slimtune codegen-eval`: pass@k of greedy, temperature and AdapT sampling on HumanEval-format problems."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from eval.codegen.problems import PROBLEM_SETS
    from eval.codegen.run import SAMPLERS, SamplingConfig
    from eval.codegen.sandbox import ISOLATIONS

    defaults = SamplingConfig()
    p = subparsers.add_parser(
        "codegen-eval",
        help="code generation: pass@k of greedy / temperature / AdapT sampling, with sandboxed tests",
        description="Complete each problem's function with a causal LM, run the completion and the problem's "
        "tests in a sandbox (bubblewrap: no network, read-only system, private /tmp, uid nobody, time/memory/process "
        "limits; the tests run apart from the completion, so it cannot fake a pass) "
        "and report pass@k per sampler plus the failure types (NameError, SyntaxError, ...). Writes "
        "OUT/codegen.{json,md}, OUT/pass_at_k.png and OUT/failures.png. With temperature and adapt both run, the "
        "report adds AdapT - temperature as a paired difference of per-problem pass@k with 95 % intervals "
        "(and OUT/paired.png). With "
        "--select-on, T and AdapT's a, b are first chosen on those (validation) problems from the grids. "
        "Example: slimtune codegen-eval --model ref-lm --sampler greedy,temperature,adapt --n 20 --out runs/codegen; "
        "slimtune codegen-eval --problems easy-test --select-on easy-validation --sampler temperature,adapt --out runs/easy",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from scripts.specs import SPEC_HELP

    p.add_argument("--model", default="ref-lm", help=SPEC_HELP)
    p.add_argument("--base", default=None, help="with a QST side network: its backbone (default: the one it names)")
    p.add_argument("--problems", default=None,
                   help="HumanEval-format JSONL (task_id, prompt, test, entry_point; .jsonl or .jsonl.gz) or a "
                   f"shipped set: {', '.join(PROBLEM_SETS)}; default: slimtune (the suite's own problems)")
    p.add_argument("--sampler", default=",".join(SAMPLERS), help=f"comma list of {', '.join(SAMPLERS)}")
    p.add_argument("--n", type=int, default=20, help="samples per problem (greedy draws one)")
    p.add_argument("--k", default="1,5,10", help="comma list of k for pass@k (each <= n)")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="the temperature sampler's temperature")
    p.add_argument("--hard-temperature", type=float, default=defaults.hard_temperature,
                   help="AdapT: temperature of the first token of a line that opens a block body")
    p.add_argument("--easy-temperature", type=float, default=defaults.easy_temperature,
                   help="AdapT: temperature of every other token")
    p.add_argument("--select-on", default=None,
                   help="validation problems (file or shipped set, e.g. easy-validation) on which to choose "
                   "--temperature from --temperature-grid and AdapT's temperatures from --adapt-grid, by pass@k "
                   "(k: --select-k); they must not share a task_id with --problems")
    p.add_argument("--temperature-grid", default="0.4,0.8,1.2",
                   help="with --select-on: the temperatures tried for the temperature sampler")
    p.add_argument("--adapt-grid", default="0.8:0.2,1.2:0.4",
                   help="with --select-on: AdapT's HARD:EASY temperature pairs tried")
    p.add_argument("--select-k", type=int, default=None, help="with --select-on: the k of pass@k that chooses "
                   "(default: the largest --k)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds each completion's tests may run")
    p.add_argument("--sandbox", default="auto", choices=ISOLATIONS,
                   help="isolation of generated code; auto: bubblewrap when it works, else namespaces (as root) "
                   "with a loud warning, else an error; process runs unisolated (a completion can forge its pass) "
                   "and only when named; recorded in the report")
    p.add_argument("--workers", type=int, default=2, help="sandboxed test runs at once")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from eval.codegen.paired import paired_pass_at_k
    from eval.codegen.problems import load_humaneval
    from eval.codegen.report import codegen_markdown, codegen_plots
    from eval.codegen.run import SamplingConfig, evaluate_codegen, parse_samplers
    from eval.codegen.sandbox import SandboxLimits, resolve_isolation
    from eval.codegen.select import (
        parse_adapt_grid,
        parse_temperature_grid,
        require_disjoint,
        select_sampler_settings,
    )
    from eval.errors import UserInputError, require_positive
    from eval.report import write_report
    from scripts.specs import load_spec

    try:
        ks = [int(k) for k in args.k.split(",") if k.strip()]
    except ValueError as e:
        raise UserInputError(f"--k must be a comma list of integers, got {args.k!r}") from e
    samplers = parse_samplers(args.sampler)
    config = SamplingConfig(temperature=args.temperature, hard_temperature=args.hard_temperature,
                            easy_temperature=args.easy_temperature, max_new_tokens=args.max_new_tokens)
    SandboxLimits(timeout_s=args.timeout)  # a positive finite number, checked before any work
    isolation = resolve_isolation(args.sandbox)
    require_positive("--workers", args.workers)
    if args.limit is not None:
        require_positive("--limit", args.limit)
    problems = load_humaneval(args.problems)[: args.limit]
    selecting = args.select_on is not None
    if selecting:
        select_k = args.select_k if args.select_k is not None else max(ks, default=1)
        if not 1 <= select_k <= args.n:
            raise UserInputError(f"--select-k must be in 1..n (n={args.n}), got {select_k}")
        temperatures = parse_temperature_grid(args.temperature_grid) if "temperature" in samplers else []
        adapt_pairs = parse_adapt_grid(args.adapt_grid) if "adapt" in samplers else []
        if not temperatures and not adapt_pairs:
            raise UserInputError("--select-on chooses the settings of the temperature and adapt samplers; "
                                 f"--sampler {args.sampler!r} has neither")
        validation = load_humaneval(args.select_on)
        require_disjoint(validation, problems)  # before loading the model
    model, tokenizer = load_spec(args.model, base=args.base, device=args.device)
    run_kwargs = dict(timeout_s=args.timeout, seed=args.seed, workers=args.workers, isolation=isolation)
    selection = None
    if selecting:
        config, selection = select_sampler_settings(model, tokenizer, validation, problems, temperatures,
                                                    adapt_pairs, n=args.n, k=select_k, base=config, **run_kwargs)
        selection["problems_file"] = args.select_on
    report = evaluate_codegen(model, tokenizer, problems, samplers, n=args.n, ks=ks, config=config, **run_kwargs)
    report["config"].update(model=args.model, problems_file=args.problems or "slimtune")
    if selection is not None:
        report["selection"] = selection
    if {"temperature", "adapt"} <= set(samplers):
        report["paired"] = {"a": "adapt", "b": "temperature", "by_k": paired_pass_at_k(report, "adapt", "temperature",
                                                                                     seed=args.seed)}
    markdown = codegen_markdown(report, title=f"Code generation: pass@k of {args.model}")
    write_report(args.out, "codegen", report, markdown, plots=codegen_plots(report))
    print(markdown.split("\n## ")[0].split("\n\n")[-1].rstrip())
    if isolation != "bubblewrap":
        print(f"WARNING: generated code ran with the weak sandbox isolation {isolation!r} (no bubblewrap)")
    plots = ", paired.png" if "paired" in report else ""
    print(f"wrote {args.out}/codegen.json, codegen.md, pass_at_k.png, failures.png{plots}")
    return 0
