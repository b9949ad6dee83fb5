"""The embedded default: small reference models built here from data every machine has.

- `ref-lm`: a LLaMA-architecture causal LM (about 5 M parameters) pretrained on the text of
  this machine's CPython standard library (its `.py` sources and the `pydoc_data` documentation
  topics), with a byte-level BPE tokenizer trained on the same text.
- `ref-vit`: a small ViT trained on scikit-learn's bundled handwritten digits.

Both are cached under `$SLIMTUNE_CACHE` (default `~/.cache/slimtune`) in a directory named by a
hash of their recipe (so a recipe change rebuilds), written atomically with a
`reference_card.json` as the last file (the completion mark), and built under a file lock so
two processes never build the same model at once.

The corpus (decided here, documented in docs/RESULTS.md):
- every `.py` file under the stdlib directory, except `site-packages` (third-party code),
  test suites and their data (`test`, `tests`, `idle_test` directories: fixtures, deliberately
  broken files, huge generated tables) and `encodings` (generated codec tables), and
  `pydoc_data/topics.py` itself (it is read as topics instead);
- each topic of `pydoc_data.topics.topics` as its own document, named `pydoc_data/topics/<key>`.
The split is by document: a hash of its name (its path relative to the stdlib directory)
puts it in train (90 %), validation (5 %) or test (5 %), the same on every machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from eval.errors import UserInputError
from eval.io import atomic_directory, read_json, write_json

SPLITS = ("train", "validation", "test")
KINDS = ("lm", "vit")
CARD_NAME = "reference_card.json"
# Percent of documents per split, in SPLITS order.
SPLIT_PERCENT = (90, 5, 5)
_SKIPPED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "encodings", "__pycache__"})
_TOPICS_FILE = "pydoc_data/topics.py"


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """One corpus document: `name` is its path relative to the stdlib directory."""

    name: str
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(name: str) -> str:
    """The split of a document, from a hash of its name (stable across machines and runs)."""
    bucket = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % 100
    train, validation, _ = SPLIT_PERCENT
    if bucket < train:
        return "train"
    return "validation" if bucket < train + validation else "test"


@lru_cache(maxsize=1)
def _all_documents() -> tuple[Document, ...]:
    root = stdlib_dir()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIPPED_DIRS.intersection(rel.parts[:-1]) or rel.as_posix() == _TOPICS_FILE:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few files are deliberately in other encodings
        if text.strip():
            docs.append(Document(rel.as_posix(), text))
    if not docs:
        raise UserInputError(f"the reference corpus is empty: no readable .py files under {root}; "
                             "expected a CPython standard library directory")
    return tuple(docs + _topic_documents())


def _topic_documents() -> list[Document]:
    try:
        from pydoc_data.topics import topics  # a plain dict of str -> str (data, not pickle)
    except ImportError:
        return []
    return [Document(f"pydoc_data/topics/{key}", text) for key, text in sorted(topics.items()) if text.strip()]


def reference_corpus(split: str) -> list[Document]:
    """The documents of one split (`train`, `validation` or `test`), sorted by name."""
    if split not in SPLITS:
        raise UserInputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return [doc for doc in _all_documents() if split_of(doc.name) == split]


# --------------------------------------------------------------------------------------------
# Recipes and the cache
# --------------------------------------------------------------------------------------------


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
        _validate_recipe(self)
        if self.hidden_size % self.num_attention_heads:
            raise UserInputError(f"hidden_size={self.hidden_size} is not a multiple of "
                                 f"num_attention_heads={self.num_attention_heads}")
        if self.block_size > self.max_position_embeddings:
            raise UserInputError(f"block_size={self.block_size} is longer than "
                                 f"max_position_embeddings={self.max_position_embeddings}")


@dataclass(frozen=True)
class ViTRecipe:
    """Everything that determines ref-vit; its hash names the cache directory."""

    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 256
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: int = 2
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0
    # Random translation of the upsampled image by up to this many pixels (train only).
    max_shift: int = 2
    max_train_images: int | None = None
    seed: int = 0
    version: int = 1

    def __post_init__(self):
        _validate_recipe(self)
        if self.image_size % self.patch_size:
            raise UserInputError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")


def _validate_recipe(recipe) -> None:
    """Integers are positive (seed, shift and warm-up non-negative), rates positive."""
    for field in dataclasses.fields(recipe):
        value = getattr(recipe, field.name)
        if value is None:
            continue
        allow_zero = field.name in ("seed", "max_shift", "warmup_steps", "warmup_epochs", "weight_decay", "min_lr")
        if isinstance(value, (int, float)) and (value < 0 or (value == 0 and not allow_zero)):
            raise UserInputError(f"{type(recipe).__name__}.{field.name}={value} must be "
                                 f"{'>= 0' if allow_zero else 'positive'}")


def lm_recipe(seed: int = 0, steps: int | None = None, tiny: bool = False) -> LMRecipe:
    if tiny:
        recipe = LMRecipe(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=128, block_size=64, batch_size=4,
                          steps=4, warmup_steps=1, max_documents=12, seed=seed)
    else:
        recipe = LMRecipe(seed=seed)
    return recipe if steps is None else dataclasses.replace(recipe, steps=_positive(steps, "steps"))


def vit_recipe(seed: int = 0, epochs: int | None = None, tiny: bool = False) -> ViTRecipe:
    if tiny:
        recipe = ViTRecipe(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           epochs=1, batch_size=32, warmup_epochs=0, max_train_images=64, seed=seed)
    else:
        recipe = ViTRecipe(seed=seed)
    return recipe if epochs is None else dataclasses.replace(recipe, epochs=_positive(epochs, "epochs"))


def _positive(value: int, what: str) -> int:
    if int(value) < 1:
        raise UserInputError(f"{what}={value} must be a positive integer")
    return int(value)


def recipe_hash(recipe: LMRecipe | ViTRecipe) -> str:
    """12 hex digits naming a recipe; the Python minor version is part of it (the stdlib differs)."""
    key = {"recipe": type(recipe).__name__, **dataclasses.asdict(recipe),
           "python": ".".join(platform.python_version_tuple()[:2])}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("SLIMTUNE_CACHE") or Path.home() / ".cache" / "slimtune").expanduser()


def _recipe_for(kind: str, seed: int, tiny: bool) -> LMRecipe | ViTRecipe:
    if kind not in KINDS:
        raise UserInputError(f"unknown reference model {kind!r}; expected one of {', '.join(KINDS)}")
    return lm_recipe(seed=seed, tiny=tiny) if kind == "lm" else vit_recipe(seed=seed, tiny=tiny)


def reference_dir(kind: str, seed: int = 0, tiny: bool = False) -> Path:
    """Where the reference model for this recipe lives (or would live) in the cache."""
    recipe = _recipe_for(kind, seed, tiny)
    return cache_root() / f"ref-{kind}{'-tiny' if tiny else ''}-{recipe_hash(recipe)}"


def is_finished(model_dir: Path) -> bool:
    """A build is finished when its card (written last, inside an atomic rename) is there."""
    return (Path(model_dir) / CARD_NAME).is_file()


def reference_path(kind: str, build: bool = True, *, seed: int = 0, tiny: bool = False,
                   rebuild: bool = False) -> Path:
    """The directory of reference model `kind` ("lm" or "vit"), built on first use.

    `build=False` raises `UserInputError` when it is not built yet. `tiny=True` is a
    seconds-long build of a very small model, for tests of the mechanics only.
    `rebuild=True` builds again even if a finished one is cached.
    """
    final = reference_dir(kind, seed=seed, tiny=tiny)
    if is_finished(final) and not rebuild:
        return final
    if not build:
        raise UserInputError(f"reference model ref-{kind} is not built yet (looked in {final}); "
                             f"run `slimtune reference {kind}` to build it")
    with _build_lock(final):
        if is_finished(final) and not rebuild:
            return final  # another process built it while we waited for the lock
        _remove_stale_temporaries(final)
        builder = build_reference_lm if kind == "lm" else build_reference_vit
        builder(final, seed=seed, tiny=tiny)
    return final


def reference_card(kind: str, *, seed: int = 0, tiny: bool = False) -> dict:
    """The card (corpus stats, metrics, build time) of a cached reference model (built if needed)."""
    return read_json(reference_path(kind, seed=seed, tiny=tiny) / CARD_NAME, what="reference card")


@contextlib.contextmanager
def _build_lock(final: Path) -> Iterator[None]:
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we crash
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_stale_temporaries(final: Path) -> None:
    # Left by a build that was killed (SIGKILL skips atomic_directory's clean-up). Safe: we
    # hold the lock, so no live build of this recipe owns them.
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Train on one torch thread: the result then does not depend on the core count, and on a
    shared machine one thread is faster than two that keep waiting for each other."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def _cosine_lr(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor` at `total` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def _adamw(model, lr: float, weight_decay: float):
    import torch

    # nanoGPT: decay matrices only; norms and biases are not decayed.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


# --------------------------------------------------------------------------------------------
# ref-lm
# --------------------------------------------------------------------------------------------


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

    with atomic_directory(out_dir) as tmp, _single_threaded():
        _log(f"ref-lm: training a {recipe.vocab_size}-token byte-level BPE tokenizer on "
             f"{len(corpus['train'])} train documents")
        tokenizer = _train_lm_tokenizer(corpus["train"], recipe)
        # The harness's packing (documents + EOS, non-overlapping blocks) for training and
        # evaluation alike, so the card's perplexity is what eval.perplexity reports.
        blocks = {split: pack_token_blocks(docs, tokenizer, recipe.block_size) for split, docs in corpus.items()}

        torch.manual_seed(recipe.seed)
        model = _new_llama(recipe, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        _log(f"ref-lm: pretraining {n_params / 1e6:.2f} M parameters for {recipe.steps} steps "
             f"of {recipe.batch_size}x{recipe.block_size} tokens ({blocks['train'].numel():,} train tokens)")
        losses = _pretrain(model, blocks["train"], recipe)

        _log("ref-lm: evaluating held-out perplexity")
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
            "versions": _versions(),
        }
        write_json(tmp / CARD_NAME, card)  # last: the completion mark
    _log(f"ref-lm: test perplexity {metrics['test_perplexity']:.2f} "
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
    optimizer = _adamw(model, recipe.lr, recipe.weight_decay)
    model.train()
    losses = []
    bar = tqdm(range(recipe.steps), desc="ref-lm pretrain", unit="step", file=sys.stderr)
    for step in bar:
        lr = _cosine_lr(step, recipe.steps, recipe.warmup_steps, recipe.lr, recipe.min_lr)
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


# --------------------------------------------------------------------------------------------
# ref-vit
# --------------------------------------------------------------------------------------------

DIGIT_CLASSES = tuple(str(d) for d in range(10))
# The digits' held-out split is data, not model: fixed, whatever seed a model is built with.
_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_FRACTION = 0.2
_DATA_CARD = "data_card.json"
_BACKGROUND = -1.0  # a pixel with no ink after the processor's scaling: (0 / 255 - 0.5) / 0.5


@lru_cache(maxsize=1)
def _digits_split_indices() -> dict[str, tuple[int, ...]]:
    """Stratified 80/20 split of scikit-learn's 1797 digits into train/test dataset indices."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    train, test = train_test_split(range(len(labels)), test_size=_DIGITS_TEST_FRACTION,
                                   stratify=labels, random_state=_DIGITS_SPLIT_SEED)
    return {"train": tuple(sorted(train)), "test": tuple(sorted(test))}


def _vit_split_name(split: str) -> str:
    if split not in ("train", "test"):
        raise UserInputError(f"unknown ref-vit split {split!r}; expected 'train' or 'test'")
    return split


def reference_digit_images(split: str) -> tuple[list, list[int], list[int]]:
    """(PIL RGB images 8x8, labels, dataset indices) of one split of the digits."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    indices = _digits_split_indices()[_vit_split_name(split)]
    digits = load_digits()
    # Pixel values are 0..16 ink; scale exactly to 0..255 gray, 3 identical channels.
    images = [Image.fromarray(np.rint(digits.images[i] * 255.0 / 16.0).astype(np.uint8), mode="L").convert("RGB")
              for i in indices]
    return images, [int(digits.target[i]) for i in indices], list(indices)


def digits_image_processor(image_size: int = 32):
    """The processor ref-vit is trained with (and saved with): resize to image_size, scale to [-1, 1]."""
    import warnings

    from transformers import ViTImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torchvision-less fallback notice
        return ViTImageProcessor(do_resize=True, size={"height": image_size, "width": image_size},
                                 do_rescale=True, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@lru_cache(maxsize=2)
def _processed_split(split: str, image_size: int):
    import torch

    images, labels, _ = reference_digit_images(split)
    pixel_values = digits_image_processor(image_size)(images=images, return_tensors="pt")["pixel_values"]
    return pixel_values.float(), torch.tensor(labels, dtype=torch.long)


def reference_image_split(split: str):
    """(pixel_values [n, 3, 32, 32], labels [n]) of the ref-vit digits, `split` in train/test.

    The same tensors ref-vit's image processor makes from the PNG folder's files.
    """
    pixel_values, labels = _processed_split(_vit_split_name(split), ViTRecipe().image_size)
    return pixel_values.clone(), labels.clone()


def reference_vit_split(split: str):
    """The digits split as a `TensorDataset` of (pixel_values [3, 32, 32], label)."""
    from torch.utils.data import TensorDataset

    return TensorDataset(*reference_image_split(split))


def reference_image_folder(build: bool = True) -> Path:
    """`<cache>/ref-vit-data`: the digits as `{train,test}/<digit>/<index>.png` (8x8 RGB PNGs).

    An ImageNet-style folder, for commands that take `--data DIR`. Written atomically, with
    `data_card.json` last; rewritten if the split recipe changes.
    """
    final = cache_root() / "ref-vit-data"
    expected = _data_card()
    if _folder_is_current(final, expected):
        return final
    if not build:
        raise UserInputError(f"the ref-vit image folder is not written yet (looked in {final}); "
                             "run `slimtune reference vit` to write it")
    with _build_lock(final):
        if _folder_is_current(final, expected):
            return final
        _remove_stale_temporaries(final)
        with atomic_directory(final) as tmp:
            for split in ("train", "test"):
                images, labels, indices = reference_digit_images(split)
                for image, label, index in zip(images, labels, indices, strict=True):
                    folder = tmp / split / DIGIT_CLASSES[label]
                    folder.mkdir(parents=True, exist_ok=True)
                    image.save(folder / f"{index:04d}.png")
            write_json(tmp / _DATA_CARD, expected)
    return final


def _data_card() -> dict:
    split = _digits_split_indices()
    return {"source": "sklearn.datasets.load_digits (UCI handwritten digits, 8x8, 0..16 ink scaled to 0..255)",
            "split_seed": _DIGITS_SPLIT_SEED, "test_fraction": _DIGITS_TEST_FRACTION,
            "images": {name: len(idx) for name, idx in split.items()}, "classes": list(DIGIT_CLASSES)}


def _folder_is_current(folder: Path, expected: dict) -> bool:
    card = folder / _DATA_CARD
    return card.is_file() and read_json(card, "ref-vit data card") == expected


def build_reference_vit(out_dir: str | os.PathLike, seed: int = 0, epochs: int | None = None,
                        tiny: bool = False) -> Path:
    """Train ref-vit on the digits' train split, evaluate on the test split, write atomically.

    Writes `save_pretrained` weights + image processor + `reference_card.json` (last).
    """
    import torch

    recipe = vit_recipe(seed=seed, epochs=epochs, tiny=tiny)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    with atomic_directory(out_dir) as tmp, _single_threaded():
        train_x, train_y = _processed_split("train", recipe.image_size)
        test_x, test_y = _processed_split("test", recipe.image_size)
        if recipe.max_train_images is not None:
            train_x, train_y = train_x[: recipe.max_train_images], train_y[: recipe.max_train_images]
        torch.manual_seed(recipe.seed)
        model = _new_vit(recipe)
        n_params = sum(p.numel() for p in model.parameters())
        _log(f"ref-vit: training {n_params / 1e6:.2f} M parameters for {recipe.epochs} epochs on "
             f"{len(train_x)} digits")
        losses = _train_vit(model, train_x, train_y, recipe)
        test_accuracy = _vit_accuracy(model, test_x, test_y)
        model.save_pretrained(tmp)
        digits_image_processor(recipe.image_size).save_pretrained(tmp)
        card = {
            "model": "ref-vit",
            "recipe": dataclasses.asdict(recipe),
            "recipe_hash": recipe_hash(recipe),
            "tiny": tiny,
            "parameters": n_params,
            "data": {**_data_card(), "train_images_used": len(train_x)},
            "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
            "train_accuracy": _vit_accuracy(model, train_x, train_y),
            "test_accuracy": test_accuracy,
            "build_seconds": round(time.perf_counter() - started, 1),
            "torch_threads": torch.get_num_threads(),
            "versions": _versions(),
        }
        write_json(tmp / CARD_NAME, card)  # last: the completion mark
    if not tiny:
        reference_image_folder()
    _log(f"ref-vit: test accuracy {test_accuracy:.4f} in {card['build_seconds']:.0f} s")
    return out_dir


def _new_vit(recipe: ViTRecipe):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=recipe.image_size, patch_size=recipe.patch_size, num_channels=3,
        hidden_size=recipe.hidden_size, num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads, intermediate_size=recipe.intermediate_size,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label=dict(enumerate(DIGIT_CLASSES)), label2id={c: i for i, c in enumerate(DIGIT_CLASSES)},
    )
    return ViTForImageClassification(config)


def _train_vit(model, images, labels, recipe: ViTRecipe) -> list[float]:
    """AdamW, warm-up + cosine per step, gradient clipping, random-shift augmentation."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(recipe.seed)
    steps_per_epoch = math.ceil(len(images) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    optimizer = _adamw(model, recipe.lr, recipe.weight_decay)
    model.train()
    losses = []
    bar = tqdm(total=total, desc="ref-vit train", unit="step", file=sys.stderr)
    for _ in range(recipe.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), recipe.batch_size):
            step = len(losses)
            lr = _cosine_lr(step, total, recipe.warmup_epochs * steps_per_epoch, recipe.lr, recipe.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = order[start : start + recipe.batch_size]
            pixels = _random_shift(images[batch], recipe.max_shift, generator)  # [B, 3, H, W]
            loss = F.cross_entropy(model(pixel_values=pixels).logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


def _random_shift(images, max_shift: int, generator):
    """Translate each image by up to `max_shift` pixels each way, filling with background."""
    import torch
    import torch.nn.functional as F

    if max_shift == 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4, value=_BACKGROUND)  # [B, 3, H+2s, W+2s]
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    return torch.stack([p[:, dy : dy + size, dx : dx + size] for p, (dy, dx) in zip(padded, offsets.tolist(), strict=True)])


def _vit_accuracy(model, images, labels, batch_size: int = 256) -> float:
    import torch

    from eval.metrics import accuracy

    with torch.inference_mode():
        predictions = torch.cat([model(pixel_values=images[i : i + batch_size]).logits.argmax(-1)
                                 for i in range(0, len(images), batch_size)])
    return accuracy(predictions, labels)
