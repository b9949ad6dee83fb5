"""eval.codegen: pass@k, the problem loader, completion extraction, the evaluation loop, the command."""

from __future__ import annotations

import gzip
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from eval.codegen.passk import pass_at_k
from eval.codegen.problems import build_program, load_humaneval, shipped_problems_path
from eval.codegen.run import SamplingConfig, evaluate_codegen, extract_completion
from eval.codegen.sandbox import run_sandboxed
from eval.errors import UserInputError


def _exact(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))  # math.comb(a, b) == 0 when b > a


def test_pass_at_k_matches_exact_combinatorics_everywhere_small():
    for n in range(1, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(200, 3, 100), (200, 1, 1), (1000, 7, 10), (500, 499, 2)])
def test_pass_at_k_is_stable_where_the_binomials_are_huge(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), rel=1e-10, abs=1e-12)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 5) == 0.0  # nothing passed
    assert pass_at_k(10, 10, 1) == 1.0  # everything passed
    assert pass_at_k(10, 6, 5) == 1.0  # n - c < k: every draw of 5 holds a passing sample
    assert pass_at_k(20, 5, 1) == pytest.approx(5 / 20)  # pass@1 is the pass rate


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 6), (5, 2, 0), (0, 0, 1), (5, 2.0, 1), (5, True, 1)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(UserInputError, match="pass_at_k"):
        pass_at_k(n, c, k)


def test_the_shipped_problems_load_and_are_well_formed():
    problems = load_humaneval()
    assert 20 <= len(problems) <= 40
    assert len({p.task_id for p in problems}) == len(problems)
    for p in problems:
        assert f"def {p.entry_point}(" in p.prompt and "def check(candidate)" in p.test and p.canonical_solution


def _run_all_in_one_sandbox(programs: list[str]) -> list[bool]:
    # One sandbox run executes many programs (each in a fresh namespace): fast, same semantics.
    driver = f"import json\nresults = []\nfor source in json.loads({json.dumps(programs)!r}):\n" + (
        "    try:\n        exec(source, {'__name__': '__main__'})\n        results.append(True)\n"
        "    except Exception:\n        results.append(False)\nprint(json.dumps(results))\n")
    result = run_sandboxed(driver, timeout_s=60)
    assert result.passed, result.stderr
    return json.loads(result.stdout)


def test_every_canonical_solution_passes_and_an_empty_body_fails():
    problems = load_humaneval()
    assert all(_run_all_in_one_sandbox([build_program(p, p.canonical_solution) for p in problems]))
    assert not any(_run_all_in_one_sandbox([build_program(p, "    pass\n") for p in problems]))


def test_canonical_solutions_pass_and_empty_bodies_fail_when_the_tests_run_apart():
    from eval.codegen.run import _judge, _run_key
    from eval.codegen.sandbox import resolve_isolation

    isolation = resolve_isolation("auto")
    for problem in load_humaneval()[:3]:  # all of them were checked once; three keep the test fast
        good = _judge(_run_key(problem, problem.canonical_solution), 10, isolation)
        assert good.passed, (problem.task_id, good.stderr)
        assert _judge(_run_key(problem, "    pass\n"), 10, isolation).status == "failed"


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


PROBLEM = {"task_id": "t/0", "prompt": "def inc(x):\n    \"\"\"x + 1\"\"\"\n", "entry_point": "inc",
           "test": "def check(candidate):\n    assert candidate(1) == 2\n", "canonical_solution": "    return x + 1\n"}


@pytest.mark.parametrize("field", ["task_id", "prompt", "test", "entry_point"])
def test_a_missing_field_names_the_line_and_the_field(tmp_path, field):
    broken = {k: v for k, v in PROBLEM.items() if k != field}
    path = _write_jsonl(tmp_path / "p.jsonl", [PROBLEM, broken])
    with pytest.raises(UserInputError, match=rf"line 2: missing field '{field}'"):
        load_humaneval(path)


def test_other_bad_problem_files(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_humaneval(tmp_path / "absent.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps(PROBLEM) + "\n{not json\n")
    with pytest.raises(UserInputError, match="line 2: not valid JSON"):
        load_humaneval(tmp_path / "bad.jsonl")
    with pytest.raises(UserInputError, match="appears twice"):
        load_humaneval(_write_jsonl(tmp_path / "dup.jsonl", [PROBLEM, PROBLEM]))
    with pytest.raises(UserInputError, match="'prompt' must be a non-empty string"):
        load_humaneval(_write_jsonl(tmp_path / "num.jsonl", [{**PROBLEM, "prompt": 3}]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserInputError, match="no problems"):
        load_humaneval(tmp_path / "empty.jsonl")


def test_gzipped_jsonl_loads_like_humaneval_ships(tmp_path):
    path = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(PROBLEM) + "\n")
    [problem] = load_humaneval(path)
    assert problem.entry_point == "inc" and problem.canonical_solution == "    return x + 1\n"


@pytest.mark.parametrize("generated, expected", [
    ("    return x + 1\n\ndef other():\n    pass\n", "    return x + 1\n"),
    ("    y = x\n\n    return y\nif __name__ == '__main__':\n", "    y = x\n\n    return y"),
    ("    return x\n# trailing comment\n", "    return x"),
    ("    return x", "    return x"),  # cut by the token limit: kept as is
    ("print(1)\n", ""),  # left the function at once
])
def test_extract_completion_stops_at_the_first_line_at_column_zero(generated, expected):
    assert extract_completion(generated, prompt="def f(x):\n") == expected


def test_extract_completion_when_the_prompt_ends_inside_a_line():
    assert extract_completion("x + 1\nprint(2)", prompt="def f(x):\n    return ") == "x + 1"


class ScriptedModel(torch.nn.Module):
    """Stands in for an LM: `generate` returns the prompt followed by scripted completions."""

    def __init__(self, tokenizer, completions: list[str]):
        super().__init__()
        self.tokenizer, self.completions = tokenizer, completions
        self.config = type("Config", (), {"max_position_embeddings": None})()
        self.device = torch.device("cpu")

    def generate(self, input_ids, num_return_sequences=1, **kwargs):
        rows = []
        for i in range(num_return_sequences):
            # The prompt arrives without its final newline (token healing): the model writes it.
            text = "\n" + self.completions[i % len(self.completions)]
            tail = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append(input_ids[0].tolist() + tail)
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])


def test_evaluation_counts_passes_failures_and_pass_at_k(tiny_tokenizer):
    problem = load_humaneval()[0]  # add(a, b)
    scripted = ["    return a + b\n\ndef junk():\n", "    return a - b\n", "    return c\n", "    return a +\n"]
    model = ScriptedModel(tiny_tokenizer, scripted)
    report = evaluate_codegen(model, tiny_tokenizer, [problem], ["greedy", "temperature", "adapt"], n=8, ks=[1, 4],
                              config=SamplingConfig(max_new_tokens=16), progress=False)
    for sampler in ("temperature", "adapt"):
        s = report["samplers"][sampler]
        assert (s["n"], s["samples"], s["passed"]) == (8, 8, 2)
        assert s["pass_at_k"] == {"1": pytest.approx(pass_at_k(8, 2, 1)), "4": pytest.approx(pass_at_k(8, 2, 4))}
        assert s["failures"] == {"AssertionError": 2, "NameError": 2, "SyntaxError": 2}
        assert s["unfinished"] == 6  # only the first script leaves the function (no EOS in any)
    greedy = report["samplers"]["greedy"]  # one completion, the first scripted one: passes
    assert (greedy["n"], greedy["passed"], greedy["pass_at_k"]) == (1, 1, {"1": 1.0, "4": 1.0})
    assert greedy["unfinished"] == 0
    assert {s["completion"] for s in report["samples"]} == {"    return a + b\n", "    return a - b\n",
                                                           "    return c\n", "    return a +\n"}


FORGED = [
    "    return a + b\n",  # the one honest completion
    # issue 15, item 6: print a "done" line with whatever token is visible, then leave with status 0
    "    import os, sys\n    print('done', open('/proc/self/cmdline').read())\n    sys.stdout.flush()\n    os._exit(0)\n",
    "    raise SystemExit(0)\n",
    "    return type('Any', (), {'__eq__': lambda s, o: True})()\n",  # equal to everything
]


def test_a_completion_cannot_forge_a_pass_and_the_isolation_is_reported(tiny_tokenizer):
    from eval.codegen.report import codegen_markdown
    from eval.codegen.sandbox import resolve_isolation

    problem = load_humaneval()[0]  # add(a, b)
    report = evaluate_codegen(ScriptedModel(tiny_tokenizer, FORGED), tiny_tokenizer, [problem], ["temperature"], n=4,
                              ks=[1], config=SamplingConfig(max_new_tokens=48), progress=False)
    summary = report["samplers"]["temperature"]
    assert summary["passed"] == 1 and summary["pass_at_k"]["1"] == pytest.approx(0.25)
    assert summary["failures"] == {"EarlyExit": 1, "SystemExit": 1, "TypeError": 1}
    assert report["isolation"] == resolve_isolation("auto")
    assert report["isolated"] is True and all(s["isolated"] for s in report["samples"])
    assert f"isolation: {report['isolation']}" in codegen_markdown(report)
    assert "UNISOLATED" not in codegen_markdown(report)


def test_a_weak_sandbox_is_flagged_in_the_report(tiny_tokenizer):
    from eval.codegen.report import codegen_markdown

    problem = load_humaneval()[0]
    report = evaluate_codegen(ScriptedModel(tiny_tokenizer, FORGED[:1]), tiny_tokenizer, [problem], ["greedy"], n=1,
                              ks=[1], config=SamplingConfig(max_new_tokens=16), progress=False, isolation="process")
    assert report["isolation"] == "process" and report["samplers"]["greedy"]["passed"] == 1
    assert report["isolated"] is False and all(s["isolated"] is False for s in report["samples"])
    assert report["samplers"]["greedy"]["unisolated"] == 1
    markdown = codegen_markdown(report)
    assert "**Warning: weak sandbox.**" in markdown and "**UNISOLATED results.**" in markdown
    assert "UNISOLATED (process)" in markdown.split("## Failure types")[0]  # on the pass@k row itself


# Issue 22: in process mode a completion reads the tests' verdict pipe through /proc and eats its
# "ready" line, so the sandbox cannot tell how the tests ended (a SandboxError). It touches only
# tests' processes with its own parent: this evaluator's (one worker, so its own run's only).
EAT_READY = (
    "    import json, os\n"
    "    for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
    "        try:\n"
    "            if open('/proc/' + pid + '/stat').read().rsplit(')', 1)[1].split()[1] != str(os.getppid()):\n"
    "                continue\n"
    "            config = json.loads(open('/proc/' + pid + '/cmdline').read().split(chr(0))[-2])\n"
    "            if config.get('role') == 'test':\n"
    "                fd = os.open('/proc/' + pid + '/fd/' + str(config['fds'][-1]), os.O_RDONLY | os.O_NONBLOCK)\n"
    "                print('ate', os.read(fd, 4096), flush=True)\n"
    "        except Exception:\n"
    "            pass\n"
    "    return a - b\n"
)


def test_a_completion_that_breaks_its_sandbox_is_one_failure_not_the_end_of_the_run(tiny_tokenizer):
    problem = load_humaneval()[0]  # add(a, b)
    report = evaluate_codegen(ScriptedModel(tiny_tokenizer, ["    return a + b\n", EAT_READY]), tiny_tokenizer,
                              [problem], ["temperature"], n=2, ks=[1], config=SamplingConfig(max_new_tokens=200),
                              progress=False, isolation="process", workers=1)
    summary = report["samplers"]["temperature"]
    assert summary["samples"] == 2 and summary["passed"] == 1
    assert summary["failures"] == {"SandboxError": 1}
    assert summary["unisolated"] == 2 and report["isolated"] is False


def test_a_sandbox_error_becomes_a_failed_result_named_by_its_type():
    from eval.codegen.run import _judge, _run_key

    problem = load_humaneval()[0]
    result = _judge(_run_key(problem, EAT_READY), 30, "process")
    assert (result.status, result.error_type, result.passed, result.isolated) == ("failed", "SandboxError", False,
                                                                                 False)
    assert "did not start the tests" in result.stderr


def test_token_healing_makes_the_first_token_carry_the_prompts_final_newline(tiny_tokenizer):
    from eval.codegen.run import _FirstTokenStartsWith

    heal = _FirstTokenStartsWith(tiny_tokenizer, "\n", prompt_length=5)
    scores = torch.zeros(2, len(tiny_tokenizer))
    first = heal(torch.zeros(2, 5, dtype=torch.long), scores.clone())
    allowed = {i for i in range(len(tiny_tokenizer)) if first[0, i] == 0}
    assert allowed and all(tiny_tokenizer.decode([i]).startswith("\n") for i in allowed)
    assert tiny_tokenizer("\n   ", add_special_tokens=False)["input_ids"][0] in allowed  # newline + indentation
    assert torch.isinf(first[:, tiny_tokenizer("x", add_special_tokens=False)["input_ids"][0]]).all()
    assert torch.equal(heal(torch.zeros(2, 6, dtype=torch.long), scores.clone()), scores)  # later steps: untouched


def test_evaluation_of_a_real_tiny_model_runs_end_to_end(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    problems = load_humaneval()[:2]
    report = evaluate_codegen(model, tokenizer, problems, ["temperature", "adapt"], n=3, ks=[1, 2],
                              config=SamplingConfig(max_new_tokens=6), progress=False)
    for s in report["samplers"].values():
        assert s["samples"] == 6 and s["passed"] + sum(s["failures"].values()) == 6
    assert 0 < report["samplers"]["adapt"]["hard_token_fraction"] <= 1  # every prompt ends after a ':' line


def test_the_command_writes_json_markdown_and_plots(tmp_path, tiny_llama_dir, capsys):
    from scripts.cli import main

    problems = _write_jsonl(tmp_path / "p.jsonl", [PROBLEM])
    out = tmp_path / "out"
    code = main(["codegen-eval", "--model", str(tiny_llama_dir), "--problems", str(problems), "--sampler",
                 "greedy,adapt", "--n", "2", "--k", "1,2", "--max-new-tokens", "4", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "codegen.json").read_text())
    assert set(report["samplers"]) == {"greedy", "adapt"} and report["config"]["n"] == 2
    assert report["isolation"] in {"bubblewrap", "namespaces", "process"}
    assert "pass@2" in (out / "codegen.md").read_text()
    assert (out / "pass_at_k.png").stat().st_size > 0 and (out / "failures.png").stat().st_size > 0


@pytest.mark.parametrize("extra, message", [
    (["--sampler", "beam"], "unknown sampler"),
    (["--k", "1,50"], "every k must be in 1..n"),
    (["--k", "one"], "--k must be a comma list"),
    (["--timeout", "nan"], "timeout_s must be a positive finite number"),
    (["--timeout", "inf"], "timeout_s must be a positive finite number"),
    (["--timeout", "0"], "timeout_s must be a positive finite number"),
])
def test_the_command_rejects_bad_arguments_in_one_line(tmp_path, tiny_llama_dir, capsys, extra, message):
    from scripts.cli import main

    problems = _write_jsonl(tmp_path / "p.jsonl", [PROBLEM])
    code = main(["codegen-eval", "--model", str(tiny_llama_dir), "--problems", str(problems), "--n", "2",
                 "--out", str(tmp_path / "out"), *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out" / "codegen.json").exists()


def test_the_command_names_a_problem_file_with_a_missing_field(tmp_path, capsys):
    from scripts.cli import main

    problems = _write_jsonl(tmp_path / "p.jsonl", [{k: v for k, v in PROBLEM.items() if k != "test"}])
    assert main(["codegen-eval", "--problems", str(problems), "--out", str(tmp_path / "o")]) == 2
    assert "line 1: missing field 'test'" in capsys.readouterr().err


def test_the_shipped_problem_file_is_inside_the_package():
    import eval

    path = shipped_problems_path()
    assert path.is_file() and path.parent.parent.parent == Path(eval.__file__).resolve().parent


# --- The easy tier (eval.codegen.easy) --------------------------------------------------------


def test_extract_completion_of_a_method_stops_where_the_class_body_resumes():
    prompt = "class A:\n\n    def get(self):\n        \"\"\"Doc.\"\"\"\n"
    generated = "        return self.x\n\n    def other(self):\n        pass\n"
    assert extract_completion(generated, prompt=prompt) == "        return self.x\n"
    assert extract_completion("        y = 1\n            z = 2\nclass B:\n", prompt=prompt) == (
        "        y = 1\n            z = 2")  # deeper lines stay in, column 0 ends it too


def test_the_easy_tier_files_are_what_the_generator_writes_and_the_splits_are_disjoint():
    from eval.codegen.easy import FAMILIES, SPLIT_FILES, easy_tier

    tier = easy_tier()
    for split, path in SPLIT_FILES.items():
        assert path.read_text(encoding="utf-8") == "".join(json.dumps(p) + "\n" for p in tier[split])
    validation, test = load_humaneval("easy-validation"), load_humaneval("easy-test")
    assert len(validation) + len(test) >= 100 and len(test) >= 2 * len(validation) - len(FAMILIES)
    assert not {p.task_id for p in validation} & {p.task_id for p in test}
    for split in tier.values():  # stratified: every family on both sides
        assert {p["family"] for p in split} == set(FAMILIES)
    assert easy_tier() == tier  # deterministic


def _easy_problems():
    return load_humaneval("easy-validation") + load_humaneval("easy-test")


def _wrong_attribute_body(problem) -> str:
    # The class's other attribute in place of the one asked for: the tests must catch it.
    lines = problem.prompt.splitlines()
    init = lines.index(next(line for line in lines if line.startswith("    def __init__(self, ")))
    asked = problem.task_id.rsplit("/", 1)[1]
    names = [n.strip() for n in lines[init].split("(self, ", 1)[1].rstrip("):").split(",")]
    other = next((n for n in names if n != asked), "zzz")
    return problem.canonical_solution.replace(f"self.{asked}", f"self.{other}").replace(
        f"self._{asked}", f"self._{other}")


def test_every_easy_canonical_solution_passes_and_empty_or_wrong_bodies_fail():
    problems = _easy_problems()
    assert all(_run_all_in_one_sandbox([build_program(p, p.canonical_solution) for p in problems]))
    for body in ("        pass\n", "        return None\n"):
        assert not any(_run_all_in_one_sandbox([build_program(p, body) for p in problems]))
    wrong = [build_program(p, _wrong_attribute_body(p)) for p in problems]
    assert all(w != build_program(p, p.canonical_solution) for w, p in zip(wrong, problems))
    assert not any(_run_all_in_one_sandbox(wrong))


def test_easy_problems_are_judged_across_the_sandbox_boundary():
    from eval.codegen.easy import FAMILIES
    from eval.codegen.run import _judge, _run_key
    from eval.codegen.sandbox import resolve_isolation

    isolation = resolve_isolation("auto")
    one_per_family = {}
    for p in load_humaneval("easy-validation"):
        one_per_family.setdefault(p.task_id.split("/")[1], p)
    assert set(one_per_family) == set(FAMILIES)
    for problem in one_per_family.values():  # the entry point is a function; the class stays inside
        good = _judge(_run_key(problem, problem.canonical_solution), 10, isolation)
        assert good.passed, (problem.task_id, good.stderr)
        assert _judge(_run_key(problem, "        pass\n"), 10, isolation).status == "failed"


def test_an_unknown_problem_set_name_is_a_file_not_found():
    with pytest.raises(UserInputError, match="problem file not found: easy-train"):
        load_humaneval("easy-train")
    with pytest.raises(UserInputError, match="unknown problem set 'easy-train'"):
        shipped_problems_path("easy-train")


# --- Paired differences and settings chosen on validation problems ----------------------------


def test_paired_difference_of_known_values():
    from scipy import stats

    from eval.codegen.paired import paired_difference

    a, b = [1.0, 0.5, 0.0, 1.0, 0.25], [0.5, 0.5, 0.0, 0.0, 0.5]
    d = [x - y for x, y in zip(a, b)]
    result = paired_difference(a, b, resamples=2000)
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    half = stats.t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d))
    assert result["mean"] == pytest.approx(mean)
    assert (result["t_low"], result["t_high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert min(d) <= result["low"] <= mean <= result["high"] <= max(d)
    assert (result["better"], result["worse"], result["ties"], result["problems"]) == (2, 1, 2, 5)
    same = paired_difference([0.3, 0.7, 0.1], [0.1, 0.5, -0.1])  # a constant difference: no spread
    assert same["low"] == pytest.approx(0.2) and same["high"] == pytest.approx(0.2)
    assert same["t_low"] == pytest.approx(0.2) and same["t_high"] == pytest.approx(0.2)


@pytest.mark.parametrize("a, b, kwargs, message", [
    ([1.0], [0.0], {}, "at least 2"),
    ([1.0, 0.0], [0.0], {}, "equally long"),
    ([1.0, 0.0], [0.0, 1.0], {"confidence": 1.5}, "confidence must be in"),
])
def test_paired_difference_rejects_bad_input(a, b, kwargs, message):
    from eval.codegen.paired import paired_difference

    with pytest.raises(UserInputError, match=message):
        paired_difference(a, b, **kwargs)


def test_paired_pass_at_k_pairs_the_same_problems():
    from eval.codegen.paired import paired_pass_at_k

    report = {"samplers": {"adapt": {}, "temperature": {}}, "config": {"ks": [1, 2]},
              "problems": [{"task_id": "p1", "sampler": "temperature", "n": 4, "c": 1},
                           {"task_id": "p2", "sampler": "temperature", "n": 4, "c": 0},
                           {"task_id": "p2", "sampler": "adapt", "n": 4, "c": 4},
                           {"task_id": "p1", "sampler": "adapt", "n": 4, "c": 1}]}
    paired = paired_pass_at_k(report, "adapt", "temperature")
    assert paired["1"]["mean"] == pytest.approx((0 + 1.0) / 2)
    assert paired["2"]["mean"] == pytest.approx((0 + 1.0) / 2) and paired["2"]["ties"] == 1
    with pytest.raises(UserInputError, match="sampler 'greedy' is not in the report"):
        paired_pass_at_k(report, "greedy", "temperature")


class TemperatureScriptedModel(ScriptedModel):
    """Writes the right body only at one temperature (plain) or one AdapT pair, a wrong one otherwise."""

    def __init__(self, tokenizer, right: str, wrong: str, temperature: float, adapt: tuple[float, float]):
        super().__init__(tokenizer, [right])
        self.right, self.wrong, self.temperature, self.adapt = right, wrong, temperature, adapt

    def generate(self, input_ids, num_return_sequences=1, **kwargs):
        from eval.codegen.adapt import AdaptiveTemperatureLogitsProcessor

        adapt = [p for p in kwargs.get("logits_processor", []) if isinstance(p, AdaptiveTemperatureLogitsProcessor)]
        hit = ((adapt[0].hard_temperature, adapt[0].easy_temperature) == self.adapt if adapt
               else kwargs.get("temperature") == self.temperature)
        self.completions = [self.right if hit else self.wrong]
        return super().generate(input_ids, num_return_sequences, **kwargs)


def test_settings_are_chosen_by_validation_pass_at_k_and_never_on_the_reported_problems(tiny_tokenizer):
    from eval.codegen.select import select_sampler_settings

    validation, reported = load_humaneval("easy-validation")[:1], load_humaneval("easy-test")[:1]
    model = TemperatureScriptedModel(tiny_tokenizer, validation[0].canonical_solution, "        return 0\n",
                                     temperature=0.6, adapt=(1.2, 0.4))
    config, table = select_sampler_settings(model, tiny_tokenizer, validation, reported, [0.2, 0.6, 1.0],
                                            [(0.8, 0.2), (1.2, 0.4)], n=2, k=2, progress=False)
    assert (config.temperature, config.hard_temperature, config.easy_temperature) == (0.6, 1.2, 0.4)
    assert table["chosen"] == {"temperature": "T=0.6", "adapt": "a=1.2, b=0.4"}
    assert [r["pass@2"] for r in table["rows"]] == [0.0, 1.0, 0.0, 0.0, 1.0]
    assert table["task_ids"] == [validation[0].task_id]
    with pytest.raises(UserInputError, match="share 1 task_id"):
        select_sampler_settings(model, tiny_tokenizer, validation, validation, [0.2], [], n=2, k=2, progress=False)


@pytest.mark.parametrize("text, message", [
    ("0.8-0.2", "HARD:EASY"), ("0.8:x", "comma list of numbers"), ("0.8:0", "must be a positive"),
])
def test_a_bad_adapt_grid_is_one_clear_error(text, message):
    from eval.codegen.select import parse_adapt_grid

    with pytest.raises(UserInputError, match=message):
        parse_adapt_grid(text)


def test_the_command_chooses_on_validation_and_reports_the_paired_difference(tmp_path, tiny_llama_dir):
    from scripts.cli import main

    validation = _write_jsonl(tmp_path / "v.jsonl", [dict(PROBLEM, task_id="v/0")])
    problems = _write_jsonl(tmp_path / "p.jsonl", [PROBLEM, dict(PROBLEM, task_id="t/1")])
    out = tmp_path / "out"
    assert main(["codegen-eval", "--model", str(tiny_llama_dir), "--problems", str(problems), "--select-on",
                 str(validation), "--temperature-grid", "0.5,1", "--adapt-grid", "1:0.5", "--sampler",
                 "temperature,adapt", "--n", "2", "--k", "1,2", "--max-new-tokens", "4", "--out", str(out)]) == 0
    report = json.loads((out / "codegen.json").read_text())
    assert [r["setting"] for r in report["selection"]["rows"]] == ["T=0.5", "T=1", "a=1, b=0.5"]
    assert report["config"]["temperature"] in (0.5, 1.0) and report["config"]["hard_temperature"] == 1.0
    assert set(report["paired"]["by_k"]) == {"1", "2"} and report["paired"]["by_k"]["2"]["problems"] == 2
    markdown = (out / "codegen.md").read_text()
    assert "paired difference of pass@k" in markdown and "Settings chosen on validation problems" in markdown
    assert (out / "paired.png").stat().st_size > 0


def test_the_command_refuses_validation_problems_that_are_reported(tmp_path, capsys):
    from scripts.cli import main

    problems = _write_jsonl(tmp_path / "p.jsonl", [PROBLEM])
    assert main(["codegen-eval", "--problems", str(problems), "--select-on", str(problems),
                 "--out", str(tmp_path / "o")]) == 2
    assert "(--select-on) share 1 task_id(s) with the reported ones" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    validation = _write_jsonl(tmp_path / "v.jsonl", [dict(PROBLEM, task_id="v/0")])
    for extra, message in ((["--sampler", "greedy"], "has neither"), (["--select-k", "50"], "--select-k must be")):
        assert main(["codegen-eval", "--problems", str(problems), "--select-on", str(validation), *extra,
                     "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "o").exists()
