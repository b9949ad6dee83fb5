"""eval.data: every loader on small files written here in the exact real format."""

from __future__ import annotations

import json

import pytest
import torch

from eval.data import (
    GLUE_LABELS,
    ClassificationExample,
    InstructionExample,
    MultipleChoiceExample,
    load_alpaca,
    load_glue,
    load_image_folder,
    load_mmlu,
    load_text_corpus,
    pack_token_blocks,
)
from eval.errors import UserInputError

# The first lines of WikiText-2's wiki.valid.raw layout: " = Title = " starts an article,
# " = = Section = = " is a section inside it, and every line ends with " \n" (blank lines are " ").
WIKITEXT_LINES = [
    "",
    " = Robert Boulter =",
    "",
    " Robert Boulter is an English film , television and theatre actor .",
    "",
    " = = Career = =",
    "",
    " = = = 2000 – 2005 = = =",
    "",
    " In 2000 Boulter had a guest @-@ starring role on the television series The Bill .",
    "",
    " = Du Fu =",
    "",
    " Du Fu ( Wade – Giles : Tu Fu ; 712 – 770 ) was a prominent Chinese poet of the Tang dynasty .",
    "",
    " = = Life = =",
    "",
    " Traditional Chinese literary criticism emphasized the life of the author .",
]
WIKITEXT_RAW = "".join(line + " \n" for line in WIKITEXT_LINES)


def test_wikitext_raw_splits_into_articles(tmp_path):
    path = tmp_path / "wiki.valid.raw"
    path.write_text(WIKITEXT_RAW, encoding="utf-8")
    docs = load_text_corpus(path)
    assert len(docs) == 2
    assert docs[0].startswith(" = Robert Boulter = ")
    assert "= = Career = =" in docs[0] and "= = = 2000 – 2005 = = =" in docs[0] and "The Bill" in docs[0]
    assert docs[1].startswith(" = Du Fu = ") and "Tang dynasty" in docs[1] and "Traditional Chinese" in docs[1]
    assert "Du Fu" not in docs[0]
    assert docs[0].endswith("The Bill . ") and docs[1].endswith("the author . ")  # no blank edge lines


def test_text_folder_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("second doc", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first doc", encoding="utf-8")
    (tmp_path / "c.py").write_text("x = 3\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")  # not text: ignored
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("hidden", encoding="utf-8")
    assert load_text_corpus(tmp_path) == ["first doc", "second doc", "x = 3\n"]


def test_single_txt_jsonl_and_parquet(tmp_path):
    txt = tmp_path / "one.txt"
    txt.write_text("just one document", encoding="utf-8")
    assert load_text_corpus(txt) == ["just one document"]

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "alpha", "meta": 1}\n\n{"text": "beta"}\n', encoding="utf-8")
    assert load_text_corpus(jsonl) == ["alpha", "beta"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["gamma", "", "delta"], "id": [1, 2, 3]}), tmp_path / "c.parquet")
    assert load_text_corpus(tmp_path / "c.parquet") == ["gamma", "delta"]


def test_corpus_errors(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_text_corpus(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserInputError, match="no non-empty documents"):
        load_text_corpus(tmp_path / "blank.txt")
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(UserInputError, match="unknown format"):
        load_text_corpus(tmp_path / "data.csv")
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(UserInputError, match=r"bad.jsonl:1 has no string field 'text'"):
        load_text_corpus(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(UserInputError, match=r"broken.jsonl:2 is not valid JSON"):
        load_text_corpus(tmp_path / "broken.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(UserInputError, match="no 'text' column"):
        load_text_corpus(tmp_path / "nocol.parquet")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(UserInputError, match="no non-empty documents"):
        load_text_corpus(empty_dir)


def test_pack_token_blocks_joins_documents_with_eos(tiny_tokenizer):
    texts = ["def f(x):\n    return x\n", "import os\n", "class A:\n    pass\n"]
    ids = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    stream = [tok for doc in ids for tok in doc + [tiny_tokenizer.eos_token_id]]
    block = 8
    blocks = pack_token_blocks(texts, tiny_tokenizer, block)
    assert blocks.dtype == torch.long and blocks.shape == (len(stream) // block, block)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]  # tail dropped, no overlap
    assert (blocks == tiny_tokenizer.eos_token_id).sum() >= 2

    limited = pack_token_blocks(texts, tiny_tokenizer, block, max_blocks=2)
    assert torch.equal(limited, blocks[:2])


def test_pack_token_blocks_errors(tiny_tokenizer, tiny_texts):
    with pytest.raises(UserInputError, match=r"corpus is \d+ tokens long.*block_size=100"):
        pack_token_blocks(["tiny"], tiny_tokenizer, 100)
    with pytest.raises(UserInputError, match="model_max_length=128"):
        pack_token_blocks(tiny_texts, tiny_tokenizer, 129)  # the tokenizer's context is 128
    with pytest.raises(UserInputError, match="model's context of 64"):
        pack_token_blocks(tiny_texts, tiny_tokenizer, 100, max_positions=64)
    with pytest.raises(UserInputError, match="corpus is empty"):
        pack_token_blocks([], tiny_tokenizer, 16)


# ---------------------------------------------------------------------------- GLUE

def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_glue_sst2_layout(tmp_path):
    task = tmp_path / "glue_data" / "SST-2"
    _write(task / "train.tsv", "sentence\tlabel\nhide new secretions from the parental units \t0\n"
                               "contains no wit , only labored gags \t0\nthat loves its characters \t1\n")
    _write(task / "dev.tsv", "sentence\tlabel\nit 's a charming and often affecting journey . \t1\n")
    _write(task / "test.tsv", "index\tsentence\n0\tuneasy mishmash of styles and genres .\n")
    splits = load_glue(task)
    assert sorted(splits) == ["dev", "train"]  # the unlabelled test split is left out
    assert splits["train"][2] == ClassificationExample("that loves its characters ", 1)
    assert [e.label for e in splits["train"]] == [0, 0, 1]
    # the GLUE root plus a task name finds the same folder
    assert load_glue(tmp_path / "glue_data", task="SST-2") == splits


def test_glue_cola_layout_without_header(tmp_path):
    task = tmp_path / "CoLA"
    _write(task / "train.tsv", "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
                               "gj04\t0\t*\tThe more we study verbs, the crazier they get get.\n")
    _write(task / "dev.tsv", "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n")
    _write(task / "test.tsv", "index\tsentence\n0\tBill whistled past the house.\n")
    splits = load_glue(task)
    assert sorted(splits) == ["dev", "train"]
    assert splits["train"][1] == ClassificationExample("The more we study verbs, the crazier they get get.", 0)
    assert splits["dev"][0].label == 1


def test_glue_sentence_pairs_and_string_labels(tmp_path):
    rte = tmp_path / "RTE"
    _write(rte / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n"
                            "0\tDana Reeve died of lung cancer.\tChristopher Reeve had an accident.\tnot_entailment\n"
                            "1\tYet, we now are discovering \"quotes\".\tBacteria is winning.\tentailment\n")
    examples = load_glue(rte)["dev"]
    assert examples[0] == ClassificationExample("Dana Reeve died of lung cancer.\nChristopher Reeve had an accident.", 1)
    assert examples[1].label == 0 and '"quotes"' in examples[1].text  # bare quotes are not CSV quoting

    mrpc = tmp_path / "MRPC"
    _write(mrpc / "train.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t702876\t702977\tAmrozi accused.\tHe accused.\n")
    assert load_glue(mrpc)["train"] == [ClassificationExample("Amrozi accused.\nHe accused.", 1)]

    mnli = tmp_path / "MNLI"
    header = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t" \
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
    row = "0\t63735\t63735n\tslate\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tThe new rights are nice.\tEveryone loves them.\t" \
          "neutral\tentailment\tneutral\tneutral\tneutral\tneutral\n"
    _write(mnli / "dev_matched.tsv", header + row)
    assert load_glue(mnli)["dev_matched"][0] == ClassificationExample("The new rights are nice.\nEveryone loves them.",
                                                                       GLUE_LABELS["mnli"].index("neutral"))


def test_glue_errors(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_glue(tmp_path / "nope")
    _write(tmp_path / "STS-B" / "dev.tsv", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n")
    with pytest.raises(UserInputError, match="regression"):
        load_glue(tmp_path / "STS-B")
    _write(tmp_path / "mystery" / "dev.tsv", "a\tb\n")
    with pytest.raises(UserInputError, match="unknown GLUE task 'mystery'"):
        load_glue(tmp_path / "mystery")
    _write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\ngood\tpositive?\n")
    with pytest.raises(UserInputError, match=r"dev.tsv:2 has label 'positive\?'"):
        load_glue(tmp_path / "SST-2")
    _write(tmp_path / "CoLA" / "train.tsv", "sentence\tlabel\nhello\t1\n")
    with pytest.raises(UserInputError, match="4 tab-separated columns"):
        load_glue(tmp_path / "CoLA")


# ---------------------------------------------------------------------------- MMLU

def test_mmlu_csv_layout(tmp_path):
    data = tmp_path / "mmlu" / "data"
    _write(data / "dev" / "abstract_algebra_dev.csv",
           'Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.,0,1,2,3,B\n'
           '"Statement 1 | If aH is an element of a factor group, then |aH| divides |a|.",'
           '"True, True","False, False","True, False","False, True",B\n')
    _write(data / "test" / "anatomy_test.csv", "What is the embryological origin of the hyoid bone?,"
                                                "The first pharyngeal arch,The second pharyngeal arch,"
                                                "The third pharyngeal arch,The second and third pharyngeal arches,D\n")
    _write(data / "test" / "abstract_algebra_test.csv", "Find the degree of Q(sqrt(2)) over Q.,0,4,2,6,C\n")
    splits = load_mmlu(tmp_path / "mmlu")
    assert sorted(splits) == ["dev", "test"]
    first = splits["dev"][0]
    assert first == MultipleChoiceExample("Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.",
                                          ["0", "1", "2", "3"], 1, "abstract_algebra")
    assert splits["dev"][1].choices[0] == "True, True"  # quoted fields with commas
    assert [(e.subject, e.answer) for e in splits["test"]] == [("abstract_algebra", 2), ("anatomy", 3)]
    assert load_mmlu(data) == splits  # the data/ folder itself works too


def test_mmlu_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no MMLU CSV files"):
        load_mmlu(tmp_path / "empty")
    _write(tmp_path / "m" / "data" / "val" / "x_val.csv", "question,A,B,C,D,answer\n")
    with pytest.raises(UserInputError, match=r"x_val.csv:1 .*answer letter"):
        load_mmlu(tmp_path / "m")


# ---------------------------------------------------------------------------- Alpaca

def test_alpaca_json_and_jsonl(tmp_path):
    records = [
        {"instruction": "Give three tips for staying healthy.", "input": "",
         "output": "1. Eat a balanced diet.\n2. Exercise.\n3. Sleep."},
        {"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour"},
        {"instruction": "Say hi.", "output": "hi"},  # some dumps omit an empty input
    ]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(records, indent=4), encoding="utf-8")
    examples = load_alpaca(tmp_path / "alpaca_data.json")
    assert examples[1] == InstructionExample("Translate to French.", "Hello", "Bonjour")
    assert examples[0].input == "" and examples[2].input == ""
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    assert load_alpaca(tmp_path / "a.jsonl") == examples


def test_alpaca_errors(tmp_path):
    (tmp_path / "obj.json").write_text('{"instruction": "x"}', encoding="utf-8")
    with pytest.raises(UserInputError, match="holds a JSON dict"):
        load_alpaca(tmp_path / "obj.json")
    (tmp_path / "bad.json").write_text('[{"prompt": "x", "completion": "y"}]', encoding="utf-8")
    with pytest.raises(UserInputError, match="record 1 .* fields \\['completion', 'prompt'\\]"):
        load_alpaca(tmp_path / "bad.json")
    with pytest.raises(UserInputError, match="does not exist"):
        load_alpaca(tmp_path / "missing.json")


# ---------------------------------------------------------------------------- image folder

@pytest.fixture
def vit_processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": 16, "width": 16})


def _image_folder(root, counts):
    from PIL import Image

    for i, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for j in range(n):
            Image.new("RGB", (20 + j, 24), color=(40 * i, 10 * j, 200)).save(root / name / f"img{j}.png")
    return root


def test_image_folder_labels_and_pixels(tmp_path, vit_processor):
    root = _image_folder(tmp_path / "val", {"n02": 2, "n01": 3})
    (root / "n01" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    (root / "n02" / "notes.txt").write_text("not an image suffix: ignored", encoding="utf-8")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ds = load_image_folder(root, vit_processor)
    assert ds.classes == ["n01", "n02"]  # sorted folder names give the class index
    assert len(ds) == 5 and ds.skipped == 1 and ds.skipped_files[0].name == "broken.png"
    pixels, label = ds[0]
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32 and label == 0
    assert [label for _, label in ds.samples] == [0, 0, 0, 1, 1]
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    batch_pixels, batch_labels = next(iter(loader))
    assert batch_pixels.shape == (4, 3, 16, 16) and batch_labels.tolist() == [0, 0, 0, 1]

    with pytest.warns(UserWarning, match="broken.png"):
        limited = load_image_folder(root, vit_processor, max_per_class=1, classes=["n02", "n01"])
    assert [(p.parent.name, label) for p, label in limited.samples] == [("n02", 0), ("n01", 1)]


def test_image_folder_errors(tmp_path, vit_processor):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserInputError, match="no readable images"):
        load_image_folder(tmp_path / "empty", vit_processor)
    with pytest.raises(UserInputError, match="does not exist"):
        load_image_folder(tmp_path / "missing", vit_processor)
