"""A disk cache of the frozen backbone's hidden states, so epochs after the first run only the
side network.

The backbone never changes during side tuning, so its hidden states for a training batch are
the same every epoch. The first time a batch is seen its states are written to disk; later
passes memory-map them instead of running the backbone.

Layout (one directory per batch, written to a temporary name and renamed into place when
complete: the rename is the completion marker, so a crash never leaves an entry that looks
finished):

    <root>/<backbone key>/seq<S>/<data key>/meta.json     dtype and shapes
                                            states.bin    [N + 1, B, S, d] raw, in the states' dtype
                                            last.bin      [B, S, d_out] (only when the LM head's
                                                          input is not h_N itself)

- backbone key: hash of the backbone's name or path, its quantization, its config and a
  fingerprint of its weights (every tensor's name, dtype, shape and an evenly strided sample of
  up to 4096 of its values: packed NF4 bytes and quantization constants included; see
  `backbone_fingerprint`);
- data key: hash of the batch's input_ids and attention_mask (shape and values);
- S: the sequence length (also part of the data key).
A different backbone, quantization, data or length gives a different key, so a stale entry is
never read. States are stored in their own dtype (bf16 for an NF4 / bf16 backbone, raw uint16
bits on disk), so a cached epoch computes exactly what the backbone would have given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.bnb import cpu_packed, quant_state, quant_state_tensors

FORMAT_VERSION = 1
_SAMPLE = 4096
# torch dtype -> (numpy storage dtype, name); 16-bit floats travel as their raw bits.
_STORAGE = {
    torch.bfloat16: (np.int16, "bfloat16"),
    torch.float16: (np.int16, "float16"),
    torch.float32: (np.float32, "float32"),
}
_BY_NAME = {name: (np_dtype, torch_dtype) for torch_dtype, (np_dtype, name) in _STORAGE.items()}


@dataclasses.dataclass
class BackboneFeatures:
    """What the side network needs from one backbone pass.

    `hidden_states`: h_0 .. h_N, each [B, S, d]; `last`: the LM head's input [B, S, d_out];
    `cache`: the backbone's key/value cache when generating (never stored on disk).
    """

    hidden_states: tuple[torch.Tensor, ...]
    last: torch.Tensor
    cache: Any = None


def default_cache_root() -> Path:
    base = os.environ.get("SLIMTUNE_CACHE") or Path.home() / ".cache" / "slimtune"
    return Path(base) / "qst-features"


def backbone_fingerprint(model: torch.nn.Module, name_or_path: str | None, quantize: str | None) -> str:
    """A hash that changes when the backbone's identity, weights or quantization change.

    Reads parameters and buffers directly, never `state_dict()`: for a 4-bit model on CPU that
    call converts bitsandbytes' CPU weight layout back and re-quantizes the block scales, so it
    would alter the very weights being fingerprinted. The layout is part of the hash, so the same
    weights in the two layouts only cost a cache miss, never a wrong hit.
    """
    h = hashlib.sha256()
    h.update(f"qst-backbone-v{FORMAT_VERSION}|{name_or_path}|{quantize}|".encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    tensors = dict(model.named_buffers())
    for name, p in model.named_parameters():
        tensors[name] = p
        qs = quant_state(p)
        if qs is not None:
            h.update(f"|{name}:cpu-packed={cpu_packed(qs)}".encode())
            for part, t in quant_state_tensors(qs).items():
                tensors[f"{name}.{part}"] = t
    for name, tensor in sorted(tensors.items()):
        h.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(_sample_bytes(tensor))
    return h.hexdigest()[:32]


def _sample_bytes(tensor: torch.Tensor) -> bytes:
    """Up to 4096 evenly strided values of the tensor, as raw bytes."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() > _SAMPLE:
        flat = flat[:: flat.numel() // _SAMPLE][:_SAMPLE]
    return flat.contiguous().cpu().view(torch.uint8).numpy().tobytes()


def data_key(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> str:
    h = hashlib.sha256(f"qst-data-v{FORMAT_VERSION}|{tuple(input_ids.shape)}|".encode())
    h.update(input_ids.detach().to(torch.int64).cpu().contiguous().numpy().tobytes())
    if attention_mask is None:
        h.update(b"|no-mask")
    else:
        h.update(b"|mask|" + attention_mask.detach().to(torch.int64).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


class BackboneFeatureCache:
    """Hidden states of one backbone, per training batch, memory-mapped from `root`."""

    def __init__(self, root: str | os.PathLike, backbone_key: str):
        self.root = Path(root)
        self.backbone_key = backbone_key
        self.hits = 0
        self.misses = 0

    def entry_dir(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Path:
        return self.root / self.backbone_key / f"seq{input_ids.shape[-1]}" / data_key(input_ids, attention_mask)

    def load(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> BackboneFeatures | None:
        """The stored features of this batch (memory-mapped, on CPU), or None on a miss."""
        entry = self.entry_dir(input_ids, attention_mask)
        meta_path = entry / "meta.json"
        if not meta_path.is_file():
            self.misses += 1
            return None
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        states = _read_array(entry / "states.bin", meta["dtype"], meta["states_shape"])
        last = states[-1] if meta["last_shape"] is None else _read_array(entry / "last.bin", meta["dtype"], meta["last_shape"])
        self.hits += 1
        return BackboneFeatures(hidden_states=tuple(states.unbind(0)), last=last)

    def store(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, features: BackboneFeatures) -> None:
        from eval.io import atomic_directory, write_json

        states = features.hidden_states
        dtype = states[0].dtype
        if dtype not in _STORAGE or any(s.dtype != dtype for s in states) or features.last.dtype != dtype:
            raise ValueError(f"the feature cache stores bfloat16, float16 or float32 states, got {dtype}")
        separate_last = not (features.last is states[-1] or torch.equal(features.last, states[-1]))
        states_shape = [len(states), *states[0].shape]
        with atomic_directory(self.entry_dir(input_ids, attention_mask)) as tmp:
            out = _open_array(tmp / "states.bin", dtype, states_shape)
            for i, s in enumerate(states):
                out[i] = _as_numpy(s)
            out.flush()
            del out
            if separate_last:
                out = _open_array(tmp / "last.bin", dtype, list(features.last.shape))
                out[:] = _as_numpy(features.last)
                out.flush()
                del out
            write_json(tmp / "meta.json", {
                "format": FORMAT_VERSION, "dtype": _STORAGE[dtype][1], "states_shape": states_shape,
                "last_shape": list(features.last.shape) if separate_last else None,
            })

    def stats(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "root": str(self.root / self.backbone_key)}


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy() if t.dtype in (torch.bfloat16, torch.float16) else t.numpy()


def _open_array(path: Path, dtype: torch.dtype, shape: list[int]) -> np.memmap:
    return np.memmap(path, dtype=_STORAGE[dtype][0], mode="w+", shape=tuple(shape))


def _read_array(path: Path, dtype_name: str, shape: list[int]) -> torch.Tensor:
    np_dtype, torch_dtype = _BY_NAME[dtype_name]
    expected, size = int(np.prod(shape)) * np.dtype(np_dtype).itemsize, path.stat().st_size if path.is_file() else 0
    if size != expected:
        from eval.errors import UserInputError

        raise UserInputError(f"feature-cache entry {path} is truncated or missing ({size} of {expected} bytes); "
                             f"delete {path.parent} and rerun to rebuild it")
    # mode "c" (copy-on-write) gives a writable view, so torch does not warn; nothing is copied
    # until the side network reads the values.
    array = np.memmap(path, dtype=np_dtype, mode="c", shape=tuple(shape))
    tensor = torch.from_numpy(array)
    return tensor.view(torch_dtype) if np_dtype is np.int16 else tensor
