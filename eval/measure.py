"""Measuring models and runs: parameter counts and bytes, step time, peak memory.

How peak memory is measured (DESIGN.md, "Measurement"):
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`: the peak of all
  tensors allocated on the device, weights included.
- CPU: each configuration runs in a fresh Python process (`run_in_fresh_process`); the
  number is its peak resident set size after set-up minus its resident set size when set-up
  ended (`mark_setup_done()`), so that model-loading transients and the interpreter/library
  baseline are not counted. The peak is read from the kernel's high-water mark `VmHWM`,
  reset at the end of set-up by writing 5 to `/proc/self/clear_refs` (Linux), and from a
  background thread sampling RSS every 2 ms (the only source where the reset is unavailable;
  a sampled peak can miss a spike shorter than the interval). The larger of the two is used.

Usage:

    n = count_parameters(model)                       # 4-bit weights counted as elements
    b = parameter_bytes(model)                        # real storage, 4-bit packing + quant state
    t = median_step_time(lambda: step(batch))         # seconds, after 2 warm-up calls
    r = run_in_fresh_process("my.module:measure_qst", {"rank": 16})
    r["peak_memory_bytes"], r["error"] if "error" in r

A target for `run_in_fresh_process` is a module-level function taking JSON-able keyword
arguments and returning a JSON-able dict; it calls `eval.measure.mark_setup_done()` once its
set-up (model loading, data) is finished and the measured work starts.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.bnb import (
    compute_dtype_name,
    kernel_path,
    logical_numel,
    quant_state,
    quant_state_tensors,
)
from eval.errors import UserInputError

if TYPE_CHECKING:  # torch is imported where used, so a fresh worker process starts fast
    import torch
    from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Parameters


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once); a 4-bit weight counts its logical elements."""
    return sum(logical_numel(p) for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of storage the parameters really occupy.

    4-bit weights count their packed size plus their quantization state (per-block absmax,
    the code table, the double-quantization state); storage shared by several tensors (tied
    weights, a code table shared between layers) is counted once. Buffers are not counted.
    """
    storages: dict[tuple[str, int], int] = {}

    def add(t: torch.Tensor) -> None:
        if t.device.type == "meta":
            storages[("meta", id(t))] = t.numel() * t.element_size()
            return
        storage = t.untyped_storage()
        storages[(str(t.device), storage.data_ptr())] = storage.nbytes()

    for p in model.parameters():
        add(p)
        qs = quant_state(p)
        if qs is not None:
            for t in quant_state_tensors(qs).values():
                add(t)
    return sum(storages.values())


# ---------------------------------------------------------------------------------------------
# Time


def _synchronize() -> None:
    torch = sys.modules.get("torch")  # nothing to synchronise if torch was never imported
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_step_time(step_fn: Callable[[], Any], warmup: int = 2, repeats: int = 5) -> float:
    """Median wall seconds of `repeats` calls of `step_fn()` after `warmup` untimed calls.

    CUDA work is synchronised before and after each timed call, so the time is the real one.
    """
    if warmup < 0 or repeats < 1:
        raise UserInputError(f"median_step_time needs warmup >= 0 and repeats >= 1, got {warmup}, {repeats}")
    for _ in range(warmup):
        step_fn()
    times = []
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        step_fn()
        _synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tokens_per_second(step_fn: Callable[[], Any], tokens_per_step: int, warmup: int = 2, repeats: int = 5) -> float:
    """Throughput of `step_fn`, which processes `tokens_per_step` tokens per call."""
    return tokens_per_step / median_step_time(step_fn, warmup=warmup, repeats=repeats)


# ---------------------------------------------------------------------------------------------
# The machine a report measured

# /proc/cpuinfo flags that decide how fast CPU matmuls and bitsandbytes' 4-bit kernels run
VECTOR_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "amx_tile", "amx_bf16", "neon", "asimd", "sve")


def _cpuinfo() -> tuple[str | None, list[str]]:
    """(CPU model name, its vector flags out of VECTOR_FLAGS) from /proc/cpuinfo (Linux)."""
    import platform

    model, flags = None, set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if model is None and key in ("model name", "Model", "cpu model"):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model or platform.processor() or None, [f for f in VECTOR_FLAGS if f in flags]


def machine_info() -> dict[str, Any]:
    """What a timing depends on, for every report: CPU model and vector extensions, torch's
    CPU kernel level and threads, bitsandbytes' 4-bit path, the GPU if any. Plain JSON."""
    import platform

    import torch

    model, flags = _cpuinfo()
    return {
        "cpu_model": model,
        "cpu_vector_flags": flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bnb_4bit_path": kernel_path(),
        "four_bit_compute_dtype": compute_dtype_name("cuda" if torch.cuda.is_available() else "cpu"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def machine_line(info: dict[str, Any]) -> str:
    """One Markdown line naming the machine of `machine_info()`."""
    flags = ", ".join(info.get("cpu_vector_flags") or []) or "none found"
    parts = [f"CPU {info.get('cpu_model') or 'unknown'} ({flags}; torch kernels {info.get('torch_cpu_capability')})",
             f"{info.get('cpu_cores')} cores, {info.get('torch_threads')} torch threads"]
    if info.get("gpu"):
        parts.append(f"GPU {info['gpu']}")
    parts.append(info.get("bnb_4bit_path") or "bitsandbytes not available")
    if info.get("four_bit_compute_dtype"):
        parts.append(f"4-bit layers compute in {info['four_bit_compute_dtype']}")
    parts.append(f"torch {info.get('torch')}, Python {info.get('python')}")
    return "Machine: " + "; ".join(parts) + "."


# ---------------------------------------------------------------------------------------------
# Memory within this process


def available_memory_bytes(device: str | torch.device = "cpu") -> int | None:
    """Memory free for new allocations on `device`, bytes: CUDA's free memory (None where CUDA is
    not available), else the RAM the system can give without swapping (Linux `MemAvailable`).
    What every fit check compares its estimate against."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    import psutil

    return psutil.virtual_memory().available


def lifetime_peak_rss() -> int | None:
    """Peak resident memory of this whole process since it started, bytes; None off POSIX."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def current_rss() -> int:
    """Resident set size of this process, bytes."""
    import psutil

    return psutil.Process().memory_info().rss


def _read_vm_hwm() -> int | None:
    """The kernel's peak-RSS mark (Linux `VmHWM`), bytes; None where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_vm_hwm() -> bool:
    """Reset `VmHWM` to the current RSS (Linux >= 4.0); False where not permitted/available."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


class RssPeakTracker:
    """Peak RSS from the moment `start()` is called: kernel high-water mark + 2 ms sampling."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.start_rss = 0
        self.sampled_peak = 0
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RssPeakTracker:
        self.start_rss = self.sampled_peak = current_rss()
        self.hwm_reset = _reset_vm_hwm()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="rss-sampler")
        self._thread.start()
        return self

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while not self._stop.wait(self.interval_s):
            self.sampled_peak = max(self.sampled_peak, process.memory_info().rss)

    def stop(self) -> int:
        """Stop sampling; return the peak RSS (bytes) since `start()`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sampled_peak = max(self.sampled_peak, current_rss())
        hwm = _read_vm_hwm() if self.hwm_reset else None
        return max(self.sampled_peak, hwm or 0)

    @property
    def method(self) -> str:
        return "VmHWM reset + 2ms sampling" if self.hwm_reset else "2ms RSS sampling"


def peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Peak memory (bytes) while `fn()` runs in this process.

    CUDA: `max_memory_allocated` during `fn` (absolute: includes tensors that already existed,
    e.g. the weights). CPU: peak RSS during `fn` minus the RSS before it (so libraries and
    objects that existed before are not counted; memory freed earlier but kept by the
    allocator can hide part of the growth: prefer `run_in_fresh_process` for comparisons).
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        _synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    tracker = RssPeakTracker().start()
    try:
        fn()
    finally:
        peak = tracker.stop()
    return peak - tracker.start_rss


# ---------------------------------------------------------------------------------------------
# A fresh process per measurement

_setup_hook: Callable[[], None] | None = None  # set by eval.measure_worker in the child


def mark_setup_done() -> None:
    """Tell the measuring worker that set-up is over: RSS from here on is the measured peak.

    Call it once, in a `run_in_fresh_process` target, after loading the model and data. A
    no-op when not running under `run_in_fresh_process`.
    """
    if _setup_hook is not None:
        _setup_hook()


def run_in_fresh_process(
    target: str, kwargs: dict[str, Any] | None = None, timeout_s: float | None = None,
    env: dict[str, str] | None = None, imports: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run `target(**kwargs)` in a new Python process and return its result with memory numbers.

    `target` is "package.module:function" or "path/to/file.py:function"; the function returns
    a JSON-able dict. `imports`: modules the process imports first (a method package that
    registers the model type of a saved directory the target loads). Added keys: `peak_rss_bytes` (peak RSS after set-up), `setup_rss_bytes`
    (RSS when `mark_setup_done()` was called, or when the worker started if it never was),
    `peak_memory_bytes` (the target's own value if it returns one, else CUDA
    `max_memory_allocated` when the target used CUDA, else peak RSS minus set-up RSS),
    `memory_method`, `setup_marked`. If the target raises, or the process dies or times out,
    the result is {"error": "ExcType: message", "traceback": ...} (plus what was measured)
    and the caller keeps going. The child's stdout/stderr (progress bars) go to the terminal.
    """
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise UserInputError(f"target must look like 'package.module:function', got {target!r}")
    try:
        payload = json.dumps(kwargs or {})
    except TypeError as e:
        raise UserInputError(f"kwargs for {target} must be JSON-serialisable: {e}") from e

    child_env = {**os.environ, **(env or {})}
    # The child must import this package even when slimtune is not installed.
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="slimtune-measure-") as tmp:
        kwargs_path, result_path = Path(tmp) / "kwargs.json", Path(tmp) / "result.json"
        kwargs_path.write_text(payload, encoding="utf-8")
        cmd = [sys.executable, "-m", "eval.measure_worker", target, str(kwargs_path), str(result_path), *imports]
        # The worker dies with this process (PR_SET_PDEATHSIG, set by the worker, even on kill -9
        # here; it then removes `tmp` itself) and is stopped on any exception here (Ctrl-C).
        child_env["SLIMTUNE_MEASURE_PARENT"] = str(os.getpid())
        proc = subprocess.Popen(cmd, env=child_env, stdin=subprocess.DEVNULL)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return {"error": f"TimeoutError: {target} did not finish within {timeout_s} s", "traceback": ""}
        except BaseException:
            _stop(proc)
            raise
        if not result_path.is_file():
            return {
                "error": f"ChildProcessError: the process running {target} exited with status "
                         f"{proc.returncode} without a result (killed, e.g. out of memory?)",
                "traceback": "",
            }
        return json.loads(result_path.read_text(encoding="utf-8"))


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the worker, then SIGKILL it if it has not exited within `grace_s`; reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
