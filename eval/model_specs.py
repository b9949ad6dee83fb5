"""One way to name a model on the command line, shared by zero-shot, codegen-eval and bench.

    ref-lm | PATH | HUB_ID     a causal LM; a directory saved by a method package (its config.json
                               has model_type slimtune_pruned / slimtune_lowrank) loads through it
    qst:DIR                    a QST side network on its backbone (`base`, else the one it names)
    pruned:DIR                 a model written by `slimtune prune`
    lowrank:DIR                a low-rank-compressed causal LM
optionally with a label: `dense=ref-lm`.

eval imports no method package: each one registers its prefix here when it is imported
(`register_spec_loader("pruned", fn, model_types=("slimtune_pruned",))`), and the commands
import the method packages (`scripts/specs.py`). A loader is `fn(path, base=..., device=...)`
returning a model; the tokenizer comes from the directory, else from `base`, else ref-lm's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from eval.errors import UserInputError

# prefix -> loader; saved model_type -> prefix; a file only that kind of directory holds -> prefix
_LOADERS: dict[str, Callable] = {}
_BY_MODEL_TYPE: dict[str, str] = {}
_BY_FILE: dict[str, str] = {}
# The prefixes the suite's method packages register, for the error when one was not imported.
KNOWN_PREFIXES = {"qst": "qst", "pruned": "pruning", "lowrank": "lowrank_vit"}


@dataclass(frozen=True)
class ModelSpec:
    label: str
    kind: str  # "plain" or a registered prefix
    path: str


def register_spec_loader(prefix: str, loader: Callable, model_types: tuple[str, ...] = (),
                         marker_files: tuple[str, ...] = ()) -> None:
    """Make `PREFIX:DIR` load with `loader`, and also a plain directory whose config.json has one of
    `model_types` or that holds one of `marker_files` (e.g. QST's qst_config.json)."""
    _LOADERS[prefix] = loader
    for model_type in model_types:
        _BY_MODEL_TYPE[model_type] = prefix
    for name in marker_files:
        _BY_FILE[name] = prefix


def parse_spec(item: str) -> ModelSpec:
    """`[LABEL=]ref-lm|PATH|HUB_ID|PREFIX:DIR` -> ModelSpec."""
    label, _, spec = item.strip().rpartition("=")
    kind, sep, path = spec.partition(":")
    if sep and kind in (set(KNOWN_PREFIXES) | set(_LOADERS)):
        if not path:
            raise UserInputError(f"model spec {item!r} names no directory after '{kind}:'")
        return ModelSpec(label or f"{kind}:{path}", kind, path)
    if not spec:
        raise UserInputError(f"empty model spec in {item!r}; expected [LABEL=]ref-lm|PATH|qst:DIR|pruned:DIR|lowrank:DIR")
    return ModelSpec(label or spec, "plain", spec)


def _saved_kind(path: str) -> str | None:
    """The registered prefix of a directory saved with a method's own model type, else None."""
    for name, prefix in _BY_FILE.items():
        if (Path(path) / name).is_file():
            return prefix
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # load_causal_lm reports a broken config with its own message
    model_type = str(data.get("model_type", ""))
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    if model_type.startswith("slimtune_"):
        raise UserInputError(f"{path} holds a {model_type!r} model and no imported package registered it: "
                             + str(data.get("slimtune_load_hint") or "import the slimtune package that wrote it"))
    return None


def load_model_spec(spec: ModelSpec | str, base: str | None = None, device: str = "cpu"):
    """(model in eval mode, tokenizer) for a spec."""
    from eval.models import load_causal_lm

    spec = parse_spec(spec) if isinstance(spec, str) else spec
    kind = spec.kind if spec.kind != "plain" else _saved_kind(spec.path)
    if kind is None:
        return load_causal_lm(spec.path, device=device)
    if kind not in _LOADERS:
        raise UserInputError(f"model spec '{kind}:' is not registered: import {KNOWN_PREFIXES.get(kind, kind)} first")
    model = _LOADERS[kind](spec.path, base=base, device=device)
    tokenizer = getattr(model, "tokenizer", None) or tokenizer_for(spec.path, fallback=base or "ref-lm")
    return model.eval(), tokenizer


def backbone_source(spec: ModelSpec | str) -> tuple[str, str | None]:
    """What a tuning benchmark starts from: (the name or directory `eval.models.load_causal_lm`
    opens, the package a fresh process must import first so that it can, or None).

    A pruned or low-rank model is a backbone like any other; a QST side network is already tuned
    and is refused (bench its backbone instead).
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    kind = spec.kind if spec.kind != "plain" else _saved_kind(spec.path)
    if kind == "qst":
        raise UserInputError(f"{spec.path} is a QST side network, already tuned; to benchmark tuning methods, "
                             "pass the backbone it was trained on (its qst_config.json names it)")
    if kind is not None and not Path(spec.path).is_dir():
        raise UserInputError(f"model spec '{kind}:{spec.path}': no such directory")
    return spec.path, (KNOWN_PREFIXES.get(kind, kind) if kind else None)


def check_causal_lm(model, path: str) -> None:
    """LM evaluations score language models: refuse e.g. a compressed ViT before anything else is built."""
    from transformers import AutoModelForCausalLM

    config = getattr(model, "config", None)
    if config is None or (type(config) not in AutoModelForCausalLM._model_mapping and not hasattr(model, "generate")):
        raise UserInputError(f"{path} holds a {getattr(config, 'model_type', '?')!r} model ({type(model).__name__}); "
                             "zero-shot and codegen-eval evaluate causal language models (a low-rank LM, not a ViT)")


def tokenizer_for(path: str, fallback: str | None = None):
    """The tokenizer saved next to a model, else the one of `fallback` (a model name or directory)."""
    from transformers import AutoTokenizer

    if Path(path, "tokenizer_config.json").is_file() or Path(path, "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif fallback is not None:
        return tokenizer_for(_model_dir(fallback))
    else:
        raise UserInputError(f"no tokenizer found in {path}; save one there or pass --model naming the base model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model_dir(name: str) -> str:
    if name == "ref-lm":
        from eval.reference import reference_path

        return str(reference_path("lm"))
    return name
