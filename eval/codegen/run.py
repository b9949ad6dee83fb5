"""Sampling completions (greedy, temperature, AdapT) and judging them in the sandbox: `evaluate_codegen`.

A completion is the model's continuation of the prompt, cut where the function ends (the first
line indented no deeper than the function's `def`: column 0 for a module-level function, the
class body's indentation for a method). See the package docstring (`eval.codegen`) for the whole run.
"""

from __future__ import annotations

import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from eval.codegen.passk import pass_at_k
from eval.codegen.problems import Problem
from eval.errors import UserInputError, require_positive, require_positive_number

SAMPLERS = ("greedy", "temperature", "adapt")
_LAST_DEF = re.compile(r"^([ \t]*)(?:async[ \t]+)?def[ \t]", re.MULTILINE)


def _function_end(prompt: str) -> re.Pattern:
    """A newline followed by a line indented no deeper than the prompt's last `def` (the function
    being completed): column 0 for a module-level function, e.g. 4 spaces for a method."""
    defs = _LAST_DEF.findall(prompt)
    depth = len(defs[-1]) if defs else 0
    return re.compile(rf"\n(?=[ \t]{{0,{depth}}}\S)")


def extract_completion(generated: str, prompt: str = "\n") -> str:
    """The function body in `generated` (the text after `prompt`): up to the first line indented no
    deeper than the function's `def` (column 0 for a module-level function).

    When the prompt ends inside a line, the first generated line continues it and never ends the
    function. Whatever follows the function (another def or method, a test, `if __name__`) is dropped.
    """
    at_line_start = prompt.endswith("\n")
    text = ("\n" if at_line_start else "") + generated
    end = _function_end(prompt).search(text)
    if end is not None:
        text = text[: end.start()]
    return text[1:] if at_line_start else text


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are drawn. temperature: the plain sampler's; hard/easy: AdapT's."""

    temperature: float = 0.8
    hard_temperature: float = 0.8
    easy_temperature: float = 0.2
    max_new_tokens: int = 128

    def __post_init__(self):
        for name in ("temperature", "hard_temperature", "easy_temperature"):
            value = getattr(self, name)
            require_positive_number(name, value)
        require_positive("max_new_tokens", self.max_new_tokens)


def parse_samplers(samplers: str | list[str]) -> list[str]:
    names = [s.strip() for s in samplers.split(",")] if isinstance(samplers, str) else list(samplers)
    unknown = [s for s in names if s not in SAMPLERS]
    if not names or unknown:
        raise UserInputError(f"unknown sampler(s) {unknown or names}; expected a comma list of {', '.join(SAMPLERS)}")
    return list(dict.fromkeys(names))


class _FunctionEnded:
    """Stop a row once its generated text has left the function (a line at column 0 began)."""

    def __init__(self, tokenizer, prompt_length: int, prompt: str):
        self.tokenizer, self.prompt_length, self.prompt = tokenizer, prompt_length, prompt

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = []
        for row in input_ids:
            text = self.tokenizer.decode(row[self.prompt_length:], skip_special_tokens=True)
            done.append(extract_completion(text, self.prompt) != text)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _FirstTokenStartsWith:
    """Token healing: on the first generated step, allow only tokens whose text starts with `prefix`.

    Byte-level BPE merges a newline with the indentation that follows it ("\\n   "), so a prompt
    that ends in a bare "\\n" token tells the model the next line starts at column 0 (a bare
    newline token is rarely followed by indentation in training text). We therefore drop the
    prompt's final newline and let the model emit it, merged as it learned it, as its first token.
    """

    def __init__(self, tokenizer, prefix: str, prompt_length: int):
        import torch

        vocab = len(tokenizer)
        allowed = [i for i in range(vocab) if tokenizer.decode([i]).startswith(prefix)]
        self.mask = torch.full((vocab,), float("-inf"))
        self.mask[allowed] = 0.0
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] != self.prompt_length:
            return scores
        mask = self.mask.to(scores.device, scores.dtype)
        if scores.shape[-1] > mask.shape[0]:  # the model's vocabulary may be padded beyond the tokenizer's
            mask = mask.new_full((scores.shape[-1],), float("-inf")).index_copy(0, self._ids(mask), mask)
        return scores + mask[: scores.shape[-1]]

    @staticmethod
    def _ids(mask):
        import torch

        return torch.arange(mask.shape[0], device=mask.device)


def generate_completions(model, tokenizer, prompt: str, sampler: str, n: int,
                         config: SamplingConfig = SamplingConfig(), seed: int = 0) -> tuple[list[str], dict]:
    """`n` completions of `prompt` (1 for greedy), cut at the function's end, and sampling stats.

    A prompt ending in a newline is token-healed (see `_FirstTokenStartsWith`): the model reads it
    without that newline and must begin with a token that starts with one; the completion is the
    generated text after that newline, so `prompt + completion` is exactly what the model wrote.
    """
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from eval.codegen.adapt import AdaptiveTemperatureLogitsProcessor

    healed = prompt.endswith("\n")
    model_prompt = prompt[:-1] if healed else prompt
    encoded = tokenizer(model_prompt, return_tensors="pt").to(model.device)
    prompt_length = encoded["input_ids"].shape[1]
    limit = getattr(model.config, "max_position_embeddings", None)
    max_new = config.max_new_tokens if limit is None else min(config.max_new_tokens, limit - prompt_length)
    if max_new < 1:
        raise UserInputError(f"prompt of {prompt_length} tokens leaves no room in the model's {limit}-token context")
    kwargs: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": tokenizer.pad_token_id,
                              "stopping_criteria": StoppingCriteriaList([_FunctionEnded(tokenizer, prompt_length, model_prompt)])}
    processors = [_FirstTokenStartsWith(tokenizer, "\n", prompt_length)] if healed else []
    processor = None
    if sampler == "greedy":
        n = 1
        kwargs.update(do_sample=False)
    else:
        kwargs.update(do_sample=True, top_k=0, top_p=1.0, num_return_sequences=n)
        if sampler == "temperature":
            kwargs.update(temperature=config.temperature)
        else:
            processor = AdaptiveTemperatureLogitsProcessor(tokenizer, config.hard_temperature, config.easy_temperature)
            processors.append(processor)
            kwargs.update(temperature=1.0)
    # Healing first: a masked token stays masked whatever temperature divides the logits after.
    kwargs["logits_processor"] = LogitsProcessorList(processors)
    torch.manual_seed(seed)
    with torch.no_grad():
        sequences = model.generate(**encoded, **kwargs)  # [n, prompt_length + new]
    completions, unfinished = [], 0
    for row in sequences:
        generated = row[prompt_length:]
        text = tokenizer.decode(generated, skip_special_tokens=True)
        completion = extract_completion(text, model_prompt)
        # Unfinished: the token limit came before the function's end and before EOS.
        unfinished += completion == text and tokenizer.eos_token_id not in generated.tolist()
        if healed:
            completion = completion[1:] if completion.startswith("\n") else ""  # "" only if generation stopped at once
        completions.append(completion)
    stats = {"unfinished": unfinished}
    if processor is not None:
        stats.update(hard_steps=processor.hard_steps, total_steps=processor.total_steps)
    return completions, stats


def evaluate_codegen(model, tokenizer, problems: list[Problem], samplers: str | list[str] = SAMPLERS,
                     n: int = 20, ks: tuple[int, ...] | list[int] = (1, 5, 10),
                     config: SamplingConfig = SamplingConfig(), timeout_s: float = 5.0, seed: int = 0,
                     workers: int = 2, progress: bool = True, isolation: str = "auto") -> dict[str, Any]:
    """Generate, run every completion's tests in the sandbox, and report pass@k per sampler.

    Returns {"samplers": {name: {"pass_at_k": {k: value}, "n": ..., "passed": ..., "samples": ...,
    "failures": {error_type: count}, ...}}, "problems": [per problem and sampler: n, c],
    "samples": [every completion with its status, error type and `isolated`], "isolation": the
    sandbox mode that ran ("bubblewrap", or a weaker fallback, see eval.codegen.sandbox),
    "isolated": False when that mode was "process" (every verdict could have been forged),
    "config": ...}. A completion that breaks its sandbox counts as failed with the error's type
    (e.g. "SandboxError"); it never aborts the run.
    """
    from tqdm.auto import tqdm

    from eval.codegen.sandbox import SandboxLimits, resolve_isolation

    samplers = parse_samplers(samplers)
    SandboxLimits(timeout_s=timeout_s)  # a bad timeout is an error now, not after generating
    ks = sorted({int(k) for k in ks})
    require_positive("n (samples per problem)", n)
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise UserInputError(f"every k must be in 1..n (n={n}), got {ks}")
    if not problems:
        raise UserInputError("no problems to evaluate")
    isolation = resolve_isolation(isolation)  # once, so every run uses (and the report names) the same

    samples: list[dict[str, Any]] = []
    sampling_stats: dict[str, Counter] = {s: Counter() for s in samplers}
    jobs = [(p, s) for p in problems for s in samplers]
    for index, (problem, sampler) in enumerate(tqdm(jobs, desc="generate", disable=not progress)):
        problem_seed = seed * 1_000_003 + index // len(samplers)  # same seed for every sampler
        completions, stats = generate_completions(model, tokenizer, problem.prompt, sampler, n, config, problem_seed)
        sampling_stats[sampler].update(stats)
        samples += [{"task_id": problem.task_id, "sampler": sampler, "index": i, "completion": c}
                    for i, c in enumerate(completions)]

    by_id = {p.task_id: p for p in problems}
    runs = {_run_key(by_id[s["task_id"]], s["completion"]) for s in samples}  # identical ones run once
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {key: pool.submit(_judge, key, timeout_s, isolation) for key in runs}
        results = {}
        for key, future in tqdm(futures.items(), desc="run tests", disable=not progress):
            results[key] = future.result()
    for s in samples:
        result = results[_run_key(by_id[s["task_id"]], s["completion"])]
        s.update(status=result.status, error_type=result.error_type, isolated=result.isolated)

    return {"samplers": {s: _summarise(s, samples, problems, ks, sampling_stats[s]) for s in samplers},
            "problems": _per_problem(samples, problems, samplers),
            "samples": samples,
            "isolation": isolation,
            "isolated": all(s["isolated"] for s in samples),
            "config": {**asdict(config), "n": n, "ks": ks, "timeout_s": timeout_s, "seed": seed,
                       "problems": len(problems)}}


def _run_key(problem: Problem, completion: str) -> tuple[str, str, str, str]:
    """What one sandboxed judgement needs: (solution, tests, entry point, prompt)."""
    return problem.prompt + completion + "\n", problem.test, problem.entry_point, problem.prompt


def _judge(key: tuple[str, str, str, str], timeout_s: float, isolation: str):
    from eval.codegen.sandbox import failed_run, run_tests_sandboxed

    solution, tests, entry_point, prompt = key
    try:
        return run_tests_sandboxed(solution, tests, entry_point, context=prompt, timeout_s=timeout_s,
                                   isolation=isolation)
    except Exception as e:  # noqa: BLE001 - one completion that breaks its sandbox is one failure, not the run's end
        return failed_run(e, isolation)


def _per_problem(samples, problems, samplers) -> list[dict[str, Any]]:
    rows = []
    for problem in problems:
        for sampler in samplers:
            mine = [s for s in samples if s["task_id"] == problem.task_id and s["sampler"] == sampler]
            rows.append({"task_id": problem.task_id, "sampler": sampler, "n": len(mine),
                         "c": sum(s["status"] == "passed" for s in mine)})
    return rows


def _summarise(sampler, samples, problems, ks, stats) -> dict[str, Any]:
    mine = [s for s in samples if s["sampler"] == sampler]
    per_problem = []
    for problem in problems:
        outcomes = [s["status"] == "passed" for s in mine if s["task_id"] == problem.task_id]
        per_problem.append((len(outcomes), sum(outcomes)))
    pass_k = {}
    for k in ks:
        # Greedy draws one completion: its pass@k is its pass@1, for every k.
        values = [pass_at_k(n, c, min(k, n)) for n, c in per_problem]
        pass_k[str(k)] = sum(values) / len(values)
    failures = Counter(s["error_type"] for s in mine if s["status"] != "passed")
    summary = {"pass_at_k": pass_k, "n": per_problem[0][0], "samples": len(mine),
               "passed": sum(s["status"] == "passed" for s in mine),
               "problems_solved": sum(c > 0 for _, c in per_problem),
               "failures": dict(failures.most_common()), "unfinished": stats.get("unfinished", 0),
               "unisolated": sum(not s["isolated"] for s in mine)}
    if stats.get("total_steps"):
        summary["hard_token_fraction"] = stats["hard_steps"] / stats["total_steps"]
    return summary
