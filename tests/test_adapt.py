"""eval.codegen.adapt: which positions AdapT samples hot, on hand-made token sequences, and inside generate()."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

from eval.codegen.adapt import AdaptiveTemperatureLogitsProcessor, opens_block_body
from eval.errors import UserInputError


class PieceTokenizer:
    """A hand-made vocabulary: token id -> text piece; ids 0 and 1 are special (<s>, <pad>)."""

    def __init__(self, pieces: list[str]):
        self.pieces = ["<s>", "<pad>"] + pieces
        self.ids = {piece: i for i, piece in enumerate(self.pieces)}

    def encode(self, pieces: list[str]) -> list[int]:
        return [self.ids[p] for p in pieces]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i < 2))


# The sequence, one BPE-like piece per token (newline and indentation merged, as byte-level BPE
# does), and whether the token AFTER each prefix is hard.
SEQUENCE = [
    ("<s>", False),
    ("def", False), (" f", False), ("(x):", False),
    ("\n   ", True),  # "def f(x):\n   ": the next token (" if") starts the block body
    (" if", False), (" x", False),
    (":\n", True),  # line opened by ':', nothing emitted on the new line yet
    ("       ", True),  # indentation in its own token: the next token is still the line's first
    (" return", False), (" 1", False),
    ("\n   ", False),  # dedent from 8 to 4 columns: not a block body
    (" return", False), (" 2", False),
    ("\n", False),  # back to column 0 after "    return 2"
    ("y", False), (" =", False), (" 1", False),
    ("\n    ", True),  # deeper than "y = 1" without a ':' still counts as a new indentation level
    ("z", False),
]


@pytest.fixture()
def pieces() -> PieceTokenizer:
    return PieceTokenizer(sorted({p for p, _ in SEQUENCE if p != "<s>"}))


def test_hard_positions_on_a_hand_made_token_sequence(pieces):
    ids = [0] + pieces.encode([p for p, _ in SEQUENCE[1:]])
    processor = AdaptiveTemperatureLogitsProcessor(pieces, hard_temperature=2.0, easy_temperature=0.5)
    decisions = [processor.is_hard_position(ids[: i + 1]) for i in range(len(ids))]
    assert decisions == [hard for _, hard in SEQUENCE]


def test_a_short_decoding_window_grows_until_the_decision_is_exact(pieces):
    ids = [0] + pieces.encode([p for p, _ in SEQUENCE[1:]])
    narrow = AdaptiveTemperatureLogitsProcessor(pieces, 2.0, 0.5, context_tokens=1)
    assert [narrow.is_hard_position(ids[: i + 1]) for i in range(len(ids))] == [h for _, h in SEQUENCE]


DOCSTRING_SEQUENCE = [
    ("<s>", False), ("def", False), (" f", False), ("(x):", False),
    ("\n   ", True),
    (' """', False), ("Doc", False), (".", False),
    ("\n\n", False), ("    More", False), (".\n   ", False),  # inside the docstring
    (' """', False),
    ("\n   ", True),  # the body's first code line: the docstring is skipped back to "def f(x):"
    (" return", False), (" x", False),
]


@pytest.mark.parametrize("context_tokens", [1, 2, 64])
def test_the_first_code_line_after_a_docstring_is_hard_whatever_the_window(context_tokens):
    tokenizer = PieceTokenizer(sorted({p for p, _ in DOCSTRING_SEQUENCE if p != "<s>"}))
    ids = [0] + tokenizer.encode([p for p, _ in DOCSTRING_SEQUENCE[1:]])
    processor = AdaptiveTemperatureLogitsProcessor(tokenizer, 2.0, 0.5, context_tokens=context_tokens)
    assert [processor.is_hard_position(ids[: i + 1]) for i in range(len(ids))] == [h for _, h in DOCSTRING_SEQUENCE]


def test_each_row_of_a_batch_gets_its_own_temperature(pieces):
    hard_row = [1, 1, 1, 0] + pieces.encode(["def", " f", "(x):", "\n   "])  # left-padded
    easy_row = [1, 1, 0] + pieces.encode(["def", " f", "(x):", "\n   ", " if"])
    dedent_row = [0] + pieces.encode(["def", " f", "(x):", "\n   ", " return", " 2", "\n"])
    input_ids = torch.tensor([hard_row, easy_row, dedent_row])
    scores = torch.tensor([[1.0, -2.0, 4.0]] * 3)
    processor = AdaptiveTemperatureLogitsProcessor(pieces, hard_temperature=2.0, easy_temperature=0.5)
    out = processor(input_ids, scores.clone())
    torch.testing.assert_close(out[0], scores[0] / 2.0)
    torch.testing.assert_close(out[1], scores[1] / 0.5)
    torch.testing.assert_close(out[2], scores[2] / 0.5)
    assert (processor.hard_steps, processor.total_steps) == (1, 3)


@pytest.mark.parametrize("text, hard", [
    ("def f(x):\n", True),
    ("def f(x):\n    ", True),
    ("def f(x):\n    return", False),  # mid-line
    ("if a:\n\n    ", True),  # blank lines between opener and body
    ("if a:  # why: because\n    ", True),  # trailing comment ignored
    ("x = 1  # note:\n", False),  # the ':' is inside the comment
    ("x = 'a#b:'\n", False),  # '#' inside a string is not a comment; the line ends with a quote
    ("x = 1\n", False),
    ("    x = 1\n    ", False),  # same level
    ("x = 1\n\t", True),  # a tab is deeper than column 0
    ("no newline yet:", False),
    ("", False),
    ("\n    ", False),  # no previous non-blank line to compare with
    ('def f(x):\n    """Doc."""\n', True),  # docstrings are not code: the body starts after them
    ('def f(x):\n    """Doc.\n\n    More.\n    """\n    ', True),
    ("def f(x):\n    # a comment line\n    ", True),
    ('x = 1\n"""a string statement"""\n', False),
    ('y = """\nabc"""\n', False),  # the end of an assigned string is code, not a docstring
])
def test_opens_block_body(text, hard):
    assert opens_block_body(text) is hard


def test_positions_on_a_real_byte_level_bpe_tokenization(tiny_tokenizer):
    text = "def f(x):\n    if x:\n        return 1\n    return 2\n"
    ids = tiny_tokenizer(text)["input_ids"]
    processor = AdaptiveTemperatureLogitsProcessor(tiny_tokenizer, 2.0, 0.5)
    hard_next = [tiny_tokenizer.decode(ids[i + 1:i + 2]) for i in range(len(ids) - 1) if processor.is_hard_position(ids[: i + 1])]
    # Exactly the first content token of the two block bodies (after "def f(x):" and "if x:").
    assert [piece.strip() for piece in hard_next] == ["if", "return"]


def test_bad_temperatures_are_user_errors(pieces):
    for hard, easy in [(0, 1.0), (1.0, -0.5), (float("nan"), 1.0), (1.0, float("inf"))]:
        with pytest.raises(UserInputError, match="temperature"):
            AdaptiveTemperatureLogitsProcessor(pieces, hard, easy)


def _sample(model, tokenizer, prompt_ids, seed, **kwargs):
    torch.manual_seed(seed)
    return model.generate(prompt_ids, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=12, min_new_tokens=12,
                          num_return_sequences=3, pad_token_id=tokenizer.pad_token_id, **kwargs)


def test_inside_generate_equal_temperatures_reproduce_plain_temperature_sampling(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    prompt = tokenizer("def f(x):\n", return_tensors="pt")["input_ids"]
    plain = _sample(model, tokenizer, prompt, seed=3, temperature=0.7)
    same = AdaptiveTemperatureLogitsProcessor(tokenizer, hard_temperature=0.7, easy_temperature=0.7)
    adapt = _sample(model, tokenizer, prompt, seed=3, temperature=1.0, logits_processor=LogitsProcessorList([same]))
    assert torch.equal(plain, adapt)
    assert same.total_steps == 3 * 12 and same.hard_steps >= 3  # the first step follows "def f(x):\n"


def test_the_body_of_every_easy_tier_method_starts_hot():
    # The easy tier's prompts end inside a class, after a method's `def` (and its docstring, or a
    # decorator above it): the first token of the body the model writes must be a hard position,
    # and the line after it (at the body's indentation, no ':' before it) an easy one.
    from eval.codegen.easy import FAMILIES, easy_problem

    for family in FAMILIES:
        problem = easy_problem(family, "path", "mode", "Node")
        assert opens_block_body(problem["prompt"]), family
        assert opens_block_body(problem["prompt"] + "        ") and not opens_block_body(
            problem["prompt"] + problem["canonical_solution"] + "        "), family
