"""Choose ref-vit v3's recipe on the validation typefaces (never on test): for each candidate
that `ref_vit_v3_candidates.py` built, the dense top-1 and the top-1 after each compression
method at `--keep` (default 0.4 = 60 % fewer block parameters), calibrated on 256 train images
as `slimtune compress-vit` does. Writes a JSON and a Markdown table under --out.

    python docs/recipes/ref_vit_v3_select.py --out runs/ref-vit-v3-select h96-e12 h64-e24
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # the sibling recipe

from ref_vit_v3_candidates import CANDIDATES, candidate_dir  # noqa: E402

from eval.io import write_json  # noqa: E402
from eval.reference import CARD_NAME, reference_vit_split  # noqa: E402
from eval.report import markdown_table  # noqa: E402
from lowrank_vit.config import METHODS, MixedRankConfig  # noqa: E402
from lowrank_vit.model import compress  # noqa: E402
from lowrank_vit.pipeline import as_tensor_batches, image_accuracy  # noqa: E402


def measure(name: str, keep: float, calib: int, methods: list[str]) -> list[dict]:
    from transformers import ViTForImageClassification

    from eval.io import read_json

    folder = candidate_dir(name)
    card = read_json(folder / CARD_NAME, "candidate card")
    dense = ViTForImageClassification.from_pretrained(folder).eval()
    train, validation = reference_vit_split("train"), reference_vit_split("validation")
    calib_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:calib].tolist()
    calib_batches = [pixels for pixels, _ in as_tensor_batches(train, calib_idx, 64)]
    val_idx = list(range(len(validation)))
    base = image_accuracy(dense, validation, val_idx)
    rows = [{"candidate": name, "parameters": card["parameters"],
             "images_per_parameter": card["images_seen_per_parameter"], "method": "dense",
             "validation_top1": base, "change_points": 0.0}]
    for method in methods:
        model = copy.deepcopy(dense)
        compress(model, calib_batches, MixedRankConfig(keep=keep, method=method, calib_images=calib), progress=False)
        top1 = image_accuracy(model, validation, val_idx)
        rows.append({**rows[0], "method": method, "validation_top1": top1, "change_points": 100 * (top1 - base)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidates", nargs="+", choices=sorted(CANDIDATES))
    parser.add_argument("--keep", type=float, default=0.4)
    parser.add_argument("--calib", type=int, default=256, help="calibration images from train")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [row for name in args.candidates for row in measure(name, args.keep, args.calib, args.methods)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "select.json", {"keep": args.keep, "calib": args.calib, "split": "validation", "rows": rows})
    rows = [{**r, "calib": args.calib} for r in rows]
    table = [{"candidate": r["candidate"], "calibration images": r["calib"], "parameters": r["parameters"], "images seen / parameter":
              r["images_per_parameter"], "method": r["method"], "validation top-1 %": round(100 * r["validation_top1"], 2),
              "change (points)": round(r["change_points"], 2)} for r in rows]
    (out / "select.md").write_text(markdown_table(table) + "\n")
    print((out / "select.md").read_text())


if __name__ == "__main__":
    main()
