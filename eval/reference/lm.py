"""ref-lm: a LLaMA-architecture causal LM pretrained on the reference corpus, with a
byte-level BPE tokenizer trained on the same text."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from eval.errors import UserInputError, require_positive
from eval.io import atomic_directory, write_json
from eval.reference.common import (
    CARD_NAME,
    decay_groups,
    log,
    recipe_hash,
    single_threaded,
    validate_recipe,
    versions,
)
from eval.reference.corpus import (
    PINNED_DISTRIBUTIONS,
    SPLIT_PERCENT,
    SPLITS,
    Document,
    corpus_manifest,
    lm_corpus,
    reference_corpus,
    stdlib_dir,
)


@dataclass(frozen=True)
class LMRecipe:
    """Everything that determines ref-lm; its hash names the cache directory.

    v2 (the default) is sized for the compute of a 2-core CPU, thinking in tokens per
    parameter: a small model that sees its corpus more than once behaves like a real pretrained
    model (compression costs something), where v1 (5.3 M parameters, 1.6 M tokens) did not.
    """

    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 344
    max_position_embeddings: int = 1024
    block_size: int = 256
    batch_size: int = 32
    steps: int = 1200
    lr: float = 3e-3
    warmup_steps: int = 60
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    # "stdlib": the CPython standard library only (v1); "stdlib+pypi": plus the pinned PyPI
    # distributions' sources (`eval.reference.corpus.lm_corpus`).
    corpus: str = "stdlib+pypi"
    # None: the whole split; tiny builds use the first few documents of each split.
    max_documents: int | None = None
    seed: int = 0
    # Bump when the build code changes what a recipe produces (the hash then names a new directory).
    version: int = 2

    def __post_init__(self):
        validate_recipe(self)
        if self.corpus not in CORPORA:
            raise UserInputError(f"LMRecipe.corpus={self.corpus!r}; expected one of {', '.join(CORPORA)}")
        if self.hidden_size % self.num_attention_heads:
            raise UserInputError(f"hidden_size={self.hidden_size} is not a multiple of "
                                 f"num_attention_heads={self.num_attention_heads}")
        if self.block_size > self.max_position_embeddings:
            raise UserInputError(f"block_size={self.block_size} is longer than "
                                 f"max_position_embeddings={self.max_position_embeddings}")


CORPORA = ("stdlib", "stdlib+pypi")
# Snapshots of the weights kept during the build, to measure how compressibility grows.
SNAPSHOT_FRACTIONS = (0.125, 0.25, 0.5)
CHECKPOINT_EVERY = 50  # steps: a few minutes on 2 cores
MANIFEST_NAME = "corpus_manifest.json"


def lm_recipe(seed: int = 0, steps: int | None = None, tiny: bool = False) -> LMRecipe:
    if tiny:
        recipe = LMRecipe(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=128, block_size=64, batch_size=4,
                          steps=4, warmup_steps=1, corpus="stdlib", max_documents=12, seed=seed)
    else:
        recipe = LMRecipe(seed=seed)
    return recipe if steps is None else dataclasses.replace(recipe, steps=require_positive("steps", steps))


def partial_dir(final: Path) -> Path:
    """Where an unfinished build keeps its checkpoint: beside the final directory, under a name
    no finished model has, so a killed build resumes there and is never mistaken for a model."""
    return final.parent / f".{final.name}.partial"


def build_reference_lm(out_dir: str | os.PathLike, seed: int = 0, steps: int | None = None,
                       tiny: bool = False) -> Path:
    """Train the tokenizer and ref-lm, evaluate, and write them to `out_dir` atomically.

    Writes `save_pretrained` weights (safetensors) + tokenizer + the corpus manifest +
    `reference_card.json` (last). Training checkpoints every `CHECKPOINT_EVERY` steps into
    `partial_dir(out_dir)`; a build killed part-way resumes from there.
    """
    import torch

    from eval.data import pack_token_blocks
    from eval.train import TrainConfig, train

    recipe = lm_recipe(seed=seed, steps=steps, tiny=tiny)
    out_dir = Path(out_dir)
    work = partial_dir(out_dir)
    started = time.perf_counter()
    corpus = _corpus(recipe)
    tokenizer = _tokenizer(corpus["train"], recipe, work)
    # The harness's packing (documents + EOS, non-overlapping blocks) for training and
    # evaluation alike, so the card's perplexity is what eval.perplexity reports.
    blocks = {split: pack_token_blocks(docs, tokenizer, recipe.block_size) for split, docs in corpus.items()}
    if len(blocks["train"]) < recipe.batch_size:
        raise UserInputError(f"the train split has {len(blocks['train'])} blocks of {recipe.block_size} tokens; "
                             f"expected at least batch_size={recipe.batch_size}")

    with _threads(tiny):
        torch.manual_seed(recipe.seed)
        model = _new_llama(recipe, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"ref-lm: pretraining {n_params / 1e6:.2f} M parameters for {recipe.steps} steps "
            f"of {recipe.batch_size}x{recipe.block_size} tokens ({blocks['train'].numel():,} train tokens)")
        config = TrainConfig(max_steps=recipe.steps, lr=recipe.lr, weight_decay=recipe.weight_decay,
                             betas=(0.9, 0.95), warmup_ratio=recipe.warmup_steps / recipe.steps, schedule="cosine",
                             max_grad_norm=recipe.max_grad_norm, checkpoint_every=CHECKPOINT_EVERY,
                             eval_every=_snapshot_every(recipe), seed=recipe.seed, mixed_precision="no")
        result = train(model, _ShuffledBlocks(blocks["train"], recipe.batch_size), config,
                       eval_fn=_Snapshots(snapshot_dir(out_dir), recipe, work) if config.eval_every else None, out_dir=work, desc="ref-lm pretrain",
                       param_groups=decay_groups(model, recipe.weight_decay),
                       run={"recipe": dataclasses.asdict(recipe)})

        log("ref-lm: evaluating held-out perplexity and bits per byte")
        metrics = _evaluate_lm(model, tokenizer, corpus, blocks)
        machine = _machine()  # inside _threads: the thread count training ran with
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / MANIFEST_NAME, corpus_manifest(corpus))
        card = {
            "model": "ref-lm",
            "recipe": dataclasses.asdict(recipe),
            "recipe_hash": recipe_hash(recipe),
            "tiny": tiny,
            "parameters": n_params,
            "corpus": {
                "source": _corpus_source(recipe),
                "split_percent": dict(zip(SPLITS, SPLIT_PERCENT, strict=True)),
                "documents": {s: len(d) for s, d in corpus.items()},
                "bytes": {s: sum(len(doc.text.encode("utf-8")) for doc in d) for s, d in corpus.items()},
                "tokens_in_blocks": {s: int(b.numel()) for s, b in blocks.items()},
                "manifest": MANIFEST_NAME,
            },
            "train_tokens_seen": recipe.steps * recipe.batch_size * recipe.block_size,
            "tokens_per_parameter": round(recipe.steps * recipe.batch_size * recipe.block_size / n_params, 1),
            "final_train_loss": sum(result.losses[-10:]) / len(result.losses[-10:]),
            "loss_curve": result.losses[:: max(1, len(result.losses) // 200)],
            **metrics,
            "build_seconds": round(time.perf_counter() - started, 1),
            "resumed_from_step": result.resumed_from,
            "snapshots": _Snapshots.names(recipe),
            "trained_on": machine,
            "versions": versions(),
        }
        write_json(tmp / CARD_NAME, card)  # last: the completion mark
    shutil.rmtree(work, ignore_errors=True)
    log(f"ref-lm: test perplexity {metrics['test_perplexity']:.2f}, {metrics['test_bits_per_byte']:.3f} bits per byte "
        f"(unigram perplexity {metrics['unigram_test_perplexity']:.1f}) in {card['build_seconds']:.0f} s")
    return out_dir


def _corpus(recipe: LMRecipe) -> dict[str, list[Document]]:
    read = lm_corpus if recipe.corpus == "stdlib+pypi" else reference_corpus
    corpus = {split: _limit(read(split), recipe.max_documents) for split in SPLITS}
    for split, docs in corpus.items():
        if not docs:
            raise UserInputError(f"the reference corpus has no {split} documents; "
                                 "expected a CPython standard library with its .py sources")
    return corpus


def _corpus_source(recipe: LMRecipe) -> str:
    source = f"CPython {platform.python_version()} standard library ({stdlib_dir()}): .py sources + pydoc_data topics"
    if recipe.corpus == "stdlib+pypi":
        source += "; the Python sources of " + ", ".join(f"{d.name}=={d.version}" for d in PINNED_DISTRIBUTIONS)
    return source


def _tokenizer(train_docs: list[Document], recipe: LMRecipe, work: Path):
    """Train the tokenizer, or reload the one an interrupted build of this recipe trained."""
    from transformers import PreTrainedTokenizerFast

    from eval.tokenizer import train_bpe_tokenizer

    saved = work / "tokenizer"
    if (saved / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(saved)
    log(f"ref-lm: training a {recipe.vocab_size}-token byte-level BPE tokenizer on {len(train_docs)} train documents")
    tokenizer = train_bpe_tokenizer((d.text for d in train_docs), vocab_size=recipe.vocab_size,
                                    model_max_length=recipe.max_position_embeddings)
    with atomic_directory(saved) as tmp:
        tokenizer.save_pretrained(tmp)
    return tokenizer


@contextlib.contextmanager
def _threads(tiny: bool) -> Iterator[None]:
    """Tiny builds on one thread (bit-identical on any machine); full builds on every core,
    since they take long enough that the rebuild is compared within a tolerance anyway."""
    import torch

    if tiny:
        with single_threaded():
            yield
        return
    previous = torch.get_num_threads()
    # SLIMTUNE_THREADS: fewer threads than cores is faster on a machine that is busy otherwise.
    torch.set_num_threads(int(os.environ.get("SLIMTUNE_THREADS") or os.cpu_count() or 1))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine())
    return {"device": "cpu", "cpu": cpu, "torch_threads": torch.get_num_threads(), "cores": os.cpu_count()}


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _limit(docs: list[Document], n: int | None, max_chars: int = 2000) -> list[Document]:
    if n is None:
        return docs
    # Tiny builds: the n shortest documents, each cut short, so that everything takes no time.
    shortest = sorted(docs, key=lambda d: (len(d.text), d.name))[:n]
    return [Document(d.name, d.text[:max_chars]) for d in shortest]


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


class _ShuffledBlocks:
    """Batches `{"input_ids", "labels"}` of `batch_size` packed blocks, in a fresh random order
    each pass drawn from torch's global RNG (which `eval.train` seeds per pass, so a resumed
    build sees the same order)."""

    def __init__(self, blocks, batch_size: int):
        self.blocks, self.batch_size = blocks, batch_size  # blocks: [n_blocks, block_size]

    def __len__(self) -> int:
        return len(self.blocks) // self.batch_size

    def __iter__(self):
        import torch

        order = torch.randperm(len(self.blocks))
        for i in range(len(self)):
            batch = self.blocks[order[i * self.batch_size : (i + 1) * self.batch_size]]
            yield {"input_ids": batch, "labels": batch}


def _snapshot_every(recipe: LMRecipe) -> int | None:
    every = int(recipe.steps * SNAPSHOT_FRACTIONS[0])
    return every if every >= 1 else None


class _Snapshots:
    """`eval_fn` of the build: at 1/8, 1/4 and 1/2 of training, keep the weights (outside the
    model directory), so that how compressibility grows can be measured afterwards."""

    def __init__(self, folder: Path, recipe: LMRecipe, work: Path):
        from eval.train import load_checkpoint_state

        self.folder, self.every = folder, _snapshot_every(recipe)
        self.wanted = set(self.names(recipe))
        saved = load_checkpoint_state(work)  # a resumed build has made step // every calls already
        self.calls = saved["step"] // self.every if saved and self.every else 0

    @staticmethod
    def names(recipe: LMRecipe) -> list[str]:
        return [f"step-{int(recipe.steps * f)}" for f in SNAPSHOT_FRACTIONS]

    def __call__(self, model) -> dict:
        from safetensors.torch import save_file

        self.calls += 1
        name = f"step-{self.every * self.calls}"
        if name in self.wanted:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(self.folder / f"{name}.safetensors"),
                      metadata={"format": "pt"})
        return {}


def snapshot_dir(final: Path) -> Path:
    """Weights kept part-way through a build (outside the model directory, not shipped)."""
    return final.parent / f"{final.name}-snapshots"


def _evaluate_lm(model, tokenizer, corpus: dict, blocks: dict) -> dict:
    """Held-out perplexity and bits per byte, the same on v1's test documents (the stdlib's) and
    on the other test documents, and a unigram model's perplexity on the same tokens."""
    from eval.data import pack_token_blocks
    from eval.metrics import bits_per_byte_of_blocks, perplexity_of_blocks

    stdlib_test = [d for d in corpus["test"] if not d.name.startswith("pypi/")]
    other_test = [d for d in corpus["test"] if d.name.startswith("pypi/")]
    block = blocks["test"].shape[1]
    metrics = {
        "eval_block_size": int(block),
        "test_blocks": len(blocks["test"]),
        "test_perplexity": perplexity_of_blocks(model, blocks["test"]),
        "test_bits_per_byte": bits_per_byte_of_blocks(model, blocks["test"], tokenizer),
        "validation_perplexity": perplexity_of_blocks(model, blocks["validation"]),
        "validation_bits_per_byte": bits_per_byte_of_blocks(model, blocks["validation"], tokenizer),
        # The tokens a block predicts are its positions 1..T-1, as in perplexity_of_blocks.
        "unigram_test_perplexity": unigram_perplexity(blocks["train"], blocks["test"][:, 1:], model.config.vocab_size),
    }
    for name, docs in (("stdlib_test", stdlib_test), ("pypi_test", other_test)):
        if docs:  # v1's test documents are the stdlib's test split
            packed = pack_token_blocks(docs, tokenizer, block)
            metrics[f"{name}_perplexity"] = perplexity_of_blocks(model, packed)
            metrics[f"{name}_bits_per_byte"] = bits_per_byte_of_blocks(model, packed, tokenizer)
    return metrics


def unigram_perplexity(train_ids, eval_ids, vocab_size: int) -> float:
    """Perplexity of a unigram model fitted on `train_ids` (add-one smoothing) on `eval_ids`."""
    import torch

    counts = torch.bincount(train_ids.flatten(), minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    return float(torch.exp(-log_probs[eval_ids.flatten()].mean()))
