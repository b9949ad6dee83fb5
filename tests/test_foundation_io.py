import json

import pytest

from eval.errors import UserInputError
from eval.io import atomic_directory, read_json, write_json


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(final) as d:
        (d / "half.txt").write_text("x")
        raise RuntimeError("interrupted")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_replaces_existing(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_directory(final) as d:
        (d / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_json_round_trip_and_bad_json(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    assert read_json(tmp_path / "a.json") == {"x": 1}
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(UserInputError, match="not valid JSON"):
        read_json(tmp_path / "b.json")
    with pytest.raises(UserInputError, match="not found"):
        read_json(tmp_path / "missing.json")
    json.loads((tmp_path / "a.json").read_text())


def test_tokenizer_round_trip(tiny_tokenizer):
    text = "def f(x):\n    return x  # ünïcode\n"
    ids = tiny_tokenizer(text)["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_prepare_output_dir_rule(tmp_path):
    from eval.io import OUTPUT_MARKER, prepare_output_dir

    out = tmp_path / "new" / "out"
    with prepare_output_dir(out, "prune"):
        (out / "report.json").write_text("{}")
    assert json.loads((out / OUTPUT_MARKER).read_text())["command"] == "prune"
    with prepare_output_dir(out, "prune"):  # an earlier output of the same command
        pass
    with pytest.raises(UserInputError, match="earlier prune output"), prepare_output_dir(out, "tune"):
        pass
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(UserInputError, match="holds other files"), prepare_output_dir(tmp_path / "mine", "prune"):
        pass
    assert (tmp_path / "mine" / "notes.txt").read_text() == "x"


def test_prepare_output_dir_undoes_a_failed_run_and_keeps_work(tmp_path):
    from eval import io

    with pytest.raises(RuntimeError), io.prepare_output_dir(tmp_path / "a" / "b", "tune"):
        raise RuntimeError("failed before writing anything")
    assert list(tmp_path.iterdir()) == []
    io.KEPT.clear()
    with pytest.raises(KeyboardInterrupt), io.prepare_output_dir(tmp_path / "c", "tune"):
        (tmp_path / "c" / "checkpoint").mkdir()
        raise KeyboardInterrupt
    assert (tmp_path / "c" / "checkpoint").is_dir() and "checkpoint" in io.KEPT[-1]


def test_atomic_contents_keeps_other_entries(tmp_path):
    from eval.io import atomic_contents

    (tmp_path / "keep.txt").write_text("k")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old.bin").write_text("o")
    with atomic_contents(tmp_path) as tmp:
        (tmp / "model").mkdir()
        (tmp / "model" / "new.bin").write_text("n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "model"]
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["new.bin"]
    with pytest.raises(RuntimeError), atomic_contents(tmp_path) as tmp:
        (tmp / "half").write_text("h")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "model"]


def test_verify_safetensors_names_a_truncated_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    from eval.io import load_safetensors, verify_safetensors

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(8, 8), "b": torch.zeros(3)}, path)
    assert set(verify_safetensors(path)) == {"a", "b"}
    assert torch.equal(load_safetensors(path)["a"], torch.ones(8, 8))
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(UserInputError, match="w.safetensors is truncated"):
        load_safetensors(path)
