"""slimtune's shared evaluation harness.

Loading models and data, the reference models built here, metrics, the lm-eval bridge,
memory/speed measurement, the shared training loop and reports. It imports none of the method
packages: it takes any `nn.Module` that behaves like a transformers model (has `.config`,
`.device`, returns `.logits`).

Public names are imported lazily (on first attribute access) so that `import eval` stays cheap
and a command only pays for the parts it uses.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # errors and files
    "UserInputError": "eval.errors",
    "atomic_directory": "eval.io",
    "write_json": "eval.io",
    "read_json": "eval.io",
    "train_bpe_tokenizer": "eval.tokenizer",
    # models
    "load_causal_lm": "eval.models",
    "load_image_classifier": "eval.models",
    "build_model_from_arch": "eval.models",
    "ARCHITECTURES": "eval.models",
    "architecture_config": "eval.models",
    "param_count_of_arch": "eval.models",
    # data
    "load_text_corpus": "eval.data",
    "pack_token_blocks": "eval.data",
    "pick_token_blocks": "eval.data",
    "load_glue": "eval.data",
    "load_mmlu": "eval.data",
    "load_alpaca": "eval.data",
    "load_image_folder": "eval.data",
    # reference models and tasks
    "reference_path": "eval.reference",
    "reference_corpus": "eval.reference",
    "build_reference_lm": "eval.reference",
    "build_reference_vit": "eval.reference",
    "reference_image_split": "eval.reference",
    "reference_image_folder": "eval.reference",
    "reference_vit_split": "eval.reference",
    "load_task": "eval.tasks",
    "TASKS": "eval.tasks",
    "task_yaml_dir": "eval.tasks",
    "lm_batches": "eval.tasks",
    "classification_batches": "eval.tasks",
    "task_accuracy": "eval.tasks",
    # metrics
    "perplexity": "eval.metrics",
    "perplexity_of_blocks": "eval.metrics",
    "accuracy": "eval.metrics",
    "multiple_choice_accuracy": "eval.metrics",
    "classification_accuracy": "eval.metrics",
    "run_lm_eval": "eval.lm_eval_bridge",
    # measurement
    "count_parameters": "eval.measure",
    "parameter_bytes": "eval.measure",
    "median_step_time": "eval.measure",
    "peak_memory": "eval.measure",
    "run_in_fresh_process": "eval.measure",
    "mark_setup_done": "eval.measure",
    "tokens_per_second": "eval.measure",
    "estimate_memory": "eval.memory_estimate",
    # training and reports
    "TrainConfig": "eval.train",
    "TrainResult": "eval.train",
    "train": "eval.train",
    "write_report": "eval.report",
    "markdown_table": "eval.report",
    "bar_chart": "eval.report",
    "line_chart": "eval.report",
    # code generation
    "AdaptiveTemperatureLogitsProcessor": "eval.codegen.adapt",
    "pass_at_k": "eval.codegen.passk",
    "run_sandboxed": "eval.codegen.sandbox",
    "run_tests_sandboxed": "eval.codegen.sandbox",
    "load_humaneval": "eval.codegen.problems",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
