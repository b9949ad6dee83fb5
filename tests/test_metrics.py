"""eval.metrics: perplexity against hand computations, accuracies, bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from eval.data import ClassificationExample, MultipleChoiceExample, pack_token_blocks
from eval.errors import UserInputError
from eval.metrics import (
    accuracy,
    classification_accuracy,
    continuation_log_likelihoods,
    multiple_choice_accuracy,
    perplexity,
    perplexity_of_blocks,
)


class UniformLM(nn.Module):
    """Predicts every token with probability 1 / vocab_size: perplexity must be vocab_size."""

    def __init__(self, vocab_size: int, context: int = 128):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=context)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.config.vocab_size) + self.dummy)


class ConstantClassifier(nn.Module):
    """A sequence classifier that always says class `label` (logits [batch, num_labels])."""

    def __init__(self, label: int, num_labels: int = 3):
        super().__init__()
        self.label, self.num_labels = label, num_labels
        self.config = SimpleNamespace(num_labels=num_labels)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(input_ids.shape[0], self.num_labels)
        logits[:, self.label] = 1.0
        return SimpleNamespace(logits=logits + self.dummy)


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def test_uniform_logits_have_perplexity_equal_to_vocab_size(tiny_tokenizer, tiny_texts):
    model = UniformLM(vocab_size=len(tiny_tokenizer))
    ppl = perplexity(model, tiny_tokenizer, tiny_texts, block_size=32, batch_size=3)
    assert ppl == pytest.approx(len(tiny_tokenizer), rel=1e-5)


def test_perplexity_is_exp_of_mean_token_nll(tiny_llama, tiny_tokenizer, tiny_texts):
    blocks = pack_token_blocks(tiny_texts, tiny_tokenizer, 64, max_blocks=5)
    # By hand: each block's HF loss is the mean NLL of its 63 predicted tokens; all blocks
    # predict the same number of tokens, so the overall mean is the mean of the block means.
    with torch.no_grad():
        losses = [tiny_llama(input_ids=b[None], labels=b[None]).loss.item() for b in blocks]
    expected = math.exp(sum(losses) / len(losses))
    assert perplexity(tiny_llama, tiny_tokenizer, tiny_texts, block_size=64, max_blocks=5, batch_size=2) == \
        pytest.approx(expected, rel=1e-4)
    assert perplexity_of_blocks(tiny_llama, blocks, batch_size=5) == pytest.approx(expected, rel=1e-4)


def test_perplexity_rejects_a_block_longer_than_the_model_context(tiny_llama, tiny_tokenizer, tiny_texts):
    with pytest.raises(UserInputError, match="context"):
        perplexity(tiny_llama, tiny_tokenizer, tiny_texts, block_size=256)


def test_perplexity_rejects_an_empty_corpus(tiny_llama, tiny_tokenizer):
    with pytest.raises(UserInputError, match="empty"):
        perplexity(tiny_llama, tiny_tokenizer, [], block_size=32)


def test_accuracy():
    assert accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == 0.5
    assert accuracy(torch.tensor([3]), torch.tensor([3])) == 1.0
    with pytest.raises(UserInputError, match="predictions"):
        accuracy([1, 2], [1])
    with pytest.raises(UserInputError, match="zero"):
        accuracy([], [])


def _log_likelihood_by_hand(model, tokenizer, context: str, continuation: str) -> float:
    context_ids = tokenizer(context)["input_ids"]
    ids = tokenizer(context + continuation)["input_ids"]
    assert ids[: len(context_ids)] == context_ids  # these strings do not merge across the boundary
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], dim=-1)
    return sum(log_probs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))


def test_continuation_log_likelihoods_match_a_hand_computation_with_padding(tiny_llama, tiny_tokenizer):
    pairs = [("def f(x):\n    return", " x"), ("import", " os.path as p"), ("a = [1, 2", ", 3]")]
    expected = [_log_likelihood_by_hand(tiny_llama, tiny_tokenizer, c, k) for c, k in pairs]
    got = continuation_log_likelihoods(tiny_llama, tiny_tokenizer, pairs, batch_size=3)  # right-padded batch
    assert got == pytest.approx(expected, abs=1e-4)


def test_multiple_choice_accuracy_picks_the_most_likely_choice(tiny_llama, tiny_tokenizer):
    question, choices = "x = 1\ny =", ["2", "x + 1", "'text'", "None"]
    scores = [_log_likelihood_by_hand(tiny_llama, tiny_tokenizer, question, " " + c) for c in choices]
    best = max(range(4), key=scores.__getitem__)
    right = MultipleChoiceExample(question=question, choices=choices, answer=best)
    wrong = MultipleChoiceExample(question=question, choices=choices, answer=(best + 1) % 4)
    assert multiple_choice_accuracy(tiny_llama, tiny_tokenizer, [right, wrong, right], batch_size=2) == \
        pytest.approx(2 / 3)


class NoCacheLM(nn.Module):
    """Wraps a causal LM and drops its cache: scoring must fall back to whole sequences."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.model(input_ids=input_ids, attention_mask=attention_mask).logits,
                               get=lambda name, default=None: default)


# Candidates of several lengths after one question, then a second question: the shared-prefix
# path groups each question's pairs and runs the question once.
SHARED_CONTEXT_PAIRS = [("def area(r):\n    return", c) for c in (" r", " 3.14 * r * r", " None", " area(r)")] + \
                       [("import", " os"), ("import", " collections.abc as c")] + [("x =", " 1")]


def _sharing_models(tiny_llama_dir, tiny_opt_dir, pruned_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qst import QSTConfig, QSTForCausalLM

    load = lambda path: AutoModelForCausalLM.from_pretrained(path).eval()  # noqa: E731
    torch.manual_seed(0)
    lora = get_peft_model(load(tiny_llama_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False)).eval()
    qst = QSTForCausalLM.from_base(load(tiny_llama_dir), QSTConfig(r=4))
    with torch.no_grad():  # a trained-looking side network, so that its cache matters
        for p in qst.side.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return {"llama": load(tiny_llama_dir), "opt": load(tiny_opt_dir), "pruned": load(pruned_dir),
            "lora": lora, "qst": qst.eval()}


def test_candidates_sharing_a_question_score_as_if_run_whole(tiny_llama_dir, tiny_opt_dir, pruned_dir, tiny_tokenizer):
    from eval.metrics import _score_whole_sequences, _tokenized_pairs

    for name, model in _sharing_models(tiny_llama_dir, tiny_opt_dir, pruned_dir).items():
        for max_length in (None, 6):  # 6: long pairs lose their left, so some share no prefix
            sequences = _tokenized_pairs(tiny_tokenizer, SHARED_CONTEXT_PAIRS, max_length or 1024)
            with torch.inference_mode():
                whole = _score_whole_sequences(model, sequences, tiny_tokenizer.pad_token_id, batch_size=3)
            shared = continuation_log_likelihoods(model, tiny_tokenizer, SHARED_CONTEXT_PAIRS, batch_size=2,
                                                  max_length=max_length)
            assert shared == pytest.approx(whole, abs=1e-4), (name, max_length)


def test_questions_share_their_prefix_but_never_a_scored_token(tiny_tokenizer):
    from eval.metrics import _tokenized_pairs, shared_prefix_groups

    sequences = _tokenized_pairs(tiny_tokenizer, SHARED_CONTEXT_PAIRS, 1024)
    groups = shared_prefix_groups(SHARED_CONTEXT_PAIRS, sequences)
    assert [len(g.tails) for g in groups] == [4, 2, 1]
    for group in groups:
        for index, tail, n_scored in group.tails:
            assert group.prefix + tail == sequences[index][0] and 1 <= n_scored <= len(tail)


def test_a_model_without_a_cache_scores_every_pair_whole(tiny_llama, tiny_tokenizer):
    expected = continuation_log_likelihoods(tiny_llama, tiny_tokenizer, SHARED_CONTEXT_PAIRS, batch_size=2)
    got = continuation_log_likelihoods(NoCacheLM(tiny_llama), tiny_tokenizer, SHARED_CONTEXT_PAIRS, batch_size=2)
    assert got == pytest.approx(expected, abs=1e-4)


def test_classification_accuracy(tiny_tokenizer):
    examples = [ClassificationExample(text=t, label=label) for t, label in
                [("def f(): pass", 1), ("class A: pass", 1), ("import os", 0), ("x = 1", 2)]]
    assert classification_accuracy(ConstantClassifier(1), tiny_tokenizer, examples, batch_size=3) == 0.5
    with pytest.raises(UserInputError):
        classification_accuracy(ConstantClassifier(1), tiny_tokenizer, [])
