"""Everything that knows bitsandbytes: its NF4 settings and storage, the quantization state of its
4-bit weights, dequantisation, its CUDA library, and the workaround for its CPU repacking.

The loaders (`eval.models`), the measurements (`eval.measure`, `eval.memory_estimate`) and QST
(its feature cache fingerprint and pruned side initialisation) call these, so no other module
reads bitsandbytes' internals; PEFT keeps `tuners/lora/bnb.py` apart from its layers the same way.

bitsandbytes and torch are imported where used: `eval.measure` imports this module and stays
cheap to import in a fresh worker process.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from eval.errors import UserInputError

if TYPE_CHECKING:
    import torch
    from torch import nn

# How to get bitsandbytes onto a machine without network (scripts/gpu_check.sh, README "GPUs").
HOW_TO_PROVIDE = (
    "on a machine with network run `bash scripts/gpu_check.sh --prepare-wheels` (it writes a "
    "bitsandbytes wheel holding the CUDA 13 library to build/gpu-wheels/) and carry that folder "
    "here, then run scripts/gpu_check.sh (it installs the wheel); or `pip install bitsandbytes` "
    "where there is network"
)


# ---------------------------------------------------------------------------------------------
# NF4: the settings, their storage cost, and models built or loaded with them


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX-BF16, Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16"))


def compute_dtype_name(device="cpu") -> str:
    """The dtype a 4-bit backbone computes in, and keeps its unquantized parts in, on `device`.

    bfloat16 as in QLoRA on CUDA and on CPUs with bf16 hardware. Elsewhere float32: without it
    torch multiplies bf16 through a slow generic path (measured on an AVX2 EPYC: a [2048, 128] x
    [128, 4096] product 5.4 s in bf16 against 0.07 s in fp32, and a QLoRA step of ref-lm 8 s against
    0.9 s), which would make every 4-bit method look many times slower than it is.
    """
    import torch

    device = torch.device(device)
    if device.type == "cpu" and not cpu_has_native_bf16():
        return "float32"
    return "bfloat16"


def compute_dtype(device="cpu") -> torch.dtype:
    import torch

    return getattr(torch, compute_dtype_name(device))


def nf4_config(device="cpu", dtype=None):
    """QLoRA's NF4: 4-bit NormalFloat, double quantization, computing in `dtype` (a torch float
    dtype; None: `compute_dtype(device)`)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype if dtype is not None else compute_dtype(device),
    )


def nf4_bytes_per_weight() -> float:
    """Bytes per NF4 weight with double quantization: 4 bits + an 8-bit absmax per 64 weights,
    whose fp32 scale is shared by 256 absmax values (QLoRA: 4 + 8/64 + 32/(64*256) bits)."""
    return (4 + 8 / 64 + 32 / (64 * 256)) / 8


def quantization_of(model: nn.Module) -> str | None:
    """The bitsandbytes quantization a loaded transformers model uses: its 4-bit type ("nf4",
    "fp4"), "int8", or None."""
    if getattr(model, "is_loaded_in_4bit", False):
        qc = getattr(model.config, "quantization_config", None)
        qtype = qc.get("bnb_4bit_quant_type") if isinstance(qc, dict) else getattr(qc, "bnb_4bit_quant_type", None)
        return str(qtype or "nf4")
    if getattr(model, "is_loaded_in_8bit", False):
        return "int8"
    return None


def replace_linears_with_nf4(model: nn.Module, quant_config) -> nn.Module:
    """Every `nn.Linear` of an empty (meta) model becomes an empty NF4 `Linear4bit`, except the
    modules `from_pretrained` keeps in full precision (the output head, tied weights)."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    keep = get_keys_to_not_convert(model)
    return replace_with_bnb_linear(model, modules_to_not_convert=keep, quantization_config=quant_config)


def is_4bit_linear(module: nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


def set_random_nf4_weight(module: nn.Module, std: float, device: torch.device, quant_config) -> None:
    """Give an empty `Linear4bit` a random N(0, std) weight, quantized to NF4 as soon as it is drawn
    on `device` (so only one layer's 16-bit weight exists at a time)."""
    import bitsandbytes as bnb
    import torch

    w = torch.empty(module.out_features, module.in_features, dtype=torch.bfloat16, device=device).normal_(0, std)
    module.weight = bnb.nn.Params4bit(
        w, requires_grad=False, quant_type="nf4", compress_statistics=True,
        quant_storage=quant_config.bnb_4bit_quant_storage, module=module,
    ).to(device)


def mark_loaded_in_nf4(model: nn.Module, quant_config) -> None:
    """Record on a model quantized by hand what `from_pretrained` records on a loaded one."""
    model.is_loaded_in_4bit = True
    model.config.quantization_config = quant_config
    avoid_bnb_cpu_repacking_failure(model)


def avoid_bnb_cpu_repacking_failure(model: nn.Module) -> None:
    """Keep NF4 layers that bitsandbytes 0.50 cannot repack for its CPU kernel on the generic path.

    On a CPU with AVX512-BF16, `Linear4bit` repacks its weight on the first inference-mode
    forward; that repacking fails (AssertionError / RuntimeError from inside bitsandbytes) unless
    out_features is a multiple of 32 and in_features a multiple of the quantization block (64).
    Such layers keep the generic 4-bit path: same weights, same result, no repacking.
    """
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        block = getattr(getattr(module.weight, "quant_state", None), "blocksize", None) or 64
        if module.out_features % 32 or module.in_features % block:
            module.support_avx512bf16_for_cpu = False


# ---------------------------------------------------------------------------------------------
# 4-bit weights: quantization state, logical size, dequantisation


def quant_state(p: torch.Tensor):
    """The QuantState of a quantized 4-bit parameter (it carries the logical `.shape`), else None."""
    qs = getattr(p, "quant_state", None)
    return qs if qs is not None and hasattr(qs, "shape") else None


def quant_state_tensors(qs, suffix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor a QuantState holds, by name: absmax, code, offset, and the nested
    (double-quantization) state's as absmax2, code2."""
    import torch

    tensors = {}
    for key, value in vars(qs).items():
        if isinstance(value, torch.Tensor):
            tensors[key + suffix] = value
        elif value is not None and hasattr(value, "absmax"):  # the nested QuantState (state2)
            tensors.update(quant_state_tensors(value, suffix + "2"))
    return tensors


def cpu_packed(qs) -> bool:
    """Whether bitsandbytes has repacked this weight for its CPU kernel (it does so on the first
    inference pass); the packed bytes then no longer follow the QuantState's layout."""
    return bool(getattr(qs, "packing_format_for_cpu", False))


def logical_numel(p: torch.Tensor) -> int:
    """Elements of a parameter; a packed 4-bit tensor holds two per byte, its QuantState knows the shape."""
    qs = quant_state(p)
    return math.prod(qs.shape) if qs is not None else p.numel()


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight in float32 [out, in]; 4-bit weights are dequantized (one layer at a time)."""
    weight = module.weight
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        return weight.detach().float()
    if not cpu_packed(qs):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, qs).float()
    # The CPU-packed layout has no dequantize; read it back through the layer itself: row i of
    # W^T is the layer applied to e_i.
    return _weight_by_probing(module).float()


def _weight_by_probing(module: nn.Module, chunk: int = 1024) -> torch.Tensor:
    import torch

    in_features = module.in_features
    dtype = getattr(module, "compute_dtype", None) or torch.bfloat16
    device = module.weight.device
    columns = []
    with torch.no_grad():
        for start in range(0, in_features, chunk):
            eye = torch.eye(in_features, dtype=dtype, device=device)[start:start + chunk]
            out = module(eye).float()
            if getattr(module, "bias", None) is not None:
                out = out - module.bias.float()
            columns.append(out)
    return torch.cat(columns).T.contiguous()  # [out, in]


# ---------------------------------------------------------------------------------------------
# Which kernels run here


def check_bitsandbytes_cuda(cuda_version: str | None = None, package_dir: Path | None = None) -> Path:
    """The bitsandbytes CUDA library this torch will load; `UserInputError` if there is none.

    bitsandbytes picks `libbitsandbytes_cuda<MAJOR><MINOR>.so` for torch's CUDA version, or the
    nearest one of the same major version. `cuda_version` (default `torch.version.cuda`) and
    `package_dir` (default the installed bitsandbytes) are parameters so the check can be tested.
    """
    import torch

    cuda_version = cuda_version or torch.version.cuda
    if cuda_version is None:
        raise UserInputError("bitsandbytes' CUDA kernels need a CUDA build of torch; this one is CPU-only")
    if package_dir is None:
        try:
            import bitsandbytes
        except ImportError as e:
            raise UserInputError(
                f"bitsandbytes is not installed (import failed: {e}); the 4-bit methods (qlora, qst) need it "
                f"on CUDA. To provide it: {HOW_TO_PROVIDE}"
            ) from e
        package_dir = Path(bitsandbytes.__file__).parent
    major = cuda_version.split(".")[0]
    found = sorted(Path(package_dir).glob(f"libbitsandbytes_cuda{major}[0-9]*.so"))
    if not found:
        present = sorted(p.name for p in Path(package_dir).glob("libbitsandbytes_*.so")) or ["none"]
        raise UserInputError(
            f"bitsandbytes in {package_dir} has no CUDA {major}.x library (torch uses CUDA {cuda_version}; "
            f"expected libbitsandbytes_cuda{major}*.so, found: {', '.join(present)}). "
            f"To provide it: {HOW_TO_PROVIDE}"
        )
    return found[-1]


def kernel_path() -> str | None:
    """Which bitsandbytes kernels run 4-bit layers here, as far as can be told without a model:
    CUDA; on CPU the AVX512-BF16 kernel (inference forwards, weights repacked), the native CPU
    library (dequantize, then a torch matmul), or its pure-torch fallback. None without bitsandbytes."""
    import torch

    try:
        import bitsandbytes as bnb
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
        from bitsandbytes.functional import has_avx512bf16
    except Exception:  # not installed, or it failed to load: reports still get written
        return None
    version = getattr(bnb, "__version__", "?")
    if torch.cuda.is_available():
        return f"bitsandbytes {version}: CUDA kernels"
    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        return f"bitsandbytes {version}: pure-torch CPU fallback (native library not loaded)"
    if has_avx512bf16():
        return f"bitsandbytes {version}: AVX512-BF16 CPU kernel (inference), native CPU dequantize (training)"
    return f"bitsandbytes {version}: native CPU dequantize + torch matmul (no AVX512-BF16 kernel)"

