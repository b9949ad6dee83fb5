"""Child side of `eval.measure.run_in_fresh_process` (run as `python -m eval.measure_worker`).

    python -m eval.measure_worker TARGET KWARGS_JSON RESULT_JSON

Imports TARGET ("module:function" or "file.py:function"), calls it with the keyword
arguments in KWARGS_JSON, and writes its dict result, plus the memory measurements, to
RESULT_JSON. Set-up ends when the target calls `eval.measure.mark_setup_done()`; from then on
peak RSS is tracked (see eval.measure). Exceptions are written as {"error", "traceback"}.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

import eval.measure as measure
from eval.console import quiet_library_logs
from eval.io import write_json


def load_target(target: str):
    module_name, func_name = target.split(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise AttributeError(f"{module_name} has no function {func_name!r}")
    return func


class Measurement:
    """RSS (and CUDA) numbers around the target's set-up mark."""

    def __init__(self):
        # Until the target marks its set-up done, measure from the start of the call.
        self.tracker = measure.RssPeakTracker().start()
        self.setup_marked = False
        self.setup_peak_rss = None
        self.cuda_used = False

    def mark_setup_done(self) -> None:
        if self.setup_marked:
            return  # only the first mark counts
        self.setup_marked = True
        self.setup_peak_rss = max(self.tracker.stop(), measure.lifetime_peak_rss() or 0)  # before the reset
        self._reset_cuda()
        self.tracker = measure.RssPeakTracker().start()

    def _reset_cuda(self) -> None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda_used = True
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def finish(self) -> dict:
        peak = self.tracker.stop()
        out = {
            "peak_rss_bytes": peak,
            "setup_rss_bytes": self.tracker.start_rss,
            "memory_method": self.tracker.method,
            "setup_marked": self.setup_marked,
            # peak RSS during set-up (loading transients): not part of the measurement
            "setup_peak_rss_bytes": self.setup_peak_rss,
        }
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            out["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
            self.cuda_used = True
        if self.cuda_used:
            out["peak_memory_bytes"] = out["cuda_max_memory_allocated_bytes"]
            out["memory_method"] = "torch.cuda.max_memory_allocated"
        else:
            out["peak_memory_bytes"] = peak - self.tracker.start_rss
        return out


def _die_with_parent(workdir: Path) -> None:
    """Exit (removing `workdir`, the parent's temporary folder) on SIGTERM, and have the kernel
    send SIGTERM when the parent process dies, however it dies (Linux PR_SET_PDEATHSIG)."""
    def on_term(signum, frame):
        shutil.rmtree(workdir, ignore_errors=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    parent = os.environ.get("SLIMTUNE_MEASURE_PARENT")
    if parent is None or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # pragma: no cover - no prctl: the parent still stops us on Ctrl-C
        return
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        on_term(signal.SIGTERM, None)


def main(argv: list[str]) -> int:
    target, kwargs_path, result_path, *imports = argv
    _die_with_parent(Path(kwargs_path).parent)
    quiet_library_logs()
    kwargs = json.loads(Path(kwargs_path).read_text(encoding="utf-8"))
    measurement = Measurement()
    measure._setup_hook = measurement.mark_setup_done
    try:
        for name in imports:  # e.g. a method package that registers a saved model type
            importlib.import_module(name)
        func = load_target(target)
        result = func(**kwargs)
        if result is None:
            result = {}
        if not isinstance(result, dict):
            raise TypeError(f"{target} must return a dict, got {type(result).__name__}")
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which keeps going
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        sys.stderr.write(result["traceback"])
    measured = measurement.finish()
    if "peak_memory_bytes" in result:  # the target's own number wins
        measured.pop("peak_memory_bytes")
    result = {**result, **measured}
    try:
        write_json(result_path, result)
    except TypeError as e:
        write_json(result_path, {**measured, "error": f"TypeError: {target} returned a non-JSON result: {e}",
                                 "traceback": ""})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
