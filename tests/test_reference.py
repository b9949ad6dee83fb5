"""eval.reference: corpus split, cache mechanics (tiny builds), loading, ref-vit data, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import eval.reference as ref
import eval.reference.corpus as corpus
import eval.reference.lm as ref_lm
import eval.reference.vit as ref_vit
from eval.errors import UserInputError

# ------------------------------------------------------------------------------------- corpus


def test_split_is_by_file_disjoint_and_covers_the_corpus():
    splits = {s: [d.name for d in ref.reference_corpus(s)] for s in ref.SPLITS}
    names = [n for s in ref.SPLITS for n in splits[s]]
    assert len(names) == len(set(names)) == len(corpus._all_documents())
    for split, docs in splits.items():
        assert all(ref.split_of(name) == split for name in docs)
    assert 0.8 < len(splits["train"]) / len(names) < 0.97
    assert splits["validation"] and splits["test"]


def test_split_of_is_a_fixed_function_of_the_name():
    # Pinned: changing the hashing would silently move files between splits on every machine.
    assert [ref.split_of(n) for n in ("json/decoder.py", "os.py", "asyncio/tasks.py", "email/utils.py")] == \
        ["validation", "validation", "train", "train"]


def test_corpus_has_sources_and_topics_but_no_tests_or_site_packages():
    names = [d.name for d in corpus._all_documents()]
    assert "os.py" in names and "asyncio/tasks.py" in names
    assert any(n.startswith("pydoc_data/topics/") for n in names)
    assert not any(part in ("site-packages", "test", "tests", "idle_test")
                   for n in names for part in n.split("/")[:-1])
    assert "pydoc_data/topics.py" not in names


def test_an_empty_stdlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "stdlib_dir", lambda: tmp_path)
    corpus._all_documents.cache_clear()
    try:
        with pytest.raises(UserInputError, match="empty"):
            ref.reference_corpus("train")
        with pytest.raises(UserInputError, match="empty"):
            ref.reference_path("lm", seed=11, tiny=True)
        assert not ref.reference_dir("lm", seed=11, tiny=True).exists()
    finally:
        corpus._all_documents.cache_clear()


def test_unknown_split_and_kind_are_user_errors():
    with pytest.raises(UserInputError, match="validation"):
        ref.reference_corpus("dev")
    with pytest.raises(UserInputError, match="lm, vit"):
        ref.reference_path("gpt")


def test_recipe_hash_names_the_directory():
    assert ref.recipe_hash(ref.lm_recipe()) == ref.recipe_hash(ref.lm_recipe(seed=0))
    assert ref.recipe_hash(ref.lm_recipe(seed=1)) != ref.recipe_hash(ref.lm_recipe())
    assert ref.recipe_hash(ref.lm_recipe(steps=5)) != ref.recipe_hash(ref.lm_recipe())
    assert ref.reference_dir("lm", seed=1) != ref.reference_dir("lm")
    assert ref.reference_dir("lm").parent == ref.cache_root()
    with pytest.raises(UserInputError, match="seed"):
        ref.lm_recipe(seed=-1)
    with pytest.raises(UserInputError, match="steps"):
        ref.lm_recipe(steps=0)


def test_unigram_perplexity_by_hand():
    # counts + 1 = [3, 2, 1] over 6: P(0) = 1/2, P(2) = 1/6.
    ppl = ref.unigram_perplexity(torch.tensor([0, 0, 1]), torch.tensor([[0, 2]]), vocab_size=3)
    assert ppl == pytest.approx(math.sqrt(12))


# ------------------------------------------------------------------------------------- ref-lm


@pytest.fixture
def tiny_lm_dir():
    # Function-scoped, so the isolated cache is in place; built once per session, then reused.
    return ref.reference_path("lm", tiny=True)


def test_tiny_lm_build_is_finished_and_loads_with_auto_classes(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    card = json.loads((tiny_lm_dir / ref.CARD_NAME).read_text())
    assert card["model"] == "ref-lm" and card["tiny"] and card["recipe_hash"] in tiny_lm_dir.name
    assert card["test_perplexity"] > 1 and card["unigram_test_perplexity"] > 1
    assert set(card["corpus"]["documents"]) == set(ref.SPLITS)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_second_call_reuses_the_cache(tiny_lm_dir, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a finished reference model")

    monkeypatch.setattr(ref, "build_reference_lm", no_build)
    assert ref.reference_path("lm", tiny=True) == tiny_lm_dir
    assert ref.reference_path("lm", build=False, tiny=True) == tiny_lm_dir


def test_missing_model_with_build_false_says_how_to_build():
    with pytest.raises(UserInputError, match="slimtune reference lm"):
        ref.reference_path("lm", build=False, seed=7, tiny=True)


def test_interrupted_build_leaves_nothing_that_looks_finished(monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("killed during evaluation")

    final = ref.reference_dir("lm", seed=3, tiny=True)
    with monkeypatch.context() as patch:  # (not monkeypatch.undo: that would drop the isolated cache)
        patch.setattr(ref_lm, "_evaluate_lm", crash)
        with pytest.raises(RuntimeError, match="killed"):
            ref.reference_path("lm", seed=3, tiny=True)
    assert not final.exists()
    assert not list(final.parent.glob(f".{final.name}.tmp-*"))
    with pytest.raises(UserInputError):
        ref.reference_path("lm", build=False, seed=3, tiny=True)

    # A temporary directory left by a killed process (no clean-up) is removed by the next build.
    stale = final.parent / f".{final.name}.tmp-killed"
    (stale / "half").mkdir(parents=True)
    assert ref.reference_path("lm", seed=3, tiny=True) == final
    assert ref.is_finished(final) and not stale.exists()


def test_concurrent_callers_build_once(monkeypatch):
    import threading

    builds = []
    real_build = ref.build_reference_lm

    def counting_build(*args, **kwargs):
        builds.append(args[0])
        return real_build(*args, **kwargs)

    monkeypatch.setattr(ref, "build_reference_lm", counting_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(ref.reference_path("lm", seed=9, tiny=True)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1  # the others waited on the lock, then found it finished
    assert len(set(results)) == 1 and ref.is_finished(results[0])


def test_build_is_deterministic_for_a_seed(tmp_path):
    a = ref.build_reference_lm(tmp_path / "a", seed=5, tiny=True)
    b = ref.build_reference_lm(tmp_path / "b", seed=5, tiny=True)
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


# ------------------------------------------------------------------------------------- ref-vit


def test_glyph_split_is_by_typeface_with_enough_test_images():
    from PIL import ImageFont

    keys = {split: ref_vit.glyph_keys(split) for split in ref_vit.VIT_SPLITS}  # counted, not rendered
    assert len(keys["test"]) >= 2000 and len(keys["train"]) > 10 * len(keys["test"]) and len(keys["validation"]) >= 900
    fonts = {split: {k[0] for k in split_keys} for split, split_keys in keys.items()}
    assert all(fonts.values())
    assert not fonts["train"] & fonts["test"] and not fonts["train"] & fonts["validation"]
    assert not fonts["validation"] & fonts["test"]
    # Test is disjoint as typefaces too, not only as files (no "Bold" of a test face in train or
    # validation); validation holds styles train never sees, whose siblings it does.
    families = {split: {ImageFont.truetype(str(ref_vit.font_dir() / f), 10).getname()[0].split()[0]
                        for f in split_fonts} for split, split_fonts in fonts.items()}
    assert not (families["train"] | families["validation"]) & families["test"], families
    for split_keys in keys.values():  # every class in every typeface, equally often
        per_class = torch.bincount(torch.tensor([k[1] for k in split_keys]), minlength=len(ref.GLYPH_CLASSES))
        assert per_class.min() == per_class.max() > 0
    assert {k[2] for k in keys["test"] if k[1] == ref.GLYPH_CLASSES.index("C")} == {"C", "c"}  # a merged class


def test_glyph_rendering_is_a_fixed_function_of_font_char_and_render():
    import numpy as np

    first = np.asarray(ref_vit.render_glyph("DejaVuSerif.ttf", "g", 3))
    ref_vit._font.cache_clear()
    assert np.array_equal(first, np.asarray(ref_vit.render_glyph("DejaVuSerif.ttf", "g", 3)))
    assert first.shape == (32, 32, 3) and int(first.max()) - int(first.min()) > 100  # ink on background
    assert not np.array_equal(first, np.asarray(ref_vit.render_glyph("DejaVuSerif.ttf", "g", 4)))
    assert not np.array_equal(first, np.asarray(ref_vit.render_glyph("DejaVuSans.ttf", "g", 3)))


def test_glyph_split_matches_the_png_folder(monkeypatch):
    from eval.data import load_image_folder

    monkeypatch.setattr(ref_vit, "_RENDERS", {"train": 1, "validation": 1, "test": 1})  # a small folder, quick to write
    ref_vit._rendered_split.cache_clear()
    try:
        test_x, test_y = ref.reference_image_split("test")
        assert test_x.shape == (len(ref_vit.glyph_keys("test")), 3, 32, 32)
        assert float(test_x.min()) >= -1.0 and float(test_x.max()) <= 1.0
        folder = ref.reference_image_folder()
        assert ref.reference_image_folder(build=False) == folder
        dataset = load_image_folder(folder / "test", ref.vit_image_processor())
        assert dataset.classes == [ref_vit.class_folder_name(i) for i in range(len(ref.GLYPH_CLASSES))]
        assert len(dataset) == len(test_y)
        # Same images: the folder lists each class's files sorted by file name.
        names = [dataset.samples[i][0].name for i in range(len(dataset))]
        keys = ref_vit.glyph_keys("test")
        order = sorted(range(len(keys)), key=lambda i: (keys[i][1], f"{keys[i][0][:-4]}-u{ord(keys[i][2]):04x}"))
        for position in (0, 100, len(dataset) - 1):
            pixels, label = dataset[position]
            assert label == int(test_y[order[position]]) and keys[order[position]][0][:-4] in names[position]
            assert torch.allclose(pixels, test_x[order[position]], atol=1e-6)
        assert len(ref.reference_vit_split("test")) == len(test_y)
    finally:
        ref_vit._rendered_split.cache_clear()


def test_glyphs_are_rendered_once_then_read_from_the_cache(monkeypatch):
    monkeypatch.setattr(ref_vit, "_RENDERS", {"train": 1, "validation": 2, "test": 1})
    ref_vit._rendered_split.cache_clear()
    try:
        first_x, first_y = ref.reference_image_split("validation")
        assert ref_vit._rendered_split_path("validation", None).is_file()
        ref_vit._rendered_split.cache_clear()  # a new process: only the disk cache is left

        def no_rendering(*args):
            raise AssertionError("rendered again although the split is cached")

        monkeypatch.setattr(ref_vit, "render_glyph", no_rendering)
        again_x, again_y = ref.reference_image_split("validation")
        assert torch.equal(first_x, again_x) and torch.equal(first_y, again_y)
        # A different data recipe is another cache entry, not the old tensors.
        monkeypatch.setattr(ref_vit, "_RENDERS", {"train": 1, "validation": 3, "test": 1})
        assert ref_vit._rendered_split_path("validation", None) != ref_vit._rendered_split_path("test", None)
        with pytest.raises(AssertionError, match="rendered again"):
            ref_vit._rendered_split("validation")
    finally:
        ref_vit._rendered_split.cache_clear()


def test_cli_reference_vit_renders_nothing_unless_asked(capsys, monkeypatch):
    from scripts.cli import main

    def no_rendering(*args):
        raise AssertionError("`slimtune reference vit` rendered glyphs")

    from eval.reference.shipped import shipped_dir

    monkeypatch.setattr(ref_vit, "render_glyph", no_rendering)
    monkeypatch.setattr(ref, "reference_image_folder", no_rendering)  # nor writes the PNG folder
    ref_vit._rendered_split.cache_clear()
    assert main(["reference", "vit"]) == 0  # the shipped model: nothing to train, nothing to render
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(shipped_dir("vit")) and "PNG folder" in lines[0]
    assert main(["reference", "lm", "--write-images"]) != 0
    assert "--write-images is for `slimtune reference vit`" in capsys.readouterr().err


def test_vit_recipe_checks_the_image_size():
    assert ref.vit_recipe().version == 3
    with pytest.raises(UserInputError, match="glyph images are 32x32"):
        ref.ViTRecipe(image_size=64)


def test_the_shipped_ref_vit_is_the_current_recipe_and_intact():
    import dataclasses

    import eval.reference.shipped as shipped

    # A recipe change without re-shipping would silently send every user into a 15-minute build.
    assert shipped.shipped_recipe("vit") == dataclasses.asdict(ref.vit_recipe())
    folder = shipped.verify_shipped("vit")
    assert ref.reference_path("vit", build=False) == folder
    card = json.loads((folder / ref.CARD_NAME).read_text())
    assert card["data"]["images"]["test"] == len(ref_vit.glyph_keys("test")) and card["test_accuracy"] >= 0.85
    assert (folder / "model.safetensors").stat().st_size <= 3_000_000


def test_tiny_vit_build_loads_with_auto_classes():
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    path = ref.reference_path("vit", tiny=True)
    card = json.loads((path / ref.CARD_NAME).read_text())
    assert card["model"] == "ref-vit" and 0.0 <= card["test_accuracy"] <= 1.0
    assert card["data"]["train_images_used"] == 64 and card["data"]["images"]["test"] >= 2000
    model = AutoModelForImageClassification.from_pretrained(path)
    processor = AutoImageProcessor.from_pretrained(path)
    assert model.config.id2label[3] == "3" and model.config.id2label[46] == "t"
    images, _, _ = ref.reference_glyph_images("test", renders=1)
    pixels = processor(images=images[:2], return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels, ref.reference_image_split("test")[0][:20:10], atol=1e-6)
    assert model(pixel_values=pixels).logits.shape == (2, len(ref.GLYPH_CLASSES))


# ------------------------------------------------------------------------------------- CLI


def test_cli_prints_the_model_directory_last(capsys, tiny_lm_dir):
    from scripts.cli import main

    assert main(["reference", "lm", "--tiny"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(tiny_lm_dir)
    assert "perplexity" in lines[0]
