"""ref-vit: a small ViT trained on an image task made from real images that ship with the
dependencies: glyphs of the typefaces in matplotlib's `mpl-data/fonts/ttf`, rendered with
seeded affine distortions, blur, contrast and noise, split by typeface."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from eval.errors import UserInputError, require_positive
from eval.io import atomic_directory, read_json, write_json
from eval.reference.common import (
    CARD_NAME,
    build_lock,
    cache_root,
    decay_groups,
    log,
    recipe_hash,
    remove_stale_temporaries,
    single_threaded,
    validate_recipe,
    versions,
)
from eval.reference.lm import partial_dir

# Training steps between checkpoints: about a minute on one shared core.
CHECKPOINT_EVERY = 200


@dataclass(frozen=True)
class ViTRecipe:
    """Everything that determines ref-vit's model and training; its hash names the cache
    directory. The data (fonts, renders, distortions) is fixed by `version`."""

    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 96
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 192
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: int = 1
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0
    # Random translation of each training image by up to this many pixels (on top of the
    # rendered distortions), so the model does not see one fixed copy of each render.
    max_shift: int = 2
    max_train_images: int | None = None
    seed: int = 0
    # 2: 47 classes, 17 train typefaces x 30 renders, 8 epochs (563 k parameters; dense 91.9 %,
    # plain SVD at -60 % lost only 0.68 points: too few images per parameter to fill the
    # weights' spectrum). 3: 2 of those typefaces become a validation split, 40 renders per
    # typeface and class, hidden 96 / MLP 192 (324 k parameters) for 12 epochs: 3x v2's images
    # seen per parameter (chosen on the validation typefaces: docs/results/ref-vit-v3.md).
    version: int = 3

    def __post_init__(self):
        validate_recipe(self)
        if self.image_size % self.patch_size:
            raise UserInputError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.image_size != GLYPH_SIZE:
            raise UserInputError(f"image_size={self.image_size}; the glyph images are {GLYPH_SIZE}x{GLYPH_SIZE}")


def vit_recipe(seed: int = 0, epochs: int | None = None, tiny: bool = False) -> ViTRecipe:
    if tiny:
        recipe = ViTRecipe(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           epochs=1, batch_size=32, warmup_epochs=0, max_train_images=64, seed=seed)
    else:
        recipe = ViTRecipe(seed=seed)
    return recipe if epochs is None else dataclasses.replace(recipe, epochs=require_positive("epochs", epochs))


# ------------------------------------------------------------------------------------- data

# The 47 classes of EMNIST "balanced": 10 digits, 26 capitals, and the 11 lower-case letters
# whose shape differs from their capital. The other 15 lower-case letters (c i j k l m o p s u
# v w x y z) are a smaller copy of their capital once a glyph is centred and scaled, so each
# pair is one class (class "C" is rendered from "C" and "c").
_MERGED = "CIJKLMOPSUVWXYZ"
_LOWER = "abdefghnqrt"
GLYPH_CLASSES = tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ") + tuple(_LOWER)
# Split by typeface: no style of a test typeface is in train or validation. Test: STIX General
# (a Times-like serif, 4 styles) and Computer Modern Sans Serif; validation (chooses the recipe):
# DejaVu Serif Bold Italic and Computer Modern Bold, typefaces train never sees (their siblings
# are in train); train: the other DejaVu Sans, Sans Mono, Serif styles and Computer Modern Roman,
# Text Italic, Typewriter and Math Italic. (cmsy10/cmex10 are symbol fonts, the Display and
# NonUnicode files hold no letters, LastResort draws boxes: none is used.)
_FONTS = {
    "train": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
              "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
              "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
              "cmr10.ttf", "cmti10.ttf", "cmtt10.ttf", "cmmi10.ttf"),
    "validation": ("DejaVuSerif-BoldItalic.ttf", "cmb10.ttf"),
    "test": ("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf", "cmss10.ttf"),
}
VIT_SPLITS = tuple(_FONTS)
# Renders per (typeface, class): 15 x 47 x 40 = 28,200 train, 2 x 47 x 10 = 940 validation and
# 5 x 47 x 10 = 2,350 test images.
_RENDERS = {"train": 40, "validation": 10, "test": 10}
_DATA_SEED = 0  # the data is fixed, whatever seed a model is built with
GLYPH_SIZE = 32
_CANVAS = 64  # rendered at twice the size, then box-downsampled: anti-aliased strokes
_CAP_HEIGHT = 28  # height of "H" on the canvas, in every typeface (so x-height still differs from cap height)
_DISTORTION = {"rotation_deg": 12.0, "scale": (0.8, 1.15), "shear": 0.25, "shift_px": 3.0,
               "blur_radius": (0.0, 1.5), "bolden_p": 0.3, "background": (0.0, 0.3), "ink": (0.7, 1.0),
               "noise_std": (0.0, 0.08)}
_DATA_CARD = "data_card.json"


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _vit_split_name(split: str) -> str:
    if split not in VIT_SPLITS:
        raise UserInputError(f"unknown ref-vit split {split!r}; expected one of {', '.join(VIT_SPLITS)}")
    return split


def glyph_keys(split: str, renders: int | None = None) -> list[tuple[str, int, str, int]]:
    """(font file, class index, character, render index) of every image of a split, in order.

    Counting these is cheap: nothing is rendered. A merged class alternates its two cases.
    """
    split = _vit_split_name(split)
    renders = _RENDERS[split] if renders is None else renders
    keys = []
    for font in _FONTS[split]:
        for label, name in enumerate(GLYPH_CLASSES):
            chars = name + name.lower() if name in _MERGED else name
            keys.extend((font, label, chars[r % len(chars)], r) for r in range(renders))
    return keys


@lru_cache(maxsize=64)
def _font(font_file: str):
    """The typeface at the size that makes its "H" `_CAP_HEIGHT` pixels tall."""
    from PIL import ImageFont

    path = font_dir() / font_file
    if not path.is_file():
        raise UserInputError(f"ref-vit needs matplotlib's font {path}, which is missing; "
                             "expected matplotlib's bundled fonts (reinstall matplotlib)")
    probe = ImageFont.truetype(str(path), 100)
    _, top, _, bottom = probe.getbbox("H")
    return ImageFont.truetype(str(path), max(1, round(100 * _CAP_HEIGHT / (bottom - top))))


def render_glyph(font_file: str, char: str, render: int):
    """One distorted 32x32 RGB image of `char` in a typeface; a fixed function of its arguments."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    d = _DISTORTION
    rng = np.random.default_rng([_DATA_SEED, zlib.crc32(font_file.encode()), ord(char), render])
    font = _font(font_file)
    left, top, right, bottom = font.getbbox(char)
    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    half = _CANVAS / 2
    ImageDraw.Draw(canvas).text((half - (left + right) / 2, half - (top + bottom) / 2), char, font=font, fill=255)
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, _inverse_affine(rng, half),
                              resample=Image.Resampling.BILINEAR)
    if rng.random() < d["bolden_p"]:
        canvas = canvas.filter(ImageFilter.MaxFilter(3))
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(*d["blur_radius"])))
    ink = np.asarray(canvas.resize((GLYPH_SIZE, GLYPH_SIZE), Image.Resampling.BOX), dtype=np.float64) / 255.0
    background, foreground = rng.uniform(*d["background"]), rng.uniform(*d["ink"])
    gray = background + (foreground - background) * ink + rng.normal(0.0, rng.uniform(*d["noise_std"]), ink.shape)
    return Image.fromarray(np.rint(np.clip(gray, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L").convert("RGB")


def _inverse_affine(rng, center: float) -> tuple[float, ...]:
    """PIL's AFFINE data (output pixel -> input pixel) of a random rotation, scale, shear and
    shift about the canvas centre."""
    import numpy as np

    d = _DISTORTION
    angle = math.radians(rng.uniform(-d["rotation_deg"], d["rotation_deg"]))
    scale, shear = rng.uniform(*d["scale"]), rng.uniform(-d["shear"], d["shear"])
    shift = rng.uniform(-d["shift_px"], d["shift_px"], 2)
    rotate = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    forward = rotate @ np.array([[1.0, shear], [0.0, 1.0]]) * scale  # input offset -> output offset
    inverse = np.linalg.inv(forward)
    offset = np.array([center, center]) - inverse @ (np.array([center, center]) + shift)
    return (*inverse[0], offset[0], *inverse[1], offset[1])


def reference_glyph_images(split: str, renders: int | None = None) -> tuple[list, list[int], list[tuple]]:
    """(PIL RGB images 32x32, labels, keys from `glyph_keys`) of one split of the glyphs."""
    keys = glyph_keys(split, renders)
    return [render_glyph(font, char, r) for font, _, char, r in keys], [k[1] for k in keys], keys


def vit_image_processor(image_size: int = GLYPH_SIZE):
    """The processor ref-vit is trained with (and saved with): resize to image_size, scale to [-1, 1]."""
    import warnings

    from transformers import ViTImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torchvision-less fallback notice
        return ViTImageProcessor(do_resize=True, size={"height": image_size, "width": image_size},
                                 do_rescale=True, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _pixel_values(images):
    """[n, 3, 32, 32] in [-1, 1]: what `vit_image_processor` makes of 32x32 images (a resize to
    the same size is the identity), without its per-image overhead."""
    import numpy as np
    import torch

    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])  # [n, H, W, 3]
    return (torch.from_numpy(array).permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.5


@lru_cache(maxsize=3)
def _rendered_split(split: str, renders: int | None = None):
    """(gray [n, 32, 32] uint8, labels [n] int64) of a split, in `glyph_keys` order: rendered on
    first use and then read from the cache (rendering the 31 k glyphs takes a minute or two,
    reading them back a second). The images are gray replicated to RGB, so one channel is kept."""
    import numpy as np
    import torch

    path = _rendered_split_path(split, renders)
    if path.is_file():
        from eval.io import load_safetensors

        tensors = load_safetensors(path, "cached ref-vit glyphs (delete the file to render them again)")
        return tensors["gray"], tensors["labels"]
    from safetensors.torch import save
    from tqdm.auto import tqdm

    from eval.io import atomic_write_bytes

    keys = glyph_keys(split, renders)
    gray = torch.from_numpy(np.stack([np.asarray(render_glyph(font, char, r))[:, :, 0] for font, _, char, r in
                                      tqdm(keys, desc=f"rendering ref-vit {split} glyphs", unit="image",
                                           file=sys.stderr, mininterval=5)]))
    labels = torch.tensor([k[1] for k in keys], dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save({"gray": gray.contiguous(), "labels": labels}))
    return gray, labels


def _processed_split(split: str, renders: int | None = None):
    """(pixel_values [n, 3, 32, 32] in [-1, 1], labels [n]): `_pixel_values` of the cached renders."""
    import torch

    gray, labels = _rendered_split(split, renders)
    pixels = (gray.to(torch.float32) / 255.0 - 0.5) / 0.5  # _pixel_values' arithmetic, on one channel
    return pixels.unsqueeze(1).expand(-1, 3, -1, -1).contiguous(), labels


def _rendered_split_path(split: str, renders: int | None) -> Path:
    """`<cache>/ref-vit-glyphs/<split>-<hash>.safetensors`; the hash covers the data card (fonts,
    renders, distortions) and the render count, so a change of the data renders afresh."""
    import hashlib
    import json

    key = json.dumps({"card": _data_card(), "split": split, "renders": renders}, sort_keys=True)
    return cache_root() / "ref-vit-glyphs" / f"{split}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"


def reference_image_split(split: str):
    """(pixel_values [n, 3, 32, 32], labels [n]) of the ref-vit glyphs, `split` in train/test.

    The same tensors ref-vit's image processor makes from the PNG folder's files.
    """
    pixel_values, labels = _processed_split(_vit_split_name(split))
    return pixel_values.clone(), labels.clone()


def reference_vit_split(split: str):
    """The glyph split as a `TensorDataset` of (pixel_values [3, 32, 32], label)."""
    from torch.utils.data import TensorDataset

    return TensorDataset(*reference_image_split(split))


def class_folder_name(label: int) -> str:
    """Folder of a class in the PNG folder; lower-case classes get a suffix so that no two
    names differ only in case (case-insensitive file systems), and sorted names keep label order."""
    name = GLYPH_CLASSES[label]
    return f"{name}_lower" if name.islower() else name


def image_folder_path() -> Path:
    """Where `reference_image_folder` writes the PNG folder (nothing is written here)."""
    return cache_root() / "ref-vit-data"


def image_folder_is_written() -> bool:
    return _folder_is_current(image_folder_path(), _data_card())


def reference_image_folder(build: bool = True) -> Path:
    """`<cache>/ref-vit-data`: the glyphs as `{train,test}/<class>/<font>-<char>-<render>.png`
    (32x32 RGB PNGs).

    An ImageNet-style folder, for commands that take `--data DIR`; its sorted class folders are
    ref-vit's label order. Written when first asked for (`slimtune reference vit --write-images`),
    atomically, with `data_card.json` last; rewritten if the data recipe changes.
    """
    final = image_folder_path()
    expected = _data_card()
    if _folder_is_current(final, expected):
        return final
    if not build:
        raise UserInputError(f"the ref-vit image folder is not written yet (looked in {final}); "
                             "run `slimtune reference vit --write-images` to write it")
    from PIL import Image
    from tqdm.auto import tqdm

    with build_lock(final):
        if _folder_is_current(final, expected):
            return final
        remove_stale_temporaries(final)
        with atomic_directory(final) as tmp:
            for split in VIT_SPLITS:
                gray, _ = _rendered_split(split)
                keys = glyph_keys(split)
                for image, (font, label, char, render) in zip(tqdm(gray.numpy(), desc=f"writing ref-vit {split} PNGs",
                                                                   unit="image", file=sys.stderr, mininterval=5),
                                                              keys, strict=True):
                    folder = tmp / split / class_folder_name(label)
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image, mode="L").convert("RGB").save(
                        folder / f"{Path(font).stem}-u{ord(char):04x}-{render:03d}.png")
            write_json(tmp / _DATA_CARD, expected)
    return final


def _data_card() -> dict:
    return {"source": "glyphs of the typefaces shipped in matplotlib's mpl-data/fonts/ttf, rendered with PIL "
                      f"(cap height {_CAP_HEIGHT} px on a {_CANVAS}x{_CANVAS} canvas, box-downsampled to "
                      f"{GLYPH_SIZE}x{GLYPH_SIZE}, gray replicated to RGB)",
            "split": "by typeface: train and test fonts are disjoint families",
            "fonts": {split: list(fonts) for split, fonts in _FONTS.items()},
            "renders_per_font_and_class": dict(_RENDERS), "distortion": dict(_DISTORTION), "data_seed": _DATA_SEED,
            "images": {split: len(glyph_keys(split)) for split in _FONTS},
            "classes": list(GLYPH_CLASSES), "case_merged_classes": list(_MERGED)}


def _folder_is_current(folder: Path, expected: dict) -> bool:
    card = folder / _DATA_CARD
    return card.is_file() and read_json(card, "ref-vit data card") == _jsonable(expected)


def _jsonable(value):
    """`value` as it reads back from JSON (tuples become lists)."""
    import json

    return json.loads(json.dumps(value))


def _train_split(recipe: ViTRecipe):
    """The training tensors; a capped (tiny) recipe renders only a seeded draw of the images."""
    import numpy as np
    import torch

    if recipe.max_train_images is None:
        return _processed_split("train")
    keys = glyph_keys("train")
    chosen = np.random.default_rng(recipe.seed).permutation(len(keys))[: recipe.max_train_images]
    images = [render_glyph(keys[i][0], keys[i][2], keys[i][3]) for i in chosen]
    return _pixel_values(images), torch.tensor([keys[i][1] for i in chosen], dtype=torch.long)


def build_reference_vit(out_dir: str | os.PathLike, seed: int = 0, epochs: int | None = None,
                        tiny: bool = False, recipe: ViTRecipe | None = None) -> Path:
    """Train ref-vit on the train typefaces' glyphs, evaluate on the validation and test
    typefaces', write atomically.

    Writes `save_pretrained` weights + image processor + `reference_card.json` (last). Training
    checkpoints every `CHECKPOINT_EVERY` steps into `partial_dir(out_dir)`; a build killed
    part-way resumes from there. The PNG folder is not written here (`reference_image_folder`
    writes it when a command asks for it). `recipe` replaces the default recipe (to build a
    candidate of a new version; the seed, epochs and tiny arguments are then ignored).
    """
    import torch

    from eval.train import TrainConfig, train

    recipe = recipe or vit_recipe(seed=seed, epochs=epochs, tiny=tiny)
    out_dir = Path(out_dir)
    work = partial_dir(out_dir)
    started = time.perf_counter()
    with single_threaded():
        train_x, train_y = _train_split(recipe)
        held_out = {split: _processed_split(split) for split in ("validation", "test")}
        torch.manual_seed(recipe.seed)
        model = _new_vit(recipe)
        n_params = sum(p.numel() for p in model.parameters())
        batches = _ShuffledGlyphs(train_x, train_y, recipe.batch_size, recipe.max_shift)
        steps = recipe.epochs * len(batches)
        log(f"ref-vit: training {n_params / 1e6:.2f} M parameters for {recipe.epochs} epochs ({steps} steps) on "
            f"{len(train_x)} glyph images")
        config = TrainConfig(max_steps=steps, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.95),
                             warmup_ratio=recipe.warmup_epochs / recipe.epochs, schedule="cosine",
                             max_grad_norm=recipe.max_grad_norm, checkpoint_every=CHECKPOINT_EVERY,
                             eval_every=None if tiny else len(batches) * max(1, recipe.epochs // 8),
                             seed=recipe.seed, mixed_precision="no")
        result = train(model, batches, config, eval_fn=lambda m: {"validation_accuracy": _vit_accuracy(m, *held_out["validation"])},
                       out_dir=work, desc="ref-vit train", param_groups=decay_groups(model, recipe.weight_decay),
                       run={"recipe": dataclasses.asdict(recipe)})
        model.eval()
        accuracy = {f"{split}_accuracy": _vit_accuracy(model, *tensors) for split, tensors in held_out.items()}
        train_accuracy = _vit_accuracy(model, train_x, train_y)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        vit_image_processor(recipe.image_size).save_pretrained(tmp)
        card = {
            "model": "ref-vit",
            "recipe": dataclasses.asdict(recipe),
            "recipe_hash": recipe_hash(recipe),
            "tiny": tiny,
            "parameters": n_params,
            "data": {**_data_card(), "train_images_used": len(train_x)},
            "images_seen_per_parameter": round(steps * recipe.batch_size / n_params, 2),
            "final_train_loss": sum(result.losses[-10:]) / len(result.losses[-10:]),
            "train_accuracy": train_accuracy,
            **accuracy,
            "validation_history": result.eval_history,
            "build_seconds": round(time.perf_counter() - started, 1),
            "resumed_from_step": result.resumed_from,
            "torch_threads": 1,
            "device": "cpu",
            "versions": versions(),
            "history": _VERSION_HISTORY,
        }
        write_json(tmp / CARD_NAME, card)  # last: the completion mark
    shutil.rmtree(work, ignore_errors=True)
    log(f"ref-vit: validation accuracy {accuracy['validation_accuracy']:.4f}, test accuracy "
        f"{accuracy['test_accuracy']:.4f} in {card['build_seconds']:.0f} s")
    return out_dir


# Earlier versions of the default recipe, as measured (docs/RESULTS.md, docs/results/ref-vit-v3.md).
_VERSION_HISTORY = {
    "2": {"data": "47 classes; 17 train typefaces x 30 renders = 23,970 train images, 2,350 test images (no validation "
                  "split)", "architecture": "hidden 128, 4 layers, 4 heads, MLP 256 (563,247 parameters)",
          "epochs": 8, "test_accuracy": 0.9191, "build_seconds": 899.0,
          "plain_svd_keep_0.4_top1_change_points": -0.68,
          "why_replaced": "too few images per parameter: every compression method tied at -60 % parameters"},
}


class _ShuffledGlyphs:
    """Batches `{"pixel_values", "labels"}` in a fresh random order each pass, each image shifted
    by up to `max_shift` pixels; both drawn from torch's global RNG, which `eval.train` seeds per
    pass, so a resumed build sees the same batches."""

    def __init__(self, images, labels, batch_size: int, max_shift: int):
        self.images, self.labels = images, labels  # [n, 3, 32, 32], [n]
        self.batch_size, self.max_shift = batch_size, max_shift

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self):
        import torch

        order = torch.randperm(len(self.images))
        for start in range(0, len(self.images), self.batch_size):
            batch = order[start : start + self.batch_size]
            yield {"pixel_values": _random_shift(self.images[batch], self.max_shift), "labels": self.labels[batch]}


def _new_vit(recipe: ViTRecipe):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=recipe.image_size, patch_size=recipe.patch_size, num_channels=3,
        hidden_size=recipe.hidden_size, num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads, intermediate_size=recipe.intermediate_size,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label=dict(enumerate(GLYPH_CLASSES)), label2id={c: i for i, c in enumerate(GLYPH_CLASSES)},
    )
    return ViTForImageClassification(config)


def _random_shift(images, max_shift: int):
    """Translate each image by up to `max_shift` pixels each way; the border pixels are repeated
    (the background is not one fixed value)."""
    import torch
    import torch.nn.functional as F

    if max_shift == 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")  # [B, 3, H+2s, W+2s]
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2))
    return torch.stack([p[:, dy : dy + size, dx : dx + size] for p, (dy, dx) in zip(padded, offsets.tolist(), strict=True)])


def _vit_accuracy(model, images, labels, batch_size: int = 256) -> float:
    import torch

    from eval.metrics import accuracy

    with torch.inference_mode():
        predictions = torch.cat([model(pixel_values=images[i : i + batch_size]).logits.argmax(-1)
                                 for i in range(0, len(images), batch_size)])
    return accuracy(predictions, labels)
