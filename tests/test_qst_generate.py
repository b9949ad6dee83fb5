"""QST generation runs through transformers' GenerationMixin: beam search, streamers, stopping
criteria and dict outputs, over the backbone's and the side network's caches together."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from qst import QSTConfig, QSTForCausalLM


@pytest.fixture(scope="module")
def qst():
    torch.manual_seed(0)
    backbone = LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()
    model = QSTForCausalLM.from_base(backbone, QSTConfig(r=4))
    with torch.no_grad():  # a trained-looking side network, so that its cache matters
        for p in model.side.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def prompts():
    ids = torch.randint(1, 120, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # the second prompt is left-padded
    return ids, mask


def test_one_beam_equals_greedy_and_caches_change_nothing(qst, prompts):
    ids, mask = prompts
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    greedy = qst.generate(ids, **kw)
    assert greedy.shape == (2, 13)
    assert torch.equal(qst.generate(ids, num_beams=1, **kw), greedy)
    assert torch.equal(qst.generate(ids, use_cache=False, **kw), greedy)


def test_beam_search_runs_and_reorders_both_caches(qst, prompts):
    ids, mask = prompts
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0, num_beams=2)
    beams = qst.generate(ids, num_return_sequences=2, **kw)
    assert beams.shape == (4, 12)
    # beam search with the caches (reordered every step) chooses what it chooses without them
    assert torch.equal(qst.generate(ids, num_return_sequences=2, use_cache=False, **kw), beams)
    scored = qst.generate(ids, return_dict_in_generate=True, output_scores=True, **kw)
    assert scored.sequences.shape == (2, 12) and scored.sequences_scores.shape == (2,)


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.chunks.append("end")


class _StopAfter(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_streamers_and_stopping_criteria(qst, prompts):
    ids = prompts[0][:1]
    streamer = _Collect()
    out = qst.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, streamer=streamer)
    assert streamer.chunks[0] == ids[0].tolist() and streamer.chunks[-1] == "end"
    assert [c[0] for c in streamer.chunks[1:-1]] == out[0, ids.shape[1]:].tolist()
    stopped = qst.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None,
                           stopping_criteria=StoppingCriteriaList([_StopAfter(ids.shape[1] + 2)]))
    assert stopped.shape == (1, ids.shape[1] + 2) and torch.equal(stopped, out[:, : ids.shape[1] + 2])
