"""QST under transformers' Trainer: it learns at the base learning rate with Trainer's own
optimizer, and QSTTrainer saves and resumes the side network in QST's own format."""

from __future__ import annotations

import pytest
import torch

from eval.models import load_causal_lm
from qst import QSTConfig, QSTForCausalLM, QSTTrainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def dataset(tiny_texts, tiny_tokenizer):
    ids = tiny_tokenizer("\n".join(tiny_texts))["input_ids"]
    blocks = [ids[i : i + 16] for i in range(0, 16 * 32, 16)]
    return [{"input_ids": torch.tensor(b), "attention_mask": torch.ones(16, dtype=torch.long),
             "labels": torch.tensor(b)} for b in blocks]


def _args(out, **overrides):
    from transformers import TrainingArguments

    settings = dict(output_dir=str(out), max_steps=20, learning_rate=5e-3, per_device_train_batch_size=4,
                    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                    lr_scheduler_type="constant", disable_tqdm=True)
    return TrainingArguments(**{**settings, **overrides})


def _losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def _qst(tiny_llama_dir):
    model, _ = load_causal_lm(tiny_llama_dir)
    return QSTForCausalLM.from_base(model, QSTConfig(r=4))


def test_plain_trainer_trains_qst_at_the_base_learning_rate(tiny_llama_dir, dataset, tmp_path):
    from transformers import Trainer

    model = _qst(tiny_llama_dir)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=dataset)
    trainer.train()
    losses = _losses(trainer)
    # alpha moves alpha_lr times the learning rate under Trainer's own AdamW, so the side
    # network trains (before alpha's parametrisation the loss stayed where it started)
    assert model.side.alpha.item() < 0.9
    assert sum(losses[-5:]) / 5 < losses[0] - 0.1


def test_qst_trainer_saves_the_side_network_and_resumes(tiny_llama_dir, dataset, tmp_path):
    model = _qst(tiny_llama_dir)
    trainer = QSTTrainer(model=model, args=_args(tmp_path / "run", save_strategy="steps", save_steps=10),
                         train_dataset=dataset)
    trainer.train()
    trainer.save_model(tmp_path / "side")
    assert {p.name for p in (tmp_path / "side").iterdir()} >= {"qst_config.json", "side_network.safetensors"}
    assert not (tmp_path / "side" / "model.safetensors").exists()
    loaded = QSTForCausalLM.from_pretrained(tmp_path / "side", base=load_causal_lm(tiny_llama_dir)[0])
    batch = dataset[0]["input_ids"][None]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch).logits, model(input_ids=batch).logits)
    # a checkpoint resumes into a fresh model: the side network as it was at step 10
    checkpoint = tmp_path / "run" / "checkpoint-10"
    assert (checkpoint / "side_network.safetensors").is_file()
    resumed = _qst(tiny_llama_dir)
    again = QSTTrainer(model=resumed, args=_args(tmp_path / "run", save_strategy="steps", save_steps=10),
                       train_dataset=dataset)
    again.train(resume_from_checkpoint=str(checkpoint))
    assert again.state.global_step == 20
    with torch.no_grad():
        torch.testing.assert_close(resumed(input_ids=batch).logits, model(input_ids=batch).logits)


def test_a_plain_trainer_save_is_refused_with_what_to_do(tiny_llama_dir, dataset, tmp_path):
    from transformers import Trainer

    from eval.errors import UserInputError

    trainer = Trainer(model=_qst(tiny_llama_dir), args=_args(tmp_path, max_steps=1), train_dataset=dataset)
    trainer.save_model(tmp_path / "bare")
    with pytest.raises(UserInputError, match="QSTTrainer"):
        QSTForCausalLM.from_pretrained(tmp_path / "bare")
