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
