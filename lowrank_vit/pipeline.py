"""The `compress-vit` job end to end: data → accuracy and speed before → compress → after → files.

Kept out of `scripts/` (which only parses arguments) and out of `model.py` (which only knows
about modules): this is the measurement around `compress()`.

Data: `ref-vit` brings its own glyph split (calibrate on train images, evaluate on the test
split). Any other model reads an ImageNet-style folder through `eval.data.load_image_folder`
with its own image processor; calibration images are a seeded random draw from the folder
and are left out of the accuracy evaluation, so the two never overlap.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from eval.errors import UserInputError
from eval.speed import side_by_side_throughput
from lowrank_vit.config import MixedRankConfig
from lowrank_vit.model import compress, save_pretrained

REPORT_NAME = "compress_report"


# ------------------------------------------------------------------------------------- data


def as_tensor_batches(dataset, indices: list[int], batch_size: int, desc: str | None = None):
    """Yield (pixel_values [B, 3, H, W], labels [B]) for `dataset[i]` = (pixels, label)."""
    for start in tqdm(range(0, len(indices), batch_size), desc=desc, disable=desc is None, leave=False):
        items = [dataset[i] for i in indices[start : start + batch_size]]
        yield torch.stack([torch.as_tensor(p) for p, _ in items]), torch.tensor([int(label) for _, label in items])


def image_splits(model_name: str, data: str | None, image_processor, calib: int, seed: int = 0,
                 eval_limit: int | None = None):
    """(calibration dataset, calibration indices, eval dataset, eval indices, description)."""
    generator = torch.Generator().manual_seed(seed)
    if data is None:
        if model_name != "ref-vit":
            raise UserInputError(f"data (an ImageNet-style folder, one subfolder per class) is required for model "
                                 f"{model_name!r}; only ref-vit brings its own images", field="data")
        from eval.reference import reference_vit_split

        train, test = reference_vit_split("train"), reference_vit_split("test")
        if calib > len(train):
            raise UserInputError(f"calib_images={calib} is more than the {len(train)} ref-vit training images",
                                 field="calib_images")
        calib_idx = torch.randperm(len(train), generator=generator)[:calib].tolist()
        eval_idx = list(range(len(test)))[: eval_limit or None]
        return train, calib_idx, test, eval_idx, f"ref-vit glyphs: {calib} train images to calibrate, {len(eval_idx)} test images"
    from eval.data import load_image_folder

    folder = load_image_folder(data, image_processor)
    if calib >= len(folder):
        raise UserInputError(f"calib_images={calib} leaves no images to evaluate: {data} has {len(folder)} readable "
                             "images; use fewer calibration images or a larger folder", field="calib_images")
    order = torch.randperm(len(folder), generator=generator).tolist()
    calib_idx, eval_idx = order[:calib], sorted(order[calib:])[: eval_limit or None]
    skipped = f", {folder.skipped} unreadable file(s) skipped" if folder.skipped else ""
    return folder, calib_idx, folder, eval_idx, (f"{data}: {calib} images to calibrate, {len(eval_idx)} other images to "
                                                 f"evaluate ({len(folder.classes)} classes{skipped})")


# ------------------------------------------------------------------------------- measurement


@torch.no_grad()
def image_accuracy(model: nn.Module, dataset, indices: list[int], batch_size: int = 64, desc: str | None = None) -> float:
    from eval.metrics import accuracy

    device = next(model.parameters()).device
    predictions, labels = [], []
    for pixels, label in as_tensor_batches(dataset, indices, batch_size, desc):
        predictions.append(model(pixel_values=pixels.to(device)).logits.argmax(-1).cpu())
        labels.append(label)
    return accuracy(torch.cat(predictions), torch.cat(labels))


# ---------------------------------------------------------------------------------- the job


def run_compress_vit(model_name: str, out: str | Path, config: MixedRankConfig, data: str | None = None,
                     batch_size: int = 64, eval_limit: int | None = None, device: str = "cpu") -> dict:
    """Load, measure, compress, measure again; write the model and the report under `out`."""
    from eval.io import prepare_output_dir

    with prepare_output_dir(out, "compress-vit", signature=f"{REPORT_NAME}.json"):
        return _run_compress_vit(model_name, Path(out), config, data, batch_size, eval_limit, device)


def _run_compress_vit(model_name: str, out: Path, config: MixedRankConfig, data: str | None,
                      batch_size: int, eval_limit: int | None, device: str) -> dict:
    from eval.io import atomic_contents
    from eval.models import load_image_classifier
    from eval.report import markdown_table, write_report

    model, processor = load_image_classifier(model_name, device=device)
    calib_set, calib_idx, eval_set, eval_idx, data_note = image_splits(
        model_name, data, processor, config.calib_images, config.seed, eval_limit)
    _check_labels(model, calib_set, data)
    calib_batches = [pixels for pixels, _ in as_tensor_batches(calib_set, calib_idx, batch_size, "calibration images")]
    speed_batch = next(as_tensor_batches(eval_set, eval_idx, batch_size))[0].to(device)

    accuracy_before = image_accuracy(model, eval_set, eval_idx, batch_size, "accuracy before")
    dense = copy.deepcopy(model)
    started = time.perf_counter()
    report = compress(model, calib_batches, config)
    compress_time = time.perf_counter() - started
    accuracy_after = image_accuracy(model, eval_set, eval_idx, batch_size, "accuracy after")
    speed = side_by_side_throughput({"dense": dense, "compressed": model}, {"pixel_values": speed_batch},
                                    items=int(speed_batch.shape[0]))
    del dense

    summary = {
        "model": model_name,
        "method": config.method,
        "keep": config.keep,
        "int8": config.int8,
        "data": data_note,
        "eval_images": len(eval_idx),
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        "targeted_params_before": report["targeted_params_before"],
        "targeted_params_after": report["targeted_params_after"],
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "compress_time_s": compress_time,
        "images_per_s_before": speed["dense"],
        "images_per_s_after": speed["compressed"],
        "speed_batch_size": int(speed_batch.shape[0]),
        "torch_threads": torch.get_num_threads(),
        "ranks": report["ranks"],
        "compression": report,
    }
    with atomic_contents(out) as tmp:
        save_pretrained(model, tmp / "model", report)
        processor.save_pretrained(tmp / "model")
        write_report(tmp, REPORT_NAME, summary, report_markdown(summary, markdown_table), plots={"ranks": ranks_plot(report)})
    return summary


def _check_labels(model: nn.Module, dataset, data: str | None) -> None:
    """An image folder must have as many classes as the model has labels (accuracy is meaningless otherwise)."""
    classes = getattr(dataset, "classes", None)
    labels = getattr(model.config, "num_labels", None)
    if data is not None and classes is not None and labels is not None and len(classes) != labels:
        raise UserInputError(f"data={data} has {len(classes)} class folders but the model has {labels} labels; "
                             "expected one subfolder per model label, in label order", field="data")


def report_markdown(s: dict, markdown_table) -> str:
    rows = [
        {"": "parameters", "before": s["params_before"], "after": s["params_after"]},
        {"": "targeted parameters", "before": s["targeted_params_before"], "after": s["targeted_params_after"]},
        {"": "top-1 accuracy", "before": f"{100 * s['accuracy_before']:.2f} %", "after": f"{100 * s['accuracy_after']:.2f} %"},
        {"": f"images/s (batch {s['speed_batch_size']}, side by side)", "before": round(s["images_per_s_before"], 1), "after": round(s["images_per_s_after"], 1)},
    ]
    layers = [{"layer": name, "role": e["role"], "shape": "x".join(map(str, e["shape"])),
               "rank": "dense" if e["rank"] is None else e["rank"] + e["residual_rank"],
               "params": e["params"], "output error": e["output_error"],
               "compensated error": e.get("compensation", {}).get("error_after")}
              for name, e in s["compression"]["layers"].items()]
    return (
        f"# compress-vit: {s['model']}, {s['method']}, keep {s['keep']}{' + int8' if s['int8'] else ''}\n\n"
        f"Data: {s['data']}. Compression took {s['compress_time_s']:.1f} s.\n\n"
        + markdown_table(rows) + "\n\n## Per-layer ranks\n\n"
        "`rank` includes the merged residual term; `output error` is the relative calibration output error "
        "‖X(W − W′)ᵀ‖²/‖XWᵀ‖² of the truncation on dense inputs; `compensated error` is the layer's relative "
        "error against the dense model's outputs, fed by the compressed model, after compensation.\n\n"
        + markdown_table(layers)
    )


def ranks_plot(report: dict):
    """Bars: kept rank per targeted layer as a fraction of full rank (1.0 = stayed dense)."""
    names = list(report["layers"])
    entries = list(report["layers"].values())
    fractions = [1.0 if e["rank"] is None else (e["rank"] + e["residual_rank"]) / min(e["shape"]) for e in entries]
    roles = sorted({e["role"] for e in entries})

    def draw(ax):
        colors = {role: f"C{i}" for i, role in enumerate(roles)}
        ax.bar(range(len(names)), fractions, color=[colors[e["role"]] for e in entries])
        ax.set_xlabel("targeted layer (forward order)")
        ax.set_ylabel("rank / full rank")
        ax.set_title(f"{report['method']}: kept {report['keep_achieved']:.3f} of targeted parameters")
        ax.set_ylim(0, 1.05)
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=colors[r], label=r) for r in roles], fontsize=8)

    return draw


__all__ = ["run_compress_vit", "image_accuracy", "image_splits", "as_tensor_batches"]
