"""Parameter counts/bytes (4-bit at real size), step timing, and fresh-process peak memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from eval.errors import UserInputError
from eval.measure import (
    count_parameters,
    median_step_time,
    parameter_bytes,
    peak_memory,
    run_in_fresh_process,
)

MB = 2**20


# --- targets run in a fresh process: module-level functions, JSON in and out. Written to a
# file of their own so that the child does not import this test module (and torch).

TARGETS = f"""
MB = {MB}


def allocate_after_setup(setup_mb, measured_mb):
    from eval.measure import mark_setup_done

    transient = bytearray(b"\\x01") * (setup_mb * MB)  # touched pages: model-loading transient
    del transient
    kept = bytearray(b"\\x02") * (4 * MB)  # still resident at the mark: part of set-up
    mark_setup_done()
    work = bytearray(b"\\x03") * (measured_mb * MB)
    return {{"sizes": [len(kept), len(work)]}}


def raise_value_error(message):
    raise ValueError(message)
"""


@pytest.fixture
def targets(tmp_path) -> Path:
    path = tmp_path / "measure_targets.py"
    path.write_text(TARGETS)
    return path


# --- parameters ------------------------------------------------------------------------------


def test_counts_and_bytes_of_a_dense_model_count_tied_weights_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied: one tensor
    model[0].requires_grad_(False)
    extra = nn.Linear(3, 2)
    model.append(extra)
    assert count_parameters(model) == 40 + 8
    assert count_parameters(model, trainable_only=True) == 8
    assert parameter_bytes(model) == (40 + 8) * 4
    assert parameter_bytes(model.half()) == (40 + 8) * 2


def test_4bit_weights_count_logical_elements_and_real_bytes():
    bnb = pytest.importorskip("bitsandbytes")
    dense = nn.Linear(64, 48)
    layer = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # quantizes
    weight = layer.weight
    assert weight.dtype == torch.uint8 and weight.numel() == 64 * 48 // 2  # packed: 2 per byte
    assert count_parameters(layer) == 64 * 48 + 48
    qs = weight.quant_state
    quant_state_bytes = sum(t.numel() * t.element_size() for t in
                            [qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code])
    assert parameter_bytes(layer) == 64 * 48 // 2 + 48 * 4 + quant_state_bytes
    assert parameter_bytes(layer) < parameter_bytes(dense) / 2


# --- time and in-process memory ----------------------------------------------------------------


def test_median_step_time_warms_up_then_times_each_repeat(monkeypatch):
    import types

    import eval.measure

    # A fake clock that only the step advances: 3 slow warm-up calls, then timed calls of known length.
    clock = {"now": 0.0}
    durations = iter([100.0, 100.0, 100.0, 5.0, 1.0, 3.0, 2.0, 7.0, 4.0, 6.0])

    def step():
        clock["now"] += next(durations)

    monkeypatch.setattr(eval.measure, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    assert median_step_time(step, warmup=3, repeats=4) == 2.5  # median of 5, 1, 3, 2: warm-ups not timed
    assert median_step_time(step, warmup=0, repeats=3) == 6.0  # median of 7, 4, 6
    with pytest.raises(UserInputError):
        median_step_time(lambda: None, repeats=0)


def test_peak_memory_on_cpu_sees_a_transient_allocation():
    def fn():
        buffer = bytearray(b"\x01") * (32 * MB)
        del buffer

    assert peak_memory(fn, "cpu") >= 30 * MB


# --- fresh process -----------------------------------------------------------------------------


def test_fresh_process_measures_after_setup_only(targets):
    result = run_in_fresh_process(f"{targets}:allocate_after_setup", {"setup_mb": 96, "measured_mb": 24})
    assert "error" not in result, result.get("traceback")
    assert result["sizes"] == [4 * MB, 24 * MB] and result["setup_marked"]
    # the 96 MB set-up transient is excluded; the 24 MB of measured work is seen
    assert 22 * MB <= result["peak_memory_bytes"] <= 40 * MB
    assert result["peak_memory_bytes"] == result["peak_rss_bytes"] - result["setup_rss_bytes"]


def test_fresh_process_reports_errors_and_the_caller_keeps_going(targets):
    result = run_in_fresh_process(f"{targets}:raise_value_error", {"message": "bad rank"})
    assert result["error"] == "ValueError: bad rank"
    assert "raise_value_error" in result["traceback"]
    not_a_dict = run_in_fresh_process("json:dumps", {"obj": [1]})
    assert not_a_dict["error"].startswith("TypeError") and "peak_rss_bytes" in not_a_dict
    assert run_in_fresh_process("eval.no_such_module:f", {})["error"].startswith("ModuleNotFoundError")


def test_bad_targets_are_user_errors():
    with pytest.raises(UserInputError, match="module:function"):
        run_in_fresh_process("eval.measure", {})
    with pytest.raises(UserInputError, match="JSON"):
        run_in_fresh_process("json:dumps", {"obj": object()})
