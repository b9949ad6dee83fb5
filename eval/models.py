"""Loading models: pretrained causal LMs and image classifiers, and random-weight models by architecture.

Three entry points:

- `load_causal_lm(name_or_path, quantize=None | "nf4", ...)`: any local directory or hub id that
  transformers can open as a causal LM (Llama, OPT, Mistral, Qwen2, Phi, GPT-NeoX, GPT-2), or
  `"ref-lm"` for the reference model built here. Returns `(model, tokenizer)`.
- `load_image_classifier(name_or_path, ...)`: ViT, DeiT, Swin, ... or `"ref-vit"`.
  Returns `(model, image_processor)`.
- `build_model_from_arch(arch, ...)`: a model with random weights from a named architecture
  (`ARCHITECTURES`: the published Llama-2 and OPT sizes and tiny test sizes) for memory and
  speed work where weights do not matter.

Everything is offline first: a name that is neither a local directory nor in the local hub
cache raises `UserInputError` saying what was tried and how to provide the model.

Default dtypes (`dtype=None`): float32, except with `quantize="nf4"`, where the model computes
in, and the parts that stay unquantized (embeddings, norms, `lm_head`) are, bfloat16 as in QLoRA,
on CUDA and on CPUs with bf16 hardware; float32 on other CPUs (`eval.bnb.compute_dtype`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eval.bnb import (
    avoid_bnb_cpu_repacking_failure,
    check_bitsandbytes_cuda,
    compute_dtype,
    is_4bit_linear,
    mark_loaded_in_nf4,
    nf4_bytes_per_weight,
    nf4_config,
    replace_linears_with_nf4,
    set_random_nf4_weight,
)
from eval.errors import UserInputError, require_positive
from eval.measure import available_memory_bytes

QUANTIZE_CHOICES = (None, "nf4")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REFERENCE_NAMES = {"ref-lm": "lm", "ref-vit": "vit"}

# ---------------------------------------------------------------------------------------------
# Named architectures (config kwargs only; weights are random)
# ---------------------------------------------------------------------------------------------

_LLAMA2_COMMON = dict(
    model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
    hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
_OPT_COMMON = dict(
    model_type="opt", vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=True,
    activation_function="relu", tie_word_embeddings=True, bos_token_id=2, eos_token_id=2, pad_token_id=1,
)
_TINY_LLAMA = dict(
    model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)



def _llama2_shaped(hidden: int, layers: int, vocab_size: int = 32000) -> dict[str, Any]:
    """A LLaMA-2-proportioned model of another size: head dim 64, MLP width 8/3 x hidden rounded
    up to a multiple of 64 (LLaMA's SwiGLU sizing; 7B's 11008 is 2.6875 x 4096), LLaMA's vocabulary."""
    return {**_LLAMA2_COMMON, "vocab_size": vocab_size, "hidden_size": hidden,
            "intermediate_size": 64 * -(-8 * hidden // (3 * 64)), "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64}


# LLaMA shapes from the reference model's size (ref-lm v2: hidden 128, 4 layers, MLP 344, vocab
# 4096, 1.84 M parameters) to 941 M: `slimtune bench --scaling` runs them with random weights
# (about 35 minutes on 2 CPU cores, the largest size 20 of them).
SCALING_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama-h128-l4": {**_llama2_shaped(128, 4, vocab_size=4096), "intermediate_size": 344,
                      "num_attention_heads": 4, "num_key_value_heads": 4},
    **{f"llama-h{h}-l{n}": _llama2_shaped(h, n) for h, n in ((256, 8), (512, 8), (768, 12), (1024, 16), (2048, 16))},
}

# The published dimensions of each model (Llama 2 paper, Table/config files; OPT paper, Table 1).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama-2-7b": {**_LLAMA2_COMMON, "hidden_size": 4096, "intermediate_size": 11008,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-2-13b": {**_LLAMA2_COMMON, "hidden_size": 5120, "intermediate_size": 13824,
                    "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama-2-70b": {**_LLAMA2_COMMON, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
    "opt-1.3b": {**_OPT_COMMON, "hidden_size": 2048, "ffn_dim": 8192, "num_hidden_layers": 24,
                 "num_attention_heads": 32, "word_embed_proj_dim": 2048},
    "opt-6.7b": {**_OPT_COMMON, "hidden_size": 4096, "ffn_dim": 16384, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "word_embed_proj_dim": 4096},
    "tiny-llama": dict(_TINY_LLAMA),
    "tiny-llama-gqa": {**_TINY_LLAMA, "num_key_value_heads": 2},
    "tiny-opt": {**_OPT_COMMON, "vocab_size": 512, "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "max_position_embeddings": 256, "word_embed_proj_dim": 64},
    **SCALING_ARCHITECTURES,
}


def _arch_kwargs(arch: str) -> dict[str, Any]:
    if arch not in ARCHITECTURES:
        raise UserInputError(f"unknown architecture {arch!r}; expected one of: {', '.join(ARCHITECTURES)}")
    return copy.deepcopy(ARCHITECTURES[arch])


def architecture_config(arch: str, vocab_size: int | None = None):
    """The transformers `PretrainedConfig` of a named architecture (a fresh object each call)."""
    from transformers import AutoConfig

    kwargs = _arch_kwargs(arch)
    if vocab_size is not None:
        require_positive("vocab_size", vocab_size)
        kwargs["vocab_size"] = vocab_size
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **kwargs)


def _as_config(arch_or_config):
    return architecture_config(arch_or_config) if isinstance(arch_or_config, str) else arch_or_config


def param_count_of_arch(arch_or_config) -> int:
    """Number of parameters of an architecture, computed from its config (nothing is built).

    Closed form for the Llama family (llama, mistral, qwen2: no biases except qwen2's q/k/v)
    and OPT; any other model type is counted on an empty (meta-device) model.
    """
    c = _as_config(arch_or_config)
    if c.model_type in ("llama", "mistral", "qwen2"):
        h, inter, n_layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
        head_dim = getattr(c, "head_dim", None) or h // c.num_attention_heads
        q_dim = c.num_attention_heads * head_dim
        kv_dim = (c.num_key_value_heads or c.num_attention_heads) * head_dim
        attn_bias = c.model_type == "qwen2" or getattr(c, "attention_bias", False)
        attention = h * q_dim + 2 * h * kv_dim + q_dim * h + ((q_dim + 2 * kv_dim) if attn_bias else 0)
        attention += h if getattr(c, "attention_bias", False) else 0  # o_proj bias (llama only)
        mlp = 3 * h * inter + (2 * inter + h if getattr(c, "mlp_bias", False) else 0)
        per_layer = attention + mlp + 2 * h  # two RMSNorm weights
        lm_head = 0 if c.tie_word_embeddings else vocab * h
        return vocab * h + n_layers * per_layer + h + lm_head
    if c.model_type == "opt":
        h, ffn, n_layers, vocab = c.hidden_size, c.ffn_dim, c.num_hidden_layers, c.vocab_size
        proj = c.word_embed_proj_dim
        embeddings = vocab * proj + (c.max_position_embeddings + 2) * h  # OPT offsets positions by 2
        if proj != h:
            embeddings += 2 * proj * h  # project_in / project_out, no bias
        per_layer = 4 * (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 2 * 2 * h  # attn, fc1, fc2, 2 LayerNorms
        final_norm = 2 * h if c.do_layer_norm_before and not getattr(c, "_remove_final_layer_norm", False) else 0
        lm_head = 0 if c.tie_word_embeddings else vocab * proj
        return embeddings + n_layers * per_layer + final_norm + lm_head
    return sum(p.numel() for p in _empty_model(c, torch.float32).parameters())


def param_breakdown_of_arch(arch_or_config) -> dict[str, int]:
    """Parameter counts by what 4-bit quantization does to them, from an empty (meta) model.

    Keys: `quantizable` (weights of the `nn.Linear` layers that NF4 replaces: all but the
    output head), `linear_bias` (their biases, kept in full precision), `embedding`
    (input embeddings, and output head if tied), `lm_head` (untied output head),
    `other` (norms and anything else), `total`.
    """
    c = _as_config(arch_or_config)
    model = _empty_model(c, torch.float32)
    head = model.get_output_embeddings()
    counts = dict.fromkeys(["quantizable", "linear_bias", "embedding", "lm_head", "other"], 0)
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # tied weights count once
            seen.add(id(p))
            if module is head:
                counts["lm_head"] += p.numel()
            elif isinstance(module, nn.Embedding):
                counts["embedding"] += p.numel()
            elif isinstance(module, nn.Linear):
                counts["quantizable" if name == "weight" else "linear_bias"] += p.numel()
            else:
                counts["other"] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the loaders
# ---------------------------------------------------------------------------------------------


def _check_quantize(quantize) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise UserInputError(f"quantize={quantize!r} is not supported; expected None (full precision) or 'nf4'")


def float_dtype_name(dtype: str, device) -> str:
    """`dtype` unless it is "auto": then bfloat16 on CUDA, float32 elsewhere (the 16-bit default of
    benchmarks with random weights; CPUs multiply float32 fastest)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def _resolve_dtype(dtype, default: torch.dtype) -> torch.dtype | str:
    """torch.dtype, 'float32' / 'bfloat16' / 'float16', 'auto' (the checkpoint's dtype) or None (default)."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise UserInputError(f"dtype={dtype} is not supported; expected one of float32, bfloat16, float16, auto")
        return dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name == "auto":
            return "auto"
        if name in _DTYPES:
            return _DTYPES[name]
    raise UserInputError(f"dtype={dtype!r} is not supported; expected one of float32, bfloat16, float16, auto")


def resolve_device(device, four_bit: bool = False) -> torch.device:
    """The one check of a device name: 'cpu', 'cuda' or 'cuda:N' that exists here.

    `four_bit`: the caller will build NF4 layers, so on CUDA bitsandbytes and its CUDA library
    must be there too (`check_bitsandbytes_cuda`); on CPU bitsandbytes' own CPU path is used.
    Raises `UserInputError` saying what is missing and how to provide it.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserInputError(f"device={device!r} is not a device; expected 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
        raise UserInputError(
            f"device={device!r} was asked for but CUDA is not available here: {why}; use device='cpu', or run "
            "on a machine with an NVIDIA GPU and a CUDA build of torch (TORCH_SPEC=torch bash setup.sh)"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserInputError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if four_bit and dev.type == "cuda":
        check_bitsandbytes_cuda()
    return dev


# ---------------------------------------------------------------------------------------------
# Finding a model: local directory, reference model, or the local hub cache
# ---------------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or env.strip().lower() in {"1", "true", "yes", "on"}


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def _how_to_provide(name: str) -> str:
    return (
        f"To provide it: on a machine with internet run `huggingface-cli download {name} --local-dir DIR` "
        f"(or `hf download {name} --local-dir DIR`), copy DIR here and pass that directory; "
        "or point HF_HOME / HF_HUB_CACHE at a hub cache that already holds it"
    )


def _resolve_model_source(name_or_path, what: str) -> tuple[str, dict[str, Any]]:
    """Return (path or hub id, extra from_pretrained kwargs) or raise UserInputError.

    A reference name builds/reuses the reference model; an existing path must be a model
    directory (with config.json); anything else must be a hub id in the local hub cache (or,
    when the hub is not offline, downloadable).
    """
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise UserInputError(f"{what}: expected a local model directory or a hub id, got {name_or_path!r}")
    if name_or_path in _REFERENCE_NAMES:
        # lazy: building the reference model pulls in training code
        from eval.reference import reference_path

        return str(reference_path(_REFERENCE_NAMES[name_or_path])), {}
    local = Path(name_or_path).expanduser()
    if local.exists():
        _check_model_dir(local, what)
        return str(local), {}
    tried = [f"local path {local.resolve()} (does not exist)"]
    if _is_hub_id(name_or_path):
        found = _find_on_hub(name_or_path, tried)
        if found is not None:
            return found
        how = _how_to_provide(name_or_path)
    else:
        how = ("Expected an existing model directory (written by save_pretrained: config.json + weights) "
               "or a hub id such as 'meta-llama/Llama-2-7b-hf' that is in the local hub cache")
    raise UserInputError(f"{what}: model {name_or_path!r} not found. Tried: {'; '.join(tried)}. {how}")


def _check_model_dir(local: Path, what: str) -> None:
    if not local.is_dir():
        raise UserInputError(f"{what}: {local} is a file; expected a model directory holding config.json and weights")
    if not (local / "config.json").is_file():
        raise UserInputError(
            f"{what}: {local} is a directory but holds no config.json, so it is not a transformers model "
            "directory; expected the folder written by save_pretrained (config.json + *.safetensors)"
        )


def _is_hub_id(name: str) -> bool:
    """'gpt2' or 'org/name' with the hub's allowed characters; anything else was meant as a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") > 1 or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _find_on_hub(repo_id: str, tried: list[str]) -> tuple[str, dict[str, Any]] | None:
    """The hub id with from_pretrained kwargs if it is cached (or downloadable online); else None,
    with what was tried appended to `tried`."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = _hub_cache_dir()
    if isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir), str):
        return repo_id, {"cache_dir": cache_dir, "local_files_only": _hub_offline()}
    tried.append(f"hub cache {cache_dir} (no cached copy of {repo_id!r})")
    if _hub_offline():
        tried.append("the Hugging Face hub (not asked: offline, HF_HUB_OFFLINE=1)")
        return None
    from transformers import AutoConfig

    try:  # online: transformers downloads it into the cache
        AutoConfig.from_pretrained(repo_id, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - any hub failure means "not available"
        tried.append(f"the Hugging Face hub ({type(e).__name__}: {_first_line(e)[:160]})")
        return None
    return repo_id, {"cache_dir": cache_dir}


def _load_config(source: str, extra: dict[str, Any], trust_remote_code: bool, what: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except Exception as e:  # noqa: BLE001 - a broken config.json or an unknown model type
        raise UserInputError(f"{what}: could not read the model config of {source!r}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _device_map(device: torch.device) -> dict[str, Any]:
    # Load straight onto the device (no full copy on the CPU first).
    return {"": str(device) if device.type != "cuda" or device.index is not None else "cuda:0"}


# ---------------------------------------------------------------------------------------------
# Pretrained loaders
# ---------------------------------------------------------------------------------------------


def load_causal_lm(name_or_path, quantize=None, dtype=None, device="cpu", trust_remote_code=False):
    """Load a causal LM and its tokenizer, in eval mode.

    `quantize="nf4"`: every `nn.Linear` except the output head becomes a bitsandbytes
    `Linear4bit` (NF4, double quantization), as in QLoRA; it computes in, and the unquantized
    parts use, `dtype` (default `eval.bnb.compute_dtype(device)`: bfloat16 as in QLoRA on CUDA and
    on CPUs with bf16 hardware, else float32). Without quantization `dtype` defaults to float32;
    `"auto"` keeps the checkpoint's dtype. The tokenizer gets a pad token (its EOS) if it has none.
    """
    what = "load_causal_lm"
    _check_quantize(quantize)
    dev = resolve_device(device, four_bit=quantize == "nf4")
    resolved_dtype = _resolve_dtype(dtype, compute_dtype(dev) if quantize == "nf4" else torch.float32)
    source, extra = _resolve_model_source(name_or_path, what)
    config = _load_config(source, extra, trust_remote_code, what)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if type(config) not in AutoModelForCausalLM._model_mapping and not trust_remote_code:
        raise UserInputError(
            f"{what}: {source!r} is a {config.model_type!r} model, which transformers cannot load as a causal "
            "language model; expected a decoder LM such as Llama, OPT, Mistral, Qwen2, Phi, GPT-NeoX or GPT-2"
        )
    # The tokenizer first: it is cheap, and a missing one should not wait for gigabytes of weights.
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except Exception as e:  # noqa: BLE001
        raise UserInputError(
            f"{what}: could not load a tokenizer from {source!r} ({_first_line(e)}); expected tokenizer files "
            "(tokenizer.json or tokenizer.model + tokenizer_config.json) next to the model, as save_pretrained writes them"
        ) from e
    _verify_weight_files(source, what)
    kwargs: dict[str, Any] = dict(dtype=resolved_dtype, trust_remote_code=trust_remote_code, **extra)
    if quantize == "nf4":
        # The unquantized parts' dtype is also the one the 4-bit matmuls compute in ("auto": the default).
        kwargs["quantization_config"] = nf4_config(dev, resolved_dtype if isinstance(resolved_dtype, torch.dtype) else None)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, device_map=_device_map(dev),
                                                           output_loading_info=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - missing/corrupt weight files
        raise UserInputError(f"{what}: could not load the weights of {source!r}: {_first_line(e)}") from e
    _check_loading_info(info, source, what)
    _ensure_pad_token(model, tokenizer)
    if quantize == "nf4":
        avoid_bnb_cpu_repacking_failure(model)
    model.eval()
    return model, tokenizer


def _verify_weight_files(source: str, what: str) -> None:
    """A truncated safetensors file in a local model directory is an error naming that file."""
    from eval.io import verify_safetensors

    if Path(source).is_dir():
        for path in sorted(Path(source).glob("*.safetensors")):
            verify_safetensors(path, f"{what}: weights file")


def _check_loading_info(info: dict, source: str, what: str) -> None:
    """Strict loading: a weight the config expects but the files lack (transformers would leave it
    randomly initialised), an extra one, or one of another shape is an error naming them."""
    from eval.io import loading_mismatch_message

    mismatched = [f"{m[0]} {tuple(m[1])} vs {tuple(m[2])}" if isinstance(m, (tuple, list)) and len(m) == 3 else str(m)
                  for m in info.get("mismatched_keys") or []]
    missing, unexpected = list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or [])
    errors = list(info.get("error_msgs") or [])
    if missing or unexpected or mismatched:
        raise UserInputError(f"{what}: " + loading_mismatch_message(f"{source!r}", "the weights of", sorted(missing),
                                                                    sorted(unexpected), mismatched))
    if errors:
        raise UserInputError(f"{what}: could not load the weights of {source!r}: {str(errors[0]).splitlines()[0]}")


def _ensure_pad_token(model, tokenizer) -> None:
    """Batched scoring pads; many LM tokenizers (Llama, GPT-2, OPT's is fine) ship without a pad token."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is not None:
            tokenizer.pad_token = fallback
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_image_classifier(name_or_path, dtype=None, device="cpu"):
    """Load an image-classification model (ViT, DeiT, Swin, ...) and its image processor, in eval mode."""
    what = "load_image_classifier"
    resolved_dtype = _resolve_dtype(dtype, torch.float32)
    dev = resolve_device(device)
    source, extra = _resolve_model_source(name_or_path, what)
    config = _load_config(source, extra, False, what)

    from transformers import AutoImageProcessor, AutoModelForImageClassification

    if type(config) not in AutoModelForImageClassification._model_mapping:
        raise UserInputError(
            f"{what}: {source!r} is a {config.model_type!r} model, which transformers cannot load as an image "
            "classifier; expected e.g. ViT, DeiT or Swin"
        )
    _verify_weight_files(source, what)
    try:
        model, info = AutoModelForImageClassification.from_pretrained(
            source, dtype=resolved_dtype, output_loading_info=True, **extra)
    except Exception as e:  # noqa: BLE001
        raise UserInputError(f"{what}: could not load the weights of {source!r}: {_first_line(e)}") from e
    _check_loading_info(info, source, what)
    model = model.to(dev)
    try:
        processor = AutoImageProcessor.from_pretrained(source, **extra)
    except Exception as e:  # noqa: BLE001
        raise UserInputError(
            f"{what}: could not load an image processor from {source!r} ({_first_line(e)}); expected "
            "preprocessor_config.json next to the model, as image_processor.save_pretrained writes it"
        ) from e
    model.eval()
    return model, processor


# ---------------------------------------------------------------------------------------------
# Random-weight models from a named architecture
# ---------------------------------------------------------------------------------------------


def _empty_model(config, dtype: torch.dtype):
    """The model with every parameter on the meta device (shapes only, no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # small buffers (rotary inv_freq) stay real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # on meta the output head is not tied by construction (OPT)
    return model


def _check_fits(arch: str, config, dtype: torch.dtype, device: torch.device, quantize) -> None:
    """Refuse up front (instead of being killed by the OOM killer) when the model cannot fit."""
    counts = param_breakdown_of_arch(config)
    elem = torch.empty((), dtype=dtype).element_size()
    if quantize == "nf4":
        need = counts["quantizable"] * nf4_bytes_per_weight() + (counts["total"] - counts["quantizable"]) * elem
    else:
        need = counts["total"] * elem
    have = available_memory_bytes(device)
    if have is not None and need > 0.9 * have:
        options = ["device='meta' (shapes only)"]
        if quantize is None:
            options.append("quantize='nf4'")
        if dtype == torch.float32:
            options.append("dtype='bfloat16'")
        raise UserInputError(
            f"{arch} ({counts['total'] / 1e9:.2f}B parameters) needs about {need / 2**30:.1f} GiB on {device} "
            f"with dtype={str(dtype).removeprefix('torch.')}, quantize={quantize!r}, but only {have / 2**30:.1f} GiB "
            f"is available; use {', '.join(options)}, or a device with more memory"
        )


def build_model_from_arch(arch: str, dtype=None, device="cpu", quantize=None, vocab_size=None):
    """A causal LM of a named architecture with random weights (for memory and speed work only).

    Modes:
    - `device="meta"`: shapes only; every parameter on the meta device, nothing allocated
      (any size, instant). Use for parameter counts and shape inspection.
    - `quantize=None`: built directly on `device` in `dtype` (default float32) with
      transformers' own random initialisation; never a float32 copy when `dtype` is smaller.
    - `quantize="nf4"`: built empty, every `nn.Linear` except the output head replaced by a
      bitsandbytes `Linear4bit` (NF4, double quantization, the same modules
      `load_causal_lm(..., quantize="nf4")` quantizes), then filled one layer at a time: a
      random bf16 weight is drawn on the device and quantized at once, so the peak is the
      4-bit model plus one layer's weight. It computes in, and unquantized parts use, `dtype`
      (default `eval.bnb.compute_dtype(device)`, as `load_causal_lm`).
    In both real modes the build is refused with `UserInputError` if the estimated size does
    not fit the device's free memory (llama-2-70b is ~138 GB in bf16, ~37 GB in NF4).
    """
    _check_quantize(quantize)
    config = architecture_config(arch, vocab_size=vocab_size)
    is_meta = device == "meta" or (isinstance(device, torch.device) and device.type == "meta")
    four_bit_default = compute_dtype("cpu" if is_meta else device) if quantize == "nf4" else torch.float32
    resolved = _resolve_dtype(dtype, four_bit_default)
    if resolved == "auto":
        raise UserInputError("dtype='auto' means the checkpoint's dtype, but a random model has no checkpoint; pass float32, bfloat16 or float16")
    if is_meta:
        if quantize is not None:
            raise UserInputError("quantize='nf4' needs real weights to quantize; with device='meta' use quantize=None")
        return _empty_model(config, resolved).eval()
    dev = resolve_device(device, four_bit=quantize == "nf4")
    _check_fits(arch, config, resolved, dev, quantize)
    if quantize == "nf4":
        return _build_nf4(config, resolved, dev).eval()

    from transformers import AutoModelForCausalLM

    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=resolved)
    return model.eval()


def _build_nf4(config, dtype: torch.dtype, device: torch.device):
    quant_config = nf4_config(device, dtype)
    model = replace_linears_with_nf4(_empty_model(config, dtype), quant_config)
    std = getattr(config, "initializer_range", 0.02)

    for module in model.modules():
        if is_4bit_linear(module):
            set_random_nf4_weight(module, std, device, quant_config)  # [out, in], quantized on the device
            if module.bias is not None:
                module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=dtype, device=device))
            continue
        for name, p in list(module.named_parameters(recurse=False)):
            if p.device.type != "meta":
                continue
            module._parameters[name] = nn.Parameter(_random_like(module, name, p, dtype, device, std), requires_grad=p.requires_grad)
    model.tie_weights()  # tied heads (OPT) point at the materialised embedding again
    mark_loaded_in_nf4(model, quant_config)
    return model


def _random_like(module: nn.Module, name: str, p: torch.Tensor, dtype, device, std: float) -> torch.Tensor:
    """Initialise one parameter the way transformers does for these layer types."""
    t = torch.empty(p.shape, dtype=dtype, device=device)
    if isinstance(module, (nn.Linear, nn.Embedding)) and name == "weight":
        t.normal_(0, std)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            t[module.padding_idx].zero_()
    elif name == "weight" and t.dim() == 1:  # LayerNorm / RMSNorm scale
        t.fill_(1.0)
    else:
        t.zero_()
    return t


__all__ = [
    "ARCHITECTURES",
    "QUANTIZE_CHOICES",
    "architecture_config",
    "avoid_bnb_cpu_repacking_failure",
    "build_model_from_arch",
    "check_bitsandbytes_cuda",
    "load_causal_lm",
    "load_image_classifier",
    "nf4_bytes_per_weight",
    "param_breakdown_of_arch",
    "param_count_of_arch",
    "resolve_device",
]
