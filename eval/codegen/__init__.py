"""Code-generation evaluation: HumanEval-format problems, sampling, sandboxed tests, pass@k.

    from eval.codegen.problems import load_humaneval
    from eval.codegen.run import evaluate_codegen
    problems = load_humaneval()                      # the suite's own problems (offline)
    report = evaluate_codegen(model, tokenizer, problems, samplers=["greedy", "adapt"], n=20)
    report["samplers"]["adapt"]["pass_at_k"]["5"]

A problem is one JSON object per line with `task_id`, `prompt` (a function signature and
docstring), `test` (defining `check(candidate)`), `entry_point` (the function's name) and
optionally `canonical_solution`, as in HumanEval. A completion is the model's continuation of
the prompt, cut where the function ends (the first line that starts at column 0). A completion
is judged by `eval.codegen.sandbox.run_tests_sandboxed`: prompt + completion is loaded in one sandbox,
the problem's prompt and tests run in another and call the entry point across the boundary, so
the verdict comes from a process that never ran generated code (an `os._exit(0)` or a forged
"done" line cannot pass). pass@k is the unbiased estimator of Chen et al. (2021), averaged over
problems. The report records which sandbox isolation ran (`report["isolation"]`).

Samplers: "greedy" (one deterministic completion per problem: its pass@k is its pass@1 for
every k), "temperature" (plain sampling at one temperature) and "adapt" (AdapT: hard temperature
at block-body line starts, easy elsewhere; see eval.codegen.adapt). Sampling is pure: no top-k/top-p
truncation, so the temperatures alone decide the distributions being compared. Every sampler
draws with the same seed per problem.

Problem sets (`load_humaneval(NAME)`, `codegen-eval --problems NAME`): "slimtune" (38 stand-alone
functions written for this project) and the easy tier "easy-validation" / "easy-test" (150
generated one-line methods in the corpus's idioms, see `easy`). Sampler settings are chosen on
validation problems (`select`), and two samplers are compared on the same problems by the paired
difference of per-problem pass@k with 95 % intervals (`paired`).

Modules: `problems` (the loader and the shipped problems in data/), `easy` (the easy tier's
generator), `sandbox` (running untrusted code; `_sandbox_runner.py` is the file it copies into
the sandbox, never imported), `adapt` (AdapT's logits processor), `run` (sampling and judging),
`passk` (the estimator), `select` (settings chosen on validation problems), `paired` (paired
differences) and `report` (Markdown and plots). The public names are exported from `eval` (`eval.pass_at_k`,
`eval.run_sandboxed`, ...).
"""
