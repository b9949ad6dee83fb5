"""ref-vit: a small ViT trained on an image task made from real images that ship with the
dependencies."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from eval.errors import UserInputError
from eval.io import atomic_directory, read_json, write_json
from eval.reference.common import (
    CARD_NAME,
    adamw,
    build_lock,
    cache_root,
    cosine_lr,
    log,
    positive,
    recipe_hash,
    remove_stale_temporaries,
    single_threaded,
    validate_recipe,
    versions,
)


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
        validate_recipe(self)
        if self.image_size % self.patch_size:
            raise UserInputError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")



def vit_recipe(seed: int = 0, epochs: int | None = None, tiny: bool = False) -> ViTRecipe:
    if tiny:
        recipe = ViTRecipe(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           epochs=1, batch_size=32, warmup_epochs=0, max_train_images=64, seed=seed)
    else:
        recipe = ViTRecipe(seed=seed)
    return recipe if epochs is None else dataclasses.replace(recipe, epochs=positive(epochs, "epochs"))



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
    with build_lock(final):
        if _folder_is_current(final, expected):
            return final
        remove_stale_temporaries(final)
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
    with atomic_directory(out_dir) as tmp, single_threaded():
        train_x, train_y = _processed_split("train", recipe.image_size)
        test_x, test_y = _processed_split("test", recipe.image_size)
        if recipe.max_train_images is not None:
            train_x, train_y = train_x[: recipe.max_train_images], train_y[: recipe.max_train_images]
        torch.manual_seed(recipe.seed)
        model = _new_vit(recipe)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"ref-vit: training {n_params / 1e6:.2f} M parameters for {recipe.epochs} epochs on "
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
            "versions": versions(),
        }
        write_json(tmp / CARD_NAME, card)  # last: the completion mark
    if not tiny:
        reference_image_folder()
    log(f"ref-vit: test accuracy {test_accuracy:.4f} in {card['build_seconds']:.0f} s")
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
    optimizer = adamw(model, recipe.lr, recipe.weight_decay)
    model.train()
    losses = []
    bar = tqdm(total=total, desc="ref-vit train", unit="step", file=sys.stderr)
    for _ in range(recipe.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), recipe.batch_size):
            step = len(losses)
            lr = cosine_lr(step, total, recipe.warmup_epochs * steps_per_epoch, recipe.lr, recipe.min_lr)
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
