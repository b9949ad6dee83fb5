"""README.md model cards in the transformers / Hub style for every directory the suite saves.

    write_model_card(directory, title="...", method="DISP-LLM pruning", tags=["pruning"],
                     load="import pruning\\nfrom transformers import AutoModelForCausalLM\\n...",
                     settings={...}, budget="50 % of block parameters", quality={"perplexity": 12.3},
                     base_model="ref-lm", command="slimtune prune ...")

YAML front matter (library_name, tags, base_model, pipeline_tag) and then: method, settings,
budget, measured quality (only numbers the caller measured; "not measured" otherwise), how to
load it and the command that made it.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path


def current_command() -> str:
    """The command line of this process, as the user typed it where that is known."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "slimtune":
        return shlex.join(["slimtune", *argv[1:]])
    return shlex.join(["python", *argv]) if argv else "python"


def _yaml_value(value) -> str:
    return json.dumps(value)  # JSON scalars and lists are valid YAML


def model_card(*, title: str, method: str, load: str, tags=(), base_model: str | None = None,
               pipeline_tag: str | None = None, settings: dict | None = None, budget: str | None = None,
               quality: dict | None = None, command: str | None = None, notes: str | None = None) -> str:
    front = ["---", "library_name: transformers", f"tags: {_yaml_value(['slimtune', *tags])}"]
    if base_model:
        front.append(f"base_model: {_yaml_value(str(base_model))}")
    if pipeline_tag:
        front.append(f"pipeline_tag: {pipeline_tag}")
    front.append("---")
    lines = [*front, "", f"# {title}", "", f"**Method:** {method}", ""]
    if base_model:
        lines += [f"**Base model:** `{base_model}`", ""]
    lines += [f"**Budget:** {budget or 'not recorded'}", "", "## Settings", ""]
    lines += [f"- `{k}`: {_fmt(v)}" for k, v in (settings or {}).items()] or ["- (defaults)"]
    lines += ["", "## Measured quality", ""]
    if quality:
        lines += [f"- {k}: {_fmt(v)}" for k, v in quality.items()]
    else:
        lines += ["Not measured when this directory was written (see the report written next to it, if any)."]
    lines += ["", "## How to load", "", "```python", load.strip(), "```", ""]
    if notes:
        lines += [notes.strip(), ""]
    lines += ["## Made by", "", "```", command or current_command(), "```", ""]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list, tuple)):
        return f"`{json.dumps(value)}`"
    return str(value)


def write_model_card(directory, **fields) -> Path:
    path = Path(directory) / "README.md"
    path.write_text(model_card(**fields), encoding="utf-8")
    return path
