"""QST side attention: the plain-causal fast path (no mask tensor) equals the masked path."""

from __future__ import annotations

import pytest
import torch

import qst.layer
from eval.data import pack_token_blocks
from eval.models import load_causal_lm
from qst import QSTConfig, QSTForCausalLM
from qst.layer import causal_mask_is_exact, side_attention_mask

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def qst_model(tiny_llama_dir):
    model, _ = load_causal_lm(tiny_llama_dir)
    tuned = QSTForCausalLM.from_base(model, QSTConfig(r=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # make the side path matter in the output
        for p in tuned.side_parameters().values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        tuned.side.alpha_offset.fill_((0.5 - tuned.qst_config.alpha_init) / tuned.qst_config.alpha_lr)
    return tuned


@pytest.fixture(scope="module")
def right_padded(tiny_texts, tiny_tokenizer):
    ids = pack_token_blocks(tiny_texts, tiny_tokenizer, block_size=24, max_blocks=3)
    mask = torch.ones_like(ids)
    mask[1, -7:] = 0
    mask[2, -1:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :10] = -100  # a prompt, then the answer
    return ids, mask, labels


def test_when_plain_causal_attention_is_exact():
    assert causal_mask_is_exact(None, past=0)
    assert causal_mask_is_exact(torch.ones(2, 5), past=0)
    assert causal_mask_is_exact(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), past=0)
    assert not causal_mask_is_exact(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), past=0)
    assert not causal_mask_is_exact(torch.tensor([[1, 0, 1, 1, 1]]), past=0)  # a hole
    assert not causal_mask_is_exact(None, past=3)  # cached keys: queries are not the keys


def _run(model, ids, mask, labels, *, masked: bool, monkeypatch):
    """Eval logits, training loss and side gradients; `masked` forces the mask-tensor path."""
    with monkeypatch.context() as m:
        if masked:
            m.setattr(qst.layer, "causal_mask_is_exact", lambda *args: False)
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        model.train()
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.side_parameters().items()}
        model.zero_grad(set_to_none=True)
        model.eval()
    return logits, loss.detach(), grads


def test_fast_path_equals_masked_path_on_right_padded_batch(qst_model, right_padded, monkeypatch):
    ids, mask, labels = right_padded
    calls = []
    original = qst.layer.side_attention_mask
    monkeypatch.setattr(qst.layer, "side_attention_mask", lambda *a: calls.append(1) or original(*a))
    fast = _run(qst_model, ids, mask, labels, masked=False, monkeypatch=monkeypatch)
    assert not calls  # right padding only: no mask tensor was built
    slow = _run(qst_model, ids, mask, labels, masked=True, monkeypatch=monkeypatch)
    assert calls  # and the reference run really used the mask
    real = mask.bool()
    torch.testing.assert_close(fast[0][real], slow[0][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-5, atol=1e-6)
    assert fast[2].keys() == slow[2].keys()
    for name in fast[2]:
        torch.testing.assert_close(fast[2][name], slow[2][name], rtol=1e-4, atol=1e-6, msg=name)
    # Real tokens of a right-padded row see only real tokens: as if there were no padding.
    with torch.no_grad():
        unpadded = qst_model(input_ids=ids).logits
    torch.testing.assert_close(fast[0][real], unpadded[real], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fast[0][~real], slow[0][~real])  # pad positions may differ, unused


def test_left_padded_batch_uses_one_additive_mask(qst_model):
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    side = qst_model.side
    additive = side._attention_mask(mask, batch=2, seq=6, past=0)
    allowed = side_attention_mask(mask, 2, 6, 0, mask.device)
    assert additive.shape == allowed.shape and additive.dtype == side.dtype
    assert torch.equal(additive == 0, allowed)
    assert torch.isneginf(additive[~allowed]).all()
    assert side._attention_mask(torch.ones(2, 6), batch=2, seq=6, past=0) is None
