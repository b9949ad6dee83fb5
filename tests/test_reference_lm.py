"""ref-lm v2: bits per byte, the pinned extra corpus and its manifest, resumable builds, and
the shipped weights (checksums, corruption, recipe changes: fail closed, nothing trains or downloads
without --rebuild)."""

from __future__ import annotations

import hashlib
import json
import math
import zipfile

import pytest
import torch
from safetensors.torch import load_file

import eval.reference as ref
import eval.reference.corpus as corpus
import eval.reference.lm as ref_lm
import eval.reference.shipped as shipped
from eval.errors import UserInputError
from eval.metrics import bits_per_byte_of_blocks, token_byte_lengths
from eval.tokenizer import train_bpe_tokenizer

TEXTS = ["def add(x, y):\n    return x + y  # café\n", "class Point:\n    '''A point: 日本.'''\n    x = 0\n"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=300)


def test_token_bytes_add_up_to_the_utf8_length(tokenizer):
    text = "def mul(a, b):\n    return a * b  # ü 日\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    lengths = token_byte_lengths(tokenizer)
    assert int(lengths[torch.tensor(ids)].sum()) == len(text.encode("utf-8"))
    assert all(lengths[i] == 0 for i in tokenizer.all_special_ids)


class _Uniform(torch.nn.Module):
    """Logits all zero: every token has probability 1/V, so bits per token = log2 V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.anchor = vocab, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_per_byte(tokenizer):
    ids = tokenizer("".join(TEXTS[:6]), add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(ids[: 8 * (len(ids) // 8)]).view(-1, 8)
    n_bytes = int(token_byte_lengths(tokenizer)[blocks[:, 1:]].sum())
    expected = math.log2(len(tokenizer)) * blocks[:, 1:].numel() / n_bytes
    assert bits_per_byte_of_blocks(_Uniform(len(tokenizer)), blocks, tokenizer) == pytest.approx(expected, rel=1e-6)


def _fake_wheel(tmp_path, files: dict[str, str]):
    path = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return corpus.PinnedDistribution("demo", "1.0", path.name, digest), path


@pytest.fixture
def demo_distribution(tmp_path, monkeypatch):
    stdlib_text = corpus.reference_corpus("train")[0].text  # a vendored copy of a stdlib file
    files = {f"demo/mod{i}.py": f"def f{i}():\n    return {i}\n" for i in range(40)}
    files |= {"demo/vendored.py": stdlib_text, "demo/tests/test_x.py": "assert True\n",
              "demo/huge.py": "x = 1\n" * (corpus.MAX_DOCUMENT_BYTES // 6 + 1), "demo-1.0.dist-info/RECORD": ""}
    dist, wheel = _fake_wheel(tmp_path, files)
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "corpus").mkdir(parents=True)
    wheel.rename(tmp_path / "cache" / "corpus" / wheel.name)
    monkeypatch.setattr(corpus, "PINNED_DISTRIBUTIONS", (dist,))
    corpus._lm_documents.cache_clear()
    yield dist
    corpus._lm_documents.cache_clear()


def test_the_extra_corpus_keeps_sources_drops_tests_copies_and_generated_files(demo_distribution):
    names = {d.name for split in corpus.SPLITS for d in corpus.lm_corpus(split)}
    demo = {n for n in names if n.startswith("pypi/")}
    assert len(demo) == 40 and all(n.startswith("pypi/demo-1.0/demo/mod") for n in demo)
    # The stdlib part and its split are exactly v1's, so v1's test documents stay held out.
    assert [d.name for d in corpus.lm_corpus("test") if not d.name.startswith("pypi/")] == \
        [d.name for d in corpus.reference_corpus("test")]
    manifest = corpus.corpus_manifest({"test": corpus.lm_corpus("test")})["documents"]
    entry = next(e for e in manifest if e["name"].startswith("pypi/"))
    assert "demo==1.0" in entry["source"] and len(entry["sha256"]) == 64


def test_a_wheel_whose_hash_differs_is_refused(demo_distribution, monkeypatch):
    wrong = corpus.PinnedDistribution("demo", "1.0", demo_distribution.wheel, "0" * 64)
    with pytest.raises(UserInputError, match="SHA-256.*demo-1.0-py3-none-any.whl|demo-1.0-py3-none-any.whl.*SHA-256"):
        corpus.fetch_wheel(wrong)


def test_a_killed_build_resumes_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    monkeypatch.setattr(ref_lm, "CHECKPOINT_EVERY", 2)
    clean = ref_lm.build_reference_lm(tmp_path / "clean", tiny=True)

    final = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        def killed(*args, **kwargs):
            raise RuntimeError("killed after training")

        patch.setattr(ref_lm, "_evaluate_lm", killed)
        with pytest.raises(RuntimeError, match="killed"):
            ref_lm.build_reference_lm(final, tiny=True)
    assert not final.exists() and not ref.is_finished(final)
    assert (ref_lm.partial_dir(final) / "checkpoint" / "state.json").is_file()

    ref_lm.build_reference_lm(final, tiny=True)
    card = json.loads((final / ref.CARD_NAME).read_text())
    assert card["resumed_from_step"] == card["recipe"]["steps"]
    assert not ref_lm.partial_dir(final).exists()
    a, b = load_file(clean / "model.safetensors"), load_file(final / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert card["test_bits_per_byte"] > 0 and card["stdlib_test_bits_per_byte"] > 0
    assert (final / ref_lm.MANIFEST_NAME).is_file()


@pytest.fixture
def shipped_tiny(tmp_path, monkeypatch):
    """A tiny build shipped into a temporary package folder, standing in for the default recipe."""
    built = ref_lm.build_reference_lm(tmp_path / "built", tiny=True)
    monkeypatch.setattr(shipped, "SHIPPED_ROOT", tmp_path / "shipped")
    shipped.ship("lm", built)
    recipe = ref_lm.lm_recipe(tiny=True)
    monkeypatch.setattr(ref, "lm_recipe", lambda seed=0, tiny=False: recipe)
    return shipped.shipped_dir("lm")


def test_the_shipped_model_is_returned_without_training(shipped_tiny, monkeypatch):
    monkeypatch.setattr(ref, "build_reference_lm", lambda *a, **k: pytest.fail("trained instead of shipping"))
    assert ref.reference_path("lm") == shipped_tiny


@pytest.fixture
def no_training_no_download(monkeypatch):
    """Fail the test if anything starts a build or fetches a corpus wheel."""
    monkeypatch.setattr(ref, "build_reference_lm", lambda *a, **k: pytest.fail("started a build"))
    monkeypatch.setattr(corpus, "fetch_wheel", lambda *a, **k: pytest.fail("started a download"))


def _damage(folder, damage: str) -> str:
    """Damage the shipped folder one way; return the file name the error must name."""
    weights, card = folder / "model.safetensors", folder / ref.CARD_NAME
    if damage == "corrupt weights":
        weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    elif damage == "missing weights":
        weights.unlink()
    elif damage == "missing checksums":
        (folder / shipped.CHECKSUMS_NAME).unlink()
        return shipped.CHECKSUMS_NAME
    elif damage == "edited card":  # a recipe edited by hand is corruption, not a recipe change
        edited = json.loads(card.read_text())
        edited["recipe"]["steps"] += 1
        card.write_text(json.dumps(edited))
        return ref.CARD_NAME
    return "model.safetensors"


@pytest.mark.parametrize("damage", ["corrupt weights", "missing weights", "missing checksums", "edited card"])
def test_a_damaged_shipped_model_is_one_clear_error_and_nothing_builds(shipped_tiny, damage, no_training_no_download):
    name = _damage(shipped_tiny, damage)
    cached_before = set(ref.cache_root().glob("*ref-lm-*"))  # the session cache holds other tests' tiny builds
    with pytest.raises(UserInputError, match=rf"{name.replace('.', '[.]')}.*slimtune reference lm --rebuild") as error:
        ref.reference_path("lm")
    if damage == "edited card":
        assert "corrupted" in str(error.value)
    assert set(ref.cache_root().glob("*ref-lm-*")) == cached_before  # nothing new started in the cache


def test_a_changed_recipe_is_one_error_naming_the_card_and_nothing_builds(shipped_tiny, monkeypatch,
                                                                           no_training_no_download):
    other = ref_lm.lm_recipe(tiny=True, steps=5)
    monkeypatch.setattr(ref, "lm_recipe", lambda seed=0, tiny=False: other)
    with pytest.raises(UserInputError, match=r"reference_card[.]json.*differ in steps.*reference lm --rebuild"):
        ref.reference_path("lm")


def test_a_recipe_that_does_not_ship_says_how_to_build_it(shipped_tiny, monkeypatch, no_training_no_download):
    monkeypatch.setattr(ref, "lm_recipe", lambda seed=0, tiny=False: ref_lm.lm_recipe(tiny=True, seed=seed))
    with pytest.raises(UserInputError, match=r"differ in seed.*slimtune reference lm --seed 4 --rebuild"):
        ref.reference_path("lm", seed=4)


def test_no_shipped_folder_is_one_clear_error(tmp_path, monkeypatch, no_training_no_download):
    monkeypatch.setattr(shipped, "SHIPPED_ROOT", tmp_path / "empty")
    with pytest.raises(UserInputError, match=r"checksums[.]json is missing.*--rebuild"):
        ref.reference_path("lm")


@pytest.fixture
def rebuilt_in_cache(shipped_tiny, monkeypatch):
    """What `slimtune reference lm --rebuild` leaves: a finished build of the current recipe in the cache."""
    monkeypatch.setattr(ref, "build_reference_lm", lambda final, seed, tiny: ref_lm.build_reference_lm(final, tiny=True))
    rebuilt = ref.reference_path("lm", rebuild=True)
    assert rebuilt != shipped_tiny and ref.is_finished(rebuilt)
    monkeypatch.setattr(ref, "build_reference_lm", lambda *a, **k: pytest.fail("started a build"))
    return rebuilt


def test_the_intact_shipped_model_wins_over_a_rebuild_in_the_cache(shipped_tiny, rebuilt_in_cache):
    # The same weights on every machine: a rebuild made to compare does not change later results.
    assert ref.reference_path("lm") == shipped_tiny


@pytest.mark.parametrize("damage", ["corrupt weights", "missing checksums"])
def test_a_rebuild_in_the_cache_is_used_when_the_shipped_model_cannot_be(shipped_tiny, rebuilt_in_cache, damage,
                                                                         capsys):
    _damage(shipped_tiny, damage)
    assert ref.reference_path("lm") == rebuilt_in_cache
    assert f"using the rebuilt ref-lm in {rebuilt_in_cache}" in capsys.readouterr().err


def test_the_shipped_ref_lm_is_the_current_recipe_and_intact(no_training_no_download):
    import dataclasses

    import eval.reference as package

    # A recipe change without re-shipping would make every user's `--model ref-lm` an error.
    assert shipped.shipped_recipe("lm") == dataclasses.asdict(package.lm_recipe())
    assert ref.reference_path("lm") == shipped.verify_shipped("lm")
    card = json.loads((shipped.shipped_dir("lm") / ref.CARD_NAME).read_text())
    assert card["tiny"] is False and card["test_bits_per_byte"] > 0


def test_a_rebuild_is_compared_with_the_shipped_model(shipped_tiny, tmp_path):
    again = ref_lm.build_reference_lm(tmp_path / "again", tiny=True)
    comparison = shipped.compare_with_shipped("lm", again)
    assert comparison["bit_identical_weights"] is True  # tiny builds run on one thread
    assert comparison["relative_difference"] == 0.0


def test_a_truncated_cached_model_is_one_clear_error():
    final = ref.reference_path("lm", seed=53, tiny=True)
    weights = final / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserInputError, match=r"model\.safetensors.*truncated"):
        ref.reference_path("lm", seed=53, tiny=True)
