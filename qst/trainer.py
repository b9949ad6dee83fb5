"""QST under transformers' `Trainer`, the loop most users already have.

    trainer = QSTTrainer(model=QSTForCausalLM.from_base("ref-lm"), args=TrainingArguments(...),
                         train_dataset=..., data_collator=...)
    trainer.train()                      # learns at the base learning rate, any optimizer
    trainer.save_model("side/")          # qst_config.json + side_network.safetensors
    QSTForCausalLM.from_pretrained("side/")

A QST model trains under the plain `Trainer` too: alpha's speed-up lives in its
parametrisation (`qst.layer.SideNetwork.alpha`), not in an optimizer group, so Trainer's own
AdamW over `model.parameters()` (only the side network requires a gradient) trains it. What
the plain Trainer cannot do is save it: it calls `save_pretrained` only on transformers and
PEFT models and writes anything else as one bare state dict, backbone included, with no
config. `QSTTrainer` changes exactly that: its checkpoints and `save_model` write the side
network in QST's own format (what `save_pretrained` writes), and `resume_from_checkpoint`
reads it back.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import Trainer

from qst.model import WEIGHTS_NAME, _QSTModel

TRAINING_ARGS_JSON = "training_args.json"


class QSTTrainer(Trainer):
    """`transformers.Trainer` that saves and resumes a QST model as a side network."""

    def _qst_model(self) -> _QSTModel | None:
        model = self.accelerator.unwrap_model(self.model)
        return model if isinstance(model, _QSTModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._qst_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        # The run's arguments as JSON (Trainer's own training_args.bin is a pickle).
        (output_dir / TRAINING_ARGS_JSON).write_text(self.args.to_json_string(), encoding="utf-8")
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str | os.PathLike, model=None) -> None:
        qst_model = self._qst_model() if model is None else model
        if not isinstance(qst_model, _QSTModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        qst_model.load_side_weights(Path(resume_from_checkpoint) / WEIGHTS_NAME)
        return None
