"""One loader of model specs (eval.model_specs), filled by the method packages, used by the
commands: a saved directory loads through the package that wrote it, and codegen-eval scores a
QST model and a pruned model."""

from __future__ import annotations

import json

import pytest
import torch

import eval.model_specs as specs
from eval.errors import UserInputError
from eval.model_specs import ModelSpec, load_model_spec, parse_spec
from scripts.cli import main

PROBLEM = {"task_id": "t/0", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
           "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
           "entry_point": "add"}


@pytest.fixture(scope="module")
def qst_dir(tiny_llama_dir, tmp_path_factory):
    from qst import QSTConfig, QSTForCausalLM

    out = tmp_path_factory.mktemp("qst")
    QSTForCausalLM.from_base(str(tiny_llama_dir), QSTConfig(r=4), quantize=None).save_pretrained(out)
    return out


def test_specs_parse_with_labels_and_prefixes():
    assert parse_spec("dense=ref-lm") == ModelSpec("dense", "plain", "ref-lm")
    assert parse_spec("pruned:runs/p") == ModelSpec("pruned:runs/p", "pruned", "runs/p")
    assert parse_spec("/m/x") == ModelSpec("/m/x", "plain", "/m/x")
    with pytest.raises(UserInputError, match="names no directory"):
        parse_spec("qst:")


def test_a_saved_directory_loads_through_the_package_that_wrote_it(pruned_dir, qst_dir, tiny_llama_dir):
    import pruning  # noqa: F401 - registers pruned:
    import qst  # noqa: F401 - registers qst:

    by_prefix, _ = load_model_spec(f"pruned:{pruned_dir}")
    plain, tokenizer = load_model_spec(str(pruned_dir))  # the config's model type says "pruned"
    assert type(plain).__name__.startswith("SlimtunePruned") and tokenizer is not None
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, by_prefix(input_ids=ids).logits)
    side, tokenizer = load_model_spec(str(qst_dir), base=str(tiny_llama_dir))  # qst_config.json says "qst"
    assert type(side).__name__ == "QSTForCausalLM" and tokenizer.pad_token is not None
    card = (qst_dir / "README.md").read_text()  # the deployment path: backbone id + this directory
    assert card.startswith("---\n") and f"base_model: \"{tiny_llama_dir}\"" in card
    assert "QSTForCausalLM.from_pretrained(DIR)" in card


def test_an_unregistered_saved_type_names_the_import(pruned_dir, monkeypatch):
    monkeypatch.setattr(specs, "_BY_MODEL_TYPE", {})
    monkeypatch.setattr(specs, "_LOADERS", {})
    with pytest.raises(UserInputError, match="import pruning"):
        load_model_spec(str(pruned_dir))
    with pytest.raises(UserInputError, match="import lowrank_vit"):
        load_model_spec("lowrank:somewhere")


@pytest.mark.parametrize("kind", ["qst", "pruned"])
def test_codegen_eval_scores_a_qst_and_a_pruned_model(kind, pruned_dir, qst_dir, tiny_llama_dir, tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps(PROBLEM) + "\n")
    spec = f"qst:{qst_dir}" if kind == "qst" else f"pruned:{pruned_dir}"
    out = tmp_path / "out"
    code = main(["codegen-eval", "--model", spec, "--base", str(tiny_llama_dir), "--problems", str(problems),
                 "--sampler", "greedy,temperature", "--n", "2", "--k", "1", "--max-new-tokens", "4", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "codegen.json").read_text())
    assert report["config"]["model"] == spec
    for sampler in ("greedy", "temperature"):
        scored = report["samplers"][sampler]
        assert scored["samples"] == (1 if sampler == "greedy" else 2)
        assert scored["passed"] + sum(scored["failures"].values()) == scored["samples"]


def test_a_benchmark_backbone_may_be_pruned_but_not_a_side_network(pruned_dir, qst_dir):
    from eval.model_specs import backbone_source

    assert backbone_source(f"pruned:{pruned_dir}") == (str(pruned_dir), "pruning")
    assert backbone_source("ref-lm") == ("ref-lm", None)
    for spec in (f"qst:{qst_dir}", str(qst_dir)):
        with pytest.raises(UserInputError, match="QST side network, already tuned"):
            backbone_source(spec)
    with pytest.raises(UserInputError, match="no such directory"):
        backbone_source("pruned:/nonexistent/dir")
