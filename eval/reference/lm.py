"""ref-lm: a LLaMA-architecture causal LM pretrained on the reference corpus, with a
byte-level BPE tokenizer trained on the same text."""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from eval.errors import UserInputError
from eval.io import atomic_directory, write_json
from eval.reference.common import (
    CARD_NAME,
    adamw,
    cosine_lr,
    log,
    positive,
    recipe_hash,
    single_threaded,
    validate_recipe,
    versions,
)
from eval.reference.corpus import SPLIT_PERCENT, SPLITS, Document, reference_corpus, stdlib_dir


@dataclass(frozen=True)
class LMRecipe:
    """Everything that determines ref-lm; its hash names the cache directory."""

    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 688
    max_position_embeddings: int = 1024
    block_size: int = 512
    batch_size: int = 8
    steps: int = 400
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    # None: the whole split; tiny builds use the first few documents of each split.
    max_documents: int | None = None
    seed: int = 0
    # Bump when the build code changes what a recipe produces (the hash then names a new directory).
    version: int = 1

    def __post_init__(self):
        validate_recipe(self)
        if self.hidden_size % self.num_attention_heads:
            raise UserInputError(f"hidden_size={self.hidden_size} is not a multiple of "
                                 f"num_attention_heads={self.num_attention_heads}")
        if self.block_size > self.max_position_embeddings:
            raise UserInputError(f"block_size={self.block_size} is longer than "
                                 f"max_position_embeddings={self.max_position_embeddings}")



def lm_recipe(seed: int = 0, steps: int | None = None, tiny: bool = False) -> LMRecipe:
    if tiny:
        recipe = LMRecipe(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=128, block_size=64, batch_size=4,
                          steps=4, warmup_steps=1, max_documents=12, seed=seed)
    else:
        recipe = LMRecipe(seed=seed)
    return recipe if steps is None else dataclasses.replace(recipe, steps=positive(steps, "steps"))



def build_reference_lm(out_dir: str | os.PathLike, seed: int = 0, steps: int | None = None,
                       tiny: bool = False) -> Path:
    """Train the tokenizer and ref-lm, evaluate, and write them to `out_dir` atomically.

    Writes `save_pretrained` weights (safetensors) + tokenizer + `reference_card.json` (last).
    """
    import torch

    from eval.data import pack_token_blocks

    recipe = lm_recipe(seed=seed, steps=steps, tiny=tiny)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    corpus = {split: _limit(reference_corpus(split), recipe.max_documents) for split in SPLITS}
    for split, docs in corpus.items():
        if not docs:
            raise UserInputError(f"the reference corpus has no {split} documents; "
                                 "expected a CPython standard library with its .py sources")

    with atomic_directory(out_dir) as tmp, single_threaded():
        log(f"ref-lm: training a {recipe.vocab_size}-token byte-level BPE tokenizer on "
             f"{len(corpus['train'])} train documents")
        tokenizer = _train_lm_tokenizer(corpus["train"], recipe)
        # The harness's packing (documents + EOS, non-overlapping blocks) for training and
        # evaluation alike, so the card's perplexity is what eval.perplexity reports.
        blocks = {split: pack_token_blocks(docs, tokenizer, recipe.block_size) for split, docs in corpus.items()}

        torch.manual_seed(recipe.seed)
        model = _new_llama(recipe, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"ref-lm: pretraining {n_params / 1e6:.2f} M parameters for {recipe.steps} steps "
             f"of {recipe.batch_size}x{recipe.block_size} tokens ({blocks['train'].numel():,} train tokens)")
        losses = _pretrain(model, blocks["train"], recipe)

        log("ref-lm: evaluating held-out perplexity")
        metrics = _evaluate_lm(model, blocks)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        card = {
            "model": "ref-lm",
            "recipe": dataclasses.asdict(recipe),
            "recipe_hash": recipe_hash(recipe),
            "tiny": tiny,
            "parameters": n_params,
            "corpus": {
                "source": f"CPython {platform.python_version()} standard library ({stdlib_dir()}): "
                          ".py sources + pydoc_data topics",
                "split_percent": dict(zip(SPLITS, SPLIT_PERCENT, strict=True)),
                "documents": {s: len(d) for s, d in corpus.items()},
                "characters": {s: sum(len(doc.text) for doc in d) for s, d in corpus.items()},
                "tokens_in_blocks": {s: int(b.numel()) for s, b in blocks.items()},
            },
            "train_tokens_seen": recipe.steps * recipe.batch_size * recipe.block_size,
            "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
            **metrics,
            "build_seconds": round(time.perf_counter() - started, 1),
            "torch_threads": torch.get_num_threads(),
            "versions": versions(),
        }
        write_json(tmp / CARD_NAME, card)  # last: the completion mark
    log(f"ref-lm: test perplexity {metrics['test_perplexity']:.2f} "
         f"(unigram {metrics['unigram_test_perplexity']:.1f}) in {card['build_seconds']:.0f} s")
    return out_dir


def _limit(docs: list[Document], n: int | None, max_chars: int = 2000) -> list[Document]:
    if n is None:
        return docs
    # Tiny builds: the n shortest documents, each cut short, so that everything takes no time.
    shortest = sorted(docs, key=lambda d: (len(d.text), d.name))[:n]
    return [Document(d.name, d.text[:max_chars]) for d in shortest]


def _train_lm_tokenizer(docs: list[Document], recipe: LMRecipe):
    from eval.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer((d.text for d in docs), vocab_size=recipe.vocab_size,
                               model_max_length=recipe.max_position_embeddings)


def _new_llama(recipe: LMRecipe, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers, num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_attention_heads, max_position_embeddings=recipe.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _pretrain(model, blocks, recipe: LMRecipe) -> list[float]:
    """nanoGPT-style loop: AdamW, warm-up + cosine, gradient clipping, shuffled packed blocks.

    `blocks`: LongTensor [n_blocks, block_size]; each step takes `batch_size` of them in a
    seeded random order (a fresh permutation per epoch).
    """
    import torch
    from tqdm.auto import tqdm

    if len(blocks) < recipe.batch_size:
        raise UserInputError(f"the train split has {len(blocks)} blocks of {recipe.block_size} tokens; "
                             f"expected at least batch_size={recipe.batch_size}")
    order = _EpochOrder(len(blocks), recipe.seed)
    optimizer = adamw(model, recipe.lr, recipe.weight_decay)
    model.train()
    losses = []
    bar = tqdm(range(recipe.steps), desc="ref-lm pretrain", unit="step", file=sys.stderr)
    for step in bar:
        lr = cosine_lr(step, recipe.steps, recipe.warmup_steps, recipe.lr, recipe.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = blocks[order.take(recipe.batch_size)]  # [batch_size, block_size]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.1e}")
    model.eval()
    return losses


class _EpochOrder:
    """Block indices from a fresh seeded permutation per epoch; deterministic for the seed."""

    def __init__(self, n: int, seed: int):
        import torch

        self.n, self.generator, self.queue = n, torch.Generator().manual_seed(seed), []

    def take(self, k: int):
        import torch

        while len(self.queue) < k:
            self.queue.extend(torch.randperm(self.n, generator=self.generator).tolist())
        taken, self.queue = self.queue[:k], self.queue[k:]
        return torch.tensor(taken)


def _evaluate_lm(model, blocks: dict) -> dict:
    """Held-out perplexity over non-overlapping blocks, and a unigram model's on the same tokens."""
    from eval.metrics import perplexity_of_blocks

    return {
        "eval_block_size": int(blocks["test"].shape[1]),
        "test_blocks": len(blocks["test"]),
        "test_perplexity": perplexity_of_blocks(model, blocks["test"]),
        "validation_perplexity": perplexity_of_blocks(model, blocks["validation"]),
        # The tokens a block predicts are its positions 1..T-1, as in perplexity_of_blocks.
        "unigram_test_perplexity": unigram_perplexity(blocks["train"], blocks["test"][:, 1:], model.config.vocab_size),
    }


def unigram_perplexity(train_ids, eval_ids, vocab_size: int) -> float:
    """Perplexity of a unigram model fitted on `train_ids` (add-one smoothing) on `eval_ids`."""
    import torch

    counts = torch.bincount(train_ids.flatten(), minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    return float(torch.exp(-log_probs[eval_ids.flatten()].mean()))
